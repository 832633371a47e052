#include "mqa/core/device.h"

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <torch/cuda.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <fstream>
#include <vector>

#include "tensor_impl.h"
#ifdef MQA_WITH_CUDA
#include "copy_bandwidth.h"
#endif

namespace mqa::core {

bool CudaAvailable() {
  try {
    return torch::cuda::is_available();
  } catch (...) {
    return false;
  }
}

int CudaDeviceCount() {
  try {
    return static_cast<int>(torch::cuda::device_count());
  } catch (...) {
    return 0;
  }
}

std::vector<std::string> AllCudaDevices() {
  std::vector<std::string> out;
  const int n = CudaAvailable() ? CudaDeviceCount() : 0;
  for (int i = 0; i < n; ++i) out.push_back("cuda:" + std::to_string(i));
  return out;
}

std::string NormaliseDevice(std::string_view device) {
  return device == "cuda" ? std::string("cuda:0") : std::string(device);
}

bool BuiltWithCuda() {
#ifdef MQA_WITH_CUDA
  return true;
#else
  return false;
#endif
}

Status ValidateDevice(std::string_view device) {
  MQA_ASSIGN_OR_RETURN(at::Device dev, ParseDevice(device));
  if (dev.is_cuda()) {
    const int n = CudaDeviceCount();
    if (n == 0)
      return UnavailableError("device '" + std::string(device) + "' requested but no CUDA device is available here");
    if (dev.index() >= n) {
      return UnavailableError("device '" + std::string(device) + "' requested but only " + std::to_string(n) +
                              " CUDA device(s) exist (cuda:0..cuda:" + std::to_string(n - 1) + ")");
    }
  }
  return Status::Ok();
}

std::string DeviceName(std::string_view device) {
  auto dev = ParseDevice(device);
  if (!dev.ok()) return "unknown";
  if (dev->is_cpu()) {
    std::ifstream in("/proc/cpuinfo");
    std::string line;
    while (std::getline(in, line)) {
      if (line.rfind("model name", 0) == 0) {
        auto pos = line.find(':');
        if (pos != std::string::npos) return line.substr(pos + 2);
      }
    }
    return "cpu";
  }
#ifdef MQA_WITH_CUDA
  char name[256];
  if (CudaAvailable() && cuda::DeviceName(dev->index(), name, sizeof(name)) == 0) return name;
#endif
  return "cuda (unavailable)";
}

Status Synchronize(std::string_view device) {
  MQA_ASSIGN_OR_RETURN(at::Device dev, ParseDevice(device));
  if (dev.is_cpu()) return Status::Ok();
  MQA_RETURN_IF_ERROR(ValidateDevice(device));
  return CatchAll("Synchronize", [&]() -> Status {
    torch::cuda::synchronize(dev.index());
    return Status::Ok();
  });
}

StatusOr<double> MeasureCopyBandwidth(std::string_view device, size_t bytes, int repeats) {
  MQA_RETURN_IF_ERROR(ValidateDevice(device));
  MQA_ASSIGN_OR_RETURN(at::Device dev, ParseDevice(device));
  if (repeats <= 0 || bytes < 16) return InvalidArgumentError("MeasureCopyBandwidth needs bytes >= 16 and repeats > 0");
  if (dev.is_cuda()) {
#ifdef MQA_WITH_CUDA
    double gbps = 0;
    int err = cuda::CopyBandwidth(dev.index(), bytes, repeats, &gbps);
    if (err != 0) return InternalError(std::string("copy bandwidth kernel: ") + cuda::ErrorString(err));
    return gbps;
#else
    return UnimplementedError("this build has no CUDA code; rebuild against a LibTorch with CUDA");
#endif
  }
  // LibTorch's copy uses its intra-op threads, as the layer's own CPU kernels do, so the floor is comparable.
  return CatchAll("MeasureCopyBandwidth", [&]() -> StatusOr<double> {
    const int64_t n = static_cast<int64_t>(bytes / 4);
    at::Tensor src = at::arange(n, at::kInt).mul_(7).add_(1);
    at::Tensor dst = at::empty_like(src);
    std::vector<double> secs;
    for (int r = -1; r < repeats; ++r) {
      auto t0 = std::chrono::steady_clock::now();
      dst.copy_(src);
      auto t1 = std::chrono::steady_clock::now();
      if (r >= 0) secs.push_back(std::chrono::duration<double>(t1 - t0).count());
    }
    std::sort(secs.begin(), secs.end());
    return 2.0 * static_cast<double>(n * 4) / secs[secs.size() / 2] / 1e9;
  });
}

}  // namespace mqa::core
