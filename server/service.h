// MqaServiceImpl: the mqa.v1.MqaService over core's Engine, on gRPC's callback API.
//
// gRPC threads only validate, convert and enqueue: every computation runs on the engine's device workers, whose
// completions finish the calls. Thread-safety: all methods are called by gRPC from any thread.
#ifndef MQA_SERVER_SERVICE_H_
#define MQA_SERVER_SERVICE_H_

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <cstddef>

#include "mqa/core/engine.h"
#include "mqa/v1/mqa_service.grpc.pb.h"
#include "server/metrics.h"

namespace mqa::server {

struct ServiceOptions {
  size_t max_steps_in_flight_per_stream = 1024;  // a stream stops reading (flow control) past this
  // When set (it must outlive the service): every failed unary RPC and streamed step is counted by code, and
  // every completed step's queue + compute time is observed.
  ServiceMetrics* metrics = nullptr;
};

class MqaServiceImpl final : public v1::MqaService::CallbackService {
 public:
  // engine must outlive the service (and the grpc::Server it is registered with).
  MqaServiceImpl(core::Engine* engine, ServiceOptions options);

  // Draining: CreateSession answers UNAVAILABLE from now on; everything else keeps working.
  void StartDraining();
  bool draining() const { return draining_.load(); }
  // Streams currently open (for the drain logic and logs).
  size_t open_streams() const { return open_streams_.load(); }

  grpc::ServerUnaryReactor* ListModels(grpc::CallbackServerContext* ctx, const v1::ListModelsRequest* req,
                                       v1::ListModelsResponse* resp) override;
  grpc::ServerUnaryReactor* GetModel(grpc::CallbackServerContext* ctx, const v1::GetModelRequest* req,
                                     v1::GetModelResponse* resp) override;
  grpc::ServerUnaryReactor* Forward(grpc::CallbackServerContext* ctx, const v1::ForwardRequest* req,
                                    v1::ForwardResponse* resp) override;
  grpc::ServerUnaryReactor* CreateSession(grpc::CallbackServerContext* ctx, const v1::CreateSessionRequest* req,
                                          v1::CreateSessionResponse* resp) override;
  grpc::ServerUnaryReactor* GetSession(grpc::CallbackServerContext* ctx, const v1::GetSessionRequest* req,
                                       v1::GetSessionResponse* resp) override;
  grpc::ServerUnaryReactor* CloseSession(grpc::CallbackServerContext* ctx, const v1::CloseSessionRequest* req,
                                         v1::CloseSessionResponse* resp) override;
  grpc::ServerUnaryReactor* Step(grpc::CallbackServerContext* ctx, const v1::StepRequest* req,
                                 v1::StepResponse* resp) override;
  grpc::ServerBidiReactor<v1::StreamStepsRequest, v1::StreamStepsResponse>* StreamSteps(
      grpc::CallbackServerContext* ctx) override;

 private:
  class StepStreamReactor;

  core::Engine* const engine_;
  const ServiceOptions options_;
  std::atomic<bool> draining_{false};
  std::atomic<size_t> open_streams_{0};
};

}  // namespace mqa::server

#endif  // MQA_SERVER_SERVICE_H_
