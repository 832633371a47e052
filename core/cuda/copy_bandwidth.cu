#include "copy_bandwidth.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace mqa::core::cuda {
namespace {

// dst[i] = src[i] for i < n16 (units of 16 bytes). Grid-stride so one launch covers any size.
__global__ void Copy16(const uint4* __restrict__ src, uint4* __restrict__ dst, size_t n16) {
  const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n16; i += stride) {
    dst[i] = src[i];
  }
}

// Deterministic non-zero fill: zeros can make memory traffic look faster than real data moves.
__global__ void Fill(uint32_t* __restrict__ p, size_t n) {
  const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    p[i] = static_cast<uint32_t>(i * 2654435761u) | 1u;
  }
}

}  // namespace

int DeviceName(int device, char* name, size_t len) {
  cudaDeviceProp prop;
  cudaError_t err = cudaGetDeviceProperties(&prop, device);
  if (err != cudaSuccess) return err;
  if (len > 0) {
    std::strncpy(name, prop.name, len - 1);
    name[len - 1] = '\0';
  }
  return cudaSuccess;
}

int CopyBandwidth(int device, size_t bytes, int repeats, double* gbps) {
  cudaError_t err = cudaSetDevice(device);
  if (err != cudaSuccess) return err;
  const size_t n16 = bytes / 16;
  if (n16 == 0 || repeats <= 0) return cudaErrorInvalidValue;
  int sms = 0;
  if ((err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device)) != cudaSuccess) return err;
  void* src = nullptr;
  void* dst = nullptr;
  cudaEvent_t start = nullptr, stop = nullptr;
  std::vector<float> ms;
  auto cleanup = [&](cudaError_t e) {
    if (src) cudaFree(src);
    if (dst) cudaFree(dst);
    if (start) cudaEventDestroy(start);
    if (stop) cudaEventDestroy(stop);
    return static_cast<int>(e);
  };
  if ((err = cudaMalloc(&src, n16 * 16)) != cudaSuccess) return cleanup(err);
  if ((err = cudaMalloc(&dst, n16 * 16)) != cudaSuccess) return cleanup(err);
  if ((err = cudaEventCreate(&start)) != cudaSuccess) return cleanup(err);
  if ((err = cudaEventCreate(&stop)) != cudaSuccess) return cleanup(err);
  // Enough resident blocks to keep every SM's memory pipeline full; the grid-stride loop does the rest.
  const int threads = 256;
  const int blocks = sms * 8;
  Fill<<<blocks, threads>>>(static_cast<uint32_t*>(src), n16 * 4);
  if ((err = cudaGetLastError()) != cudaSuccess) return cleanup(err);
  for (int r = -1; r < repeats; ++r) {  // r = -1 is the warm-up
    cudaEventRecord(start);
    Copy16<<<blocks, threads>>>(static_cast<const uint4*>(src), static_cast<uint4*>(dst), n16);
    cudaEventRecord(stop);
    if ((err = cudaGetLastError()) != cudaSuccess) return cleanup(err);
    if ((err = cudaEventSynchronize(stop)) != cudaSuccess) return cleanup(err);
    float t = 0;
    if ((err = cudaEventElapsedTime(&t, start, stop)) != cudaSuccess) return cleanup(err);
    if (r >= 0) ms.push_back(t);
  }
  std::sort(ms.begin(), ms.end());
  const double median_s = ms[ms.size() / 2] * 1e-3;
  *gbps = 2.0 * static_cast<double>(n16 * 16) / median_s / 1e9;
  return cleanup(cudaSuccess);
}

const char* ErrorString(int error) { return cudaGetErrorString(static_cast<cudaError_t>(error)); }

}  // namespace mqa::core::cuda
