// The config file (YAML; JSON is read as YAML): its top-level keys are settings of the table (settings.h), its
// "models" a list of ModelSpecs. deploy/config/example.yaml shows every key.
//
// Types are strict: numbers and booleans must not be quoted, lists and maps must not appear where a scalar is
// expected, unknown and duplicate keys are errors. Errors name the file, line and column and the key's path
// ("config.yaml:7:5: models[1].hedas: unknown key; expected one of ...").
#ifndef MQA_SERVER_CONFIG_FILE_H_
#define MQA_SERVER_CONFIG_FILE_H_

#include <string>
#include <string_view>
#include <vector>

#include "config_parse.h"
#include "mqa/core/status.h"

namespace mqa::server {

// Reads `file` into `parsed`: NOT_FOUND when it (or a model's weights file) does not exist, INVALID_ARGUMENT for
// anything malformed. Devices are not looked for (ResolveConfig does that).
core::Status LoadConfigFile(const std::string& file, ParsedConfig& parsed);

// Every key a model entry may have, in the order they are documented.
const std::vector<std::string_view>& ModelKeys();

}  // namespace mqa::server

#endif  // MQA_SERVER_CONFIG_FILE_H_
