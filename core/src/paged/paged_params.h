// What every path of the paged pass reads of a layer: its options and its parameters (shared with the layer,
// never copied), and the projections before and after attention. Private to core.
#ifndef MQA_CORE_SRC_PAGED_PAGED_PARAMS_H_
#define MQA_CORE_SRC_PAGED_PAGED_PARAMS_H_

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "mqa/core/mqa_layer.h"

namespace mqa::core {

struct LayerParams {
  MqaOptions opt;
  at::ScalarType dtype = at::kFloat;
  double scale = 1.0;  // the softmax scale
  at::Tensor wqkv_w, wqkv_b, out_w, out_b;
  at::Tensor q_ln_w, q_ln_b, k_ln_w, k_ln_b;  // with qk_ln; the biases only for the layer norms
};

// The layer's parameters as they are now, sharing their storage. A layer whose parameters are replaced later
// (LoadStateDict) needs new LayerParams; the engine never reloads a hosted layer.
LayerParams ParamsOf(const MultiQueryAttention& layer);

struct Qkv {
  at::Tensor q, k, v;  // [T, dim], [T, d], [T, d]: views of the projection output (or the normed q/k)
};

// The projection of every token of a pass (the spec's steps 1-3, and the qk norms). x: [T, dim].
Qkv Project(const LayerParams& p, const at::Tensor& x);
// The output projection of ctx [T, dim].
at::Tensor OutProject(const LayerParams& p, const at::Tensor& ctx);

// A small host tensor on dev. From pinned memory, asynchronously: a pageable copy would make the host wait for
// the GPU work queued before it.
at::Tensor ToDevice(const at::Tensor& host, at::Device dev);

}  // namespace mqa::core

#endif  // MQA_CORE_SRC_PAGED_PAGED_PARAMS_H_
