// Server: the engine, the gRPC server (MqaService, grpc.health.v1, reflection) and the drain procedure.
//
// Thread-safety: Drain() and Shutdown() may be called from any thread (typically a signal-handling thread)
// while Wait() blocks in another.
#ifndef MQA_SERVER_SERVER_H_
#define MQA_SERVER_SERVER_H_

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <memory>

#include "mqa/core/engine.h"
#include "mqa/core/status.h"
#include "server/config.h"
#include "server/service.h"

namespace mqa::server {

class Server {
 public:
  // Loads the models, binds config.listen and starts serving (health SERVING). Errors from model loading keep
  // their codes; a port that cannot be bound is UNAVAILABLE.
  static core::StatusOr<std::unique_ptr<Server>> Start(const ServerConfig& config);
  ~Server();

  int port() const { return port_; }

  // Graceful stop: health NOT_SERVING, new sessions refused (UNAVAILABLE), queued and running steps finish, and
  // open sessions may keep stepping until they close or budget runs out; then the gRPC server shuts down
  // (cancelling what is left). Returns when the server has stopped.
  void Drain(std::chrono::milliseconds budget);
  // Blocks until the server has shut down.
  void Wait();

  const core::Engine& engine() const { return *engine_; }

 private:
  Server() = default;

  ServerConfig config_;
  std::unique_ptr<core::Engine> engine_;
  std::unique_ptr<MqaServiceImpl> service_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
};

}  // namespace mqa::server

#endif  // MQA_SERVER_SERVER_H_
