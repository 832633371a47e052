// mqa-bench-kernels: the project's paged MQA kernels against LibTorch, on one CUDA device, in one run.
//
//  1. Decode attention alone, B sessions x L cached tokens (bf16, H query heads sharing one K/V head of
//     head_dim D): the paged decode kernel, LibTorch's scaled-dot-product attention with grouped heads
//     (enable_gqa) and with the heads folded into the query rows, the unfused matmul-softmax-matmul on contiguous
//     K/V, and the torch path of the paged pass (gather, then unfused). Bytes = the K/V the step must read; the
//     percentage is of the device-to-device copy bandwidth measured in the same run.
//  2. The whole layer step of a paged decode pass (QKV GEMM, KV append, attention, output GEMM) for B sessions
//     at L tokens: attn_impl triton replaying CUDA graphs, triton eager, and torch; against the memory floor
//     (weights + K/V bytes) / copy bandwidth.
//
// Usage: mqa-bench-kernels [--json FILE] [--heads 32] [--head-dim 128] [--iters N] [--quick]
//          [--batches 1,8,64,256] [--lengths 1024,8192] [--layer-only]
//        mqa-bench-kernels --profile-decode B,L[,SPLITS] | --profile-layer B,L
//        mqa-bench-kernels --help | --version
//   The profile modes run one case a few times and exit, for a profiler (ncu -k ...): the decode kernel eagerly
//   (the split heuristic's count unless SPLITS is given), or the triton layer step replaying its CUDA graph.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <memory>
#include <numeric>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "bench_report.h"
#include "command_line.h"
#include "copy_bandwidth.h"
#include "mqa/core/block_pool.h"
#include "mqa/core/device.h"
#include "mqa/core/mqa_layer.h"
#include "paged/paged_layer.h"
#include "paged_mqa.h"

