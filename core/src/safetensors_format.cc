// The safetensors format on plain bytes (mqa/core/safetensors_format.h). Standard library and nlohmann::json
// only: this file is the static library mqa_safetensors_format, linked by core and by the client tools alike.
#include "mqa/core/safetensors_format.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <fstream>
#include <system_error>
#include <utility>

namespace mqa::core::safetensors {
namespace {

Error DataLoss(const std::string& what, const std::string& message) {
  return Error{Code::kDataLoss, what + ": " + message};
}

Error Invalid(const std::string& message) { return Error{Code::kInvalidArgument, message}; }

std::string ShapeString(const std::vector<int64_t>& shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + "]";
}

// A JSON list of integers >= 0 (a shape, or data_offsets). nlohmann's get<uint64_t> would accept floats as well,
// truncating 2.5 and converting 1e30 (or an integer beyond uint64, which the parser stores as a float) with
// undefined behaviour; the format has integers only.
bool ReadUnsignedList(const nlohmann::json& j, std::vector<uint64_t>* out) {
  if (!j.is_array()) return false;
  out->clear();
  for (const nlohmann::json& v : j) {
    if (!v.is_number_unsigned()) return false;  // negative integers are number_integer, floats number_float
    out->push_back(v.get<uint64_t>());
  }
  return true;
}

// Parses one tensor entry of the header; `data` is the data section.
Error ParseEntry(const std::string& what, const std::string& name, const nlohmann::json& e, const uint8_t* data,
                 uint64_t data_len, TensorView* view) {
  std::optional<Dtype> dtype = DtypeFromName(e.at("dtype").get<std::string>());
  if (!dtype) {
    return DataLoss(what, "tensor '" + name + "': unsupported safetensors dtype '" + e.at("dtype").get<std::string>() +
                              "' (supported: F32, BF16, F16, BOOL, U8)");
  }
  std::vector<uint64_t> sizes;
  if (!ReadUnsignedList(e.at("shape"), &sizes)) {
    return DataLoss(what, "tensor '" + name + "' has a shape that is not a list of integers >= 0");
  }
  std::vector<uint64_t> offsets;
  if (!ReadUnsignedList(e.at("data_offsets"), &offsets) || offsets.size() != 2 || offsets[0] > offsets[1] ||
      offsets[1] > data_len) {
    return DataLoss(what, "tensor '" + name + "' has data_offsets outside the data section");
  }
  // The element count must not wrap around (2^32 x 2^32 is 0 modulo 2^64 and would match an empty range), nor may
  // any partial product, zeros aside: a tensor library multiplies the sizes in int64 in order, so [2^40, 2^40, 0]
  // would overflow there. kMaxElements bounds the product of the non-zero sizes.
  uint64_t numel = 1;
  uint64_t nonzero = 1;
  for (uint64_t u : sizes) {
    if (u > 1 && nonzero > kMaxElements / u) {
      std::string listed;
      for (uint64_t v : sizes) listed += (listed.empty() ? "" : ", ") + std::to_string(v);
      return DataLoss(what, "tensor '" + name + "' has shape [" + listed + "], too large for any file");
    }
    if (u > 0) nonzero *= u;
    numel *= u;
  }
  view->dtype = *dtype;
  view->shape.assign(sizes.begin(), sizes.end());  // each size fits: <= kMaxElements or 0
  const uint64_t nbytes = numel * DtypeSize(*dtype);
  if (nbytes != offsets[1] - offsets[0]) {
    return DataLoss(what, "tensor '" + name + "' of shape " + ShapeString(view->shape) + " and dtype " +
                              std::string(DtypeName(*dtype)) + " needs " + std::to_string(nbytes) +
                              " bytes, its offsets span " + std::to_string(offsets[1] - offsets[0]));
  }
  view->data = data + offsets[0];
  view->size = static_cast<size_t>(nbytes);
  if (*dtype == Dtype::kBool) {
    // A bool byte other than 0/1 is undefined behaviour for LibTorch (and meaningless on the wire).
    for (size_t i = 0; i < view->size; ++i) {
      if (view->data[i] > 1) {
        return DataLoss(what, "tensor '" + name + "': bool tensor byte " + std::to_string(i) + " is " +
                                  std::to_string(view->data[i]) + "; expected 0 or 1");
      }
    }
  }
  return Error{};
}

// The header of Serialize and WriteFile: the 8-byte length, then the JSON padded to a multiple of 8 bytes.
Error EncodeHeader(const TensorBytesMap& tensors, const std::map<std::string, std::string>& metadata,
                   std::string* out) {
  nlohmann::json header = nlohmann::json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  for (const auto& [name, t] : tensors) {
    if (name == "__metadata__") return Invalid("a tensor may not be named __metadata__");
    uint64_t numel = 1;
    for (int64_t s : t.shape) {
      if (s < 0) return Invalid("tensor '" + name + "' has a negative size in shape " + ShapeString(t.shape));
      numel *= static_cast<uint64_t>(s);
    }
    if (numel * DtypeSize(t.dtype) != t.size || (t.size > 0 && t.data == nullptr)) {
      return Invalid("tensor '" + name + "' of shape " + ShapeString(t.shape) + " and dtype " +
                     std::string(DtypeName(t.dtype)) + " needs " + std::to_string(numel * DtypeSize(t.dtype)) +
                     " bytes, got " + std::to_string(t.size));
    }
    header[name] = {
        {"dtype", std::string(DtypeName(t.dtype))}, {"shape", t.shape}, {"data_offsets", {offset, offset + t.size}}};
    offset += t.size;
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // the format recommends 8-byte alignment of the data section
  out->clear();
  const uint64_t n = text.size();
  for (int i = 0; i < 8; ++i) out->push_back(static_cast<char>((n >> (8 * i)) & 0xff));
  out->append(text);
  return Error{};
}

}  // namespace

std::string_view DtypeName(Dtype dtype) {
  switch (dtype) {
    case Dtype::kF32: return "F32";
    case Dtype::kBF16: return "BF16";
    case Dtype::kF16: return "F16";
    case Dtype::kBool: return "BOOL";
    case Dtype::kU8: return "U8";
  }
  return "?";
}

std::optional<Dtype> DtypeFromName(std::string_view name) {
  for (Dtype d : {Dtype::kF32, Dtype::kBF16, Dtype::kF16, Dtype::kBool, Dtype::kU8}) {
    if (name == DtypeName(d)) return d;
  }
  return std::nullopt;
}

size_t DtypeSize(Dtype dtype) {
  switch (dtype) {
    case Dtype::kF32: return 4;
    case Dtype::kBF16:
    case Dtype::kF16: return 2;
    case Dtype::kBool:
    case Dtype::kU8: return 1;
  }
  return 0;
}

Error Parse(const uint8_t* image, size_t size, const std::string& what, Contents* out) {
  *out = Contents();
  if (size < 8) return DataLoss(what, "not a safetensors file (shorter than its 8-byte header length)");
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | image[i];
  if (header_len > size - 8) {
    return DataLoss(
        what, "header length " + std::to_string(header_len) + " exceeds the file (" + std::to_string(size) + " bytes)");
  }
  if (header_len > kMaxHeaderBytes) {
    return DataLoss(what, "header length " + std::to_string(header_len) + " exceeds the limit of " +
                              std::to_string(kMaxHeaderBytes) + " bytes");
  }
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(image + 8, image + 8 + header_len);
  } catch (const std::exception& e) {
    return DataLoss(what, std::string("malformed JSON header: ") + e.what());
  }
  if (!header.is_object()) return DataLoss(what, "header is not a JSON object");
  const uint8_t* data = image + 8 + header_len;
  const uint64_t data_len = size - 8 - header_len;
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    const nlohmann::json& e = it.value();
    if (name == "__metadata__") {
      if (!e.is_object()) return DataLoss(what, "__metadata__ is not an object");
      for (auto m = e.begin(); m != e.end(); ++m) {
        if (!m.value().is_string()) return DataLoss(what, "__metadata__ value '" + m.key() + "' is not a string");
        out->metadata[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    TensorView view;
    try {
      Error parsed = ParseEntry(what, name, e, data, data_len, &view);
      if (!parsed.ok()) return parsed;
    } catch (const nlohmann::json::exception& ex) {
      return DataLoss(what, "entry '" + name + "' is malformed: " + ex.what());
    }
    const uint64_t begin = static_cast<uint64_t>(view.data - data);
    ranges.emplace_back(begin, begin + view.size);
    out->tensors[name] = std::move(view);
  }
  // Overlapping tensors would alias each other's bytes, which no writer produces; treat it as corruption.
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i) {
    if (ranges[i].first < ranges[i - 1].second) return DataLoss(what, "tensors overlap in the data section");
  }
  return Error{};
}

MappedFile::MappedFile(MappedFile&& other) noexcept
    : base_(std::exchange(other.base_, nullptr)),
      size_(std::exchange(other.size_, 0)),
      contents_(std::move(other.contents_)) {
  other.contents_ = Contents();
}

MappedFile& MappedFile::operator=(MappedFile&& other) noexcept {
  if (this != &other) {
    Unmap();
    base_ = std::exchange(other.base_, nullptr);
    size_ = std::exchange(other.size_, 0);
    contents_ = std::move(other.contents_);
    other.contents_ = Contents();
  }
  return *this;
}

MappedFile::~MappedFile() { Unmap(); }

void MappedFile::Unmap() {
  contents_ = Contents();
  if (base_ != nullptr) ::munmap(base_, size_);
  base_ = nullptr;
  size_ = 0;
}

Error MappedFile::Open(const std::string& path, MappedFile* out) {
  *out = MappedFile();
  auto cannot_open = [&](const std::string& why) {
    return Error{Code::kNotFound, "cannot open safetensors file '" + path + "': " + why};
  };
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return cannot_open(std::error_code(errno, std::generic_category()).message());
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    return cannot_open("not a regular file");
  }
  MappedFile file;
  // An empty file cannot be mapped (mmap refuses length 0); Parse refuses it without reading a byte.
  static const uint8_t kNothing = 0;
  const uint8_t* image = &kNothing;
  if (st.st_size > 0) {
    void* base = ::mmap(nullptr, static_cast<size_t>(st.st_size), PROT_READ, MAP_PRIVATE, fd, 0);
    if (base == MAP_FAILED) {
      const int err = errno;
      ::close(fd);
      return cannot_open("mmap: " + std::error_code(err, std::generic_category()).message());
    }
    file.base_ = base;
    file.size_ = static_cast<size_t>(st.st_size);
    // Tensors are copied out front to back, once.
    ::madvise(base, file.size_, MADV_SEQUENTIAL);
    image = static_cast<const uint8_t*>(base);
  }
  ::close(fd);  // the mapping keeps the file's pages
  Error parsed = Parse(image, file.size_, path, &file.contents_);
  if (!parsed.ok()) return parsed;
  *out = std::move(file);
  return Error{};
}

Error Serialize(const TensorBytesMap& tensors, const std::map<std::string, std::string>& metadata,
                std::vector<uint8_t>* out) {
  std::string header;
  Error encoded = EncodeHeader(tensors, metadata, &header);
  if (!encoded.ok()) return encoded;
  size_t total = header.size();
  for (const auto& entry : tensors) total += entry.second.size;
  out->clear();
  out->reserve(total);
  out->insert(out->end(), header.begin(), header.end());
  for (const auto& entry : tensors) {
    const uint8_t* p = static_cast<const uint8_t*>(entry.second.data);
    out->insert(out->end(), p, p + entry.second.size);
  }
  return Error{};
}

Error WriteFile(const std::string& path, const TensorBytesMap& tensors,
                const std::map<std::string, std::string>& metadata) {
  std::string header;
  Error encoded = EncodeHeader(tensors, metadata, &header);
  if (!encoded.ok()) return encoded;
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) return Error{Code::kFailedPrecondition, "cannot write '" + tmp + "'"};
    out.write(header.data(), static_cast<std::streamsize>(header.size()));
    for (const auto& entry : tensors) {
      out.write(static_cast<const char*>(entry.second.data), static_cast<std::streamsize>(entry.second.size));
    }
    out.close();
    if (!out) {
      std::remove(tmp.c_str());
      return Error{Code::kFailedPrecondition, "short write to '" + tmp + "'"};
    }
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    return Error{Code::kFailedPrecondition, "cannot rename '" + tmp + "' to '" + path + "'"};
  }
  return Error{};
}

}  // namespace mqa::core::safetensors
