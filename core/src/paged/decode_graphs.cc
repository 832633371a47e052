#include "paged/decode_graphs.h"

#include <ATen/core/CachingHostAllocator.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <atomic>
#include <map>
#include <mutex>
#include <string>
#include <tuple>

#include "mqa/core/logging.h"
#include "paged/launch.h"

namespace mqa::core {
namespace {

constexpr int64_t kMaxGraphBatch = 256;

// Static buffers of the captured decode passes of one shape (device, batch bucket, table width, block size,
// layer shape and dtype). Every layer's graph of that shape reads and writes these: safe, because one worker
// thread replays them one at a time, in order, on its stream, and each result is copied out before the next.
struct GraphIo {
  at::Tensor x, out;                 // [bucket, dim]
  at::Tensor staging, staging_host;  // bytes: the slots, then the metadata; the host copy is pinned
  at::Tensor slots;                  // [bucket] int64 slot of each new token, -1 for padding (view of staging)
  at::Tensor meta;                   // FillDecodeMeta's layout (view of staging)
  at::Tensor slopes;                 // [H] float32
  at::Tensor workspace;              // float32, for `splits` > 1
  int splits = 1;
  at::cuda::CUDAEvent staged;  // recorded after the copy out of the pinned buffer
};

GraphIo& GraphIoFor(const LayerParams& p, at::Device dev, int64_t bucket, int64_t nb, int32_t block_size) {
  using Key = std::tuple<int, int64_t, int64_t, int32_t, int64_t, int64_t, int>;
  // Never destroyed: their tensors and events would otherwise be freed after CUDA shuts down at exit.
  static std::mutex& mu = *new std::mutex;
  static auto& ios = *new std::map<Key, std::unique_ptr<GraphIo>>;
  const int64_t dim = p.opt.dim, H = p.opt.heads, d = p.opt.head_dim();
  const Key key{dev.index(), bucket, nb, block_size, dim, H, static_cast<int>(p.dtype)};
  std::lock_guard<std::mutex> lock(mu);
  std::unique_ptr<GraphIo>& io = ios[key];
  if (!io) {
    auto fresh = std::make_unique<GraphIo>();
    const auto o = at::TensorOptions().device(dev);
    fresh->x = at::zeros({bucket, dim}, o.dtype(p.dtype));
    fresh->out = at::zeros({bucket, dim}, o.dtype(p.dtype));
    const int64_t slot_bytes = bucket * 8, meta_bytes = (bucket * nb + 2 * bucket) * 4;
    fresh->staging = at::zeros({slot_bytes + meta_bytes}, o.dtype(at::kByte));
    fresh->staging_host = at::zeros({slot_bytes + meta_bytes}, at::TensorOptions().dtype(at::kByte)).pin_memory();
    fresh->slots = fresh->staging.narrow(0, 0, slot_bytes).view(at::kLong);
    fresh->meta = fresh->staging.narrow(0, slot_bytes, meta_bytes).view(at::kInt);
    fresh->slopes = at::tensor(AlibiSlopes(H), at::TensorOptions().dtype(at::kFloat)).to(dev);
    fresh->splits =
        cuda::PagedDecodeSplits(static_cast<int>(bucket), static_cast<int>(nb * block_size), static_cast<int>(H),
                                static_cast<int>(d), at::cuda::getDeviceProperties(dev.index())->multiProcessorCount);
    if (fresh->splits > 1) {
      const size_t bytes = cuda::PagedDecodeWorkspaceBytes(static_cast<int>(bucket), static_cast<int>(H),
                                                           static_cast<int>(d), fresh->splits);
      fresh->workspace = at::empty({static_cast<int64_t>(bytes / sizeof(float))}, o.dtype(at::kFloat));
    }
    io = std::move(fresh);
  }
  return *io;
}

// One memory pool per device for the temporaries of every captured graph: replays never overlap (one worker
// thread, one stream), so they can share it. The process holds a reference of its own on the pool in both of
// LibTorch's allocators (device and pinned host memory, which key their pools by the same id): each counts a
// pool's users and refuses (an internal assert) a capture into a pool whose count fell to 0, which happened as
// soon as every graph on it was destroyed (an engine closed) and a later layer captured into it again.
at::cuda::MempoolId_t GraphPool(int device) {
  static std::mutex& mu = *new std::mutex;
  static auto& pools = *new std::map<int, at::cuda::MempoolId_t>;
  std::lock_guard<std::mutex> lock(mu);
  auto it = pools.find(device);
  if (it == pools.end()) {
    const at::cuda::MempoolId_t id = at::cuda::graph_pool_handle();
    c10::cuda::CUDACachingAllocator::createOrIncrefPool(static_cast<c10::DeviceIndex>(device), id);
    // The host allocator's only way to take a reference: begin routing to the pool (nothing matches the filter),
    // then stop; the count stays.
    at::HostAllocator* host = at::getHostAllocator(at::kCUDA);
    host->begin_allocate_to_pool(id, [](c10::Stream) { return false; });
    host->end_allocate_to_pool(id);
    it = pools.emplace(device, id).first;
  }
  return it->second;
}

class CudaDecodeGraphs : public DecodeGraphs {
 public:
  bool Eligible(const std::vector<PagedSeq>& seqs) const override {
    if (failures() > 0 || seqs.empty() || static_cast<int64_t>(seqs.size()) > kMaxGraphBatch) return false;
    for (size_t i = 0; i < seqs.size(); ++i) {
      if (seqs[i].tokens != 1 || seqs[i].row != static_cast<int64_t>(i)) return false;
    }
    return at::cuda::getCurrentCUDAStream() != at::cuda::getDefaultCUDAStream();
  }

