// Devices: what is here, and how fast it moves memory.
//
// Device strings are "cpu", "cuda" (= "cuda:0") and "cuda:N". All functions are safe from any thread.
#ifndef MQA_CORE_DEVICE_H_
#define MQA_CORE_DEVICE_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "mqa/core/status.h"

namespace mqa::core {

bool CudaAvailable();
int CudaDeviceCount();
// Every CUDA device this process sees, in order: {"cuda:0", "cuda:1", ...}; empty without a GPU.
std::vector<std::string> AllCudaDevices();
// "cuda" -> "cuda:0"; every other string unchanged (not checked: see ValidateDevice).
std::string NormaliseDevice(std::string_view device);
// True when this build compiled the project's own CUDA code (independent of whether a GPU is present).
bool BuiltWithCuda();
// Checks a device string and that the device exists here: INVALID_ARGUMENT for a malformed string,
// UNAVAILABLE for a CUDA device this machine does not have.
Status ValidateDevice(std::string_view device);
// "NVIDIA H100 80GB HBM3" for a CUDA device, the CPU model name for "cpu".
std::string DeviceName(std::string_view device);
// Waits until all work queued on device has finished (no-op on CPU).
Status Synchronize(std::string_view device);

// Device-to-device copy bandwidth in GB/s (1e9 bytes/s), counting bytes read plus bytes written, measured with
// the project's own copy kernel on CUDA (memcpy on the CPU) over a buffer of `bytes`. Median of `repeats`.
StatusOr<double> MeasureCopyBandwidth(std::string_view device, size_t bytes = size_t{1} << 30, int repeats = 20);

}  // namespace mqa::core

#endif  // MQA_CORE_DEVICE_H_
