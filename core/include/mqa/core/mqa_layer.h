// MultiQueryAttention: the layer of docs/semantics.md (Zeta's / llm-foundry's MQA layer).
//
// H query heads share one key/value head. Notation: b = batch, s = new tokens (s_q), H = heads,
// d = head_dim = dim / H, s_k = cached + new tokens.
//
// Ownership and thread-safety: a layer owns its parameters (on options.device, in options.dtype).
// Forward() is const and may run concurrently from several threads; LoadStateDict() must not run concurrently
// with anything else on the same layer. Tensors passed in are only read; results are new tensors.
#ifndef MQA_CORE_MQA_LAYER_H_
#define MQA_CORE_MQA_LAYER_H_

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "mqa/core/status.h"
#include "mqa/core/tensor.h"

namespace mqa::core {

// torch: explicit matmul/softmax math (supports everything). flash: LibTorch's fused scaled-dot-product
// attention; it falls back to torch, logged and counted, where it cannot serve a request (needs_weights).
// triton: the project's own fused CUDA kernels (the spec's name for them): the engine's paged pass runs its
// decode tokens through the paged MQA decode kernel, appends K/V with one kernel, and runs prefill chunks through
// LibTorch's variable-length flash kernel against the gathered cache. They need a CUDA device, bfloat16 or
// float16 and head_dim 64 or 128; elsewhere (and for needs_weights, and for the stateless Forward, which has no
// paged cache and uses flash's kernels) the layer falls back visibly: logged once, counted in
// fallbacks_to_torch.
enum class AttnImpl : int { kTorch = 0, kFlash = 1, kTriton = 2 };
std::string_view AttnImplName(AttnImpl impl);
StatusOr<AttnImpl> ParseAttnImpl(std::string_view name);

enum class NormType : int { kLowPrecisionLayerNorm = 0, kLayerNorm = 1, kRmsNorm = 2, kLowPrecisionRmsNorm = 3 };
std::string_view NormTypeName(NormType type);
// Accepts the four spec names (any case) and Zeta's misspelled alias "layernornm" (= layernorm).
StatusOr<NormType> ParseNormType(std::string_view name);

struct MqaOptions {
  int64_t dim = 512;
  int64_t heads = 8;
  AttnImpl attn_impl = AttnImpl::kTorch;
  std::optional<double> clip_qkv;  // unset or 0.0: no clipping
  bool qk_ln = false;
  std::optional<double> softmax_scale;  // unset: 1/sqrt(head_dim); any set value (also 0.0) is used as given
  double attn_pdrop = 0.0;              // dropout on attention probabilities, only for training-mode calls
  NormType norm_type = NormType::kLowPrecisionLayerNorm;
  std::string fc_type = "torch";  // only "torch" exists
  int verbose = 0;                // 0: quiet; 1: log construction and fallbacks at info; 2: debug
  std::string device = "cpu";     // "cpu", "cuda", "cuda:N"
  DType dtype = DType::kFloat32;  // parameters and activations: float32, bfloat16 or float16
  uint64_t seed = 0;              // initialisation seed, as torch.manual_seed(seed) + nn.Linear defaults
  // attn_impl triton on CUDA: decode-only passes of the paged engine replay a CUDA graph captured per batch
  // bucket (1, 2, 4, ..., 256 sessions, padded up) and table width, instead of launching each kernel.
  bool cuda_graphs = true;

