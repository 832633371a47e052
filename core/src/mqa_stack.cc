#include <set>

#include "mqa/core/mqa_layer.h"
#include "mqa/core/safetensors.h"

namespace mqa::core {

std::string MqaStack::LayerPrefix(int i) { return "layers." + std::to_string(i) + ".attn."; }

StatusOr<std::unique_ptr<MqaStack>> MqaStack::Create(const MqaOptions& options, int num_layers) {
  if (num_layers <= 0) return InvalidArgumentError("num_layers must be positive, got " + std::to_string(num_layers));
  auto stack = std::unique_ptr<MqaStack>(new MqaStack());
  for (int i = 0; i < num_layers; ++i) {
    MqaOptions o = options;
    o.seed = options.seed + static_cast<uint64_t>(i);
    MQA_ASSIGN_OR_RETURN(auto layer, MultiQueryAttention::Create(o));
    stack->layers_.push_back(std::move(layer));
  }
  return stack;
}

StatusOr<std::unique_ptr<MqaStack>> MqaStack::Load(const std::string& path, const MqaOptions& options, int num_layers) {
  MQA_ASSIGN_OR_RETURN(SafetensorsFile file, ReadSafetensors(path));
  // Every name must be "layers.<i>.attn.<param>"; the layers present must be 0..n-1.
  std::set<int> present;
  for (const auto& [name, t] : file.tensors) {
    int idx = -1;
    size_t consumed = 0;
    if (name.rfind("layers.", 0) == 0) {
      try {
        idx = std::stoi(name.substr(7), &consumed);
      } catch (...) {
        idx = -1;
      }
    }
    if (idx < 0 || name.compare(7 + consumed, 6, ".attn.") != 0) {
      return InvalidArgumentError(path + ": unexpected tensor '" + name +
                                  "'; expected names like 'layers.0.attn.Wqkv.weight'");
    }
    present.insert(idx);
  }
  if (present.empty()) return InvalidArgumentError(path + ": holds no layer parameters");
  const int in_file = *present.rbegin() + 1;
  if (static_cast<int>(present.size()) != in_file) {
    return InvalidArgumentError(path + ": layers must be numbered 0.." + std::to_string(in_file - 1) + " without gaps");
  }
  if (num_layers != 0 && num_layers != in_file) {
    return InvalidArgumentError(path + ": holds " + std::to_string(in_file) + " layers, the model expects " +
                                std::to_string(num_layers));
  }
  MQA_ASSIGN_OR_RETURN(auto stack, Create(options, in_file));
  for (int i = 0; i < in_file; ++i) {
    Status st = stack->layers_[static_cast<size_t>(i)]->LoadStateDict(file.tensors, LayerPrefix(i));
    if (!st.ok()) return Status(st.code(), path + ": " + st.message());
  }
  return stack;
}

Status MqaStack::Save(const std::string& path) const {
  TensorMap all;
  for (size_t i = 0; i < layers_.size(); ++i) {
    TensorMap sd = layers_[i]->StateDict(LayerPrefix(static_cast<int>(i)));
    all.insert(sd.begin(), sd.end());
  }
  return WriteSafetensors(path, all, {{"format", "pt"}, {"producer", "mqaserve"}});
}

}  // namespace mqa::core
