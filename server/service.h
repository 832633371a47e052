// MqaServiceImpl: the mqa.v1.MqaService over core's Engine, on gRPC's callback API.
//
// gRPC threads only validate, convert and enqueue: every computation runs on the engine's device workers, whose
// completions finish the calls. Thread-safety: all methods are called by gRPC from any thread.
//
// Every method is registered raw (grpc::ByteBuffer in and out) and parses its own messages: gRPC's generated
// handlers answer a request that does not parse with UNIMPLEMENTED, and a streamed one as if the client had
// half-closed (the stream then ends OK and later steps vanish). Parsing here lets a bad message be
// INVALID_ARGUMENT, and lets a stream end with that status after answering the steps before it.
#ifndef MQA_SERVER_SERVICE_H_
#define MQA_SERVER_SERVICE_H_

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <cstddef>

#include "mqa/core/engine.h"
#include "mqa/v1/mqa_service.grpc.pb.h"
#include "server/metrics.h"

namespace mqa::server {

// The base whose methods all take and give raw bytes (see above).
using RawMqaService = v1::MqaService::WithRawCallbackMethod_ListModels<v1::MqaService::WithRawCallbackMethod_GetModel<
    v1::MqaService::WithRawCallbackMethod_Forward<v1::MqaService::WithRawCallbackMethod_CreateSession<
        v1::MqaService::WithRawCallbackMethod_GetSession<v1::MqaService::WithRawCallbackMethod_CloseSession<
            v1::MqaService::WithRawCallbackMethod_Step<v1::MqaService::WithRawCallbackMethod_StreamSteps<
                v1::MqaService::WithRawCallbackMethod_StepBatch<v1::MqaService::Service>>>>>>>>>;

struct ServiceOptions {
  // A stream stops reading requests (HTTP/2 flow control pushes back on the client) while it holds this many
  // steps not yet answered or answers not yet taken by the client, or this many bytes of them (an answer is
  // counted at its input's size until it exists). It never drops or fails steps for it: a client that does not
  // read its answers only stops its own stream.
  size_t max_pending_steps_per_stream = 1024;
  size_t max_pending_bytes_per_stream = size_t{32} << 20;
  // When set (it must outlive the service): every failed unary RPC and streamed step is counted by code, and
  // every completed step's queue + compute time is observed.
  ServiceMetrics* metrics = nullptr;
};

class MqaServiceImpl final : public RawMqaService {
 public:
  // engine must outlive the service (and the grpc::Server it is registered with).
  MqaServiceImpl(core::Engine* engine, ServiceOptions options);

  // Draining: CreateSession answers UNAVAILABLE from now on; everything else keeps working.
  void StartDraining();
  bool draining() const { return draining_.load(); }
  // Streams currently open (for the drain logic and logs).
  size_t open_streams() const { return open_streams_.load(); }

  grpc::ServerUnaryReactor* ListModels(grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* req,
                                       grpc::ByteBuffer* resp) override;
  grpc::ServerUnaryReactor* GetModel(grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* req,
                                     grpc::ByteBuffer* resp) override;
  grpc::ServerUnaryReactor* Forward(grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* req,
                                    grpc::ByteBuffer* resp) override;
  grpc::ServerUnaryReactor* CreateSession(grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* req,
                                          grpc::ByteBuffer* resp) override;
  grpc::ServerUnaryReactor* GetSession(grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* req,
                                       grpc::ByteBuffer* resp) override;
  grpc::ServerUnaryReactor* CloseSession(grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* req,
                                         grpc::ByteBuffer* resp) override;
  grpc::ServerUnaryReactor* Step(grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* req,
                                 grpc::ByteBuffer* resp) override;
  grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* StreamSteps(grpc::CallbackServerContext* ctx) override;
  // step_batch.cc
  grpc::ServerUnaryReactor* StepBatch(grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* req,
                                      grpc::ByteBuffer* resp) override;

 private:
  class StepStreamReactor;

  core::Engine* const engine_;
  const ServiceOptions options_;
  std::atomic<bool> draining_{false};
  std::atomic<size_t> open_streams_{0};
};

}  // namespace mqa::server

#endif  // MQA_SERVER_SERVICE_H_
