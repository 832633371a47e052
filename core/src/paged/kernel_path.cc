#include "paged/kernel_path.h"

#include <ATen/cuda/CUDAContext.h>

#include <algorithm>
#include <tuple>

#include "paged/launch.h"

namespace mqa::core {

bool KernelsServe(const LayerParams& p, at::Device device) {
  return p.opt.attn_impl == AttnImpl::kTriton && device.is_cuda() &&
         (p.dtype == at::kBFloat16 || p.dtype == at::kHalf) &&
         cuda::PagedDecodeSupports(static_cast<int>(p.opt.heads), static_cast<int>(p.opt.head_dim()));
}

void AppendKernel(const LayerParams& p, const at::Tensor& k, const at::Tensor& v, const at::Tensor& slots,
                  const at::Tensor& k_cache, const at::Tensor& v_cache) {
  LaunchAppend(p.dtype, k.size(0), p.opt.head_dim(), k, v, slots.data_ptr<int64_t>(), k_cache, v_cache);
}

void DecodeKernel(const LayerParams& p, const at::Tensor& q, const std::vector<const PagedSeq*>& decode,
                  int32_t block_size, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const at::Tensor& slopes_f32, at::Tensor& ctx) {
  const int64_t H = p.opt.heads, d = p.opt.head_dim(), T = q.size(0);
  const at::Device dev = q.device();
  // Block tables, lengths and ALiBi flags travel in one int32 buffer.
  const int64_t B = static_cast<int64_t>(decode.size());
  int64_t len_max = 0;
  bool in_order = true;  // decode rows are 0..B-1: q and ctx are read and written in place
  std::vector<int64_t> rows;
  for (int64_t b = 0; b < B; ++b) {
    len_max = std::max(len_max, decode[static_cast<size_t>(b)]->past + 1);
    in_order = in_order && decode[static_cast<size_t>(b)]->row == b;
    rows.push_back(decode[static_cast<size_t>(b)]->row);
  }
  const int64_t nb = (len_max + block_size - 1) / block_size;
  at::Tensor host = at::empty({B * nb + 2 * B}, at::TensorOptions().dtype(at::kInt));
  FillDecodeMeta(decode, B, nb, block_size, host.data_ptr<int32_t>());
  const at::Tensor meta = ToDevice(host, dev);
  const at::Tensor row_index = in_order ? at::Tensor() : ToDevice(at::tensor(rows, at::kLong), dev);
  const at::Tensor q_dec = in_order ? q : q.index_select(0, row_index);
  const at::Tensor out = in_order ? ctx.view({T, H * d}) : at::empty({B, H * d}, q.options());
  const int splits =
      cuda::PagedDecodeSplits(static_cast<int>(B), static_cast<int>(len_max), static_cast<int>(H), static_cast<int>(d),
                              at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
  at::Tensor workspace;
  if (splits > 1) {
    const size_t bytes =
        cuda::PagedDecodeWorkspaceBytes(static_cast<int>(B), static_cast<int>(H), static_cast<int>(d), splits);
    workspace = at::empty({static_cast<int64_t>(bytes / sizeof(float))}, q.options().dtype(at::kFloat));
  }
  LaunchDecode(p, B, nb, block_size, meta, q_dec, k_cache, v_cache, slopes_f32,
               workspace.defined() ? workspace.data_ptr<float>() : nullptr, splits, out);
  if (!in_order) ctx.index_copy_(0, row_index, out.view({B, H, d}));
}

void PrefillFlash(const LayerParams& p, const at::Tensor& q, const std::vector<PagedSeq>& seqs,
                  const at::Tensor& k_cache, const at::Tensor& v_cache, at::Tensor& ctx) {
  const int64_t H = p.opt.heads, d = p.opt.head_dim();
  const at::Device dev = q.device();
  for (const bool causal : {false, true}) {
    std::vector<int64_t> q_rows, kv_slots;
    std::vector<int32_t> cu_q{0}, cu_k{0};
    int64_t max_q = 0, max_k = 0;
    for (const PagedSeq& s : seqs) {
      if (s.tokens == 1 || s.causal != causal || s.alibi) continue;
      const int64_t len = s.past + s.tokens;
      for (int64_t r = 0; r < s.tokens; ++r) q_rows.push_back(s.row + r);
      for (int64_t pos = 0; pos < len; ++pos) kv_slots.push_back(s.table->Slot(pos));
      cu_q.push_back(static_cast<int32_t>(q_rows.size()));
      cu_k.push_back(static_cast<int32_t>(kv_slots.size()));
      max_q = std::max(max_q, s.tokens);
      max_k = std::max(max_k, len);
    }
    if (q_rows.empty()) continue;
    const at::Tensor q_index = ToDevice(at::tensor(q_rows, at::kLong), dev);
    const at::Tensor kv_index = ToDevice(at::tensor(kv_slots, at::kLong), dev);
    const auto i32 = at::TensorOptions().dtype(at::kInt);
    // A non-positive scale goes into q, the kernel gets 1: flash masks raw q.k products with -inf and scales them
    // afterwards (0 * -inf = NaN), with its row maximum over the raw products (as the layer's stateless flash
    // path does).
    at::Tensor qp = q.index_select(0, q_index);
    if (p.scale <= 0) qp = qp * p.scale;
    qp = qp.view({-1, H, d});
    const at::Tensor kp = k_cache.index_select(0, kv_index).view({-1, 1, d});
    const at::Tensor vp = v_cache.index_select(0, kv_index).view({-1, 1, d});
    auto result = at::_flash_attention_forward(qp, kp, vp, ToDevice(at::tensor(cu_q, i32), dev),
                                               ToDevice(at::tensor(cu_k, i32), dev), max_q, max_k, 0.0, causal, false,
                                               p.scale > 0 ? p.scale : 1.0);
    ctx.index_copy_(0, q_index, std::get<0>(result));
  }
}

}  // namespace mqa::core
