// Safetensors files as client::HostTensors, for mqa-cli and the client tests. The format itself (what is
// accepted, the codes, the limits) is core's torch-free mqa/core/safetensors_format.h, the project's one reader
// and writer; this is its adapter to the public client types. Files are mapped (mmap) and each tensor copied out
// once.
//
// Supported dtypes: F32, BF16, F16, BOOL, U8 (the ones mqa.v1 carries). Functions are thread-compatible (no
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
  std::map<std::string, HostTensor> tensors;    // by name
  std::map<std::string, std::string> metadata;  // "__metadata__"
};

// Parses a whole file's bytes. INVALID_ARGUMENT (with the reason) on any malformation: short file, header length
// past the end, bad JSON, offsets out of range or overlapping, byte counts that do not match the shape, unsupported
// dtypes (safetensors_format.h lists every check). The bytes are the caller's argument here; the same defects in a
// file on disk are DATA_LOSS (ReadSafetensors).
StatusOr<SafetensorsFile> ParseSafetensors(const std::vector<uint8_t>& bytes);
// Tensors in name order, header padded with spaces to a multiple of 8 bytes. INVALID_ARGUMENT when a
// tensor is malformed (HostTensor::Validate) or named "__metadata__".
StatusOr<std::vector<uint8_t>> SerializeSafetensors(const SafetensorsFile& file);

// File versions of the above: NOT_FOUND when the file cannot be opened; a write goes to "<path>.tmp" first and is
// renamed over path (FAILED_PRECONDITION when either fails).
StatusOr<SafetensorsFile> ReadSafetensors(const std::string& path);
Status WriteSafetensors(const std::string& path, const SafetensorsFile& file);

// "F32", "BF16", "F16", "BOOL", "U8"; empty for kUnspecified.
std::string SafetensorsDtypeName(DataType dtype);

}  // namespace mqa::client::tools

#endif  // MQA_CLIENT_TOOLS_SAFETENSORS_IO_H_
