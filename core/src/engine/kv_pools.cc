#include "engine/kv_pools.h"

#include <algorithm>
#include <limits>

#include "mqa/core/device.h"
#include "mqa/core/logging.h"
#include "tensor_impl.h"

#ifdef MQA_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>
#endif

namespace mqa::core {
namespace {

// Bytes the KV cache of one device may take: the explicit budget, else a fraction of the device memory still
// free after the weights were loaded (CUDA), else the CPU default.
StatusOr<int64_t> DeviceKvBudget(const KvCacheOptions& kv, const std::string& device) {
  if (kv.budget_bytes > 0) return kv.budget_bytes;
  if (device.rfind("cuda", 0) != 0) return kv.cpu_budget_bytes;
#ifdef MQA_WITH_CUDA
  MQA_ASSIGN_OR_RETURN(at::Device dev, ParseDevice(device));
  c10::cuda::CUDAGuard guard(dev.index());
  size_t free_bytes = 0, total_bytes = 0;
  if (cudaMemGetInfo(&free_bytes, &total_bytes) != cudaSuccess) {
    return UnavailableError("cannot read the free memory of " + device);
  }
  return static_cast<int64_t>(kv.gpu_memory_fraction * static_cast<double>(free_bytes));
#else
  return UnavailableError(device + " is not available in this build");
#endif
}

}  // namespace

Status SizeKvPools(const EngineOptions& options, std::map<std::string, std::unique_ptr<Model>>& models) {
  const KvCacheOptions& kv = options.kv_cache;
  if (kv.block_size < 1)
    return InvalidArgumentError("kv_cache.block_size must be >= 1, got " + std::to_string(kv.block_size));
  if (kv.gpu_memory_fraction <= 0 || kv.gpu_memory_fraction > 1) {
    return InvalidArgumentError("kv_cache.gpu_memory_fraction must be in (0, 1], got " +
                                std::to_string(kv.gpu_memory_fraction));
  }
  std::map<std::string, int> per_device;
  for (const auto& [name, m] : models) {
    for (const auto& r : m->replicas) ++per_device[r->device];
  }
  std::map<std::string, int64_t> budgets;
  for (const auto& [device, n] : per_device) {
    MQA_ASSIGN_OR_RETURN(budgets[device], DeviceKvBudget(kv, device));
  }
  for (auto& [name, m] : models) {
    for (auto& r : m->replicas) {
      const int64_t share = budgets[r->device] / per_device[r->device];
      const MqaOptions& o = m->info.options;
      const int64_t d = o.head_dim();
      r->block_bytes =
          static_cast<int64_t>(m->info.num_layers) * 2 * kv.block_size * d * static_cast<int64_t>(DTypeSize(o.dtype));
      const int64_t blocks = std::min<int64_t>(share / r->block_bytes, std::numeric_limits<int32_t>::max());
      const int64_t need = BlockPool::BlocksFor(m->info.max_tokens_per_session, kv.block_size);
      if (blocks - 1 < need) {
        return ResourceExhaustedError(
            "model \"" + name + "\": its KV cache share of " + std::to_string(share) + " bytes on " + r->device +
            " holds " + std::to_string(std::max<int64_t>(blocks - 1, 0)) + " blocks of " +
            std::to_string(kv.block_size) + " tokens (" + std::to_string(r->block_bytes) +
            " bytes each), fewer than the " + std::to_string(need) + " one session of max_tokens_per_session " +
            std::to_string(m->info.max_tokens_per_session) + " needs; raise the KV cache budget or lower max_tokens");
      }
      r->pool = std::make_unique<BlockPool>(static_cast<int32_t>(blocks), kv.block_size);
      Status st;
      for (int i = 0; i < m->info.num_layers && st.ok(); ++i) {
        auto paged = PagedLayer::Create(r->stack->layer(i), blocks * kv.block_size, kv.block_size);
        if (paged.ok()) {
          r->paged.push_back(std::move(paged).value());
        } else {
          st = paged.status();
        }
      }
      if (!st.ok()) return Status(st.code(), "model \"" + name + "\" on " + r->device + ": " + st.message());
      Log(LogLevel::kInfo, "KV cache of model " + name + " on " + r->device + ": " + std::to_string(blocks - 1) +
                               " blocks of " + std::to_string(kv.block_size) + " tokens (" +
                               std::to_string((blocks - 1) * kv.block_size) + " tokens, " +
                               std::to_string(blocks * r->block_bytes >> 20) + " MiB)");
    }
  }
  return Status();
}

StatusOr<std::vector<std::string>> ReplicaDevices(const ModelConfig& mc) {
  const std::string where = "model \"" + mc.name + "\": ";
  std::vector<std::string> devices;
  std::vector<std::string> spelled;  // as given, for the message
  for (const std::string& d : mc.devices.empty() ? std::vector<std::string>{mc.options.device} : mc.devices) {
    const std::string device = NormaliseDevice(d);
    const auto seen = std::find(devices.begin(), devices.end(), device);
    if (seen != devices.end()) {
      const std::string& first = spelled[static_cast<size_t>(seen - devices.begin())];
      const bool aliased = first != device || d != device;
      return InvalidArgumentError(where + "device " + device + " is listed twice" +
                                  (aliased ? " (\"cuda\" means \"cuda:0\")" : std::string()) +
                                  "; a model has at most one replica per device (two on one device would only "
                                  "split its KV cache and its batches)");
    }
    devices.push_back(device);
    spelled.push_back(d);
  }
  return devices;
}

}  // namespace mqa::core
