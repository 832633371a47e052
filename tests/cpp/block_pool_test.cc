// Block accounting of the paged KV cache. Links only mqa_core_api: no LibTorch, so these run (and fail) on
// any machine in milliseconds.
#include "mqa/core/block_pool.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

namespace mqa::core {
namespace {

// Fresh per run unless MQA_TEST_SEED is set; printed once so a failure can be replayed. (test_util.h has the
// same helper but pulls in tensor headers; this binary stays on the torch-free API.)
uint64_t RunSeed() {
  static const uint64_t seed = [] {
    const char* env = std::getenv("MQA_TEST_SEED");
    const uint64_t s = env != nullptr ? std::strtoull(env, nullptr, 10)
                                      : (static_cast<uint64_t>(std::random_device{}()) << 32) ^ std::random_device{}();
    std::printf("[mqa-test] seed=%llu (replay with MQA_TEST_SEED=%llu)\n", static_cast<unsigned long long>(s),
                static_cast<unsigned long long>(s));
    std::fflush(stdout);
    return s;
  }();
  return seed;
}

// Every block of the pool is in exactly one of: `held` (the blocks callers hold) or the free list. The free list
// is not observable, so drain it: whatever Allocate hands out must be exactly the blocks nobody holds. Putting
// them back leaves counts unchanged (only the order of the free stack changes).
void ExpectPartition(BlockPool& pool, const std::vector<const std::vector<int32_t>*>& held) {
  ASSERT_EQ(pool.used_blocks() + pool.free_blocks(), pool.capacity());
  std::vector<int> seen(static_cast<size_t>(pool.num_blocks()), 0);
  int64_t held_count = 0;
  for (const auto* blocks : held) {
    for (const int32_t b : *blocks) {
      ASSERT_GE(b, 1) << "block 0 (or a negative id) handed out";
      ASSERT_LT(b, pool.num_blocks());
      ASSERT_EQ(seen[static_cast<size_t>(b)]++, 0) << "block " << b << " held twice";
      ++held_count;
    }
  }
  ASSERT_EQ(held_count, pool.used_blocks());
  std::vector<int32_t> rest;
  ASSERT_TRUE(pool.Allocate(pool.free_blocks(), &rest).ok());
  for (const int32_t b : rest) {
    ASSERT_GE(b, 1);
    ASSERT_LT(b, pool.num_blocks());
    ASSERT_EQ(seen[static_cast<size_t>(b)]++, 0) << "block " << b << " is both held and free";
  }
  ASSERT_EQ(pool.free_blocks(), 0);
  pool.Release(&rest);
  ASSERT_EQ(held_count + pool.free_blocks(), pool.capacity());
}

TEST(BlockPoolTest, FreshPoolCounts) {
  BlockPool pool(10, 16);
  EXPECT_EQ(pool.num_blocks(), 10);
  EXPECT_EQ(pool.capacity(), 9);
  EXPECT_EQ(pool.block_size(), 16);
  EXPECT_EQ(pool.free_blocks(), 9);
  EXPECT_EQ(pool.used_blocks(), 0);
}

TEST(BlockPoolTest, BlocksForRoundsUp) {
  EXPECT_EQ(BlockPool::BlocksFor(0, 16), 0);
  EXPECT_EQ(BlockPool::BlocksFor(-3, 16), 0);
  EXPECT_EQ(BlockPool::BlocksFor(1, 16), 1);
  EXPECT_EQ(BlockPool::BlocksFor(15, 16), 1);
  EXPECT_EQ(BlockPool::BlocksFor(16, 16), 1);
  EXPECT_EQ(BlockPool::BlocksFor(17, 16), 2);
  EXPECT_EQ(BlockPool::BlocksFor(32, 16), 2);
  EXPECT_EQ(BlockPool::BlocksFor(33, 16), 3);
  EXPECT_EQ(BlockPool::BlocksFor(7, 1), 7);
  EXPECT_EQ(BlockPool::BlocksFor(INT64_MAX, 1), INT64_MAX);
  EXPECT_EQ(BlockPool::BlocksFor(INT64_MAX, 2), INT64_MAX / 2 + 1);
}

TEST(BlockPoolTest, AllocatesDistinctBlocksAndNeverBlockZero) {
  BlockPool pool(65, 4);
  std::vector<int32_t> blocks;
  ASSERT_TRUE(pool.Allocate(64, &blocks).ok());
  ASSERT_EQ(blocks.size(), 64u);
  EXPECT_EQ(std::set<int32_t>(blocks.begin(), blocks.end()).size(), 64u);
  EXPECT_EQ(*std::min_element(blocks.begin(), blocks.end()), 1);
  EXPECT_EQ(*std::max_element(blocks.begin(), blocks.end()), 64);
  EXPECT_EQ(pool.used_blocks(), 64);
  EXPECT_EQ(pool.free_blocks(), 0);
  pool.Release(&blocks);
  EXPECT_TRUE(blocks.empty());
  EXPECT_EQ(pool.used_blocks(), 0);
}

TEST(BlockPoolTest, AllocateAppendsToWhatIsThere) {
  BlockPool pool(10, 16);
  std::vector<int32_t> blocks;
  ASSERT_TRUE(pool.Allocate(2, &blocks).ok());
  const std::vector<int32_t> first = blocks;
  ASSERT_TRUE(pool.Allocate(3, &blocks).ok());
  ASSERT_EQ(blocks.size(), 5u);
  EXPECT_TRUE(std::equal(first.begin(), first.end(), blocks.begin()));
  ExpectPartition(pool, {&blocks});
  pool.Release(&blocks);
}

TEST(BlockPoolTest, ZeroIsANoOpAndNegativeIsInvalid) {
  BlockPool pool(10, 16);
  std::vector<int32_t> blocks;
  EXPECT_TRUE(pool.Allocate(0, &blocks).ok());
  EXPECT_TRUE(blocks.empty());
  EXPECT_EQ(pool.free_blocks(), 9);
  const Status s = pool.Allocate(-1, &blocks);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
  EXPECT_TRUE(blocks.empty());
  EXPECT_EQ(pool.free_blocks(), 9);
  std::vector<int32_t> none;
  pool.Release(&none);  // releasing nothing is fine
  EXPECT_EQ(pool.free_blocks(), 9);
}

TEST(BlockPoolTest, ExhaustionIsAllOrNothing) {
  BlockPool pool(1001, 16);
  std::vector<int32_t> big;
  ASSERT_TRUE(pool.Allocate(997, &big).ok());
  std::vector<int32_t> blocks = {42, 43};  // caller's existing contents must survive a failed Allocate
  const Status s = pool.Allocate(5, &blocks);
  EXPECT_EQ(s.code(), StatusCode::kResourceExhausted);
  EXPECT_EQ(s.message(), "KV cache full: 5 blocks of 16 tokens needed, 3 of 1000 free");
  EXPECT_EQ(blocks, (std::vector<int32_t>{42, 43}));
  EXPECT_EQ(pool.free_blocks(), 3);
  EXPECT_EQ(pool.used_blocks(), 997);
  blocks.clear();
  ASSERT_TRUE(pool.Allocate(3, &blocks).ok());  // exactly what is left still fits
  EXPECT_EQ(pool.free_blocks(), 0);
  ExpectPartition(pool, {&big, &blocks});
  pool.Release(&big);
  pool.Release(&blocks);
  EXPECT_EQ(pool.used_blocks(), 0);
}

TEST(BlockPoolTest, HugeRequestIsExhaustedNotTruncated) {
  BlockPool pool(10, 16);
  std::vector<int32_t> blocks;
  EXPECT_EQ(pool.Allocate(int64_t{1} << 40, &blocks).code(), StatusCode::kResourceExhausted);
  EXPECT_TRUE(blocks.empty());
  EXPECT_EQ(pool.free_blocks(), 9);
}

TEST(BlockPoolTest, PoolOfOnlyBlockZeroHandsOutNothing) {
  BlockPool pool(1, 16);
  EXPECT_EQ(pool.capacity(), 0);
  std::vector<int32_t> blocks;
  EXPECT_TRUE(pool.Allocate(0, &blocks).ok());
  EXPECT_EQ(pool.Allocate(1, &blocks).code(), StatusCode::kResourceExhausted);
  EXPECT_TRUE(blocks.empty());
}

TEST(BlockPoolTest, ReleasedBlocksAreReusedMostRecentFirst) {
  BlockPool pool(10, 16);
  std::vector<int32_t> a, b;
  ASSERT_TRUE(pool.Allocate(3, &a).ok());
  ASSERT_TRUE(pool.Allocate(3, &b).ok());
  const int32_t last_released = a.back();
  const std::set<int32_t> freed(a.begin(), a.end());
  pool.Release(&a);
  std::vector<int32_t> c;
  ASSERT_TRUE(pool.Allocate(1, &c).ok());
  EXPECT_EQ(c[0], last_released);  // LIFO: the block still warm in cache comes back first
  ASSERT_TRUE(pool.Allocate(2, &c).ok());
  EXPECT_EQ(std::set<int32_t>(c.begin(), c.end()), freed);
  ExpectPartition(pool, {&b, &c});
  pool.Release(&b);
  pool.Release(&c);
}

TEST(BlockTableTest, GrowsOnlyWhenNeeded) {
  BlockPool pool(100, 16);
  BlockTable table(&pool);
  EXPECT_EQ(table.capacity_tokens(), 0);
  ASSERT_TRUE(table.EnsureCapacity(0).ok());
  EXPECT_TRUE(table.blocks().empty());
  ASSERT_TRUE(table.EnsureCapacity(1).ok());
  EXPECT_EQ(table.blocks().size(), 1u);
  EXPECT_EQ(table.capacity_tokens(), 16);
  ASSERT_TRUE(table.EnsureCapacity(16).ok());
  EXPECT_EQ(table.blocks().size(), 1u);
  ASSERT_TRUE(table.EnsureCapacity(17).ok());
  EXPECT_EQ(table.blocks().size(), 2u);
  EXPECT_EQ(table.capacity_tokens(), 32);
  const std::vector<int32_t> before = table.blocks();
  ASSERT_TRUE(table.EnsureCapacity(100).ok());
  EXPECT_EQ(table.blocks().size(), 7u);  // ceil(100 / 16)
  EXPECT_EQ(table.capacity_tokens(), 112);
  EXPECT_TRUE(std::equal(before.begin(), before.end(), table.blocks().begin())) << "growth moved old blocks";
  ASSERT_TRUE(table.EnsureCapacity(5).ok());  // never shrinks
  EXPECT_EQ(table.blocks().size(), 7u);
  EXPECT_EQ(pool.used_blocks(), 7);
}

TEST(BlockTableTest, SlotsCrossBlockBoundaries) {
  BlockPool pool(100, 16);
  std::vector<int32_t> spacer;  // so the table's blocks are not 1, 2, 3 and a wrong formula shows
  ASSERT_TRUE(pool.Allocate(5, &spacer).ok());
  BlockTable table(&pool);
  ASSERT_TRUE(table.EnsureCapacity(40).ok());
  ASSERT_EQ(table.blocks().size(), 3u);
  const auto& b = table.blocks();
  EXPECT_EQ(table.Slot(0), int64_t{b[0]} * 16);
  EXPECT_EQ(table.Slot(15), int64_t{b[0]} * 16 + 15);
  EXPECT_EQ(table.Slot(16), int64_t{b[1]} * 16);
  EXPECT_EQ(table.Slot(17), int64_t{b[1]} * 16 + 1);
  EXPECT_EQ(table.Slot(31), int64_t{b[1]} * 16 + 15);
  EXPECT_EQ(table.Slot(32), int64_t{b[2]} * 16);
  EXPECT_EQ(table.Slot(47), int64_t{b[2]} * 16 + 15);
  std::set<int64_t> slots;
  for (int64_t p = 0; p < table.capacity_tokens(); ++p) {
    const int64_t s = table.Slot(p);
    EXPECT_GE(s, 16) << "slot in block 0";
    EXPECT_LT(s, int64_t{pool.num_blocks()} * 16);
    slots.insert(s);
  }
  EXPECT_EQ(slots.size(), 48u);
  pool.Release(&spacer);
}

TEST(BlockTableTest, FailedGrowthChangesNothing) {
  BlockPool pool(6, 16);  // 5 usable blocks
  BlockTable a(&pool);
  BlockTable b(&pool);
  ASSERT_TRUE(a.EnsureCapacity(48).ok());  // 3 blocks
  ASSERT_TRUE(b.EnsureCapacity(16).ok());  // 1 block
  const std::vector<int32_t> before = b.blocks();
  const Status s = b.EnsureCapacity(16 * 3);  // needs 2 more, 1 free
  EXPECT_EQ(s.code(), StatusCode::kResourceExhausted);
  EXPECT_EQ(s.message(), "KV cache full: 2 blocks of 16 tokens needed, 1 of 5 free");
  EXPECT_EQ(b.blocks(), before);
  EXPECT_EQ(b.capacity_tokens(), 16);
  EXPECT_EQ(pool.free_blocks(), 1);
  ASSERT_TRUE(b.EnsureCapacity(32).ok());  // the one that fits still does
  EXPECT_EQ(pool.free_blocks(), 0);
  ExpectPartition(pool, {&a.blocks(), &b.blocks()});
}

TEST(BlockTableTest, ReleasesOnDestructionAndOnRelease) {
  BlockPool pool(20, 8);
  {
    BlockTable table(&pool);
    ASSERT_TRUE(table.EnsureCapacity(50).ok());
    EXPECT_EQ(pool.used_blocks(), 7);
  }
  EXPECT_EQ(pool.used_blocks(), 0);
  {
    BlockTable table(&pool);
    ASSERT_TRUE(table.EnsureCapacity(9).ok());
    EXPECT_EQ(pool.used_blocks(), 2);
    table.Release();
    EXPECT_EQ(pool.used_blocks(), 0);
    EXPECT_TRUE(table.blocks().empty());
    EXPECT_EQ(table.capacity_tokens(), 0);
    table.Release();                            // idempotent: nothing left to give back
    ASSERT_TRUE(table.EnsureCapacity(1).ok());  // usable again after Release
    EXPECT_EQ(pool.used_blocks(), 1);
  }  // destructor after an explicit Release must not release twice (that would abort)
  EXPECT_EQ(pool.used_blocks(), 0);
  EXPECT_EQ(pool.free_blocks(), 19);
}

TEST(BlockTableTest, ReleasedBlocksGoToTheNextSession) {
  BlockPool pool(4, 16);  // 3 usable blocks
  std::set<int32_t> first;
  {
    BlockTable table(&pool);
    ASSERT_TRUE(table.EnsureCapacity(48).ok());
    first.insert(table.blocks().begin(), table.blocks().end());
    BlockTable other(&pool);
    EXPECT_EQ(other.EnsureCapacity(1).code(), StatusCode::kResourceExhausted);
  }
  BlockTable next(&pool);
  ASSERT_TRUE(next.EnsureCapacity(48).ok());
  EXPECT_EQ(std::set<int32_t>(next.blocks().begin(), next.blocks().end()), first);
}

// Programming errors abort rather than corrupt the free list.
TEST(BlockPoolDeathTest, DoubleReleaseAborts) {
  BlockPool pool(10, 16);
  std::vector<int32_t> blocks;
  ASSERT_TRUE(pool.Allocate(2, &blocks).ok());
  std::vector<int32_t> copy = blocks;
  pool.Release(&blocks);
  EXPECT_DEATH(pool.Release(&copy), "not allocated");
}

TEST(BlockPoolDeathTest, DuplicateInOneReleaseAborts) {
  BlockPool pool(10, 16);
  std::vector<int32_t> blocks;
  ASSERT_TRUE(pool.Allocate(1, &blocks).ok());
  blocks.push_back(blocks[0]);
  EXPECT_DEATH(pool.Release(&blocks), "not allocated");
}

TEST(BlockPoolDeathTest, NeverAllocatedBlockAborts) {
  BlockPool pool(10, 16);
  std::vector<int32_t> blocks = {5};
  EXPECT_DEATH(pool.Release(&blocks), "not allocated");
}

TEST(BlockPoolDeathTest, BlockZeroAborts) {
  BlockPool pool(10, 16);
  std::vector<int32_t> blocks = {0};
  EXPECT_DEATH(pool.Release(&blocks), "reserved block 0");
}

TEST(BlockPoolDeathTest, OutOfRangeBlockAborts) {
  BlockPool pool(10, 16);
  std::vector<int32_t> past_end = {10};
  EXPECT_DEATH(pool.Release(&past_end), "out-of-range");
  std::vector<int32_t> negative = {-1};
  EXPECT_DEATH(pool.Release(&negative), "out-of-range");
}

TEST(BlockPoolDeathTest, ForeignBlockAborts) {
  BlockPool mine(10, 16);
  BlockPool theirs(100, 16);
  std::vector<int32_t> their_blocks;
  ASSERT_TRUE(theirs.Allocate(20, &their_blocks).ok());
  std::vector<int32_t> beyond = {their_blocks.back()};  // block 20: does not exist in `mine`
  EXPECT_DEATH(mine.Release(&beyond), "out-of-range");
  std::vector<int32_t> unallocated_here = {their_blocks.front()};  // block 1: exists in `mine`, not allocated
  EXPECT_DEATH(mine.Release(&unallocated_here), "not allocated");
  theirs.Release(&their_blocks);
}

TEST(BlockPoolDeathTest, SlotOutsideCapacityAborts) {
  BlockPool pool(10, 16);
  BlockTable table(&pool);
  ASSERT_TRUE(table.EnsureCapacity(16).ok());
  EXPECT_DEATH((void)table.Slot(16), "outside");
  EXPECT_DEATH((void)table.Slot(-1), "outside");
}

// A session as the engine will hold one: a table, a token count, a guaranteed reservation, and an idle deadline.
struct FakeSession {
  std::unique_ptr<BlockTable> table;
  int64_t tokens = 0;
  int64_t reserved = 0;
  int64_t expires_at = 0;
};

// Random sessions against a small pool, so exhaustion is routine; every invariant is checked after every op.
TEST(BlockPoolRandomTest, SessionsComeAndGoWithoutLeaksOrSharing) {
  const uint64_t seed = RunSeed();
  SCOPED_TRACE("seed=" + std::to_string(seed));
  std::mt19937_64 rng(seed);
  auto uniform = [&rng](int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); };

