// Pieces of the spec's computation shared by the layer's stateless forward (mqa_layer.cc) and the engine's paged
// pass (paged/): the q/k norms, the softmax scale, the causal mask and the query tiling. Private to core.
#ifndef MQA_CORE_SRC_LAYER_LAYER_MATH_H_
#define MQA_CORE_SRC_LAYER_LAYER_MATH_H_

#include <ATen/ATen.h>

#include <cstdint>

#include "mqa/core/mqa_layer.h"

namespace mqa::core {

bool IsLayerNorm(NormType t);

// The spec's softmax scale: options.softmax_scale when set (0.0 included), else 1 / sqrt(head_dim).
double SoftmaxScale(const MqaOptions& o);

// The most negative finite value of t: what masked logits are set to (the spec's masked_fill value).
double MostNegative(at::ScalarType t);

// The q or k norm, computed in float32 and rounded back to x's dtype; bias is undefined for the RMS norms. The
// parameters live in the layer dtype already, so the "low precision" variants equal the plain ones here.
at::Tensor QkNorm(NormType type, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias);

// Bottom-right causal mask [1, 1, rows, s_k] for query rows [row0, row0 + rows) of s_q (all of them by default),
// true where a query may NOT look: query i (0-based within the new chunk) sees key j iff j <= i + (s_k - s_q), so
// a chunk appended to a cache is causal against its absolute positions. Shared by every path so all mask the
// same keys.
at::Tensor FutureKeys(int64_t s_q, int64_t s_k, at::Device device, int64_t row0 = 0, int64_t rows = -1);

// Query rows per tile for logits [b, H, s_q, s_k]: at least 1, at most s_q (one tile = the untiled computation).
// A tile's logits stay near 2^20 values (4 MiB in fp32), so a tile's temporaries (logits, their masked copy, the
// probabilities) stay near 16 MiB whatever s is: memory grows linearly in s instead of with s * s_k, and tiles stay
// large enough that their few extra small ops do not show next to the two GEMMs.
int64_t TileRows(int64_t b, int64_t H, int64_t s_q, int64_t s_k);

}  // namespace mqa::core

#endif  // MQA_CORE_SRC_LAYER_LAYER_MATH_H_
