#include "engine/placement.h"

#include <algorithm>
#include <climits>

namespace mqa::core {

int DeviceOrdinal(const std::string& device) {
  if (device == "cpu") return -1;
  if (device == "cuda") return 0;
  if (device.rfind("cuda:", 0) == 0 && device.size() > 5 && device.size() <= 14 &&
      std::all_of(device.begin() + 5, device.end(), [](char c) { return c >= '0' && c <= '9'; })) {
    const long long n = std::stoll(device.substr(5));
    if (n < INT_MAX) return static_cast<int>(n);
  }
  return INT_MAX;
}

std::vector<size_t> RankReplicas(const std::vector<ReplicaLoad>& replicas) {
  std::vector<size_t> order(replicas.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    const ReplicaLoad& x = replicas[a];
    const ReplicaLoad& y = replicas[b];
    if (x.free_blocks != y.free_blocks) return x.free_blocks > y.free_blocks;
    if (x.sessions != y.sessions) return x.sessions < y.sessions;
    return x.device_ordinal < y.device_ordinal;  // equal: stable, so the lower index first
  });
  return order;
}

}  // namespace mqa::core
