#include "parallel/communicator.h"

#include <cstring>

#include "runtime/core/error.h"

namespace nosa::parallel {

namespace {
class SingleRank final : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  void all_reduce_sum(Tensor&) override {}
  bool graph_capturable() const override { return true; }
  void all_gather(const Tensor& in, Tensor& out) override {
    NOSA_ASSERT(in.bytes() == out.bytes(), "all_gather: size mismatch");
    NOSA_ASSERT(in.device() == Device::cpu, "single-rank all_gather of device memory");
    if (in.raw() != out.raw()) std::memcpy(out.raw(), in.raw(), in.bytes());
  }
};
}  // namespace

std::unique_ptr<Communicator> make_single_rank_communicator() {
  return std::make_unique<SingleRank>();
}

}  // namespace nosa::parallel
