// The paged pass in plain LibTorch math: any device, any dtype, every option. The reference the kernel path is
// tested against, and what serves whatever the kernels cannot. Private to core.
#ifndef MQA_CORE_SRC_PAGED_TORCH_PATH_H_
#define MQA_CORE_SRC_PAGED_TORCH_PATH_H_

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "paged/paged_layer.h"
#include "paged/paged_params.h"

namespace mqa::core {

// k_cache[slots[t]] = k[t], v_cache[slots[t]] = v[t]: one scatter per cache.
void AppendTorch(const at::Tensor& k, const at::Tensor& v, const at::Tensor& slots, const at::Tensor& k_cache,
                 const at::Tensor& v_cache);

// Decode tokens (one per session) attend together: each session's slots are gathered into a padded [B, L_max]
// index; padding and the unused tail of a block point at block 0 (zeros) and are masked out. q: [T, dim]; the
// results go to ctx [T, H, d] at each session's row. slopes: [H] in the layer dtype when any session of the pass
// uses ALiBi, else undefined.
void DecodeTorch(const LayerParams& p, const at::Tensor& q, const std::vector<const PagedSeq*>& decode,
                 int32_t block_size, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& slopes,
                 at::Tensor& ctx);

// One prefill chunk, against exactly its session's slots (no padding), a tile of query rows at a time.
void PrefillTorch(const LayerParams& p, const at::Tensor& q, const PagedSeq& s, const at::Tensor& k_cache,
                  const at::Tensor& v_cache, const at::Tensor& slopes, at::Tensor& ctx);

}  // namespace mqa::core

#endif  // MQA_CORE_SRC_PAGED_TORCH_PATH_H_
