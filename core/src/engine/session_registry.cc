#include "engine/session_registry.h"

#include <sys/random.h>

#include <cerrno>
#include <utility>
#include <vector>

#include "engine/replica.h"
#include "mqa/core/logging.h"

namespace mqa::core {

std::string FormatMillis(std::chrono::milliseconds ms) {
  if (ms.count() % 1000 == 0) return std::to_string(ms.count() / 1000) + " s";
  return std::to_string(ms.count()) + " ms";
}

SessionRegistry::SessionRegistry(size_t max_sessions, std::chrono::milliseconds reap_interval)
    : max_sessions_(max_sessions), reap_interval_(reap_interval) {}

SessionRegistry::~SessionRegistry() { StopReaper(); }

void SessionRegistry::StopReaper() {
  {
    std::lock_guard<std::mutex> lock(reaper_mu_);
    reaper_stop_ = true;
  }
  reaper_cv_.notify_all();
  if (reaper_.joinable()) reaper_.join();
}

void SessionRegistry::StartReaper() {
  reaper_ = std::thread([this] { ReapLoop(); });
}

// getrandom() only fails here if the kernel lacks it (pre-3.17) or the pool is not initialised yet at boot;
// both are worth refusing the session for rather than falling back to a guessable generator.
StatusOr<std::string> SessionRegistry::NewId() {
  unsigned char bytes[16];
  size_t got = 0;
  while (got < sizeof(bytes)) {
    ssize_t n = getrandom(bytes + got, sizeof(bytes) - got, 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      return UnavailableError("cannot draw a session id from the OS random source (getrandom failed)");
    }
    got += static_cast<size_t>(n);
  }
  static const char kHex[] = "0123456789abcdef";
  std::string id(32, '0');
  for (size_t i = 0; i < sizeof(bytes); ++i) {
    id[2 * i] = kHex[bytes[i] >> 4];
    id[2 * i + 1] = kHex[bytes[i] & 0xf];
  }
  return id;
}

Status SessionRegistry::Add(std::shared_ptr<Session> s) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!accepting_) return UnavailableError("the server is draining and accepts no new sessions");
  if (sessions_.size() >= max_sessions_) {
    return ResourceExhaustedError("the server holds its maximum of " + std::to_string(max_sessions_) +
                                  " sessions; close one or retry later");
  }
  s->replica->sessions.fetch_add(1, std::memory_order_relaxed);
  ++created_;
  const std::string id = s->id;
  sessions_[id] = std::move(s);
  return Status();
}

StatusOr<std::shared_ptr<Session>> SessionRegistry::Find(const std::string& id) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = sessions_.find(id);
  if (it == sessions_.end()) return NotFoundLocked(id);
  return it->second;
}

StatusOr<std::shared_ptr<Session>> SessionRegistry::Remove(const std::string& id) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = sessions_.find(id);
  if (it == sessions_.end()) return NotFoundLocked(id);
  std::shared_ptr<Session> s = std::move(it->second);
  sessions_.erase(it);
  s->replica->sessions.fetch_sub(1, std::memory_order_relaxed);
  RememberEndedLocked(id, "was closed");
  ++closed_;
  return s;
}

void SessionRegistry::StopAccepting() {
  std::lock_guard<std::mutex> lock(mu_);
  accepting_ = false;
}

void SessionRegistry::RememberEndedLocked(const std::string& id, std::string why) {
  ended_[id] = std::move(why);
  ended_order_.push_back(id);
  if (ended_order_.size() > kEndedMemory) {
    ended_.erase(ended_order_.front());
    ended_order_.pop_front();
  }
}

Status SessionRegistry::NotFoundLocked(const std::string& id) const {
  auto it = ended_.find(id);
  if (it != ended_.end()) return NotFoundError("session " + id + " " + it->second);
  return NotFoundError("session " + id + " does not exist (never created, or ended long ago)");
}

void SessionRegistry::ReapLoop() {
  std::unique_lock<std::mutex> lock(reaper_mu_);
  while (!reaper_cv_.wait_for(lock, reap_interval_, [this] { return reaper_stop_; })) ReapExpired();
}

void SessionRegistry::ReapExpired() {
  const auto now = Clock::now();
  std::vector<std::shared_ptr<Session>> expired;  // released outside the lock
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = sessions_.begin(); it != sessions_.end();) {
      Session& s = *it->second;
      bool idle;
      {
        std::lock_guard<std::mutex> slock(s.mu);
        idle = s.pending == 0 && now - s.last_active >= s.idle_ttl;
        if (idle) {
          s.closed = true;
          s.ReleaseBlocksIfIdleLocked();
        }
      }
      if (!idle) {
        ++it;
        continue;
      }
      RememberEndedLocked(s.id, "expired after " + FormatMillis(s.idle_ttl) + " idle (its idle TTL)");
      ++expired_;
      s.replica->sessions.fetch_sub(1, std::memory_order_relaxed);
      expired.push_back(std::move(it->second));
      it = sessions_.erase(it);
    }
  }
  for (auto& s : expired) {
    Log(LogLevel::kInfo, "session " + s->id + " expired after " + FormatMillis(s->idle_ttl) + " idle");
  }
}

SessionRegistry::Counts SessionRegistry::counts() const {
  std::lock_guard<std::mutex> lock(mu_);
  Counts c;
  c.open = sessions_.size();
  for (const auto& [id, session] : sessions_) {
    if (session->busy()) {
      ++c.active;
    } else {
      ++c.idle;
    }
  }
  c.created = created_;
  c.closed = closed_;
  c.expired = expired_;
  return c;
}

}  // namespace mqa::core
