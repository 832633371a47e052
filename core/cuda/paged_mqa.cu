#include "paged_mqa.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <atomic>
#include <cmath>

namespace mqa::core::cuda {
namespace {

namespace wmma = nvcuda::wmma;

constexpr int kThreads = 128;  // four warps
constexpr int kWarps = kThreads / 32;
constexpr int kTile = 64;      // keys per K/V tile
constexpr float kLog2e = 1.4426950408889634f;

template <typename T> __device__ __forceinline__ T FromFloat(float x);
template <> __device__ __forceinline__ __nv_bfloat16 FromFloat(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ __half FromFloat(float x) { return __float2half(x); }

__device__ __forceinline__ float WarpMax(float v) {
  for (int o = 16; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float WarpSum(float v) {
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// 16-byte asynchronous global->shared copy; src_bytes 0 writes zeros (rows past the sequence end, whose block
// table entries may be anything, so they must not be read).
__device__ __forceinline__ void CpAsync16(void* smem, const void* gmem, bool valid) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n));
}
__device__ __forceinline__ void CpAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void CpAsyncWait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__host__ __device__ constexpr size_t Align128(size_t x) { return (x + 127) / 128 * 128; }

// Shared-memory layout of one thread block, for hp = heads rounded up to 16. Leading dimensions are padded so
// rows do not all start on the same bank, and stay multiples of 16 bytes (cp.async) and of the WMMA minimum.
template <typename T, int D>
struct Smem {
  static constexpr int kLdQ = D + 8;       // T
  static constexpr int kLdKV = D + 8;      // T
  static constexpr int kLdS = kTile + 4;   // float
  static constexpr int kLdP = kTile + 8;   // T
  static constexpr int kLdO = D + 4;       // float
  int hp;
  __host__ __device__ size_t q_bytes() const { return Align128(size_t(hp) * kLdQ * sizeof(T)); }
  __host__ __device__ size_t kv_bytes() const { return Align128(size_t(kTile) * kLdKV * sizeof(T)); }  // one of K or V
  __host__ __device__ size_t s_bytes() const { return Align128(size_t(hp) * kLdS * sizeof(float)); }
  __host__ __device__ size_t p_bytes() const { return Align128(size_t(hp) * kLdP * sizeof(T)); }
  __host__ __device__ size_t o_bytes() const { return Align128(size_t(hp) * kLdO * sizeof(float)); }
  __host__ __device__ size_t stats_bytes() const { return Align128(size_t(hp) * 2 * sizeof(float)); }
  __host__ __device__ size_t total() const {
    return q_bytes() + 4 * kv_bytes() + s_bytes() + p_bytes() + o_bytes() + stats_bytes();
  }
};

// grid (num_splits, B), kThreads threads. Split s of session b covers tiles [s * per, min(tiles, (s + 1) * per))
// with per = ceil(tiles / num_splits), tiles = ceil(seq_len / kTile). With one split the result is normalised and
// written to out; otherwise the unnormalised partial output, the running max (log2 units) and the sum go to the
// workspace for MergeSplits.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) PagedDecodeKernel(PagedDecodeParams p, int hp) {
  extern __shared__ __align__(128) unsigned char smem[];
  const Smem<T, D> L{hp};
  T* q_s = reinterpret_cast<T*>(smem);
  T* kv_s = reinterpret_cast<T*>(smem + L.q_bytes());  // [stage][k|v][kTile][kLdKV]
  float* s_s = reinterpret_cast<float*>(smem + L.q_bytes() + 4 * L.kv_bytes());
  T* p_s = reinterpret_cast<T*>(reinterpret_cast<unsigned char*>(s_s) + L.s_bytes());
  float* o_s = reinterpret_cast<float*>(reinterpret_cast<unsigned char*>(p_s) + L.p_bytes());
  float* m_s = reinterpret_cast<float*>(reinterpret_cast<unsigned char*>(o_s) + L.o_bytes());
  float* l_s = m_s + hp;
  const size_t kv_elems = L.kv_bytes() / sizeof(T);

  const int b = blockIdx.y, split = blockIdx.x, tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int H = p.heads;
  const int len = p.seq_lens[b];
  const int tiles = (len + kTile - 1) / kTile;
  const int per = (tiles + p.num_splits - 1) / p.num_splits;
  const int t_begin = min(tiles, split * per), t_end = min(tiles, t_begin + per);
  const int n = t_end - t_begin;
  const T* __restrict__ kc = static_cast<const T*>(p.k_cache);
  const T* __restrict__ vc = static_cast<const T*>(p.v_cache);
  const int32_t* __restrict__ table = p.block_tables + static_cast<int64_t>(b) * p.block_table_stride;

  // Each thread copies one 16-byte column chunk of rows r0, r0 + rows_step, ... of both K and V.
  constexpr int kChunks = D / 8;
  constexpr int kRowsStep = kThreads / kChunks;
  const int chunk_col = (tid % kChunks) * 8, r0 = tid / kChunks;
  auto load_tile = [&](int t, int stage) {
    T* ks = kv_s + (2 * stage) * kv_elems;
    T* vs = ks + kv_elems;
    for (int r = r0; r < kTile; r += kRowsStep) {
      const int pos = t * kTile + r;
      const bool valid = pos < len;
      const int64_t slot = valid ? static_cast<int64_t>(table[pos / p.block_size]) * p.block_size + pos % p.block_size : 0;
      CpAsync16(ks + r * L.kLdKV + chunk_col, kc + slot * D + chunk_col, valid);
      CpAsync16(vs + r * L.kLdKV + chunk_col, vc + slot * D + chunk_col, valid);
    }
  };
  if (n > 0) load_tile(t_begin, 0);
  CpAsyncCommit();

  // Q rows (padding rows are zero), O = 0, running max -inf, sum 0, P padding rows 0.
  const T* q = static_cast<const T*>(p.q) + static_cast<int64_t>(b) * p.q_stride;
  for (int i = tid; i < hp * D; i += kThreads) {
    const int h = i / D, d = i % D;
    q_s[h * L.kLdQ + d] = h < H ? q[h * D + d] : FromFloat<T>(0.f);
    o_s[h * L.kLdO + d] = 0.f;
  }
  for (int i = tid; i < hp * kTile; i += kThreads) p_s[(i / kTile) * L.kLdP + i % kTile] = FromFloat<T>(0.f);
  for (int h = tid; h < hp; h += kThreads) {
    m_s[h] = -INFINITY;
    l_s[h] = 0.f;
  }
  const float scale2 = p.scale * kLog2e;  // scores in log2 units: exp2 instead of exp
  const bool alibi = p.alibi_slopes != nullptr && (p.alibi_on == nullptr || p.alibi_on[b] != 0);
  const int mt = hp / 16;

  for (int i = 0; i < n; ++i) {
    const int t = t_begin + i, stage = i & 1;
    if (i + 1 < n) load_tile(t + 1, stage ^ 1);
    CpAsyncCommit();
    CpAsyncWait<1>();
    __syncthreads();
    const T* ks = kv_s + (2 * stage) * kv_elems;
    const T* vs = ks + kv_elems;

    // S[hp, kTile] = Q K^T: K rows are the columns of a col-major B operand.
    for (int tt = warp; tt < mt * (kTile / 16); tt += kWarps) {
      const int mi = tt / (kTile / 16), ni = tt % (kTile / 16);
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.f);
#pragma unroll
      for (int k = 0; k < D / 16; ++k) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> bk;
        wmma::load_matrix_sync(a, q_s + mi * 16 * L.kLdQ + k * 16, L.kLdQ);
        wmma::load_matrix_sync(bk, ks + ni * 16 * L.kLdKV + k * 16, L.kLdKV);
        wmma::mma_sync(acc, a, bk, acc);
      }
      wmma::store_matrix_sync(s_s + mi * 16 * L.kLdS + ni * 16, acc, L.kLdS, wmma::mem_row_major);
    }
    __syncthreads();

