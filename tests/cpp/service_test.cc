// The gRPC service end to end: a real server on 127.0.0.1 (ephemeral port) and real gRPC clients (the generated
// stubs, so malformed requests the client library would refuse can be sent too). Numbers through the service are
// compared with the same layers run in-process.
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <atomic>
#include <future>
#include <map>
#include <thread>

#include "mqa/core/engine.h"
#include "mqa/v1/mqa_service.grpc.pb.h"
#include "server/server.h"
#include "server/wire.h"
#include "test_util.h"

namespace mqa::server {
namespace {

using ::mqa::testing::Floats;
using ::mqa::testing::Randn;
using ::mqa::testing::RelativeError;
using ::mqa::testing::Unwrap;

core::ModelConfig Model(const std::string& name, int layers, int64_t dim, int64_t heads, int64_t max_tokens) {
  core::ModelConfig m;
  m.name = name;
  m.num_layers = layers;
  m.options.dim = dim;
  m.options.heads = heads;
  m.options.seed = 11;
  m.max_tokens_per_session = max_tokens;
  return m;
}

ServerConfig TestConfig() {
  ServerConfig c;
  c.listen = "127.0.0.1:0";
  c.metrics_listen = "127.0.0.1:0";  // never the shared default port: test servers run side by side
  c.max_message_bytes = 8u << 20;
  c.engine.models = {Model("small", 2, 64, 4, 64), Model("slow", 1, 512, 8, 4096)};
  c.engine.max_sessions = 64;
  c.engine.reap_interval = std::chrono::milliseconds(10);
  c.default_model = false;
  return c;
}

class ServiceTest : public ::testing::Test {
 protected:
  void SetUp() override { StartServer(TestConfig()); }
  void TearDown() override { server_.reset(); }

  void StartServer(const ServerConfig& config) {
    server_ = Unwrap(Server::Start(config), "Server::Start");
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(-1);  // long prefills answer with more than gRPC's default 4 MiB
    args.SetMaxSendMessageSize(-1);     // so that the server's own limit is what refuses large requests
    channel_ = grpc::CreateCustomChannel("127.0.0.1:" + std::to_string(server_->port()),
                                         grpc::InsecureChannelCredentials(), args);
    stub_ = v1::MqaService::NewStub(channel_);
  }

  static void SetDeadline(grpc::ClientContext* ctx, int ms = 30000) {
    ctx->set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(ms));
  }

  v1::Session CreateSession(const std::string& model, int64_t max_tokens = 0) {
    grpc::ClientContext ctx;
    SetDeadline(&ctx);
    v1::CreateSessionRequest req;
    req.set_model(model);
    req.set_max_tokens(max_tokens);
    v1::CreateSessionResponse resp;
    grpc::Status st = stub_->CreateSession(&ctx, req, &resp);
    EXPECT_TRUE(st.ok()) << st.error_message();
    return resp.session();
  }

  grpc::Status Step(const std::string& id, int layer, const core::Tensor& x, v1::StepResponse* resp,
                    int deadline_ms = 30000, std::optional<int64_t> position = std::nullopt) {
    grpc::ClientContext ctx;
    SetDeadline(&ctx, deadline_ms);
    v1::StepRequest req;
    req.mutable_step()->set_session_id(id);
    req.mutable_step()->set_layer(layer);
    if (position) req.mutable_step()->set_position(*position);
    EXPECT_TRUE(ToWire(x, req.mutable_step()->mutable_x()).ok());
    return stub_->Step(&ctx, req, resp);
  }

  v1::Session GetSession(const std::string& id, grpc::Status* status = nullptr) {
    grpc::ClientContext ctx;
    SetDeadline(&ctx);
    v1::GetSessionRequest req;
    req.set_session_id(id);
    v1::GetSessionResponse resp;
    grpc::Status st = stub_->GetSession(&ctx, req, &resp);
    if (status) *status = st;
    return resp.session();
  }

  static std::vector<float> OutOf(const v1::Tensor& t) { return Floats(Unwrap(FromWire(t, "out"), "FromWire")); }

