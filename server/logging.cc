#include "logging.h"

#include <fmt/format.h>
#include <spdlog/formatter.h>
#include <spdlog/logger.h>
#include <spdlog/sinks/stdout_sinks.h>
#include <spdlog/spdlog.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <ctime>
#include <iterator>
#include <memory>
#include <utility>

#include "mqa/core/logging.h"

namespace mqa::server {
namespace {

enum class Format : int { kText = 0, kJson = 1 };

std::atomic<Format> g_format{Format::kText};

// LogEvent renders the fields itself and passes them as the payload; the formatter must know such a payload
// from a plain message (spdlog::info from anywhere), which it wraps as event=log. The source location is the
// channel: these addresses never come from a real SPDLOG_LOGGER_CALL. One marker per format, so a payload
// rendered just before SetUpLogging switched formats is treated as plain text instead of corrupting the line.
constexpr char kTextEventMarker[] = "mqa-event-text";
constexpr char kJsonEventMarker[] = "mqa-event-json";

using Buffer = spdlog::memory_buf_t;

void Append(Buffer& buf, std::string_view s) { buf.append(s.data(), s.data() + s.size()); }

void AppendHex4(Buffer& buf, unsigned c) {
  static constexpr char kHex[] = "0123456789abcdef";
  const char out[] = {'\\', 'u', '0', '0', kHex[(c >> 4) & 0xf], kHex[c & 0xf]};
  buf.append(out, out + sizeof(out));
}

bool IsControl(unsigned char c) { return c < 0x20 || c == 0x7f; }

// Keys are identifiers in both formats: nothing in them needs quoting, and a field can never pose as ts, level
// or event.
void AppendKey(Buffer& buf, std::string_view key) {
  if (key == "ts" || key == "level" || key == "event") buf.push_back('_');
  if (key.empty()) buf.push_back('_');
  for (char c : key) {
    const bool keep =
        (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '.' || c == '-';
    buf.push_back(keep ? c : '_');
  }
}

// logfmt: bare when unambiguous, else double-quoted with backslash escapes, so every line splits on spaces
// and '=' without a parser.
void AppendTextString(Buffer& buf, std::string_view s) {
  bool quote = s.empty();
  for (char c : s) {
    if (c == ' ' || c == '=' || c == '"' || c == '\\' || IsControl(static_cast<unsigned char>(c))) {
      quote = true;
      break;
    }
  }
  if (!quote) {
    Append(buf, s);
    return;
  }
  buf.push_back('"');
  for (char c : s) {
    switch (c) {
      case '"': Append(buf, "\\\""); break;
      case '\\': Append(buf, "\\\\"); break;
      case '\n': Append(buf, "\\n"); break;
      case '\r': Append(buf, "\\r"); break;
      case '\t': Append(buf, "\\t"); break;
      default:
        if (IsControl(static_cast<unsigned char>(c))) {
          AppendHex4(buf, static_cast<unsigned char>(c));
        } else {
          buf.push_back(c);
        }
    }
  }
  buf.push_back('"');
}

// Length of the valid UTF-8 sequence starting at s[i], or 0 when it is not one (overlong forms, surrogates and
// code points past U+10FFFF included), so JSON consumers never see invalid text.
size_t Utf8SequenceLength(std::string_view s, size_t i) {
  const auto byte = [&](size_t k) { return static_cast<unsigned char>(s[k]); };
  const unsigned char c = byte(i);
  size_t n = 0;
  unsigned char lo = 0x80, hi = 0xbf;  // allowed range of the second byte
  if (c >= 0xc2 && c <= 0xdf) {
    n = 2;
  } else if (c >= 0xe0 && c <= 0xef) {
    n = 3;
    if (c == 0xe0) lo = 0xa0;
    if (c == 0xed) hi = 0x9f;
  } else if (c >= 0xf0 && c <= 0xf4) {
    n = 4;
    if (c == 0xf0) lo = 0x90;
    if (c == 0xf4) hi = 0x8f;
  } else {
    return 0;
  }
  if (i + n > s.size()) return 0;
  if (byte(i + 1) < lo || byte(i + 1) > hi) return 0;
  for (size_t k = 2; k < n; ++k) {
    if (byte(i + k) < 0x80 || byte(i + k) > 0xbf) return 0;
  }
  return n;
}

void AppendJsonString(Buffer& buf, std::string_view s) {
  buf.push_back('"');
  for (size_t i = 0; i < s.size();) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    if (c >= 0x80) {
      const size_t n = Utf8SequenceLength(s, i);
      if (n == 0) {
        Append(buf, "\\ufffd");
        ++i;
      } else {
        Append(buf, s.substr(i, n));
        i += n;
      }
      continue;
    }
    switch (c) {
      case '"': Append(buf, "\\\""); break;
      case '\\': Append(buf, "\\\\"); break;
      case '\n': Append(buf, "\\n"); break;
      case '\r': Append(buf, "\\r"); break;
      case '\t': Append(buf, "\\t"); break;
      case '\b': Append(buf, "\\b"); break;
      case '\f': Append(buf, "\\f"); break;
      default:
        if (c < 0x20) {
          AppendHex4(buf, c);
        } else {
          buf.push_back(static_cast<char>(c));
        }
    }
    ++i;
  }
  buf.push_back('"');
}

void AppendValue(Buffer& buf, Format format, const LogValue& v) {
  switch (v.type()) {
    case LogValue::Type::kString:
      if (format == Format::kJson) {
        AppendJsonString(buf, v.str());
      } else {
        AppendTextString(buf, v.str());
      }
      return;
    case LogValue::Type::kInt: fmt::format_to(std::back_inserter(buf), "{}", v.int_value()); return;
    case LogValue::Type::kUint: fmt::format_to(std::back_inserter(buf), "{}", v.uint_value()); return;
    case LogValue::Type::kBool: Append(buf, v.bool_value() ? "true" : "false"); return;
    case LogValue::Type::kDouble:
      if (format == Format::kJson && !std::isfinite(v.double_value())) {
        // JSON has no literal for these; a string keeps the line parseable.
        buf.push_back('"');
        fmt::format_to(std::back_inserter(buf), "{}", v.double_value());
        buf.push_back('"');
      } else {
        fmt::format_to(std::back_inserter(buf), "{}", v.double_value());
      }
      return;
  }
}

// The part of a line after ts and level: `event=E k=v ...` or `"event":"E","k":v,...`.
void RenderFields(Buffer& buf, Format format, std::string_view event, std::initializer_list<LogField> fields) {
  if (format == Format::kJson) {
    Append(buf, "\"event\":");
    AppendJsonString(buf, event);
    for (const LogField& f : fields) {
      Append(buf, ",\"");
      AppendKey(buf, f.key);
      Append(buf, "\":");
      AppendValue(buf, format, f.value);
    }
  } else {
    Append(buf, "event=");
    AppendTextString(buf, event);
    for (const LogField& f : fields) {
      buf.push_back(' ');
      AppendKey(buf, f.key);
      buf.push_back('=');
      AppendValue(buf, format, f.value);
    }
  }
}

class EventFormatter final : public spdlog::formatter {
 public:
  explicit EventFormatter(Format format) : format_(format) {}