namespace {

using mqa::core::AttnImpl;
using mqa::core::BlockPool;
using mqa::core::BlockTable;
using mqa::core::MqaOptions;
using mqa::core::MultiQueryAttention;
using mqa::core::PagedSeq;

using mqa::bench::JsonNumber;

// Median over `repeats` of the mean time per call of `iters` back-to-back calls, in ms (CUDA events on the
// current stream, after warm-up calls).
double TimeMs(const std::function<void()>& fn, int iters, int repeats = 5) {
  for (int i = 0; i < 3; ++i) fn();
  std::vector<double> ms;
  for (int r = 0; r < repeats; ++r) {
    at::cuda::CUDAEvent start(cudaEventDefault), stop(cudaEventDefault);
    start.record();
    for (int i = 0; i < iters; ++i) fn();
    stop.record();
    stop.synchronize();
    ms.push_back(start.elapsed_time(stop) / iters);
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

// GPU time per call without the host's launch overhead: `iters` calls captured into one CUDA graph, the
// median of `repeats` replays divided by iters. Kernel-to-kernel comparisons use this, so that a slow host
// (LibTorch's dispatch costs microseconds per operator) does not hide the kernels' own speed.
double GraphTimeMs(const std::function<void()>& fn, int iters, int repeats = 5) {
  for (int i = 0; i < 2; ++i) fn();
  at::cuda::CUDAGraph graph;
  graph.capture_begin();
  for (int i = 0; i < iters; ++i) fn();
  graph.capture_end();
  graph.replay();
  std::vector<double> ms;
  for (int r = 0; r < repeats; ++r) {
    at::cuda::CUDAEvent start(cudaEventDefault), stop(cudaEventDefault);
    start.record();
    graph.replay();
    stop.record();
    stop.synchronize();
    ms.push_back(start.elapsed_time(stop) / iters);
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

struct Json {
  std::ostringstream rows;
  int n = 0;
  void Row(const std::string& body) { rows << (n++ ? ",\n  " : "\n  ") << "{" << body << "}"; }
};

std::string Fmt(const char* f, double v) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), f, v);
  return buf;
}

// A paged cache holding B sessions of L tokens in shuffled blocks (block 0 reserved), filled with random values.
struct PagedCache {
  int32_t bs = 16;
  at::Tensor k, v, tables, lens;  // [slots, D], [slots, D], int32 [B, nb] (device), int32 [B] (device)
  int64_t nb = 0;
  PagedCache(int64_t B, int64_t L, int64_t D, std::mt19937_64& rng) {
    nb = (L + bs - 1) / bs;
    const int64_t blocks = B * nb + 1;
    std::vector<int32_t> ids(static_cast<size_t>(blocks - 1));
    std::iota(ids.begin(), ids.end(), 1);
    std::shuffle(ids.begin(), ids.end(), rng);
    const auto o = at::TensorOptions().device(at::kCUDA).dtype(at::kBFloat16);
    k = at::randn({blocks * bs, D}, o);
    v = at::randn({blocks * bs, D}, o);
    tables = at::from_blob(ids.data(), {B, nb}, at::kInt).clone().to(at::kCUDA);
    lens = at::full({B}, L, at::TensorOptions().dtype(at::kInt).device(at::kCUDA));
  }
};

// One decode case for the paged kernel: a cache of B sessions x L tokens, random q, the output, a workspace for
// the largest split count, and the kernel's parameters (the split heuristic's count; scale 1/sqrt(D)).
struct DecodeCase {
  PagedCache cache;
  at::Tensor q, out, ws;
  mqa::core::cuda::PagedDecodeParams p;
  DecodeCase(int64_t B, int64_t L, int64_t H, int64_t D, int sms, std::mt19937_64& rng) : cache(B, L, D, rng) {
    const auto o = at::TensorOptions().device(at::kCUDA).dtype(at::kBFloat16);
    q = at::randn({B, H * D}, o);
    out = at::empty({B, H * D}, o);
    p.batch = static_cast<int>(B);
    p.heads = static_cast<int>(H);
    p.head_dim = static_cast<int>(D);
    p.q = q.data_ptr();
    p.q_stride = H * D;
    p.k_cache = cache.k.data_ptr();
    p.v_cache = cache.v.data_ptr();
    p.block_tables = cache.tables.data_ptr<int32_t>();
    p.block_table_stride = static_cast<int>(cache.nb);
    p.seq_lens = cache.lens.data_ptr<int32_t>();
    p.block_size = cache.bs;
    p.scale = 1.0f / std::sqrt(static_cast<float>(D));
    p.out = out.data_ptr();
    p.out_stride = H * D;
    p.num_splits = mqa::core::cuda::PagedDecodeSplits(p.batch, static_cast<int>(L), p.heads, p.head_dim, sms);
    ws = at::empty({static_cast<int64_t>(mqa::core::cuda::PagedDecodeWorkspaceBytes(p.batch, p.heads, p.head_dim,
                                                                                    mqa::core::cuda::kMaxDecodeSplits) /
                                         4) +
                    1},
                   o.dtype(at::kFloat));
    p.workspace = ws.data_ptr<float>();
  }
};

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"mqa-bench-kernels: the project's paged MQA kernels against LibTorch, on one CUDA device",
               "mqa-bench-kernels"};
  mqa::command_line::InitApp(app);
  bool quick = false;
  std::string json_path;
  int64_t H = 32;
  int64_t D = 128;
  int iters = 0;
  std::string profile_decode_text;
  std::string profile_layer_text;
  std::string batches_text, lengths_text;
  bool layer_only = false;
  app.add_option("--json", json_path, "also write the results as JSON to FILE")->type_name("FILE");
  mqa::command_line::AddInt(app, "--heads", &H, 1, "query heads")->capture_default_str();
  mqa::command_line::AddInt(app, "--head-dim", &D, 1, "head dimension")->capture_default_str();
  CLI::Option* iters_flag =
      mqa::command_line::AddInt(app, "--iters", &iters, 1, "calls per timing (default: 20, 5 with --quick)");
  app.add_flag("--quick", quick, "fewer cases and iterations, for a smoke run");
  mqa::command_line::AddIntList(app, "--batches", &batches_text, 1, "the sessions per step B (default: 1,8,64,256)")
      ->type_name("B,...");
  mqa::command_line::AddIntList(app, "--lengths", &lengths_text, 1, "the cached tokens L (default: 1024,8192)")
      ->type_name("L,...");
  app.add_flag("--layer-only", layer_only,
               "only the layer step (part 2): the bound an engine benchmark prints beside its own figures");
  mqa::command_line::AddIntList(app, "--profile-decode", &profile_decode_text, 1,
                                "run the decode kernel on B sessions x L tokens (SPLITS: its split count) a few times "
                                "and exit, for a profiler")
      ->type_name("B,L[,SPLITS]");
  mqa::command_line::AddIntList(app, "--profile-layer", &profile_layer_text, 1,
                                "run the triton layer step of B sessions x L tokens (a CUDA graph replay) and exit, "
                                "for a profiler")
      ->type_name("B,L");
  if (std::optional<int> exit_code = mqa::command_line::Parse(app, argc, argv)) return *exit_code;
  if (iters_flag->count() == 0) iters = quick ? 5 : 20;
  const std::vector<int64_t> profile_decode = mqa::command_line::IntList(profile_decode_text);
  const std::vector<int64_t> profile_layer = mqa::command_line::IntList(profile_layer_text);
  const bool profiling = !profile_decode.empty() || !profile_layer.empty();
  if ((!profile_decode.empty() && profile_decode.size() > 3) || profile_decode.size() == 1 ||
      (!profile_layer.empty() && profile_layer.size() != 2)) {
    std::fprintf(stderr, "mqa-bench-kernels: --profile-decode B,L[,SPLITS] and --profile-layer B,L\n");
    return 2;
  }
  if (!mqa::core::CudaAvailable()) {
    std::fprintf(stderr, "mqa-bench-kernels: needs a CUDA device\n");
    return 1;
  }
  c10::cuda::CUDAStreamGuard stream_guard(c10::cuda::getStreamFromPool());  // graphs need a side stream
  std::mt19937_64 rng(1234);
  at::manual_seed(1234);

