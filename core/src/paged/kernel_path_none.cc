// The kernel path in a build without CUDA: it never serves, so the paged pass always takes the torch path.
#include <stdexcept>

#include "paged/kernel_path.h"

namespace mqa::core {
namespace {
[[noreturn]] void NotBuilt() { throw std::logic_error("the fused CUDA kernels are not part of this build"); }
}  // namespace

bool KernelsServe(const LayerParams&, at::Device) { return false; }
void AppendKernel(const LayerParams&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                  const at::Tensor&) {
  NotBuilt();
}
void DecodeKernel(const LayerParams&, const at::Tensor&, const std::vector<const PagedSeq*>&, int32_t,
                  const at::Tensor&, const at::Tensor&, const at::Tensor&, at::Tensor&) {
  NotBuilt();
}
void PrefillFlash(const LayerParams&, const at::Tensor&, const std::vector<PagedSeq>&, const at::Tensor&,
                  const at::Tensor&, at::Tensor&) {
  NotBuilt();
}

}  // namespace mqa::core
