// client::HostTensor on top of the safetensors format (mqa/core/safetensors_format.h): this file only converts.
#include "safetensors_io.h"

#include <optional>
#include <utility>

#include "mqa/core/safetensors_format.h"

namespace mqa::client::tools {
namespace {

namespace st = mqa::core::safetensors;

Status FromFormat(const st::Error& error) {
  return error.ok() ? Status::Ok() : Status(StatusCodeFromInt(static_cast<int>(error.code)), error.message);
}

DataType ToClient(st::Dtype dtype) {
  switch (dtype) {
    case st::Dtype::kF32: return DataType::kFloat32;
    case st::Dtype::kBF16: return DataType::kBFloat16;
    case st::Dtype::kF16: return DataType::kFloat16;
    case st::Dtype::kBool: return DataType::kBool;
    case st::Dtype::kU8: return DataType::kUInt8;
  }
  return DataType::kUnspecified;
}

std::optional<st::Dtype> ToFormat(DataType dtype) {
  switch (dtype) {
    case DataType::kFloat32: return st::Dtype::kF32;
    case DataType::kBFloat16: return st::Dtype::kBF16;
    case DataType::kFloat16: return st::Dtype::kF16;
    case DataType::kBool: return st::Dtype::kBool;
    case DataType::kUInt8: return st::Dtype::kU8;
    case DataType::kUnspecified: break;
  }
  return std::nullopt;
}

// Copies every tensor out of parsed contents (an image or a mapping).
StatusOr<SafetensorsFile> ToHostTensors(const st::Contents& contents, const std::string& what) {
  SafetensorsFile file;
  file.metadata = contents.metadata;
  for (const auto& [name, view] : contents.tensors) {
    HostTensor t;
    t.dtype = ToClient(view.dtype);
    t.shape = view.shape;
    t.data.assign(view.data, view.data + view.size);
    Status valid = t.Validate();
    if (!valid.ok()) return Status(StatusCode::kDataLoss, what + ": tensor '" + name + "': " + valid.message());
    file.tensors.emplace(name, std::move(t));
  }
  return file;
}

// The writer's view of `file`: INVALID_ARGUMENT for a malformed tensor.
StatusOr<st::TensorBytesMap> ToEntries(const SafetensorsFile& file) {
  st::TensorBytesMap entries;
  for (const auto& [name, tensor] : file.tensors) {
    Status valid = tensor.Validate();
    if (!valid.ok()) return Status(StatusCode::kInvalidArgument, "tensor '" + name + "': " + valid.message());
    std::optional<st::Dtype> dtype = ToFormat(tensor.dtype);
    if (!dtype) return Status(StatusCode::kInvalidArgument, "tensor '" + name + "' has no dtype");
    entries[name] = st::TensorBytes{*dtype, tensor.shape, tensor.data.data(), tensor.data.size()};
  }
  return entries;
}

}  // namespace

std::string SafetensorsDtypeName(DataType dtype) {
  std::optional<st::Dtype> format = ToFormat(dtype);
  return format ? std::string(st::DtypeName(*format)) : std::string();
}

StatusOr<SafetensorsFile> ParseSafetensors(const std::vector<uint8_t>& bytes) {
  constexpr char kWhat[] = "<memory>";
  st::Contents contents;
  const st::Error parsed = st::Parse(bytes.data(), bytes.size(), kWhat, &contents);
  // The format reports stored data (DATA_LOSS); bytes handed in by the caller are an argument.
  if (!parsed.ok()) return Status(StatusCode::kInvalidArgument, parsed.message);
  StatusOr<SafetensorsFile> file = ToHostTensors(contents, kWhat);
  if (!file.ok()) return Status(StatusCode::kInvalidArgument, file.status().message());
  return file;
}

StatusOr<std::vector<uint8_t>> SerializeSafetensors(const SafetensorsFile& file) {
  StatusOr<st::TensorBytesMap> entries = ToEntries(file);
  if (!entries.ok()) return entries.status();
  std::vector<uint8_t> out;
  const st::Error serialized = st::Serialize(*entries, file.metadata, &out);
  if (!serialized.ok()) return FromFormat(serialized);
  return out;
}

StatusOr<SafetensorsFile> ReadSafetensors(const std::string& path) {
  st::MappedFile mapped;
  const st::Error opened = st::MappedFile::Open(path, &mapped);
  if (!opened.ok()) return FromFormat(opened);
  return ToHostTensors(mapped.contents(), path);
}

Status WriteSafetensors(const std::string& path, const SafetensorsFile& file) {
  StatusOr<st::TensorBytesMap> entries = ToEntries(file);
  if (!entries.ok()) return entries.status();
  return FromFormat(st::WriteFile(path, *entries, file.metadata));
}

}  // namespace mqa::client::tools
