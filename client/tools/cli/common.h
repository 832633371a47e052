// What several of mqa-cli's commands share: error output, picking the model, random inputs, the --dtype flag.
#ifndef MQA_CLIENT_TOOLS_CLI_COMMON_H_
#define MQA_CLIENT_TOOLS_CLI_COMMON_H_

#include <chrono>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "mqa/client/client.h"

namespace CLI {
class App;
class Option;
}  // namespace CLI

namespace mqa::client::cli {

using Clock = std::chrono::steady_clock;

// Prints "error: CODE: message" on stderr; returns 1, the exit status of a failed command.
int Fail(const Status& status);

// `requested`, or the first model the server lists when it is empty.
StatusOr<ModelInfo> PickModel(Client& client, const std::string& requested);

// Standard normal values from rng, in `dtype`.
StatusOr<HostTensor> RandomTensor(std::vector<int64_t> shape, DataType dtype, std::mt19937_64& rng);

// --dtype on `app`, stored as text in *name: float32, bfloat16 or float16 (or ParseDataType's aliases of them).
CLI::Option* AddDtypeFlag(CLI::App& app, std::string* name, const std::string& help);
// The dtype a value of --dtype names (AddDtypeFlag has checked it).
DataType DtypeOf(const std::string& name);

}  // namespace mqa::client::cli

#endif  // MQA_CLIENT_TOOLS_CLI_COMMON_H_
