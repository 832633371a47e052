// Command-line parsing for the project's programs (mqa-cli, the benchmarks, the developer tools): CLI11 with the
// project's conventions, so every program reads its flags the same way.
//  - --help on every program and every subcommand; --version prints "<program> <mqa::kVersion>".
//  - "--name value" and "--name=value"; an option given twice keeps its last value.
//  - Integers are base 10, whole, and within a stated range; lists are comma-separated. Anything else is a usage
//    error naming the option and what it expects ("--tokens: needs an integer >= 1, got '1e3'"), never an
//    exception escaping main.
//  - Parse() turns the outcome into an exit code: 0 after --help or --version, 2 after a usage error.
// Header-only (CMake target mqa_bench_support, which brings CLI11 and mqa/version.h).
#ifndef MQA_BENCH_SUPPORT_COMMAND_LINE_H_
#define MQA_BENCH_SUPPORT_COMMAND_LINE_H_

#include <CLI/CLI.hpp>

#include <charconv>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

#include "mqa/version.h"

namespace mqa::command_line {

// `text` as a base-10 integer: an optional '-' and digits, nothing else (no '+', spaces, hex or exponent).
// nullopt when it is not one or does not fit in int64.
inline std::optional<int64_t> ParseDecimal(std::string_view text) {
  int64_t value = 0;
  const char* end = text.data() + text.size();
  const std::from_chars_result r = std::from_chars(text.data(), end, value, 10);
  if (text.empty() || r.ec != std::errc() || r.ptr != end) return std::nullopt;
  return value;
}

// The range [min, max] in words, for messages and --help: ">= 1", "in [1, 8]".
inline std::string RangeText(int64_t min, int64_t max) {
  if (max == std::numeric_limits<int64_t>::max()) return ">= " + std::to_string(min);
  return "in [" + std::to_string(min) + ", " + std::to_string(max) + "]";
}

// A CLI11 transform accepting an integer in [min, max]. It rewrites the text to its canonical decimal form, so
// CLI11's own conversion (which would read 010 as octal and 0x10 as hex) stores exactly the number checked here.
inline CLI::Validator IntRange(int64_t min, int64_t max = std::numeric_limits<int64_t>::max()) {
  CLI::Validator v(
      [min, max](std::string& text) -> std::string {
        const std::optional<int64_t> value = ParseDecimal(text);
        if (!value || *value < min || *value > max) {
          return "needs an integer " + RangeText(min, max) + ", got '" + text + "'";
        }
        text = std::to_string(*value);
        return std::string();
      },
      "", "IntRange");
  return v;
}

// The items of a comma-separated list of integers; empty items are skipped ("1,,8" is {1, 8}). nullopt when an
// item is not an integer in [min, max].
inline std::optional<std::vector<int64_t>> ParseIntList(const std::string& text, int64_t min, int64_t max) {
  std::vector<int64_t> out;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (item.empty()) continue;
    const std::optional<int64_t> value = ParseDecimal(item);
    if (!value || *value < min || *value > max) return std::nullopt;
    out.push_back(*value);
  }
  return out;
}

// A CLI11 check accepting a comma-separated list of at least one integer in [min, max].
inline CLI::Validator IntListRange(int64_t min, int64_t max = std::numeric_limits<int64_t>::max()) {
  CLI::Validator v(
      [min, max](const std::string& text) -> std::string {
        const std::optional<std::vector<int64_t>> values = ParseIntList(text, min, max);
        if (!values || values->empty()) {
          return "needs a comma-separated list of integers " + RangeText(min, max) + ", got '" + text + "'";
        }
        return std::string();
      },
      "", "IntListRange");
  return v;
}

// The largest value of Int that int64 holds too.
template <typename Int>
constexpr int64_t TypeMax() {
  return static_cast<uint64_t>(std::numeric_limits<Int>::max()) >
                 static_cast<uint64_t>(std::numeric_limits<int64_t>::max())
             ? std::numeric_limits<int64_t>::max()
             : static_cast<int64_t>(std::numeric_limits<Int>::max());
}

// An integer option stored in *value, checked against [min, max] (max defaults to the most Int and int64 hold).
template <typename Int>
CLI::Option* AddInt(CLI::App& app, const std::string& name, Int* value, int64_t min, const std::string& help,
                    int64_t max = TypeMax<Int>()) {
  // "in [1, 2147483647]" says no more than ">= 1" when the bound is only the type's.
  const bool type_bound = max == TypeMax<Int>();
  const std::string range = RangeText(min, type_bound ? std::numeric_limits<int64_t>::max() : max);
  return app.add_option(name, *value, help + " (an integer " + range + ")")
      ->transform(IntRange(min, max))
      ->type_name("INT");
}

// A comma-separated integer list option, kept as text in *text (already checked when Parse returns): split it with
// IntList(*text).
inline CLI::Option* AddIntList(CLI::App& app, const std::string& name, std::string* text, int64_t min,
                               const std::string& help) {
  return app.add_option(name, *text, help)->check(IntListRange(min))->type_name("INT,INT,...");
}

// The values of a list that AddIntList's check accepted.
inline std::vector<int64_t> IntList(const std::string& text) {
  return ParseIntList(text, std::numeric_limits<int64_t>::min(), std::numeric_limits<int64_t>::max())
      .value_or(std::vector<int64_t>());
}

// The project's conventions on a new app; call before adding any option. The program name comes from the app's
// name (CLI::App app{"description", "mqa-bench-engine"}).
inline void InitApp(CLI::App& app) {
  app.set_version_flag("--version", app.get_name() + " " + mqa::kVersion, "Print the version and exit");
  app.option_defaults()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
}

// Parses argv into app. nullopt: go on. Otherwise the code main should return now: 0 after --help or --version
// (printed on stdout), 2 after a usage error, printed on stderr as "<program>: <what is wrong>" and where the help
// is ("run '<program> [COMMAND] --help' for usage").
inline std::optional<int> Parse(CLI::App& app, int argc, char** argv) {
  try {
    app.parse(argc, argv);
    return std::nullopt;
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::string message = e.what();
    // A program of subcommands given a word that names none hears "A subcommand is required"; say which word.
    const std::vector<std::string> left = app.remaining();
    if (dynamic_cast<const CLI::RequiredError*>(&e) != nullptr && app.get_subcommands().empty() && !left.empty()) {
      message = "unknown command '" + left.front() + "'";
    }
    std::string command = app.get_name();
    for (const CLI::App* sub = &app; sub != nullptr;) {
      const std::vector<CLI::App*> parsed = sub->get_subcommands();
      sub = parsed.empty() ? nullptr : parsed.back();
      if (sub != nullptr) command += " " + sub->get_name();
    }
    std::fprintf(stderr, "%s: %s\nrun '%s --help' for usage\n", app.get_name().c_str(), message.c_str(),
                 command.c_str());
    return 2;
  }
}

}  // namespace mqa::command_line

#endif  // MQA_BENCH_SUPPORT_COMMAND_LINE_H_
