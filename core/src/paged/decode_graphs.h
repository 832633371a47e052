// Decode-only passes of the kernel path replayed from captured CUDA graphs: the batch is padded to a power of two
// (1, 2, 4, ..., 256 sessions; padding rows append nothing and attend to the zero block), block tables to a
// power-of-two width of at least 16 blocks. The first pass of a shape runs eagerly (warming cuBLAS up for it) and
// is then captured; later ones replay. One DecodeGraphs per PagedLayer: its graphs are that layer's, on that
// layer's caches. Private to core.
//
// Thread-safety: Decode from the layer's one worker thread; the counters from any thread.
#ifndef MQA_CORE_SRC_PAGED_DECODE_GRAPHS_H_
#define MQA_CORE_SRC_PAGED_DECODE_GRAPHS_H_

#include <ATen/ATen.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "paged/paged_layer.h"
#include "paged/paged_params.h"

namespace mqa::core {

class DecodeGraphs {
 public:
  virtual ~DecodeGraphs() = default;
  // Decode tokens only, rows in session order, at most 256 sessions, on a stream of its own (the legacy default
  // stream cannot be captured), and no capture has failed.
  virtual bool Eligible(const std::vector<PagedSeq>& seqs) const = 0;
  // The pass through a graph. nullopt when a capture failed: logged, nothing of the pass may be used (the caller
  // computes it eagerly; the warm-up may already have appended the same K/V), and every later pass runs eagerly.
  virtual std::optional<at::Tensor> Decode(const LayerParams& p, const at::Tensor& x, const std::vector<PagedSeq>& seqs,
                                           int32_t block_size, const at::Tensor& k_cache,
                                           const at::Tensor& v_cache) = 0;
  virtual uint64_t captures() const = 0;
  virtual uint64_t replays() const = 0;
  virtual uint64_t failures() const = 0;  // captures that failed (0 or 1: the first failure turns graphs off)
};

// Null in a build without CUDA.
std::unique_ptr<DecodeGraphs> NewDecodeGraphs();

}  // namespace mqa::core

#endif  // MQA_CORE_SRC_PAGED_DECODE_GRAPHS_H_
