// Server: the engine, the gRPC server (MqaService, grpc.health.v1, reflection), the Prometheus /metrics
// endpoint and the drain procedure.
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
#include "server/metrics.h"
#include "server/service.h"

namespace mqa::server {

class Server {
 public:
  // Loads the models, binds config.listen (and config.health_listen: the same gRPC server on a second
  // plaintext address) and starts serving (health SERVING), then starts the /metrics endpoint on
  // config.metrics_listen unless it is empty. Errors from model loading keep their codes; an address that cannot
  // be bound is UNAVAILABLE.
  static core::StatusOr<std::unique_ptr<Server>> Start(const ServerConfig& config);
  ~Server();

  int port() const { return port_; }
  int health_port() const { return health_port_; }    // 0 without health_listen (or for a unix: address)
  int metrics_port() const { return metrics_port_; }  // 0 without metrics_listen

  // Graceful stop: health NOT_SERVING, new sessions refused (UNAVAILABLE), queued and running steps finish, and
  // open sessions may keep stepping until they close or budget runs out; then the gRPC server shuts down
  // (cancelling what is left), and last the /metrics endpoint, so scrapes see mqa_draining 1 throughout.
  // Returns when the server has stopped.
  void Drain(std::chrono::milliseconds budget);
  // Blocks until the server has shut down.
  void Wait();

  const core::Engine& engine() const { return *engine_; }

 private:
  Server() = default;

  ServerConfig config_;
  std::unique_ptr<core::Engine> engine_;
  std::unique_ptr<ServiceMetrics> metrics_;
  std::unique_ptr<MqaServiceImpl> service_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<MetricsHttpServer> metrics_server_;  // renders from engine_, service_ and metrics_
  int port_ = 0;
  int health_port_ = 0;
  int metrics_port_ = 0;
};

}  // namespace mqa::server

#endif  // MQA_SERVER_SERVER_H_
