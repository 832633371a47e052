#include "engine/session.h"

#include <utility>

#include "engine/replica.h"

namespace mqa::core {

SessionInfo Session::Info() const {
  std::lock_guard<std::mutex> lock(mu);
  SessionInfo s;
  s.id = id;
  s.model = model->info.name;
  s.max_tokens = max_tokens;
  s.layer_positions = positions;
  s.idle_ttl = idle_ttl;
  s.create_time = create_time;
  s.expire_time = last_active_wall + idle_ttl;
  s.causal = causal;
  s.position_bias = position_bias;
  s.admission = admission;
  s.cache_bytes = cache_bytes;
  s.device = replica->device;
  return s;
}

void Session::ReleaseBlocksIfIdleLocked() {
  if (closed && pending == 0 && table) {
    table->Release();
    cache_bytes = 0;
  }
  if (closed) {
    for (LastStep& l : last) KeepAnswerLocked(l, nullptr);
  }
}

void Session::KeepAnswerLocked(LastStep& l, const Tensor* out) {
  if (l.out) replay_bytes->fetch_sub(static_cast<int64_t>(l.out->nbytes()));
  l.out.reset();
  // A closed session's answers are let go (ReleaseBlocksIfIdleLocked, again when its last step finishes); one
  // finishing after the close is not kept at all, so nobody's budget holds it even for a moment.
  if (out == nullptr || closed) return;
  const auto n = static_cast<int64_t>(out->nbytes());
  int64_t used = replay_bytes->load();
  while (used + n <= replay_budget) {
    if (replay_bytes->compare_exchange_weak(used, used + n)) {
      l.out = *out;
      return;
    }
  }
}

}  // namespace mqa::core