  int64_t head_dim() const { return heads > 0 ? dim / heads : 0; }
};

// Checks every option (dim % heads, names, dtype, device, ranges); the message says what was expected.
Status ValidateOptions(const MqaOptions& options);

// past_key_value in the reference layout: k [b, 1, d, s_past] (keys TRANSPOSED), v [b, 1, s_past, d].
// Both undefined = the empty cache "()".
struct KvCache {
  Tensor k;
  Tensor v;
  bool empty() const { return !k.defined() && !v.defined(); }
  int64_t length() const { return v.defined() ? v.size(2) : 0; }
};

struct ForwardArgs {
  Tensor x;                               // [b, s, dim], the layer's dtype and device
  std::optional<KvCache> past_key_value;  // nullopt: no cache kept or returned; empty KvCache: start one
  Tensor bias;                            // optional additive bias, 4-D, dims [1|b, 1|H, 1|>=s_q, 1|>=s_k]
  Tensor mask;                            // optional bool key-padding mask [b, s_k], true = attend
  bool causal = true;                     // bottom-right causal, only applied when s_q > 1
  bool needs_weights = false;             // return the attention probabilities
  bool training = false;                  // training-mode behaviour (dropout); a server runs in eval mode
};

struct ForwardResult {
  Tensor out;                    // [b, s, dim]
  Tensor weights;                // [b, H, s_q, s_k] when needs_weights, else undefined
  std::optional<KvCache> cache;  // present iff past_key_value was given; includes the new tokens
};

struct LayerCounters {
  uint64_t forwards = 0;
  uint64_t fallbacks_to_torch = 0;  // flash/triton requests served by another path (see AttnImpl)
  // The same, by reason: "needs_weights", "unsupported_layer" (no CUDA, or not 16-bit), "stateless_forward"
  // (triton's kernels work on the paged cache; a stateless Forward uses flash's).
  std::map<std::string, uint64_t> fallbacks;
};

class MultiQueryAttention {
 public:
  // Builds a layer with freshly initialised parameters (see MqaOptions::seed). Errors: INVALID_ARGUMENT for
  // bad options, UNAVAILABLE when the device does not exist here.
  static StatusOr<std::unique_ptr<MultiQueryAttention>> Create(const MqaOptions& options);
  ~MultiQueryAttention();
  MultiQueryAttention(const MultiQueryAttention&) = delete;
  MultiQueryAttention& operator=(const MultiQueryAttention&) = delete;

  const MqaOptions& options() const;

  // The spec's forward. INVALID_ARGUMENT (message states the expected shapes/dtypes) for wrong inputs.
  StatusOr<ForwardResult> Forward(const ForwardArgs& args) const;

  // Parameters under the spec's state-dict names, each prefixed by prefix ("layers.0.attn." or "").
  TensorMap StateDict(const std::string& prefix = "") const;
  // Replaces every parameter from tensors[prefix + name]. Names, shapes and dtypes must match exactly
  // (INVALID_ARGUMENT naming each problem); extra names under prefix are errors too. Tensors are copied.
  Status LoadStateDict(const TensorMap& tensors, const std::string& prefix = "");

  // The stateless Forward's counters (the engine's paged passes count theirs apart: EngineStats::execution).
  LayerCounters counters() const;

 private:
  struct Impl;
  explicit MultiQueryAttention(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// The layer's stack of a hosted model: layers[i] has state-dict prefix "layers.{i}.attn.".
class MqaStack {
 public:
  // num_layers fresh layers; layer i is initialised with seed options.seed + i.
  static StatusOr<std::unique_ptr<MqaStack>> Create(const MqaOptions& options, int num_layers);
  // Loads a safetensors file. num_layers 0: as many as the file holds (it must hold layers 0..n-1 only).
  static StatusOr<std::unique_ptr<MqaStack>> Load(const std::string& path, const MqaOptions& options,
                                                  int num_layers = 0);
  Status Save(const std::string& path) const;

  int num_layers() const { return static_cast<int>(layers_.size()); }
  MultiQueryAttention& layer(int i) { return *layers_.at(static_cast<size_t>(i)); }
  const MultiQueryAttention& layer(int i) const { return *layers_.at(static_cast<size_t>(i)); }
  static std::string LayerPrefix(int i);

 private:
  std::vector<std::unique_ptr<MultiQueryAttention>> layers_;
};

// ALiBi slopes for H heads (spec "ALiBi"): m_k = 1 / 2^(8k/H'), odd-then-even reorder when H is not a power of 2.
std::vector<float> AlibiSlopes(int64_t heads);
// Causal form [1, H, 1, S] (bias[h, j] = m_h * (j - (S-1))), or the full form [1, H, S, S] (-m_h * |i - j|).
StatusOr<Tensor> AlibiBias(int64_t heads, int64_t seq_len, bool full, DType dtype, std::string_view device = "cpu");

}  // namespace mqa::core

#endif  // MQA_CORE_MQA_LAYER_H_
