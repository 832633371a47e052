#include "settings_values.h"

#include <algorithm>
#include <cctype>
#include <charconv>
#include <climits>
#include <cmath>
#include <system_error>

namespace mqa::server {

using core::InvalidArgumentError;

std::string Quoted(std::string_view text) { return "'" + std::string(text) + "'"; }

std::string IntegerExpectation(int64_t min, int64_t max, std::string_view unit) {
  std::string what = unit.empty() ? "" : "(" + std::string(unit) + ") ";
  if (max == INT64_MAX) return what + ">= " + std::to_string(min);
  what += "between " + std::to_string(min) + " and " + std::to_string(max);
  if (max == kOneYearMs) what += " (one year)";
  if (max == kMaxQueueDelayUs) what += " (one second)";
  return what;
}

core::StatusOr<int64_t> ParseInteger(std::string_view text, int64_t min, int64_t max, const std::string& origin,
                                     std::string_view unit) {
  int64_t v = 0;
  const char* end = text.data() + text.size();
  const auto [ptr, ec] = std::from_chars(text.data(), end, v);
  if (text.empty() || ptr != end || ec != std::errc() || v < min || v > max) {
    return InvalidArgumentError(origin + ": expected an integer " + IntegerExpectation(min, max, unit) + ", got " +
                                Quoted(text));
  }
  return v;
}

core::StatusOr<uint64_t> ParseUnsigned(std::string_view text, const std::string& origin) {
  uint64_t v = 0;
  const char* end = text.data() + text.size();
  const auto [ptr, ec] = std::from_chars(text.data(), end, v);
  if (text.empty() || ptr != end || ec != std::errc()) {
    return InvalidArgumentError(origin + ": expected an integer between 0 and " + std::to_string(UINT64_MAX) +
                                ", got " + Quoted(text));
  }
  return v;
}

core::StatusOr<double> ParseNumber(std::string_view text, const std::string& origin) {
  double v = 0;
  const char* end = text.data() + text.size();
  const auto [ptr, ec] = std::from_chars(text.data(), end, v);
  if (text.empty() || ptr != end || ec != std::errc() || !std::isfinite(v)) {
    return InvalidArgumentError(origin + ": expected a finite number, got " + Quoted(text));
  }
  return v;
}

bool ValidListenAddress(std::string_view a) {
  if (a.rfind("unix:", 0) == 0) return a.size() > 5;
  for (char c : a) {
    if (std::isspace(static_cast<unsigned char>(c)) || std::iscntrl(static_cast<unsigned char>(c))) return false;
  }
  const size_t colon = a.rfind(':');
  if (colon == std::string_view::npos || colon == 0) return false;
  const std::string_view host = a.substr(0, colon);
  const std::string_view port = a.substr(colon + 1);
  if (host.front() == '[') {
    if (host.size() < 3 || host.back() != ']') return false;
  } else if (host.find(':') != std::string_view::npos) {
    return false;
  }
  int number = 0;
  const auto [ptr, ec] = std::from_chars(port.data(), port.data() + port.size(), number);
  // Digits only (from_chars takes a leading '-'), at most five of them, no more than the largest port.
  const bool digits = !port.empty() && port.size() <= 5 &&
                      std::all_of(port.begin(), port.end(), [](char c) { return c >= '0' && c <= '9'; });
  return digits && ec == std::errc() && ptr == port.data() + port.size() && number <= 65535;
}

}  // namespace mqa::server
