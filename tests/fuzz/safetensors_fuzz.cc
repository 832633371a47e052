// Fuzzes the safetensors reader (core/src/safetensors_format.cc, through core's adapter): the 8-byte header
// length, the JSON header and the data layout it describes. Weights files come from operators, not clients, but a
// truncated or hostile file must still end in a Status (DATA_LOSS naming the file), never in a crash or a read
// outside the buffer.
//
// Input: the bytes of a file. Beyond the sanitizers' checks, the target aborts when
//  - a refusal is not DATA_LOSS or its message does not start with the file's name;
//  - an accepted tensor's byte count disagrees with its shape and dtype;
//  - an accepted file does not survive a write and a re-read unchanged (tensors, bytes and metadata).
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>

#include "mqa/core/safetensors.h"
#include "mqa/core/status.h"
#include "mqa/core/tensor.h"
#include "mqa/core/testing/safetensors.h"

namespace mqa::core {
namespace {

constexpr char kWhat[] = "fuzz.safetensors";

void Require(bool ok, const std::string& what) {
  if (ok) return;
  std::fprintf(stderr, "safetensors_fuzz: %s\n", what.c_str());
  std::abort();
}

// A scratch file for the round trip, one per process (libFuzzer's -fork and -jobs run several processes).
const std::string& ScratchFile() {
  static const std::string path =
      (std::filesystem::temp_directory_path() / ("mqa-safetensors-fuzz-" + std::to_string(getpid()) + ".st")).string();
  return path;
}

void FuzzOne(const uint8_t* data, size_t size) {
  const std::string bytes(reinterpret_cast<const char*>(data), size);
  StatusOr<SafetensorsFile> file = ParseSafetensors(bytes, kWhat);
  if (!file.ok()) {
    Require(file.status().code() == StatusCode::kDataLoss, "expected DATA_LOSS, got code " +
                                                               std::to_string(static_cast<int>(file.status().code())) +
                                                               ": " + file.status().message());
    Require(file.status().message().rfind(std::string(kWhat) + ": ", 0) == 0,
            "message does not name the file: " + file.status().message());
    return;
  }
  for (const auto& [name, t] : file->tensors) {
    Require(t.defined(), name + ": undefined tensor");
    Require(t.nbytes() == static_cast<size_t>(t.numel()) * DTypeSize(t.dtype()), name + ": nbytes != numel * size");
  }
  const Status written = WriteSafetensors(ScratchFile(), file->tensors, file->metadata);
  Require(written.ok(), "writing an accepted file back: " + written.message());
  StatusOr<SafetensorsFile> again = ReadSafetensors(ScratchFile());
  Require(again.ok(), "re-reading a written file: " + again.status().message());
  Require(again->metadata == file->metadata, "metadata changed in the round trip");
  Require(again->tensors.size() == file->tensors.size(), "tensor count changed in the round trip");
  for (const auto& [name, t] : file->tensors) {
    auto it = again->tensors.find(name);
    Require(it != again->tensors.end(), name + ": lost in the round trip");
    Require(it->second.dtype() == t.dtype() && it->second.shape() == t.shape(), name + ": dtype or shape changed");
    Require(*it->second.ToBytes() == *t.ToBytes(), name + ": bytes changed in the round trip");
  }
}

}  // namespace
}  // namespace mqa::core

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  mqa::core::FuzzOne(data, size);
  return 0;
}
