// The router sends a request to the least loaded replica of its model, avoids replicas whose KV
// cache is nearly full, avoids replicas the request already failed on, and spreads ties.
#include "rpc/router.h"

#include <gtest/gtest.h>

namespace nosa::rpc {
namespace {

ReplicaLoad replica(uint64_t id, int64_t outstanding, int64_t kv_free = 900,
                    const std::string& model = "m") {
  ReplicaLoad r;
  r.id = id;
  r.model = model;
  r.outstanding = outstanding;
  r.max_running = 16;
  r.kv_blocks_total = 1000;
  r.kv_blocks_free = kv_free;
  return r;
}

TEST(Router, PicksTheReplicaWithFewestOutstandingRequests) {
  EXPECT_EQ(pick_replica({replica(1, 5), replica(2, 2), replica(3, 9)}, "m"), 2u);
}

TEST(Router, AvoidsAReplicaWhoseKvCacheIsNearlyFull) {
  EXPECT_EQ(pick_replica({replica(1, 1, 20), replica(2, 6, 800)}, "m"), 2u);
}

TEST(Router, PrefersMoreFreeKvAtEqualLoad) {
  EXPECT_EQ(pick_replica({replica(1, 3, 300), replica(2, 3, 700)}, "m"), 2u);
}

TEST(Router, OnlyReplicasOfTheModel) {
  EXPECT_EQ(pick_replica({replica(1, 0, 900, "a"), replica(2, 7, 900, "b")}, "b"), 2u);
  EXPECT_FALSE(pick_replica({replica(1, 0, 900, "a")}, "b").has_value());
  EXPECT_FALSE(pick_replica({}, "a").has_value());
}

TEST(Router, SkipsExcludedReplicasWhenAnotherExists) {
  EXPECT_EQ(pick_replica({replica(1, 0), replica(2, 8)}, "m", {1}), 2u);
  EXPECT_EQ(pick_replica({replica(1, 0)}, "m", {1}), 1u);
}

TEST(Router, TiesGoToTheLeastRecentlyPicked) {
  auto a = replica(1, 2), b = replica(2, 2);
  a.last_pick = 10;
  b.last_pick = 4;
  EXPECT_EQ(pick_replica({a, b}, "m"), 2u);
}

}  // namespace
}  // namespace nosa::rpc
