// Structured logging of the server (server/logging.h).
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <spdlog/sinks/ostream_sink.h>
#include <spdlog/spdlog.h>
#include <nlohmann/json.hpp>

#include <cstdint>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "logging.h"
#include "mqa/core/logging.h"

namespace mqa::server {
namespace {

using core::StatusCode;
using ::testing::HasSubstr;

// ---- Logging ----

class LoggingTest : public ::testing::Test {
 protected:
  void SetUpSink(const std::string& level, const std::string& format) {
    out_.str("");
    ASSERT_TRUE(SetUpLogging(level, format, std::make_shared<spdlog::sinks::ostream_sink_mt>(out_)).ok());
  }
  void TearDown() override {
    // Later tests must not write into this test's stream.
    core::SetLogSink(nullptr);
    spdlog::set_default_logger(std::make_shared<spdlog::logger>("null"));
  }
  std::vector<std::string> Lines() const {
    std::vector<std::string> lines;
    std::istringstream in(out_.str());
    for (std::string line; std::getline(in, line);) lines.push_back(line);
    return lines;
  }

  std::ostringstream out_;
};

TEST_F(LoggingTest, TextFormatOneLinePerEventWithQuoting) {
  SetUpSink("info", "text");
  LogInfo("session_created", {{"session", "abc123"},
                              {"tokens", 4096},
                              {"ratio", 0.5},
                              {"ok", true},
                              {"note", "two words"},
                              {"tricky", "say \"hi\"\\ and\nbye\x01"},
                              {"empty", ""},
                              {"eq", "a=b"},
                              {"u", size_t{7}},
                              {"neg", -3}});
  LogDebug("hidden", {{"x", 1}});
  LogWarn("second");
  const auto lines = Lines();
  ASSERT_EQ(lines.size(), 2u) << out_.str();
  const std::string& l = lines[0];
  // 2026-11-27T21:00:00.123Z
  ASSERT_GE(l.size(), 26u);
  EXPECT_EQ(l[4], '-');
  EXPECT_EQ(l[10], 'T');
  EXPECT_EQ(l[19], '.');
  EXPECT_EQ(l[23], 'Z');
  EXPECT_EQ(l[24], ' ');
  EXPECT_EQ(l.substr(25),
            "level=info event=session_created session=abc123 tokens=4096 ratio=0.5 ok=true note=\"two words\" "
            "tricky=\"say \\\"hi\\\"\\\\ and\\nbye\\u0001\" empty=\"\" eq=\"a=b\" u=7 neg=-3");
  EXPECT_EQ(lines[1].substr(25), "level=warning event=second");
}

TEST_F(LoggingTest, KeysAreSanitisedAndReservedKeysRenamed) {
  SetUpSink("info", "text");
  LogInfo("e v", {{"level", "x"}, {"a key", 1}, {"", 2}});
  const auto lines = Lines();
  ASSERT_EQ(lines.size(), 1u);
  EXPECT_EQ(lines[0].substr(25), "level=info event=\"e v\" _level=x a_key=1 _=2");
}

TEST_F(LoggingTest, JsonFormatParses) {
  SetUpSink("debug", "json");
  LogInfo("step", {{"session", "s\"1\\\n"},
                   {"n", 3},
                   {"big", uint64_t{18446744073709551615u}},
                   {"x", 1.25},
                   {"ok", false},
                   {"bad_utf8",
                    "a\xff"
                    "b"},
                   {"utf8", "h\xc3\xa9"},
                   {"inf", 1.0 / 0.0},
                   {"event", "shadow"}});
  LogDebug("debugged");
  spdlog::info("plain {}", "message");
  const auto lines = Lines();
  ASSERT_EQ(lines.size(), 3u) << out_.str();
  const auto j = nlohmann::json::parse(lines[0]);
  EXPECT_EQ(j.at("level"), "info");
  EXPECT_EQ(j.at("event"), "step");
  EXPECT_EQ(j.at("session"), "s\"1\\\n");
  EXPECT_EQ(j.at("n"), 3);
  EXPECT_EQ(j.at("big").get<uint64_t>(), 18446744073709551615u);
  EXPECT_DOUBLE_EQ(j.at("x").get<double>(), 1.25);
  EXPECT_EQ(j.at("ok"), false);
  EXPECT_EQ(j.at("bad_utf8"),
            "a\xef\xbf\xbd"
            "b");
  EXPECT_EQ(j.at("utf8"), "h\xc3\xa9");
  EXPECT_EQ(j.at("inf"), "inf");
  EXPECT_EQ(j.at("_event"), "shadow");
  const std::string ts = j.at("ts");
  EXPECT_EQ(ts.size(), 24u);
  EXPECT_EQ(ts.back(), 'Z');
  EXPECT_EQ(nlohmann::json::parse(lines[1]).at("level"), "debug");
  const auto plain = nlohmann::json::parse(lines[2]);
  EXPECT_EQ(plain.at("event"), "log");
  EXPECT_EQ(plain.at("msg"), "plain message");
}

TEST_F(LoggingTest, CoreMessagesArriveThroughTheHook) {
  SetUpSink("warn", "text");
  core::Log(core::LogLevel::kInfo, "below the level");
  core::Log(core::LogLevel::kWarning, "fallback to torch, layer 3");
  core::Log(core::LogLevel::kError, "boom");
  auto lines = Lines();
  ASSERT_EQ(lines.size(), 2u) << out_.str();
  EXPECT_EQ(lines[0].substr(25), "level=warning event=core msg=\"fallback to torch, layer 3\"");
  EXPECT_EQ(lines[1].substr(25), "level=error event=core msg=boom");

  SetUpSink("debug", "json");
  core::Log(core::LogLevel::kDebug, "detail");
  lines = Lines();
  ASSERT_EQ(lines.size(), 1u) << out_.str();
  const auto j = nlohmann::json::parse(lines[0]);
  EXPECT_EQ(j.at("event"), "core");
  EXPECT_EQ(j.at("level"), "debug");
  EXPECT_EQ(j.at("msg"), "detail");
}

TEST_F(LoggingTest, BadLevelOrFormatIsRejected) {
  std::ostringstream unused;
  auto sink = std::make_shared<spdlog::sinks::ostream_sink_mt>(unused);
  auto st = SetUpLogging("loud", "text", sink);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_THAT(st.message(), HasSubstr("unknown log level 'loud'"));
  st = SetUpLogging("info", "xml", sink);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_THAT(st.message(), HasSubstr("unknown log format 'xml'; expected text or json"));
}

TEST_F(LoggingTest, LogEnabledFollowsTheLevel) {
  SetUpSink("warn", "text");
  EXPECT_FALSE(LogEnabled(spdlog::level::info));
  EXPECT_TRUE(LogEnabled(spdlog::level::warn));
  SetUpSink("off", "text");
  EXPECT_FALSE(LogEnabled(spdlog::level::critical));
  LogError("nothing");
  EXPECT_TRUE(Lines().empty());
}

}  // namespace
}  // namespace mqa::server
