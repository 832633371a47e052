// mqa-cli: a command-line client of mqaserve, built only on the public client API (mqa/client/client.h).
//
//   mqa-cli [common flags] health [--service NAME]
//   mqa-cli [common flags] models
//   mqa-cli [common flags] forward [--layer L] [--tokens S] [--batch B] [--dtype T] [--in FILE] [--out FILE]
//   mqa-cli [common flags] session-demo [--tokens N] [--prefill P] [--sessions K] [--window W] [--dtype T]
//   mqa-cli [common flags] bench [--sessions 1,8,64,256] [--prefill P] [--tokens T] [--warmup W] [--streams S]
//                                [--dtype T] [--json FILE]
//   mqa-cli --help | COMMAND --help | --version
//
// The common flags may come before or after the command. Exit status: 0 on success, 1 on an error (printed as
// "error: CODE: message"), 2 on bad usage.
#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "command_line.h"
#include "commands.h"
#include "common.h"
#include "mqa/client/client.h"

namespace mqa::client::cli {
namespace {

int Main(int argc, char** argv) {
  CLI::App app{"mqa-cli: a command-line client of mqaserve (mqa-server)", "mqa-cli"};
  command_line::InitApp(app);
  const char* env_target = std::getenv("MQA_TARGET");
  std::string target = env_target && *env_target ? env_target : "127.0.0.1:50051";
  int64_t timeout_ms = 30000;
  CommonFlags common;
  app.add_option("--target", target, "HOST:PORT or a gRPC target URI (default: $MQA_TARGET, else 127.0.0.1:50051)")
      ->type_name("HOST:PORT");
  command_line::AddInt(app, "--timeout-ms", &timeout_ms, 1, "per-call deadline in ms")->capture_default_str();
  app.add_option("--model", common.model, "model name (default: the first model the server lists)")->type_name("NAME");
  // The common flags are accepted after the command too ("mqa-cli health --target HOST:PORT").
  app.fallthrough();
  app.require_subcommand(1);
  app.footer("Common flags may come before or after COMMAND; 'mqa-cli COMMAND --help' lists a command's flags.");

  const std::vector<Command> commands = {AddHealth(app), AddModels(app), AddForward(app), AddSessionDemo(app),
                                         AddBench(app)};
  if (argc == 1) {  // no command at all: the whole usage, as an error
    std::fputs(app.help().c_str(), stderr);
    return 2;
  }
  if (std::optional<int> exit_code = command_line::Parse(app, argc, argv)) return *exit_code;

  ClientOptions options;
  options.target = target;
  options.default_timeout = std::chrono::milliseconds(timeout_ms);
  // Fail fast with a clear message when nothing listens, instead of every call retrying.
  options.connect_timeout = std::min(options.default_timeout, std::chrono::milliseconds(10000));
  for (const Command& command : commands) {
    if (!command.app->parsed()) continue;
    StatusOr<std::unique_ptr<Client>> client = Client::Connect(options);
    if (!client.ok()) return Fail(client.status());
    return command.run(**client, common);
  }
  return 2;  // unreachable: require_subcommand(1)
}

}  // namespace
}  // namespace mqa::client::cli

int main(int argc, char** argv) { return mqa::client::cli::Main(argc, argv); }
