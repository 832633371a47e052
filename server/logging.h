// Structured logging for the server: spdlog underneath, one line per event, to stderr.
//
// Every line is an event with a name and key/value fields, in one of two formats:
//   text: 2026-11-27T21:00:00.123Z level=info event=session_created session=3fa2... model="my model"
//         (logfmt: values with spaces, '=', quotes, backslashes or control characters are double-quoted with
//         \" \\ \n \r \t and \u00XX escapes; an empty value is "")
//   json: {"ts":"2026-11-27T21:00:00.123Z","level":"info","event":"session_created","session":"3fa2...",...}
//         (integers and finite doubles are JSON numbers, bools are true/false, non-finite doubles are strings;
//         invalid UTF-8 becomes U+FFFD)
// Timestamps are UTC with milliseconds. Level names are spdlog's: trace, debug, info, warning, error,
// critical. Keys keep [A-Za-z0-9_.-] (anything else becomes '_'); the reserved keys ts, level and event are
// written as _ts, _level and _event. Anything logged through spdlog directly (spdlog::info("...")) comes out
// as event=log with the text in msg; messages from core (mqa::core::Log) as event=core with the text in msg.
//
// Thread-safety: LogEvent may be called from any thread. SetUpLogging replaces the default logger and core's
// sink; call it at start-up, before other threads log.
#ifndef MQA_SERVER_LOGGING_H_
#define MQA_SERVER_LOGGING_H_

#include <spdlog/common.h>

#include <cstdint>
#include <initializer_list>
#include <string>
#include <string_view>
#include <type_traits>

#include "mqa/core/status.h"

namespace mqa::server {

// A field's value. Strings are held as views (the caller's string must outlive the LogEvent call, which a
// temporary in the call's argument list does); numbers are formatted only when the line is written.
class LogValue {
 public:
  enum class Type { kString, kInt, kUint, kDouble, kBool };

  LogValue(std::string_view s) : type_(Type::kString), str_(s) {}      // NOLINT(runtime/explicit)
  LogValue(const std::string& s) : type_(Type::kString), str_(s) {}    // NOLINT(runtime/explicit)
  LogValue(const char* s) : type_(Type::kString), str_(s ? s : "") {}  // NOLINT(runtime/explicit)
  LogValue(bool b) : type_(Type::kBool), b_(b) {}                      // NOLINT(runtime/explicit)
  LogValue(double d) : type_(Type::kDouble), d_(d) {}                  // NOLINT(runtime/explicit)
  LogValue(float f) : type_(Type::kDouble), d_(f) {}                   // NOLINT(runtime/explicit)
  template <typename T, std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, bool>, int> = 0>
  LogValue(T v) {  // NOLINT(runtime/explicit)
    if constexpr (std::is_signed_v<T>) {
      type_ = Type::kInt;
      i_ = static_cast<int64_t>(v);
    } else {
      type_ = Type::kUint;
      u_ = static_cast<uint64_t>(v);
    }
  }

  Type type() const { return type_; }
  std::string_view str() const { return str_; }
  int64_t int_value() const { return i_; }
  uint64_t uint_value() const { return u_; }
  double double_value() const { return d_; }
  bool bool_value() const { return b_; }

 private:
  Type type_ = Type::kString;
  std::string_view str_;
  union {
    int64_t i_ = 0;
    uint64_t u_;
    double d_;
    bool b_;
  };
};

struct LogField {
  std::string_view key;
  LogValue value;
};

// Installs a default spdlog logger writing to stderr in `format` ("text" or "json") at `level` (trace, debug,
// info, warn or warning, error, critical, off), and routes core's log hook into it (core messages below the
// level are dropped inside core, before they are formatted). INVALID_ARGUMENT for an unknown level or format;
// nothing changes then.
core::Status SetUpLogging(const std::string& level, const std::string& format);
// The same with another sink (tests; several outputs). The sink's formatter is replaced.
core::Status SetUpLogging(const std::string& level, const std::string& format, spdlog::sink_ptr sink);

// Whether an event at `level` would be written: lets callers skip computing expensive fields.
bool LogEnabled(spdlog::level::level_enum level);

// Writes one event. Nothing is formatted when the level is disabled.
//   LogEvent(spdlog::level::info, "session_created", {{"session", id}, {"max_tokens", 4096}});
void LogEvent(spdlog::level::level_enum level, std::string_view event, std::initializer_list<LogField> fields = {});

inline void LogDebug(std::string_view event, std::initializer_list<LogField> fields = {}) {
  LogEvent(spdlog::level::debug, event, fields);
}
inline void LogInfo(std::string_view event, std::initializer_list<LogField> fields = {}) {
  LogEvent(spdlog::level::info, event, fields);
}
inline void LogWarn(std::string_view event, std::initializer_list<LogField> fields = {}) {
  LogEvent(spdlog::level::warn, event, fields);
}
inline void LogError(std::string_view event, std::initializer_list<LogField> fields = {}) {
  LogEvent(spdlog::level::err, event, fields);
}

}  // namespace mqa::server

#endif  // MQA_SERVER_LOGGING_H_
