#include "common.h"

#include <cstdio>
#include <optional>
#include <utility>

#include <CLI/CLI.hpp>

namespace mqa::client::cli {
namespace {

// Input dtypes a client may send: the floating ones.
std::optional<DataType> FloatingDtype(const std::string& name) {
  std::optional<DataType> dtype = ParseDataType(name);
  if (!dtype || (*dtype != DataType::kFloat32 && *dtype != DataType::kBFloat16 && *dtype != DataType::kFloat16)) {
    return std::nullopt;
  }
  return dtype;
}

}  // namespace

int Fail(const Status& status) {
  std::fprintf(stderr, "error: %s\n", status.ToString().c_str());
  return 1;
}

StatusOr<ModelInfo> PickModel(Client& client, const std::string& requested) {
  if (!requested.empty()) return client.GetModel(requested);
  StatusOr<std::vector<ModelInfo>> models = client.ListModels();
  if (!models.ok()) return models.status();
  if (models->empty()) return Status(StatusCode::kNotFound, "the server hosts no models");
  return models->front();
}

StatusOr<HostTensor> RandomTensor(std::vector<int64_t> shape, DataType dtype, std::mt19937_64& rng) {
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> values(static_cast<size_t>(n));
  for (float& v : values) v = normal(rng);
  return HostTensor::FromFloats(std::move(shape), values, dtype);
}

CLI::Option* AddDtypeFlag(CLI::App& app, std::string* name, const std::string& help) {
  CLI::Validator floating(
      [](const std::string& text) -> std::string {
        if (FloatingDtype(text)) return std::string();
        return "must be float32, bfloat16 or float16, got '" + text + "'";
      },
      "", "FloatingDtype");
  return app.add_option("--dtype", *name, help)->check(floating)->type_name("float32|bfloat16|float16");
}

DataType DtypeOf(const std::string& name) { return FloatingDtype(name).value_or(DataType::kFloat32); }

}  // namespace mqa::client::cli
