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

StatusOr<Tensor> LastStep::KeptAnswer() const {
  return Tensor::FromBytes(out_dtype, out_shape, out_bytes.data(), out_bytes.size());
}

void Session::KeepAnswerLocked(LastStep& l, const Tensor* out) {
  if (l.kept) replay_bytes->fetch_sub(static_cast<int64_t>(l.out_bytes.size()));
  l.kept = false;
  auto release = [&l] {
    l.out_bytes = std::vector<uint8_t>();
    l.out_shape.clear();
  };
  // A closed session's answers are let go (ReleaseBlocksIfIdleLocked, again when its last step finishes); one
  // finishing after the close is not kept at all, so nobody's budget holds it even for a moment.
  if (out == nullptr || closed) return release();
  const auto n = static_cast<int64_t>(out->nbytes());
  int64_t used = replay_bytes->load();
  bool fits = false;
  while (!fits && used + n <= replay_budget) fits = replay_bytes->compare_exchange_weak(used, used + n);
  if (!fits) return release();
  // The budget counts the bytes an answer needs; a buffer left larger by a longer step is shrunk to it.
  if (l.out_bytes.capacity() > static_cast<size_t>(n)) l.out_bytes = std::vector<uint8_t>();
  l.out_bytes.resize(static_cast<size_t>(n));
  if (!out->CopyBytesTo(l.out_bytes.data(), l.out_bytes.size()).ok()) {
    replay_bytes->fetch_sub(n);
    return release();
  }
  l.out_dtype = out->dtype();
  l.out_shape = out->shape();
  l.kept = true;
}

}  // namespace mqa::core
