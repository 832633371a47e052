// Sizing and allocating the paged KV caches of every replica. Private to core.
#ifndef MQA_CORE_SRC_ENGINE_KV_POOLS_H_
#define MQA_CORE_SRC_ENGINE_KV_POOLS_H_

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "engine/replica.h"
#include "mqa/core/engine.h"
#include "mqa/core/status.h"

namespace mqa::core {

// Gives every replica a block pool and per-layer k/v storage, splitting each device's budget evenly among the
// replicas on it (of all models). Every device's budget is read before anything is allocated, so replicas on one
// GPU share the memory that was free after all weights were loaded. Refuses (with the numbers) a share that
// cannot hold one session of the model's longest length.
Status SizeKvPools(const EngineOptions& options, std::map<std::string, std::unique_ptr<Model>>& models);

// The model's devices, normalised ("cuda" -> "cuda:0"), in the configured order; a device named twice is refused.
StatusOr<std::vector<std::string>> ReplicaDevices(const ModelConfig& mc);

}  // namespace mqa::core

#endif  // MQA_CORE_SRC_ENGINE_KV_POOLS_H_