  std::unique_ptr<Server> server_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::MqaService::Stub> stub_;
};

// The same weights the server built for model "small" (seed 11, layer i = seed + i).
std::unique_ptr<core::MqaStack> SmallStack() {
  return Unwrap(core::MqaStack::Create(Model("small", 2, 64, 4, 64).options, 2), "MqaStack::Create");
}

TEST_F(ServiceTest, ListsAndDescribesModels) {
  grpc::ClientContext ctx;
  v1::ListModelsResponse list;
  ASSERT_TRUE(stub_->ListModels(&ctx, v1::ListModelsRequest(), &list).ok());
  ASSERT_EQ(list.models_size(), 2);
  EXPECT_EQ(list.models(0).name(), "slow");
  const v1::ModelInfo& small = list.models(1);
  EXPECT_EQ(small.num_layers(), 2);
  ASSERT_EQ(small.layers_size(), 2);
  EXPECT_EQ(small.layers(1).dim(), 64);
  EXPECT_EQ(small.layers(1).head_dim(), 16);
  EXPECT_EQ(small.layers(1).dtype(), v1::DATA_TYPE_FLOAT32);
  EXPECT_EQ(small.layers(1).norm_type(), "low_precision_layernorm");
  EXPECT_EQ(small.layers(1).device(), "cpu");
  ASSERT_EQ(small.devices_size(), 1);
  EXPECT_EQ(small.devices(0), "cpu");

  grpc::ClientContext ctx2;
  v1::GetModelRequest req;
  req.set_name("big");
  v1::GetModelResponse resp;
  grpc::Status st = stub_->GetModel(&ctx2, req, &resp);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_NE(st.error_message().find("hosted: slow, small"), std::string::npos) << st.error_message();
}

TEST_F(ServiceTest, ForwardMatchesTheInProcessLayerIncludingTheCache) {
  auto stack = SmallStack();
  core::Tensor x = Randn(core::DType::kFloat32, {2, 5, 64});
  core::Tensor pk = Randn(core::DType::kFloat32, {2, 1, 16, 3});
  core::Tensor pv = Randn(core::DType::kFloat32, {2, 1, 3, 16});
  std::vector<uint8_t> mask_bytes(2 * 8, 1);
  mask_bytes[1] = 0;  // batch 0 ignores key 1
  core::Tensor mask = Unwrap(core::Tensor::FromBytes(core::DType::kBool, {2, 8}, mask_bytes.data(), 16));

  v1::ForwardRequest req;
  req.set_model("small");
  req.set_layer(1);
  ASSERT_TRUE(ToWire(x, req.mutable_x()).ok());
  ASSERT_TRUE(ToWire(pk, req.mutable_past_key_value()->mutable_key()).ok());
  ASSERT_TRUE(ToWire(pv, req.mutable_past_key_value()->mutable_value()).ok());
  ASSERT_TRUE(ToWire(mask, req.mutable_mask()).ok());
  req.mutable_mask()->set_dtype(v1::DATA_TYPE_UINT8);  // uint8 masks are accepted as bool
  req.set_return_cache(true);
  req.set_needs_weights(true);
  grpc::ClientContext ctx;
  v1::ForwardResponse resp;
  grpc::Status st = stub_->Forward(&ctx, req, &resp);
  ASSERT_TRUE(st.ok()) << st.error_message();

  core::ForwardArgs args;
  args.x = x;
  args.past_key_value = core::KvCache{pk, pv};
  args.mask = mask;
  args.needs_weights = true;
  auto want = Unwrap(stack->layer(1).Forward(args));
  EXPECT_LT(RelativeError(OutOf(resp.out()), Floats(want.out)), 1e-6);
  EXPECT_LT(RelativeError(OutOf(resp.weights()), Floats(want.weights)), 1e-6);
  EXPECT_EQ(OutOf(resp.cache().key()), Floats(want.cache->k));
  EXPECT_EQ(OutOf(resp.cache().value()), Floats(want.cache->v));
  EXPECT_EQ(resp.cache().key().shape(3), 8);
}

TEST_F(ServiceTest, SessionLifeCycleAndIncrementalDecodeEqualsOneFullPass) {
  v1::Session s = CreateSession("small");
  ASSERT_EQ(s.session_id().size(), 32u);
  EXPECT_EQ(s.layer_positions_size(), 2);
  EXPECT_EQ(s.max_tokens(), 64);
  EXPECT_EQ(s.device(), "cpu");
  core::Tensor all = Randn(core::DType::kFloat32, {1, 9, 64});
  auto all_v = Floats(all);
  std::vector<float> got;
  auto chunk = [&](int64_t from, int64_t to) {
    std::vector<float> v(all_v.begin() + from * 64, all_v.begin() + to * 64);
    return Unwrap(core::Tensor::FromFloats(core::DType::kFloat32, {1, to - from, 64}, v));
  };
  v1::StepResponse resp;
  ASSERT_TRUE(Step(s.session_id(), 0, chunk(0, 4), &resp).ok());
  EXPECT_EQ(resp.result().position(), 0);
  EXPECT_EQ(resp.result().num_tokens(), 4);
  got = OutOf(resp.result().out());
  for (int64_t t = 4; t < 9; ++t) {
    grpc::Status st = Step(s.session_id(), 0, chunk(t, t + 1), &resp, 30000, t);
    ASSERT_TRUE(st.ok()) << st.error_message();
    EXPECT_EQ(resp.result().position(), t);
    auto v = OutOf(resp.result().out());
    got.insert(got.end(), v.begin(), v.end());
  }
  core::ForwardArgs args;
  args.x = all;
  auto want = Unwrap(SmallStack()->layer(0).Forward(args));
  EXPECT_LT(RelativeError(got, Floats(want.out)), 1e-5);

  v1::Session now = GetSession(s.session_id());
  EXPECT_EQ(now.layer_positions(0), 9);
  EXPECT_EQ(now.layer_positions(1), 0);
  EXPECT_EQ(now.cache_bytes(), 1 * 2 * 2 * 16 * 16 * 4);  // one block of 16 tokens, 2 layers, k and v, d 16, fp32
  EXPECT_EQ(now.device(), "cpu");

  grpc::ClientContext ctx;
  v1::CloseSessionRequest close;
  close.set_session_id(s.session_id());
  v1::CloseSessionResponse closed;
  ASSERT_TRUE(stub_->CloseSession(&ctx, close, &closed).ok());
  grpc::Status st;
  GetSession(s.session_id(), &st);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_NE(st.error_message().find("was closed"), std::string::npos);
  EXPECT_EQ(server_->engine().stats().sessions_open, 0u);
}

// Every status code of the contract, provoked through the wire.
TEST_F(ServiceTest, InvalidArgumentForBadTensors) {
  v1::Session s = CreateSession("small");
  v1::StepRequest req;
  req.mutable_step()->set_session_id(s.session_id());
  auto call = [&](const std::string& want) {
    grpc::ClientContext ctx;
    v1::StepResponse resp;
    grpc::Status st = stub_->Step(&ctx, req, &resp);
    EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_NE(st.error_message().find(want), std::string::npos) << st.error_message();
  };
  call("x: required");
  v1::Tensor* x = req.mutable_step()->mutable_x();
  x->add_shape(1);
  x->add_shape(2);
  x->add_shape(64);
  x->set_data(std::string(100, '\0'));
  call("x: dtype must be set");
  x->set_dtype(v1::DATA_TYPE_FLOAT32);
  call("x: float32 [1, 2, 64] needs 512 bytes (128 elements x 4), got 100");
  x->set_shape(2, 32);
  x->set_data(std::string(256, '\0'));
  call("x: expected a floating tensor [1, s, 64]");
  x->set_dtype(v1::DATA_TYPE_BOOL);
  x->set_data(std::string(64, '\2'));
  call("bool");
  x->set_dtype(v1::DATA_TYPE_FLOAT32);
  x->set_shape(0, -1);
  call("sizes must be >= 0");
  x->set_shape(0, 1);
  x->set_shape(2, 64);
  x->set_data(std::string(512, '\0'));
  req.mutable_step()->set_layer(7);
  call("layer 7 is out of range: model small has layers 0..1");
}

TEST_F(ServiceTest, NotFoundFailedPreconditionAndOutOfRange) {
  v1::StepResponse resp;
  core::Tensor one = Randn(core::DType::kFloat32, {1, 1, 64});
  grpc::Status st = Step("0123456789abcdef0123456789abcdef", 0, one, &resp);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::NOT_FOUND);
  {
    grpc::ClientContext ctx;
    v1::CreateSessionRequest req;
    req.set_model("missing");
    v1::CreateSessionResponse r;
    EXPECT_EQ(stub_->CreateSession(&ctx, req, &r).error_code(), grpc::StatusCode::NOT_FOUND);
  }
  v1::Session s = CreateSession("small", 3);
  ASSERT_TRUE(Step(s.session_id(), 1, Randn(core::DType::kFloat32, {1, 2, 64}), &resp).ok());
  st = Step(s.session_id(), 1, one, &resp, 30000, /*position=*/5);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_NE(st.error_message().find("holds 2 tokens, but the step says it starts at 5"), std::string::npos);
  st = Step(s.session_id(), 1, Randn(core::DType::kFloat32, {1, 2, 64}), &resp);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::OUT_OF_RANGE);
  EXPECT_NE(st.error_message().find("max_tokens of 3"), std::string::npos) << st.error_message();
  EXPECT_EQ(GetSession(s.session_id()).layer_positions(1), 2);
}

