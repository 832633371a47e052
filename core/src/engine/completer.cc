#include "engine/completer.h"

#include <pthread.h>

#include <utility>

namespace mqa::core {
namespace {

// The batch open on this thread, if any (a worker thread between the start and the end of a round).
thread_local Completer::Batch* open_batch = nullptr;

}  // namespace

Completer::Completer() : thread_([this] { Loop(); }) {}

Completer::~Completer() { Stop(); }

Completer::Batch::Batch(Completer* completer) : completer_(completer) { open_batch = this; }

Completer::Batch::~Batch() {
  open_batch = nullptr;
  if (callbacks_.empty()) return;
  // One completion and nothing ahead of it: a hand-over would only add a thread's wake-up to its latency (the
  // case of a lone session, whose next step cannot arrive before this answer), so it runs here.
  if (callbacks_.size() == 1 && completer_->idle()) {
    callbacks_.front()();
    return;
  }
  completer_->Post(std::move(callbacks_));
}

void Completer::Complete(Callback f) {
  if (open_batch != nullptr) {
    open_batch->callbacks_.push_back(std::move(f));
  } else {
    f();
  }
}

bool Completer::idle() const {
  std::lock_guard<std::mutex> lock(mu_);
  return pending_.empty() && !running_;
}

bool Completer::WaitIdleFor(std::chrono::microseconds limit) const {
  std::unique_lock<std::mutex> lock(mu_);
  return idle_cv_.wait_for(lock, limit, [this] { return pending_.empty() && !running_; });
}

void Completer::Post(std::vector<Callback> batch) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!stopping_) {
      pending_.push_back(std::move(batch));
      cv_.notify_one();
      return;
    }
  }
  for (Callback& f : batch) f();  // stopped: on the posting thread
}

void Completer::Loop() {
  pthread_setname_np(pthread_self(), "mqa-completer");
  for (;;) {
    std::vector<Callback> batch;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [this] { return stopping_ || !pending_.empty(); });
      if (pending_.empty()) return;  // stopping, and everything posted has run
      batch = std::move(pending_.front());
      pending_.pop_front();
      running_ = true;
    }
    for (Callback& f : batch) f();
    batch.clear();  // the callbacks' captures go before the batch counts as done
    std::lock_guard<std::mutex> lock(mu_);
    running_ = false;
    if (pending_.empty()) idle_cv_.notify_all();
  }
}

void Completer::Stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

}  // namespace mqa::core
