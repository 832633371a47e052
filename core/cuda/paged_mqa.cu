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
constexpr int kTile = 64;   // keys per K/V tile
constexpr int kStages = 3;  // K/V tiles in shared memory: two in flight while one is computed
constexpr float kLog2e = 1.4426950408889634f;

template <typename T>
__device__ __forceinline__ T FromFloat(float x);
template <>
__device__ __forceinline__ __nv_bfloat16 FromFloat(float x) {
  return __float2bfloat16(x);
}
template <>
__device__ __forceinline__ __half FromFloat(float x) {
  return __float2half(x);
}

// Two floats as the two 16-bit halves of one register, the lower column in the low half.
template <typename T>
__device__ __forceinline__ uint32_t Pack(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t Pack<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t Pack<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// d += a * b on tensor cores, one m16n8k16 tile: a 16x16 (row-major fragment), b 16x8 (column fragment), fp32
// accumulators. Fragment layouts are the PTX ISA's for mma.m16n8k16.
template <typename T>
__device__ __forceinline__ void Mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void Mma<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void Mma<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ unsigned SmemAddr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// Four 8x8 16-bit matrices from shared memory; lanes 8i..8i+7 give the row addresses of matrix i.
__device__ __forceinline__ void LdMatrixX4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(SmemAddr(p)));
}
__device__ __forceinline__ void LdMatrixX4Trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(SmemAddr(p)));
}

// 16-byte asynchronous global->shared copy; src_bytes 0 writes zeros (rows past the sequence end, whose block
// table entries may be anything, so they must not be read).
__device__ __forceinline__ void CpAsync16(void* smem, const void* gmem, bool valid) {
  const int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(SmemAddr(smem)), "l"(gmem), "r"(n));
}
__device__ __forceinline__ void CpAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__host__ __device__ constexpr size_t Align128(size_t x) { return (x + 127) / 128 * 128; }

// Shared memory of one thread block: Q [hp][D + 8] and kStages K/V tiles [kTile][D + 8] each. The 8-element
// row padding puts the eight rows an ldmatrix reads in eight different bank groups. After the last tile, the K/V
// space holds each warp's partial result for the merge of the key groups.
template <typename T, int D>
struct Smem {
  static constexpr int kLd = D + 8;
  int hp;
  __host__ __device__ size_t q_bytes() const { return Align128(size_t(hp) * kLd * sizeof(T)); }
  __host__ __device__ static constexpr size_t tile_bytes() { return size_t(kTile) * kLd * sizeof(T); }  // K or V
  __host__ __device__ size_t total() const { return q_bytes() + kStages * 2 * tile_bytes(); }
};

