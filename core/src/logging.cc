#include "mqa/core/logging.h"

#include <atomic>
#include <cstdio>
#include <memory>
#include <mutex>
#include <string>

namespace mqa::core {
namespace {

struct SinkState {
  std::mutex mu;
  std::shared_ptr<const LogSink> sink;  // null: stderr default
  std::atomic<int> min_level{static_cast<int>(LogLevel::kWarning)};
};

SinkState& State() {
  static SinkState* state = new SinkState();  // never destroyed: logging may happen during static teardown
  return *state;
}

}  // namespace

std::string_view LogLevelName(LogLevel level) {
  switch (level) {
    case LogLevel::kDebug: return "debug";
    case LogLevel::kInfo: return "info";
    case LogLevel::kWarning: return "warning";
    case LogLevel::kError: return "error";
  }
  return "info";
}

void SetLogSink(LogSink sink, LogLevel min_level) {
  SinkState& s = State();
  std::lock_guard<std::mutex> lock(s.mu);
  // The stderr default only shows warnings and errors, so tests and tools stay readable.
  s.min_level = static_cast<int>(sink ? min_level : LogLevel::kWarning);
  s.sink = sink ? std::make_shared<const LogSink>(std::move(sink)) : nullptr;
}

void Log(LogLevel level, std::string_view message) {
  SinkState& s = State();
  if (static_cast<int>(level) < s.min_level.load(std::memory_order_relaxed)) return;
  std::shared_ptr<const LogSink> sink;
  {
    std::lock_guard<std::mutex> lock(s.mu);
    sink = s.sink;
  }
  if (sink) {
    (*sink)(level, message);
    return;
  }
  std::string line = "[mqa-core " + std::string(LogLevelName(level)) + "] " + std::string(message) + "\n";
  std::fputs(line.c_str(), stderr);
}

}  // namespace mqa::core
