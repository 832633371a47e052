#include "server/request_checks.h"

#include <chrono>
#include <cstdio>

namespace mqa::server {
namespace {

// protobuf's own limits of a Duration (about 10 000 years).
constexpr int64_t kMaxDurationSeconds = 315576000000;

}  // namespace

std::string Excerpt(std::string_view text, size_t max_bytes) {
  std::string out = "\"";
  const size_t n = std::min(text.size(), max_bytes);
  for (size_t i = 0; i < n; ++i) {
    const auto c = static_cast<unsigned char>(text[i]);
    if (c >= 0x20 && c < 0x7f && c != '"' && c != '\\') {
      out += static_cast<char>(c);
    } else {
      char buf[5];
      std::snprintf(buf, sizeof(buf), "\\x%02x", c);
      out += buf;
    }
  }
  out += "\"";
  if (n < text.size()) out += "... (" + std::to_string(text.size()) + " bytes)";
  return out;
}

core::Status CheckSessionId(std::string_view id, std::string_view field) {
  bool ok = id.size() == 32;
  for (char c : id) ok = ok && ((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'));
  if (ok) return core::Status();
  return core::InvalidArgumentError(std::string(field) +
                                    ": expected a session id from CreateSession (32 lowercase hex digits), got " +
                                    (id.empty() ? std::string("nothing") : Excerpt(id, 40)));
}

core::Status CheckModelName(std::string_view name, std::string_view field) {
  if (name.empty()) return core::InvalidArgumentError(std::string(field) + ": required (a name from ListModels)");
  if (name.size() <= kMaxModelNameBytes) return core::Status();
  return core::InvalidArgumentError(std::string(field) + ": model names have at most " +
                                    std::to_string(kMaxModelNameBytes) + " bytes, got " + Excerpt(name, 32));
}

core::StatusOr<core::Clock::time_point> StepDeadline(const google::protobuf::Duration& timeout,
                                                     core::Clock::time_point stream_deadline) {
  const int64_t s = timeout.seconds();
  const int32_t ns = timeout.nanos();
  const bool valid = s >= -kMaxDurationSeconds && s <= kMaxDurationSeconds && ns > -1000000000 && ns < 1000000000 &&
                     !(s > 0 && ns < 0) && !(s < 0 && ns > 0);
  if (!valid) {
    return core::InvalidArgumentError("timeout: not a valid Duration (seconds " + std::to_string(s) + ", nanos " +
                                      std::to_string(ns) + ")");
  }
  if (s < 0 || ns < 0) return core::InvalidArgumentError("timeout: must not be negative");
  if (s == 0 && ns == 0) return stream_deadline;
  // The steady clock counts nanoseconds in 64 bits (~292 years from boot): anything beyond a century is "no
  // step timeout", which is what such a value means in practice.
  constexpr int64_t kCenturySeconds = int64_t{100} * 365 * 24 * 3600;
  if (s >= kCenturySeconds) return stream_deadline;
  const core::Clock::time_point at = core::Clock::now() + std::chrono::seconds(s) + std::chrono::nanoseconds(ns);
  return std::min(at, stream_deadline);
}

}  // namespace mqa::server
