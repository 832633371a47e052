// Private to core: one batched pass of a layer over the new tokens of several sessions, against a paged KV
// cache (the engine's continuous batching). Never include from outside core/src.
#ifndef MQA_CORE_SRC_PAGED_ATTENTION_H_
#define MQA_CORE_SRC_PAGED_ATTENTION_H_

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "mqa/core/block_pool.h"
#include "mqa/core/mqa_layer.h"
#include "mqa/core/status.h"

namespace mqa::core {

// One session's share of a pass: rows [row, row + tokens) of x are its new tokens, at positions
// [past, past + tokens) of the session. The session's block table must already cover past + tokens positions.
struct PagedSeq {
  int64_t row = 0;
  int64_t tokens = 0;
  int64_t past = 0;
  const BlockTable* table = nullptr;
  bool causal = true;  // bottom-right causal mask within the chunk
  bool alibi = false;  // ALiBi bias (causal form for causal sessions, symmetric otherwise)
};

// x: [T, dim] (T = sum of tokens) in the layer's dtype and device. k_cache, v_cache: [num_blocks * block_size,
// head_dim] of this layer; block 0 must hold zeros (the padding target). Writes each session's new k/v into its
// slots, then attends each new token to its session's cached and new keys. Returns [T, dim]. Sessions never
// read each other's slots, so a NaN in one session's input stays in that session's rows. With attn_impl triton
// where the fused kernels serve the layer (CUDA, 16 bits, head_dim 64 or 128, at most 64 heads): the KV append
// and paged decode kernels, prefill chunks through LibTorch's variable-length flash kernel, and decode-only
// passes replayed from a CUDA graph (MqaOptions::cuda_graphs). Otherwise, and for torch and flash, the torch
// math in the layer dtype.
StatusOr<at::Tensor> PagedForward(const MultiQueryAttention& layer, const at::Tensor& x,
                                  const std::vector<PagedSeq>& seqs, int32_t block_size, const at::Tensor& k_cache,
                                  const at::Tensor& v_cache);

}  // namespace mqa::core

#endif  // MQA_CORE_SRC_PAGED_ATTENTION_H_
