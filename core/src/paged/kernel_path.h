// The paged pass on the project's fused CUDA kernels (attn_impl triton): one kernel appends every new token's
// K/V, one decode kernel serves every decode token of the pass, and prefill chunks go through LibTorch's
// variable-length flash kernel against their gathered K/V. In a build without CUDA, KernelsServe is false and
// the other functions are never called. Private to core.
#ifndef MQA_CORE_SRC_PAGED_KERNEL_PATH_H_
#define MQA_CORE_SRC_PAGED_KERNEL_PATH_H_

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "paged/paged_layer.h"
#include "paged/paged_params.h"

namespace mqa::core {

// attn_impl triton, on CUDA, in bfloat16 or float16, with a head count and head_dim the kernels are built for.
bool KernelsServe(const LayerParams& p, at::Device device);

// k, v: [T, d] rows of the projection (read in place); slots: [T] int64 on the device.
void AppendKernel(const LayerParams& p, const at::Tensor& k, const at::Tensor& v, const at::Tensor& slots,
                  const at::Tensor& k_cache, const at::Tensor& v_cache);

// Every decode token of the pass in one launch; results to ctx [T, H, d] at the sessions' rows. slopes_f32: [H]
// float32 when any session of the pass uses ALiBi, else undefined.
void DecodeKernel(const LayerParams& p, const at::Tensor& q, const std::vector<const PagedSeq*>& decode,
                  int32_t block_size, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const at::Tensor& slopes_f32, at::Tensor& ctx);

// The prefill chunks (tokens > 1) of seqs without ALiBi (LibTorch's flash build has none), one variable-length
// flash call per causal kind. Flash aligns the causal mask bottom-right when a chunk has fewer queries than keys,
// as the spec does.
void PrefillFlash(const LayerParams& p, const at::Tensor& q, const std::vector<PagedSeq>& seqs,
                  const at::Tensor& k_cache, const at::Tensor& v_cache, at::Tensor& ctx);

}  // namespace mqa::core

#endif  // MQA_CORE_SRC_PAGED_KERNEL_PATH_H_