  void format(const spdlog::details::log_msg& msg, Buffer& dest) override {
    const bool json = format_ == Format::kJson;
    Append(dest, json ? "{\"ts\":\"" : "");
    AppendTimestamp(msg.time, dest);
    Append(dest, json ? "\",\"level\":\"" : " level=");
    const spdlog::string_view_t level = spdlog::level::to_string_view(msg.level);
    Append(dest, std::string_view(level.data(), level.size()));
    Append(dest, json ? "\"," : " ");
    const std::string_view payload(msg.payload.data(), msg.payload.size());
    const char* own_marker = json ? kJsonEventMarker : kTextEventMarker;
    if (msg.source.filename == own_marker) {
      Append(dest, payload);
    } else {
      RenderFields(dest, format_, "log", {{"msg", payload}});
    }
    Append(dest, json ? "}\n" : "\n");
  }

  std::unique_ptr<spdlog::formatter> clone() const override { return std::make_unique<EventFormatter>(format_); }

 private:
  // gmtime_r and strftime for every line would dominate a busy log; the seconds part changes once a second.
  void AppendTimestamp(spdlog::log_clock::time_point tp, Buffer& dest) {
    using std::chrono::duration_cast;
    const auto since_epoch = tp.time_since_epoch();
    auto secs = duration_cast<std::chrono::seconds>(since_epoch);
    auto millis = duration_cast<std::chrono::milliseconds>(since_epoch - secs).count();
    if (millis < 0) {  // before 1970: keep the fraction positive
      secs -= std::chrono::seconds(1);
      millis += 1000;
    }
    const std::time_t t = static_cast<std::time_t>(secs.count());
    if (t != cached_second_) {
      std::tm tm{};
      gmtime_r(&t, &tm);
      cached_len_ = std::strftime(cached_, sizeof(cached_), "%Y-%m-%dT%H:%M:%S", &tm);
      cached_second_ = t;
    }
    dest.append(cached_, cached_ + cached_len_);
    fmt::format_to(std::back_inserter(dest), ".{:03d}Z", static_cast<int>(millis));
  }