  const std::string card = mqa::core::DeviceName("cuda:0");
  const double copy_gbps = profiling ? 1.0 : mqa::core::MeasureCopyBandwidth("cuda:0", size_t{2} << 30, 20).value();
  int sms = 0;
  mqa::core::cuda::SmCount(0, &sms);
  std::printf("mqa-bench-kernels: %s, %d SMs, measured copy bandwidth %.1f GB/s (read + write)\n", card.c_str(), sms,
              copy_gbps);
  Json json;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  std::vector<int64_t> Bs = quick ? std::vector<int64_t>{1, 8} : std::vector<int64_t>{1, 8, 64, 256};
  std::vector<int64_t> Ls = quick ? std::vector<int64_t>{1024} : std::vector<int64_t>{1024, 8192};
  if (!batches_text.empty()) Bs = mqa::command_line::IntList(batches_text);
  if (!lengths_text.empty()) Ls = mqa::command_line::IntList(lengths_text);
  if (!profile_decode.empty()) {
    DecodeCase c(profile_decode[0], profile_decode[1], H, D, sms, rng);
    mqa::core::cuda::PagedDecodeParams& p = c.p;
    const int64_t B = profile_decode[0];
    if (profile_decode.size() > 2) p.num_splits = static_cast<int>(profile_decode[2]);
    for (int i = 0; i < 3; ++i) {
      const int err = mqa::core::cuda::PagedDecode(p, at::cuda::getCurrentCUDAStream().stream());
      if (err != 0) {
        std::fprintf(stderr, "PagedDecode failed: %d\n", err);
        return 1;
      }
    }
    at::cuda::getCurrentCUDAStream().synchronize();
    std::printf("profiled decode B=%lld L=%lld splits %d\n", static_cast<long long>(B),
                static_cast<long long>(profile_decode[1]), p.num_splits);
    return 0;
  }
  if (!profile_layer.empty()) {  // only the layer section, one case, no baselines
    Bs = {profile_layer[0]};
    Ls = {profile_layer[1]};
  }