// grid (num_splits, B), kThreads threads. MT = hp / 16 query row groups (1, 2 or 4): warp w computes rows
// [16 * (w % MT), +16) against key group w / MT, the keys [g * NK, (g + 1) * NK) of every tile, NK = kTile * MT
// / kWarps, with Q, the scores, the probabilities and the output accumulators in registers (FlashAttention-2's
// layout). Split s of session b covers tiles [s * per, min(tiles, (s + 1) * per)), per = ceil(tiles /
// num_splits). The key groups merge through shared memory at the end; with one split the result is normalised
// and written to out, otherwise the unnormalised output, the max (log2 units) and the sum go to the workspace.
template <typename T, int D, int MT>
__global__ void __launch_bounds__(kThreads, 2) PagedDecodeKernel(PagedDecodeParams p) {
  constexpr int KG = kWarps / MT;  // key groups
  constexpr int NK = kTile / KG;   // keys per warp per tile: 16, 32 or 64
  constexpr int kLd = Smem<T, D>::kLd;
  extern __shared__ __align__(128) unsigned char smem[];
  const Smem<T, D> L{16 * MT};
  T* q_s = reinterpret_cast<T*>(smem);
  T* kv_s = reinterpret_cast<T*>(smem + L.q_bytes());  // [stage][k | v][kTile][kLd]
  constexpr size_t kTileElems = Smem<T, D>::tile_bytes() / sizeof(T);

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

  // Each thread copies one 16-byte column chunk of rows r0, r0 + kRowsStep, ... of both K and V. The block ids
  // of a tile are read into registers one tile ahead of its copies, so the table's latency hides behind compute.
  constexpr int kChunks = D / 8;
  constexpr int kRowsStep = kThreads / kChunks;
  constexpr int kRowsPer = kTile / kRowsStep;
  const int chunk_col = (tid % kChunks) * 8, r0 = tid / kChunks;
  auto fetch_blocks = [&](int t, int32_t(&blk)[kRowsPer]) {
#pragma unroll
    for (int j = 0; j < kRowsPer; ++j) {
      const int pos = t * kTile + r0 + j * kRowsStep;
      blk[j] = pos < len ? table[pos / p.block_size] : 0;
    }
  };
  auto load_tile = [&](int t, int stage, const int32_t(&blk)[kRowsPer]) {
    T* ks = kv_s + (2 * stage) * kTileElems;
    T* vs = ks + kTileElems;
#pragma unroll
    for (int j = 0; j < kRowsPer; ++j) {
      const int r = r0 + j * kRowsStep, pos = t * kTile + r;
      const bool valid = pos < len;
      const int64_t slot = static_cast<int64_t>(blk[j]) * p.block_size + pos % p.block_size;
      CpAsync16(ks + r * kLd + chunk_col, kc + (valid ? slot : 0) * D + chunk_col, valid);
      CpAsync16(vs + r * kLd + chunk_col, vc + (valid ? slot : 0) * D + chunk_col, valid);
    }
  };
  int32_t next_blk[kRowsPer];
#pragma unroll
  for (int st = 0; st < kStages - 1; ++st) {
    if (st < n) {
      fetch_blocks(t_begin + st, next_blk);
      load_tile(t_begin + st, st, next_blk);
    }
    CpAsyncCommit();
  }
  if (kStages - 1 < n) fetch_blocks(t_begin + kStages - 1, next_blk);

  // Q rows into shared memory (padding rows zero), then each warp's Q fragments into registers.
  const T* q = static_cast<const T*>(p.q) + static_cast<int64_t>(b) * p.q_stride;
  for (int i = tid; i < 16 * MT * (D / 8); i += kThreads) {
    const int h = i / (D / 8), c = (i % (D / 8)) * 8;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (h < H) v = *reinterpret_cast<const uint4*>(q + h * D + c);
    *reinterpret_cast<uint4*>(q_s + h * kLd + c) = v;
  }
  __syncthreads();
  const int mi = warp % MT, g = warp / MT;
  uint32_t qf[D / 16][4];
#pragma unroll
  for (int k = 0; k < D / 16; ++k) {
    LdMatrixX4(qf[k], q_s + (mi * 16 + (lane % 8) + 8 * ((lane / 8) % 2)) * kLd + k * 16 + 8 * (lane / 16));
  }

  // This thread's two rows of the warp's 16 (lane / 4 and lane / 4 + 8), as heads; their running max (log2
  // units), sum and output columns.
  const int row0 = lane / 4, h0 = mi * 16 + row0, h1 = h0 + 8;
  const bool alibi = p.alibi_slopes != nullptr && (p.alibi_on == nullptr || p.alibi_on[b] != 0);
  const float slope0 = alibi && h0 < H ? p.alibi_slopes[h0] * kLog2e : 0.f;
  const float slope1 = alibi && h1 < H ? p.alibi_slopes[h1] * kLog2e : 0.f;
  const float scale2 = p.scale * kLog2e;  // scores in log2 units: exp2 instead of exp
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;
  float o[D / 8][4];
#pragma unroll
  for (int j = 0; j < D / 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;

  for (int i = 0; i < n; ++i) {
    const int t = t_begin + i;
    CpAsyncWait<kStages - 2>();
    __syncthreads();  // tile i has landed for every thread, and every warp is done with tile i - 1's stage
    if (i + kStages - 1 < n) load_tile(t + kStages - 1, (i + kStages - 1) % kStages, next_blk);
    CpAsyncCommit();
    if (i + kStages < n) fetch_blocks(t + kStages, next_blk);
    const T* ks = kv_s + (2 * (i % kStages)) * kTileElems + g * NK * kLd;
    const T* vs = ks + kTileElems;

    // S[16, NK] = Q K^T: K rows (keys) are the columns of the col-major B operand.
    float s[NK / 8][4];
#pragma unroll
    for (int j = 0; j < NK / 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
    for (int k = 0; k < D / 16; ++k) {
#pragma unroll
      for (int np = 0; np < NK / 16; ++np) {
        uint32_t r[4];
        LdMatrixX4(r, ks + (np * 16 + (lane % 8) + 8 * (lane / 16)) * kLd + k * 16 + 8 * ((lane / 8) % 2));
        Mma<T>(s[2 * np], qf[k], r[0], r[1]);
        Mma<T>(s[2 * np + 1], qf[k], r[2], r[3]);
      }
    }

    // Online softmax on the registers: element e of s[j] is row (e < 2 ? row0 : row0 + 8), key
    // j * 8 + (lane % 4) * 2 + (e & 1) of this warp's slice. The four lanes of a row reduce by shuffles.
    const int key_base = t * kTile + g * NK + (lane % 4) * 2;
    float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
    for (int j = 0; j < NK / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int pos = key_base + j * 8 + (e & 1);
        float v = s[j][e] * scale2 + (e < 2 ? slope0 : slope1) * static_cast<float>(pos - (len - 1));
        v = pos < len ? v : -INFINITY;
        s[j][e] = v;
        if (e < 2)
          mx0 = fmaxf(mx0, v);
        else
          mx1 = fmaxf(mx1, v);
      }
    }
#pragma unroll
    for (int off = 1; off <= 2; off *= 2) {
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, off));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, off));
    }
    const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
    // A slice with no key yet (past the sequence end) keeps max -inf: use 0 as the reference so that exp2 gives
    // 0, not NaN, for it.
    const float ref0 = mn0 == -INFINITY ? 0.f : mn0, ref1 = mn1 == -INFINITY ? 0.f : mn1;
    const float alpha0 = exp2f(m0 - ref0), alpha1 = exp2f(m1 - ref1);
    float sum0 = 0.f, sum1 = 0.f;
    uint32_t pa[NK / 16][4];
