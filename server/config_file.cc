#include "config_file.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <climits>
#include <cstring>
#include <exception>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <set>
#include <sstream>
#include <system_error>
#include <utility>

#include "config_devices.h"
#include "mqa/core/mqa_layer.h"
#include "mqa/core/tensor.h"
#include "name_limits.h"
#include "settings.h"
#include "settings_values.h"

namespace mqa::server {
namespace {

namespace fs = std::filesystem;
using core::InvalidArgumentError;
using core::NotFoundError;
using core::Status;
using core::StatusCode;
using core::StatusOr;

std::string Where(const std::string& file, const YAML::Mark& mark) {
  if (mark.is_null()) return file + ": ";
  return file + ":" + std::to_string(mark.line + 1) + ":" + std::to_string(mark.column + 1) + ": ";
}

std::string Describe(const YAML::Node& node) {
  switch (node.Type()) {
    case YAML::NodeType::Null: return "null";
    case YAML::NodeType::Sequence: return "a list";
    case YAML::NodeType::Map: return "a map";
    case YAML::NodeType::Scalar:
      return node.Tag() == "!" ? "the quoted string \"" + node.Scalar() + "\"" : Quoted(node.Scalar());
    case YAML::NodeType::Undefined: break;
  }
  return "nothing";
}

bool IsQuoted(const YAML::Node& node) { return node.IsScalar() && node.Tag() == "!"; }

// Every typed read of a file value goes through these, so a wrong type always says what was expected.
StatusOr<std::string> FileString(const YAML::Node& node, const std::string& origin) {
  if (!node.IsScalar()) return InvalidArgumentError(origin + ": expected a string, got " + Describe(node));
  return node.Scalar();
}

StatusOr<std::string> FileNumberText(const YAML::Node& node, const std::string& origin, std::string_view what) {
  // A quoted number is a string in YAML and JSON alike; accepting it would hide a mistake in the file.
  if (!node.IsScalar() || IsQuoted(node)) {
    return InvalidArgumentError(origin + ": expected " + std::string(what) + ", got " + Describe(node));
  }
  return node.Scalar();
}

StatusOr<int64_t> FileInteger(const YAML::Node& node, int64_t min, int64_t max, const std::string& origin) {
  MQA_ASSIGN_OR_RETURN(std::string text, FileNumberText(node, origin, "an integer"));
  return ParseInteger(text, min, max, origin);
}

StatusOr<double> FileNumber(const YAML::Node& node, const std::string& origin) {
  MQA_ASSIGN_OR_RETURN(std::string text, FileNumberText(node, origin, "a number"));
  return ParseNumber(text, origin);
}

StatusOr<std::optional<double>> FileOptionalNumber(const YAML::Node& node, const std::string& origin) {
  if (node.IsNull()) return std::optional<double>();
  MQA_ASSIGN_OR_RETURN(std::string text, FileNumberText(node, origin, "a number or null"));
  MQA_ASSIGN_OR_RETURN(double v, ParseNumber(text, origin));
  return std::optional<double>(v);
}

StatusOr<bool> FileBool(const YAML::Node& node, const std::string& origin) {
  if (node.IsScalar() && !IsQuoted(node)) {
    // YAML 1.2's core schema; YAML 1.1's yes/no/on/off are refused because JSON and newer parsers disagree.
    const std::string& s = node.Scalar();
    if (s == "true" || s == "True" || s == "TRUE") return true;
    if (s == "false" || s == "False" || s == "FALSE") return false;
  }
  return InvalidArgumentError(origin + ": expected true or false, got " + Describe(node));
}

template <typename T>
StatusOr<T> WithPrefix(StatusOr<T> result, const std::string& prefix) {
  if (result.ok()) return result;
  return Status(result.status().code(), prefix + result.status().message());
}

std::string Join(const std::vector<std::string_view>& items) {
  std::string out;
  for (size_t i = 0; i < items.size(); ++i) {
    if (i > 0) out += ", ";
    out += items[i];
  }
  return out;
}

std::vector<std::string_view> TopLevelKeys() {
  std::vector<std::string_view> keys;
  for (const Setting& s : SettingTable()) {
    if (!s.key.empty()) keys.push_back(s.key);
  }
  keys.push_back("models");
  return keys;
}

// A model's devices key: the string all, or a list of device strings.
StatusOr<DeviceRequest> FileDevices(const YAML::Node& node, const std::string& origin, const std::string& file,
                                    const std::string& path) {
  DeviceRequest request;
  request.origin = origin;
  if (node.IsScalar() && node.Scalar() == "all") {
    request.all = true;
    return request;
  }
  if (!node.IsSequence() || node.size() == 0) {
    return InvalidArgumentError(origin +
                                ": expected all or a non-empty list of devices ([cuda:0, cuda:1]; "
                                "device: takes a single one), got " +
                                Describe(node));
  }
  for (size_t i = 0; i < node.size(); ++i) {
    const YAML::Node d = node[i];
    const std::string at = Where(file, d.Mark()) + path + ".devices[" + std::to_string(i) + "]";
    MQA_ASSIGN_OR_RETURN(std::string spelled, FileString(d, at));
    MQA_RETURN_IF_ERROR(request.Add(spelled, at));
  }
  return request;
}

Status CheckModelName(const std::string& name, const std::string& origin) {
  // Requests naming a model are refused past kMaxModelNameBytes (request_checks.h), so a longer name could never
  // be reached.
  const bool bad =
      name.empty() || name.size() > kMaxModelNameBytes || std::any_of(name.begin(), name.end(), [](char c) {
        return std::isspace(static_cast<unsigned char>(c)) || std::iscntrl(static_cast<unsigned char>(c));
      });
  if (!bad) return Status::Ok();
  return InvalidArgumentError(origin + ": expected a non-empty name of at most " + std::to_string(kMaxModelNameBytes) +
                              " bytes without whitespace, got " + Quoted(name.substr(0, 160)));
}

StatusOr<std::string> WeightsPath(const YAML::Node& v, const std::string& origin, const fs::path& base_dir) {
  if (v.IsNull()) return std::string();
  MQA_ASSIGN_OR_RETURN(std::string s, FileString(v, origin));
  if (s.empty()) return std::string();
  fs::path p(s);
  // Relative to the file, not the working directory, so a config and its weights can move together.
  if (p.is_relative()) p = base_dir / p;
  p = p.lexically_normal();
  std::error_code ec;
  const fs::file_status st = fs::status(p, ec);
  if (!fs::exists(st)) return NotFoundError(origin + ": weights file '" + p.string() + "' not found");
  if (fs::is_directory(st)) {
    return InvalidArgumentError(origin + ": weights '" + p.string() + "' is a directory, expected a file");
  }
  return p.string();
}

// One key of a model entry into `spec`.
Status ApplyModelKey(const std::string& key, const YAML::Node& v, const std::string& origin, const std::string& file,
                     const std::string& path, const fs::path& base_dir, std::string& device_key, ModelSpec& spec) {
  core::ModelConfig& m = spec.model;
  core::MqaOptions& o = m.options;
  if (key == "name") {
    MQA_ASSIGN_OR_RETURN(m.name, FileString(v, origin));
    return CheckModelName(m.name, origin);
  }
  if (key == "num_layers") {
    MQA_ASSIGN_OR_RETURN(int64_t n, FileInteger(v, 1, INT_MAX, origin));
    m.num_layers = static_cast<int>(n);
  } else if (key == "dim") {
    MQA_ASSIGN_OR_RETURN(o.dim, FileInteger(v, INT64_MIN, INT64_MAX, origin));
  } else if (key == "heads") {
    MQA_ASSIGN_OR_RETURN(o.heads, FileInteger(v, INT64_MIN, INT64_MAX, origin));
  } else if (key == "attn_impl") {
    MQA_ASSIGN_OR_RETURN(std::string s, FileString(v, origin));
    MQA_ASSIGN_OR_RETURN(o.attn_impl, WithPrefix(core::ParseAttnImpl(s), origin + ": "));
    spec.attn_impl_set = true;
  } else if (key == "clip_qkv") {
    MQA_ASSIGN_OR_RETURN(o.clip_qkv, FileOptionalNumber(v, origin));
  } else if (key == "qk_ln") {
    MQA_ASSIGN_OR_RETURN(o.qk_ln, FileBool(v, origin));
  } else if (key == "softmax_scale") {
    MQA_ASSIGN_OR_RETURN(o.softmax_scale, FileOptionalNumber(v, origin));
  } else if (key == "attn_pdrop") {
    MQA_ASSIGN_OR_RETURN(o.attn_pdrop, FileNumber(v, origin));
  } else if (key == "norm_type") {
    MQA_ASSIGN_OR_RETURN(std::string s, FileString(v, origin));
    MQA_ASSIGN_OR_RETURN(o.norm_type, WithPrefix(core::ParseNormType(s), origin + ": "));
  } else if (key == "fc_type") {
    MQA_ASSIGN_OR_RETURN(o.fc_type, FileString(v, origin));
  } else if (key == "device" || key == "devices") {
    if (!device_key.empty()) {
      return InvalidArgumentError(origin + ": give device (one) or devices (several), not both (" + device_key +
                                  " is set too)");
    }
    device_key = path + "." + key;
    if (key == "device") {
      MQA_ASSIGN_OR_RETURN(spec.device, FileString(v, origin));
      if (spec.device.empty()) return InvalidArgumentError(origin + ": expected cpu, cuda, cuda:N or auto, got ''");
    } else {
      MQA_ASSIGN_OR_RETURN(spec.devices, FileDevices(v, origin, file, path));
    }
  } else if (key == "dtype") {
    MQA_ASSIGN_OR_RETURN(std::string s, FileString(v, origin));
    MQA_ASSIGN_OR_RETURN(o.dtype, WithPrefix(core::ParseDType(s), origin + ": "));
    spec.dtype_set = true;
  } else if (key == "seed") {
    MQA_ASSIGN_OR_RETURN(std::string text, FileNumberText(v, origin, "an integer"));
    MQA_ASSIGN_OR_RETURN(o.seed, ParseUnsigned(text, origin));
  } else if (key == "weights") {
    MQA_ASSIGN_OR_RETURN(m.weights_path, WeightsPath(v, origin, base_dir));
  } else if (key == "max_tokens_per_session") {
    MQA_ASSIGN_OR_RETURN(m.max_tokens_per_session, FileInteger(v, 1, INT64_MAX, origin));
  } else if (key == "description") {
    if (!v.IsNull()) {
      MQA_ASSIGN_OR_RETURN(m.description, FileString(v, origin));
    }
  } else {
    return InvalidArgumentError(origin + ": unknown key; expected one of " + Join(ModelKeys()));
  }
  return Status::Ok();
}

// Reads one entry of `models`. Field errors name the field's path ("models[1].heads"); whole-model errors name the
// model ("models[1] (mqa-7b): ").
StatusOr<ModelSpec> ParseModel(const YAML::Node& node, size_t index, const std::string& file,
                               const fs::path& base_dir) {
  const std::string path = "models[" + std::to_string(index) + "]";
  if (!node.IsMap()) {
    return InvalidArgumentError(Where(file, node.Mark()) + path + ": expected a map describing a model, got " +
                                Describe(node));
  }
  ModelSpec spec;
  spec.origin = Where(file, node.Mark()) + path;
  std::string device_key;  // path of the device or devices key, whichever came first
  std::set<std::string> seen;
  for (auto it = node.begin(); it != node.end(); ++it) {
    const YAML::Node k = it->first;  // copies: it-> returns a proxy that dies with the statement
    const YAML::Node v = it->second;
    if (!k.IsScalar()) {
      return InvalidArgumentError(Where(file, k.Mark()) + path + ": keys must be strings, got " + Describe(k));
    }
    const std::string key = k.Scalar();
    const std::string origin = Where(file, k.Mark()) + path + "." + key;
    if (!seen.insert(key).second) return InvalidArgumentError(origin + ": duplicate key");
    MQA_RETURN_IF_ERROR(ApplyModelKey(key, v, origin, file, path, base_dir, device_key, spec));
  }
  if (!seen.count("name")) return InvalidArgumentError(spec.origin + ": missing required key 'name'");
  // What does not depend on the device is checked now, in file order; the device, its defaults and the rest
  // once the device is known (ResolveConfig).
  MQA_RETURN_IF_ERROR(ValidateOptionsButDevice(spec.model.options, spec.origin + " (" + spec.model.name + "): "));
  return spec;
}

Status ParseModels(const YAML::Node& node, const std::string& origin, const std::string& file, const fs::path& base_dir,
                   ParsedConfig& parsed) {
  if (node.IsNull()) return Status::Ok();
  if (!node.IsSequence()) {
    return InvalidArgumentError(origin + ": expected a list of models, got " + Describe(node));
  }
  std::map<std::string, size_t> names;
  for (size_t i = 0; i < node.size(); ++i) {
    MQA_ASSIGN_OR_RETURN(ModelSpec spec, ParseModel(node[i], i, file, base_dir));
    auto [it, inserted] = names.emplace(spec.model.name, i);
    if (!inserted) {
      return InvalidArgumentError(Where(file, node[i].Mark()) + "models[" + std::to_string(i) +
                                  "].name: duplicate model name " + Quoted(spec.model.name) + " (models[" +
                                  std::to_string(it->second) + "] has it too)");
    }
    parsed.file_models.push_back(std::move(spec));
  }
  return Status::Ok();
}

Status ApplyFileRoot(const YAML::Node& root, const std::string& file, const fs::path& base_dir, ParsedConfig& parsed) {
  if (root.IsNull()) return Status::Ok();  // an empty file: all defaults
  if (!root.IsMap()) {
    return InvalidArgumentError(Where(file, root.Mark()) + "expected a map of settings at the top level, got " +
                                Describe(root));
  }
  std::set<std::string> seen;
  for (auto it = root.begin(); it != root.end(); ++it) {
    const YAML::Node k = it->first;  // copies: it-> returns a proxy that dies with the statement
    const YAML::Node v = it->second;
    if (!k.IsScalar()) return InvalidArgumentError(Where(file, k.Mark()) + "keys must be strings, got " + Describe(k));
    const std::string key = k.Scalar();
    const std::string origin = Where(file, k.Mark()) + key;
    if (!seen.insert(key).second) return InvalidArgumentError(origin + ": duplicate key");
    if (key == "models") {
      MQA_RETURN_IF_ERROR(ParseModels(v, origin, file, base_dir, parsed));
      continue;
    }
    const Setting* s = FindKey(key);
    if (s == nullptr) return InvalidArgumentError(origin + ": unknown key; expected one of " + Join(TopLevelKeys()));
    std::string text;
    if (s->type == SettingType::kInteger) {
      MQA_ASSIGN_OR_RETURN(text, FileNumberText(v, origin, "an integer"));
    } else if (s->type == SettingType::kNumber) {
      MQA_ASSIGN_OR_RETURN(text, FileNumberText(v, origin, "a number"));
    } else {
      MQA_ASSIGN_OR_RETURN(text, FileString(v, origin));
    }
    MQA_RETURN_IF_ERROR(ApplySetting(*s, parsed, text, origin));
  }
  return Status::Ok();
}

}  // namespace

const std::vector<std::string_view>& ModelKeys() {
  static const std::vector<std::string_view> keys = {"name",
                                                     "num_layers",
                                                     "dim",
                                                     "heads",
                                                     "attn_impl",
                                                     "clip_qkv",
                                                     "qk_ln",
                                                     "softmax_scale",
                                                     "attn_pdrop",
                                                     "norm_type",
                                                     "fc_type",
                                                     "device",
                                                     "devices",
                                                     "dtype",
                                                     "seed",
                                                     "weights",
                                                     "max_tokens_per_session",
                                                     "description"};
  return keys;
}

Status LoadConfigFile(const std::string& file, ParsedConfig& parsed) {
  std::error_code ec;
  const fs::file_status st = fs::status(file, ec);
  if (!fs::exists(st)) return NotFoundError("config file '" + file + "' not found");
  if (fs::is_directory(st)) return InvalidArgumentError("config file '" + file + "' is a directory");
  std::ifstream in(file, std::ios::binary);
  if (!in) {
    return Status(StatusCode::kPermissionDenied, "cannot read config file '" + file + "': " + std::strerror(errno));
  }
  std::ostringstream text;
  text << in.rdbuf();
  const fs::path base_dir = fs::absolute(fs::path(file), ec).parent_path();
  try {
    YAML::Node root;
    try {
      root = YAML::Load(text.str());
    } catch (const YAML::ParserException& e) {
      return InvalidArgumentError(Where(file, e.mark) + "not valid YAML or JSON: " + e.msg);
    }
    parsed.config.config_path = file;
    return ApplyFileRoot(root, file, base_dir, parsed);
  } catch (const YAML::Exception& e) {
    // yaml-cpp reports some malformed documents only when the tree is walked.
    return InvalidArgumentError(Where(file, e.mark) + e.msg);
  } catch (const std::exception& e) {
    return core::InternalError("reading config file '" + file + "': " + e.what());
  }
}

}  // namespace mqa::server
