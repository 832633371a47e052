// LoadConfig's two steps joined (config_parse.cc, config_devices.cc), and the process environment.
#include "config.h"

#include <utility>

#include "config_devices.h"
#include "config_parse.h"
#include "mqa/version.h"
#include "settings.h"

extern char** environ;  // POSIX; declared here because no standard header is required to

namespace mqa::server {

core::ModelConfig DefaultModel() { return DefaultModel("auto"); }

core::ModelConfig DefaultModel(std::string_view device) { return DefaultModelOn(device, SystemDevices()); }

core::StatusOr<ServerConfig> LoadConfig(int argc, const char* const* argv,
                                        const std::map<std::string, std::string>& env) {
  MQA_ASSIGN_OR_RETURN(ParsedConfig parsed, ParseConfig(argc, argv, env));
  return ResolveConfig(std::move(parsed), SystemDevices());
}

std::map<std::string, std::string> ProcessEnvironment() {
  std::map<std::string, std::string> env;
  for (char** e = environ; e != nullptr && *e != nullptr; ++e) {
    const std::string_view entry(*e);
    if (entry.rfind("MQA_", 0) != 0) continue;
    const size_t eq = entry.find('=');
    if (eq == std::string_view::npos) continue;
    env.emplace(std::string(entry.substr(0, eq)), std::string(entry.substr(eq + 1)));
  }
  return env;
}

std::string ConfigHelp() { return SettingsHelp(); }

std::string VersionText() { return "mqa-server " + std::string(kVersion) + "\n"; }

}  // namespace mqa::server