    // Online softmax, one warp per head row; each lane owns two keys of the tile.
    for (int h = warp; h < H; h += kWarps) {
      float sc[2];
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int j = lane + 32 * c, pos = t * kTile + j;
        float s = s_s[h * L.kLdS + j] * scale2;
        if (alibi) s += p.alibi_slopes[h] * kLog2e * static_cast<float>(pos - (len - 1));
        sc[c] = pos < len ? s : -INFINITY;
      }
      const float m_old = m_s[h];
      const float m_new = fmaxf(m_old, WarpMax(fmaxf(sc[0], sc[1])));
      const float alpha = exp2f(m_old - m_new);  // 0 on the first tile (m_old = -inf)
      const float p0 = exp2f(sc[0] - m_new), p1 = exp2f(sc[1] - m_new);
      const float sum = WarpSum(p0 + p1);
      p_s[h * L.kLdP + lane] = FromFloat<T>(p0);
      p_s[h * L.kLdP + lane + 32] = FromFloat<T>(p1);
      for (int d = lane; d < D; d += 32) o_s[h * L.kLdO + d] *= alpha;
      __syncwarp();
      if (lane == 0) {
        m_s[h] = m_new;
        l_s[h] = l_s[h] * alpha + sum;
      }
    }
    __syncthreads();

