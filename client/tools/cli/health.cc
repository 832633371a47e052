// mqa-cli health: the grpc.health.v1 check; exit 0 only when SERVING (the Docker HEALTHCHECK).
#include <cstdio>
#include <memory>
#include <string>

#include <CLI/CLI.hpp>

#include "commands.h"
#include "common.h"

namespace mqa::client::cli {

Command AddHealth(CLI::App& app) {
  auto service = std::make_shared<std::string>();
  CLI::App* sub = app.add_subcommand("health", "grpc.health.v1 check; exit 0 only when SERVING");
  sub->add_option("--service", *service, "the service to ask about (default: the whole server)")->type_name("NAME");
  return Command{sub, [service](Client& client, const CommonFlags&) {
                   StatusOr<HealthStatus> health = client.Health(*service);
                   if (!health.ok()) return Fail(health.status());
                   std::printf("%s\n", HealthStatusName(*health).c_str());
                   return *health == HealthStatus::kServing ? 0 : 1;
                 }};
}

}  // namespace mqa::client::cli
