#include "engine/work_item.h"

#include <cstring>

#include "tensor_impl.h"

namespace mqa::core {

uint64_t InputHash(const Tensor& x) {
  uint64_t h = 0x9e3779b97f4a7c15ull ^ static_cast<uint64_t>(x.dtype());
  auto mix = [&h](uint64_t w) {
    h = (h ^ w) * 0xff51afd7ed558ccdull;
    h ^= h >> 33;
  };
  for (int64_t n : x.shape()) mix(static_cast<uint64_t>(n));
  const at::Tensor t = Unwrap(x).contiguous();
  const auto* p = static_cast<const unsigned char*>(t.data_ptr());
  const size_t n = t.nbytes();
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t w;
    std::memcpy(&w, p + i, 8);
    mix(w);
  }
  uint64_t tail = 0;
  // An empty tensor's data pointer is null, and memcpy from null is undefined even for 0 bytes (UBSan).
  if (n > i) std::memcpy(&tail, p + i, n - i);
  mix(tail ^ (static_cast<uint64_t>(n) << 56));
  return h;
}

}  // namespace mqa::core
