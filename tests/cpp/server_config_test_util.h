// Helpers shared by the server configuration tests (server_config*_test.cc, settings_test.cc).
#ifndef MQA_TESTS_CPP_SERVER_CONFIG_TEST_UTIL_H_
#define MQA_TESTS_CPP_SERVER_CONFIG_TEST_UTIL_H_

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <system_error>
#include <vector>

#include "config.h"
#include "mqa/core/device.h"
#include "mqa/core/status.h"

namespace mqa::server::config_test {

using Env = std::map<std::string, std::string>;

// argv as main gets it: the program's name first.
class Argv {
 public:
  explicit Argv(std::vector<std::string> args) : args_(std::move(args)) {
    args_.insert(args_.begin(), "mqa-server");
    for (const std::string& a : args_) argv_.push_back(a.c_str());
  }
  int argc() const { return static_cast<int>(argv_.size()); }
  const char* const* argv() const { return argv_.data(); }

 private:
  std::vector<std::string> args_;
  std::vector<const char*> argv_;
};

inline core::StatusOr<ServerConfig> Load(std::vector<std::string> args, const Env& env = {}) {
  const Argv a(std::move(args));
  return LoadConfig(a.argc(), a.argv(), env);
}

inline std::string AutoDevice() { return core::CudaAvailable() ? "cuda:0" : "cpu"; }

// A fresh directory per test, removed afterwards, so tests never see each other's files.
class TempDir {
 public:
  TempDir() {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    path_ = std::filesystem::temp_directory_path() /
            ("mqa_config_test_" + std::string(info->name()) + "_" + std::to_string(::getpid()));
    std::filesystem::remove_all(path_);
    std::filesystem::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::filesystem::path& path() const { return path_; }
  std::string Write(const std::string& name, const std::string& text) const {
    const std::filesystem::path p = path_ / name;
    std::filesystem::create_directories(p.parent_path());
    std::ofstream(p) << text;
    return p.string();
  }

 private:
  std::filesystem::path path_;
};

template <typename T>
void ExpectError(const core::StatusOr<T>& result, core::StatusCode code, const std::vector<std::string>& substrings) {
  ASSERT_FALSE(result.ok()) << "expected an error";
  EXPECT_EQ(result.status().code(), code) << result.status().ToString();
  for (const std::string& s : substrings) EXPECT_THAT(result.status().message(), ::testing::HasSubstr(s));
}

}  // namespace mqa::server::config_test

#endif  // MQA_TESTS_CPP_SERVER_CONFIG_TEST_UTIL_H_