#pragma unroll
    for (int j = 0; j < NK / 8; ++j) {
      const float p0 = exp2f(s[j][0] - ref0), p1 = exp2f(s[j][1] - ref0);
      const float p2 = exp2f(s[j][2] - ref1), p3 = exp2f(s[j][3] - ref1);
      sum0 += p0 + p1;
      sum1 += p2 + p3;
      // The C fragments of two adjacent n8 tiles are the A fragment of one k16 step.
      pa[j / 2][(j % 2) * 2 + 0] = Pack<T>(p0, p1);
      pa[j / 2][(j % 2) * 2 + 1] = Pack<T>(p2, p3);
    }
#pragma unroll
    for (int off = 1; off <= 2; off *= 2) {
      sum0 += __shfl_xor_sync(0xffffffffu, sum0, off);
      sum1 += __shfl_xor_sync(0xffffffffu, sum1, off);
    }
    l0 = l0 * alpha0 + sum0;
    l1 = l1 * alpha1 + sum1;
    m0 = mn0;
    m1 = mn1;
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
      o[j][0] *= alpha0;
      o[j][1] *= alpha0;
      o[j][2] *= alpha1;
      o[j][3] *= alpha1;
    }

    // O[16, D] += P V: V rows (keys) are the k dimension, loaded transposed into B fragments.
#pragma unroll
    for (int kk = 0; kk < NK / 16; ++kk) {
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t r[4];
        LdMatrixX4Trans(r, vs + (kk * 16 + (lane % 8) + 8 * ((lane / 8) % 2)) * kLd + dp * 16 + 8 * (lane / 16));
        Mma<T>(o[2 * dp], pa[kk], r[0], r[1]);
        Mma<T>(o[2 * dp + 1], pa[kk], r[2], r[3]);
      }
    }
  }
  CpAsyncWait<0>();
  __syncthreads();  // the K/V space becomes the merge scratch

  // Merge the key groups: scratch o [kWarps][16][D] floats, then m and l [kWarps][16].
  float* so = reinterpret_cast<float*>(kv_s);
  float* sm = so + kWarps * 16 * D;
  float* sl = sm + kWarps * 16;
