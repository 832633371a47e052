// The completer: a worker round's completions leave its thread in one hand-over, in order; a lone completion with
// nothing ahead runs at once; completions outside a round run on the caller's thread; Stop runs what was posted.
#include "engine/completer.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <mutex>
#include <thread>
#include <vector>

namespace mqa::core {
namespace {

TEST(Completer, ARoundsCompletionsRunOffTheWorkerThreadInOrder) {
  Completer completer;
  std::mutex mu;
  std::vector<int> order;
  std::vector<std::thread::id> threads;
  const std::thread::id worker = std::this_thread::get_id();
  for (int round = 0; round < 3; ++round) {
    Completer::Batch batch(&completer);
    for (int i = 0; i < 4; ++i) {
      Completer::Complete([&, v = round * 4 + i] {
        std::lock_guard<std::mutex> lock(mu);
        order.push_back(v);
        threads.push_back(std::this_thread::get_id());
      });
    }
    std::lock_guard<std::mutex> lock(mu);
    EXPECT_TRUE(order.size() <= static_cast<size_t>(round * 4)) << "a completion ran before its round ended";
  }
  completer.Stop();
  ASSERT_EQ(order.size(), 12u);
  for (int v = 0; v < 12; ++v) EXPECT_EQ(order[static_cast<size_t>(v)], v);
  for (const std::thread::id& t : threads) EXPECT_NE(t, worker);
}

TEST(Completer, ALoneCompletionWithNothingAheadRunsAtTheRoundsEnd) {
  Completer completer;
  std::thread::id ran;
  {
    Completer::Batch batch(&completer);
    Completer::Complete([&] { ran = std::this_thread::get_id(); });
    EXPECT_EQ(ran, std::thread::id());  // not before the round ends
  }
  EXPECT_EQ(ran, std::this_thread::get_id());
  EXPECT_TRUE(completer.idle());
}

TEST(Completer, ALoneCompletionBehindOthersWaitsItsTurn) {
  Completer completer;
  std::atomic<bool> release{false};
  std::vector<int> order;
  std::mutex mu;
  {
    Completer::Batch batch(&completer);
    Completer::Complete([&] {
      while (!release.load()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
      std::lock_guard<std::mutex> lock(mu);
      order.push_back(1);
    });
    Completer::Complete([&] {
      std::lock_guard<std::mutex> lock(mu);
      order.push_back(2);
    });
  }
  {
    Completer::Batch batch(&completer);
    Completer::Complete([&] {
      std::lock_guard<std::mutex> lock(mu);
      order.push_back(3);
    });
  }
  EXPECT_FALSE(completer.idle());
  release.store(true);
  completer.Stop();
  EXPECT_EQ(order, (std::vector<int>{1, 2, 3}));
}

TEST(Completer, OutsideARoundACompletionRunsOnTheCallersThread) {
  Completer completer;
  std::thread::id ran;
  Completer::Complete([&] { ran = std::this_thread::get_id(); });
  EXPECT_EQ(ran, std::this_thread::get_id());
}

TEST(Completer, AfterStopABatchRunsOnThePostingThread) {
  Completer completer;
  completer.Stop();
  std::vector<std::thread::id> ran;
  {
    Completer::Batch batch(&completer);
    Completer::Complete([&] { ran.push_back(std::this_thread::get_id()); });
    Completer::Complete([&] { ran.push_back(std::this_thread::get_id()); });
  }
  ASSERT_EQ(ran.size(), 2u);
  EXPECT_EQ(ran[0], std::this_thread::get_id());
}

}  // namespace
}  // namespace mqa::core
