// The stateless Forward: checked against the per-request limits before it is queued, then run alone on the
// worker of the model's least-loaded replica.
#include <climits>
#include <initializer_list>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "engine/caller_tensors.h"
#include "engine/engine_impl.h"

namespace mqa::core {
namespace {

// a * b * c * d, or INT64_MAX when that overflows (the figures come from a client).
int64_t SaturatingProduct(std::initializer_list<int64_t> factors) {
  int64_t p = 1;
  for (int64_t f : factors) {
    if (__builtin_mul_overflow(p, f, &p)) return INT64_MAX;
  }
  return p;
}

// The per-request limits of a stateless Forward (EngineOptions::max_forward_scores and
// max_forward_weights_bytes), checked from the shapes alone so an oversized request costs nothing. Shapes the
// layer would reject are left to its own messages.
Status CheckForwardWork(const EngineOptions& eo, const ModelInfo& model, const ForwardArgs& args) {
  const std::vector<int64_t> x = args.x.shape();
  if (x.size() != 3) return Status();
  int64_t past = 0;
  if (args.past_key_value && args.past_key_value->v.defined() && args.past_key_value->v.shape().size() == 4) {
    past = args.past_key_value->v.shape()[2];
  }
  const int64_t b = x[0], s = x[1], H = model.options.heads, s_k = past + s;
  const int64_t scores = SaturatingProduct({b, H, s, s_k});
  const std::string figure = "b * H * s * s_k = " + std::to_string(b) + " * " + std::to_string(H) + " * " +
                             std::to_string(s) + " * " + std::to_string(s_k) + " = " + std::to_string(scores);
  if (scores > eo.max_forward_scores) {
    return ResourceExhaustedError("Forward would compute " + figure + " attention scores, more than the limit of " +
                                  std::to_string(eo.max_forward_scores) +
                                  " per request (max_forward_scores, server flag --max-forward-scores); send fewer "
                                  "or shorter sequences, or feed a long one through a session");
  }
  if (args.needs_weights && eo.max_forward_weights_bytes > 0) {
    const int64_t bytes = SaturatingProduct({scores, static_cast<int64_t>(DTypeSize(args.x.dtype()))});
    if (bytes > eo.max_forward_weights_bytes) {
      return ResourceExhaustedError(
          "needs_weights: the weights [" + std::to_string(b) + ", " + std::to_string(H) + ", " + std::to_string(s) +
          ", " + std::to_string(s_k) + "] in " + std::string(DTypeName(args.x.dtype())) + " (" + figure +
          " values) take " + std::to_string(bytes) + " bytes, more than the " +
          std::to_string(eo.max_forward_weights_bytes) +
          " a reply may hold (max_message_bytes, server flag --max-message-bytes); ask for fewer rows, or without "
          "needs_weights");
    }
  }
  return Status();
}

}  // namespace

void Engine::SubmitForward(ForwardRequest request, ForwardCallback done) {
  auto mit = impl_->models.find(request.model);
  if (mit == impl_->models.end()) return done(GetModel(request.model).status());
  const Model& model = *mit->second;
  if (Status layer = CheckLayer(model.info, request.layer); !layer.ok()) return done(layer);
  if (!request.args.x.defined() || !IsFloatingPoint(request.args.x.dtype())) {
    return done(
        InvalidArgumentError("x: expected a floating tensor [b, s, " + std::to_string(model.info.options.dim) + "]"));
  }
  if (Status work = CheckForwardWork(impl_->options, model.info, request.args); !work.ok()) return done(work);
  auto shared_done = std::make_shared<ForwardCallback>(std::move(done));
  auto in_flight = std::make_shared<InFlight>();
  Impl* impl = impl_.get();
  auto finish = [impl, shared_done, in_flight](StatusOr<ForwardResult> result) {
    in_flight->Leave();
    if (result.ok()) impl->Count([](EngineStats& c) { ++c.forwards_completed; });
    (*shared_done)(std::move(result));
  };
  const Clock::time_point deadline = request.deadline;
  auto cancel = request.cancel;
  auto req = std::make_shared<ForwardRequest>(std::move(request));
  // Stateless, so any replica will do: the one whose device has the fewest items queued.
  const Replica* r = model.replicas[0].get();
  size_t least = impl->workers.at(r->device)->queued();
  for (const auto& candidate : model.replicas) {
    const size_t queued = impl->workers.at(candidate->device)->queued();
    if (queued < least) {
      least = queued;
      r = candidate.get();
    }
  }
  impl->Enqueue(
      r->device, deadline, std::move(cancel),
      [impl, r, req, finish](Clock::time_point /*enqueued*/) { impl->RunForward(*r, *req, finish); }, finish,
      in_flight);
}

void Engine::Impl::RunForward(const Replica& replica, const ForwardRequest& req, const ForwardCallback& done) {
  MqaOptions o = replica.model->info.options;
  o.device = replica.device;  // info.options names the first replica's device
  const DType caller = req.args.x.dtype();
  ForwardArgs args = req.args;
  auto convert = [&](Tensor& t, bool floating, const char* name) -> Status {
    auto c = ToLayer(t, o, floating);
    if (!c.ok()) return Status(c.status().code(), std::string(name) + ": " + c.status().message());
    t = std::move(c).value();
    return Status();
  };
  Status st = convert(args.x, true, "x");
  if (st.ok()) st = convert(args.bias, true, "bias");
  if (st.ok()) st = convert(args.mask, false, "mask");
  if (st.ok() && args.past_key_value) {
    st = convert(args.past_key_value->k, true, "past_key_value.key");
    if (st.ok()) st = convert(args.past_key_value->v, true, "past_key_value.value");
  }
  if (!st.ok()) return done(st);
  args.training = false;
  auto result = replica.stack->layer(req.layer).Forward(args);
  if (!result.ok()) return done(result.status());
  ForwardResult r;
  auto out = ToCaller(result->out, caller);
  if (!out.ok()) return done(out.status());
  r.out = std::move(out).value();
  if (result->weights.defined()) {
    auto w = ToCaller(result->weights, caller);
    if (!w.ok()) return done(w.status());
    r.weights = std::move(w).value();
  }
  if (result->cache) {
    KvCache c;
    auto k = ToCaller(result->cache->k, caller);
    if (!k.ok()) return done(k.status());
    auto v = ToCaller(result->cache->v, caller);
    if (!v.ok()) return done(v.status());
    c.k = std::move(k).value();
    c.v = std::move(v).value();
    r.cache = std::move(c);
  }
  done(std::move(r));
}

}  // namespace mqa::core
