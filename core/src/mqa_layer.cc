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
#include <sstream>
#include <stdexcept>
#include <tuple>

#include "layer/layer_math.h"
#include "mqa/core/device.h"
#include "mqa/core/logging.h"
#include "tensor_impl.h"

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

std::string Str(const std::vector<int64_t>& v) { return ShapeToString(v); }

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
  mutable std::mutex fallback_mu;
  mutable std::map<std::string, uint64_t> fallbacks_by_reason;  // guarded by fallback_mu

  const at::Tensor& P(const char* name) const { return params.at(name); }

  // A flash or triton request served by another path: counted every time (by reason, a short label for the
  // metrics), logged once per layer.
  void NoteFallback(const char* reason, const std::string& why) const {
    fallbacks.fetch_add(1, std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lock(fallback_mu);
      ++fallbacks_by_reason[reason];
    }
    std::call_once(fallback_logged, [&] {
      Log(LogLevel::kInfo,
          "attn_impl=" + std::string(AttnImplName(opt.attn_impl)) + ": " + why + " (counted in fallbacks_to_torch)");
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
  auto bias = params.find(p + ".bias");
  return QkNorm(opt.norm_type, x, params.at(p + ".weight"), bias == params.end() ? at::Tensor() : bias->second);
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
    at::Tensor attn =
        at::matmul(q.narrow(2, row0, t).reshape({b, 1, H * t, d}), kt).view({b, H, t, s_k}) * scale;  // step 6
    if (bias.defined()) attn = attn + BiasRows(bias, row0, t);  // step 7 (may promote: bf16 + fp32 bias -> fp32)
    if (mask.defined()) attn = attn.masked_fill(mask.logical_not().view({b, 1, 1, s_k}), min_val);  // step 8
    if (causal && s_q != 1) {                                                                       // step 9
      attn = attn.masked_fill(FutureKeys(s_q, s_k, q.device(), row0, t), min_val);
    }
    at::Tensor p = at::softmax(attn, -1);                                                    // step 10
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
  if (!a.x.defined())
    return InvalidArgumentError("x is missing; expected a tensor [b, s, " + std::to_string(dim) + "]");
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
      return InvalidArgumentError("past_key_value has the wrong layout: expected k " + want_k +
                                  " (keys transposed, one shared head) and v " + want_v +
                                  " with the same s_past, got k " + ShapeOf(past_k) + " and v " + ShapeOf(past_v));
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
      return InvalidArgumentError("bias must be a floating-point tensor, got " +
                                  std::string(c10::toString(bias.scalar_type())));
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
      NoteFallback("needs_weights", "needs_weights requests are served by the torch path");
    } else if (opt.attn_impl == AttnImpl::kTriton && !fused_dtype) {
      NoteFallback("unsupported_layer", "the fused kernels need a CUDA device and bfloat16 or float16; this layer (" +
                                            dev + ", " + std::string(dt) + ") computes with the torch path");
    } else if (opt.attn_impl == AttnImpl::kTriton) {
      NoteFallback("stateless_forward", "stateless forwards (no paged cache) are served by LibTorch's fused attention");
      use_flash = true;
    } else {
      use_flash = true;
    }
  }

  return CatchAll("MultiQueryAttention::Forward", [&]() -> StatusOr<ForwardResult> {
    forwards.fetch_add(1, std::memory_order_relaxed);
    at::Tensor qkv = at::linear(x, P("Wqkv.weight"), P("Wqkv.bias"));                          // step 1
    if (opt.clip_qkv && *opt.clip_qkv != 0.0) qkv = qkv.clamp(-*opt.clip_qkv, *opt.clip_qkv);  // step 2
    at::Tensor q = qkv.narrow(2, 0, dim);                                                      // step 3
    at::Tensor k = qkv.narrow(2, dim, d);
    at::Tensor v = qkv.narrow(2, dim + d, d);
    if (opt.qk_ln) {
      q = Norm(q, "q_ln");
      k = Norm(k, "k_ln");
    }
    at::Tensor qh = q.reshape({b, s, H, d}).transpose(1, 2);        // step 4: [b, H, s, d]
    at::Tensor kt = k.reshape({b, s, 1, d}).permute({0, 2, 3, 1});  // [b, 1, d, s]
    at::Tensor vh = v.reshape({b, s, 1, d}).transpose(1, 2);        // [b, 1, s, d]
    ForwardResult result;
    if (a.past_key_value) {  // step 5
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
  impl->scale = SoftmaxScale(options);
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
                      ", heads=" + std::to_string(impl_->opt.heads) +
                      ", qk_ln=" + (impl_->opt.qk_ln ? "true" : "false") +
                      ", norm_type=" + std::string(NormTypeName(impl_->opt.norm_type)) + "): ";
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
  LayerCounters c;
  c.forwards = impl_->forwards.load();
  c.fallbacks_to_torch = impl_->fallbacks.load();
  std::lock_guard<std::mutex> lock(impl_->fallback_mu);
  c.fallbacks = impl_->fallbacks_by_reason;
  return c;
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

}  // namespace mqa::core
