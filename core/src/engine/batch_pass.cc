#include "engine/engine_impl.h"

#include <cstring>
#include <optional>
#include <utility>
#include <vector>

#include "engine/caller_tensors.h"
#include "paged/paged_layer.h"
#include "tensor_impl.h"

#include <ATen/EmptyTensor.h>

#ifdef MQA_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#endif

namespace mqa::core {

std::vector<PoolView> Engine::Impl::Pools() const {
  std::vector<PoolView> pools;
  pools.reserve(replicas.size());
  for (const Replica* r : replicas) {
    pools.push_back({r->pool->free_blocks(), r->pool->capacity(), r->pool->block_size()});
  }
  return pools;
}

void Engine::Impl::Settle(WorkItem& item, const Decision& d) {
  StepJob& job = *item.job;
  Session& session = *job.session;
  const int layer = job.request.layer;
  if (d.verdict == Verdict::kRefuse) {
    if (d.kv_exhausted) Count([](EngineStats& c) { ++c.kv_exhausted; });
    return item.fail(d.status);
  }
  StepResult r;
  r.position = d.start;
  r.queue_us = MicrosBetween(item.enqueued, Clock::now());
  if (d.verdict == Verdict::kEmpty) {
    r.out = job.request.x;
    return job.finish(std::move(r));
  }
  // kReplay: the kept answer, unless the session was closed since the policy looked (which lets it go).
  std::optional<Tensor> kept;
  {
    std::lock_guard<std::mutex> slock(session.mu);
    kept = session.last[static_cast<size_t>(layer)].out;
  }
  if (!kept) {
    return item.fail(NotFoundError("session " + session.id + " was closed before this step ran; nothing was computed"));
  }
  r.out = std::move(*kept);
  r.num_tokens = job.tokens();
  r.replayed = true;
  Count([](EngineStats& c) { ++c.steps_replayed; });
  job.finish(std::move(r));
}

namespace {

// A batched pass on its way: the members that run (indices into items), their rows, and the output: on the host
// already (the CPU), or being copied into the device's pinned output buffer (PassBuffers) until `copied` fires.
class StepPass : public LaunchedPass {
 public:
  bool device_done() const override {
#ifdef MQA_WITH_CUDA
    if (copied) return copied->query();
#endif
    return true;
  }
  std::vector<size_t> run;
  std::vector<PagedSeq> seqs;
  std::vector<int64_t> chunk;
  StatusOr<at::Tensor> out = Status(StatusCode::kInternal, "the pass did not run");
#ifdef MQA_WITH_CUDA
  std::optional<at::cuda::CUDAEvent> copied;
#endif
};

}  // namespace

std::unique_ptr<LaunchedPass> Engine::Impl::LaunchPass(std::vector<WorkItem> items, const std::vector<Decision>& plan) {
  auto launched = std::make_unique<StepPass>();
  launched->items = std::move(items);
  std::vector<WorkItem>& pass = launched->items;
  const Replica& replica = *pass[0].job->replica;
  const MqaOptions& o = replica.model->info.options;
  const int layer = pass[0].job->request.layer;
  const int32_t bs = replica.pool->block_size();
  const auto start = Clock::now();
  // A first chunk was admitted by the policy against the session's state; here it takes its blocks.
  std::vector<size_t>& run = launched->run;  // indices into pass
  for (size_t i = 0; i < pass.size(); ++i) {
    WorkItem& item = pass[i];
    StepJob& job = *item.job;
    Session& session = *job.session;
    if (job.start >= 0) {
      run.push_back(i);
      continue;
    }
    Status refused;
    {
      std::lock_guard<std::mutex> slock(session.mu);
      if (session.closed) {
        refused = NotFoundError("session " + session.id + " was closed before this step ran; nothing was computed");
      }
    }
    if (refused.ok()) {
      // The policy counted the free blocks; a guaranteed session created since may have taken them.
      refused = session.table->EnsureCapacity(plan[i].start + job.tokens());
      if (!refused.ok()) {
        Count([](EngineStats& c) { ++c.kv_exhausted; });
        refused = Status(refused.code(), refused.message() + "; session " + session.id +
                                             " is unchanged: retry the step when blocks are free");
      }
    }
    if (refused.ok()) {
      // The caller's rows stay as they came (the CPU, the caller's dtype): each pass copies its chunk's bytes into
      // the pass's one staging buffer and converts the whole batch once, on the layer's device.
      StatusOr<at::Tensor> x = CatchAll("step input", [&]() -> StatusOr<at::Tensor> {
        at::Tensor t = Unwrap(job.request.x);
        return t.is_cpu() && t.is_contiguous() ? t : t.to(at::kCPU).contiguous();
      });
      if (x.ok()) {
        job.x = std::move(x).value();
        job.start = plan[i].start;
        job.started = start;
      } else {
        refused = x.status();
      }
    }
    if (!refused.ok()) {
      item.fail(refused);
      continue;
    }
    {
      std::lock_guard<std::mutex> slock(session.mu);
      session.cache_bytes = static_cast<int64_t>(session.table->blocks().size()) * replica.block_bytes;
    }
    run.push_back(i);
  }
  if (run.empty()) return launched;

  // One pass over the next chunk of every step. The staging buffer holds the callers' dtype when they share one
  // (then the pass's output comes back in it too, converted on the device), else the layer's.
  const at::ScalarType layer_type = ToScalarType(o.dtype);
  at::ScalarType staged_type = pass[run[0]].job->x.scalar_type();
  for (size_t i : run) {
    if (pass[i].job->x.scalar_type() != staged_type) staged_type = layer_type;
  }
  std::vector<PagedSeq>& seqs = launched->seqs;
  seqs.reserve(run.size());
  std::vector<int64_t>& chunk = launched->chunk;
  chunk.assign(run.size(), 0);
  int64_t rows = 0;
  for (size_t i = 0; i < run.size(); ++i) {
    StepJob& job = *pass[run[i]].job;
    chunk[i] = plan[run[i]].chunk;
    PagedSeq seq;
    seq.row = rows;
    seq.tokens = chunk[i];
    seq.past = job.start + job.done;
    seq.table = job.session->table.get();
    seq.causal = job.session->causal;
    seq.alibi = job.session->position_bias == PositionBias::kAlibi;
    seqs.push_back(seq);
    rows += chunk[i];
  }
  auto gathered = Clock::now();
  launched->out = CatchAll("batched pass", [&]() -> StatusOr<at::Tensor> {
    PagedLayer& paged = *replica.paged[static_cast<size_t>(layer)];
    const bool on_cuda = paged.device().is_cuda();
    // On CUDA the rows go through the device's pinned buffers (PassBuffers): the copies in and out are
    // asynchronous, the worker goes on while the device computes and completes the pass later (FinishPass).
    const int64_t row_bytes = o.dim * static_cast<int64_t>(c10::elementSize(staged_type));
    PassBuffers::Pair buffers;
    if (on_cuda) buffers = pass_buffers.at(replica.device)->Next(rows, o.dim, staged_type);
    at::Tensor staged = on_cuda ? buffers.in : at::empty({rows, o.dim}, at::TensorOptions().dtype(staged_type));
    uint8_t* dst = static_cast<uint8_t*>(staged.data_ptr());
    for (size_t i = 0; i < run.size(); ++i) {
      const StepJob& job = *pass[run[i]].job;
      if (job.x.scalar_type() == staged_type) {
        const uint8_t* src = static_cast<const uint8_t*>(job.x.data_ptr()) + job.done * row_bytes;
        std::memcpy(dst + seqs[i].row * row_bytes, src, static_cast<size_t>(chunk[i] * row_bytes));
      } else {  // callers of several dtypes in one pass: this one's rows converted as they are copied
        staged.narrow(0, seqs[i].row, chunk[i]).copy_(job.x.view({job.tokens(), o.dim}).narrow(0, job.done, chunk[i]));
      }
    }
    at::Tensor x = on_cuda ? staged.to(paged.device(), /*non_blocking=*/true) : staged;
    if (x.scalar_type() != layer_type) x = x.to(layer_type);
    gathered = Clock::now();
    MQA_ASSIGN_OR_RETURN(at::Tensor y, paged.Forward(x, seqs, bs));
    // In the callers' dtype on the device, then one copy back for the whole pass.
    if (y.scalar_type() != staged_type) y = y.to(staged_type);
    if (y.is_cpu()) return y.contiguous();
#ifdef MQA_WITH_CUDA
    buffers.out.copy_(y, /*non_blocking=*/true);
    launched->copied.emplace();
    launched->copied->record(at::cuda::getCurrentCUDAStream());
    launched->on_device = true;
    return buffers.out;
#else
    return y.to(at::kCPU);
#endif
  });
  const auto launched_at = Clock::now();
  {
    std::lock_guard<std::mutex> lock(mu);
    counters.pass_times.gather_us += static_cast<uint64_t>(MicrosBetween(start, gathered));
    counters.pass_times.compute_us += static_cast<uint64_t>(MicrosBetween(gathered, launched_at));
  }
  if (!launched->out.ok()) {
    launched->on_device = false;
#ifdef MQA_WITH_CUDA
    // What the failed pass queued may still read its staging buffer, which the pass after next writes again.
    if (pass_buffers.count(replica.device)) {
      (void)CatchAll("after a failed pass", [] {
        at::cuda::getCurrentCUDAStream().synchronize();
        return Status();
      });
    }
#endif
  }
  return launched;
}

void Engine::Impl::FinishPass(LaunchedPass& done, std::vector<WorkItem>* unfinished) {
  auto& launched = static_cast<StepPass&>(done);
  const std::vector<size_t>& run = launched.run;
  if (run.empty()) return;
  std::vector<WorkItem>& pass = launched.items;
  const MqaOptions& o = pass[0].job->replica->model->info.options;
  const int layer = pass[0].job->request.layer;
  const std::vector<PagedSeq>& seqs = launched.seqs;
  const std::vector<int64_t>& chunk = launched.chunk;
  StatusOr<at::Tensor>& out = launched.out;
  const auto waiting = Clock::now();
#ifdef MQA_WITH_CUDA
  if (launched.copied) {
    Status arrived = CatchAll("the pass's copy back", [&]() -> Status {
      launched.copied->synchronize();
      return Status();
    });
    if (!arrived.ok()) out = arrived;
  }
#endif
  const auto computed = Clock::now();
  {
    // Counted before any completion, so a caller holding its answer sees its pass in stats().
    std::lock_guard<std::mutex> lock(mu);
    ++counters.batches;
    counters.batched_steps += run.size();
    counters.pass_times.wait_us += static_cast<uint64_t>(MicrosBetween(waiting, computed));
    size_t bucket = 0;
    while ((size_t{1} << bucket) < run.size() && bucket + 1 < batch_histogram.size()) ++bucket;
    ++batch_histogram[bucket];
  }
  for (size_t i = 0; i < run.size(); ++i) {
    WorkItem& item = pass[run[i]];
    StepJob& job = *item.job;
    if (!out.ok()) {
      item.fail(out.status());
      continue;
    }
    // Each step's rows are copied out of the pass's output: on CUDA that is a pinned buffer the pass after next
    // reuses, and an answer that owns exactly its bytes is also what the session keeps for a retry of the step
    // (the replay budget counts those bytes, and an idle session pins nothing more).
    const bool whole = job.done == 0 && chunk[i] == job.tokens();
    // [1, n, dim] of dtype from rows [row, row + n) of the output: a plain allocation (no operator dispatch) and a
    // memcpy, which is most of a decode step's host time here.
    auto rows_of = [&](int64_t row, int64_t n, at::ScalarType dtype) -> at::Tensor {
      if (dtype != out->scalar_type()) return out->narrow(0, row, n).to(dtype).view({1, n, o.dim});
      at::Tensor t = at::detail::empty_cpu({1, n, o.dim}, dtype, /*pin_memory=*/false, std::nullopt);
      const size_t row_bytes = static_cast<size_t>(o.dim) * out->element_size();
      std::memcpy(t.data_ptr(), static_cast<const uint8_t*>(out->data_ptr()) + row * row_bytes, t.nbytes());
      return t;
    };
    const at::ScalarType caller = ToScalarType(job.request.x.dtype());
    StatusOr<at::Tensor> mine = CatchAll("step output", [&]() -> StatusOr<at::Tensor> {
      return rows_of(seqs[i].row, chunk[i], whole ? caller : out->scalar_type());
    });
    if (!mine.ok()) {
      item.fail(mine.status());
      continue;
    }
    if (!whole) job.outs.push_back(std::move(mine).value());
    job.done += chunk[i];
    // The session's position moves only when the whole step is done: a step whose later chunk fails leaves the
    // session where it was (the chunks' keys past that position are overwritten by the next step).
    if (job.remaining() > 0) {
      unfinished->push_back(std::move(item));
      continue;
    }
    StatusOr<Tensor> result = CatchAll("step output", [&]() -> StatusOr<Tensor> {
      if (whole) return Wrap(*std::move(mine));
      at::Tensor all = at::cat(job.outs, 1);
      return Wrap(all.scalar_type() == caller ? all : all.to(caller));
    });
    if (!result.ok()) {
      item.fail(result.status());
      continue;
    }
    StepResult r;
    r.out = std::move(result).value();
    r.position = job.start;
    r.num_tokens = job.request.x.size(1);
    // Only a step that names its position can be retried, so only its answer is worth keeping (the caller's own
    // tensor: no copy).
    {
      std::lock_guard<std::mutex> slock(job.session->mu);
      job.session->positions[static_cast<size_t>(layer)] = job.start + job.done;
      LastStep& last = job.session->last[static_cast<size_t>(layer)];
      last.position = job.start;
      last.tokens = r.num_tokens;
      last.dtype = job.request.x.dtype();
      last.x_hash = job.x_hash;
      job.session->KeepAnswerLocked(last, job.request.position ? &r.out : nullptr);
    }
    r.queue_us = MicrosBetween(item.enqueued, job.started);
    r.compute_us = MicrosBetween(job.started, Clock::now());
    job.outs.clear();
    job.finish(std::move(r));
  }
  const auto scattered = Clock::now();
  std::lock_guard<std::mutex> lock(mu);
  counters.pass_times.scatter_us += static_cast<uint64_t>(MicrosBetween(computed, scattered));
}

}  // namespace mqa::core
