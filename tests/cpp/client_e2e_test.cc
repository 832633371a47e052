// The C++ client library against a real mqa-server process on 127.0.0.1 (MQA_SERVER_BIN). A separate process
// because mqa_client carries its own copy of the generated schema, which must not meet the server's in one
// program. Checks the library's contract: RAII sessions, unary and streamed steps agreeing with a stateless
// Forward of the same layer, errors as Status, deadlines, and retry of idempotent calls.
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <future>
#include <random>
#include <thread>

#include "client_e2e_util.h"
#include "mqa/client/client.h"

namespace mqa::client {
namespace {

using namespace e2e;  // NOLINT: the shared helpers of this test program

class ClientE2E : public ::testing::Test {
 protected:
  ServerProcess server_;
};

TEST_F(ClientE2E, SessionStepsAndAStreamAgreeWithOneForwardOfTheLayer) {
  auto client = ConnectTo(server_.target());
  ASSERT_EQ(client->Health().value(), HealthStatus::kServing);
  auto models = client->ListModels().value();
  ASSERT_EQ(models.size(), 2u);
  EXPECT_EQ(models[1].name, "small");

  const int64_t total = 7;
  HostTensor all = RandomX(total, 64, 42);
  std::vector<float> all_v = Floats(all);
  auto rows = [&](int64_t from, int64_t to) {
    return HostTensor::FromFloats({1, to - from, 64},
                                  std::vector<float>(all_v.begin() + from * 64, all_v.begin() + to * 64))
        .value();
  };
  ForwardInput f;
  f.model = "small";
  f.layer = 1;
  f.x = all;
  std::vector<float> want = Floats(client->Forward(f).value().out);

  // Unary steps: a prefill chunk, then single tokens.
  auto session = client->CreateSession(ModelSession("small")).value();
  std::vector<float> unary;
  auto r = session.Step(1, rows(0, 3)).value();
  unary = Floats(r.out);
  for (int64_t t = 3; t < total; ++t) {
    auto rt = session.Step(1, rows(t, t + 1), t).value();
    EXPECT_EQ(rt.position, t);
    auto v = Floats(rt.out);
    unary.insert(unary.end(), v.begin(), v.end());
  }
  EXPECT_LT(RelErr(unary, want), 1e-5);

  // The same tokens through 8 sessions multiplexed on one stream, all submitted before any answer is read.
  std::vector<Session> sessions;
  for (int i = 0; i < 8; ++i) sessions.push_back(client->CreateSession(ModelSession("small")).value());
  auto stream = client->OpenStream().value();
  std::vector<std::vector<std::future<StatusOr<StepOutput>>>> answers(sessions.size());
  for (int64_t t = 0; t < total; ++t) {
    for (size_t i = 0; i < sessions.size(); ++i) {
      StepRequest req;
      req.session_id = sessions[i].id();
      req.layer = 1;
      req.x = rows(t, t + 1);
      req.position = t;
      answers[i].push_back(stream->Submit(std::move(req)));
    }
  }
  ASSERT_TRUE(stream->Finish().ok());
  for (size_t i = 0; i < sessions.size(); ++i) {
    std::vector<float> got;
    for (auto& a : answers[i]) {
      auto out = a.get();
      ASSERT_TRUE(out.ok()) << out.status().ToString();
      auto v = Floats(out->out);
      got.insert(got.end(), v.begin(), v.end());
    }
    EXPECT_LT(RelErr(got, want), 1e-5) << "session " << i;
  }
}

TEST_F(ClientE2E, SessionDestructorClosesItOnTheServer) {
  auto client = ConnectTo(server_.target());
  std::string id;
  {
    auto session = client->CreateSession(ModelSession("small")).value();
    id = session.id();
    ASSERT_TRUE(client->GetSession(id).ok());
  }
  auto gone = client->GetSession(id);
  EXPECT_EQ(gone.status().code(), StatusCode::kNotFound);
  EXPECT_NE(gone.status().message().find("was closed"), std::string::npos) << gone.status().ToString();
}

TEST_F(ClientE2E, ErrorsArriveAsStatusAndOneBadStepLeavesTheStreamAlone) {
  auto client = ConnectTo(server_.target());
  auto session = client->CreateSession(ModelSession("small")).value();
  EXPECT_EQ(session.Step(0, RandomX(1, 64, 1), 5).status().code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(session.Step(0, RandomX(1, 32, 1)).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(client->CreateSession(ModelSession("nope")).status().code(), StatusCode::kNotFound);
  SessionOptions too_long = ModelSession("small");
  too_long.max_tokens = 2;
  auto short_session = client->CreateSession(too_long).value();
  EXPECT_EQ(short_session.Step(0, RandomX(3, 64, 1)).status().code(), StatusCode::kOutOfRange);

  auto stream = client->OpenStream().value();
  StepRequest bad;
  bad.session_id = std::string(32, 'a');
  bad.x = RandomX(1, 64, 2);
  StepRequest good;
  good.session_id = session.id();
  good.x = RandomX(1, 64, 3);
  auto bad_f = stream->Submit(std::move(bad));
  auto good_f = stream->Submit(std::move(good));
  EXPECT_EQ(bad_f.get().status().code(), StatusCode::kNotFound);
  EXPECT_TRUE(good_f.get().ok());
  EXPECT_TRUE(stream->Finish().ok());
}

// Routing keys (docs/affinity.md): random unless given, checked before anything is sent, and a session may be
// submitted on a stream only with the stream's key.
TEST_F(ClientE2E, RoutingKeysAreCheckedAndSessionsOnAStreamShareItsKey) {
  auto client = ConnectTo(server_.target());
  const std::string key = NewRoutingKey();
  ASSERT_EQ(key.size(), 32u);
  EXPECT_EQ(key.find_first_not_of("0123456789abcdef"), std::string::npos) << key;
  EXPECT_NE(NewRoutingKey(), key);

  SessionOptions bad_key;
  bad_key.model = "small";
  bad_key.routing_key = "has space";
  EXPECT_EQ(client->CreateSession(bad_key).status().code(), StatusCode::kInvalidArgument);
  StreamOptions bad_stream;
  bad_stream.routing_key = std::string(129, 'k');
  EXPECT_EQ(client->OpenStream(bad_stream).status().code(), StatusCode::kInvalidArgument);

  StreamOptions stream_options;
  stream_options.routing_key = key;
  auto stream = client->OpenStream(stream_options).value();
  EXPECT_EQ(stream->routing_key(), key);
  SessionOptions options;
  options.model = "small";
  options.routing_key = stream->routing_key();
  auto on_stream = client->CreateSession(options).value();
  EXPECT_EQ(on_stream.routing_key(), key);
  options.routing_key.clear();
  auto elsewhere = client->CreateSession(options).value();
  EXPECT_EQ(elsewhere.routing_key().size(), 32u);
  EXPECT_NE(elsewhere.routing_key(), key);

  StepRequest step;
  step.x = RandomX(1, 64, 4);
  auto mismatch = stream->Submit(elsewhere, step).get();
  EXPECT_EQ(mismatch.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(mismatch.status().message().find("routing key"), std::string::npos) << mismatch.status().ToString();
  EXPECT_EQ(stream->pending(), 0u);
  auto done = stream->Submit(on_stream, step).get();
  ASSERT_TRUE(done.ok()) << done.status().ToString();
  EXPECT_EQ(done->session_id, on_stream.id());
  EXPECT_TRUE(stream->Finish().ok());
  EXPECT_EQ(on_stream.Info().value().layer_positions[0], 1);
  EXPECT_EQ(client->GetSession(elsewhere.id(), std::nullopt, elsewhere.routing_key()).value().layer_positions[0], 0);
}

TEST_F(ClientE2E, ADeadlinePassedInTheQueueIsDeadlineExceededAndNothingIsComputed) {
  auto client = ConnectTo(server_.target());
  auto busy = client->CreateSession(ModelSession("slow")).value();
  auto victim = client->CreateSession(ModelSession("slow")).value();
  auto stream = client->OpenStream().value();
  StepRequest late;
  late.session_id = victim.id();
  late.x = RandomX(32, 512, 6);  // not a decode step, which would overtake LongStep's chunks (decode first)
  late.timeout = milliseconds(1);
  auto long_f = stream->Submit(LongStep(busy, 5));
  auto late_f = stream->Submit(std::move(late));
  EXPECT_TRUE(long_f.get().ok());
  EXPECT_EQ(late_f.get().status().code(), StatusCode::kDeadlineExceeded);
  EXPECT_TRUE(stream->Finish().ok());
  EXPECT_EQ(victim.Info().value().layer_positions[0], 0);
}

// Attempts cut short by step_attempt_timeout while the worker is busy: the step is sent again until one attempt
// is answered (possibly with the kept answer of an attempt that ran after its client gave up), and it is
// applied exactly once.
TEST_F(ClientE2E, AStepWithAPositionIsRetriedAndAppliedOnce) {
  auto client = ConnectRetryingSteps(server_.target());
  auto busy = client->CreateSession(ModelSession("slow")).value();
  auto victim = client->CreateSession(ModelSession("slow")).value();
  auto stream = client->OpenStream().value();
  auto long_f = stream->Submit(LongStep(busy, 7));
  const HostTensor x = RandomX(3, 512, 8);
  auto r = victim.Step(0, x, /*position=*/0, milliseconds(60000));
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->position, 0);
  EXPECT_EQ(r->num_tokens, 3);
  EXPECT_TRUE(long_f.get().ok());
  EXPECT_TRUE(stream->Finish().ok());
  EXPECT_EQ(victim.Info().value().layer_positions[0], 3);  // once, however many attempts there were
  ForwardInput in;
  in.model = "slow";
  in.x = x;
  auto want = client->Forward(in).value();
  EXPECT_LT(RelErr(Floats(r->out), Floats(want.out)), 1e-5);
}

// A free port now; the server takes it a moment after the client starts calling.
int FreePort() {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  socklen_t len = sizeof(addr);
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  ::close(fd);
  return ntohs(addr.sin_port);
}

TEST(ClientRetry, IdempotentCallsAreRetriedUntilTheServerComes) {
  const int port = FreePort();
  ClientOptions o;
  o.target = "127.0.0.1:" + std::to_string(port);
  o.max_retries = 40;
  o.retry_backoff = milliseconds(100);
  auto client = Client::Connect(o).value();
  auto models = std::async(std::launch::async, [&] { return client->ListModels(milliseconds(60000)); });
  std::this_thread::sleep_for(milliseconds(300));
  ServerProcess late(port);  // starts while the client is retrying
  auto result = models.get();
  ASSERT_TRUE(result.ok()) << result.status().ToString();
  EXPECT_EQ(result->size(), 2u);

  ClientOptions none;
  none.target = "127.0.0.1:" + std::to_string(FreePort());
  none.max_retries = 1;
  none.retry_backoff = milliseconds(10);
  EXPECT_EQ(Client::Connect(none).value()->ListModels(milliseconds(2000)).status().code(), StatusCode::kUnavailable);
}

}  // namespace
}  // namespace mqa::client
