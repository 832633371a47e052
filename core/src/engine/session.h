// A session as the engine holds it: its model and replica, its block table, its layers' positions and the last
// applied step of each layer (kept to answer retries). Private to core.
#ifndef MQA_CORE_SRC_ENGINE_SESSION_H_
#define MQA_CORE_SRC_ENGINE_SESSION_H_

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "mqa/core/block_pool.h"
#include "mqa/core/engine.h"
#include "mqa/core/tensor.h"

namespace mqa::core {

struct Model;
struct Replica;

// The last applied step of one (session, layer) and its answer, kept so that a retry of it gets the same answer
// instead of being applied twice (StepRequest's contract).
struct LastStep {
  int64_t position = -1;  // where it started; -1: none
  int64_t tokens = 0;
  DType dtype = DType::kFloat32;  // x's
  uint64_t x_hash = 0;
  // Its answer, when it fitted the replay budget: the very tensor the step's caller got (tensors are read-only),
  // which owns exactly its bytes (FinishPass copies each answer out of its pass), so the budget counts what it
  // holds.
  std::optional<Tensor> out;
};

struct Session {
  std::string id;
  const Model* model = nullptr;
  Replica* replica = nullptr;  // where it lives: set at creation, never changes
  int64_t max_tokens = 0;
  std::chrono::milliseconds idle_ttl{0};
  bool causal = true;  // fixed at creation: the worker reads it without the lock
  PositionBias position_bias = PositionBias::kNone;
  std::chrono::system_clock::time_point create_time;

  Admission admission = Admission::kBestEffort;
  // Touched only by the worker of the replica's device (after creation), and by the destructor of the last
  // reference, which returns the blocks: a step still running keeps them alive until it ends.
  std::unique_ptr<BlockTable> table;

  mutable std::mutex mu;  // guards the fields below
  std::vector<int64_t> positions;
  std::vector<LastStep> last;  // per layer: the last applied step (retries of it are answered from here)
  int64_t cache_bytes = 0;
  Clock::time_point last_active;
  std::chrono::system_clock::time_point last_active_wall;
  int pending = 0;  // queued or running steps: a session with work in flight is never reaped
  bool closed = false;

  std::atomic<int64_t>* replay_bytes = nullptr;  // the engine's; outlives every session
  int64_t replay_budget = 0;

  SessionInfo Info() const;

  // A closed session's blocks go back to the pool as soon as no step of it is queued or running (the worker
  // touches the table only for queued or running steps, so nothing reads it after this).
  void ReleaseBlocksIfIdleLocked();

  // Replaces the answer kept in l by *out (or by none: null), within the engine's replay budget: an answer that
  // does not fit next to the others is not kept.
  void KeepAnswerLocked(LastStep& l, const Tensor* out);

  bool busy() const {
    std::lock_guard<std::mutex> lock(mu);
    return pending > 0;
  }
};

}  // namespace mqa::core

#endif  // MQA_CORE_SRC_ENGINE_SESSION_H_
