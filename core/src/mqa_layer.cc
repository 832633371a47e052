// The MultiQueryAttention layer on LibTorch (ATen). The function is docs/semantics.md; step
// numbers in comments refer to its "Forward" list.
#include "mqa/core/mqa_layer.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cmath>
#include <limits>
#include <map>
#include <mutex>
#include <tuple>
#include <sstream>
#include <stdexcept>

#include "mqa/core/device.h"
#include "mqa/core/logging.h"
#include "paged_attention.h"
#include "tensor_impl.h"

#ifdef MQA_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGraph.h>

#include "copy_bandwidth.h"
#include "paged_mqa.h"
#endif

namespace mqa::core {

std::string_view AttnImplName(AttnImpl impl) {
  switch (impl) {
    case AttnImpl::kTorch: return "torch";
    case AttnImpl::kFlash: return "flash";
    case AttnImpl::kTriton: return "triton";
  }
  return "unknown";
}

StatusOr<AttnImpl> ParseAttnImpl(std::string_view name) {
  if (name == "torch") return AttnImpl::kTorch;
  if (name == "flash") return AttnImpl::kFlash;
  if (name == "triton") return AttnImpl::kTriton;
  return InvalidArgumentError("unknown attn_impl '" + std::string(name) + "'; expected torch, flash or triton");
}

std::string_view NormTypeName(NormType type) {
  switch (type) {
    case NormType::kLowPrecisionLayerNorm: return "low_precision_layernorm";
    case NormType::kLayerNorm: return "layernorm";
    case NormType::kRmsNorm: return "rmsnorm";
    case NormType::kLowPrecisionRmsNorm: return "low_precision_rmsnorm";
  }
  return "unknown";
}

StatusOr<NormType> ParseNormType(std::string_view name) {
  std::string lower(name);
  for (char& c : lower) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (lower == "low_precision_layernorm") return NormType::kLowPrecisionLayerNorm;
  // Zeta's registry only has the misspelled key, so configs written for it use "layernornm".
  if (lower == "layernorm" || lower == "layernornm") return NormType::kLayerNorm;
  if (lower == "rmsnorm") return NormType::kRmsNorm;
  if (lower == "low_precision_rmsnorm") return NormType::kLowPrecisionRmsNorm;
  return InvalidArgumentError("unknown norm_type '" + std::string(name) +
                              "'; expected low_precision_layernorm, layernorm (alias layernornm), rmsnorm or "
                              "low_precision_rmsnorm");
}

Status ValidateOptions(const MqaOptions& o) {
  if (o.dim <= 0) return InvalidArgumentError("dim must be positive, got " + std::to_string(o.dim));
  if (o.heads <= 0) return InvalidArgumentError("heads must be positive, got " + std::to_string(o.heads));
  if (o.dim % o.heads != 0) {
    return InvalidArgumentError("dim (" + std::to_string(o.dim) + ") must be divisible by heads (" +
                                std::to_string(o.heads) + ")");
  }
  if (o.clip_qkv && (!std::isfinite(*o.clip_qkv) || *o.clip_qkv < 0)) {
    return InvalidArgumentError("clip_qkv must be a finite value >= 0 (0 disables clipping), got " +
                                std::to_string(*o.clip_qkv));
  }
  if (o.softmax_scale && !std::isfinite(*o.softmax_scale)) {
    return InvalidArgumentError("softmax_scale must be finite");
  }
  if (!(o.attn_pdrop >= 0.0 && o.attn_pdrop < 1.0)) {
    return InvalidArgumentError("attn_pdrop must be in [0, 1), got " + std::to_string(o.attn_pdrop));
  }
  if (o.fc_type != "torch") {
    return InvalidArgumentError("fc_type '" + o.fc_type + "' is not supported; the only fc_type is 'torch'");
  }
  if (!IsFloatingPoint(o.dtype)) {
    return InvalidArgumentError("layer dtype must be float32, bfloat16 or float16, got " +
                                std::string(DTypeName(o.dtype)));
  }
  return ValidateDevice(o.device);
}

namespace {

struct ParamSpec {
  std::string name;
  std::vector<int64_t> shape;
};

bool IsLayerNorm(NormType t) { return t == NormType::kLayerNorm || t == NormType::kLowPrecisionLayerNorm; }

std::vector<ParamSpec> ParamSpecs(const MqaOptions& o) {
  const int64_t d = o.head_dim();
  std::vector<ParamSpec> specs = {
      {"Wqkv.weight", {o.dim + 2 * d, o.dim}},
      {"Wqkv.bias", {o.dim + 2 * d}},
      {"out_proj.weight", {o.dim, o.dim}},
      {"out_proj.bias", {o.dim}},
  };
  if (o.qk_ln) {
    specs.push_back({"q_ln.weight", {o.dim}});
    specs.push_back({"k_ln.weight", {d}});
    if (IsLayerNorm(o.norm_type)) {
      specs.push_back({"q_ln.bias", {o.dim}});
      specs.push_back({"k_ln.bias", {d}});
    }
  }
  return specs;
}

double MostNegative(at::ScalarType t) {
  switch (t) {
    case at::kBFloat16: return static_cast<double>(std::numeric_limits<c10::BFloat16>::lowest());
    case at::kHalf: return static_cast<double>(std::numeric_limits<c10::Half>::lowest());
    default: return static_cast<double>(std::numeric_limits<float>::lowest());
  }
}

std::string Str(const std::vector<int64_t>& v) { return ShapeToString(v); }

#ifdef MQA_WITH_CUDA
// Kernel launch errors become exceptions inside CatchAll, which turns them into INTERNAL statuses.
void CudaCheck(int error, const char* what) {
  if (error != 0) throw std::runtime_error(std::string(what) + ": " + cuda::ErrorString(error));
}
#endif

// Bottom-right causal mask [1, 1, rows, s_k] for query rows [row0, row0 + rows) of s_q (all of them by default),
// true where a query may NOT look: query i (0-based within the new chunk) sees key j iff j <= i + (s_k - s_q), so
// a chunk appended to a cache is causal against its absolute positions. Shared by the torch and flash paths so
// both mask the same keys.
at::Tensor FutureKeys(int64_t s_q, int64_t s_k, at::Device device, int64_t row0 = 0, int64_t rows = -1) {
  if (rows < 0) rows = s_q;
  return at::ones({rows, s_k}, at::TensorOptions().dtype(at::kBool).device(device))
      .triu(s_k - s_q + 1 + row0)
      .view({1, 1, rows, s_k});
}

// Logits per query tile of the stateless Forward when the weights are not returned: 2^20 (4 MiB in fp32) keeps a
// tile's temporaries (logits, their masked copy, the probabilities) near 16 MiB whatever s is, so the memory of a
// Forward grows linearly in s instead of with s * s_k; tiles stay large enough that their few extra small ops do
// not show next to the two GEMMs.
constexpr int64_t kTileScores = int64_t{1} << 20;

// Query rows per tile for logits [b, H, s_q, s_k]: at least 1, at most s_q (one tile = the untiled computation).
int64_t TileRows(int64_t b, int64_t H, int64_t s_q, int64_t s_k) {
  const int64_t per_row = std::max<int64_t>(1, b * H * s_k);
  return std::clamp<int64_t>(kTileScores / per_row, 1, std::max<int64_t>(1, s_q));
}

// Rows [row0, row0 + rows) of a bias already sliced to [1|b, 1|H, 1|s_q, 1|s_k]; a broadcast row stays as is.
at::Tensor BiasRows(const at::Tensor& bias, int64_t row0, int64_t rows) {
  if (!bias.defined() || bias.size(2) == 1) return bias;
  return bias.narrow(2, row0, rows);
}

}  // namespace

struct MultiQueryAttention::Impl {
  MqaOptions opt;
  at::Device device{at::kCPU};
  at::ScalarType dtype = at::kFloat;
  double scale = 1.0;
  std::map<std::string, at::Tensor> params;  // by state-dict name
  mutable std::atomic<uint64_t> forwards{0};
  mutable std::atomic<uint64_t> fallbacks{0};
  mutable std::once_flag fallback_logged;
  mutable std::atomic<uint64_t> graph_captures{0};
  mutable std::atomic<uint64_t> graph_replays{0};
#ifdef MQA_WITH_CUDA
  // Captured decode passes by (bucket, table width, block size, k cache, v cache). Touched only by the one
  // thread that runs this layer's paged passes (its device's worker).
  mutable std::map<std::tuple<int64_t, int64_t, int32_t, const void*, const void*>, std::unique_ptr<at::cuda::CUDAGraph>>
      graphs;
  mutable bool graphs_broken = false;  // a capture failed: eager from then on (logged)
#endif