#pragma unroll
  for (int j = 0; j < D / 8; ++j) {
    const int c = j * 8 + (lane % 4) * 2;
    so[(warp * 16 + row0) * D + c] = o[j][0];
    so[(warp * 16 + row0) * D + c + 1] = o[j][1];
    so[(warp * 16 + row0 + 8) * D + c] = o[j][2];
    so[(warp * 16 + row0 + 8) * D + c + 1] = o[j][3];
  }
  if (lane % 4 == 0) {
    sm[warp * 16 + row0] = m0;
    sm[warp * 16 + row0 + 8] = m1;
    sl[warp * 16 + row0] = l0;
    sl[warp * 16 + row0 + 8] = l1;
  }
  __syncthreads();
  float* wo = nullptr;
  float* wml = nullptr;
  if (p.num_splits > 1) {  // workspace: o [B][S][H][D] floats, then (m, l) [B][S][H][2]
    const int64_t bs = static_cast<int64_t>(b) * p.num_splits + split;
    wo = p.workspace + bs * H * D;
    wml = p.workspace + static_cast<int64_t>(p.batch) * p.num_splits * H * D + bs * H * 2;
  }
  // Per head: the key groups' weights 2^(m_g - M) and the merged max and sum, once; then the outputs.
  float* sw = sl + kWarps * 16;  // [kWarps][16] weights, then [16 * MT] max, [16 * MT] sum
  float* sM = sw + kWarps * 16;
  float* sL = sM + 16 * MT;
  for (int h = tid; h < 16 * MT; h += kThreads) {
    const int hm = h / 16, hr = h % 16;
    float M = -INFINITY;
#pragma unroll
    for (int gg = 0; gg < KG; ++gg) M = fmaxf(M, sm[(gg * MT + hm) * 16 + hr]);
    float den = 0.f;
#pragma unroll
    for (int gg = 0; gg < KG; ++gg) {
      const int w = gg * MT + hm;
      const float mg = sm[w * 16 + hr];
      const float wgt = mg == -INFINITY ? 0.f : exp2f(mg - M);  // a key group with no key in this split
      sw[w * 16 + hr] = wgt;
      den += wgt * sl[w * 16 + hr];
    }
    sM[h] = M;
    sL[h] = den;
  }
  __syncthreads();
  T* out = static_cast<T*>(p.out) + static_cast<int64_t>(b) * p.out_stride;
  for (int i = tid; i < H * D; i += kThreads) {
    const int h = i / D, d = i % D, hm = h / 16, hr = h % 16;
    float num = 0.f;
#pragma unroll
    for (int gg = 0; gg < KG; ++gg) {
      const int w = gg * MT + hm;
      num += sw[w * 16 + hr] * so[(w * 16 + hr) * D + d];  // weight 0 for an empty key group (its o is 0)
    }
    if (p.num_splits == 1) {
      out[i] = FromFloat<T>(num / sL[h]);
    } else {
      wo[i] = num;
      if (d == 0) {
        wml[2 * h] = sM[h];  // -inf for an empty split: MergeSplits skips it
        wml[2 * h + 1] = sL[h];
      }
    }
  }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // The merge kernel (launched with programmatic stream serialisation) may start its prologue now.
  cudaTriggerProgrammaticLaunchCompletion();
#endif
}

