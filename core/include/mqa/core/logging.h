// Logging hook: core reports events through a sink that the embedding program installs (the server routes it
// into spdlog), so core never includes a logging library. Without a sink, warnings and errors go to stderr.
//
// Thread-safety: SetLogSink may be called at any time; the sink itself must be callable from any thread
// (core logs from gRPC and engine threads alike).
#ifndef MQA_CORE_LOGGING_H_
#define MQA_CORE_LOGGING_H_

#include <functional>
#include <string_view>

namespace mqa::core {

enum class LogLevel : int { kDebug = 0, kInfo = 1, kWarning = 2, kError = 3 };

std::string_view LogLevelName(LogLevel level);

// message is one line without a trailing newline; the string is only valid during the call.
using LogSink = std::function<void(LogLevel level, std::string_view message)>;

// Installs sink (an empty function restores the stderr default). Messages below min_level are dropped
// before formatting reaches the sink.
void SetLogSink(LogSink sink, LogLevel min_level = LogLevel::kInfo);

// Emits one message through the installed sink.
void Log(LogLevel level, std::string_view message);

}  // namespace mqa::core

#endif  // MQA_CORE_LOGGING_H_
