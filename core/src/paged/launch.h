// Launching the project's CUDA kernels (core/cuda) from LibTorch tensors: dtype mapping, the decode pass's int32
// metadata, and error checks. CUDA builds only. Private to core.
#ifndef MQA_CORE_SRC_PAGED_LAUNCH_H_
#define MQA_CORE_SRC_PAGED_LAUNCH_H_

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "copy_bandwidth.h"
#include "paged/paged_layer.h"
#include "paged/paged_params.h"
#include "paged_mqa.h"

namespace mqa::core {

// Kernel launch errors become exceptions inside CatchAll, which turns them into INTERNAL statuses.
void CudaCheck(int error, const char* what);

cuda::KvType KvTypeOf(at::ScalarType t);

// The int32 metadata of a decode pass of B sessions with tables nb blocks wide: [B, nb] block tables, then B
// lengths, then B ALiBi flags. Rows past decode.size() are padding: an empty table (block 0, which holds zeros),
// length 1, no ALiBi.
void FillDecodeMeta(const std::vector<const PagedSeq*>& decode, int64_t B, int64_t nb, int32_t block_size, int32_t* h);

// The decode kernel over B sessions described by `meta` (FillDecodeMeta's layout, on the device); q rows of B
// sessions (any row stride), out [B, H * d] contiguous. slopes_f32: [H] float32, or undefined for no ALiBi.
void LaunchDecode(const LayerParams& p, int64_t B, int64_t nb, int32_t block_size, const at::Tensor& meta,
                  const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const at::Tensor& slopes_f32, float* workspace, int splits, const at::Tensor& out);

// The fused KV append of T tokens: k and v rows read in place (any row stride), slots on the device.
void LaunchAppend(at::ScalarType dtype, int64_t T, int64_t d, const at::Tensor& k, const at::Tensor& v,
                  const int64_t* slots, const at::Tensor& k_cache, const at::Tensor& v_cache);

}  // namespace mqa::core

#endif  // MQA_CORE_SRC_PAGED_LAUNCH_H_