TEST_F(ServiceTest, ResourceExhaustedForSessionsAndMessageSize) {
  std::vector<v1::Session> sessions;
  for (int i = 0; i < 64; ++i) sessions.push_back(CreateSession("small"));
  grpc::ClientContext ctx;
  v1::CreateSessionRequest req;
  req.set_model("small");
  v1::CreateSessionResponse resp;
  grpc::Status st = stub_->CreateSession(&ctx, req, &resp);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_NE(st.error_message().find("maximum of 64 sessions"), std::string::npos);

  // 9 MiB of x against an 8 MiB limit: refused by gRPC before it reaches the service.
  v1::StepResponse sr;
  st = Step(sessions[0].session_id(), 0, Randn(core::DType::kFloat32, {1, 36864, 64}), &sr);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_EQ(GetSession(sessions[0].session_id()).layer_positions(0), 0);
}

TEST_F(ServiceTest, AdmissionIsMappedBothWaysAndUnknownValuesAreInvalid) {
  v1::Session best = CreateSession("small");
  EXPECT_EQ(best.admission(), v1::ADMISSION_BEST_EFFORT);
  EXPECT_EQ(best.cache_bytes(), 0);
  for (v1::Admission a : {v1::ADMISSION_BEST_EFFORT, v1::ADMISSION_GUARANTEED}) {
    grpc::ClientContext ctx;
    v1::CreateSessionRequest req;
    req.set_model("small");
    req.set_admission(a);
    v1::CreateSessionResponse resp;
    ASSERT_TRUE(stub_->CreateSession(&ctx, req, &resp).ok());
    EXPECT_EQ(resp.session().admission(), a);
    EXPECT_EQ(GetSession(resp.session().session_id()).admission(), a);
    // 64 tokens of 2 layers, k and v, head_dim 16, fp32: reserved up front only when guaranteed.
    EXPECT_EQ(resp.session().cache_bytes(), a == v1::ADMISSION_GUARANTEED ? 64 * 2 * 2 * 16 * 4 : 0);
  }
  grpc::ClientContext ctx;
  v1::CreateSessionRequest req;
  req.set_model("small");
  req.set_admission(static_cast<v1::Admission>(7));
  v1::CreateSessionResponse resp;
  grpc::Status st = stub_->CreateSession(&ctx, req, &resp);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(st.error_message().find("admission: expected ADMISSION_BEST_EFFORT or ADMISSION_GUARANTEED, got 7"),
            std::string::npos)
      << st.error_message();
}