  Format format_;
  std::time_t cached_second_ = -1;
  char cached_[32] = {};
  size_t cached_len_ = 0;
};

spdlog::level::level_enum ToSpdlog(core::LogLevel level) {
  switch (level) {
    case core::LogLevel::kDebug: return spdlog::level::debug;
    case core::LogLevel::kInfo: return spdlog::level::info;
    case core::LogLevel::kWarning: return spdlog::level::warn;
    case core::LogLevel::kError: return spdlog::level::err;
  }
  return spdlog::level::info;
}

// Core's lowest level that spdlog would still write, so core skips building messages nobody sees.
core::LogLevel CoreMinLevel(spdlog::level::level_enum level) {
  switch (level) {
    case spdlog::level::trace:
    case spdlog::level::debug: return core::LogLevel::kDebug;
    case spdlog::level::info: return core::LogLevel::kInfo;
    case spdlog::level::warn: return core::LogLevel::kWarning;
    default: return core::LogLevel::kError;
  }
}

core::StatusOr<spdlog::level::level_enum> ParseLevel(const std::string& name) {
  // spdlog::level::from_str maps unknown names to "off", which would silence a typo'd configuration.
  if (name == "trace") return spdlog::level::trace;
  if (name == "debug") return spdlog::level::debug;
  if (name == "info") return spdlog::level::info;
  if (name == "warn" || name == "warning") return spdlog::level::warn;
  if (name == "error") return spdlog::level::err;
  if (name == "critical") return spdlog::level::critical;
  if (name == "off") return spdlog::level::off;
  return core::InvalidArgumentError("unknown log level '" + name +
                                    "'; expected trace, debug, info, warn, error, critical or off");
}

}  // namespace

core::Status SetUpLogging(const std::string& level, const std::string& format) {
  return SetUpLogging(level, format, std::make_shared<spdlog::sinks::stderr_sink_mt>());
}

core::Status SetUpLogging(const std::string& level, const std::string& format, spdlog::sink_ptr sink) {
  MQA_ASSIGN_OR_RETURN(const spdlog::level::level_enum lvl, ParseLevel(level));
  Format fmt_kind;
  if (format == "text") {
    fmt_kind = Format::kText;
  } else if (format == "json") {
    fmt_kind = Format::kJson;
  } else {
    return core::InvalidArgumentError("unknown log format '" + format + "'; expected text or json");
  }
  if (sink == nullptr) return core::InvalidArgumentError("SetUpLogging: sink is null");
  auto logger = std::make_shared<spdlog::logger>("mqa", std::move(sink));
  logger->set_formatter(std::make_unique<EventFormatter>(fmt_kind));
  logger->set_level(lvl);
  g_format.store(fmt_kind, std::memory_order_relaxed);
  spdlog::set_default_logger(std::move(logger));
  core::SetLogSink(
      [](core::LogLevel core_level, std::string_view message) {
        LogEvent(ToSpdlog(core_level), "core", {{"msg", message}});
      },
      CoreMinLevel(lvl));
  return core::Status::Ok();
}

bool LogEnabled(spdlog::level::level_enum level) { return spdlog::default_logger_raw()->should_log(level); }

void LogEvent(spdlog::level::level_enum level, std::string_view event, std::initializer_list<LogField> fields) {
  spdlog::logger* logger = spdlog::default_logger_raw();
  if (!logger->should_log(level)) return;
  const Format format = g_format.load(std::memory_order_relaxed);
  Buffer buf;
  RenderFields(buf, format, event, fields);
  const char* marker = format == Format::kJson ? kJsonEventMarker : kTextEventMarker;
  logger->log(spdlog::source_loc(marker, 1, nullptr), level, spdlog::string_view_t(buf.data(), buf.size()));
}

}  // namespace mqa::server
