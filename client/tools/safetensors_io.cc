#include "safetensors_io.h"

#include <algorithm>
#include <fstream>
#include <iterator>
#include <limits>
#include <utility>

#include <nlohmann/json.hpp>

namespace mqa::client::tools {
namespace {

Status Invalid(const std::string& what) {
  return Status(StatusCode::kInvalidArgument, "safetensors: " + what);
}

bool DtypeFromName(const std::string& name, DataType* dtype) {
  static const std::map<std::string, DataType> kNames = {
      {"F32", DataType::kFloat32}, {"BF16", DataType::kBFloat16}, {"F16", DataType::kFloat16},
      {"BOOL", DataType::kBool},   {"U8", DataType::kUInt8}};
  auto it = kNames.find(name);
  if (it == kNames.end()) return false;
  *dtype = it->second;
  return true;
}

}  // namespace

std::string SafetensorsDtypeName(DataType dtype) {
  switch (dtype) {
    case DataType::kFloat32: return "F32";
    case DataType::kBFloat16: return "BF16";
    case DataType::kFloat16: return "F16";
    case DataType::kBool: return "BOOL";
    case DataType::kUInt8: return "U8";
    case DataType::kUnspecified: break;
  }
  return "";
}

StatusOr<SafetensorsFile> ParseSafetensors(const std::vector<uint8_t>& bytes) {
  if (bytes.size() < 8) return Invalid("file is shorter than its 8-byte header length");
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | bytes[static_cast<size_t>(i)];
  if (header_len > bytes.size() - 8) {
    return Invalid("header length " + std::to_string(header_len) + " runs past the end of the file (" +
                   std::to_string(bytes.size()) + " bytes)");
  }
  const size_t data_start = 8 + static_cast<size_t>(header_len);
  const size_t data_size = bytes.size() - data_start;
  nlohmann::json header = nlohmann::json::parse(bytes.begin() + 8, bytes.begin() + static_cast<long>(data_start),
                                                /*cb=*/nullptr, /*allow_exceptions=*/false);
  if (header.is_discarded() || !header.is_object()) return Invalid("header is not a JSON object");

  SafetensorsFile file;
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    const nlohmann::json& entry = it.value();
    if (name == "__metadata__") {
      if (!entry.is_object()) return Invalid("__metadata__ is not an object");
      for (auto m = entry.begin(); m != entry.end(); ++m) {
        if (!m.value().is_string()) return Invalid("__metadata__ value of '" + m.key() + "' is not a string");
        file.metadata[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    if (!entry.is_object() || !entry.contains("dtype") || !entry.contains("shape") ||
        !entry.contains("data_offsets") || !entry["dtype"].is_string() || !entry["shape"].is_array() ||
        !entry["data_offsets"].is_array() || entry["data_offsets"].size() != 2) {
      return Invalid("tensor '" + name + "' needs dtype (string), shape (array) and data_offsets ([begin, end])");
    }
    HostTensor t;
    const std::string dtype_name = entry["dtype"].get<std::string>();
    if (!DtypeFromName(dtype_name, &t.dtype)) {
      return Invalid("tensor '" + name + "' has dtype " + dtype_name + "; supported: F32, BF16, F16, BOOL, U8");
    }
    for (const auto& size : entry["shape"]) {
      if (!size.is_number_unsigned()) return Invalid("tensor '" + name + "' has a shape entry that is not >= 0");
      const uint64_t v = size.get<uint64_t>();
      if (v > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return Invalid("shape too large");
      t.shape.push_back(static_cast<int64_t>(v));
    }
    const auto& offsets = entry["data_offsets"];
    if (!offsets[0].is_number_unsigned() || !offsets[1].is_number_unsigned()) {
      return Invalid("tensor '" + name + "' has non-integer data_offsets");
    }
    const uint64_t begin = offsets[0].get<uint64_t>();
    const uint64_t end = offsets[1].get<uint64_t>();
    if (begin > end || end > data_size) {
      return Invalid("tensor '" + name + "' has data_offsets [" + std::to_string(begin) + ", " +
                     std::to_string(end) + "] outside the " + std::to_string(data_size) + "-byte data section");
    }
    t.data.assign(bytes.begin() + static_cast<long>(data_start + begin),
                  bytes.begin() + static_cast<long>(data_start + end));
    Status valid = t.Validate();
    if (!valid.ok()) return Invalid("tensor '" + name + "': " + valid.message());
    if (begin != end) ranges.emplace_back(begin, end);
    file.tensors.emplace(name, std::move(t));
  }
  // Overlapping tensors would alias each other's bytes, which no writer produces; treat it as corruption.
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i) {
    if (ranges[i].first < ranges[i - 1].second) return Invalid("tensors' data_offsets overlap");
  }
  return file;
}

StatusOr<std::vector<uint8_t>> SerializeSafetensors(const SafetensorsFile& file) {
  nlohmann::json header = nlohmann::json::object();
  if (!file.metadata.empty()) header["__metadata__"] = file.metadata;
  uint64_t offset = 0;
  for (const auto& [name, tensor] : file.tensors) {
    Status valid = tensor.Validate();
    if (!valid.ok()) return Invalid("tensor '" + name + "': " + valid.message());
    if (name == "__metadata__") return Invalid("a tensor may not be named __metadata__");
    header[name] = {{"dtype", SafetensorsDtypeName(tensor.dtype)},
                    {"shape", tensor.shape},
                    {"data_offsets", {offset, offset + tensor.data.size()}}};
    offset += tensor.data.size();
  }
  std::string text = header.dump();
  // Readers that map the file benefit from 8-byte aligned data; spaces are valid JSON whitespace.
  text.append((8 - text.size() % 8) % 8, ' ');
  std::vector<uint8_t> out;
  out.reserve(8 + text.size() + offset);
  const uint64_t len = text.size();
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<uint8_t>(len >> (8 * i)));
  out.insert(out.end(), text.begin(), text.end());
  for (const auto& entry : file.tensors) out.insert(out.end(), entry.second.data.begin(), entry.second.data.end());
  return out;
}

StatusOr<SafetensorsFile> ReadSafetensors(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return Status(StatusCode::kNotFound, "cannot open " + path);
  std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  StatusOr<SafetensorsFile> parsed = ParseSafetensors(bytes);
  if (!parsed.ok()) return Status(parsed.status().code(), path + ": " + parsed.status().message());
  return parsed;
}

Status WriteSafetensors(const std::string& path, const SafetensorsFile& file) {
  StatusOr<std::vector<uint8_t>> bytes = SerializeSafetensors(file);
  if (!bytes.ok()) return bytes.status();
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) return Status(StatusCode::kInternal, "cannot open " + path + " for writing");
  out.write(reinterpret_cast<const char*>(bytes->data()), static_cast<std::streamsize>(bytes->size()));
  out.close();
  if (!out) return Status(StatusCode::kInternal, "writing " + path + " failed");
  return Status::Ok();
}

}  // namespace mqa::client::tools
