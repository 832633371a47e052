#include "server/server.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/health_check_service_interface.h>

#include <string>
#include <thread>

#include "grpc/health/v1/health.pb.h"
#include "server/logging.h"

namespace mqa::server {
namespace {

constexpr char kServiceName[] = "mqa.v1.MqaService";

void SetServing(grpc::Server* server, bool serving) {
  grpc::HealthCheckServiceInterface* health = server->GetHealthCheckService();
  if (health == nullptr) return;
  health->SetServingStatus("", serving);
  health->SetServingStatus(kServiceName, serving);
}

}  // namespace

core::StatusOr<std::unique_ptr<Server>> Server::Start(const ServerConfig& config) {
  std::unique_ptr<Server> s(new Server());
  s->config_ = config;
  core::EngineOptions engine_options = config.engine;
  // A Forward whose weights alone exceed the message limit could never be answered: the engine refuses it up front.
  engine_options.max_forward_weights_bytes =
      static_cast<int64_t>(std::min<size_t>(config.max_message_bytes, INT32_MAX));
  MQA_ASSIGN_OR_RETURN(s->engine_, core::Engine::Create(std::move(engine_options)));
  s->metrics_ = std::make_unique<ServiceMetrics>();
  ServiceOptions service_options;
  service_options.metrics = s->metrics_.get();
  service_options.max_pending_steps_per_stream = config.stream_max_pending_steps;
  service_options.max_pending_bytes_per_stream = config.stream_max_pending_bytes;
  s->service_ = std::make_unique<MqaServiceImpl>(s->engine_.get(), service_options);

  // gRPC's built-in health service keeps its schema outside protobuf's descriptor pool; touching our compiled copy
  // links it in, so reflection can describe grpc.health.v1.Health too.
  (void)grpc::health::v1::HealthCheckRequest::descriptor();
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  builder.AddListeningPort(config.listen, grpc::InsecureServerCredentials(), &s->port_);
  // Kubernetes' native gRPC probes speak plaintext only; a second address lets them reach grpc.health.v1 even
  // when the main one is fronted by something else. It is the same server: same services, same health status.
  if (!config.health_listen.empty()) {
    builder.AddListeningPort(config.health_listen, grpc::InsecureServerCredentials(), &s->health_port_);
  }
  builder.RegisterService(s->service_.get());
  const int max_bytes = static_cast<int>(std::min<size_t>(config.max_message_bytes, INT32_MAX));
  builder.SetMaxReceiveMessageSize(max_bytes);
  builder.SetMaxSendMessageSize(max_bytes);
  s->server_ = builder.BuildAndStart();
  // BuildAndStart gives no server when any of the addresses cannot be bound.
  if (!s->server_ || s->port_ == 0) {
    const std::string where = config.listen + (config.health_listen.empty() ? "" : " and " + config.health_listen);
    return core::UnavailableError("cannot listen on " + where + " (address in use or not valid?)");
  }
  if (!config.metrics_listen.empty()) {
    Server* raw = s.get();
    MetricsHttpOptions http_options;
    http_options.max_connections = config.metrics_max_connections;
    http_options.request_timeout = config.metrics_request_timeout;
    http_options.idle_timeout = config.metrics_idle_timeout;
    MQA_ASSIGN_OR_RETURN(
        s->metrics_server_,
        MetricsHttpServer::Start(
            config.metrics_listen,
            [raw] { return raw->metrics_->Render(raw->engine_->stats(), raw->service_->draining()); }, http_options));
    s->metrics_port_ = s->metrics_server_->port();
  }
  SetServing(s->server_.get(), true);
  std::string models;
  for (const auto& m : s->engine_->ListModels()) {
    std::string on;
    for (const std::string& d : m.devices) on += (on.empty() ? "" : "+") + d;
    models += (models.empty() ? "" : ",") + m.name + "@" + on;
  }
  LogInfo("server_started", {{"listen", config.listen},
                             {"port", s->port_},
                             {"models", models},
                             {"health_listen", config.health_listen},
                             {"health_port", s->health_port_},
                             {"metrics_listen", config.metrics_listen},
                             {"metrics_port", s->metrics_port_},
                             {"max_sessions", config.engine.max_sessions},
                             {"max_message_bytes", config.max_message_bytes}});
  return s;
}

Server::~Server() {
  // First, since a scrape reads the engine and the service.
  if (metrics_server_) metrics_server_->Stop();
  if (server_) {
    server_->Shutdown(std::chrono::system_clock::now());
    server_->Wait();
  }
}

void Server::Drain(std::chrono::milliseconds budget) {
  const auto start = core::Clock::now();
  const auto end = start + budget;
  SetServing(server_.get(), false);
  service_->StartDraining();
  LogInfo("drain_started", {{"budget_ms", budget.count()}, {"sessions", engine_->stats().sessions_open}});
  auto next_report = start + std::chrono::seconds(1);
  for (;;) {
    core::EngineStats st = engine_->stats();
    if (st.sessions_open == 0 && st.queue_depth == 0 && st.running == 0) break;
    auto now = core::Clock::now();
    if (now >= end) {
      LogWarn("drain_budget_spent", {{"sessions_left", st.sessions_open}, {"queued", st.queue_depth}});
      break;
    }
    if (now >= next_report) {
      LogInfo("draining", {{"sessions", st.sessions_open}, {"queued", st.queue_depth}, {"running", st.running}});
      next_report = now + std::chrono::seconds(1);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  // Idle streams may stay open on the client side; give them a moment to end, then cancel them.
  auto left = std::max(end - core::Clock::now(), core::Clock::duration::zero());
  auto grace = std::min<core::Clock::duration>(left, std::chrono::seconds(2));
  server_->Shutdown(std::chrono::system_clock::now() +
                    std::chrono::duration_cast<std::chrono::system_clock::duration>(grace));
  // Anything still queued ends now, answered UNAVAILABLE by the engine's shutdown. The scrape endpoint goes
  // last so that the whole drain is visible as mqa_draining 1.
  if (metrics_server_) metrics_server_->Stop();
  LogInfo("drain_done",
          {{"elapsed_ms", std::chrono::duration_cast<std::chrono::milliseconds>(core::Clock::now() - start).count()}});
}

void Server::Wait() { server_->Wait(); }

}  // namespace mqa::server
