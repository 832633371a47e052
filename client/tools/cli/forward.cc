// mqa-cli forward: one stateless forward of one layer, on random inputs or a safetensors file's.
#include <algorithm>
#include <chrono>
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include <CLI/CLI.hpp>

#include "command_line.h"
#include "commands.h"
#include "common.h"
#include "safetensors_io.h"

namespace mqa::client::cli {
namespace {

struct ForwardFlags {
  int64_t layer = 0;
  int64_t tokens = 8;
  int64_t batch = 1;
  int64_t seed = 0;
  std::string dtype = "float32";
  std::string in_path;
  std::string out_path;
  bool no_causal = false;
  bool weights = false;
};

void PrintTensorSummary(const char* name, const HostTensor& t) {
  StatusOr<std::vector<float>> values = t.ToFloats();
  if (!values.ok()) {
    std::printf("%s: %s %s (unreadable: %s)\n", name, DataTypeName(t.dtype).c_str(), t.ShapeString().c_str(),
                values.status().ToString().c_str());
    return;
  }
  double sum = 0.0, abs_sum = 0.0;
  for (float v : *values) {
    sum += v;
    abs_sum += std::fabs(v);
  }
  std::printf("%s: %s %s sum %.6g sum|.| %.6g first:", name, DataTypeName(t.dtype).c_str(), t.ShapeString().c_str(),
              sum, abs_sum);
  for (size_t i = 0; i < std::min<size_t>(8, values->size()); ++i) std::printf(" %.6g", (*values)[i]);
  std::printf("\n");
}

int RunForward(Client& client, const ForwardFlags& flags, const std::string& model_flag) {
  StatusOr<ModelInfo> model = PickModel(client, model_flag);
  if (!model.ok()) return Fail(model.status());
  if (flags.layer >= static_cast<int64_t>(model->layers.size())) {
    return Fail(Status(StatusCode::kInvalidArgument,
                       "model " + model->name + " has " + std::to_string(model->layers.size()) + " layers"));
  }
  ForwardInput input;
  input.model = model->name;
  input.layer = static_cast<int32_t>(flags.layer);
  input.needs_weights = flags.weights;
  if (flags.no_causal) input.causal = false;
  if (!flags.in_path.empty()) {
    StatusOr<tools::SafetensorsFile> file = tools::ReadSafetensors(flags.in_path);
    if (!file.ok()) return Fail(file.status());
    auto x = file->tensors.find("x");
    if (x == file->tensors.end()) {
      return Fail(Status(StatusCode::kInvalidArgument, flags.in_path + " holds no tensor 'x'"));
    }
    input.x = x->second;
    if (auto bias = file->tensors.find("bias"); bias != file->tensors.end()) input.bias = bias->second;
    if (auto mask = file->tensors.find("mask"); mask != file->tensors.end()) input.mask = mask->second;
  } else {
    std::mt19937_64 rng(static_cast<uint64_t>(flags.seed));
    StatusOr<HostTensor> x = RandomTensor(
        {flags.batch, flags.tokens, model->layers[static_cast<size_t>(flags.layer)].dim}, DtypeOf(flags.dtype), rng);
    if (!x.ok()) return Fail(x.status());
    input.x = std::move(*x);
  }
  const auto start = Clock::now();
  StatusOr<ForwardOutput> output = client.Forward(input);
  const double ms = std::chrono::duration<double, std::milli>(Clock::now() - start).count();
  if (!output.ok()) return Fail(output.status());
  std::printf("model %s layer %" PRId64 ": x %s -> %.3f ms\n", model->name.c_str(), flags.layer,
              input.x.ShapeString().c_str(), ms);
  PrintTensorSummary("out", output->out);
  if (output->weights) PrintTensorSummary("weights", *output->weights);
  if (!flags.out_path.empty()) {
    tools::SafetensorsFile file;
    file.tensors["out"] = output->out;
    if (output->weights) file.tensors["weights"] = *output->weights;
    file.metadata["model"] = model->name;
    file.metadata["layer"] = std::to_string(flags.layer);
    Status written = tools::WriteSafetensors(flags.out_path, file);
    if (!written.ok()) return Fail(written);
    std::printf("wrote %s\n", flags.out_path.c_str());
  }
  return 0;
}

}  // namespace

Command AddForward(CLI::App& app) {
  auto flags = std::make_shared<ForwardFlags>();
  CLI::App* sub = app.add_subcommand("forward", "one stateless forward of one layer");
  mqa::command_line::AddInt(*sub, "--layer", &flags->layer, 0, "the layer")->capture_default_str();
  mqa::command_line::AddInt(*sub, "--tokens", &flags->tokens, 0, "tokens of the random input x [batch, tokens, dim]")
      ->capture_default_str();
  mqa::command_line::AddInt(*sub, "--batch", &flags->batch, 1, "batch of the random input")->capture_default_str();
  mqa::command_line::AddInt(*sub, "--seed", &flags->seed, 0, "seed of the random input")->capture_default_str();
  AddDtypeFlag(*sub, &flags->dtype, "dtype of the random input")->capture_default_str();
  sub->add_option("--in", flags->in_path, "safetensors file with the input: x, optional bias and mask")
      ->type_name("FILE.safetensors");
  sub->add_option("--out", flags->out_path, "write out (and weights) to this safetensors file")
      ->type_name("FILE.safetensors");
  sub->add_flag("--no-causal", flags->no_causal, "no causal mask");
  sub->add_flag("--weights", flags->weights, "also return the attention weights");
  return Command{
      sub, [flags](Client& client, const CommonFlags& common) { return RunForward(client, *flags, common.model); }};
}

}  // namespace mqa::client::cli