  constexpr int kOps = 20000;
  constexpr int kMaxLive = 64;
  constexpr int32_t kBlockSize = 16;
  BlockPool pool(257, kBlockSize);
  std::map<int, FakeSession> live;
  int next_id = 0;
  int64_t now = 0;
  int created = 0, rejected = 0, grown = 0, exhausted = 0, closed = 0, expired = 0;

  auto check = [&](int op) {
    std::vector<const std::vector<int32_t>*> held;
    for (const auto& [id, s] : live) {
      held.push_back(&s.table->blocks());
      ASSERT_EQ(static_cast<int64_t>(s.table->blocks().size()),
                BlockPool::BlocksFor(std::max(s.tokens, s.reserved), kBlockSize))
          << "session " << id << " at op " << op;
    }
    ExpectPartition(pool, held);
  };

  for (int op = 0; op < kOps; ++op) {
    now += uniform(1, 3);
    const int64_t kind = uniform(0, 99);
    if (kind < 25 && static_cast<int>(live.size()) < kMaxLive) {
      // Create with a reservation of random size: all of it up front, or the session is refused.
      FakeSession s;
      s.table = std::make_unique<BlockTable>(&pool);
      s.reserved = uniform(0, 400);
      s.expires_at = now + uniform(20, 400);
      const int32_t free_before = pool.free_blocks();
      const Status st = s.table->EnsureCapacity(s.reserved);
      if (st.ok()) {
        ASSERT_GE(s.table->capacity_tokens(), s.reserved);
        live.emplace(next_id++, std::move(s));
        ++created;
      } else {
        ASSERT_EQ(st.code(), StatusCode::kResourceExhausted) << st.ToString();
        ASSERT_TRUE(s.table->blocks().empty());
        ASSERT_EQ(pool.free_blocks(), free_before);
        ++rejected;
      }
    } else if (kind < 85 && !live.empty()) {
      // Grow a random session (a step or a prefill); it also counts as activity for its TTL.
      auto it = std::next(live.begin(), uniform(0, static_cast<int64_t>(live.size()) - 1));
      FakeSession& s = it->second;
      const int64_t want = s.tokens + uniform(1, 70);
      const std::vector<int32_t> before = s.table->blocks();
      const int32_t free_before = pool.free_blocks();
      const Status st = s.table->EnsureCapacity(want);
      if (st.ok()) {
        s.tokens = want;
        s.expires_at = now + uniform(20, 400);
        ASSERT_GE(s.table->capacity_tokens(), want);
        ASSERT_TRUE(std::equal(before.begin(), before.end(), s.table->blocks().begin()));
        // The newest token lands in the block the slot formula says.
        const int64_t last = want - 1;
        ASSERT_EQ(s.table->Slot(last) / kBlockSize, s.table->blocks()[static_cast<size_t>(last / kBlockSize)]);
        ASSERT_EQ(s.table->Slot(last) % kBlockSize, last % kBlockSize);
        ++grown;
      } else {
        ASSERT_EQ(st.code(), StatusCode::kResourceExhausted) << st.ToString();
        ASSERT_EQ(s.table->blocks(), before);
        ASSERT_EQ(pool.free_blocks(), free_before);
        ++exhausted;
      }
    } else if (kind < 95 && !live.empty()) {
      // Close: half by explicit Release then destruction, half by destruction alone.
      auto it = std::next(live.begin(), uniform(0, static_cast<int64_t>(live.size()) - 1));
      if (uniform(0, 1) == 0) it->second.table->Release();
      live.erase(it);
      ++closed;
    } else {
      // TTL sweep: an idle session is closed exactly like an explicit close.
      for (auto it = live.begin(); it != live.end();) {
        if (it->second.expires_at <= now) {
          it = live.erase(it);
          ++expired;
        } else {
          ++it;
        }
      }
    }
    check(op);
    if (::testing::Test::HasFatalFailure()) {
      FAIL() << "invariant broken at op " << op;
    }
  }
  live.clear();
  EXPECT_EQ(pool.used_blocks(), 0);
  EXPECT_EQ(pool.free_blocks(), pool.capacity());
  ExpectPartition(pool, {});
  std::printf(
      "[mqa-test] random sessions: %d created, %d refused, %d grown, %d growth refused, %d closed, "
      "%d expired\n",
      created, rejected, grown, exhausted, closed, expired);
  EXPECT_GE(created, 50);
  EXPECT_GT(rejected + exhausted, 0) << "the pool never filled up: the exhaustion paths went untested";
  EXPECT_GT(expired, 0);
}

// Eight threads allocating and releasing against one pool. Ownership of each block is tracked in an atomic
// array, so a block handed to two holders at once is caught the moment it happens.
TEST(BlockPoolThreadTest, ConcurrentAllocateAndRelease) {
  const uint64_t seed = RunSeed();
  SCOPED_TRACE("seed=" + std::to_string(seed));
  constexpr int kThreads = 8;
  constexpr int kOpsPerThread = 20000;
  BlockPool pool(129, 16);
  std::vector<std::atomic<int>> owner(static_cast<size_t>(pool.num_blocks()));
  for (auto& o : owner) o.store(-1);
  std::atomic<int> sharing_errors{0}, bad_ids{0}, exhausted{0};

  auto claim = [&](const std::vector<int32_t>& blocks, size_t from, int me) {
    for (size_t i = from; i < blocks.size(); ++i) {
      const int32_t b = blocks[i];
      if (b < 1 || b >= pool.num_blocks()) {
        bad_ids.fetch_add(1);
        continue;
      }
      int expected = -1;
      if (!owner[static_cast<size_t>(b)].compare_exchange_strong(expected, me)) sharing_errors.fetch_add(1);
    }
  };
  // Ownership is dropped before the blocks go back: afterwards another thread may legitimately get them.
  auto disown = [&](const std::vector<int32_t>& blocks, int me) {
    for (const int32_t b : blocks) {
      if (b < 1 || b >= pool.num_blocks()) continue;
      int expected = me;
      if (!owner[static_cast<size_t>(b)].compare_exchange_strong(expected, -1)) sharing_errors.fetch_add(1);
    }
  };

  // Threads start together; otherwise each may finish its ops before the next one is even scheduled.
  std::atomic<int> ready{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      ready.fetch_add(1);
      while (ready.load() < kThreads) std::this_thread::yield();
      std::mt19937_64 rng(seed + 0x9E3779B97F4A7C15ull * static_cast<uint64_t>(t + 1));
      auto uniform = [&rng](int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); };
      std::vector<std::vector<int32_t>> mine(4);  // raw allocations
      std::vector<std::unique_ptr<BlockTable>> tables(4);
      std::vector<int64_t> table_tokens(4, 0);
      for (int op = 0; op < kOpsPerThread; ++op) {
        const auto k = static_cast<size_t>(uniform(0, 3));
        switch (uniform(0, 3)) {
          case 0: {
            const size_t had = mine[k].size();
            const Status st = pool.Allocate(uniform(0, 8), &mine[k]);
            if (st.ok()) {
              claim(mine[k], had, t);
            } else {
              exhausted.fetch_add(1);
            }
            break;
          }
          case 1:
            disown(mine[k], t);
            pool.Release(&mine[k]);
            break;
          case 2: {
            if (!tables[k]) {
              tables[k] = std::make_unique<BlockTable>(&pool);
              table_tokens[k] = 0;
            }
            const size_t had = tables[k]->blocks().size();
            const int64_t want = table_tokens[k] + uniform(1, 64);
            if (tables[k]->EnsureCapacity(want).ok()) {
              table_tokens[k] = want;
              claim(tables[k]->blocks(), had, t);
            } else {
              exhausted.fetch_add(1);
            }
            break;
          }
          default:
            if (tables[k]) {
              disown(tables[k]->blocks(), t);
              tables[k].reset();
            }
            break;
        }
        // Read-only calls race with everything else; they must stay within bounds.
        const int32_t used = pool.used_blocks();
        if (used < 0 || used > pool.capacity()) bad_ids.fetch_add(1);
      }
      for (size_t k = 0; k < mine.size(); ++k) {
        disown(mine[k], t);
        pool.Release(&mine[k]);
        if (tables[k]) disown(tables[k]->blocks(), t);
        tables[k].reset();
      }
    });
  }
  for (auto& th : threads) th.join();

  EXPECT_EQ(sharing_errors.load(), 0) << "a block was held by two owners at once";
  EXPECT_EQ(bad_ids.load(), 0);
  EXPECT_EQ(pool.used_blocks(), 0);
  EXPECT_EQ(pool.free_blocks(), pool.capacity());
  for (const auto& o : owner) EXPECT_EQ(o.load(), -1);
  ExpectPartition(pool, {});
  std::printf("[mqa-test] threads: %d refused allocations\n", exhausted.load());
}

}  // namespace
}  // namespace mqa::core