  // ---- 1. decode attention alone ----
  // The smallest kernel LibTorch launches (a one-element fill), timed the same way: the per-call floor that
  // launch and completion put under every kernel below, whatever it reads.
  if (!profiling) {
    at::Tensor one = at::empty({1}, at::TensorOptions().device(at::kCUDA).dtype(at::kFloat));
    const double ms = GraphTimeMs([&] { one.fill_(1.0f); }, iters);
    std::printf("\none-element fill kernel in a CUDA graph (launch floor per call): %.1f us\n", ms * 1e3);
    json.Row("\"part\":\"launch_floor\",\"impl\":\"fill 1 element\",\"us\":" + JsonNumber(ms * 1e3));
  }
  std::printf(
      "\n== decode attention, bf16, H=%lld query heads, one K/V head, head_dim %lld, block size 16"
      " (GPU time: each timed inside a CUDA graph) ==\n",
      static_cast<long long>(H), static_cast<long long>(D));
  std::printf("%5s %6s %10s | %-28s %10s %9s %7s %9s\n", "B", "L", "KV MB", "implementation", "time us", "GB/s",
              "% copy", "vs ours");
  for (int64_t L : profiling || layer_only ? std::vector<int64_t>{} : Ls) {
    for (int64_t B : Bs) {
      DecodeCase c(B, L, H, D, sms, rng);
      const PagedCache& cache = c.cache;
      const at::Tensor& q = c.q;
      const at::Tensor& out = c.out;
      mqa::core::cuda::PagedDecodeParams& p = c.p;
      const double kv_bytes = 2.0 * B * L * D * 2;
      const double read_bytes = kv_bytes + 2.0 * B * H * D * 2;  // + q in, out out
      const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
      std::vector<std::pair<std::string, double>> results;
      results.emplace_back("paged kernel (splits " + std::to_string(p.num_splits) + ")",
                           GraphTimeMs([&] { mqa::core::cuda::PagedDecode(p, stream); }, iters));
      // Contiguous copies of the same K/V for LibTorch's kernels.
      const at::Tensor slots = (cache.tables.to(at::kLong).unsqueeze(-1) * cache.bs +
                                at::arange(cache.bs, at::TensorOptions().dtype(at::kLong).device(at::kCUDA)))
                                   .view({B, -1})
                                   .narrow(1, 0, L);
      const at::Tensor kc = cache.k.index_select(0, slots.reshape(-1)).view({B, 1, L, D});
      const at::Tensor vc = cache.v.index_select(0, slots.reshape(-1)).view({B, 1, L, D});
      const at::Tensor q4 = q.view({B, H, 1, D});
      at::Tensor want = at::scaled_dot_product_attention(q4, kc, vc, {}, 0.0, false, scale, true);
      const double err =
          ((out.view({B, H, 1, D}).to(at::kFloat) - want.to(at::kFloat)).norm() / want.to(at::kFloat).norm())
              .item<double>();
      results.emplace_back(
          "sdpa grouped (enable_gqa)",
          GraphTimeMs([&] { (void)at::scaled_dot_product_attention(q4, kc, vc, {}, 0.0, false, scale, true); }, iters));
      results.emplace_back(
          "sdpa heads folded into rows",
          GraphTimeMs(
              [&] {
                (void)at::scaled_dot_product_attention(q.view({B, 1, H, D}), kc, vc, {}, 0.0, false, scale);
              },
              iters));
      results.emplace_back("unfused matmul-softmax-matmul",
                           GraphTimeMs(
                               [&] {
                                 at::Tensor s = at::bmm(q.view({B, H, D}), kc.view({B, L, D}).transpose(1, 2)) * scale;
                                 (void)at::bmm(at::softmax(s, -1), vc.view({B, L, D}));
                               },
                               iters));
      results.emplace_back("torch paged path (gather+unfused)",
                           GraphTimeMs(
                               [&] {
                                 const at::Tensor kg = cache.k.index_select(0, slots.reshape(-1)).view({B, L, D});
                                 const at::Tensor vg = cache.v.index_select(0, slots.reshape(-1)).view({B, L, D});
                                 at::Tensor s = at::bmm(q.view({B, H, D}), kg.transpose(1, 2)) * scale;
                                 (void)at::bmm(at::softmax(s, -1), vg);
                               },
                               iters));
      const double ours = results[0].second;
      for (const auto& [name, ms] : results) {
        const double gbps = read_bytes / (ms * 1e-3) / 1e9;
        std::printf("%5lld %6lld %10.1f | %-28s %10.1f %9.0f %6.1f%% %8.2fx\n", static_cast<long long>(B),
                    static_cast<long long>(L), kv_bytes / 1e6, name.c_str(), ms * 1e3, gbps, 100.0 * gbps / copy_gbps,
                    ms / ours);
        json.Row("\"part\":\"decode_attention\",\"B\":" + std::to_string(B) + ",\"L\":" + std::to_string(L) +
                 ",\"impl\":\"" + name + "\",\"us\":" + JsonNumber(ms * 1e3) + ",\"gbps\":" + JsonNumber(gbps) +
                 ",\"pct_copy\":" + JsonNumber(100.0 * gbps / copy_gbps) + ",\"vs_ours\":" + JsonNumber(ms / ours) +
                 ",\"max_rel_err_vs_sdpa\":" + JsonNumber(err));
      }
      std::printf("%5s %6s %10s | relative error of ours vs sdpa: %.2e\n", "", "", "", err);
      // The split heuristic against every split count (each timed the same way), to show what it leaves.
      std::string sweep;
      const int heuristic = p.num_splits;
      for (int sp = 1; sp <= mqa::core::cuda::kMaxDecodeSplits && sp <= (L + 63) / 64; sp *= 2) {
        p.num_splits = sp;
        const double ms = GraphTimeMs([&] { mqa::core::cuda::PagedDecode(p, stream); }, iters, 3);
        sweep += " " + std::to_string(sp) + ":" + Fmt("%.1f", ms * 1e3);
        json.Row("\"part\":\"split_sweep\",\"B\":" + std::to_string(B) + ",\"L\":" + std::to_string(L) +
                 ",\"splits\":" + std::to_string(sp) + ",\"us\":" + JsonNumber(ms * 1e3));
      }
      p.num_splits = heuristic;
      std::printf("%5s %6s %10s | splits:us%s\n", "", "", "", sweep.c_str());
    }
  }

