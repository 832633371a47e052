// Fuzzes what a client controls on the wire: a serialized mqa.v1 message, converted to core's types the way
// the service converts it (server/wire.{h,cc} and the request checks of server/service.cc); a Forward request
// then runs through a small model on a real engine, as the service would submit it.
//
// Input: one selector byte, then the serialized message. Selector % 3: 0 = ForwardRequest, 1 = StepRequest,
// 2 = a bare Tensor. Bytes that do not parse as the message are skipped (protobuf's own parser is not the
// target).
//
// Beyond the sanitizers' checks, the target aborts when
//  - a conversion fails with anything but INVALID_ARGUMENT, or with a message that does not name the field
//    (the service forwards both to the client, who must learn what to fix);
//  - a tensor accepted from the wire does not come back out (ToWire) with the same dtype, shape and bytes;
//  - the engine answers a client's tensors with anything but a result, INVALID_ARGUMENT or RESOURCE_EXHAUSTED
//    (its work limit): an INTERNAL error there means an unchecked input reached LibTorch and tripped one of its checks.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <future>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <google/protobuf/stubs/logging.h>

#include "mqa/core/engine.h"
#include "mqa/core/mqa_layer.h"
#include "mqa/core/status.h"
#include "mqa/core/tensor.h"
#include "server/wire.h"

namespace mqa::server {
namespace {

using core::StatusCode;

void Require(bool ok, const std::string& what) {
  if (ok) return;
  std::fprintf(stderr, "wire_fuzz: %s\n", what.c_str());
  std::abort();
}

void RequireClientError(const core::Status& status, const std::string& name) {
  Require(status.code() == StatusCode::kInvalidArgument, name + ": expected INVALID_ARGUMENT, got code " +
                                                             std::to_string(static_cast<int>(status.code())) + ": " +
                                                             status.message());
  Require(status.message().rfind(name + ": ", 0) == 0,
          "message does not name the field '" + name + "': " + status.message());
}

// FromWire plus the checks above; nullopt when the wire tensor was (correctly) refused.
std::optional<core::Tensor> Convert(const v1::Tensor& wire, const std::string& name) {
  core::StatusOr<core::Tensor> t = FromWire(wire, name);
  if (!t.ok()) {
    RequireClientError(t.status(), name);
    return std::nullopt;
  }
  v1::Tensor back;
  const core::Status st = ToWire(*t, &back);
  Require(st.ok(), name + ": ToWire failed on an accepted tensor: " + st.message());
  Require(back.dtype() == wire.dtype(), name + ": dtype changed in the round trip");
  Require(back.shape_size() == wire.shape_size(), name + ": rank changed in the round trip");
  for (int i = 0; i < wire.shape_size(); ++i) {
    Require(back.shape(i) == wire.shape(i), name + ": shape changed in the round trip");
  }
  Require(back.data() == wire.data(), name + ": bytes changed in the round trip");
  return std::move(t).value();
}

// One engine for every input, hosting model "m": one layer, dim 8, 2 heads (head_dim 4), float32 on the CPU,
// the torch math that serves every option. Small, so that tensors of matching shapes fit in a few hundred fuzzed
// bytes.
core::Engine& TheEngine() {
  static const std::unique_ptr<core::Engine> engine = [] {
    core::EngineOptions options;
    core::ModelConfig m;
    m.name = "m";
    m.options.dim = 8;
    m.options.heads = 2;
    m.options.attn_impl = core::AttnImpl::kTorch;
    m.options.device = "cpu";
    m.max_tokens_per_session = 64;
    options.models.push_back(m);
    options.kv_cache.cpu_budget_bytes = 1 << 20;
    auto created = core::Engine::Create(options);
    Require(created.ok(), "creating the engine: " + created.status().message());
    return std::move(created).value();
  }();
  return *engine;
}

// The service's Forward handler (server/service.cc) up to the engine, then the engine's stateless forward.
void FuzzForward(const v1::ForwardRequest& req) {
  core::ForwardRequest fr;
  fr.model = "m";
  fr.layer = req.layer();
  core::ForwardArgs& args = fr.args;
  if (!req.has_x()) return;  // the service answers "x: required" before converting anything
  std::optional<core::Tensor> x = Convert(req.x(), "x");
  if (!x) return;
  args.x = *x;
  if (req.has_past_key_value()) {
    std::optional<core::Tensor> k = Convert(req.past_key_value().key(), "past_key_value.key");
    if (!k) return;
    std::optional<core::Tensor> v = Convert(req.past_key_value().value(), "past_key_value.value");
    if (!v) return;
    args.past_key_value = core::KvCache{*k, *v};
  } else if (req.return_cache()) {
    args.past_key_value = core::KvCache{};
  }
  if (req.has_bias()) {
    std::optional<core::Tensor> bias = Convert(req.bias(), "bias");
    if (!bias) return;
    args.bias = *bias;
  }
  if (req.has_mask()) {
    std::optional<core::Tensor> mask = Convert(req.mask(), "mask");
    if (!mask) return;
    if (mask->dtype() == core::DType::kUInt8) {
      core::StatusOr<core::Tensor> as_bool = mask->ToDType(core::DType::kBool);
      Require(as_bool.ok(), "mask: uint8 -> bool failed: " + as_bool.status().message());
      mask = *as_bool;
    } else if (mask->dtype() != core::DType::kBool) {
      return;  // the service refuses other mask dtypes itself
    }
    args.mask = *mask;
  }
  args.causal = req.has_causal() ? req.causal() : true;
  args.needs_weights = req.needs_weights();
  const std::vector<int64_t> x_shape = args.x.shape();
  std::promise<core::StatusOr<core::ForwardResult>> done;
  std::future<core::StatusOr<core::ForwardResult>> result = done.get_future();
  TheEngine().SubmitForward(std::move(fr),
                            [&done](core::StatusOr<core::ForwardResult> r) { done.set_value(std::move(r)); });
  const core::StatusOr<core::ForwardResult> r = result.get();
  if (!r.ok()) {
    // RESOURCE_EXHAUSTED: the engine's per-request work limit (max_forward_scores), a client error too.
    const StatusCode code = r.status().code();
    Require(code == StatusCode::kInvalidArgument || code == StatusCode::kResourceExhausted,
            "engine: expected a result, INVALID_ARGUMENT or RESOURCE_EXHAUSTED, got code " +
                std::to_string(static_cast<int>(r.status().code())) + ": " + r.status().message());
    return;
  }
  Require(r->out.shape() == x_shape, "engine: out's shape differs from x's");
}

void FuzzOne(const uint8_t* data, size_t size) {
  if (size < 1) return;
  const uint8_t selector = data[0] % 3;
  const void* body = data + 1;
  const int body_size = static_cast<int>(size - 1);
  if (selector == 0) {
    v1::ForwardRequest req;
    if (req.ParseFromArray(body, body_size)) FuzzForward(req);
  } else if (selector == 1) {
    v1::StepRequest req;
    // The Step and StreamSteps handlers convert only x (ToStepRequest in server/service.cc).
    if (req.ParseFromArray(body, body_size) && req.step().has_x()) Convert(req.step().x(), "x");
  } else {
    v1::Tensor t;
    if (t.ParseFromArray(body, body_size)) Convert(t, "tensor");
  }
}

}  // namespace
}  // namespace mqa::server

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  // Most mutated inputs hold strings that are not UTF-8, which protobuf logs on every parse.
  google::protobuf::SetLogHandler(nullptr);
  mqa::server::TheEngine();  // started once, before the first input
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  mqa::server::FuzzOne(data, size);
  return 0;
}
