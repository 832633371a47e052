// Limits on what clients and the configuration may name, shared by the request checks and the config loader.
#ifndef MQA_SERVER_NAME_LIMITS_H_
#define MQA_SERVER_NAME_LIMITS_H_

#include <cstddef>

namespace mqa::server {

// Longest model name (bytes) a request or the configuration may use. Documented in the proto.
inline constexpr size_t kMaxModelNameBytes = 128;

}  // namespace mqa::server

#endif  // MQA_SERVER_NAME_LIMITS_H_