  // ---- 2. the whole layer step ----
  const int64_t dim = H * D;
  std::printf(
      "\n== layer step (QKV GEMM, KV append, attention, output GEMM), bf16, dim %lld, through PagedForward"
      " with its host work (wall time per step, back to back) ==\n",
      static_cast<long long>(dim));
  std::printf("%5s %6s %10s | %-24s %10s %9s %9s\n", "B", "L", "floor us", "implementation", "time us", "x floor",
              "vs graph");
  MqaOptions mo;
  mo.dim = dim;
  mo.heads = H;
  mo.device = "cuda";
  mo.dtype = mqa::core::DType::kBFloat16;
  mo.attn_impl = AttnImpl::kTriton;
  mo.seed = 1;
  auto graphed = std::move(MultiQueryAttention::Create(mo)).value();
  mo.cuda_graphs = false;
  auto eager = std::move(MultiQueryAttention::Create(mo)).value();
  mo.attn_impl = AttnImpl::kTorch;
  auto torch_layer = std::move(MultiQueryAttention::Create(mo)).value();
  const double weight_bytes =
      (static_cast<double>(dim) * (dim + 2 * D) + dim + static_cast<double>(dim) * dim + dim) * 2;
  uint64_t graph_captures = 0, graph_replays = 0;  // of the graphed layer, all shapes
  for (int64_t L : Ls) {
    for (int64_t B : Bs) {
      const int32_t bs = 16;
      const int64_t per = (L + bs) / bs + 1;
      BlockPool pool(static_cast<int32_t>(B * per + 1), bs);
      {
        std::vector<int32_t> all;
        (void)pool.Allocate(pool.capacity(), &all);
        std::shuffle(all.begin(), all.end(), rng);
        pool.Release(&all);
      }
      const auto o = at::TensorOptions().device(at::kCUDA).dtype(at::kBFloat16);
      at::Tensor kc = at::randn({int64_t{pool.num_blocks()} * bs, D}, o), vc = at::randn_like(kc);
      kc.narrow(0, 0, bs).zero_();
      vc.narrow(0, 0, bs).zero_();
      std::vector<std::unique_ptr<BlockTable>> tables;
      std::vector<PagedSeq> seqs;
      for (int64_t b = 0; b < B; ++b) {
        tables.push_back(std::make_unique<BlockTable>(&pool));
        (void)tables.back()->EnsureCapacity(L);
        seqs.push_back(PagedSeq{b, 1, L - 1, tables.back().get(), true, false});
      }
      const at::Tensor x = at::randn({B, dim}, o);
      const double floor_ms =
          (weight_bytes + 2.0 * B * L * D * 2 + 2.0 * B * dim * 2) / (copy_gbps * 1e9) * 1e3;  // read-only floor
      std::vector<std::pair<std::string, double>> results;
      // Each layer's paged execution over the same caches (a fresh one per shape: its graphs are its own).
      mqa::core::PagedLayer graphed_paged(*graphed, kc, vc), eager_paged(*eager, kc, vc),
          torch_paged(*torch_layer, kc, vc);
      auto step = [&](mqa::core::PagedLayer& layer) { return [&] { (void)layer.Forward(x, seqs, bs); }; };
      if (profiling) {  // a few graph replays for the profiler, nothing printed
        for (int i = 0; i < 5; ++i) step(graphed_paged)();
        at::cuda::getCurrentCUDAStream().synchronize();
        std::printf("profiled layer step B=%lld L=%lld (graph replays %llu)\n", static_cast<long long>(B),
                    static_cast<long long>(L), static_cast<unsigned long long>(graphed_paged.counters().graph_replays));
        return 0;
      }
      results.emplace_back("triton, CUDA graph", TimeMs(step(graphed_paged), iters));
      results.emplace_back("triton, eager", TimeMs(step(eager_paged), iters));
      results.emplace_back("torch path", TimeMs(step(torch_paged), std::max(2, iters / 4), 3));
      const double g = results[0].second;
      graph_captures += graphed_paged.counters().graph_captures;
      graph_replays += graphed_paged.counters().graph_replays;
      for (const auto& [name, ms] : results) {
        std::printf("%5lld %6lld %10.1f | %-24s %10.1f %8.2fx %8.2fx\n", static_cast<long long>(B),
                    static_cast<long long>(L), floor_ms * 1e3, name.c_str(), ms * 1e3, ms / floor_ms, ms / g);
        json.Row("\"part\":\"layer_step\",\"B\":" + std::to_string(B) + ",\"L\":" + std::to_string(L) + ",\"impl\":\"" +
                 name + "\",\"us\":" + JsonNumber(ms * 1e3) + ",\"floor_us\":" + JsonNumber(floor_ms * 1e3) +
                 ",\"x_floor\":" + JsonNumber(ms / floor_ms));
      }
    }
  }
  std::printf("\ngraph captures %llu, replays %llu (triton graph layer)\n",
              static_cast<unsigned long long>(graph_captures), static_cast<unsigned long long>(graph_replays));
  if (!json_path.empty()) {
    std::ofstream out(json_path);
    out << "{\"bench\":\"kernels\",\"card\":\"" << card << "\",\"sms\":" << sms << ",\"copy_gbps\":" << copy_gbps
        << ",\"heads\":" << H << ",\"head_dim\":" << D << ",\"rows\":[" << json.rows.str() << "\n]}\n";
    std::printf("wrote %s\n", json_path.c_str());
  }
  return 0;
}
