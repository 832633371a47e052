#include "paged/paged_params.h"

#include <string>

#include "layer/layer_math.h"
#include "tensor_impl.h"

namespace mqa::core {

LayerParams ParamsOf(const MultiQueryAttention& layer) {
  LayerParams p;
  p.opt = layer.options();
  p.dtype = ToScalarType(p.opt.dtype);
  p.scale = SoftmaxScale(p.opt);
  const TensorMap params = layer.StateDict();
  auto get = [&params](const std::string& name) {
    auto it = params.find(name);
    return it == params.end() ? at::Tensor() : Unwrap(it->second);
  };
  p.wqkv_w = get("Wqkv.weight");
  p.wqkv_b = get("Wqkv.bias");
  p.out_w = get("out_proj.weight");
  p.out_b = get("out_proj.bias");
  p.q_ln_w = get("q_ln.weight");
  p.q_ln_b = get("q_ln.bias");
  p.k_ln_w = get("k_ln.weight");
  p.k_ln_b = get("k_ln.bias");
  return p;
}

Qkv Project(const LayerParams& p, const at::Tensor& x) {
  const MqaOptions& opt = p.opt;
  const int64_t dim = opt.dim, d = opt.head_dim();
  at::Tensor qkv = at::linear(x, p.wqkv_w, p.wqkv_b);
  if (opt.clip_qkv && *opt.clip_qkv != 0.0) qkv = qkv.clamp(-*opt.clip_qkv, *opt.clip_qkv);
  Qkv r{qkv.narrow(1, 0, dim), qkv.narrow(1, dim, d), qkv.narrow(1, dim + d, d)};
  if (opt.qk_ln) {
    r.q = QkNorm(opt.norm_type, r.q, p.q_ln_w, p.q_ln_b);
    r.k = QkNorm(opt.norm_type, r.k, p.k_ln_w, p.k_ln_b);
  }
  return r;
}

at::Tensor OutProject(const LayerParams& p, const at::Tensor& ctx) { return at::linear(ctx, p.out_w, p.out_b); }

at::Tensor ToDevice(const at::Tensor& host, at::Device dev) {
  return dev.is_cpu() ? host : host.pin_memory().to(dev, /*non_blocking=*/true);
}

}  // namespace mqa::core