    // O[hp, D] += P V, accumulators round-tripped through shared memory (their rows were rescaled above).
    for (int tt = warp; tt < mt * (D / 16); tt += kWarps) {
      const int mi = tt / (D / 16), ni = tt % (D / 16);
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      float* o_tile = o_s + mi * 16 * L.kLdO + ni * 16;
      wmma::load_matrix_sync(acc, o_tile, L.kLdO, wmma::mem_row_major);
#pragma unroll
      for (int k = 0; k < kTile / 16; ++k) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> bv;
        wmma::load_matrix_sync(a, p_s + mi * 16 * L.kLdP + k * 16, L.kLdP);
        wmma::load_matrix_sync(bv, vs + k * 16 * L.kLdKV + ni * 16, L.kLdKV);
        wmma::mma_sync(acc, a, bv, acc);
      }
      wmma::store_matrix_sync(o_tile, acc, L.kLdO, wmma::mem_row_major);
    }
    __syncthreads();  // the next iteration's prefetch overwrites this stage
  }
  CpAsyncWait<0>();

  if (p.num_splits == 1) {
    T* out = static_cast<T*>(p.out) + static_cast<int64_t>(b) * p.out_stride;
    for (int i = tid; i < H * D; i += kThreads) {
      const int h = i / D, d = i % D;
      out[i] = FromFloat<T>(o_s[h * L.kLdO + d] / l_s[h]);
    }
    return;
  }
  // Workspace: o [B][S][H][D] floats, then (m, l) [B][S][H][2].
  const int64_t bs = static_cast<int64_t>(b) * p.num_splits + split;
  float* wo = p.workspace + bs * H * D;
  float* wml = p.workspace + static_cast<int64_t>(p.batch) * p.num_splits * H * D + bs * H * 2;
  if (n > 0) {
    for (int i = tid; i < H * D; i += kThreads) wo[i] = o_s[(i / D) * L.kLdO + i % D];
  }
  for (int h = tid; h < H; h += kThreads) {
    wml[2 * h] = n > 0 ? m_s[h] : -INFINITY;  // an empty split has no keys: MergeSplits skips it
    wml[2 * h + 1] = n > 0 ? l_s[h] : 0.f;
  }
}

// grid (H, B), D threads: out[b, h] = sum_s 2^(m_s - M) o_s / sum_s 2^(m_s - M) l_s over non-empty splits.
template <typename T>
__global__ void MergeSplits(PagedDecodeParams p) {
  const int h = blockIdx.x, b = blockIdx.y, d = threadIdx.x, H = p.heads, D = p.head_dim, S = p.num_splits;
  const float* wml = p.workspace + static_cast<int64_t>(p.batch) * S * H * D;
  float m = -INFINITY;
  for (int s = 0; s < S; ++s) m = fmaxf(m, wml[((static_cast<int64_t>(b) * S + s) * H + h) * 2]);
  float num = 0.f, den = 0.f;
  for (int s = 0; s < S; ++s) {
    const int64_t bs = static_cast<int64_t>(b) * S + s;
    const float ms = wml[(bs * H + h) * 2];
    if (ms == -INFINITY) continue;
    const float w = exp2f(ms - m);
    den += w * wml[(bs * H + h) * 2 + 1];
    num += w * p.workspace[(bs * H + h) * D + d];
  }
  static_cast<T*>(p.out)[static_cast<int64_t>(b) * p.out_stride + h * D + d] = FromFloat<T>(num / den);
}

template <typename T, int D>
cudaError_t LaunchDecode(const PagedDecodeParams& p, cudaStream_t stream) {
  const int hp = (p.heads + 15) / 16 * 16;
  const size_t smem = Smem<T, D>{hp}.total();
  // Opting in to more than 48 KiB of dynamic shared memory is per kernel and per device. It is done once per
  // device, for the largest shape served, before any capture can be in progress on that device.
  static std::atomic<uint64_t> opted{0};
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const uint64_t bit = uint64_t{1} << (device & 63);
  if (!(opted.load(std::memory_order_acquire) & bit)) {
    const size_t most = Smem<T, D>{(64 * 128) / D}.total();
    err = cudaFuncSetAttribute(PagedDecodeKernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(most));
    if (err != cudaSuccess) return err;
    opted.fetch_or(bit, std::memory_order_release);
  }
  PagedDecodeKernel<T, D><<<dim3(p.num_splits, p.batch), kThreads, smem, stream>>>(p, hp);
  if (p.num_splits > 1) MergeSplits<T><<<dim3(p.heads, p.batch), D, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
__global__ void KvAppendKernel(int tokens, int head_dim, const T* __restrict__ k_src, int64_t k_stride,
                               const T* __restrict__ v_src, int64_t v_stride, const int64_t* __restrict__ slots,
                               T* __restrict__ k_cache, T* __restrict__ v_cache) {
  const int chunks = head_dim / 8;  // 16-byte vectors per row
  const int per_block = blockDim.x / chunks;
  const int t = blockIdx.x * per_block + threadIdx.x / chunks, c = (threadIdx.x % chunks) * 8;
  if (t >= tokens || threadIdx.x >= per_block * chunks) return;
  const int64_t slot = slots[t];
  if (slot < 0) return;  // a padding row of a captured batch
  *reinterpret_cast<uint4*>(k_cache + slot * head_dim + c) = *reinterpret_cast<const uint4*>(k_src + t * k_stride + c);
  *reinterpret_cast<uint4*>(v_cache + slot * head_dim + c) = *reinterpret_cast<const uint4*>(v_src + t * v_stride + c);
}

}  // namespace

