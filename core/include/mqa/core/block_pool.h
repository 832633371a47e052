// Block accounting for the paged KV cache: which fixed-size blocks of cache slots are free, and which blocks a
// session holds. Pure bookkeeping (no tensors), so it is tested without LibTorch; the engine keeps the storage.
//
// Block 0 is reserved and never handed out: the engine keeps its slots zeroed and points the padding of batched
// attention at it, so padding never reads another session's data.
#ifndef MQA_CORE_BLOCK_POOL_H_
#define MQA_CORE_BLOCK_POOL_H_

#include <cstdint>
#include <mutex>
#include <vector>

#include "mqa/core/status.h"

namespace mqa::core {

// Thread-safe: every member may be called from any thread.
class BlockPool {
 public:
  // num_blocks counts block 0, so num_blocks - 1 blocks can be allocated. block_size >= 1, num_blocks >= 1.
  BlockPool(int32_t num_blocks, int32_t block_size);
  BlockPool(const BlockPool&) = delete;
  BlockPool& operator=(const BlockPool&) = delete;

  int32_t block_size() const { return block_size_; }
  int32_t num_blocks() const { return num_blocks_; }  // including the reserved block 0
  int32_t capacity() const { return num_blocks_ - 1; }
  int32_t free_blocks() const;
  int32_t used_blocks() const;

  // Blocks needed to hold `tokens` tokens: ceil(tokens / block_size).
  static int64_t BlocksFor(int64_t tokens, int32_t block_size);

  // Appends n distinct free blocks to *out, all or nothing: RESOURCE_EXHAUSTED (saying how many were asked for
  // and how many are free) leaves *out and the pool unchanged.
  Status Allocate(int64_t n, std::vector<int32_t>* out);
  // Returns blocks to the pool and clears *blocks. Each must have been allocated and not yet released: block 0,
  // an out-of-range id, or a block not currently allocated (e.g. released twice) is a programming error and
  // aborts the process with a message on stderr rather than corrupt the free list.
  void Release(std::vector<int32_t>* blocks);

 private:
  const int32_t num_blocks_;
  const int32_t block_size_;
  mutable std::mutex mu_;
  std::vector<int32_t> free_;    // a stack: recently released blocks are reused first
  std::vector<bool> allocated_;  // guards against double release
};

// The blocks of one session, in token order. Not thread-safe (its owner serialises access). Releases its blocks
// on destruction.
class BlockTable {
 public:
  explicit BlockTable(BlockPool* pool);
  ~BlockTable();
  BlockTable(const BlockTable&) = delete;
  BlockTable& operator=(const BlockTable&) = delete;

  // Grows the table until it holds at least `tokens` tokens. On RESOURCE_EXHAUSTED nothing changes.
  Status EnsureCapacity(int64_t tokens);
  // Returns every block to the pool; capacity becomes 0.
  void Release();

  int64_t capacity_tokens() const;
  const std::vector<int32_t>& blocks() const { return blocks_; }
  // The slot (block * block_size + offset) holding token `position`; 0 <= position < capacity_tokens(), else
  // aborts (a programming error).
  int64_t Slot(int64_t position) const;

 private:
  BlockPool* const pool_;
  std::vector<int32_t> blocks_;
};

}  // namespace mqa::core

#endif  // MQA_CORE_BLOCK_POOL_H_
