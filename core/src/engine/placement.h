// Where a new session goes: a pure ranking of a model's replicas. Private to core (torch-free).
#ifndef MQA_CORE_SRC_ENGINE_PLACEMENT_H_
#define MQA_CORE_SRC_ENGINE_PLACEMENT_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace mqa::core {

// One candidate per replica of the model: its free KV blocks, its open sessions and its device's ordinal
// (DeviceOrdinal).
struct ReplicaLoad {
  int64_t free_blocks = 0;
  size_t sessions = 0;
  int device_ordinal = 0;
};

// The candidates' indices, best first: most free blocks, then fewest sessions, then lowest ordinal, then lowest
// index. CreateSession takes the first; a guaranteed session whose reservation the first cannot satisfy tries
// the next ones in this order.
std::vector<size_t> RankReplicas(const std::vector<ReplicaLoad>& replicas);

// "cpu" -> -1, "cuda:N" -> N ("cuda" -> 0); anything else -> INT_MAX (last).
int DeviceOrdinal(const std::string& device);

}  // namespace mqa::core

#endif  // MQA_CORE_SRC_ENGINE_PLACEMENT_H_
