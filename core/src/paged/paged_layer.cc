#include "paged/paged_layer.h"

#include <string>
#include <utility>

#include "mqa/core/logging.h"
#include "paged/decode_graphs.h"
#include "paged/kernel_path.h"
#include "paged/torch_path.h"
#include "tensor_impl.h"

namespace mqa::core {

StatusOr<std::unique_ptr<PagedLayer>> PagedLayer::Create(const MultiQueryAttention& layer, int64_t num_slots,
                                                         int32_t block_size) {
  return CatchAll("allocating the KV cache", [&]() -> StatusOr<std::unique_ptr<PagedLayer>> {
    const MqaOptions& o = layer.options();
    MQA_ASSIGN_OR_RETURN(at::Device dev, ParseDevice(o.device));
    const auto opts = at::TensorOptions().dtype(ToScalarType(o.dtype)).device(dev);
    at::Tensor k = at::empty({num_slots, o.head_dim()}, opts);
    at::Tensor v = at::empty({num_slots, o.head_dim()}, opts);
    // Block 0 is the padding target of batched attention: it must read as zeros, never as stale data.
    k.narrow(0, 0, block_size).zero_();
    v.narrow(0, 0, block_size).zero_();
    return std::make_unique<PagedLayer>(layer, std::move(k), std::move(v));
  });
}

PagedLayer::PagedLayer(const MultiQueryAttention& layer, at::Tensor k_cache, at::Tensor v_cache)
    : p_(ParamsOf(layer)),
      k_cache_(std::move(k_cache)),
      v_cache_(std::move(v_cache)),
      kernels_(KernelsServe(p_, k_cache_.device())) {
  if (kernels_ && p_.opt.cuda_graphs) graphs_ = NewDecodeGraphs();
}

PagedLayer::~PagedLayer() = default;

PagedCounters PagedLayer::counters() const {
  PagedCounters c;
  c.passes = passes_.load(std::memory_order_relaxed);
  static const char* const kLabels[kNumFallbacks] = {"unsupported_layer", "alibi_prefill"};
  for (int i = 0; i < kNumFallbacks; ++i) {
    const uint64_t n = fallbacks_[static_cast<size_t>(i)].load(std::memory_order_relaxed);
    c.fallbacks_to_torch += n;
    if (n > 0) c.fallbacks[kLabels[i]] = n;
  }
  if (graphs_) {
    c.graph_captures = graphs_->captures();
    c.graph_replays = graphs_->replays();
    c.graph_failures = graphs_->failures();
  }
  return c;
}

void PagedLayer::NoteFallback(Fallback why, const char* message) {
  fallbacks_[static_cast<size_t>(why)].fetch_add(1, std::memory_order_relaxed);
  std::call_once(fallback_logged_, [&] {
    Log(LogLevel::kInfo, "attn_impl=" + std::string(AttnImplName(p_.opt.attn_impl)) + ": " + message +
                             " (counted in fallbacks_to_torch)");
  });
}

StatusOr<at::Tensor> PagedLayer::Forward(const at::Tensor& x, const std::vector<PagedSeq>& seqs, int32_t block_size) {
  return CatchAll("PagedForward", [&]() -> StatusOr<at::Tensor> {
    passes_.fetch_add(1, std::memory_order_relaxed);
    if (graphs_ && graphs_->Eligible(seqs)) {
      std::optional<at::Tensor> y = graphs_->Decode(p_, x, seqs, block_size, k_cache_, v_cache_);
      if (y) return *std::move(y);
    }
    return Eager(x, seqs, block_size);
  });
}

at::Tensor PagedLayer::Eager(const at::Tensor& x, const std::vector<PagedSeq>& seqs, int32_t block_size) {
  const int64_t dim = p_.opt.dim, H = p_.opt.heads, d = p_.opt.head_dim(), T = x.size(0);
  const at::Device dev = x.device();
  // One projection GEMM over every token of the pass.
  auto [q, k, v] = Project(p_, x);
  // KV append: every new token's slot, then one write per cache.
  std::vector<int64_t> new_slots;
  new_slots.reserve(static_cast<size_t>(T));
  for (const PagedSeq& s : seqs) {
    for (int64_t pos = s.past; pos < s.past + s.tokens; ++pos) new_slots.push_back(s.table->Slot(pos));
  }
  const at::Tensor slots = ToDevice(at::tensor(new_slots, at::kLong), dev);
  if (kernels_) {
    AppendKernel(p_, k, v, slots, k_cache_, v_cache_);
  } else {
    if (p_.opt.attn_impl == AttnImpl::kTriton) {
      NoteFallback(kUnsupportedLayer,
                   "the paged pass needs CUDA, bfloat16 or float16 and head_dim 64 or 128 for the fused kernels; it "
                   "computes with the torch path");
    }
    AppendTorch(k, v, slots, k_cache_, v_cache_);
  }

  at::Tensor ctx = at::empty({T, H, d}, x.options());
  bool any_alibi = false;
  for (const PagedSeq& s : seqs) any_alibi = any_alibi || s.alibi;
  const at::Tensor slopes_f32 =
      any_alibi ? ToDevice(at::tensor(AlibiSlopes(H), at::TensorOptions().dtype(at::kFloat)), dev) : at::Tensor();

  std::vector<const PagedSeq*> decode;
  for (const PagedSeq& s : seqs) {
    if (s.tokens == 1) decode.push_back(&s);
  }
  if (!decode.empty()) {
    if (kernels_) {
      DecodeKernel(p_, q, decode, block_size, k_cache_, v_cache_, slopes_f32, ctx);
    } else {
      const at::Tensor slopes = any_alibi ? slopes_f32.to(x.scalar_type()) : at::Tensor();
      DecodeTorch(p_, q, decode, block_size, k_cache_, v_cache_, slopes, ctx);
    }
  }
  if (kernels_) PrefillFlash(p_, q, seqs, k_cache_, v_cache_, ctx);
  // What the flash call did not take: every chunk on the torch path, ALiBi chunks on the kernel path.
  for (const PagedSeq& s : seqs) {
    if (s.tokens == 1 || (kernels_ && !s.alibi)) continue;
    if (kernels_) {
      NoteFallback(kAlibiPrefill,
                   "prefill chunks with ALiBi use the torch path's attention (no ALiBi in LibTorch's flash build)");
    }
    const at::Tensor slopes = s.alibi ? slopes_f32.to(x.scalar_type()) : at::Tensor();
    PrefillTorch(p_, q, s, k_cache_, v_cache_, slopes, ctx);
  }
  return OutProject(p_, ctx.view({T, dim}));
}

}  // namespace mqa::core
