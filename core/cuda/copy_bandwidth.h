// Framework-free CUDA helpers of core (no LibTorch, no CUDA types in this header, so torch sources can include
// it). Every function returns a cudaError_t value as int (0 = cudaSuccess); messages via MqaCudaErrorString.
#ifndef MQA_CORE_CUDA_COPY_BANDWIDTH_H_
#define MQA_CORE_CUDA_COPY_BANDWIDTH_H_

#include <cstddef>

namespace mqa::core::cuda {

// Device name of CUDA device `device` into name (NUL-terminated, at most len bytes).
int DeviceName(int device, char* name, size_t len);

// Copies a buffer of `bytes` (rounded down to 16-byte units) on `device` with a 16-byte-vector grid-stride copy
// kernel, `repeats` times after one warm-up, timing each with CUDA events. Writes the median in GB/s (1e9
// bytes/s), counting bytes read plus bytes written, to *gbps. Allocates and frees two buffers of `bytes`.
int CopyBandwidth(int device, size_t bytes, int repeats, double* gbps);

const char* ErrorString(int error);

}  // namespace mqa::core::cuda

#endif  // MQA_CORE_CUDA_COPY_BANDWIDTH_H_
