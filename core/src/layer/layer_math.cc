#include "layer/layer_math.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace mqa::core {

bool IsLayerNorm(NormType t) { return t == NormType::kLayerNorm || t == NormType::kLowPrecisionLayerNorm; }

double SoftmaxScale(const MqaOptions& o) {
  return o.softmax_scale ? *o.softmax_scale : 1.0 / std::sqrt(static_cast<double>(o.head_dim()));
}

double MostNegative(at::ScalarType t) {
  switch (t) {
    case at::kBFloat16: return static_cast<double>(std::numeric_limits<c10::BFloat16>::lowest());
    case at::kHalf: return static_cast<double>(std::numeric_limits<c10::Half>::lowest());
    default: return static_cast<double>(std::numeric_limits<float>::lowest());
  }
}

at::Tensor QkNorm(NormType type, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  const at::Tensor w = weight.to(at::kFloat);
  const at::Tensor xf = x.to(at::kFloat);
  at::Tensor y;
  if (IsLayerNorm(type)) {
    y = at::layer_norm(xf, {x.size(-1)}, w, bias.to(at::kFloat), 1e-5);
  } else {
    y = xf * at::rsqrt(xf.pow(2).mean(-1, /*keepdim=*/true) + 1e-5) * w;
  }
  return y.to(x.scalar_type());
}

at::Tensor FutureKeys(int64_t s_q, int64_t s_k, at::Device device, int64_t row0, int64_t rows) {
  if (rows < 0) rows = s_q;
  return at::ones({rows, s_k}, at::TensorOptions().dtype(at::kBool).device(device))
      .triu(s_k - s_q + 1 + row0)
      .view({1, 1, rows, s_k});
}

int64_t TileRows(int64_t b, int64_t H, int64_t s_q, int64_t s_k) {
  constexpr int64_t kTileScores = int64_t{1} << 20;
  const int64_t per_row = std::max<int64_t>(1, b * H * s_k);
  return std::clamp<int64_t>(kTileScores / per_row, 1, std::max<int64_t>(1, s_q));
}

}  // namespace mqa::core