bool PagedDecodeSupports(int heads, int head_dim) {
  return (head_dim == 64 || head_dim == 128) && heads >= 1 && heads * head_dim <= 64 * 128;
}

size_t PagedDecodeWorkspaceBytes(int batch, int heads, int head_dim, int num_splits) {
  if (num_splits <= 1) return 0;
  return static_cast<size_t>(batch) * num_splits * heads * (head_dim + 2) * sizeof(float);
}

int PagedDecodeSplits(int batch, int max_seq_len, int heads, int head_dim, int sm_count) {
  if (batch <= 0) return 1;
  const int hp = (heads + 15) / 16 * 16;
  // Blocks resident per multiprocessor, from the shared memory each needs (about 227 KiB per SM on Hopper).
  const size_t smem = head_dim == 64 ? Smem<__half, 64>{hp}.total() : Smem<__half, 128>{hp}.total();
  const int resident = std::max<int>(1, static_cast<int>((227 * 1024) / smem));
  const int want = sm_count * resident;
  const int tiles = (max_seq_len + kTile - 1) / kTile;
  int splits = (want + batch - 1) / batch;
  splits = std::min(splits, std::max(1, tiles / 2));
  return std::max(1, std::min(splits, kMaxDecodeSplits));
}

int PagedDecode(const PagedDecodeParams& p, void* stream_ptr) {
  if (!PagedDecodeSupports(p.heads, p.head_dim) || p.batch < 0 || p.block_size < 1 || p.num_splits < 1 ||
      p.num_splits > kMaxDecodeSplits || (p.num_splits > 1 && p.workspace == nullptr)) {
    return cudaErrorInvalidValue;
  }
  if (p.batch == 0) return cudaSuccess;
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  if (p.dtype == KvType::kBFloat16) {
    return p.head_dim == 64 ? LaunchDecode<__nv_bfloat16, 64>(p, stream) : LaunchDecode<__nv_bfloat16, 128>(p, stream);
  }
  return p.head_dim == 64 ? LaunchDecode<__half, 64>(p, stream) : LaunchDecode<__half, 128>(p, stream);
}

int KvAppend(KvType dtype, int tokens, int head_dim, const void* k_src, int64_t k_src_stride, const void* v_src,
             int64_t v_src_stride, const int64_t* slots, void* k_cache, void* v_cache, void* stream_ptr) {
  if (head_dim % 8 != 0 || head_dim <= 0 || head_dim > 8 * 128 || tokens < 0) return cudaErrorInvalidValue;
  if (tokens == 0) return cudaSuccess;
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const int chunks = head_dim / 8;
  const int per_block = std::max(1, 128 / chunks);
  const int blocks = (tokens + per_block - 1) / per_block;
  // Both types are 16-bit: the copy moves bits, so one instantiation would do; two keep the types honest.
  if (dtype == KvType::kBFloat16) {
    KvAppendKernel<__nv_bfloat16><<<blocks, per_block * chunks, 0, stream>>>(
        tokens, head_dim, static_cast<const __nv_bfloat16*>(k_src), k_src_stride,
        static_cast<const __nv_bfloat16*>(v_src), v_src_stride, slots, static_cast<__nv_bfloat16*>(k_cache),
        static_cast<__nv_bfloat16*>(v_cache));
  } else {
    KvAppendKernel<__half><<<blocks, per_block * chunks, 0, stream>>>(
        tokens, head_dim, static_cast<const __half*>(k_src), k_src_stride, static_cast<const __half*>(v_src),
        v_src_stride, slots, static_cast<__half*>(k_cache), static_cast<__half*>(v_cache));
  }
  return cudaGetLastError();
}

int SmCount(int device, int* count) {
  return cudaDeviceGetAttribute(count, cudaDevAttrMultiProcessorCount, device);
}

}  // namespace mqa::core::cuda
