// The server's settings as one table (settings.cc): each one's name, command-line flag, environment variable,
// config-file key, type, default, check and help text. Everything that names a setting reads this table: the flag
// parser and the environment and config-file readers (config_parse.cc, config_file.cc), the defaults LoadConfig
// starts from, `mqa-server --help` and `--help-markdown` (the settings section of docs/operations.md, which a
// test compares with it), and the test that deploy/config/example.yaml shows every key with its default. A
// setting therefore cannot be known to one of them and missing, or different, in another.
//
// Models are not in the table: they are configured in the file only, under "models" (config_file.h).
#ifndef MQA_SERVER_SETTINGS_H_
#define MQA_SERVER_SETTINGS_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "mqa/core/status.h"

namespace mqa::server {

struct ParsedConfig;  // config_parse.h: what the settings are stored into

enum class SettingType {
  kText,     // a string; the setting's apply function checks it
  kInteger,  // a strict decimal integer in [range.min, range.max]
  kNumber,   // a finite number; the apply function checks its range
  kAction,   // a flag without a value (--help, --version): something for main to do instead of serving
};

struct IntegerRange {
  int64_t min = 0;
  int64_t max = 0;
  std::string_view unit;  // "milliseconds", "bytes"; "" = a plain count
};

struct Setting {
  using ApplyText = core::Status (*)(ParsedConfig& parsed, std::string_view value, const std::string& origin);
  using ApplyInteger = void (*)(ParsedConfig& parsed, int64_t value);

  std::string_view name;   // "max_sessions": the key when the setting is in the file
  std::string_view flag;   // "--max-sessions"
  std::string_view alias;  // another spelling of the flag ("-h"); "" = none
  std::string_view env;    // "MQA_MAX_SESSIONS"; "" = none
  std::string_view key;    // config-file key; "" = flag and environment only
  SettingType type = SettingType::kText;
  std::string_view value_name;  // the value's placeholder in --help: "N", "ADDR"
  // The value when no source gives one, spelled as a source would. When default_applied, LoadConfig starts from
  // it, so the table is where the default lives; otherwise it only describes a default decided elsewhere (the
  // devices, decided once the machine's devices are known).
  std::string_view default_value;
  bool default_applied = false;
  IntegerRange range;  // kInteger only
  std::string_view help;
  ApplyText apply_text = nullptr;        // kText and kNumber: checks the value and stores it
  ApplyInteger apply_integer = nullptr;  // kInteger: stores a value already checked against range
};

// Every setting, in --help order.
const std::vector<Setting>& SettingTable();

// The setting of a flag ("--listen" or an alias), of an environment variable or of a config-file key; nullptr
// when there is none.
const Setting* FindFlag(std::string_view flag);
const Setting* FindEnv(std::string_view env);
const Setting* FindKey(std::string_view key);

// Checks `value` as `setting` expects (for kInteger: strict decimal within its range) and stores it. Refusals are
// INVALID_ARGUMENT "<origin>: expected ..., got '<value>'".
core::Status ApplySetting(const Setting& setting, ParsedConfig& parsed, std::string_view value,
                          const std::string& origin);

// What the setting accepts, for --help-markdown: "integer (milliseconds) between 0 and 31536000000 (one year)",
// "number", "string".
std::string SettingValueText(const Setting& setting);
// Its default as shown: "(none)" for an empty value, "-" for an action.
std::string SettingDefaultText(const Setting& setting);

// `mqa-server --help`: every flag with its variable, key, default and help text.
std::string SettingsHelp();
// `mqa-server --help-markdown`: the settings as a Markdown table, the text between the markers of
// docs/operations.md's settings section.
std::string SettingsMarkdown();

}  // namespace mqa::server

#endif  // MQA_SERVER_SETTINGS_H_
