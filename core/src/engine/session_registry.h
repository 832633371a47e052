// The open sessions of an engine: their ids, their idle TTLs (a reaper thread ends idle ones), and a bounded
// memory of recently ended ones so NOT_FOUND can say why. Private to core.
//
// Thread-safety: every member may be called from any thread.
#ifndef MQA_CORE_SRC_ENGINE_SESSION_REGISTRY_H_
#define MQA_CORE_SRC_ENGINE_SESSION_REGISTRY_H_

#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "engine/session.h"
#include "mqa/core/status.h"

namespace mqa::core {

class SessionRegistry {
 public:
  SessionRegistry(size_t max_sessions, std::chrono::milliseconds reap_interval);
  // Stops the reaper.
  ~SessionRegistry();
  SessionRegistry(const SessionRegistry&) = delete;
  SessionRegistry& operator=(const SessionRegistry&) = delete;

  // Starts the thread that ends sessions idle past their TTL, every reap_interval; StopReaper joins it
  // (idempotent; the destructor calls it).
  void StartReaper();
  void StopReaper();

  // 128 bits from the kernel's CSPRNG as 32 lowercase hex digits; UNAVAILABLE when the OS cannot supply them.
  static StatusOr<std::string> NewId();

  // Registers s (its id set). UNAVAILABLE after StopAccepting, RESOURCE_EXHAUSTED at max_sessions; on refusal
  // nothing is kept (dropping s returns any blocks it reserved).
  Status Add(std::shared_ptr<Session> s);
  // NOT_FOUND for unknown, closed or expired ids (the message says which, for recently ended ones).
  StatusOr<std::shared_ptr<Session>> Find(const std::string& id) const;
  // Unregisters the session (remembering it as closed); the caller releases its blocks.
  StatusOr<std::shared_ptr<Session>> Remove(const std::string& id);
  void StopAccepting();

  // Ends every session with nothing in flight whose last activity is older than its idle TTL.
  void ReapExpired();

  struct Counts {
    size_t open = 0;
    size_t active = 0;  // with steps queued or running
    size_t idle = 0;
    uint64_t created = 0;
    uint64_t closed = 0;
    uint64_t expired = 0;
  };
  Counts counts() const;

 private:
  void RememberEndedLocked(const std::string& id, std::string why);
  Status NotFoundLocked(const std::string& id) const;
  void ReapLoop();

  static constexpr size_t kEndedMemory = 16384;
  const size_t max_sessions_;
  const std::chrono::milliseconds reap_interval_;

  mutable std::mutex mu_;  // guards the fields below
  std::map<std::string, std::shared_ptr<Session>> sessions_;
  std::map<std::string, std::string> ended_;  // id -> why, oldest forgotten first
  std::deque<std::string> ended_order_;
  bool accepting_ = true;
  uint64_t created_ = 0, closed_ = 0, expired_ = 0;

  std::mutex reaper_mu_;
  std::condition_variable reaper_cv_;
  bool reaper_stop_ = false;
  std::thread reaper_;
};

// "5 s" or "250 ms".
std::string FormatMillis(std::chrono::milliseconds ms);

}  // namespace mqa::core

#endif  // MQA_CORE_SRC_ENGINE_SESSION_REGISTRY_H_
