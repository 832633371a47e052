// What the client end-to-end tests share: a real mqa-server child process on 127.0.0.1 and small helpers.
#ifndef MQA_TESTS_CPP_CLIENT_E2E_UTIL_H_
#define MQA_TESTS_CPP_CLIENT_E2E_UTIL_H_

#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "mqa/client/client.h"

extern char** environ;

namespace mqa::client::e2e {

namespace fs = std::filesystem;
using std::chrono::milliseconds;

// One mqa-server child with a small CPU model ("small": 2 layers, dim 64) and a slow one ("slow": dim 512).
class ServerProcess {
 public:
  explicit ServerProcess(int port = 0) {
    const char* bin = std::getenv("MQA_SERVER_BIN");
    if (bin == nullptr) {
      ADD_FAILURE() << "MQA_SERVER_BIN is not set (run through ctest)";
      return;
    }
    dir_ =
        fs::temp_directory_path() / ("mqa-client-e2e-" + std::to_string(::getpid()) + "-" + std::to_string(counter_++));
    fs::create_directories(dir_);
    std::ofstream(dir_ / "config.json")
        << R"({"log_level": "warn", "models": [)"
        << R"({"name": "small", "num_layers": 2, "dim": 64, "heads": 4, "seed": 3, "device": "cpu", "dtype": "float32"},)"
        << R"({"name": "slow", "num_layers": 1, "dim": 512, "heads": 8, "seed": 4, "device": "cpu", "dtype": "float32",)"
        << R"( "max_tokens_per_session": 8192}]})";
    std::vector<std::string> args = {bin, "--config", (dir_ / "config.json").string(), "--listen",
                                     "127.0.0.1:" + std::to_string(port), "--port-file", (dir_ / "port").string(),
                                     // never the shared default 0.0.0.0:9400, which another server may hold
                                     "--metrics-listen", "127.0.0.1:0",
                                     // A pass holds one prefill chunk's tokens at most, so a step queued behind
                                     // LongStep never shares a pass with one of its chunks: the tests that need
                                     // a step to wait in the queue do not race the worker.
                                     "--max-batch-tokens", "512"};
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    pid_ = ::fork();
    if (pid_ == 0) {
      // The server must not outlive a test process that crashes: it would hold the test's output open.
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);
      ::execve(bin, argv.data(), environ);
      ::_exit(127);
    }
    if (pid_ < 0) {
      ADD_FAILURE() << "cannot start " << bin;
      pid_ = 0;
      return;
    }
    for (int i = 0; i < 6000 && !fs::exists(dir_ / "port"); ++i) std::this_thread::sleep_for(milliseconds(10));
    std::ifstream(dir_ / "port") >> port_;
    EXPECT_GT(port_, 0) << "mqa-server did not write its port";
  }

  ~ServerProcess() {
    if (pid_ > 0) {
      ::kill(pid_, SIGTERM);
      int status = 0;
      for (int i = 0; i < 3000; ++i) {  // the drain budget of 30 s at most
        if (::waitpid(pid_, &status, WNOHANG) == pid_) break;
        if (i == 2999) {
          ::kill(pid_, SIGKILL);
          ::waitpid(pid_, &status, 0);
        }
        std::this_thread::sleep_for(milliseconds(10));
      }
    }
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }

  std::string target() const { return "127.0.0.1:" + std::to_string(port_); }

 private:
  static inline int counter_ = 0;
  fs::path dir_;
  pid_t pid_ = 0;
  int port_ = 0;
};

inline SessionOptions ModelSession(const std::string& model) {
  SessionOptions o;
  o.model = model;
  return o;
}

inline std::unique_ptr<Client> ConnectTo(const std::string& target) {
  ClientOptions o;
  o.target = target;
  auto c = Client::Connect(o);
  EXPECT_TRUE(c.ok()) << c.status().ToString();
  return std::move(c).value();
}

// A client whose steps with a position get 20 ms per attempt and are sent again (up to 1000 times, 1 ms apart)
// until one attempt is answered: for the exactly-once retry tests.
inline std::unique_ptr<Client> ConnectRetryingSteps(const std::string& target) {
  ClientOptions o;
  o.target = target;
  o.step_attempt_timeout = milliseconds(20);
  o.max_retries = 1000;
  o.retry_backoff = milliseconds(1);
  auto c = Client::Connect(o);
  EXPECT_TRUE(c.ok()) << c.status().ToString();
  return std::move(c).value();
}

inline HostTensor RandomX(int64_t s, int64_t dim, uint64_t seed) {
  std::mt19937_64 g(seed);
  std::normal_distribution<float> n;
  std::vector<float> v(static_cast<size_t>(s * dim));
  for (float& f : v) f = n(g);
  return HostTensor::FromFloats({1, s, dim}, v).value();
}

inline std::vector<float> Floats(const HostTensor& t) { return t.ToFloats().value(); }

// A 2048-token step of a "slow" session: it keeps the server's CPU worker busy while other steps queue.
inline StepRequest LongStep(const Session& session, uint64_t seed) {
  StepRequest r;
  r.session_id = session.id();
  r.x = RandomX(2048, 512, seed);
  return r;
}

inline double RelErr(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += (a[i] - b[i]) * double(a[i] - b[i]);
    den += b[i] * double(b[i]);
  }
  return std::sqrt(num / den);
}

}  // namespace mqa::client::e2e

#endif  // MQA_TESTS_CPP_CLIENT_E2E_UTIL_H_