  const at::Tensor& P(const char* name) const { return params.at(name); }

  // True when attn_impl triton's own kernels serve this layer: CUDA, 16-bit, a head_dim they are built for.
  bool KernelsServe() const {
#ifdef MQA_WITH_CUDA
    return opt.attn_impl == AttnImpl::kTriton && device.is_cuda() && (dtype == at::kBFloat16 || dtype == at::kHalf) &&
           cuda::PagedDecodeSupports(static_cast<int>(opt.heads), static_cast<int>(opt.head_dim()));
#else
    return false;
#endif
  }
  // A flash or triton request served by another path: counted every time, logged once per layer.
  void NoteFallback(const std::string& why) const {
    fallbacks.fetch_add(1, std::memory_order_relaxed);
    std::call_once(fallback_logged, [&] {
      Log(LogLevel::kInfo, "attn_impl=" + std::string(AttnImplName(opt.attn_impl)) + ": " + why +
                               " (counted in fallbacks_to_torch)");
    });
  }

  at::Tensor Norm(const at::Tensor& x, const char* prefix) const;
  StatusOr<ForwardResult> Forward(const ForwardArgs& a) const;
  // Attention core: q [b,H,s_q,d], kt [b,1,d,s_k], v [b,1,s_k,d]; bias already sliced. Returns ctx [b,H,s_q,d].
  at::Tensor AttendTorch(const at::Tensor& q, const at::Tensor& kt, const at::Tensor& v, const at::Tensor& bias,
                         const at::Tensor& mask, bool causal, bool training, at::Tensor* weights) const;
  at::Tensor AttendFlash(const at::Tensor& q, const at::Tensor& kt, const at::Tensor& v, const at::Tensor& bias,
                         const at::Tensor& mask, bool causal, bool training) const;
};

at::Tensor MultiQueryAttention::Impl::Norm(const at::Tensor& x, const char* prefix) const {
  const std::string p(prefix);
  const at::Tensor w = params.at(p + ".weight").to(at::kFloat);
  const at::Tensor xf = x.to(at::kFloat);
  at::Tensor y;
  if (IsLayerNorm(opt.norm_type)) {
    // Parameters live in the layer dtype already, so "low precision" (round inputs and parameters to the low
    // dtype, compute in fp32, round the result) and the plain norm are the same computation here.
    y = at::layer_norm(xf, {x.size(-1)}, w, params.at(p + ".bias").to(at::kFloat), 1e-5);
  } else {
    y = xf * at::rsqrt(xf.pow(2).mean(-1, /*keepdim=*/true) + 1e-5) * w;
  }
  return y.to(x.scalar_type());
}

at::Tensor MultiQueryAttention::Impl::AttendTorch(const at::Tensor& q, const at::Tensor& kt, const at::Tensor& v,
                                                  const at::Tensor& bias, const at::Tensor& mask, bool causal,
                                                  bool training, at::Tensor* weights) const {
  const int64_t b = q.size(0), H = q.size(1), s_q = q.size(2), d = q.size(3), s_k = v.size(2);
  // Every query row's softmax is independent of the others', so rows can be computed a tile at a time; only a
  // request for the weights needs all [b, H, s_q, s_k] probabilities at once.
  const int64_t rows = weights ? s_q : TileRows(b, H, s_q, s_k);
  const double min_val = MostNegative(q.scalar_type());
  auto tile = [&](int64_t row0, int64_t t) {
    // MQA: all heads share K/V, so the heads fold into the rows of one [H*t, d] x [d, s_k] product per batch
    // entry. Broadcasting K over H instead would make matmul materialise H copies of the cache.
    at::Tensor attn = at::matmul(q.narrow(2, row0, t).reshape({b, 1, H * t, d}), kt).view({b, H, t, s_k}) * scale;  // step 6
    if (bias.defined()) attn = attn + BiasRows(bias, row0, t);  // step 7 (may promote: bf16 + fp32 bias -> fp32)
    if (mask.defined()) attn = attn.masked_fill(mask.logical_not().view({b, 1, 1, s_k}), min_val);  // step 8
    if (causal && s_q != 1) {                                                                        // step 9
      attn = attn.masked_fill(FutureKeys(s_q, s_k, q.device(), row0, t), min_val);
    }
    at::Tensor p = at::softmax(attn, -1);                                     // step 10
    if (training && opt.attn_pdrop > 0) p = at::dropout(p, opt.attn_pdrop, /*train=*/true);  // step 11
    if (weights) *weights = p;
    // step 12, heads folded the same way: [b, 1, H*t, s_k] x [b, 1, s_k, d] -> [b, H, t, d]
    return at::matmul(p.to(v.scalar_type()).reshape({b, 1, H * t, s_k}), v).view({b, H, t, d});
  };
  if (rows >= s_q) return tile(0, s_q);
  at::Tensor ctx = at::empty({b, H, s_q, d}, q.options().dtype(v.scalar_type()));
  for (int64_t row0 = 0; row0 < s_q; row0 += rows) {
    const int64_t t = std::min(rows, s_q - row0);
    ctx.narrow(2, row0, t).copy_(tile(row0, t));
  }
  return ctx;
}

at::Tensor MultiQueryAttention::Impl::AttendFlash(const at::Tensor& q, const at::Tensor& kt, const at::Tensor& v,
                                                  const at::Tensor& bias, const at::Tensor& mask, bool causal,
                                                  bool training) const {
  const int64_t b = q.size(0), H = q.size(1), s_q = q.size(2), d = q.size(3), s_k = v.size(2);
  const double dropout = (training && opt.attn_pdrop > 0) ? opt.attn_pdrop : 0.0;
  const at::Tensor k = kt.transpose(2, 3);  // [b, 1, s_k, d]
  const bool causal_applies = causal && s_q != 1;
  // The fused kernels mask a logit by setting the raw q.k product to -inf and apply the scale afterwards, with
  // the row maximum taken over the raw products: a scale of 0 turns masked logits into 0 * -inf = NaN, a negative
  // one into +inf (and makes the raw maximum the wrong end of the row). Folded into q, a non-positive scale
  // leaves the kernels a scale of 1, under which their masking is the spec's; positive scales stay in the kernel.
  const at::Tensor qs = scale > 0 ? q : q * scale;
  const double kernel_scale = scale > 0 ? scale : 1.0;
  if (!bias.defined() && !mask.defined() && !causal_applies) {
    // MQA: every head attends to the same single K/V head with no mask, so the heads can be folded into the
    // query rows. One [b, 1, H*s_q, d] problem reads K/V once instead of H times. The kernel works through the
    // rows in tiles itself, so its memory is linear in s.
    at::Tensor folded = qs.reshape({b, 1, H * s_q, d});
    at::Tensor out = at::scaled_dot_product_attention(folded, k, v, {}, dropout, false, kernel_scale);
    return out.view({b, H, s_q, d});
  }
  if (!bias.defined() && !mask.defined() && s_q == s_k) {
    // Square causal: top-left and bottom-right alignment coincide, so the fused causal kernel applies. The
    // single K/V head goes in as one group (enable_gqa), which the flash kernel reads without copying.
    return at::scaled_dot_product_attention(qs, k, v, {}, dropout, true, kernel_scale, /*enable_gqa=*/true);
  }
  // Masks rule out the grouped flash kernel; the memory-efficient kernel takes K/V broadcast over heads.
  const at::Tensor ke = k.expand({b, H, s_k, d});
  const at::Tensor ve = v.expand({b, H, s_k, d});
  // General case: one additive mask carries bias, padding and causal masking. Adding the most negative finite
  // value to a finite logit rounds to that value, so this equals the spec's overwrite for finite logits. The mask
  // is as large as the logits, so it is built a tile of query rows at a time (memory linear in s).
  const double min_val = MostNegative(q.scalar_type());
  const int64_t rows = TileRows(b, H, s_q, s_k);
  auto tile = [&](int64_t row0, int64_t t) {
    const at::Tensor bias_t = BiasRows(bias, row0, t);
    std::vector<int64_t> shape = {mask.defined() ? b : (bias.defined() ? bias.size(0) : 1),
                                  bias.defined() ? bias.size(1) : 1, t, s_k};
    at::Tensor m = at::zeros(shape, q.options());
    if (bias.defined()) m.add_(bias_t.to(q.scalar_type()));
    if (mask.defined()) m.masked_fill_(mask.logical_not().view({b, 1, 1, s_k}), min_val);
    if (causal_applies) {
      m.masked_fill_(FutureKeys(s_q, s_k, q.device(), row0, t), min_val);
    }
    at::Tensor ctx = at::scaled_dot_product_attention(qs.narrow(2, row0, t), ke, ve, m, dropout, false, kernel_scale);
    if (bias.defined()) {
      // The spec's softmax gives NaN for a row whose logits are all -inf, or that holds +inf or NaN; fused
      // kernels return zeros or finite values there instead. Restore the spec's NaN for exactly those rows.
      at::Tensor bad = m.isneginf().all(-1).logical_or(m.isposinf().logical_or(m.isnan()).any(-1));
      ctx = ctx.masked_fill(bad.unsqueeze(-1), std::numeric_limits<double>::quiet_NaN());
    }
    return ctx;
  };
  if (rows >= s_q) return tile(0, s_q);
  at::Tensor ctx = at::empty({b, H, s_q, d}, q.options());
  for (int64_t row0 = 0; row0 < s_q; row0 += rows) {
    const int64_t t = std::min(rows, s_q - row0);
    ctx.narrow(2, row0, t).copy_(tile(row0, t));
  }
  return ctx;
}

StatusOr<ForwardResult> MultiQueryAttention::Impl::Forward(const ForwardArgs& a) const {
  const int64_t dim = opt.dim, H = opt.heads, d = opt.head_dim();
  const std::string dev = device.str();
  const std::string_view dt = DTypeName(*FromScalarType(dtype));

  // ---- Validate every input before any work, so a bad request leaves nothing half-done. ----
  if (!a.x.defined()) return InvalidArgumentError("x is missing; expected a tensor [b, s, " + std::to_string(dim) + "]");
  const at::Tensor x = Unwrap(a.x);
  if (x.dim() != 3 || x.size(2) != dim) {
    return InvalidArgumentError("x must be [b, s, dim] with dim = " + std::to_string(dim) + ", got " + ShapeOf(x));
  }
  if (x.scalar_type() != dtype) {
    return InvalidArgumentError("x has dtype " + std::string(DTypeName(a.x.dtype())) + " but the layer computes in " +
                                std::string(dt) + "; send x as " + std::string(dt));
  }
  if (x.device() != device) {
    return InvalidArgumentError("x is on " + x.device().str() + " but the layer lives on " + dev);
  }
  const int64_t b = x.size(0), s = x.size(1);

  at::Tensor past_k, past_v;
  int64_t s_past = 0;
  if (a.past_key_value && !a.past_key_value->empty()) {
    if (!a.past_key_value->k.defined() || !a.past_key_value->v.defined()) {
      return InvalidArgumentError("past_key_value must hold both k and v (or neither, for an empty cache)");
    }
    past_k = Unwrap(a.past_key_value->k);
    past_v = Unwrap(a.past_key_value->v);
    s_past = past_v.dim() == 4 ? past_v.size(2) : -1;
    const std::string want_k = "[" + std::to_string(b) + ", 1, " + std::to_string(d) + ", s_past]";
    const std::string want_v = "[" + std::to_string(b) + ", 1, s_past, " + std::to_string(d) + "]";
    const bool k_ok = past_k.dim() == 4 && past_k.size(0) == b && past_k.size(1) == 1 && past_k.size(2) == d &&
                      past_k.size(3) == s_past;
    const bool v_ok = past_v.dim() == 4 && past_v.size(0) == b && past_v.size(1) == 1 && past_v.size(3) == d;
    if (!k_ok || !v_ok) {
      return InvalidArgumentError(
          "past_key_value has the wrong layout: expected k " + want_k + " (keys transposed, one shared head) and v " +
          want_v + " with the same s_past, got k " + ShapeOf(past_k) + " and v " + ShapeOf(past_v));
    }
    if (past_k.scalar_type() != dtype || past_v.scalar_type() != dtype) {
      return InvalidArgumentError("past_key_value must have the layer dtype " + std::string(dt));
    }
    if (past_k.device() != device || past_v.device() != device) {
      return InvalidArgumentError("past_key_value must live on the layer's device " + dev);
    }
  }
  const int64_t s_k = s_past + s;

  at::Tensor bias;
  if (a.bias.defined()) {
    bias = Unwrap(a.bias);
    if (bias.dim() != 4) {
      return InvalidArgumentError("bias must be 4-D [1|b, 1|H, 1|>=s_q, 1|>=s_k], got rank " +
                                  std::to_string(bias.dim()) + " " + ShapeOf(bias));
    }
    if (!at::isFloatingType(bias.scalar_type())) {
      return InvalidArgumentError("bias must be a floating-point tensor, got " + std::string(c10::toString(bias.scalar_type())));
    }
    const bool ok = (bias.size(0) == 1 || bias.size(0) == b) && (bias.size(1) == 1 || bias.size(1) == H) &&
                    (bias.size(2) == 1 || bias.size(2) >= s) && (bias.size(3) == 1 || bias.size(3) >= s_k);
    if (!ok) {
      return InvalidArgumentError("bias " + ShapeOf(bias) + " cannot serve logits [" + std::to_string(b) + ", " +
                                  std::to_string(H) + ", " + std::to_string(s) + ", " + std::to_string(s_k) +
                                  "]: expected dims [1|b, 1|H, 1|>=s_q, 1|>=s_k] (its last s_q rows and last s_k "
                                  "columns are used)");
    }
    if (bias.device() != device) return InvalidArgumentError("bias must live on the layer's device " + dev);
  }

  at::Tensor mask;
  if (a.mask.defined()) {
    mask = Unwrap(a.mask);
    if (mask.scalar_type() != at::kBool) {
      return InvalidArgumentError("mask must be a bool key-padding mask [b, s_k] (true = attend), got dtype " +
                                  std::string(c10::toString(mask.scalar_type())));
    }
    if (mask.dim() != 2 || mask.size(0) != b || mask.size(1) != s_k) {
      return InvalidArgumentError("mask must be [b, s_k] = [" + std::to_string(b) + ", " + std::to_string(s_k) +
                                  "] covering past and new keys, got " + ShapeOf(mask));
    }
    if (mask.device() != device) return InvalidArgumentError("mask must live on the layer's device " + dev);
  }

  // triton's own kernels work on the paged cache; a stateless forward with triton uses flash's fused kernels on
  // CUDA in 16 bits, and the torch math elsewhere.
  const bool fused_dtype = device.is_cuda() && (dtype == at::kBFloat16 || dtype == at::kHalf);
  bool use_flash = false;
  if (opt.attn_impl == AttnImpl::kFlash || opt.attn_impl == AttnImpl::kTriton) {
    if (a.needs_weights) {
      // The fused kernels never materialise the probabilities; the torch path computes the same function.
      NoteFallback("needs_weights requests are served by the torch path");
    } else if (opt.attn_impl == AttnImpl::kTriton && !fused_dtype) {
      NoteFallback("the fused kernels need a CUDA device and bfloat16 or float16; this layer (" + dev + ", " +
                   std::string(dt) + ") computes with the torch path");
    } else if (opt.attn_impl == AttnImpl::kTriton) {
      NoteFallback("stateless forwards (no paged cache) are served by LibTorch's fused attention");
      use_flash = true;
    } else {
      use_flash = true;
    }
  }

  return CatchAll("MultiQueryAttention::Forward", [&]() -> StatusOr<ForwardResult> {
    forwards.fetch_add(1, std::memory_order_relaxed);
    at::Tensor qkv = at::linear(x, P("Wqkv.weight"), P("Wqkv.bias"));           // step 1
    if (opt.clip_qkv && *opt.clip_qkv != 0.0) qkv = qkv.clamp(-*opt.clip_qkv, *opt.clip_qkv);  // step 2
    at::Tensor q = qkv.narrow(2, 0, dim);                                        // step 3
    at::Tensor k = qkv.narrow(2, dim, d);
    at::Tensor v = qkv.narrow(2, dim + d, d);
    if (opt.qk_ln) {
      q = Norm(q, "q_ln");
      k = Norm(k, "k_ln");
    }
    at::Tensor qh = q.reshape({b, s, H, d}).transpose(1, 2);    // step 4: [b, H, s, d]
    at::Tensor kt = k.reshape({b, s, 1, d}).permute({0, 2, 3, 1});  // [b, 1, d, s]
    at::Tensor vh = v.reshape({b, s, 1, d}).transpose(1, 2);    // [b, 1, s, d]
    ForwardResult result;
    if (a.past_key_value) {                                     // step 5
      if (past_k.defined()) {
        kt = at::cat({past_k, kt}, 3);
        vh = at::cat({past_v, vh}, 2);
      } else {
        kt = kt.contiguous();
        vh = vh.contiguous();
      }
      result.cache = KvCache{Wrap(kt), Wrap(vh)};
    }
    at::Tensor b_sliced;
    if (bias.defined()) {
      // Keep the last s_q rows and last s_k columns, so one bias built for the longest sequence serves every step.
      b_sliced = bias.narrow(2, bias.size(2) - std::min(bias.size(2), s), std::min(bias.size(2), s))
                     .narrow(3, bias.size(3) - std::min(bias.size(3), s_k), std::min(bias.size(3), s_k));
    }
    at::Tensor ctx, weights;
    if (b == 0 || s == 0) {
      ctx = at::zeros({b, H, s, d}, x.options());
      if (a.needs_weights) weights = at::zeros({b, H, s, s_k}, x.options());
    } else if (use_flash) {
      ctx = AttendFlash(qh, kt, vh, b_sliced, mask, a.causal, a.training);
    } else {
      ctx = AttendTorch(qh, kt, vh, b_sliced, mask, a.causal, a.training, a.needs_weights ? &weights : nullptr);
    }
    at::Tensor out = ctx.transpose(1, 2).reshape({b, s, dim});  // heads back, head-major
    result.out = Wrap(at::linear(out, P("out_proj.weight"), P("out_proj.bias")));
    if (weights.defined()) result.weights = Wrap(weights);
    return result;
  });
}

MultiQueryAttention::MultiQueryAttention(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
MultiQueryAttention::~MultiQueryAttention() = default;

const MqaOptions& MultiQueryAttention::options() const { return impl_->opt; }

StatusOr<std::unique_ptr<MultiQueryAttention>> MultiQueryAttention::Create(const MqaOptions& options) {
  MQA_RETURN_IF_ERROR(ValidateOptions(options));
  auto impl = std::make_unique<Impl>();
  impl->opt = options;
  MQA_ASSIGN_OR_RETURN(impl->device, ParseDevice(options.device));
  impl->dtype = ToScalarType(options.dtype);
  impl->scale = options.softmax_scale ? *options.softmax_scale : 1.0 / std::sqrt(static_cast<double>(options.head_dim()));
  Status st = CatchAll("MultiQueryAttention::Create", [&]() -> Status {
    // Same draws, in the same order, as torch.manual_seed(seed) followed by the reference constructor:
    // Wqkv (weight, bias), the norms (no draws), out_proj (weight, bias). nn.Linear's defaults are
    // kaiming_uniform_(a=sqrt(5)) for the weight and U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for the bias; the bound
    // is computed with the same double arithmetic as torch.nn.init so the draws match bit for bit.
    at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(options.seed);
    auto linear = [&](const std::string& name, int64_t out_f, int64_t in_f) {
      const double a = std::sqrt(5.0);
      const double gain = std::sqrt(2.0 / (1 + a * a));
      const double wbound = std::sqrt(3.0) * (gain / std::sqrt(static_cast<double>(in_f)));
      const double bbound = 1 / std::sqrt(static_cast<double>(in_f));
      at::Tensor w = at::empty({out_f, in_f}, at::kFloat).uniform_(-wbound, wbound, gen);
      at::Tensor bb = at::empty({out_f}, at::kFloat).uniform_(-bbound, bbound, gen);
      impl->params[name + ".weight"] = w;
      impl->params[name + ".bias"] = bb;
    };
    const int64_t dim = options.dim, d = options.head_dim();
    linear("Wqkv", dim + 2 * d, dim);
    if (options.qk_ln) {
      impl->params["q_ln.weight"] = at::ones({dim}, at::kFloat);
      impl->params["k_ln.weight"] = at::ones({d}, at::kFloat);
      if (IsLayerNorm(options.norm_type)) {
        impl->params["q_ln.bias"] = at::zeros({dim}, at::kFloat);
        impl->params["k_ln.bias"] = at::zeros({d}, at::kFloat);
      }
    }
    linear("out_proj", dim, dim);
    for (auto& [name, t] : impl->params) t = t.to(impl->device, impl->dtype);
    return Status::Ok();
  });
  MQA_RETURN_IF_ERROR(st);
  if (options.verbose > 0) {
    std::ostringstream os;
    os << "MultiQueryAttention dim=" << options.dim << " heads=" << options.heads
       << " attn_impl=" << AttnImplName(options.attn_impl) << " dtype=" << DTypeName(options.dtype)
       << " device=" << impl->device.str() << " qk_ln=" << options.qk_ln
       << " norm_type=" << NormTypeName(options.norm_type) << " softmax_scale=" << impl->scale;
    Log(LogLevel::kInfo, os.str());
  }
  return std::unique_ptr<MultiQueryAttention>(new MultiQueryAttention(std::move(impl)));
}

StatusOr<ForwardResult> MultiQueryAttention::Forward(const ForwardArgs& args) const { return impl_->Forward(args); }

TensorMap MultiQueryAttention::StateDict(const std::string& prefix) const {
  TensorMap out;
  for (const auto& [name, t] : impl_->params) out[prefix + name] = Wrap(t);
  return out;
}

Status MultiQueryAttention::LoadStateDict(const TensorMap& tensors, const std::string& prefix) {
  const std::vector<ParamSpec> specs = ParamSpecs(impl_->opt);
  std::vector<std::string> problems;
  for (const ParamSpec& spec : specs) {
    auto it = tensors.find(prefix + spec.name);
    if (it == tensors.end() || !it->second.defined()) {
      problems.push_back("missing '" + prefix + spec.name + "' " + Str(spec.shape));
      continue;
    }
    if (it->second.shape() != spec.shape) {
      problems.push_back("'" + prefix + spec.name + "' has shape " + Str(it->second.shape()) + ", expected " +
                         Str(spec.shape));
    }
    if (it->second.dtype() != impl_->opt.dtype) {
      problems.push_back("'" + prefix + spec.name + "' has dtype " + std::string(DTypeName(it->second.dtype())) +
                         ", expected " + std::string(DTypeName(impl_->opt.dtype)));
    }
  }
  for (const auto& [name, t] : tensors) {
    if (name.rfind(prefix, 0) != 0) continue;
    bool known = false;
    for (const ParamSpec& spec : specs) known = known || name == prefix + spec.name;
    if (!known) problems.push_back("unexpected tensor '" + name + "' for this layer configuration");
  }
  if (!problems.empty()) {
    std::string msg = "state dict does not match the layer (dim=" + std::to_string(impl_->opt.dim) +
                      ", heads=" + std::to_string(impl_->opt.heads) + ", qk_ln=" +
                      (impl_->opt.qk_ln ? "true" : "false") + ", norm_type=" +
                      std::string(NormTypeName(impl_->opt.norm_type)) + "): ";
    for (size_t i = 0; i < problems.size(); ++i) msg += (i ? "; " : "") + problems[i];
    return InvalidArgumentError(msg);
  }
  return CatchAll("MultiQueryAttention::LoadStateDict", [&]() -> Status {
    std::map<std::string, at::Tensor> fresh;
    for (const ParamSpec& spec : specs) {
      fresh[spec.name] = Unwrap(tensors.at(prefix + spec.name)).to(impl_->device, impl_->dtype).clone();
    }
    impl_->params = std::move(fresh);
    return Status::Ok();
  });
}

LayerCounters MultiQueryAttention::counters() const {
  return LayerCounters{impl_->forwards.load(), impl_->fallbacks.load(), impl_->graph_captures.load(),
                       impl_->graph_replays.load()};
}

std::vector<float> AlibiSlopes(int64_t heads) {
  if (heads <= 0) return {};
  int64_t hp = 1;
  while (hp < heads) hp *= 2;
  // The same float32 tensor ops as the reference (arange * (8 / H'), then 1 / 2^m), so slopes match bit for bit.
  at::Tensor mt = at::arange(1, hp + 1, at::kFloat).mul(8.0 / static_cast<double>(hp));
  at::Tensor st = at::reciprocal(at::pow(2.0, mt)).contiguous();
  std::vector<float> m(st.data_ptr<float>(), st.data_ptr<float>() + hp);
  if (hp == heads) return m;
  std::vector<float> out;
  for (size_t i = 1; i < m.size(); i += 2) out.push_back(m[i]);  // odd indices (0-based) first
  for (size_t i = 0; i < m.size(); i += 2) out.push_back(m[i]);  // then even
  out.resize(static_cast<size_t>(heads));
  return out;
}

StatusOr<Tensor> AlibiBias(int64_t heads, int64_t seq_len, bool full, DType dtype, std::string_view device) {
  if (heads <= 0 || seq_len < 0) return InvalidArgumentError("AlibiBias needs heads > 0 and seq_len >= 0");
  MQA_ASSIGN_OR_RETURN(at::Device dev, ParseDevice(device));
  const std::vector<float> slopes = AlibiSlopes(heads);
  return CatchAll("AlibiBias", [&]() -> StatusOr<Tensor> {
    at::Tensor pos = at::arange(1 - seq_len, 1, at::kInt).view({1, 1, 1, seq_len});
    if (full) pos = (pos - at::arange(1 - seq_len, 1, at::kInt).view({1, 1, seq_len, 1})).abs().mul(-1);
    at::Tensor m = at::from_blob(const_cast<float*>(slopes.data()), {1, heads, 1, 1}, at::kFloat).clone();
    return Wrap((pos * m).to(dev, ToScalarType(dtype)));
  });
}

namespace {

struct Qkv {
  at::Tensor q, k, v;  // [T, dim], [T, d], [T, d]: views of the projection output (or the normed q/k)
};

// The projection of every token of a pass (steps 1-3 of the spec, and the qk norms).
Qkv Project(const MultiQueryAttention::Impl& L, const at::Tensor& x) {
  const MqaOptions& opt = L.opt;
  const int64_t dim = opt.dim, d = opt.head_dim();
  at::Tensor qkv = at::linear(x, L.P("Wqkv.weight"), L.P("Wqkv.bias"));
  if (opt.clip_qkv && *opt.clip_qkv != 0.0) qkv = qkv.clamp(-*opt.clip_qkv, *opt.clip_qkv);
  Qkv r{qkv.narrow(1, 0, dim), qkv.narrow(1, dim, d), qkv.narrow(1, dim + d, d)};
  if (opt.qk_ln) {
    r.q = L.Norm(r.q, "q_ln");
    r.k = L.Norm(r.k, "k_ln");
  }
  return r;
}

#ifdef MQA_WITH_CUDA
cuda::KvType KvTypeOf(at::ScalarType t) {
  return t == at::kBFloat16 ? cuda::KvType::kBFloat16 : cuda::KvType::kFloat16;
}

// The int32 metadata of a decode pass of B sessions with tables nb blocks wide: [B, nb] block tables, then B
// lengths, then B ALiBi flags. Rows past decode.size() are padding: an empty table (block 0, which holds zeros),
// length 1, no ALiBi.
void FillDecodeMeta(const std::vector<const PagedSeq*>& decode, int64_t B, int64_t nb, int32_t block_size, int32_t* h) {
  std::fill(h, h + B * nb + 2 * B, 0);
  for (int64_t b = 0; b < B; ++b) {
    if (b >= static_cast<int64_t>(decode.size())) {
      h[B * nb + b] = 1;
      continue;
    }
    const PagedSeq& s = *decode[static_cast<size_t>(b)];
    const int64_t used = (s.past + 1 + block_size - 1) / block_size;
    for (int64_t i = 0; i < used; ++i) h[b * nb + i] = static_cast<int32_t>(s.table->blocks()[static_cast<size_t>(i)]);
    h[B * nb + b] = static_cast<int32_t>(s.past + 1);
    h[B * nb + B + b] = s.alibi ? 1 : 0;
  }
}

// The decode kernel over B sessions described by `meta` (FillDecodeMeta's layout, on the device); q rows of B
// sessions (any row stride), out [B, H * d] contiguous. slopes_f32: [H] float32, or undefined for no ALiBi.
void LaunchDecode(const MultiQueryAttention::Impl& L, int64_t B, int64_t nb, int32_t block_size, const at::Tensor& meta,
                  const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const at::Tensor& slopes_f32, float* workspace, int splits, const at::Tensor& out) {
  cuda::PagedDecodeParams p;
  p.dtype = KvTypeOf(q.scalar_type());
  p.batch = static_cast<int>(B);
  p.heads = static_cast<int>(L.opt.heads);
  p.head_dim = static_cast<int>(L.opt.head_dim());
  p.q = q.data_ptr();
  p.q_stride = q.stride(0);
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.block_tables = meta.data_ptr<int32_t>();
  p.block_table_stride = static_cast<int>(nb);
  p.seq_lens = meta.data_ptr<int32_t>() + B * nb;
  p.block_size = block_size;
  p.scale = static_cast<float>(L.scale);
  if (slopes_f32.defined()) {
    p.alibi_slopes = slopes_f32.data_ptr<float>();
    p.alibi_on = meta.data_ptr<int32_t>() + B * nb + B;
  }
  p.out = out.data_ptr();
  p.out_stride = out.stride(0);
  p.num_splits = splits;
  p.workspace = workspace;
  CudaCheck(cuda::PagedDecode(p, at::cuda::getCurrentCUDAStream().stream()), "PagedDecode");
}

constexpr int64_t kMaxGraphBatch = 256;

// Decode-only passes (rows in session order) of at most kMaxGraphBatch sessions can replay a graph.
bool GraphEligible(const std::vector<PagedSeq>& seqs) {
  if (seqs.empty() || static_cast<int64_t>(seqs.size()) > kMaxGraphBatch) return false;
  for (size_t i = 0; i < seqs.size(); ++i) {
    if (seqs[i].tokens != 1 || seqs[i].row != static_cast<int64_t>(i)) return false;
  }
  // Capture needs a stream of its own; the legacy default stream cannot be captured.
  return at::cuda::getCurrentCUDAStream() != at::cuda::getDefaultCUDAStream();
}

// Static buffers of the captured decode passes of one shape (device, batch bucket, table width, block size,
// layer shape and dtype). Every layer's graph of that shape reads and writes these: safe, because one worker
// thread replays them one at a time, in order, on its stream, and each result is copied out before the next.
struct GraphIo {
  at::Tensor x, out;                 // [bucket, dim]
  at::Tensor staging, staging_host;  // bytes: the slots, then the metadata; the host copy is pinned
  at::Tensor slots;                  // [bucket] int64 slot of each new token, -1 for padding (view of staging)
  at::Tensor meta;                   // FillDecodeMeta's layout (view of staging)
  at::Tensor slopes;                 // [H] float32
  at::Tensor workspace;              // float32, for `splits` > 1
  int splits = 1;
  at::cuda::CUDAEvent staged;        // recorded after the copy out of the pinned buffer
};

GraphIo& GraphIoFor(const MultiQueryAttention::Impl& L, at::Device dev, int64_t bucket, int64_t nb, int32_t block_size) {
  using Key = std::tuple<int, int64_t, int64_t, int32_t, int64_t, int64_t, int>;
  // Never destroyed: their tensors and events would otherwise be freed after CUDA shuts down at exit.
  static std::mutex& mu = *new std::mutex;
  static auto& ios = *new std::map<Key, std::unique_ptr<GraphIo>>;
  const int64_t dim = L.opt.dim, H = L.opt.heads, d = L.opt.head_dim();
  const Key key{dev.index(), bucket, nb, block_size, dim, H, static_cast<int>(L.dtype)};
  std::lock_guard<std::mutex> lock(mu);
  std::unique_ptr<GraphIo>& io = ios[key];
  if (!io) {
    auto fresh = std::make_unique<GraphIo>();
    const auto o = at::TensorOptions().device(dev);
    fresh->x = at::zeros({bucket, dim}, o.dtype(L.dtype));
    fresh->out = at::zeros({bucket, dim}, o.dtype(L.dtype));
    const int64_t slot_bytes = bucket * 8, meta_bytes = (bucket * nb + 2 * bucket) * 4;
    fresh->staging = at::zeros({slot_bytes + meta_bytes}, o.dtype(at::kByte));
    fresh->staging_host = at::zeros({slot_bytes + meta_bytes}, at::TensorOptions().dtype(at::kByte)).pin_memory();
    fresh->slots = fresh->staging.narrow(0, 0, slot_bytes).view(at::kLong);
    fresh->meta = fresh->staging.narrow(0, slot_bytes, meta_bytes).view(at::kInt);
    fresh->slopes = at::tensor(AlibiSlopes(H), at::TensorOptions().dtype(at::kFloat)).to(dev);
    fresh->splits = cuda::PagedDecodeSplits(static_cast<int>(bucket), static_cast<int>(nb * block_size),
                                            static_cast<int>(H), static_cast<int>(d),
                                            at::cuda::getDeviceProperties(dev.index())->multiProcessorCount);
    if (fresh->splits > 1) {
      const size_t bytes = cuda::PagedDecodeWorkspaceBytes(static_cast<int>(bucket), static_cast<int>(H),
                                                           static_cast<int>(d), fresh->splits);
      fresh->workspace = at::empty({static_cast<int64_t>(bytes / sizeof(float))}, o.dtype(at::kFloat));
    }
    io = std::move(fresh);
  }
  return *io;
}

// One memory pool per device for the temporaries of every captured graph: replays never overlap (one worker
// thread, one stream), so they can share it.
at::cuda::MempoolId_t GraphPool(int device) {
  static std::mutex& mu = *new std::mutex;
  static auto& pools = *new std::map<int, at::cuda::MempoolId_t>;
  std::lock_guard<std::mutex> lock(mu);
  auto it = pools.find(device);
  if (it == pools.end()) it = pools.emplace(device, at::cuda::graph_pool_handle()).first;
  return it->second;
}

// A decode-only pass through a captured graph: the batch is padded to a power of two (padding rows append
// nothing and attend to the zero block), block tables to a power-of-two width of at least 16 blocks. The first
// pass of a shape runs eagerly (warming cuBLAS up for it) and is then captured; later ones replay.
at::Tensor DecodeWithGraph(const MultiQueryAttention::Impl& L, const at::Tensor& x, const std::vector<PagedSeq>& seqs,
                           int32_t block_size, const at::Tensor& k_cache, const at::Tensor& v_cache) {
  const int64_t B = static_cast<int64_t>(seqs.size()), H = L.opt.heads, d = L.opt.head_dim();
  int64_t bucket = 1, len_max = 0;
  while (bucket < B) bucket *= 2;
  std::vector<const PagedSeq*> decode;
  for (const PagedSeq& s : seqs) {
    decode.push_back(&s);
    len_max = std::max(len_max, s.past + 1);
  }
  int64_t nb = 16;
  while (nb * block_size < len_max) nb *= 2;
  GraphIo& io = GraphIoFor(L, x.device(), bucket, nb, block_size);
  const c10::cuda::CUDAStream stream = at::cuda::getCurrentCUDAStream();
  io.staged.synchronize();  // the previous pass's copy out of the pinned buffer is done
  // Raw copies rather than tensor operations: at one session a pass is a few tens of microseconds of GPU time,
  // so the host's per-operator dispatch matters.
  uint8_t* host = io.staging_host.data_ptr<uint8_t>();
  int64_t* slots = reinterpret_cast<int64_t*>(host);
  for (int64_t b = 0; b < bucket; ++b) slots[b] = b < B ? seqs[static_cast<size_t>(b)].table->Slot(seqs[static_cast<size_t>(b)].past) : -1;
  FillDecodeMeta(decode, bucket, nb, block_size, reinterpret_cast<int32_t*>(host + bucket * 8));
  CudaCheck(cudaMemcpyAsync(io.staging.data_ptr(), host, static_cast<size_t>(io.staging.numel()), cudaMemcpyHostToDevice,
                            stream.stream()),
            "staging copy");
  io.staged.record(stream);
  const at::Tensor xc = x.contiguous();
  CudaCheck(cudaMemcpyAsync(io.x.data_ptr(), xc.data_ptr(), static_cast<size_t>(xc.nbytes()), cudaMemcpyDeviceToDevice,
                            stream.stream()),
            "input copy");

  auto body = [&] {
    auto [q, k, v] = Project(L, io.x);
    CudaCheck(cuda::KvAppend(KvTypeOf(L.dtype), static_cast<int>(bucket), static_cast<int>(d), k.data_ptr(), k.stride(0),
                             v.data_ptr(), v.stride(0), io.slots.data_ptr<int64_t>(), k_cache.data_ptr(),
                             v_cache.data_ptr(), stream.stream()),
              "KvAppend");
    at::Tensor ctx = at::empty({bucket, H * d}, io.x.options());
    LaunchDecode(L, bucket, nb, block_size, io.meta, q, k_cache, v_cache, io.slopes,
                 io.workspace.defined() ? io.workspace.data_ptr<float>() : nullptr, io.splits, ctx);
    io.out.copy_(at::linear(ctx, L.P("out_proj.weight"), L.P("out_proj.bias")));
  };
  auto& graph = L.graphs[{bucket, nb, block_size, k_cache.data_ptr(), v_cache.data_ptr()}];
  if (graph) {
    graph->replay();
    L.graph_replays.fetch_add(1, std::memory_order_relaxed);
  } else {
    body();  // this pass's result, eagerly; the capture below records without running
    auto fresh = std::make_unique<at::cuda::CUDAGraph>();
    fresh->capture_begin(GraphPool(x.device().index()), cudaStreamCaptureModeThreadLocal);
    try {
      body();
    } catch (...) {
      try {
        fresh->capture_end();
      } catch (...) {
      }
      throw;
    }
    fresh->capture_end();
    graph = std::move(fresh);
    L.graph_captures.fetch_add(1, std::memory_order_relaxed);
  }
  at::Tensor result = at::empty({B, L.opt.dim}, io.out.options());
  CudaCheck(cudaMemcpyAsync(result.data_ptr(), io.out.data_ptr(), static_cast<size_t>(result.nbytes()),
                            cudaMemcpyDeviceToDevice, stream.stream()),
            "output copy");
  return result;
}
#endif

}  // namespace

StatusOr<at::Tensor> PagedForward(const MultiQueryAttention& layer, const at::Tensor& x,
                                  const std::vector<PagedSeq>& seqs, int32_t block_size, const at::Tensor& k_cache,
                                  const at::Tensor& v_cache) {
  const MultiQueryAttention::Impl& L = layer.impl();
  const MqaOptions& opt = L.opt;
  const int64_t dim = opt.dim, H = opt.heads, d = opt.head_dim(), T = x.size(0);
  return CatchAll("PagedForward", [&]() -> StatusOr<at::Tensor> {
    L.forwards.fetch_add(1, std::memory_order_relaxed);
    const at::Device dev = x.device();
    const auto i64 = at::TensorOptions().dtype(at::kLong);
    // Small index tensors go to the device from pinned memory, asynchronously: a pageable copy would make the
    // host wait for the GPU work queued before it.
    auto to_dev = [&](const at::Tensor& t) { return dev.is_cpu() ? t : t.pin_memory().to(dev, /*non_blocking=*/true); };
    const bool kernels = L.KernelsServe();
#ifdef MQA_WITH_CUDA
    if (kernels && opt.cuda_graphs && !L.graphs_broken && GraphEligible(seqs)) {
      try {
        return DecodeWithGraph(L, x, seqs, block_size, k_cache, v_cache);
      } catch (const std::exception& e) {
        // The eager path below computes the same pass (the warm-up may already have appended the same K/V).
        L.graphs_broken = true;
        std::string msg = e.what();
        if (auto nl = msg.find('\n'); nl != std::string::npos) msg.resize(nl);
        Log(LogLevel::kWarning, "CUDA graph capture failed; this layer runs its decode passes eagerly from now on: " + msg);
      }
    }
#endif
    // One projection GEMM over every token of the pass.
    auto [q, k, v] = Project(L, x);
    // KV append: every new token's slot, then one scatter per cache.
    std::vector<int64_t> new_slots;
    new_slots.reserve(static_cast<size_t>(T));
    for (const PagedSeq& s : seqs) {
      for (int64_t p = s.past; p < s.past + s.tokens; ++p) {
        new_slots.push_back(s.table->Slot(p));
      }
    }
    const at::Tensor slot_index = to_dev(at::tensor(new_slots, i64));
    if (!kernels && opt.attn_impl == AttnImpl::kTriton) {
      L.NoteFallback("the paged pass needs CUDA, bfloat16 or float16 and head_dim 64 or 128 for the fused kernels; "
                     "it computes with the torch path");
    }
#ifdef MQA_WITH_CUDA
    if (kernels) {
      // k and v are read in place (row stride of the projection output, or of the normed k).
      CudaCheck(cuda::KvAppend(KvTypeOf(x.scalar_type()), static_cast<int>(T), static_cast<int>(d), k.data_ptr(), k.stride(0),
                               v.data_ptr(), v.stride(0), slot_index.data_ptr<int64_t>(), k_cache.data_ptr(),
                               v_cache.data_ptr(), at::cuda::getCurrentCUDAStream().stream()),
                "KvAppend");
    } else
#endif
    {
      k_cache.index_copy_(0, slot_index, k.contiguous());
      v_cache.index_copy_(0, slot_index, v.contiguous());
    }

    at::Tensor ctx = at::empty({T, H, d}, x.options());
    bool any_alibi = false;
    for (const PagedSeq& s : seqs) any_alibi = any_alibi || s.alibi;
    const at::Tensor slopes_f32 =
        any_alibi ? to_dev(at::tensor(AlibiSlopes(H), at::TensorOptions().dtype(at::kFloat))) : at::Tensor();
    const at::Tensor slopes = any_alibi ? slopes_f32.to(x.scalar_type()) : at::Tensor();

    std::vector<const PagedSeq*> decode;
    for (const PagedSeq& s : seqs) {
      if (s.tokens == 1) decode.push_back(&s);
    }
#ifdef MQA_WITH_CUDA
    if (kernels && !decode.empty()) {
      // One kernel for every decode token: block tables, lengths and ALiBi flags travel in one int32 buffer.
      const int64_t B = static_cast<int64_t>(decode.size());
      int64_t len_max = 0;
      bool in_order = true;  // decode rows are 0..B-1: q and ctx are read and written in place
      std::vector<int64_t> rows;
      for (int64_t b = 0; b < B; ++b) {
        len_max = std::max(len_max, decode[static_cast<size_t>(b)]->past + 1);
        in_order = in_order && decode[static_cast<size_t>(b)]->row == b;
        rows.push_back(decode[static_cast<size_t>(b)]->row);
      }
      const int64_t nb = (len_max + block_size - 1) / block_size;
      at::Tensor host = at::empty({B * nb + 2 * B}, at::TensorOptions().dtype(at::kInt));
      FillDecodeMeta(decode, B, nb, block_size, host.data_ptr<int32_t>());
      const at::Tensor meta = to_dev(host);
      const at::Tensor row_index = in_order ? at::Tensor() : to_dev(at::tensor(rows, i64));
      at::Tensor q_dec = in_order ? q : q.index_select(0, row_index);
      at::Tensor out = in_order ? ctx.view({T, H * d}) : at::empty({B, H * d}, x.options());
      const int splits = cuda::PagedDecodeSplits(static_cast<int>(B), static_cast<int>(len_max), static_cast<int>(H),
                                                 static_cast<int>(d), at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
      at::Tensor workspace;
      if (splits > 1) {
        const size_t bytes = cuda::PagedDecodeWorkspaceBytes(static_cast<int>(B), static_cast<int>(H), static_cast<int>(d), splits);
        workspace = at::empty({static_cast<int64_t>(bytes / sizeof(float))}, x.options().dtype(at::kFloat));
      }
      LaunchDecode(L, B, nb, block_size, meta, q_dec, k_cache, v_cache, any_alibi ? slopes_f32 : at::Tensor(),
                   workspace.defined() ? workspace.data_ptr<float>() : nullptr, splits, out);
      if (!in_order) ctx.index_copy_(0, row_index, out.view({B, H, d}));
      decode.clear();
    }
#endif
    // Decode tokens (one per session) attend together: each session's slots are gathered into a padded
    // [B, L_max] index; padding and the unused tail of a block point at block 0 (zeros) and are masked out.
    if (!decode.empty()) {
      const int64_t B = static_cast<int64_t>(decode.size());
      int64_t len_max = 0;
      for (const PagedSeq* s : decode) len_max = std::max(len_max, s->past + 1);
      const int64_t nb = (len_max + block_size - 1) / block_size;
      std::vector<int64_t> tables(static_cast<size_t>(B * nb), 0), lengths, rows;
      for (int64_t b = 0; b < B; ++b) {
        const PagedSeq& s = *decode[static_cast<size_t>(b)];
        const int64_t used = (s.past + 1 + block_size - 1) / block_size;
        for (int64_t i = 0; i < used; ++i) tables[static_cast<size_t>(b * nb + i)] = s.table->blocks()[static_cast<size_t>(i)];
        lengths.push_back(s.past + 1);
        rows.push_back(s.row);
      }
      const at::Tensor table = to_dev(at::tensor(tables, i64).view({B, nb}));
      const at::Tensor length = to_dev(at::tensor(lengths, i64)).view({B, 1});
      const at::Tensor pos = at::arange(len_max, i64.device(dev)).view({1, len_max});
      const at::Tensor valid = pos < length;                                        // [B, L_max]
      at::Tensor slots = (table.unsqueeze(-1) * block_size + at::arange(block_size, i64.device(dev)))
                             .view({B, nb * block_size})
                             .narrow(1, 0, len_max);
      slots = at::where(valid, slots, at::zeros_like(slots));
      const at::Tensor kg = k_cache.index_select(0, slots.reshape(-1)).view({B, len_max, d});
      const at::Tensor vg = v_cache.index_select(0, slots.reshape(-1)).view({B, len_max, d});
      const at::Tensor row_index = to_dev(at::tensor(rows, i64));
      const at::Tensor qd = q.index_select(0, row_index).view({B, H, d});
      at::Tensor attn = at::bmm(qd, kg.transpose(1, 2)) * L.scale;                 // [B, H, L_max]
      std::vector<uint8_t> alibi_rows;
      for (const PagedSeq* s : decode) alibi_rows.push_back(s->alibi ? 1 : 0);
      if (any_alibi) {
        // Causal form relative to each session's last key: m_h * (j - (len - 1)).
        const at::Tensor rel = (pos - (length - 1)).to(x.scalar_type()).view({B, 1, len_max});
        const at::Tensor on = to_dev(at::tensor(alibi_rows, at::TensorOptions().dtype(at::kByte))).to(at::kBool).view({B, 1, 1});
        attn = attn + at::where(on, slopes.view({1, H, 1}) * rel, at::zeros({}, attn.options()));
      }
      attn = attn.masked_fill(valid.logical_not().view({B, 1, len_max}), -std::numeric_limits<double>::infinity());
      const at::Tensor p = at::softmax(attn, -1);
      ctx.index_copy_(0, row_index, at::bmm(p.to(vg.scalar_type()), vg));         // [B, H, d]
    }

#ifdef MQA_WITH_CUDA
    if (kernels) {
      // Prefill chunks of the same causal kind go through one variable-length flash call against their gathered
      // K/V (one shared head). Flash aligns the causal mask bottom-right when a chunk has fewer queries than keys,
      // as the spec does. LibTorch's flash build has no ALiBi, so ALiBi chunks take the torch attention below.
      for (const bool causal : {false, true}) {
        std::vector<int64_t> q_rows, kv_slots;
        std::vector<int32_t> cu_q{0}, cu_k{0};
        int64_t max_q = 0, max_k = 0;
        for (const PagedSeq& s : seqs) {
          if (s.tokens == 1 || s.causal != causal || s.alibi) continue;
          const int64_t len = s.past + s.tokens;
          for (int64_t r = 0; r < s.tokens; ++r) q_rows.push_back(s.row + r);
          for (int64_t p = 0; p < len; ++p) kv_slots.push_back(s.table->Slot(p));
          cu_q.push_back(static_cast<int32_t>(q_rows.size()));
          cu_k.push_back(static_cast<int32_t>(kv_slots.size()));
          max_q = std::max(max_q, s.tokens);
          max_k = std::max(max_k, len);
        }
        if (q_rows.empty()) continue;
        const at::Tensor q_index = to_dev(at::tensor(q_rows, i64));
        const at::Tensor kv_index = to_dev(at::tensor(kv_slots, i64));
        const auto i32 = at::TensorOptions().dtype(at::kInt);
        // A non-positive scale goes into q, the kernel gets 1: flash masks raw q.k products with -inf and scales
        // them afterwards (0 * -inf = NaN), with its row maximum over the raw products (see AttendFlash).
        at::Tensor qp = q.index_select(0, q_index);
        if (L.scale <= 0) qp = qp * L.scale;
        qp = qp.view({-1, H, d});
        const at::Tensor kp = k_cache.index_select(0, kv_index).view({-1, 1, d});
        const at::Tensor vp = v_cache.index_select(0, kv_index).view({-1, 1, d});
        auto result = at::_flash_attention_forward(
            qp, kp, vp, to_dev(at::tensor(cu_q, i32)), to_dev(at::tensor(cu_k, i32)), max_q, max_k, 0.0, causal,
            false, L.scale > 0 ? L.scale : 1.0);
        ctx.index_copy_(0, q_index, std::get<0>(result));
      }
    }
#endif
    // Prefill chunks: one attention each, against exactly the session's slots (no padding).
    for (const PagedSeq& s : seqs) {
      if (s.tokens == 1 || (kernels && !s.alibi)) continue;
      if (kernels) L.NoteFallback("prefill chunks with ALiBi use the torch path's attention (no ALiBi in LibTorch's flash build)");
      const int64_t len = s.past + s.tokens;
      std::vector<int64_t> sl(static_cast<size_t>(len));
      for (int64_t p = 0; p < len; ++p) {
        sl[static_cast<size_t>(p)] = s.table->Slot(p);
      }
      const at::Tensor idx = to_dev(at::tensor(sl, i64));
      const at::Tensor kk_all = k_cache.index_select(0, idx);                       // [len, d]
      const at::Tensor vv_all = v_cache.index_select(0, idx);
      // A tile of query rows at a time, so the logits take tile x H x len, not s x H x len: a non-causal step
      // runs whole (never chunked), however long.
      const int64_t tile_rows = TileRows(1, H, s.tokens, len);
      for (int64_t r0 = 0; r0 < s.tokens; r0 += tile_rows) {
        const int64_t t = std::min(tile_rows, s.tokens - r0);
        // A causal tile's queries see the keys up to their own positions only: the first past + r0 + t.
        const int64_t keys = s.causal ? s.past + r0 + t : len;
        const at::Tensor kk = kk_all.narrow(0, 0, keys);
        const at::Tensor vv = vv_all.narrow(0, 0, keys);
        const at::Tensor qs = q.narrow(0, s.row + r0, t).view({t, H, d}).transpose(0, 1);  // [H, t, d]
        at::Tensor attn = at::matmul(qs, kk.t()) * L.scale;                          // [H, t, keys]
        if (s.alibi) {
          const at::Tensor j = at::arange(keys, i64.device(dev)).view({1, keys});
          const at::Tensor i = at::arange(s.past + r0, s.past + r0 + t, i64.device(dev)).view({t, 1});
          // Causal form: m_h * (j - (keys - 1)), which differs from -m_h * (i - j) by a constant per row.
          const at::Tensor rel = s.causal ? (j - (keys - 1)).expand({t, keys}) : -(j - i).abs();
          attn = attn + slopes.view({H, 1, 1}) * rel.to(x.scalar_type()).view({1, t, keys});
        }
        if (s.causal) {
          attn = attn.masked_fill(FutureKeys(t, keys, dev).view({1, t, keys}), MostNegative(x.scalar_type()));
        }
        const at::Tensor p = at::softmax(attn, -1);
        ctx.narrow(0, s.row + r0, t).copy_(at::matmul(p.to(vv.scalar_type()), vv).transpose(0, 1));
      }
    }
    return at::linear(ctx.view({T, dim}), L.P("out_proj.weight"), L.P("out_proj.bias"));
  });
}

}  // namespace mqa::core
