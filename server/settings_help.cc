// --help and --help-markdown, both written from the table of settings.
#include <algorithm>
#include <string>
#include <vector>

#include "mqa/version.h"
#include "settings.h"
#include "settings_values.h"

namespace mqa::server {
namespace {

// Markdown table cells: a '|' would end the cell.
std::string Cell(std::string_view text) {
  std::string out;
  for (char c : text) {
    if (c == '|') out += '\\';
    out += c;
  }
  return out;
}

std::string Code(std::string_view text) { return text.empty() ? "-" : "`" + std::string(text) + "`"; }

}  // namespace

std::string SettingValueText(const Setting& setting) {
  switch (setting.type) {
    case SettingType::kInteger:
      return "integer " + IntegerExpectation(setting.range.min, setting.range.max, setting.range.unit);
    case SettingType::kNumber: return "number";
    case SettingType::kText: return "string";
    case SettingType::kAction: break;
  }
  return "-";
}

std::string SettingDefaultText(const Setting& setting) {
  if (setting.type == SettingType::kAction) return "-";
  if (setting.default_value.empty()) return "(none)";
  return std::string(setting.default_value);
}

std::string SettingsHelp() {
  struct Row {
    std::string flag, env, key, def, help;
  };
  std::vector<Row> rows;
  rows.push_back({"flag", "environment", "config key", "default", ""});
  for (const Setting& s : SettingTable()) {
    std::string flag(s.flag);
    if (!s.value_name.empty()) flag += " " + std::string(s.value_name);
    if (!s.alias.empty()) flag += ", " + std::string(s.alias);
    rows.push_back({flag, s.env.empty() ? "-" : std::string(s.env), s.key.empty() ? "-" : std::string(s.key),
                    SettingDefaultText(s), std::string(s.help)});
  }
  size_t w_flag = 0, w_env = 0, w_key = 0;
  for (const Row& r : rows) {
    w_flag = std::max(w_flag, r.flag.size());
    w_env = std::max(w_env, r.env.size());
    w_key = std::max(w_key, r.key.size());
  }
  auto pad = [](const std::string& s, size_t w) { return s + std::string(w + 2 - s.size(), ' '); };
  std::string out = "Usage: mqa-server [--flag VALUE | --flag=VALUE]...   (mqa-server " + std::string(kVersion) +
                    ")\n"
                    "\n"
                    "Serves Multi-Query Attention layers over gRPC, keeping each session's KV cache on the server.\n"
                    "Each setting comes from, lowest precedence first: its default, the config file (YAML or JSON),\n"
                    "the environment (empty values count as unset), the command line.\n"
                    "\n";
  for (const Row& r : rows) {
    out += "  " + pad(r.flag, w_flag) + pad(r.env, w_env) + pad(r.key, w_key) + r.def + "\n";
    if (!r.help.empty()) out += "      " + r.help + "\n";
  }
  out +=
      "\n"
      "Models are configured in the file only, under \"models\" (a list; see deploy/config/example.yaml for\n"
      "every key). Without any, the server hosts the embedded default model \"mqa-default\": 2 layers, dim 512,\n"
      "8 heads, random weights from seed 0, 4096 tokens per session; on cuda:0 in bfloat16 with triton attention\n"
      "(the fused kernels) when a GPU is present, else on the CPU in float32 with torch attention (--device /\n"
      "MQA_DEFAULT_DEVICE choose). A model's dtype and attn_impl, unless the file sets them, follow its device\n"
      "(its first, with several) in the same way.\n"
      "--devices all (or a list: --devices cuda:0,cuda:1) replicates every model on those devices, one engine\n"
      "each (weights, KV-cache pool, worker); each new session goes to the device with the most free blocks.\n";
  return out;
}

std::string SettingsMarkdown() {
  std::string out =
      "| config key | flag | environment | value | default | what |\n"
      "| --- | --- | --- | --- | --- | --- |\n";
  for (const Setting& s : SettingTable()) {
    std::string flag(s.flag);
    if (!s.value_name.empty()) flag += " " + std::string(s.value_name);
    if (!s.alias.empty()) flag += "`, `" + std::string(s.alias);
    const std::string def = SettingDefaultText(s);
    out += "| " + Code(s.key) + " | " + Code(flag) + " | " + Code(s.env) + " | " + Cell(SettingValueText(s)) + " | " +
           (def == "-" || def.front() == '(' ? def : Code(def)) + " | " + Cell(s.help) + " |\n";
  }
  return out;
}

}  // namespace mqa::server
