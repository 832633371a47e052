// Helpers shared by the C++ tests. Uses only core's public API (the tests sit outside the include firewall).
#ifndef MQA_TESTS_CPP_TEST_UTIL_H_
#define MQA_TESTS_CPP_TEST_UTIL_H_

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "mqa/core/device.h"
#include "mqa/core/status.h"
#include "mqa/core/tensor.h"

namespace mqa::testing {

// Fresh per run unless MQA_TEST_SEED is set; printed once so a failure can be replayed.
inline uint64_t RunSeed() {
  static const uint64_t seed = [] {
    const char* env = std::getenv("MQA_TEST_SEED");
    uint64_t s = env ? std::strtoull(env, nullptr, 10)
                     : (static_cast<uint64_t>(std::random_device{}()) << 20) ^ std::random_device{}();
    std::printf("[mqa-test] seed=%llu (replay with MQA_TEST_SEED=%llu)\n", static_cast<unsigned long long>(s),
                static_cast<unsigned long long>(s));
    return s;
  }();
  return seed;
}

// A new seed for each call, derived from the run seed.
inline uint64_t NextSeed() {
  static uint64_t counter = 0;
  return RunSeed() * 6364136223846793005ull + (++counter) * 1442695040888963407ull;
}

template <typename T>
T Unwrap(core::StatusOr<T> s, const char* what = "") {
  if (!s.ok()) {
    ADD_FAILURE() << what << ": " << s.status().ToString();
    std::abort();
  }
  return std::move(s).value();
}

inline core::Tensor Randn(core::DType dtype, const std::vector<int64_t>& shape, const std::string& device = "cpu") {
  return Unwrap(core::Tensor::Randn(dtype, shape, NextSeed(), device), "Randn");
}

inline std::vector<float> Floats(const core::Tensor& t) { return Unwrap(t.ToFloats(), "ToFloats"); }

// ||a - b|| / ||b|| over all elements (NaN in either gives NaN). Both must hold the same number of elements.
inline double RelativeError(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double d = static_cast<double>(a[i]) - static_cast<double>(b[i]);
    num += d * d;
    den += static_cast<double>(b[i]) * b[i];
  }
  if (den == 0) return num == 0 ? 0.0 : std::sqrt(num);
  return std::sqrt(num / den);
}

inline bool HasNaN(const std::vector<float>& v) {
  for (float x : v) {
    if (std::isnan(x)) return true;
  }
  return false;
}

inline std::vector<std::string> TestDevices() {
  std::vector<std::string> d = {"cpu"};
  if (core::CudaAvailable()) d.push_back("cuda");
  return d;
}

}  // namespace mqa::testing

#endif  // MQA_TESTS_CPP_TEST_UTIL_H_
