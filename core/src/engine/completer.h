// A worker's completions, delivered off its thread: the callbacks a pass produces (the server writing replies,
// a benchmark submitting its next step) run on a thread of their own while the worker forms and runs the next
// pass. The worker opens a batch per round; a completion made on that thread inside the batch is appended without
// a lock, and the whole batch is handed over with one lock when the round ends (a round with a single completion
// and an idle completer runs it at once instead: there is nothing to overlap it with). Completions made anywhere else
// (a gRPC thread refusing a request, a shutdown) run at once, on the caller's thread. Callbacks run in the order
// they were produced. Private to core.
//
// Thread-safety: Complete from any thread; Batch on the worker thread; idle and WaitIdleFor from any thread but
// the completer's own; Stop from the owner.
#ifndef MQA_CORE_SRC_ENGINE_COMPLETER_H_
#define MQA_CORE_SRC_ENGINE_COMPLETER_H_

#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace mqa::core {

class Completer {
 public:
  using Callback = std::function<void()>;

  Completer();
  ~Completer();  // Stop()
  Completer(const Completer&) = delete;
  Completer& operator=(const Completer&) = delete;

  // Collects the completions of one worker round on the calling thread and posts them when it ends.
  class Batch {
   public:
    explicit Batch(Completer* completer);
    ~Batch();
    Batch(const Batch&) = delete;
    Batch& operator=(const Batch&) = delete;

   private:
    Completer* completer_;
    std::vector<Callback> callbacks_;
    friend class Completer;
  };

  // Runs f: in the calling thread's open batch, else now.
  static void Complete(Callback f);

  // Nothing posted that has not returned.
  bool idle() const;
  // Waits until idle() or for at most `limit`; returns idle(). Not from a callback (it would wait for itself).
  bool WaitIdleFor(std::chrono::microseconds limit) const;
  // Runs what was posted, then joins the thread. Idempotent; later batches run on the posting thread.
  void Stop();

 private:
  void Post(std::vector<Callback> batch);
  void Loop();

  mutable std::mutex mu_;
  std::condition_variable cv_;
  mutable std::condition_variable idle_cv_;  // notified when the last posted batch has run
  std::deque<std::vector<Callback>> pending_;
  bool running_ = false;  // a batch taken and not yet done
  bool stopping_ = false;
  std::thread thread_;
};

}  // namespace mqa::core

#endif  // MQA_CORE_SRC_ENGINE_COMPLETER_H_
