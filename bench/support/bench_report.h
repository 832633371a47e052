// Small, header-only helpers shared by the benchmarks that print and write their results: mqa-cli bench
// (client side), mqa-bench-engine, mqa-bench-layer and mqa-bench-kernels (in process). Standard library only.
#ifndef MQA_BENCH_SUPPORT_BENCH_REPORT_H_
#define MQA_BENCH_SUPPORT_BENCH_REPORT_H_

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

namespace mqa::bench {

// Nearest-rank percentile (p in [0, 100]); 0 for no values.
inline double Percentile(std::vector<double> values, double p) {
  if (values.empty()) return 0.0;
  std::sort(values.begin(), values.end());
  const size_t rank = static_cast<size_t>(std::ceil(p / 100.0 * static_cast<double>(values.size())));
  return values[std::min(values.size() - 1, rank == 0 ? 0 : rank - 1)];
}

// s as a quoted JSON string.
inline std::string JsonString(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "\\u%04x", c);
      out += buf;
    } else {
      out += c;
    }
  }
  return out + "\"";
}

// v as a JSON number; null when not finite.
inline std::string JsonNumber(double v) {
  if (!std::isfinite(v)) return "null";
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.6g", v);
  return buf;
}

}  // namespace mqa::bench

#endif  // MQA_BENCH_SUPPORT_BENCH_REPORT_H_