// A KV cache of 5 usable blocks of 16 tokens (block 0 is reserved padding) for model "small" alone.
TEST_F(ServiceTest, FullKvCacheRefusesGuaranteedSessionsAndBestEffortStepsWithoutChangingThem) {
  ServerConfig config = TestConfig();
  config.engine.models = {Model("small", 2, 64, 4, 64)};
  constexpr int64_t kBlockBytes = 2 * 2 * 16 * 16 * 4;  // layers * (k, v) * block_size * head_dim * fp32
  config.engine.kv_cache.block_size = 16;
  config.engine.kv_cache.budget_bytes = 6 * kBlockBytes;
  server_.reset();
  StartServer(config);

  auto create = [&](v1::Admission admission, v1::Session* session) {
    grpc::ClientContext ctx;
    SetDeadline(&ctx);
    v1::CreateSessionRequest req;
    req.set_model("small");
    req.set_admission(admission);
    v1::CreateSessionResponse resp;
    grpc::Status st = stub_->CreateSession(&ctx, req, &resp);
    *session = resp.session();
    return st;
  };
  v1::Session guaranteed, refused, best;
  ASSERT_TRUE(create(v1::ADMISSION_GUARANTEED, &guaranteed).ok());  // 4 blocks
  EXPECT_EQ(guaranteed.cache_bytes(), 4 * kBlockBytes);
  grpc::Status st = create(v1::ADMISSION_GUARANTEED, &refused);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << st.error_message();
  ASSERT_TRUE(create(v1::ADMISSION_BEST_EFFORT, &best).ok());

  v1::StepResponse resp;
  ASSERT_TRUE(Step(best.session_id(), 0, Randn(core::DType::kFloat32, {1, 16, 64}), &resp).ok());  // the 5th block
  EXPECT_EQ(GetSession(best.session_id()).cache_bytes(), kBlockBytes);
  const core::Tensor one = Randn(core::DType::kFloat32, {1, 1, 64});
  st = Step(best.session_id(), 0, one, &resp);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << st.error_message();
  v1::Session after = GetSession(best.session_id());
  EXPECT_EQ(after.layer_positions(0), 16);
  EXPECT_EQ(after.cache_bytes(), kBlockBytes);
  // The guaranteed session never runs out: its blocks are its own.
  ASSERT_TRUE(Step(guaranteed.session_id(), 0, Randn(core::DType::kFloat32, {1, 64, 64}), &resp).ok());

  // Closing the guaranteed session frees its blocks; the refused step then succeeds as retried.
  {
    grpc::ClientContext ctx;
    SetDeadline(&ctx);
    v1::CloseSessionRequest close;
    close.set_session_id(guaranteed.session_id());
    v1::CloseSessionResponse closed;
    ASSERT_TRUE(stub_->CloseSession(&ctx, close, &closed).ok());
  }
  st = Step(best.session_id(), 0, one, &resp, 30000, /*position=*/16);
  ASSERT_TRUE(st.ok()) << st.error_message();
  EXPECT_EQ(resp.result().position(), 16);
  EXPECT_EQ(GetSession(best.session_id()).cache_bytes(), 2 * kBlockBytes);
}

