#include "engine/work_item.h"

#include <cstring>

#include "tensor_impl.h"

namespace mqa::core {

namespace {

uint64_t Mix(uint64_t h, uint64_t w) {
  h = (h ^ w) * 0xff51afd7ed558ccdull;
  return h ^ (h >> 33);
}

}  // namespace

uint64_t InputHash(const Tensor& x) {
  uint64_t h = 0x9e3779b97f4a7c15ull ^ static_cast<uint64_t>(x.dtype());
  for (int64_t n : x.shape()) h = Mix(h, static_cast<uint64_t>(n));
  const at::Tensor t = Unwrap(x).contiguous();
  const auto* p = static_cast<const unsigned char*>(t.data_ptr());
  const size_t n = t.nbytes();
  // Four independent lanes over interleaved words: each word's multiply waits only for its own lane, so the
  // hash of a step's input (8 KiB at dim 4096 in bf16) runs at the multiplier's throughput, not its latency.
  uint64_t lane[4] = {h, h ^ 1, h ^ 2, h ^ 3};
  size_t i = 0;
  for (; i + 32 <= n; i += 32) {
    for (int l = 0; l < 4; ++l) {
      uint64_t w;
      std::memcpy(&w, p + i + 8 * l, 8);
      lane[l] = Mix(lane[l], w);
    }
  }
  for (; i + 8 <= n; i += 8) {
    uint64_t w;
    std::memcpy(&w, p + i, 8);
    lane[0] = Mix(lane[0], w);
  }
  uint64_t tail = 0;
  // An empty tensor's data pointer is null, and memcpy from null is undefined even for 0 bytes (UBSan).
  if (n > i) std::memcpy(&tail, p + i, n - i);
  h = Mix(lane[0], tail ^ (static_cast<uint64_t>(n) << 56));
  for (int l = 1; l < 4; ++l) h = Mix(h, lane[l]);
  return h;
}

}  // namespace mqa::core
