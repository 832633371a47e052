// The paged execution of one layer: the engine's continuous batching runs every pass of a (model, layer) through
// one PagedLayer, which owns that layer's K/V cache (in the block layout of the engine's BlockPool) and the CUDA
// graphs of its decode passes, and picks the path each part of a pass takes:
//   torch path (torch_path.cc)     plain LibTorch math, any device and dtype;
//   kernel path (kernel_path.cc)   the project's fused CUDA kernels (KV append, paged MQA decode) and LibTorch's
//                                  variable-length flash kernel for prefill chunks, for attn_impl triton on CUDA
//                                  in 16 bits with a head_dim the kernels are built for;
//   graph path (decode_graphs.cc)  decode-only passes of the kernel path replayed from captured CUDA graphs.
// Requests for the kernels that another path serves are counted by reason (counters()) and logged once.
//
// Private to core. Thread-safety: Forward from one thread at a time (the device's worker, on its stream);
// counters() from any thread.
#ifndef MQA_CORE_SRC_PAGED_PAGED_LAYER_H_
#define MQA_CORE_SRC_PAGED_PAGED_LAYER_H_

#include <ATen/ATen.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "mqa/core/block_pool.h"
#include "mqa/core/mqa_layer.h"
#include "mqa/core/status.h"
#include "paged/paged_params.h"

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

struct PagedCounters {
  uint64_t passes = 0;
  uint64_t fallbacks_to_torch = 0;            // all reasons
  std::map<std::string, uint64_t> fallbacks;  // by reason label (see PagedLayer)
  uint64_t graph_captures = 0;                // CUDA graphs captured (one per batch bucket and table width in use)
  uint64_t graph_replays = 0;                 // decode passes served by replaying one
  uint64_t graph_failures = 0;                // failed captures (logged; the layer's decode runs eagerly after one)
};

class DecodeGraphs;

class PagedLayer {
 public:
  // A cache of num_slots rows per k and v (num_slots = blocks * block_size) on the layer's device, in its dtype;
  // block 0 (the first block_size rows) is zeroed: it is the padding target of batched attention.
  static StatusOr<std::unique_ptr<PagedLayer>> Create(const MultiQueryAttention& layer, int64_t num_slots,
                                                      int32_t block_size);
  // Adopts caches made by the caller ([num_slots, head_dim], block 0 zero; tests and benchmarks fill them).
  PagedLayer(const MultiQueryAttention& layer, at::Tensor k_cache, at::Tensor v_cache);
  ~PagedLayer();
  PagedLayer(const PagedLayer&) = delete;
  PagedLayer& operator=(const PagedLayer&) = delete;

  // x: [T, dim] (T = sum of tokens) in the layer's dtype and device. Writes each session's new k/v into its slots,
  // then attends each new token to its session's cached and new keys. Returns [T, dim]. Sessions never read each
  // other's slots, so a NaN in one session's input stays in that session's rows. INTERNAL for a failure inside
  // LibTorch or a kernel.
  StatusOr<at::Tensor> Forward(const at::Tensor& x, const std::vector<PagedSeq>& seqs, int32_t block_size);

  const at::Tensor& k_cache() const { return k_cache_; }
  const at::Tensor& v_cache() const { return v_cache_; }
  at::Device device() const { return k_cache_.device(); }
  const MqaOptions& options() const { return p_.opt; }
  // Whether the kernel path serves this layer (else every pass takes the torch path).
  bool kernels() const { return kernels_; }

  PagedCounters counters() const;

 private:
  // Why a part of a pass left the kernel path. Labels (metrics): "unsupported_layer", "alibi_prefill".
  enum Fallback : int { kUnsupportedLayer = 0, kAlibiPrefill = 1, kNumFallbacks = 2 };
  void NoteFallback(Fallback why, const char* message);
  at::Tensor Eager(const at::Tensor& x, const std::vector<PagedSeq>& seqs, int32_t block_size);

  const LayerParams p_;
  at::Tensor k_cache_, v_cache_;
  const bool kernels_;
  std::unique_ptr<DecodeGraphs> graphs_;  // null where graphs do not apply (no kernels, cuda_graphs off)
  std::atomic<uint64_t> passes_{0};
  std::array<std::atomic<uint64_t>, kNumFallbacks> fallbacks_{};
  std::once_flag fallback_logged_;
};

}  // namespace mqa::core

#endif  // MQA_CORE_SRC_PAGED_PAGED_LAYER_H_
