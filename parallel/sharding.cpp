#include "parallel/sharding.h"

#include "runtime/core/error.h"

namespace nosa::parallel {

Partition make_partition(int n_heads, int n_kv_heads, int64_t intermediate, int64_t vocab,
                         int rank, int world) {
  NOSA_CHECK(world >= 1 && rank >= 0 && rank < world, "bad tensor-parallel rank {} of {}", rank,
             world);
  Partition p;
  p.rank = rank;
  p.world = world;
  const int group = n_heads / n_kv_heads;
  if (world <= n_kv_heads) {
    NOSA_CHECK(n_kv_heads % world == 0,
               "tensor parallelism {} does not divide the {} KV heads of the model", world,
               n_kv_heads);
    p.kv_count = n_kv_heads / world;
    p.kv_begin = rank * p.kv_count;
    p.q_count = p.kv_count * group;
    p.q_begin = p.kv_begin * group;
    p.group_q_begin = p.q_begin;
    p.group_q_count = p.q_count;
  } else {
    NOSA_CHECK(world % n_kv_heads == 0,
               "tensor parallelism {} must divide or be a multiple of the {} KV heads", world,
               n_kv_heads);
    const int replicas = world / n_kv_heads;
    NOSA_CHECK(group % replicas == 0,
               "tensor parallelism {}: each KV head would be replicated {} times, which does not "
               "divide its {} query heads",
               world, replicas, group);
    p.kv_begin = rank / replicas;
    p.kv_count = 1;
    p.q_count = group / replicas;
    p.q_begin = p.kv_begin * group + (rank % replicas) * p.q_count;
    p.group_q_begin = p.kv_begin * group;
    p.group_q_count = group;
  }
  p.ffn_begin = intermediate * rank / world;
  p.ffn_count = intermediate * (rank + 1) / world - p.ffn_begin;
  p.vocab_begin = vocab * rank / world;
  p.vocab_count = vocab * (rank + 1) / world - p.vocab_begin;
  NOSA_CHECK(p.ffn_count > 0 && p.vocab_count > 0, "tensor parallelism {} is too wide", world);
  return p;
}

}  // namespace nosa::parallel
