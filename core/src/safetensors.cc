#include "mqa/core/safetensors.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

namespace mqa::core {
namespace {

// Safetensors dtype strings for the dtypes core stores.
const char* StName(DType d) {
  switch (d) {
    case DType::kFloat32: return "F32";
    case DType::kBFloat16: return "BF16";
    case DType::kFloat16: return "F16";
    case DType::kBool: return "BOOL";
    case DType::kUInt8: return "U8";
  }
  return "?";
}

StatusOr<DType> FromStName(const std::string& s) {
  if (s == "F32") return DType::kFloat32;
  if (s == "BF16") return DType::kBFloat16;
  if (s == "F16") return DType::kFloat16;
  if (s == "BOOL") return DType::kBool;
  if (s == "U8") return DType::kUInt8;
  return DataLossError("unsupported safetensors dtype '" + s + "' (supported: F32, BF16, F16, BOOL, U8)");
}

// Header entries are limited to keep a malicious length from allocating gigabytes before any check.
constexpr uint64_t kMaxHeaderBytes = 100u << 20;
// Elements of one tensor at most: its byte count (8 bytes per element at most) and strides fit in int64.
constexpr uint64_t kMaxElements = uint64_t{1} << 59;

// A JSON list of integers >= 0 (a shape, or data_offsets). nlohmann's get<int64_t> would accept floats as
// well, truncating 2.5 and converting 1e30 (or an integer beyond uint64, which the parser stores as a float)
// with undefined behaviour; the format has integers only.
bool ReadUnsignedList(const nlohmann::json& j, std::vector<uint64_t>* out) {
  if (!j.is_array()) return false;
  out->clear();
  for (const nlohmann::json& v : j) {
    if (!v.is_number_unsigned()) return false;  // negative integers are number_integer, floats number_float
    out->push_back(v.get<uint64_t>());
  }
  return true;
}

}  // namespace

StatusOr<SafetensorsFile> ParseSafetensors(const std::string& bytes, const std::string& what) {
  if (bytes.size() < 8) return DataLossError(what + ": not a safetensors file (shorter than its 8-byte header length)");
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | static_cast<unsigned char>(bytes[static_cast<size_t>(i)]);
  if (header_len > kMaxHeaderBytes || header_len > bytes.size() - 8) {
    return DataLossError(what + ": header length " + std::to_string(header_len) + " exceeds the file (" +
                         std::to_string(bytes.size()) + " bytes)");
  }
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(bytes.begin() + 8, bytes.begin() + 8 + static_cast<std::ptrdiff_t>(header_len));
  } catch (const std::exception& e) {
    return DataLossError(what + ": malformed JSON header: " + e.what());
  }
  if (!header.is_object()) return DataLossError(what + ": header is not a JSON object");
  const size_t data_start = 8 + header_len;
  const size_t data_len = bytes.size() - data_start;
  SafetensorsFile file;
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    const nlohmann::json& e = it.value();
    if (name == "__metadata__") {
      if (!e.is_object()) return DataLossError(what + ": __metadata__ is not an object");
      for (auto m = e.begin(); m != e.end(); ++m) {
        if (!m.value().is_string()) return DataLossError(what + ": __metadata__ value '" + m.key() + "' is not a string");
        file.metadata[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    try {
      StatusOr<DType> parsed = FromStName(e.at("dtype").get<std::string>());
      if (!parsed.ok()) return DataLossError(what + ": tensor '" + name + "': " + parsed.status().message());
      const DType dtype = *parsed;
      std::vector<uint64_t> sizes;
      if (!ReadUnsignedList(e.at("shape"), &sizes)) {
        return DataLossError(what + ": tensor '" + name + "' has a shape that is not a list of integers >= 0");
      }
      std::vector<uint64_t> offsets;
      if (!ReadUnsignedList(e.at("data_offsets"), &offsets) || offsets.size() != 2 || offsets[0] > offsets[1] ||
          offsets[1] > data_len) {
        return DataLossError(what + ": tensor '" + name + "' has data_offsets outside the data section");
      }
      // The element count must not wrap around (2^32 x 2^32 is 0 modulo 2^64 and would match an empty range),
      // nor may any partial product, zeros aside: Tensor::FromBytes multiplies the sizes in int64 in order, so
      // [2^40, 2^40, 0] would overflow there. kMaxElements bounds the product of the non-zero sizes.
      uint64_t numel = 1;
      uint64_t nonzero = 1;
      for (uint64_t u : sizes) {
        if (u > 1 && nonzero > kMaxElements / u) {
          std::string listed;
          for (uint64_t v : sizes) listed += (listed.empty() ? "" : ", ") + std::to_string(v);
          return DataLossError(what + ": tensor '" + name + "' has shape [" + listed + "], too large for any file");
        }
        if (u > 0) nonzero *= u;
        numel *= u;
      }
      const std::vector<int64_t> shape(sizes.begin(), sizes.end());  // each size fits: <= kMaxElements or 0
      if (numel * DTypeSize(dtype) != offsets[1] - offsets[0]) {
        return DataLossError(what + ": tensor '" + name + "' of shape " + ShapeToString(shape) + " and dtype " +
                             StName(dtype) + " needs " + std::to_string(numel * DTypeSize(dtype)) +
                             " bytes, its offsets span " + std::to_string(offsets[1] - offsets[0]));
      }
      ranges.emplace_back(offsets[0], offsets[1]);
      auto t = Tensor::FromBytes(dtype, shape, bytes.data() + data_start + offsets[0], offsets[1] - offsets[0]);
      if (!t.ok()) return DataLossError(what + ": tensor '" + name + "': " + t.status().message());
      file.tensors[name] = std::move(t).value();
    } catch (const nlohmann::json::exception& ex) {
      return DataLossError(what + ": entry '" + name + "' is malformed: " + ex.what());
    }
  }
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i) {
    if (ranges[i].first < ranges[i - 1].second) return DataLossError(what + ": tensors overlap in the data section");
  }
  return file;
}

StatusOr<SafetensorsFile> ReadSafetensors(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return NotFoundError("cannot open safetensors file '" + path + "'");
  std::ostringstream ss;
  ss << in.rdbuf();
  return ParseSafetensors(ss.str(), path);
}

Status WriteSafetensors(const std::string& path, const TensorMap& tensors,
                        const std::map<std::string, std::string>& metadata) {
  nlohmann::json header = nlohmann::json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::string data;
  for (const auto& [name, t] : tensors) {
    if (!t.defined()) return InvalidArgumentError("cannot save undefined tensor '" + name + "'");
    auto b = t.ToBytes();
    if (!b.ok()) return b.status();
    const uint64_t begin = data.size();
    data.append(reinterpret_cast<const char*>(b->data()), b->size());
    header[name] = {{"dtype", StName(t.dtype())}, {"shape", t.shape()}, {"data_offsets", {begin, data.size()}}};
  }
  std::string h = header.dump();
  h.append((8 - h.size() % 8) % 8, ' ');  // the format recommends 8-byte alignment of the data section
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) return FailedPreconditionError("cannot write '" + tmp + "'");
    uint64_t n = h.size();
    char len[8];
    for (int i = 0; i < 8; ++i) len[i] = static_cast<char>((n >> (8 * i)) & 0xff);
    out.write(len, 8);
    out.write(h.data(), static_cast<std::streamsize>(h.size()));
    out.write(data.data(), static_cast<std::streamsize>(data.size()));
    if (!out) return FailedPreconditionError("short write to '" + tmp + "'");
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    return FailedPreconditionError("cannot rename '" + tmp + "' to '" + path + "'");
  }
  return Status::Ok();
}

}  // namespace mqa::core