// grid (H, B), D threads (>= 64 >= num_splits): out[b, h] = sum_s 2^(m_s - M) o_s / sum_s 2^(m_s - M) l_s over
// the non-empty splits. Thread s reads split s's max and sum, so the splits' weights cost one round trip; the
// output sums then read the splits' partial rows with independent, unrolled loads.
template <typename T>
__global__ void MergeSplits(PagedDecodeParams p) {
  __shared__ float weight[kMaxDecodeSplits];
  __shared__ float red_max[4], red_sum[4];
  const int h = blockIdx.x, b = blockIdx.y, d = threadIdx.x, H = p.heads, D = p.head_dim, S = p.num_splits;
  const int lane = d % 32, warp = d / 32;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cudaGridDependencySynchronize();  // launched early (programmatic dependent launch): wait for the partials
#endif
  const float* wml = p.workspace + static_cast<int64_t>(p.batch) * S * H * D;
  float ms = -INFINITY, ls = 0.f;
  if (d < S) {
    const int64_t i = ((static_cast<int64_t>(b) * S + d) * H + h) * 2;
    ms = wml[i];
    ls = wml[i + 1];
  }
  float m = ms;
  for (int o = 16; o > 0; o /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  if (lane == 0) red_max[warp] = m;
  __syncthreads();
  float M = red_max[0];
  for (int w = 1; w < static_cast<int>(blockDim.x) / 32; ++w) M = fmaxf(M, red_max[w]);
  const float w = (d < S && ms != -INFINITY) ? exp2f(ms - M) : 0.f;  // an empty split has max -inf
  if (d < S) weight[d] = w;
  float den = w * ls;
  for (int o = 16; o > 0; o /= 2) den += __shfl_xor_sync(0xffffffffu, den, o);
  if (lane == 0) red_sum[warp] = den;
  __syncthreads();
  den = 0.f;
  for (int i = 0; i < static_cast<int>(blockDim.x) / 32; ++i) den += red_sum[i];
  const float* o = p.workspace + (static_cast<int64_t>(b) * S * H + h) * D + d;  // split s at o + s * H * D
  float num = 0.f;
#pragma unroll 8
  for (int s = 0; s < S; ++s) num += weight[s] * o[static_cast<int64_t>(s) * H * D];
  static_cast<T*>(p.out)[static_cast<int64_t>(b) * p.out_stride + h * D + d] = FromFloat<T>(num / den);
}

template <typename T, int D, int MT>
cudaError_t LaunchDecodeMt(const PagedDecodeParams& p, cudaStream_t stream) {
  const size_t smem = Smem<T, D>{16 * MT}.total();
  // Opting in to more than 48 KiB of dynamic shared memory is per kernel and per device. It is done once per
  // device, before any capture can be in progress on that device.
  static std::atomic<uint64_t> opted{0};
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const uint64_t bit = uint64_t{1} << (device & 63);
  if (!(opted.load(std::memory_order_acquire) & bit)) {
    err = cudaFuncSetAttribute(PagedDecodeKernel<T, D, MT>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(smem));
    if (err != cudaSuccess) return err;
    opted.fetch_or(bit, std::memory_order_release);
  }
  PagedDecodeKernel<T, D, MT><<<dim3(p.num_splits, p.batch), kThreads, smem, stream>>>(p);
  if (p.num_splits > 1) {
    // Programmatic dependent launch: the merge kernel is scheduled while the split kernel drains, and waits for
    // its results in cudaGridDependencySynchronize; this hides one launch latency per decode step.
    cudaLaunchConfig_t config = {};
    config.gridDim = dim3(p.heads, p.batch);
    config.blockDim = dim3(D);
    config.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    config.attrs = attr;
    config.numAttrs = 1;
    err = cudaLaunchKernelEx(&config, MergeSplits<T>, p);
    if (err != cudaSuccess) return err;
  }
  return cudaGetLastError();
}

// Query row groups of 16: 1, 2 or 4 (heads 1-16, 17-32, 33-64).
int RowGroups(int heads) { return heads <= 16 ? 1 : heads <= 32 ? 2 : 4; }

template <typename T, int D>
cudaError_t LaunchDecode(const PagedDecodeParams& p, cudaStream_t stream) {
  switch (RowGroups(p.heads)) {
    case 1: return LaunchDecodeMt<T, D, 1>(p, stream);
    case 2: return LaunchDecodeMt<T, D, 2>(p, stream);
    default: return LaunchDecodeMt<T, D, 4>(p, stream);
  }
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
  return (head_dim == 64 || head_dim == 128) && heads >= 1 && heads <= 64;
}

size_t PagedDecodeWorkspaceBytes(int batch, int heads, int head_dim, int num_splits) {
  if (num_splits <= 1) return 0;
  return static_cast<size_t>(batch) * num_splits * heads * (head_dim + 2) * sizeof(float);
}

int PagedDecodeSplits(int batch, int max_seq_len, int heads, int head_dim, int sm_count) {
  if (batch <= 0) return 1;
  const int hp = 16 * RowGroups(heads);
  // Blocks resident per multiprocessor: the shared memory each needs (228 KiB per SM on Hopper, 1 KiB of it
  // reserved per block), at most two (the launch bounds).
  const size_t smem = head_dim == 64 ? Smem<__half, 64>{hp}.total() : Smem<__half, 128>{hp}.total();
  const int resident = std::max(1, std::min(2, static_cast<int>((228 * 1024) / (smem + 1024))));
  const int want = sm_count * resident;
  if (batch >= want) return 1;
  // At most one wave of blocks (a second, partial wave would run alone), each with a tile or more. (A sweep of
  // every split count on an H100, bench/kernels, found this within 10% of the best at B = 1..256, L = 1k..8k.)
  const int tiles = (max_seq_len + kTile - 1) / kTile;
  int splits = want / batch;
  splits = std::min(splits, std::max(1, tiles));
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

int SmCount(int device, int* count) { return cudaDeviceGetAttribute(count, cudaDevAttrMultiProcessorCount, device); }

}  // namespace mqa::core::cuda
