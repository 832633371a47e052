// A small safetensors reader and writer for mqa-cli and the client tests (https://huggingface.co/docs/
// safetensors: an 8-byte little-endian header length, a JSON header, then the raw tensor bytes).
//
// Supported dtypes: F32, BF16, F16, BOOL, U8 (the ones mqa.v1 carries). Others are rejected with
// INVALID_ARGUMENT. Uses only the public client API for its types. Functions are thread-compatible (no
// shared state).
#ifndef MQA_CLIENT_TOOLS_SAFETENSORS_IO_H_
#define MQA_CLIENT_TOOLS_SAFETENSORS_IO_H_

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "mqa/client/status.h"
#include "mqa/client/tensor.h"

namespace mqa::client::tools {

struct SafetensorsFile {
  std::map<std::string, HostTensor> tensors;       // by name
  std::map<std::string, std::string> metadata;     // "__metadata__"
};

// Parses a whole file's bytes. INVALID_ARGUMENT (with the reason) on any malformation: short file, header
// length past the end, bad JSON, offsets out of range or overlapping, byte counts that do not match the
// shape, unsupported dtypes.
StatusOr<SafetensorsFile> ParseSafetensors(const std::vector<uint8_t>& bytes);
// Tensors in name order, header padded with spaces to a multiple of 8 bytes. INVALID_ARGUMENT when a
// tensor is malformed (HostTensor::Validate).
StatusOr<std::vector<uint8_t>> SerializeSafetensors(const SafetensorsFile& file);

// File versions of the above; NOT_FOUND when the file cannot be opened, INTERNAL on a write failure.
StatusOr<SafetensorsFile> ReadSafetensors(const std::string& path);
Status WriteSafetensors(const std::string& path, const SafetensorsFile& file);

// "F32", "BF16", "F16", "BOOL", "U8"; empty for kUnspecified.
std::string SafetensorsDtypeName(DataType dtype);

}  // namespace mqa::client::tools

#endif  // MQA_CLIENT_TOOLS_SAFETENSORS_IO_H_