// A long prefill of another session keeps the device busy while the step under test waits in the queue.
std::thread LongStep(v1::MqaService::Stub* stub, const std::string& session, std::atomic<bool>* ok) {
  return std::thread([stub, session, ok] {
    grpc::ClientContext ctx;
    v1::StepRequest req;
    req.mutable_step()->set_session_id(session);
    EXPECT_TRUE(ToWire(Randn(core::DType::kFloat32, {1, 3072, 512}), req.mutable_step()->mutable_x()).ok());
    v1::StepResponse resp;
    grpc::Status st = stub->Step(&ctx, req, &resp);
    EXPECT_TRUE(st.ok()) << st.error_message();
    ok->store(st.ok());
  });
}

TEST_F(ServiceTest, DeadlineAndCancellationDropTheStepUncomputed) {
  // The long step runs as one pass: between prefill chunks a queued step joins the next chunk's pass and runs,
  // so with chunks whether the victims wait past their deadline would be a race with the chunk's time.
  ServerConfig config = TestConfig();
  config.engine.batching.max_prefill_chunk = 4096;
  server_.reset();
  StartServer(config);
  v1::Session busy = CreateSession("slow");
  v1::Session victim = CreateSession("slow");
  std::atomic<bool> long_ok{false};
  std::thread long_step = LongStep(stub_.get(), busy.session_id(), &long_ok);
  // The long step must hold the device before the steps under test arrive.
  for (int i = 0; i < 3000 && server_->engine().stats().running == 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  ASSERT_EQ(server_->engine().stats().running, 1u);

  v1::StepResponse resp;
  grpc::Status st = Step(victim.session_id(), 0, Randn(core::DType::kFloat32, {1, 1, 512}), &resp, /*ms=*/20);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);

  grpc::ClientContext ctx;
  v1::StepRequest req;
  req.mutable_step()->set_session_id(victim.session_id());
  ASSERT_TRUE(ToWire(Randn(core::DType::kFloat32, {1, 1, 512}), req.mutable_step()->mutable_x()).ok());
  std::promise<grpc::Status> cancelled;
  stub_->async()->Step(&ctx, &req, &resp, [&](grpc::Status s) { cancelled.set_value(s); });
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  ctx.TryCancel();
  EXPECT_EQ(cancelled.get_future().get().error_code(), grpc::StatusCode::CANCELLED);

  long_step.join();
  EXPECT_TRUE(long_ok.load());
  ASSERT_TRUE(server_->engine().WaitIdle(core::Clock::now() + std::chrono::seconds(10)));
  EXPECT_EQ(GetSession(victim.session_id()).layer_positions(0), 0);  // neither step was computed
  core::EngineStats stats = server_->engine().stats();
  EXPECT_EQ(stats.dropped_cancelled + stats.dropped_deadline, 2u);
  EXPECT_EQ(stats.steps_completed, 1u);
}