  std::optional<at::Tensor> Decode(const LayerParams& p, const at::Tensor& x, const std::vector<PagedSeq>& seqs,
                                   int32_t block_size, const at::Tensor& k_cache, const at::Tensor& v_cache) override {
    try {
      return Run(p, x, seqs, block_size, k_cache, v_cache);
    } catch (const std::exception& e) {
      failures_.fetch_add(1, std::memory_order_relaxed);  // eager from now on (Eligible)
      std::string msg = e.what();
      if (auto nl = msg.find('\n'); nl != std::string::npos) msg.resize(nl);
      Log(LogLevel::kWarning,
          "CUDA graph capture failed; this layer runs its decode passes eagerly from now on: " + msg);
      return std::nullopt;
    }
  }

  uint64_t captures() const override { return captures_.load(std::memory_order_relaxed); }
  uint64_t replays() const override { return replays_.load(std::memory_order_relaxed); }
  uint64_t failures() const override { return failures_.load(std::memory_order_relaxed); }

 private:
  at::Tensor Run(const LayerParams& p, const at::Tensor& x, const std::vector<PagedSeq>& seqs, int32_t block_size,
                 const at::Tensor& k_cache, const at::Tensor& v_cache) {
    const int64_t B = static_cast<int64_t>(seqs.size()), H = p.opt.heads, d = p.opt.head_dim();
    int64_t bucket = 1, len_max = 0;
    while (bucket < B) bucket *= 2;
    std::vector<const PagedSeq*> decode;
    for (const PagedSeq& s : seqs) {
      decode.push_back(&s);
      len_max = std::max(len_max, s.past + 1);
    }
    int64_t nb = 16;
    while (nb * block_size < len_max) nb *= 2;
    GraphIo& io = GraphIoFor(p, x.device(), bucket, nb, block_size);
    const c10::cuda::CUDAStream stream = at::cuda::getCurrentCUDAStream();
    io.staged.synchronize();  // the previous pass's copy out of the pinned buffer is done
    // Raw copies rather than tensor operations: at one session a pass is a few tens of microseconds of GPU time,
    // so the host's per-operator dispatch matters.
    uint8_t* host = io.staging_host.data_ptr<uint8_t>();
    int64_t* slots = reinterpret_cast<int64_t*>(host);
    for (int64_t b = 0; b < bucket; ++b) {
      slots[b] = b < B ? seqs[static_cast<size_t>(b)].table->Slot(seqs[static_cast<size_t>(b)].past) : -1;
    }
    FillDecodeMeta(decode, bucket, nb, block_size, reinterpret_cast<int32_t*>(host + bucket * 8));
    CudaCheck(cudaMemcpyAsync(io.staging.data_ptr(), host, static_cast<size_t>(io.staging.numel()),
                              cudaMemcpyHostToDevice, stream.stream()),
              "staging copy");
    io.staged.record(stream);
    const at::Tensor xc = x.contiguous();
    CudaCheck(cudaMemcpyAsync(io.x.data_ptr(), xc.data_ptr(), static_cast<size_t>(xc.nbytes()),
                              cudaMemcpyDeviceToDevice, stream.stream()),
              "input copy");

    auto body = [&] {
      auto [q, k, v] = Project(p, io.x);
      LaunchAppend(p.dtype, bucket, d, k, v, io.slots.data_ptr<int64_t>(), k_cache, v_cache);
      at::Tensor ctx = at::empty({bucket, H * d}, io.x.options());
      LaunchDecode(p, bucket, nb, block_size, io.meta, q, k_cache, v_cache, io.slopes,
                   io.workspace.defined() ? io.workspace.data_ptr<float>() : nullptr, io.splits, ctx);
      io.out.copy_(OutProject(p, ctx));
    };
    auto& graph = graphs_[{bucket, nb, block_size}];
    if (graph) {
      graph->replay();
      replays_.fetch_add(1, std::memory_order_relaxed);
    } else {
      body();  // this pass's result, eagerly; the capture below records without running
      auto fresh = std::make_unique<at::cuda::CUDAGraph>();
      fresh->capture_begin(GraphPool(x.device().index()), cudaStreamCaptureModeThreadLocal);
      try {
        body();
      } catch (...) {
        try {
          fresh->capture_end();
        } catch (...) {
        }
        throw;
      }
      fresh->capture_end();
      graph = std::move(fresh);
      captures_.fetch_add(1, std::memory_order_relaxed);
    }
    at::Tensor result = at::empty({B, p.opt.dim}, io.out.options());
    CudaCheck(cudaMemcpyAsync(result.data_ptr(), io.out.data_ptr(), static_cast<size_t>(result.nbytes()),
                              cudaMemcpyDeviceToDevice, stream.stream()),
              "output copy");
    return result;
  }

  // Captured decode passes by (bucket, table width, block size).
  std::map<std::tuple<int64_t, int64_t, int32_t>, std::unique_ptr<at::cuda::CUDAGraph>> graphs_;
  std::atomic<uint64_t> captures_{0}, replays_{0}, failures_{0};  // failures > 0: eager from then on
};

}  // namespace

std::unique_ptr<DecodeGraphs> NewDecodeGraphs() { return std::make_unique<CudaDecodeGraphs>(); }

}  // namespace mqa::core
