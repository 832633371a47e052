// Reading and writing the safetensors format (https://huggingface.co/docs/safetensors): an 8-byte
// little-endian header length, a JSON header {name: {dtype, shape, data_offsets}, "__metadata__": {str: str}},
// then the raw tensor bytes. Supported dtypes: F32, BF16, F16, BOOL, U8.
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

// NOT_FOUND if the file cannot be opened; DATA_LOSS if it is truncated or its header is malformed (offsets out
// of range or overlapping, unknown dtype, shape/byte-count mismatch); the message names the file and the entry.
StatusOr<SafetensorsFile> ReadSafetensors(const std::string& path);
// Parses an in-memory image of a file (same checks).
StatusOr<SafetensorsFile> ParseSafetensors(const std::string& bytes, const std::string& what = "<memory>");

// Writes atomically (temporary file, then rename). Tensors on a device are copied to the CPU first.
Status WriteSafetensors(const std::string& path, const TensorMap& tensors,
                        const std::map<std::string, std::string>& metadata = {});

}  // namespace mqa::core

#endif  // MQA_CORE_SAFETENSORS_H_
