// The safetensors file format (https://huggingface.co/docs/safetensors) on plain bytes: an 8-byte little-endian
// header length, a JSON header {name: {dtype, shape, data_offsets}, "__metadata__": {str: str}}, then the raw
// tensor bytes. Supported dtypes: F32, BF16, F16, BOOL, U8.
//
// The project's one reader and writer of the format. Core's weights files (mqa/core/safetensors.h, on
// core::Tensor) and mqa-cli's input and output files (client/tools/safetensors_io.h, on client::HostTensor) are
// thin adapters over it, so both accept and refuse exactly the same files, with the same codes and limits.
// Standard library only and no LibTorch: it is the static library mqa_safetensors_format, which the client
// tools link without linking core (or shipping any of core's shared libraries).
//
// Thread-safety: free functions without shared state; a MappedFile may be read from several threads.
#ifndef MQA_CORE_SAFETENSORS_FORMAT_H_
#define MQA_CORE_SAFETENSORS_FORMAT_H_

#include <cstddef>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace mqa::core::safetensors {

enum class Dtype : int { kF32, kBF16, kF16, kBool, kU8 };

// "F32", "BF16", "F16", "BOOL", "U8".
std::string_view DtypeName(Dtype dtype);
// Inverse of DtypeName (exact spelling); nullopt for any other name.
std::optional<Dtype> DtypeFromName(std::string_view name);
// Bytes per element.
size_t DtypeSize(Dtype dtype);

// The outcomes, numbered as gRPC's canonical codes (and so as mqa::core::StatusCode and mqa::client::StatusCode):
// adapters convert a code by its number.
enum class Code : int { kOk = 0, kInvalidArgument = 3, kNotFound = 5, kFailedPrecondition = 9, kDataLoss = 15 };

struct Error {
  Code code = Code::kOk;
  std::string message;
  bool ok() const { return code == Code::kOk; }
};

// A header longer than this is refused before it is parsed, so a hostile length cannot make the reader allocate
// gigabytes for JSON.
inline constexpr uint64_t kMaxHeaderBytes = uint64_t{100} << 20;
// Elements of one tensor at most (the product of its non-zero sizes): its byte count (8 bytes per element at
// most) and its strides then fit in int64, and no partial product of its sizes overflows.
inline constexpr uint64_t kMaxElements = uint64_t{1} << 59;

// One tensor of a parsed image; `data` points into the image (or the mapping) it was parsed from.
struct TensorView {
  Dtype dtype = Dtype::kF32;
  std::vector<int64_t> shape;  // every size >= 0; empty for a scalar
  const uint8_t* data = nullptr;
  size_t size = 0;  // product(shape) * DtypeSize(dtype)
};

struct Contents {
  std::map<std::string, TensorView> tensors;    // by name
  std::map<std::string, std::string> metadata;  // the "__metadata__" entry, if any
};

// Parses the image of a file. OK, or DATA_LOSS when it is malformed: shorter than 8 bytes, a header length past
// the end or over kMaxHeaderBytes, JSON that is not an object, an entry without dtype/shape/data_offsets, an
// unknown dtype, sizes or offsets that are not integers >= 0, more than kMaxElements elements, offsets outside
// the data section, a byte count that does not match shape and dtype, overlapping tensors, a BOOL byte other than
// 0 or 1, or a __metadata__ value that is not a string. Every message starts with "<what>: " and names the entry.
// On an error *out is unspecified.
Error Parse(const uint8_t* image, size_t size, const std::string& what, Contents* out);

// A file mapped read-only into memory (mmap) and parsed; the views of contents() point into the mapping and stay
// valid while the MappedFile lives. Nothing is copied: callers copy the tensors they keep. The file must not
// shrink while it is mapped (reading a page past its new end faults), which holds for weights and input files
// that nothing else writes meanwhile. Move-only.
class MappedFile {
 public:
  MappedFile() = default;
  MappedFile(MappedFile&& other) noexcept;
  MappedFile& operator=(MappedFile&& other) noexcept;
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  ~MappedFile();

  // NOT_FOUND when `path` cannot be opened or is not a regular file ("cannot open safetensors file '<path>': ...");
  // otherwise what Parse returns, with what = path. On an error *out is left empty.
  static Error Open(const std::string& path, MappedFile* out);

  const Contents& contents() const { return contents_; }

 private:
  void Unmap();

  void* base_ = nullptr;
  size_t size_ = 0;
  Contents contents_;
};

// What the writer stores for one tensor: `size` bytes at `data`, row-major little-endian.
struct TensorBytes {
  Dtype dtype = Dtype::kF32;
  std::vector<int64_t> shape;
  const void* data = nullptr;
  size_t size = 0;
};
using TensorBytesMap = std::map<std::string, TensorBytes>;

// The image of a file holding `tensors` back to back in name order, after a header padded with spaces to a
// multiple of 8 bytes (so that the data section is 8-byte aligned). INVALID_ARGUMENT when a size is negative, a
// byte count does not match shape and dtype, or a tensor is named "__metadata__".
Error Serialize(const TensorBytesMap& tensors, const std::map<std::string, std::string>& metadata,
                std::vector<uint8_t>* out);

// Writes the same image to `path` atomically: into "<path>.tmp", then renamed over `path`, so a reader never sees
// half a file. INVALID_ARGUMENT as for Serialize; FAILED_PRECONDITION when the file cannot be written or renamed.
Error WriteFile(const std::string& path, const TensorBytesMap& tensors,
                const std::map<std::string, std::string>& metadata);

}  // namespace mqa::core::safetensors

#endif  // MQA_CORE_SAFETENSORS_FORMAT_H_
