#include "paged/torch_path.h"

#include <algorithm>
#include <limits>

#include "layer/layer_math.h"

namespace mqa::core {

void AppendTorch(const at::Tensor& k, const at::Tensor& v, const at::Tensor& slots, const at::Tensor& k_cache,
                 const at::Tensor& v_cache) {
  k_cache.index_copy_(0, slots, k.contiguous());
  v_cache.index_copy_(0, slots, v.contiguous());
}

void DecodeTorch(const LayerParams& p, const at::Tensor& q, const std::vector<const PagedSeq*>& decode,
                 int32_t block_size, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& slopes,
                 at::Tensor& ctx) {
  const int64_t H = p.opt.heads, d = p.opt.head_dim();
  const at::Device dev = q.device();
  const auto i64 = at::TensorOptions().dtype(at::kLong);
  const int64_t B = static_cast<int64_t>(decode.size());
  int64_t len_max = 0;
  for (const PagedSeq* s : decode) len_max = std::max(len_max, s->past + 1);
  const int64_t nb = (len_max + block_size - 1) / block_size;
  std::vector<int64_t> tables(static_cast<size_t>(B * nb), 0), lengths, rows;
  for (int64_t b = 0; b < B; ++b) {
    const PagedSeq& s = *decode[static_cast<size_t>(b)];
    const int64_t used = (s.past + 1 + block_size - 1) / block_size;
    for (int64_t i = 0; i < used; ++i) {
      tables[static_cast<size_t>(b * nb + i)] = s.table->blocks()[static_cast<size_t>(i)];
    }
    lengths.push_back(s.past + 1);
    rows.push_back(s.row);
  }
  const at::Tensor table = ToDevice(at::tensor(tables, i64).view({B, nb}), dev);
  const at::Tensor length = ToDevice(at::tensor(lengths, i64), dev).view({B, 1});
  const at::Tensor pos = at::arange(len_max, i64.device(dev)).view({1, len_max});
  const at::Tensor valid = pos < length;  // [B, L_max]
  at::Tensor slots = (table.unsqueeze(-1) * block_size + at::arange(block_size, i64.device(dev)))
                         .view({B, nb * block_size})
                         .narrow(1, 0, len_max);
  slots = at::where(valid, slots, at::zeros_like(slots));
  const at::Tensor kg = k_cache.index_select(0, slots.reshape(-1)).view({B, len_max, d});
  const at::Tensor vg = v_cache.index_select(0, slots.reshape(-1)).view({B, len_max, d});
  const at::Tensor row_index = ToDevice(at::tensor(rows, i64), dev);
  const at::Tensor qd = q.index_select(0, row_index).view({B, H, d});
  at::Tensor attn = at::bmm(qd, kg.transpose(1, 2)) * p.scale;  // [B, H, L_max]
  if (slopes.defined()) {
    std::vector<uint8_t> alibi_rows;
    for (const PagedSeq* s : decode) alibi_rows.push_back(s->alibi ? 1 : 0);
    // Causal form relative to each session's last key: m_h * (j - (len - 1)).
    const at::Tensor rel = (pos - (length - 1)).to(q.scalar_type()).view({B, 1, len_max});
    const at::Tensor on =
        ToDevice(at::tensor(alibi_rows, at::TensorOptions().dtype(at::kByte)), dev).to(at::kBool).view({B, 1, 1});
    attn = attn + at::where(on, slopes.view({1, H, 1}) * rel, at::zeros({}, attn.options()));
  }
  attn = attn.masked_fill(valid.logical_not().view({B, 1, len_max}), -std::numeric_limits<double>::infinity());
  const at::Tensor probs = at::softmax(attn, -1);
  ctx.index_copy_(0, row_index, at::bmm(probs.to(vg.scalar_type()), vg));  // [B, H, d]
}

void PrefillTorch(const LayerParams& p, const at::Tensor& q, const PagedSeq& s, const at::Tensor& k_cache,
                  const at::Tensor& v_cache, const at::Tensor& slopes, at::Tensor& ctx) {
  const int64_t H = p.opt.heads, d = p.opt.head_dim();
  const at::Device dev = q.device();
  const auto i64 = at::TensorOptions().dtype(at::kLong);
  const int64_t len = s.past + s.tokens;
  std::vector<int64_t> sl(static_cast<size_t>(len));
  for (int64_t pos = 0; pos < len; ++pos) sl[static_cast<size_t>(pos)] = s.table->Slot(pos);
  const at::Tensor idx = ToDevice(at::tensor(sl, i64), dev);
  const at::Tensor kk_all = k_cache.index_select(0, idx);  // [len, d]
  const at::Tensor vv_all = v_cache.index_select(0, idx);
  // A tile of query rows at a time, so the logits take tile x H x len, not s x H x len: a non-causal step runs
  // whole (never chunked), however long.
  const int64_t tile_rows = TileRows(1, H, s.tokens, len);
  for (int64_t r0 = 0; r0 < s.tokens; r0 += tile_rows) {
    const int64_t t = std::min(tile_rows, s.tokens - r0);
    // A causal tile's queries see the keys up to their own positions only: the first past + r0 + t.
    const int64_t keys = s.causal ? s.past + r0 + t : len;
    const at::Tensor kk = kk_all.narrow(0, 0, keys);
    const at::Tensor vv = vv_all.narrow(0, 0, keys);
    const at::Tensor qs = q.narrow(0, s.row + r0, t).view({t, H, d}).transpose(0, 1);  // [H, t, d]
    at::Tensor attn = at::matmul(qs, kk.t()) * p.scale;                                // [H, t, keys]
    if (s.alibi) {
      const at::Tensor j = at::arange(keys, i64.device(dev)).view({1, keys});
      const at::Tensor i = at::arange(s.past + r0, s.past + r0 + t, i64.device(dev)).view({t, 1});
      // Causal form: m_h * (j - (keys - 1)), which differs from -m_h * (i - j) by a constant per row.
      const at::Tensor rel = s.causal ? (j - (keys - 1)).expand({t, keys}) : -(j - i).abs();
      attn = attn + slopes.view({H, 1, 1}) * rel.to(q.scalar_type()).view({1, t, keys});
    }
    if (s.causal) attn = attn.masked_fill(FutureKeys(t, keys, dev).view({1, t, keys}), MostNegative(q.scalar_type()));
    const at::Tensor probs = at::softmax(attn, -1);
    ctx.narrow(0, s.row + r0, t).copy_(at::matmul(probs.to(vv.scalar_type()), vv).transpose(0, 1));
  }
}

}  // namespace mqa::core
