// A hosted model and its replicas (one copy per device, each with its layers and its paged KV cache). Private
// to core.
#ifndef MQA_CORE_SRC_ENGINE_REPLICA_H_
#define MQA_CORE_SRC_ENGINE_REPLICA_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "mqa/core/block_pool.h"
#include "mqa/core/engine.h"
#include "mqa/core/mqa_layer.h"
#include "paged/paged_layer.h"

namespace mqa::core {

struct Model;

// One copy of a model on one device: its layers and its paged KV cache. Every step of a session placed here runs
// on this device's worker, against this pool.
struct Replica {
  const Model* model = nullptr;
  int index = 0;  // in the engine's list of all replicas (the scheduler's pool index)
  std::string device;
  std::unique_ptr<MqaStack> stack;
  // The paged KV cache: one block pool shared by the layers, and per layer its paged execution, which owns that
  // layer's k and v [num_blocks * block_size, d] and its CUDA graphs.
  std::unique_ptr<BlockPool> pool;
  std::vector<std::unique_ptr<PagedLayer>> paged;
  int64_t block_bytes = 0;          // all layers' k and v for one block
  std::atomic<size_t> sessions{0};  // open sessions placed here (placement's tie-break)
};

struct Model {
  ModelInfo info;
  std::vector<std::unique_ptr<Replica>> replicas;  // one per device, in info.devices order
};

}  // namespace mqa::core

#endif  // MQA_CORE_SRC_ENGINE_REPLICA_H_
