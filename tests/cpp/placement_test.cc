// Placement of a new session among a model's replicas, as a pure ranking. Torch-free.
#include "engine/placement.h"

#include <gtest/gtest.h>

#include <climits>
#include <vector>

namespace mqa::core {
namespace {

TEST(Placement, MostFreeBlocksThenFewestSessionsThenLowestDevice) {
  EXPECT_TRUE(RankReplicas({}).empty());
  EXPECT_EQ(RankReplicas({{5, 9, 3}}), (std::vector<size_t>{0}));
  // Free blocks decide first, whatever the session counts and devices.
  EXPECT_EQ(RankReplicas({{10, 0, 0}, {30, 7, 1}, {20, 0, 2}}), (std::vector<size_t>{1, 2, 0}));
  // Equal free blocks: fewest sessions.
  EXPECT_EQ(RankReplicas({{8, 3, 0}, {8, 1, 1}, {8, 2, 2}}), (std::vector<size_t>{1, 2, 0}));
  // Equal blocks and sessions: the lowest device ordinal (cpu = -1, cuda:N = N), not the position in the list.
  EXPECT_EQ(RankReplicas({{8, 1, 3}, {8, 1, 1}, {8, 1, -1}}), (std::vector<size_t>{2, 1, 0}));
  // All equal: the configured order.
  EXPECT_EQ(RankReplicas({{4, 0, 2}, {4, 0, 2}}), (std::vector<size_t>{0, 1}));
  // No free blocks anywhere still ranks every replica (best effort takes blocks later; guaranteed tries each).
  EXPECT_EQ(RankReplicas({{0, 2, 0}, {0, 1, 1}}), (std::vector<size_t>{1, 0}));
}

TEST(Placement, DeviceOrdinals) {
  EXPECT_EQ(DeviceOrdinal("cpu"), -1);
  EXPECT_EQ(DeviceOrdinal("cuda"), 0);
  EXPECT_EQ(DeviceOrdinal("cuda:0"), 0);
  EXPECT_EQ(DeviceOrdinal("cuda:1"), 1);
  EXPECT_EQ(DeviceOrdinal("cuda:12"), 12);
  EXPECT_EQ(DeviceOrdinal("cuda:"), INT_MAX);
  EXPECT_EQ(DeviceOrdinal("cuda:x"), INT_MAX);
  EXPECT_EQ(DeviceOrdinal("cuda:99999999999999"), INT_MAX);
  EXPECT_EQ(DeviceOrdinal("tpu"), INT_MAX);
}

}  // namespace
}  // namespace mqa::core
