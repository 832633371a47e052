// Framework-free CUDA kernels of the paged MQA layer (no LibTorch and no CUDA types in this header, so torch
// sources can include it). Every launcher returns a cudaError_t value as int (0 = cudaSuccess) and takes the
// stream as a cudaStream_t passed through `void*` (nullptr = the legacy default stream). Launchers never
// synchronise and never allocate, so they may be captured into a CUDA graph.
//
// The paged KV cache of one layer is two arrays k_cache, v_cache of [num_slots, head_dim] elements, where
// slot = block * block_size + offset: a session's token at position p lives in slot
// block_table[p / block_size] * block_size + p % block_size. MQA: one K/V head is shared by all query heads.
#ifndef MQA_CORE_CUDA_PAGED_MQA_H_
#define MQA_CORE_CUDA_PAGED_MQA_H_

#include <cstddef>
#include <cstdint>

namespace mqa::core::cuda {

enum class KvType : int { kBFloat16 = 0, kFloat16 = 1 };

// One decode step of B sessions: each session's single new query token (all H heads) attends to the first
// seq_lens[b] keys of its paged cache (the new token's key included, so seq_lens[b] >= 1). All H heads of a
// session are the rows of one tensor-core product against each K/V tile, so every K/V element is read once per
// session. Long sequences are split into `num_splits` ranges computed by different thread blocks and merged by
// a second kernel (log-sum-exp), so that a few long sessions still fill the GPU.
struct PagedDecodeParams {
  KvType dtype = KvType::kBFloat16;
  int batch = 0;            // B
  int heads = 0;            // H query heads, 1..64
  int head_dim = 0;         // D: 64 or 128
  const void* q = nullptr;  // [B, H * D], row b at q + b * q_stride elements
  int64_t q_stride = 0;
  const void* k_cache = nullptr;          // [num_slots, D]
  const void* v_cache = nullptr;          // [num_slots, D]
  const int32_t* block_tables = nullptr;  // [B, block_table_stride] block ids (only the used prefix is read)
  int block_table_stride = 0;
  const int32_t* seq_lens = nullptr;    // [B] keys to attend to, >= 1
  int block_size = 16;                  // tokens per block, >= 1
  float scale = 1.0f;                   // softmax scale applied to q.k
  const float* alibi_slopes = nullptr;  // [H] or nullptr: adds slope_h * (j - (seq_len - 1)) to key j
  const int32_t* alibi_on = nullptr;    // [B] 0 or 1, or nullptr (all sessions, when slopes are given)
  void* out = nullptr;                  // [B, H * D], row b at out + b * out_stride elements
  int64_t out_stride = 0;
  int num_splits = 1;          // >= 1; > 1 needs workspace
  float* workspace = nullptr;  // PagedDecodeWorkspaceBytes(batch, heads, head_dim, num_splits)
};

// True when PagedDecode serves this shape (head_dim 64 or 128, 1 to 64 heads).
bool PagedDecodeSupports(int heads, int head_dim);

// Bytes of workspace PagedDecode needs for num_splits > 1 (0 for one split).
size_t PagedDecodeWorkspaceBytes(int batch, int heads, int head_dim, int num_splits);

// A split count that fills `sm_count` multiprocessors for B sessions whose longest has max_seq_len keys, while
// giving each split at least one tile of 64 keys, in at most one wave. Capped at kMaxDecodeSplits.
inline constexpr int kMaxDecodeSplits = 64;
int PagedDecodeSplits(int batch, int max_seq_len, int heads, int head_dim, int sm_count);

int PagedDecode(const PagedDecodeParams& params, void* stream);

// KV append: for t in [0, tokens): k_cache[slots[t]] = k_src[t], v_cache[slots[t]] = v_src[t], rows of head_dim
// elements of `dtype`; source rows at k_src + t * k_src_stride elements (so k and v can be read in place from the
// QKV projection's output). A negative slot skips its row (padding of a captured batch). head_dim must be a
// multiple of 8 and both row addresses 16-byte aligned.
int KvAppend(KvType dtype, int tokens, int head_dim, const void* k_src, int64_t k_src_stride, const void* v_src,
             int64_t v_src_stride, const int64_t* slots, void* k_cache, void* v_cache, void* stream);

// Multiprocessor count of `device` into *count.
int SmCount(int device, int* count);

}  // namespace mqa::core::cuda

#endif  // MQA_CORE_CUDA_PAGED_MQA_H_
