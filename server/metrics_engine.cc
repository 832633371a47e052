#include "server/metrics_engine.h"

#include <cstdint>
#include <string>
#include <utility>

namespace mqa::server {

void RenderBatchSizes(const core::EngineStats& st, Writer& w) {
  // EngineStats counts passes per power-of-two range: [0] is size 1, [i] is size in (2^(i-1), 2^i]. The sum
  // of [0..i] is therefore exactly the number of passes with size <= 2^i, which is Prometheus' cumulative le
  // bucket. Sizes above the last bound shown only reach +Inf.
  constexpr size_t kBuckets = 10;  // le = 1, 2, 4, ..., 512
  const char* name = "mqa_batch_size";
  w.Header(name, "histogram", "Steps (or prefill chunks) per batched pass, one observation per pass.");
  uint64_t cumulative = 0;
  for (size_t i = 0; i < kBuckets; ++i) {
    if (i < st.batch_size_histogram.size()) cumulative += st.batch_size_histogram[i];
    w.Sample("mqa_batch_size_bucket", Le(static_cast<double>(uint64_t{1} << i)), cumulative);
  }
  for (size_t i = kBuckets; i < st.batch_size_histogram.size(); ++i) cumulative += st.batch_size_histogram[i];
  w.Sample("mqa_batch_size_bucket", "le=\"+Inf\"", cumulative);
  w.Sample("mqa_batch_size_sum", "", st.batched_steps);
  // The count is the +Inf bucket by definition; taking it from the same array keeps the two equal even when a
  // pass completes between the engine's updates of `batches` and of the histogram.
  w.Sample("mqa_batch_size_count", "", cumulative);
  // Where the workers' time in those passes went (EngineStats::pass_times), so a dashboard shows host time per
  // pass beside the batch size: rate(..._seconds_total[5m]) / rate(mqa_batch_size_count[5m]).
  const char* time_name = "mqa_pass_worker_seconds_total";
  w.Header(time_name, "counter",
           "Worker-thread time in batched passes by phase: gather (inputs joined), launch (device work launched, or "
           "run where the pass synchronises), wait (blocked for a launched pass's outputs), scatter (outputs cut "
           "and completed).");
  const core::PassTimes& t = st.pass_times;
  const std::pair<const char*, uint64_t> phases[] = {
      {"gather", t.gather_us}, {"launch", t.compute_us}, {"wait", t.wait_us}, {"scatter", t.scatter_us}};
  for (const auto& [phase, us] : phases) {
    w.SampleDouble(time_name, std::string("phase=\"") + phase + "\"", static_cast<double>(us) / 1e6);
  }
  w.Counter("mqa_passes_overlapped_total",
            "Batched passes launched while the pass before was still on the device (its copy back on its way).",
            st.passes_overlapped);
}

// Each device's worker, pools and sessions. The
// unlabelled gauges above are their sums, so dashboards that ignore devices keep working.
void RenderDevices(const core::EngineStats& st, Writer& w) {
  struct Gauge {
    const char* name;
    const char* help;
    int64_t (*value)(const core::DeviceStats&);
  };
  static constexpr Gauge kGauges[] = {
      {"mqa_device_queued_requests", "Steps and forwards waiting in one device's queue.",
       [](const core::DeviceStats& d) { return static_cast<int64_t>(d.queue_depth); }},
      {"mqa_device_running_requests", "Steps and forwards being computed now on one device.",
       [](const core::DeviceStats& d) { return static_cast<int64_t>(d.running); }},
      {"mqa_device_sessions", "Open sessions whose model replica lives on one device.",
       [](const core::DeviceStats& d) { return static_cast<int64_t>(d.sessions_open); }},
      {"mqa_device_kv_cache_blocks", "Allocatable KV-cache blocks on one device, all its models.",
       [](const core::DeviceStats& d) { return d.kv_blocks_total; }},
      {"mqa_device_kv_cache_blocks_used", "KV-cache blocks held by sessions on one device, all its models.",
       [](const core::DeviceStats& d) { return d.kv_blocks_used; }},
  };
  for (const Gauge& g : kGauges) {
    w.Header(g.name, "gauge", g.help);
    for (const core::DeviceStats& d : st.devices) w.Sample(g.name, "device=\"" + d.device + "\"", g.value(d));
  }
}

void RenderExecution(const core::EngineStats& st, Writer& w) {
  auto labels = [](const core::ExecutionStats& e) {
    return "model=\"" + LabelValue(e.model) + "\",device=\"" + e.device + "\",attn_impl=\"" + e.attn_impl + "\"";
  };
  w.Header("mqa_attention_fallbacks_total", "counter",
           "Requests for attn_impl's fused path that the torch path served, by model, device, attn_impl, path "
           "(forward: stateless Forward; paged: the engine's batched passes) and reason.");
  for (const core::ExecutionStats& e : st.execution) {
    for (const auto& [reason, n] : e.forward_fallbacks) {
      w.Sample("mqa_attention_fallbacks_total", labels(e) + ",path=\"forward\",reason=\"" + reason + "\"", n);
    }
    for (const auto& [reason, n] : e.paged_fallbacks) {
      w.Sample("mqa_attention_fallbacks_total", labels(e) + ",path=\"paged\",reason=\"" + reason + "\"", n);
    }
  }
  // One counter per model and replica, from one field of its ExecutionStats.
  auto counter = [&](const char* name, const char* help, uint64_t core::ExecutionStats::*field) {
    w.Header(name, "counter", help);
    for (const core::ExecutionStats& e : st.execution) w.Sample(name, labels(e), e.*field);
  };
  counter("mqa_paged_passes_total", "Batched paged passes run, summed over a model's layers.",
          &core::ExecutionStats::paged_passes);
  counter("mqa_cuda_graph_captures_total",
          "CUDA graphs captured for paged decode passes (one per layer, batch bucket and table width in use).",
          &core::ExecutionStats::graph_captures);
  counter("mqa_cuda_graph_replays_total", "Paged decode passes served by replaying a captured CUDA graph.",
          &core::ExecutionStats::graph_replays);
  counter("mqa_cuda_graph_failures_total",
          "CUDA graph captures that failed (logged); that layer's decode passes run eagerly from then on.",
          &core::ExecutionStats::graph_failures);
}

}  // namespace mqa::server
