// The peer all-reduce under mpirun on 2 and (where present) 4 GPUs: tests/cuda/
// peer_all_reduce_check.cpp does the checking; skipped with fewer than 2 GPUs or where the GPUs
// cannot map each other's memory.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cstdio>
#include <string>


namespace {

int gpu_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) return 0;
  return n;
}

void run_check(int np) {
  if (gpu_count() < np) GTEST_SKIP() << "needs " << np << " GPUs, found " << gpu_count();
  const std::string cmd = "NCCL_NVLS_ENABLE=0 mpirun --allow-run-as-root --oversubscribe -np " +
                          std::to_string(np) + " " + PEER_ALL_REDUCE_CHECK + " 2>&1";
  FILE* p = popen(cmd.c_str(), "r");
  ASSERT_NE(p, nullptr);
  std::string out;
  char buf[512];
  while (fgets(buf, sizeof buf, p)) out += buf;
  const int status = pclose(p);
  std::printf("%s", out.c_str());
  if (out.find("peer path is unavailable") != std::string::npos)
    GTEST_SKIP() << "the GPUs cannot map each other's memory";
  EXPECT_EQ(status, 0) << out;
  EXPECT_EQ(out.find("MISMATCH"), std::string::npos) << out;
}

}  // namespace

TEST(PeerAllReduce, TwoRanksSumInRankOrder) { run_check(2); }
TEST(PeerAllReduce, FourRanksSumInRankOrder) { run_check(4); }
