// mqa-server: serves the configured models (or the embedded default model) over gRPC until SIGTERM/SIGINT,
// which start a graceful drain (see Server::Drain).
#include <signal.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <string>
#include <thread>

#include "server/config.h"
#include "server/logging.h"
#include "server/server.h"
#include "server/settings.h"

namespace {

// Written to a temporary name and renamed, so a reader never sees a partial number. Nothing when path is empty.
void WritePortFile(const std::string& path, int port) {
  if (path.empty()) return;
  const std::string tmp = path + ".tmp";
  std::ofstream(tmp) << port << "\n";
  std::rename(tmp.c_str(), path.c_str());
}

}  // namespace

int main(int argc, char** argv) {
  // Signals are taken by one thread with sigwait, so the drain runs in ordinary code rather than in a handler;
  // every thread created after this inherits the mask.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  auto config = mqa::server::LoadConfig(argc, argv, mqa::server::ProcessEnvironment());
  if (!config.ok()) {
    std::cerr << "mqa-server: " << config.status().ToString() << "\n(see mqa-server --help)\n";
    return 2;
  }
  if (config->show_help) {
    std::cout << mqa::server::ConfigHelp();
    return 0;
  }
  if (config->show_help_markdown) {
    std::cout << mqa::server::SettingsMarkdown();
    return 0;
  }
  if (config->show_version) {
    std::cout << mqa::server::VersionText();
    return 0;
  }
  if (auto st = mqa::server::SetUpLogging(config->log_level, config->log_format); !st.ok()) {
    std::cerr << "mqa-server: " << st.ToString() << "\n";
    return 2;
  }
  for (const std::string& notice : config->notices) mqa::server::LogWarn("config_notice", {{"notice", notice}});
  auto server = mqa::server::Server::Start(*config);
  if (!server.ok()) {
    mqa::server::LogError("start_failed", {{"code", std::string(mqa::core::StatusCodeName(server.status().code()))},
                                           {"reason", server.status().message()}});
    return 1;
  }
  // The main port file last: whoever waits for it finds the other two already there.
  WritePortFile(config->metrics_port_file, (*server)->metrics_port());
  WritePortFile(config->health_port_file, (*server)->health_port());
  WritePortFile(config->port_file, (*server)->port());

  std::thread signal_thread([&] {
    int sig = 0;
    sigwait(&signals, &sig);
    mqa::server::LogInfo("signal", {{"signal", sig == SIGTERM ? "SIGTERM" : "SIGINT"}});
    (*server)->Drain(config->drain_timeout);
  });
  (*server)->Wait();
  signal_thread.join();
  server->reset();
  mqa::server::LogInfo("server_stopped", {});
  return 0;
}
