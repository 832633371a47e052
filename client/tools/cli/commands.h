// mqa-cli's commands. Each file of this folder holds one: it declares the command's flags on its CLI11 subcommand
// and runs it. main.cc owns the common flags (--target, --timeout-ms, --model), connects, and runs the command
// that was given.
//
// Exit status of every command: 0 on success, 1 on an error (printed as "error: CODE: message"); usage errors
// exit 2 before any command runs.
#ifndef MQA_CLIENT_TOOLS_CLI_COMMANDS_H_
#define MQA_CLIENT_TOOLS_CLI_COMMANDS_H_

#include <functional>
#include <string>

#include "mqa/client/client.h"

namespace CLI {
class App;
}  // namespace CLI

namespace mqa::client::cli {

// The common flags, as parsed.
struct CommonFlags {
  std::string model;  // empty: the first model the server lists
};

// A registered command: its subcommand (set when it was given) and what runs it.
struct Command {
  CLI::App* app = nullptr;
  std::function<int(Client& client, const CommonFlags& common)> run;
};

// Each adds its subcommand to `app`; the flags live as long as the returned Command.
Command AddHealth(CLI::App& app);       // health.cc
Command AddModels(CLI::App& app);       // models.cc
Command AddForward(CLI::App& app);      // forward.cc
Command AddSessionDemo(CLI::App& app);  // session_demo.cc
Command AddBench(CLI::App& app);        // bench.cc

}  // namespace mqa::client::cli

#endif  // MQA_CLIENT_TOOLS_CLI_COMMANDS_H_
