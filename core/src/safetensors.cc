// core::Tensor on top of the safetensors format (mqa/core/safetensors_format.h): this file only converts.
#include "mqa/core/safetensors.h"

#include <string>
#include <utility>
#include <vector>

#include "mqa/core/safetensors_format.h"
#include "mqa/core/testing/safetensors.h"

namespace mqa::core {
namespace {

namespace st = safetensors;

Status FromFormat(const st::Error& error) {
  return error.ok() ? Status::Ok() : Status(static_cast<StatusCode>(error.code), error.message);
}

DType ToCore(st::Dtype dtype) {
  switch (dtype) {
    case st::Dtype::kF32: return DType::kFloat32;
    case st::Dtype::kBF16: return DType::kBFloat16;
    case st::Dtype::kF16: return DType::kFloat16;
    case st::Dtype::kBool: return DType::kBool;
    case st::Dtype::kU8: return DType::kUInt8;
  }
  return DType::kFloat32;
}

st::Dtype ToFormat(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return st::Dtype::kF32;
    case DType::kBFloat16: return st::Dtype::kBF16;
    case DType::kFloat16: return st::Dtype::kF16;
    case DType::kBool: return st::Dtype::kBool;
    case DType::kUInt8: return st::Dtype::kU8;
  }
  return st::Dtype::kF32;
}

// Copies every tensor out of parsed contents (an image or a mapping) into CPU tensors.
StatusOr<SafetensorsFile> ToTensors(const st::Contents& contents, const std::string& what) {
  SafetensorsFile file;
  file.metadata = contents.metadata;
  for (const auto& [name, view] : contents.tensors) {
    StatusOr<Tensor> t = Tensor::FromBytes(ToCore(view.dtype), view.shape, view.data, view.size);
    if (!t.ok()) return DataLossError(what + ": tensor '" + name + "': " + t.status().message());
    file.tensors[name] = std::move(t).value();
  }
  return file;
}

}  // namespace

StatusOr<SafetensorsFile> ParseSafetensors(const std::string& bytes, const std::string& what) {
  st::Contents contents;
  const st::Error parsed = st::Parse(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), what, &contents);
  if (!parsed.ok()) return FromFormat(parsed);
  return ToTensors(contents, what);
}

StatusOr<SafetensorsFile> ReadSafetensors(const std::string& path) {
  st::MappedFile mapped;
  const st::Error opened = st::MappedFile::Open(path, &mapped);
  if (!opened.ok()) return FromFormat(opened);
  return ToTensors(mapped.contents(), path);
}

Status WriteSafetensors(const std::string& path, const TensorMap& tensors,
                        const std::map<std::string, std::string>& metadata) {
  // The bytes of every tensor (device tensors come to the CPU here), kept alive until the file is written.
  std::vector<std::vector<uint8_t>> bytes;
  bytes.reserve(tensors.size());
  st::TensorBytesMap entries;
  for (const auto& [name, t] : tensors) {
    if (!t.defined()) return InvalidArgumentError("cannot save undefined tensor '" + name + "'");
    StatusOr<std::vector<uint8_t>> b = t.ToBytes();
    if (!b.ok()) return b.status();
    bytes.push_back(std::move(b).value());
    entries[name] = st::TensorBytes{ToFormat(t.dtype()), t.shape(), bytes.back().data(), bytes.back().size()};
  }
  return FromFormat(st::WriteFile(path, entries, metadata));
}

}  // namespace mqa::core
