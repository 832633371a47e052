// Client::StepBatch and StepStream::SubmitBatch against a real mqa-server process: a batch's answers equal the
// single steps of the same sessions, per-session errors stay per session, a deadline or a cancellation in the
// queue applies nothing, and a repeated batch is answered from the kept answers.
#include <gtest/gtest.h>

#include <chrono>
#include <future>
#include <string>
#include <thread>
#include <vector>

#include "client_e2e_util.h"
#include "mqa/client/client.h"

namespace mqa::client {
namespace {

using namespace e2e;  // NOLINT: the shared helpers of this test program

// Rows of B [1, s, dim] tensors stacked into one [B, s, dim].
HostTensor Stack(const std::vector<HostTensor>& rows) {
  std::vector<float> all;
  for (const HostTensor& r : rows) {
    std::vector<float> v = Floats(r);
    all.insert(all.end(), v.begin(), v.end());
  }
  return HostTensor::FromFloats({static_cast<int64_t>(rows.size()), rows[0].shape[1], rows[0].shape[2]}, all).value();
}

std::vector<float> Row(const HostTensor& t, int64_t b) {
  std::vector<float> v = Floats(t);
  const int64_t n = t.shape[1] * t.shape[2];
  return std::vector<float>(v.begin() + b * n, v.begin() + (b + 1) * n);
}

class ClientStepBatch : public ::testing::Test {
 protected:
  ServerProcess server_;
};

TEST_F(ClientStepBatch, AnswersEqualSingleStepsOfTheSameSessions) {
  auto client = ConnectTo(server_.target());
  constexpr int kSessions = 5;
  std::vector<Session> batched, single;
  for (int i = 0; i < kSessions; ++i) {
    batched.push_back(client->CreateSession(ModelSession("small")).value());
    single.push_back(client->CreateSession(ModelSession("small")).value());
  }
  auto stream = client->OpenStream().value();
  for (int64_t t = 0; t < 4; ++t) {
    for (int32_t layer = 0; layer < 2; ++layer) {
      std::vector<HostTensor> rows;
      StepBatchInput batch;
      batch.layer = layer;
      for (int i = 0; i < kSessions; ++i) {
        rows.push_back(RandomX(1, 64, static_cast<uint64_t>(100 * t + 10 * layer + i)));
        batch.session_ids.push_back(batched[static_cast<size_t>(i)].id());
        batch.positions.push_back(t);
      }
      batch.x = Stack(rows);
      // Even steps as a unary StepBatch, odd ones as a batch on the stream: both must mean the same.
      StatusOr<StepBatchOutput> out =
          t % 2 == 0 ? client->StepBatch(batch, std::nullopt, 7) : stream->SubmitBatch(batch).get();
      ASSERT_TRUE(out.ok()) << out.status().ToString();
      ASSERT_EQ(out->statuses.size(), static_cast<size_t>(kSessions));
      ASSERT_EQ(out->out.shape, (std::vector<int64_t>{kSessions, 1, 64}));
      EXPECT_EQ(out->layer, layer);
      for (int i = 0; i < kSessions; ++i) {
        EXPECT_TRUE(out->statuses[static_cast<size_t>(i)].ok()) << out->statuses[static_cast<size_t>(i)].ToString();
        EXPECT_EQ(out->positions[static_cast<size_t>(i)], t);
        auto want = single[static_cast<size_t>(i)].Step(layer, rows[static_cast<size_t>(i)], t).value();
        EXPECT_LT(RelErr(Row(out->out, i), Floats(want.out)), 1e-6) << "session " << i << " t " << t;
      }
    }
  }
  EXPECT_TRUE(stream->Finish().ok());
  for (const Session& s : batched) EXPECT_EQ(s.Info().value().layer_positions, (std::vector<int64_t>{4, 4}));
}

TEST_F(ClientStepBatch, ErrorsStayWithTheirSessionAndMalformedBatchesAreNotSent) {
  auto client = ConnectTo(server_.target());
  auto a = client->CreateSession(ModelSession("small")).value();
  auto b = client->CreateSession(ModelSession("small")).value();
  StepBatchInput batch;
  batch.session_ids = {a.id(), std::string(32, 'f'), b.id()};
  batch.positions = {0, std::nullopt, 3};
  batch.x = Stack({RandomX(1, 64, 1), RandomX(1, 64, 2), RandomX(1, 64, 3)});
  auto out = client->StepBatch(batch).value();
  ASSERT_EQ(out.statuses.size(), 3u);
  EXPECT_TRUE(out.statuses[0].ok());
  EXPECT_EQ(out.statuses[1].code(), StatusCode::kNotFound);
  EXPECT_EQ(out.statuses[2].code(), StatusCode::kFailedPrecondition);
  for (float v : Row(out.out, 2)) ASSERT_EQ(v, 0.0f);
  EXPECT_EQ(a.Info().value().layer_positions[0], 1);
  EXPECT_EQ(b.Info().value().layer_positions[0], 0);

  // Checked before sending: rows that are not one per session, positions of another length.
  StepBatchInput rows_mismatch = batch;
  rows_mismatch.session_ids.pop_back();
  rows_mismatch.positions.clear();
  EXPECT_EQ(client->StepBatch(rows_mismatch).status().code(), StatusCode::kInvalidArgument);
  StepBatchInput positions_mismatch = batch;
  positions_mismatch.positions.pop_back();
  EXPECT_EQ(client->StepBatch(positions_mismatch).status().code(), StatusCode::kInvalidArgument);
  auto stream = client->OpenStream().value();
  EXPECT_EQ(stream->SubmitBatch(positions_mismatch).get().status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(stream->pending(), 0u);
  EXPECT_TRUE(stream->Finish().ok());
  EXPECT_EQ(a.Info().value().layer_positions[0], 1);
}

TEST_F(ClientStepBatch, ADeadlineOrACancellationInTheQueueAppliesNothing) {
  auto client = ConnectTo(server_.target());
  auto busy = client->CreateSession(ModelSession("slow")).value();
  std::vector<Session> victims;
  for (int i = 0; i < 3; ++i) victims.push_back(client->CreateSession(ModelSession("slow")).value());
  StepBatchInput batch;
  std::vector<HostTensor> rows;
  // 32 tokens each: more than a decode step (which would overtake LongStep's prefill chunks), so the batch waits
  // behind all of LongStep.
  for (const Session& v : victims) {
    batch.session_ids.push_back(v.id());
    rows.push_back(RandomX(32, 512, 9));
  }
  batch.x = Stack(rows);

  // On a stream: the batch's server-side timeout passes while LongStep runs.
  auto stream = client->OpenStream().value();
  StepBatchInput late = batch;
  late.timeout = milliseconds(1);
  auto long_f = stream->Submit(LongStep(busy, 5));
  auto late_f = stream->SubmitBatch(late);
  EXPECT_TRUE(long_f.get().ok());
  auto late_out = late_f.get();
  ASSERT_TRUE(late_out.ok()) << late_out.status().ToString();
  for (const Status& s : late_out->statuses) EXPECT_EQ(s.code(), StatusCode::kDeadlineExceeded) << s.ToString();
  EXPECT_TRUE(stream->Finish().ok());

  // Cancelling a stream drops the batches it has queued (this one is read after LongStep, so it waits behind it).
  auto stream2 = client->OpenStream().value();
  auto long2 = stream2->Submit(LongStep(busy, 6));
  auto cancelled = stream2->SubmitBatch(batch);
  stream2->Cancel();
  EXPECT_EQ(cancelled.get().status().code(), StatusCode::kCancelled);
  (void)long2.get();
  (void)stream2->Finish();

  // Unary: the call's deadline passes while LongStep runs (its 4 MiB are given 100 ms to reach the server first,
  // so the batch is queued behind it); the server drops the queued steps.
  auto stream3 = client->OpenStream().value();
  auto long3 = stream3->Submit(LongStep(busy, 7));
  std::this_thread::sleep_for(milliseconds(100));
  EXPECT_EQ(client->StepBatch(batch, milliseconds(20)).status().code(), StatusCode::kDeadlineExceeded);
  EXPECT_TRUE(long3.get().ok());
  EXPECT_TRUE(stream3->Finish().ok());
  // Nothing of either batch was applied (the server finished LongStep, so its queue was seen).
  auto probe = client->CreateSession(ModelSession("slow")).value();
  ASSERT_TRUE(probe.Step(0, RandomX(1, 512, 10)).ok());
  for (const Session& v : victims) EXPECT_EQ(v.Info().value().layer_positions[0], 0);
}

TEST_F(ClientStepBatch, ABatchWhoseSessionsAllNameTheirPositionIsRetriedAndAppliedOnce) {
  auto client = ConnectRetryingSteps(server_.target());
  auto busy = client->CreateSession(ModelSession("slow")).value();
  std::vector<Session> sessions;
  StepBatchInput batch;
  std::vector<HostTensor> rows;
  for (int i = 0; i < 3; ++i) {
    sessions.push_back(client->CreateSession(ModelSession("slow")).value());
    batch.session_ids.push_back(sessions.back().id());
    batch.positions.push_back(0);
    rows.push_back(RandomX(32, 512, static_cast<uint64_t>(20 + i)));  // not decode steps: they wait behind LongStep
  }
  batch.x = Stack(rows);
  auto stream = client->OpenStream().value();
  auto long_f = stream->Submit(LongStep(busy, 8));
  auto out = client->StepBatch(batch, milliseconds(60000));
  ASSERT_TRUE(out.ok()) << out.status().ToString();
  EXPECT_TRUE(long_f.get().ok());
  EXPECT_TRUE(stream->Finish().ok());
  for (size_t i = 0; i < sessions.size(); ++i) {
    EXPECT_TRUE(out->statuses[i].ok()) << out->statuses[i].ToString();
    EXPECT_EQ(sessions[i].Info().value().layer_positions[0], 32);  // once, however many attempts there were
    ForwardInput in;
    in.model = "slow";
    in.x = rows[i];
    EXPECT_LT(RelErr(Row(out->out, static_cast<int64_t>(i)), Floats(client->Forward(in).value().out)), 1e-5);
  }
}

}  // namespace
}  // namespace mqa::client
