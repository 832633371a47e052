// One device's pinned host buffers for its passes' copies in and out, two of each: a pass gathers its rows into
// one staging buffer and its outputs come back into one output buffer, and the next pass takes the other pair
// while the first may still be on the device (the worker completes a pass only after launching the next). Reused
// from pass to pass, so a pass takes no block from LibTorch's pinned-memory allocator (whose event bookkeeping
// costs more per pass than a small pass's copies). Private to core.
//
// Thread-safety: only the device's worker thread uses it.
#ifndef MQA_CORE_SRC_ENGINE_PASS_BUFFERS_H_
#define MQA_CORE_SRC_ENGINE_PASS_BUFFERS_H_

#include <ATen/ATen.h>

#include <array>
#include <cstdint>

namespace mqa::core {

class PassBuffers {
 public:
  struct Pair {
    at::Tensor in, out;  // [rows, dim] views of the slot's pinned bytes
  };
  // The next slot's buffers as [rows, dim] tensors of dtype, grown (to a power of two of bytes) when too small.
  // The slot taken before the previous one must be done with: its pass completed (outputs read).
  Pair Next(int64_t rows, int64_t dim, at::ScalarType dtype) {
    Slot& s = slots_[next_];
    next_ ^= 1;
    const int64_t bytes = rows * dim * static_cast<int64_t>(c10::elementSize(dtype));
    if (!s.in.defined() || s.in.numel() < bytes) {
      int64_t size = int64_t{1} << 16;
      while (size < bytes) size *= 2;
      const auto pinned = at::TensorOptions().dtype(at::kByte).pinned_memory(true);
      s.in = at::empty({size}, pinned);
      s.out = at::empty({size}, pinned);
    }
    auto view = [&](const at::Tensor& t) { return t.narrow(0, 0, bytes).view(dtype).view({rows, dim}); };
    return {view(s.in), view(s.out)};
  }

 private:
  struct Slot {
    at::Tensor in, out;  // pinned bytes
  };
  std::array<Slot, 2> slots_;
  int next_ = 0;
};

}  // namespace mqa::core

#endif  // MQA_CORE_SRC_ENGINE_PASS_BUFFERS_H_
