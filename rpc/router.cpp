#include "rpc/router.h"

#include <algorithm>

namespace nosa::rpc {

double load_score(const ReplicaLoad& r) {
  const double slots = double(std::max<int64_t>(1, r.max_running));
  double score = double(r.outstanding) / slots;
  if (r.kv_blocks_total > 0) {
    const double free_share = double(r.kv_blocks_free) / double(r.kv_blocks_total);
    if (free_share < 0.1) score += 1.0;
    score += 0.01 * (1.0 - free_share);  // tie-break towards more free KV
  }
  return score;
}

std::optional<uint64_t> pick_replica(const std::vector<ReplicaLoad>& replicas,
                                     const std::string& model,
                                     const std::vector<uint64_t>& exclude) {
  auto excluded = [&](uint64_t id) {
    return std::find(exclude.begin(), exclude.end(), id) != exclude.end();
  };
  const ReplicaLoad* best = nullptr;
  bool best_excluded = true;
  for (const auto& r : replicas) {
    if (r.model != model) continue;
    const bool ex = excluded(r.id);
    bool better = false;
    if (!best) {
      better = true;
    } else if (ex != best_excluded) {
      better = !ex;
    } else {
      const double a = load_score(r), b = load_score(*best);
      better = a < b || (a == b && r.last_pick < best->last_pick);
    }
    if (better) {
      best = &r;
      best_excluded = ex;
    }
  }
  if (!best) return std::nullopt;
  return best->id;
}

}  // namespace nosa::rpc