TEST_F(ServiceTest, IdleSessionsAreReaped) {
  grpc::ClientContext ctx;
  v1::CreateSessionRequest req;
  req.set_model("small");
  req.mutable_idle_ttl()->set_nanos(100 * 1000 * 1000);
  v1::CreateSessionResponse resp;
  ASSERT_TRUE(stub_->CreateSession(&ctx, req, &resp).ok());
  EXPECT_EQ(resp.session().idle_ttl().nanos(), 100 * 1000 * 1000);
  std::this_thread::sleep_for(std::chrono::milliseconds(400));
  grpc::Status st;
  GetSession(resp.session().session_id(), &st);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_NE(st.error_message().find("expired after 100 ms idle"), std::string::npos) << st.error_message();
}

// Many sessions over one stream, answers matched by sequence; a bad step is answered in its own response
// (first, since it never waits for the device) and the stream goes on.
TEST_F(ServiceTest, OneStreamMultiplexesManySessionsWithOutOfOrderAnswers) {
  constexpr int kSessions = 40, kDecode = 4;
  std::vector<v1::Session> sessions;
  for (int i = 0; i < kSessions; ++i) sessions.push_back(CreateSession("small"));
  v1::Session slow = CreateSession("slow");

  grpc::ClientContext ctx;
  SetDeadline(&ctx, 60000);
  auto stream = stub_->StreamSteps(&ctx);
  std::map<uint64_t, std::pair<int, std::vector<float>>> sent;  // sequence -> (session index, x)
  uint64_t seq = 0;
  auto send = [&](const std::string& id, int layer, const core::Tensor& x) {
    v1::StreamStepsRequest req;
    req.mutable_step()->set_session_id(id);
    req.mutable_step()->set_layer(layer);
    req.mutable_step()->set_sequence(++seq);
    EXPECT_TRUE(ToWire(x, req.mutable_step()->mutable_x()).ok());
    EXPECT_TRUE(stream->Write(req));
    return seq;
  };
  const uint64_t long_seq = send(slow.session_id(), 0, Randn(core::DType::kFloat32, {1, 2048, 512}));
  const uint64_t bad_seq = send(sessions[0].session_id(), 9, Randn(core::DType::kFloat32, {1, 1, 64}));
  std::vector<std::vector<core::Tensor>> inputs(kSessions);
  for (int t = 0; t < kDecode; ++t) {
    for (int i = 0; i < kSessions; ++i) {
      core::Tensor x = Randn(core::DType::kFloat32, {1, t == 0 ? 3 : 1, 64});
      inputs[i].push_back(x);
      sent[send(sessions[i].session_id(), i % 2, x)] = {i, {}};
    }
  }
  stream->WritesDone();

  std::vector<uint64_t> order;
  std::map<uint64_t, v1::StreamStepsResponse> answers;
  v1::StreamStepsResponse resp;
  while (stream->Read(&resp)) {
    order.push_back(resp.result().sequence());
    answers[resp.result().sequence()] = resp;
  }
  grpc::Status st = stream->Finish();
  ASSERT_TRUE(st.ok()) << st.error_message();
  ASSERT_EQ(answers.size(), seq);
  EXPECT_EQ(order.front(), bad_seq);  // answered before the long step sent ahead of it
  EXPECT_EQ(answers[bad_seq].status().code(), static_cast<int>(grpc::StatusCode::INVALID_ARGUMENT));
  EXPECT_EQ(answers[long_seq].status().code(), 0);

  // Each session's outputs equal its own tokens run through the layer in one pass.
  auto stack = SmallStack();
  std::map<int, std::vector<float>> got;
  for (const auto& [s, a] : answers) {
    if (!sent.count(s)) continue;
    ASSERT_EQ(a.status().code(), 0) << a.status().message();
    auto v = OutOf(a.result().out());
    auto& g = got[sent[s].first];
    g.insert(g.end(), v.begin(), v.end());
  }
  for (int i = 0; i < kSessions; ++i) {
    std::vector<float> all;
    for (const auto& x : inputs[i]) {
      auto v = Floats(x);
      all.insert(all.end(), v.begin(), v.end());
    }
    core::ForwardArgs args;
    args.x = Unwrap(core::Tensor::FromFloats(core::DType::kFloat32, {1, 3 + kDecode - 1, 64}, all));
    auto want = Unwrap(stack->layer(i % 2).Forward(args));
    EXPECT_LT(RelativeError(got[i], Floats(want.out)), 1e-5) << "session " << i;
  }
}

