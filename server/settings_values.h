// Parsing and checking one setting's value, wherever it came from (a flag, an environment variable, a config-file
// scalar). Every refusal is INVALID_ARGUMENT "<origin>: expected <what>, got '<text>'", origin being the flag, the
// variable or the file position and key, so that a bad value never surfaces as an exception or a bare number.
#ifndef MQA_SERVER_SETTINGS_VALUES_H_
#define MQA_SERVER_SETTINGS_VALUES_H_

#include <cstdint>
#include <string>
#include <string_view>

#include "mqa/core/status.h"

namespace mqa::server {

inline constexpr int64_t kOneYearMs = int64_t{365} * 24 * 3600 * 1000;
inline constexpr int64_t kMaxQueueDelayUs = 1000 * 1000;  // a pass never waits longer than a second to fill
inline constexpr int64_t kMaxKvBlockSize = 1024;

// 'text', quoted for a message.
std::string Quoted(std::string_view text);

// What an integer in [min, max] is, for messages and the docs: ">= 1", "between 1 and 1024", "between 0 and
// 31536000000 (one year)"; with a unit, "(milliseconds) " goes first.
std::string IntegerExpectation(int64_t min, int64_t max, std::string_view unit = "");

// Strict decimal in [min, max]: no '+', no spaces, no exponent, no unit suffix, so "10ms", "5 " or "1e99" fail
// loudly instead of half-parsing; out of int64's range is refused like out of [min, max].
core::StatusOr<int64_t> ParseInteger(std::string_view text, int64_t min, int64_t max, const std::string& origin,
                                     std::string_view unit = "");
// Strict decimal in [0, UINT64_MAX].
core::StatusOr<uint64_t> ParseUnsigned(std::string_view text, const std::string& origin);
// A finite number ("inf" and "nan" are refused: no setting means anything sensible with them).
core::StatusOr<double> ParseNumber(std::string_view text, const std::string& origin);

// host:port (IPv6 hosts in brackets, port 0..65535), or unix:PATH. Checked here so that a typo fails at start-up
// with its source named, not deep inside gRPC's bind.
bool ValidListenAddress(std::string_view address);

}  // namespace mqa::server

#endif  // MQA_SERVER_SETTINGS_VALUES_H_
