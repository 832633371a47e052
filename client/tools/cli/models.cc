// mqa-cli models: the hosted models and each layer's configuration.
#include <cinttypes>
#include <cstdio>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "commands.h"
#include "common.h"

namespace mqa::client::cli {
namespace {

std::string FormatOptional(const std::optional<double>& v) {
  if (!v) return "-";
  std::ostringstream os;
  os << *v;
  return os.str();
}

int RunModels(Client& client) {
  StatusOr<std::vector<ModelInfo>> models = client.ListModels();
  if (!models.ok()) return Fail(models.status());
  if (models->empty()) std::printf("(no models)\n");
  for (const ModelInfo& m : *models) {
    std::string on;
    for (const std::string& d : m.devices) on += (on.empty() ? "" : ", ") + d;
    std::printf("model %s: %d layers, max_tokens_per_session %" PRId64 "%s%s%s%s\n", m.name.c_str(), m.num_layers,
                m.max_tokens_per_session, on.empty() ? "" : ", on ", on.c_str(), m.description.empty() ? "" : ", ",
                m.description.c_str());
    std::printf("  %5s %6s %5s %8s %-6s %-9s %-8s %-5s %-22s %8s %8s %6s\n", "layer", "dim", "heads", "head_dim",
                "impl", "dtype", "device", "qk_ln", "norm", "clip_qkv", "scale", "pdrop");
    for (size_t i = 0; i < m.layers.size(); ++i) {
      const LayerConfig& c = m.layers[i];
      std::printf("  %5zu %6" PRId64 " %5" PRId64 " %8" PRId64 " %-6s %-9s %-8s %-5s %-22s %8s %8s %6g\n", i, c.dim,
                  c.heads, c.head_dim, c.attn_impl.c_str(), DataTypeName(c.dtype).c_str(), c.device.c_str(),
                  c.qk_ln ? "yes" : "no", c.norm_type.c_str(), FormatOptional(c.clip_qkv).c_str(),
                  FormatOptional(c.softmax_scale).c_str(), c.attn_pdrop);
    }
  }
  return 0;
}

}  // namespace

Command AddModels(CLI::App& app) {
  CLI::App* sub = app.add_subcommand("models", "list the hosted models and their layers");
  return Command{sub, [](Client& client, const CommonFlags&) { return RunModels(client); }};
}

}  // namespace mqa::client::cli
