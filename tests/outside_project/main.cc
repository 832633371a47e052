// Uses the installed mqa::client package: Health + ListModels against the target given on the command line.
// Prints "health: SERVING" and one "model: NAME (N layers)" line per model; on an error prints
// "error: CODE: message" and exits 1.
#include <cstdio>
#include <string>

#include "mqa/client/client.h"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s HOST:PORT\n", argv[0]);
    return 2;
  }
  mqa::client::ClientOptions options;
  options.target = argv[1];
  options.default_timeout = std::chrono::seconds(10);
  options.max_retries = 1;
  auto client = mqa::client::Client::Connect(options);
  if (!client.ok()) {
    std::fprintf(stderr, "error: %s\n", client.status().ToString().c_str());
    return 1;
  }
  auto health = (*client)->Health();
  if (!health.ok()) {
    std::fprintf(stderr, "error: %s\n", health.status().ToString().c_str());
    return 1;
  }
  std::printf("health: %s\n", mqa::client::HealthStatusName(*health).c_str());
  auto models = (*client)->ListModels();
  if (!models.ok()) {
    std::fprintf(stderr, "error: %s\n", models.status().ToString().c_str());
    return 1;
  }
  for (const auto& model : *models) std::printf("model: %s (%d layers)\n", model.name.c_str(), model.num_layers);
  std::printf("models: %zu\n", models->size());
  return 0;
}
