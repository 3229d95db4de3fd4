// Picks the replica for a new request by load: the requests the coordinator has sent it and
// not seen finish (always current), relative to its batch size, and the share of its KV blocks
// that its last heartbeat reported free. Pure logic, so that it is tested without sockets.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace nosa::rpc {

struct ReplicaLoad {
  uint64_t id = 0;
  std::string model;
  int64_t outstanding = 0;  // sent by the coordinator, not finished
  int64_t waiting = 0;      // queued in the replica (last heartbeat)
  int64_t max_running = 1;
  int64_t kv_blocks_free = 0;  // last heartbeat
  int64_t kv_blocks_total = 0;
  uint64_t last_pick = 0;  // a counter value of the last time it was picked (ties)
};

// The load score: lower is better. Outstanding requests per batch slot dominate; a replica
// whose KV cache is nearly full (under 10% free) counts as one batch fuller.
double load_score(const ReplicaLoad& r);

// The replica for `model` with the lowest score (ties: least recently picked), skipping ids in
// `exclude` (replicas a request already failed on) when another exists. Nothing when no replica
// serves the model.
std::optional<uint64_t> pick_replica(const std::vector<ReplicaLoad>& replicas,
                                     const std::string& model,
                                     const std::vector<uint64_t>& exclude = {});

}  // namespace nosa::rpc
