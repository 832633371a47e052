#include "paged/launch.h"

#include <ATen/cuda/CUDAContext.h>

#include <algorithm>
#include <stdexcept>
#include <string>

namespace mqa::core {

void CudaCheck(int error, const char* what) {
  if (error != 0) throw std::runtime_error(std::string(what) + ": " + cuda::ErrorString(error));
}

cuda::KvType KvTypeOf(at::ScalarType t) {
  return t == at::kBFloat16 ? cuda::KvType::kBFloat16 : cuda::KvType::kFloat16;
}

void FillDecodeMeta(const std::vector<const PagedSeq*>& decode, int64_t B, int64_t nb, int32_t block_size, int32_t* h) {
  std::fill(h, h + B * nb + 2 * B, 0);
  for (int64_t b = 0; b < B; ++b) {
    if (b >= static_cast<int64_t>(decode.size())) {
      h[B * nb + b] = 1;
      continue;
    }
    const PagedSeq& s = *decode[static_cast<size_t>(b)];
    const int64_t used = (s.past + 1 + block_size - 1) / block_size;
    for (int64_t i = 0; i < used; ++i) h[b * nb + i] = static_cast<int32_t>(s.table->blocks()[static_cast<size_t>(i)]);
    h[B * nb + b] = static_cast<int32_t>(s.past + 1);
    h[B * nb + B + b] = s.alibi ? 1 : 0;
  }
}

void LaunchDecode(const LayerParams& lp, int64_t B, int64_t nb, int32_t block_size, const at::Tensor& meta,
                  const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const at::Tensor& slopes_f32, float* workspace, int splits, const at::Tensor& out) {
  cuda::PagedDecodeParams p;
  p.dtype = KvTypeOf(q.scalar_type());
  p.batch = static_cast<int>(B);
  p.heads = static_cast<int>(lp.opt.heads);
  p.head_dim = static_cast<int>(lp.opt.head_dim());
  p.q = q.data_ptr();
  p.q_stride = q.stride(0);
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.block_tables = meta.data_ptr<int32_t>();
  p.block_table_stride = static_cast<int>(nb);
  p.seq_lens = meta.data_ptr<int32_t>() + B * nb;
  p.block_size = block_size;
  p.scale = static_cast<float>(lp.scale);
  if (slopes_f32.defined()) {
    p.alibi_slopes = slopes_f32.data_ptr<float>();
    p.alibi_on = meta.data_ptr<int32_t>() + B * nb + B;
  }
  p.out = out.data_ptr();
  p.out_stride = out.stride(0);
  p.num_splits = splits;
  p.workspace = workspace;
  CudaCheck(cuda::PagedDecode(p, at::cuda::getCurrentCUDAStream().stream()), "PagedDecode");
}

void LaunchAppend(at::ScalarType dtype, int64_t T, int64_t d, const at::Tensor& k, const at::Tensor& v,
                  const int64_t* slots, const at::Tensor& k_cache, const at::Tensor& v_cache) {
  CudaCheck(cuda::KvAppend(KvTypeOf(dtype), static_cast<int>(T), static_cast<int>(d), k.data_ptr(), k.stride(0),
                           v.data_ptr(), v.stride(0), slots, k_cache.data_ptr(), v_cache.data_ptr(),
                           at::cuda::getCurrentCUDAStream().stream()),
            "KvAppend");
}

}  // namespace mqa::core
