// Fuzzes the server configuration (server/config.h, server/settings.h): the YAML/JSON config file, the MQA_*
// environment variables and the command-line flags, through LoadConfig, the function mqa-server's main calls.
//
// Input: up to three parts split at NUL bytes: the config file's text; then environment lines (NAME=value);
// then command-line arguments, one per line. A seed without NUL is a plain config file. The file is written
// to a scratch directory and passed as MQA_CONFIG; --config flags and an MQA_CONFIG line of the input are
// dropped, so the fuzzer never makes the loader read some other path of this machine (a FIFO or /dev/zero
// would block or never end, which says nothing about the parser).
//
// Beyond the sanitizers' checks, the target aborts when
//  - a refusal has a code other than INVALID_ARGUMENT, NOT_FOUND (a weights file) or UNAVAILABLE (a CUDA
//    device this machine lacks), or an empty message;
//  - an accepted configuration breaks what LoadConfig promises: at least one model, unique names, options that
//    pass core::ValidateOptions, default idle TTL <= max idle TTL, a message size gRPC can take.
#include <unistd.h>

#include <climits>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "config.h"
#include "mqa/core/mqa_layer.h"
#include "mqa/core/status.h"

namespace mqa::server {
namespace {

using core::StatusCode;

void Require(bool ok, const std::string& what) {
  if (ok) return;
  std::fprintf(stderr, "config_fuzz: %s\n", what.c_str());
  std::abort();
}

// One scratch directory per process (libFuzzer's -fork and -jobs run several). Relative weights paths in the
// file resolve against it.
const std::filesystem::path& ScratchDir() {
  static const std::filesystem::path dir = [] {
    std::filesystem::path d = std::filesystem::temp_directory_path() / ("mqa-config-fuzz-" + std::to_string(getpid()));
    std::filesystem::create_directories(d);
    // An existing weights file, so that the "weights" key is accepted as well as refused.
    std::ofstream(d / "w.safetensors") << "x";
    return d;
  }();
  return dir;
}

std::vector<std::string> Lines(std::string_view text) {
  std::vector<std::string> lines;
  size_t start = 0;
  while (start <= text.size()) {
    size_t end = text.find('\n', start);
    if (end == std::string_view::npos) end = text.size();
    if (end > start) lines.emplace_back(text.substr(start, end - start));
    start = end + 1;
  }
  return lines;
}

void CheckAccepted(const ServerConfig& config) {
  Require(!config.engine.models.empty(), "accepted a configuration without models");
  std::set<std::string> names;
  for (const core::ModelConfig& m : config.engine.models) {
    Require(names.insert(m.name).second, "duplicate model name accepted: " + m.name);
    Require(!m.name.empty(), "empty model name accepted");
    Require(m.num_layers >= 1, m.name + ": num_layers < 1 accepted");
    Require(m.max_tokens_per_session >= 1, m.name + ": max_tokens_per_session < 1 accepted");
    const core::Status st = core::ValidateOptions(m.options);
    Require(st.ok(), m.name + ": accepted options that core refuses: " + st.message());
  }
  Require(config.engine.default_idle_ttl <= config.engine.max_idle_ttl, "default idle TTL above the maximum");
  Require(config.max_message_bytes >= 1 && config.max_message_bytes <= static_cast<size_t>(INT_MAX),
          "max_message_bytes outside what gRPC takes");
}

void FuzzOne(const uint8_t* data, size_t size) {
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  const size_t nul1 = input.find('\0');
  const std::string_view file_text = input.substr(0, nul1);
  std::string_view env_text, argv_text;
  if (nul1 != std::string_view::npos) {
    const std::string_view rest = input.substr(nul1 + 1);
    const size_t nul2 = rest.find('\0');
    env_text = rest.substr(0, nul2);
    if (nul2 != std::string_view::npos) argv_text = rest.substr(nul2 + 1);
  }

  std::map<std::string, std::string> env;
  for (const std::string& line : Lines(env_text)) {
    const size_t eq = line.find('=');
    if (eq == std::string::npos) continue;
    env[line.substr(0, eq)] = line.substr(eq + 1);
  }
  env.erase("MQA_CONFIG");
  const std::string file = (ScratchDir() / "config.yaml").string();
  if (!file_text.empty()) {
    std::ofstream(file, std::ios::binary | std::ios::trunc)
        .write(file_text.data(), static_cast<std::streamsize>(file_text.size()));
    env["MQA_CONFIG"] = file;
  }

  std::vector<std::string> args = {"mqa-server"};
  for (std::string& arg : Lines(argv_text)) {
    if (arg.rfind("--config", 0) == 0) continue;
    args.push_back(std::move(arg));
  }
  std::vector<const char*> argv;
  for (const std::string& a : args) argv.push_back(a.c_str());
  argv.push_back(nullptr);

  core::StatusOr<ServerConfig> config = LoadConfig(static_cast<int>(args.size()), argv.data(), env);
  if (!config.ok()) {
    const StatusCode code = config.status().code();
    Require(code == StatusCode::kInvalidArgument || code == StatusCode::kNotFound || code == StatusCode::kUnavailable,
            "unexpected code " + std::to_string(static_cast<int>(code)) + ": " + config.status().message());
    Require(!config.status().message().empty(), "refusal without a message");
    return;
  }
  // --help, --help-markdown and --version end the program before any model is built.
  if (!config->show_help && !config->show_help_markdown && !config->show_version) CheckAccepted(*config);
}

}  // namespace
}  // namespace mqa::server

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  mqa::server::FuzzOne(data, size);
  return 0;
}