TEST_F(ServiceTest, StreamedStepTimeoutIsDeadlineExceededInItsAnswer) {
  v1::Session busy = CreateSession("slow");
  v1::Session victim = CreateSession("small");
  grpc::ClientContext ctx;
  auto stream = stub_->StreamSteps(&ctx);
  v1::StreamStepsRequest req;
  req.mutable_step()->set_session_id(busy.session_id());
  req.mutable_step()->set_sequence(1);
  ASSERT_TRUE(ToWire(Randn(core::DType::kFloat32, {1, 2048, 512}), req.mutable_step()->mutable_x()).ok());
  ASSERT_TRUE(stream->Write(req));
  req.mutable_step()->set_session_id(victim.session_id());
  req.mutable_step()->set_sequence(2);
  req.mutable_step()->mutable_timeout()->set_nanos(1000000);  // 1 ms
  // 32 tokens: more than a decode step, which the scheduler would let overtake the long step (decode first).
  ASSERT_TRUE(ToWire(Randn(core::DType::kFloat32, {1, 32, 64}), req.mutable_step()->mutable_x()).ok());
  ASSERT_TRUE(stream->Write(req));
  stream->WritesDone();
  std::map<uint64_t, v1::StreamStepsResponse> answers;
  v1::StreamStepsResponse resp;
  while (stream->Read(&resp)) answers[resp.result().sequence()] = resp;
  ASSERT_TRUE(stream->Finish().ok());
  EXPECT_EQ(answers[1].status().code(), 0);
  EXPECT_EQ(answers[2].status().code(), static_cast<int>(grpc::StatusCode::DEADLINE_EXCEEDED));
  EXPECT_FALSE(answers[2].result().has_out());
  EXPECT_EQ(GetSession(victim.session_id()).layer_positions(0), 0);
}

TEST_F(ServiceTest, DrainRefusesNewSessionsLetsOpenOnesFinishThenStops) {
  v1::Session s = CreateSession("small");
  std::thread drain([this] { server_->Drain(std::chrono::seconds(20)); });
  for (int i = 0; i < 200; ++i) {
    grpc::ClientContext ctx;
    v1::CreateSessionRequest req;
    req.set_model("small");
    v1::CreateSessionResponse resp;
    grpc::Status st = stub_->CreateSession(&ctx, req, &resp);
    if (st.error_code() == grpc::StatusCode::UNAVAILABLE) {
      EXPECT_NE(st.error_message().find("draining"), std::string::npos);
      break;
    }
    ASSERT_TRUE(st.ok());  // raced ahead of the drain: fine, but it must close too
    grpc::ClientContext c2;
    v1::CloseSessionRequest close;
    close.set_session_id(resp.session().session_id());
    v1::CloseSessionResponse closed;
    ASSERT_TRUE(stub_->CloseSession(&c2, close, &closed).ok());
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  v1::StepResponse resp;
  EXPECT_TRUE(Step(s.session_id(), 0, Randn(core::DType::kFloat32, {1, 2, 64}), &resp).ok());  // still served
  auto start = std::chrono::steady_clock::now();
  grpc::ClientContext ctx;
  v1::CloseSessionRequest close;
  close.set_session_id(s.session_id());
  v1::CloseSessionResponse closed;
  ASSERT_TRUE(stub_->CloseSession(&ctx, close, &closed).ok());
  drain.join();  // returns once the last session closed, well inside its 20 s budget
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5));
}

}  // namespace
}  // namespace mqa::server
