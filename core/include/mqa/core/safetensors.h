// Reading and writing safetensors files (https://huggingface.co/docs/safetensors) as core::Tensors: weights files
// of hosted models and state dicts. The format itself (what is accepted, the codes, the limits) is
// mqa/core/safetensors_format.h, which the client tools share; this is its adapter to core's tensor type.
// Supported dtypes: F32, BF16, F16, BOOL, U8.
//
// Thread-safety: free functions without shared state.
#ifndef MQA_CORE_SAFETENSORS_H_
#define MQA_CORE_SAFETENSORS_H_

#include <map>
#include <string>

#include "mqa/core/status.h"
#include "mqa/core/tensor.h"

namespace mqa::core {

struct SafetensorsFile {
  TensorMap tensors;                            // on the CPU
  std::map<std::string, std::string> metadata;  // the "__metadata__" entry, if any
};

// The file is mapped (mmap) and each tensor copied out of the mapping once. NOT_FOUND if the file cannot be
// opened; DATA_LOSS if it is truncated or its header is malformed (offsets out of range or overlapping, unknown
// dtype, shape/byte-count mismatch; safetensors_format.h lists every check); the message names the file and the
// entry.
StatusOr<SafetensorsFile> ReadSafetensors(const std::string& path);

// Writes atomically (temporary file, then rename). Tensors on a device are copied to the CPU first.
// INVALID_ARGUMENT for an undefined tensor (or one named "__metadata__"); FAILED_PRECONDITION when the file
// cannot be written.
Status WriteSafetensors(const std::string& path, const TensorMap& tensors,
                        const std::map<std::string, std::string>& metadata = {});

}  // namespace mqa::core

#endif  // MQA_CORE_SAFETENSORS_H_
