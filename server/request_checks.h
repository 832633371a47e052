// Checks of the strings and durations a client sends, before anything else reads them. Every client string that
// can end up in a status message or a log line is bounded here, so a client can neither make a reply's trailers
// overflow nor fill the log.
#ifndef MQA_SERVER_REQUEST_CHECKS_H_
#define MQA_SERVER_REQUEST_CHECKS_H_

#include <google/protobuf/duration.pb.h>

#include <cstddef>
#include <string>
#include <string_view>

#include "mqa/core/engine.h"
#include "mqa/core/status.h"
#include "server/name_limits.h"

namespace mqa::server {

// INVALID_ARGUMENT unless id is a session id as CreateSession makes them: 32 lowercase hex digits. field names
// the request field ("session_id").
core::Status CheckSessionId(std::string_view id, std::string_view field = "session_id");
// INVALID_ARGUMENT when name is empty or longer than kMaxModelNameBytes.
core::Status CheckModelName(std::string_view name, std::string_view field = "model");

// The deadline of a streamed step: the earlier of stream_deadline and now + timeout. A zero timeout means none
// (stream_deadline); one too far ahead for the steady clock (past ~100 years) is clamped, never overflowed.
// INVALID_ARGUMENT for a negative or malformed Duration.
core::StatusOr<core::Clock::time_point> StepDeadline(const google::protobuf::Duration& timeout,
                                                     core::Clock::time_point stream_deadline);

// At most max_bytes of text, with anything unprintable escaped, quoted, and a note of the length when cut: for
// echoing client strings in messages and logs.
std::string Excerpt(std::string_view text, size_t max_bytes = 64);

}  // namespace mqa::server

#endif  // MQA_SERVER_REQUEST_CHECKS_H_
