#include "engine/work_item.h"

#include <cstring>

#include "tensor_impl.h"

namespace mqa::core {

namespace {

constexpr uint64_t kPrime1 = 0x9e3779b185ebca87ull;
constexpr uint64_t kPrime2 = 0xc2b2ae3d27d4eb4full;

uint64_t Rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

// Folds w into h; for a fixed w a bijection of h (xor, odd multiply, xorshift, odd multiply).
uint64_t Mix(uint64_t h, uint64_t w) {
  h = (h ^ (w * kPrime2)) * kPrime1;
  h ^= h >> 29;
  return h * kPrime2;
}

uint64_t Load(const unsigned char* p) {
  uint64_t w;
  std::memcpy(&w, p, 8);
  return w;
}

}  // namespace

uint64_t InputHash(const Tensor& x) {
  uint64_t h = 0x27d4eb2f165667c5ull ^ static_cast<uint64_t>(x.dtype());
  for (int64_t n : x.shape()) h = Mix(h, static_cast<uint64_t>(n));
  const at::Tensor& u = Unwrap(x);
  const at::Tensor t =
      u.is_cpu() && u.is_contiguous() ? u : u.to(at::kCPU).contiguous();  // no dispatch when not needed
  const auto* p = static_cast<const unsigned char*>(t.data_ptr());
  const size_t n = t.nbytes();
  // Eight independent lanes over 64-byte stripes, one multiply per word: each multiply waits only for its own
  // lane, so hashing a step's input (8 KiB at dim 4096 in bf16) runs at the multiplier's throughput, about a
  // microsecond when the bytes are in cache. Each word's step (xor, odd multiply, xorshift) is a bijection of the
  // lane, and so is the final mixing of each lane into h: inputs that differ in one word always differ.
  uint64_t lane[8];
  for (int l = 0; l < 8; ++l) lane[l] = h + static_cast<uint64_t>(l) * kPrime2;
  size_t i = 0;
  for (; i + 64 <= n; i += 64) {
    // The xorshift brings the product's high bits down, where the next multiply spreads them: without it a flip
    // of a word's top bit only flips the lane's top bit, and two such flips in one lane cancel.
    for (int l = 0; l < 8; ++l) {
      const uint64_t m = (lane[l] ^ Load(p + i + 8 * l)) * kPrime1;
      lane[l] = m ^ (m >> 29);
    }
  }
  for (int l = 0; l < 8; ++l) h = Mix(h, Rotl(lane[l], 8 * l + 1));
  for (; i + 8 <= n; i += 8) h = Mix(h, Load(p + i));
  uint64_t tail = 0;
  // An empty tensor's data pointer is null, and memcpy from null is undefined even for 0 bytes (UBSan).
  if (n > i) std::memcpy(&tail, p + i, n - i);
  return Mix(h, tail ^ (static_cast<uint64_t>(n) << 56));
}

}  // namespace mqa::core
