// The engine's share of /metrics: pass sizes, per-device gauges, and what computed each model's layers. Private
// to the server's metrics.
#ifndef MQA_SERVER_METRICS_ENGINE_H_
#define MQA_SERVER_METRICS_ENGINE_H_

#include "mqa/core/engine.h"
#include "server/metrics_text.h"

namespace mqa::server {

void RenderBatchSizes(const core::EngineStats& st, Writer& w);
// The same numbers as the unlabelled gauges, per device (label device="cpu" or "cuda:N").
void RenderDevices(const core::EngineStats& st, Writer& w);
// Per model and device: requests for attn_impl's fast path served by the torch path (by path and reason), paged
// passes, and CUDA-graph captures and replays.
void RenderExecution(const core::EngineStats& st, Writer& w);

}  // namespace mqa::server

#endif  // MQA_SERVER_METRICS_ENGINE_H_
