#include "mqa/core/block_pool.h"

#include <cstdio>
#include <cstdlib>
#include <string>

namespace mqa::core {
namespace {

// A bad block id reaching the pool means two sessions could end up sharing cache slots, i.e. reading each
// other's keys and values. Nothing downstream can recover from that, so stop loudly instead of returning a
// Status somebody might ignore.
[[noreturn]] void Die(const char* what, long long value) {
  std::fprintf(stderr, "mqa::core block accounting: %s (%lld)\n", what, value);
  std::fflush(stderr);
  std::abort();
}

}  // namespace

BlockPool::BlockPool(int32_t num_blocks, int32_t block_size) : num_blocks_(num_blocks), block_size_(block_size) {
  if (num_blocks < 1) Die("num_blocks must be >= 1", num_blocks);
  if (block_size < 1) Die("block_size must be >= 1", block_size);
  allocated_.assign(static_cast<size_t>(num_blocks), false);
  // Pushed in descending order so the first allocations come out as 1, 2, 3, ...: deterministic ids make logs
  // and test failures easier to read. Block 0 is never on the stack.
  free_.reserve(static_cast<size_t>(num_blocks - 1));
  for (int32_t b = num_blocks - 1; b >= 1; --b) free_.push_back(b);
}

int32_t BlockPool::free_blocks() const {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<int32_t>(free_.size());
}

int32_t BlockPool::used_blocks() const {
  std::lock_guard<std::mutex> lock(mu_);
  return capacity() - static_cast<int32_t>(free_.size());
}

int64_t BlockPool::BlocksFor(int64_t tokens, int32_t block_size) {
  if (tokens <= 0) return 0;
  // Division first: tokens + block_size - 1 could overflow for tokens near INT64_MAX.
  return tokens / block_size + (tokens % block_size != 0 ? 1 : 0);
}

Status BlockPool::Allocate(int64_t n, std::vector<int32_t>* out) {
  if (n < 0) return InvalidArgumentError("cannot allocate a negative number of blocks: " + std::to_string(n));
  if (n == 0) return Status::Ok();
  std::lock_guard<std::mutex> lock(mu_);
  const auto free_count = static_cast<int64_t>(free_.size());
  if (n > free_count) {
    return ResourceExhaustedError("KV cache full: " + std::to_string(n) + " blocks of " + std::to_string(block_size_) +
                                  " tokens needed, " + std::to_string(free_count) + " of " +
                                  std::to_string(capacity()) + " free");
  }
  // Reserve before touching the pool: if this throws, neither *out nor the free list has changed, which keeps
  // the all-or-nothing promise even under bad_alloc.
  out->reserve(out->size() + static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    const int32_t b = free_.back();
    free_.pop_back();
    allocated_[static_cast<size_t>(b)] = true;
    out->push_back(b);
  }
  return Status::Ok();
}

void BlockPool::Release(std::vector<int32_t>* blocks) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (const int32_t b : *blocks) {
      if (b == 0) Die("release of reserved block 0", b);
      if (b < 0 || b >= num_blocks_) Die("release of out-of-range block", b);
      if (!allocated_[static_cast<size_t>(b)]) Die("release of a block that is not allocated (double release?)", b);
      allocated_[static_cast<size_t>(b)] = false;
      // free_ had capacity num_blocks - 1 from the start and never holds more, so this cannot reallocate.
      free_.push_back(b);
    }
  }
  blocks->clear();
}

BlockTable::BlockTable(BlockPool* pool) : pool_(pool) {}

BlockTable::~BlockTable() { Release(); }

Status BlockTable::EnsureCapacity(int64_t tokens) {
  const int64_t needed = BlockPool::BlocksFor(tokens, pool_->block_size());
  const auto have = static_cast<int64_t>(blocks_.size());
  if (needed <= have) return Status::Ok();
  return pool_->Allocate(needed - have, &blocks_);
}

void BlockTable::Release() {
  if (!blocks_.empty()) pool_->Release(&blocks_);
}

int64_t BlockTable::capacity_tokens() const { return static_cast<int64_t>(blocks_.size()) * pool_->block_size(); }

int64_t BlockTable::Slot(int64_t position) const {
  const int32_t bs = pool_->block_size();
  // One compare per token is cheap next to what an out-of-range index would do: write into another session's
  // block (or block 0, which padding relies on being zero).
  if (position < 0 || position >= static_cast<int64_t>(blocks_.size()) * bs) {
    Die("BlockTable::Slot position outside the table's capacity", position);
  }
  return static_cast<int64_t>(blocks_[static_cast<size_t>(position / bs)]) * bs + position % bs;
}

}  // namespace mqa::core
