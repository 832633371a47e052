// The project's CUDA kernels (core/cuda/paged_mqa.h) on the GPU, against fp32 references computed with LibTorch
// from the same 16-bit values, and the paged pass of attn_impl triton against the torch path in fp32. Needs a
// CUDA device: without one every test skips (CI compiles this file; the GPU machine runs it, also under
// compute-sanitizer for the small case). Also CatchAll's mapping of exceptions to statuses, which runs everywhere.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "copy_bandwidth.h"
#include "mqa/core/block_pool.h"
#include "mqa/core/device.h"
#include "mqa/core/mqa_layer.h"
#include "paged/paged_layer.h"
#include "paged_mqa.h"
#include "tensor_impl.h"
#include "test_util.h"

namespace mqa::core {
namespace {

// The suite's run seed (printed once; MQA_TEST_SEED replays it), shared with the other C++ tests.
uint64_t Seed() { return ::mqa::testing::RunSeed(); }

#define REQUIRE_CUDA() \
  if (!CudaAvailable()) GTEST_SKIP() << "no CUDA device"

double RelErr(const at::Tensor& got, const at::Tensor& want) {
  const at::Tensor g = got.to(at::kDouble).cpu(), w = want.to(at::kDouble).cpu();
  return ((g - w).norm() / w.norm().clamp_min(1e-30)).item<double>();
}

struct DecodeCase {
  at::ScalarType dtype;
  int heads, head_dim, block_size;
  std::vector<int> lens;
  int splits;   // 0: the heuristic
  bool alibi;   // on every other session
  float scale;  // 0: 1 / sqrt(head_dim)
};

// Runs PagedDecode on a pool whose blocks are handed out in a random order (non-contiguous, shuffled tables);
// every slot no session owns, and every slot past a session's length inside its last block, holds NaN, so a
// kernel that reads one shows it. Returns max relative error over sessions against the fp32 reference.
double RunDecodeCase(const DecodeCase& c, std::mt19937_64& rng) {
  const int B = static_cast<int>(c.lens.size()), H = c.heads, D = c.head_dim, bs = c.block_size;
  const auto dev = at::TensorOptions().device(at::kCUDA);
  int max_len = 0, total_blocks = 0;
  for (int l : c.lens) {
    max_len = std::max(max_len, l);
    total_blocks += (l + bs - 1) / bs;
  }
  const int nb_max = (max_len + bs - 1) / bs;
  const int pool_blocks = total_blocks + 8 + 1;
  std::vector<int32_t> ids(static_cast<size_t>(pool_blocks - 1));
  std::iota(ids.begin(), ids.end(), 1);
  std::shuffle(ids.begin(), ids.end(), rng);
  at::Tensor k_cache = at::full({int64_t{pool_blocks} * bs, D}, NAN, dev.dtype(c.dtype));
  at::Tensor v_cache = at::full({int64_t{pool_blocks} * bs, D}, NAN, dev.dtype(c.dtype));
  at::Tensor tables = at::zeros({B, nb_max}, at::kInt);
  size_t next = 0;
  at::manual_seed(rng());
  std::vector<at::Tensor> ks, vs;  // each session's keys and values, [len, D]
  for (int b = 0; b < B; ++b) {
    const int len = c.lens[static_cast<size_t>(b)];
    at::Tensor k = at::randn({len, D}, dev.dtype(c.dtype)), v = at::randn({len, D}, dev.dtype(c.dtype));
    std::vector<int64_t> slots;
    for (int i = 0; i < (len + bs - 1) / bs; ++i) tables[b][i] = ids[next++];
    for (int p = 0; p < len; ++p) slots.push_back(int64_t{tables[b][p / bs].item<int32_t>()} * bs + p % bs);
    const at::Tensor idx = at::tensor(slots, at::kLong).to(at::kCUDA);
    k_cache.index_copy_(0, idx, k);
    v_cache.index_copy_(0, idx, v);
    ks.push_back(k);
    vs.push_back(v);
  }
  // q rows with a stride wider than H * D, as when read in place from the QKV projection's output.
  const int64_t q_stride = int64_t{H} * D + 2 * D;
  at::Tensor q_buf = at::randn({B, q_stride}, dev.dtype(c.dtype));
  at::Tensor q = q_buf.narrow(1, 0, int64_t{H} * D);
  at::Tensor lens = at::tensor(std::vector<int32_t>(c.lens.begin(), c.lens.end()), at::kInt).to(at::kCUDA);
  std::vector<int32_t> on(static_cast<size_t>(B));
  for (int b = 0; b < B; ++b) on[static_cast<size_t>(b)] = c.alibi && b % 2 == 0;
  at::Tensor alibi_on = at::tensor(on, at::kInt).to(at::kCUDA);
  const std::vector<float> slope_vec = AlibiSlopes(H);
  at::Tensor slopes = at::tensor(slope_vec, at::kFloat).to(at::kCUDA);
  at::Tensor tables_dev = tables.to(at::kCUDA);
  const float scale = c.scale != 0 ? c.scale : 1.0f / std::sqrt(static_cast<float>(D));

  cuda::PagedDecodeParams p;
  p.dtype = c.dtype == at::kBFloat16 ? cuda::KvType::kBFloat16 : cuda::KvType::kFloat16;
  p.batch = B;
  p.heads = H;
  p.head_dim = D;
  p.q = q.data_ptr();
  p.q_stride = q_stride;
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.block_tables = tables_dev.data_ptr<int32_t>();
  p.block_table_stride = nb_max;
  p.seq_lens = lens.data_ptr<int32_t>();
  p.block_size = bs;
  p.scale = scale;
  if (c.alibi) {
    p.alibi_slopes = slopes.data_ptr<float>();
    p.alibi_on = alibi_on.data_ptr<int32_t>();
  }
  at::Tensor out = at::full({B, H * D}, NAN, dev.dtype(c.dtype));
  p.out = out.data_ptr();
  p.out_stride = H * D;
  int sms = 0;
  EXPECT_EQ(cuda::SmCount(0, &sms), 0);
  p.num_splits = c.splits > 0 ? c.splits : cuda::PagedDecodeSplits(B, max_len, H, D, sms);
  at::Tensor ws = at::empty({static_cast<int64_t>(cuda::PagedDecodeWorkspaceBytes(B, H, D, p.num_splits) / 4) + 1},
                            dev.dtype(at::kFloat));
  p.workspace = ws.data_ptr<float>();
  const int err = cuda::PagedDecode(p, at::cuda::getCurrentCUDAStream().stream());
  EXPECT_EQ(err, 0) << cuda::ErrorString(err);
  double worst = 0;
  for (int b = 0; b < B; ++b) {
    const int len = c.lens[static_cast<size_t>(b)];
    const at::Tensor qb = q[b].to(at::kFloat).view({H, D});
    at::Tensor s = at::matmul(qb, ks[static_cast<size_t>(b)].to(at::kFloat).t()) * scale;  // [H, len]
    if (on[static_cast<size_t>(b)]) {
      const at::Tensor rel = at::arange(len, dev.dtype(at::kFloat)) - (len - 1);
      s = s + slopes.view({H, 1}) * rel.view({1, len});
    }
    const at::Tensor want = at::matmul(at::softmax(s, -1), vs[static_cast<size_t>(b)].to(at::kFloat));
    const double e = RelErr(out[b].view({H, D}), want);
    EXPECT_FALSE(std::isnan(e)) << "session " << b << " (len " << len << ") read a slot it does not own";
    worst = std::max(worst, e);
  }
  return worst;
}

double Tolerance(at::ScalarType t) { return t == at::kBFloat16 ? 1.5e-2 : 3e-3; }

TEST(PagedDecodeKernel, LengthsAcrossBlockBoundariesAllShapesAndTypes) {
  REQUIRE_CUDA();
  std::mt19937_64 rng(Seed());
  const std::vector<int> boundary = {1, 15, 16, 17, 1000, 8191};
  for (at::ScalarType dt : {at::kBFloat16, at::kHalf}) {
    for (int D : {64, 128}) {
      for (int H : {8, 12, 32}) {
        for (int splits : {1, 0, 7}) {
          DecodeCase c{dt, H, D, 16, boundary, splits, /*alibi=*/false, 0.f};
          const double e = RunDecodeCase(c, rng);
          EXPECT_LT(e, Tolerance(dt)) << c10::toString(dt) << " D=" << D << " H=" << H << " splits=" << splits;
        }
      }
    }
  }
}

TEST(PagedDecodeKernel, RandomBatchesAlibiScaleAndBlockSizes) {
  REQUIRE_CUDA();
  std::mt19937_64 rng(Seed() + 1);
  for (int trial = 0; trial < 8; ++trial) {
    std::uniform_int_distribution<int> nsess(1, 70), len(1, 3000);
    std::vector<int> lens(static_cast<size_t>(nsess(rng)));
    for (int& l : lens) l = len(rng);
    const at::ScalarType dt = trial % 2 ? at::kHalf : at::kBFloat16;
    const int D = trial % 4 < 2 ? 128 : 64;
    const int H = std::vector<int>{32, 4, 16, 64}[static_cast<size_t>(trial % 4)];
    const int bs = std::vector<int>{16, 5, 32, 1}[static_cast<size_t>(trial / 2 % 4)];
    DecodeCase c{dt, H, D, bs, lens, trial % 3 == 0 ? 1 : 0, /*alibi=*/true, trial % 2 ? 0.3f : 0.f};
    const double e = RunDecodeCase(c, rng);
    EXPECT_LT(e, Tolerance(dt)) << "trial " << trial << " B=" << lens.size() << " H=" << H << " D=" << D
                                << " block_size=" << bs;
  }
}

TEST(PagedDecodeKernel, SmallCaseForSanitizer) {
  REQUIRE_CUDA();
  std::mt19937_64 rng(Seed() + 2);
  DecodeCase c{at::kBFloat16, 12, 64, 16, {1, 17, 40}, 3, /*alibi=*/true, 0.f};
  EXPECT_LT(RunDecodeCase(c, rng), Tolerance(c.dtype));
  c.splits = 1;
  c.head_dim = 128;
  EXPECT_LT(RunDecodeCase(c, rng), Tolerance(c.dtype));
}

TEST(PagedDecodeKernel, RefusesShapesItIsNotBuiltFor) {
  EXPECT_FALSE(cuda::PagedDecodeSupports(8, 96));
  EXPECT_FALSE(cuda::PagedDecodeSupports(128, 128));
  EXPECT_TRUE(cuda::PagedDecodeSupports(64, 128));
  cuda::PagedDecodeParams p;
  p.heads = 8;
  p.head_dim = 96;
  EXPECT_NE(cuda::PagedDecode(p, nullptr), 0);
  p.head_dim = 64;
  p.num_splits = 4;  // no workspace
  EXPECT_NE(cuda::PagedDecode(p, nullptr), 0);
}

TEST(KvAppendKernel, WritesEachRowToItsSlotFromStridedRows) {
  REQUIRE_CUDA();
  std::mt19937_64 rng(Seed() + 3);
  for (at::ScalarType dt : {at::kBFloat16, at::kHalf}) {
    for (int D : {64, 128}) {
      const int T = 300, slots_total = 1024;
      const auto o = at::TensorOptions().device(at::kCUDA).dtype(dt);
      at::manual_seed(rng());
      at::Tensor qkv = at::randn({T, 8 * D + 2 * D}, o);
      at::Tensor k = qkv.narrow(1, 8 * D, D), v = qkv.narrow(1, 9 * D, D);
      std::vector<int64_t> slots(slots_total);
      std::iota(slots.begin(), slots.end(), 0);
      std::shuffle(slots.begin(), slots.end(), rng);
      slots.resize(T);
      at::Tensor idx = at::tensor(slots, at::kLong).to(at::kCUDA);
      at::Tensor kc = at::zeros({slots_total, D}, o), vc = at::zeros({slots_total, D}, o);
      ASSERT_EQ(cuda::KvAppend(dt == at::kBFloat16 ? cuda::KvType::kBFloat16 : cuda::KvType::kFloat16, T, D,
                               k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), idx.data_ptr<int64_t>(),
                               kc.data_ptr(), vc.data_ptr(), at::cuda::getCurrentCUDAStream().stream()),
                0);
      at::Tensor kw = at::zeros_like(kc), vw = at::zeros_like(vc);
      kw.index_copy_(0, idx, k.contiguous());
      vw.index_copy_(0, idx, v.contiguous());
      EXPECT_TRUE(at::equal(kc, kw));
      EXPECT_TRUE(at::equal(vc, vw));
    }
  }
}

// The whole paged pass with attn_impl triton (append kernel, decode kernel, varlen flash prefill) against the
// torch path on the same weights and cache in fp32: mixed batches of decode tokens and prefill chunks with past,
// causal and not, with and without ALiBi, on block tables handed out in a shuffled order.
TEST(PagedForwardTriton, MixedPassesMatchTheTorchPathInFp32) {
  REQUIRE_CUDA();
  std::mt19937_64 rng(Seed() + 4);
  // Variants 3 and 4: non-positive scales, which flash's prefill kernel got wrong where it masks (0 * -inf).
  for (int variant = 0; variant < 5; ++variant) {
    const int64_t H = variant == 1 || variant >= 3 ? 8 : 32, D = variant == 1 || variant >= 3 ? 64 : 128;
    const at::ScalarType dt = variant == 2 ? at::kHalf : at::kBFloat16;
    MqaOptions o;
    o.dim = H * D;
    o.heads = H;
    o.device = "cuda";
    o.dtype = dt == at::kBFloat16 ? DType::kBFloat16 : DType::kFloat16;
    o.attn_impl = AttnImpl::kTriton;
    o.seed = rng();
    if (variant == 1) o.softmax_scale = 0.05;
    if (variant == 3) o.softmax_scale = 0.0;
    if (variant == 4) o.softmax_scale = -0.25;
    auto fast = std::move(MultiQueryAttention::Create(o)).value();
    MqaOptions ro = o;
    ro.dtype = DType::kFloat32;
    ro.attn_impl = AttnImpl::kTorch;
    auto ref = std::move(MultiQueryAttention::Create(ro)).value();
    ASSERT_TRUE(ref->LoadStateDict([&] {
                     TensorMap m = fast->StateDict();
                     for (auto& [name, t] : m) t = Wrap(Unwrap(t).to(at::kFloat));
                     return m;
                   }())
                    .ok());

    const int32_t bs = 16;
    BlockPool pool(4096, bs);
    {  // hand blocks out in a shuffled order
      std::vector<int32_t> all;
      ASSERT_TRUE(pool.Allocate(pool.capacity(), &all).ok());
      std::shuffle(all.begin(), all.end(), rng);
      pool.Release(&all);
    }
    const auto co = at::TensorOptions().device(at::kCUDA);
    at::Tensor kc = at::zeros({4096 * bs, D}, co.dtype(dt)), vc = at::zeros_like(kc);
    // (past, tokens, causal, alibi): decode tokens at boundary lengths, and prefill chunks with past.
    const std::vector<std::tuple<int64_t, int64_t, bool, bool>> shape = {
        {0, 1, true, false},   {14, 1, true, true},   {15, 1, true, false}, {16, 1, false, true},
        {999, 1, true, false}, {8190, 1, true, true}, {0, 37, true, false}, {20, 17, true, true},
        {5, 64, false, false}, {100, 3, false, true}, {0, 16, true, true},  {47, 200, true, false}};
    std::vector<std::unique_ptr<BlockTable>> tables;
    std::vector<PagedSeq> seqs;
    int64_t T = 0;
    at::manual_seed(rng());
    for (const auto& [past, tokens, causal, alibi] : shape) {
      auto table = std::make_unique<BlockTable>(&pool);
      ASSERT_TRUE(table->EnsureCapacity(past + tokens).ok());
      if (past > 0) {  // random past K/V in the 16-bit type
        std::vector<int64_t> sl;
        for (int64_t p = 0; p < past; ++p) sl.push_back(table->Slot(p));
        const at::Tensor idx = at::tensor(sl, at::kLong).to(at::kCUDA);
        kc.index_copy_(0, idx, at::randn({past, D}, co.dtype(dt)));
        vc.index_copy_(0, idx, at::randn({past, D}, co.dtype(dt)));
      }
      seqs.push_back(PagedSeq{T, tokens, past, table.get(), causal, alibi});
      T += tokens;
      tables.push_back(std::move(table));
    }
    // Rows interleave decode tokens and chunks, so the decode rows are not 0..B-1 (the gathered path); a second
    // pass of decode tokens only, in row order, takes the in-place path.
    const at::Tensor x = at::randn({T, H * D}, co.dtype(dt)) * 0.5;
    at::Tensor kc32 = kc.to(at::kFloat), vc32 = vc.to(at::kFloat);
    PagedLayer fast_paged(*fast, kc, vc), ref_paged(*ref, kc32, vc32);
    auto got = fast_paged.Forward(x, seqs, bs);
    ASSERT_TRUE(got.ok()) << got.status().ToString();
    auto want = ref_paged.Forward(x.to(at::kFloat), seqs, bs);
    ASSERT_TRUE(want.ok()) << want.status().ToString();
    // Only prefill chunks with ALiBi leave the fused path (LibTorch's flash build has no ALiBi), each counted.
    uint64_t alibi_chunks = 0;
    for (const PagedSeq& s : seqs) alibi_chunks += s.alibi && s.tokens > 1;
    EXPECT_EQ(fast_paged.counters().fallbacks_to_torch, alibi_chunks);
    for (const PagedSeq& s : seqs) {
      const double e = RelErr(got->narrow(0, s.row, s.tokens), want->narrow(0, s.row, s.tokens));
      EXPECT_LT(e, 3e-2) << "variant " << variant << " past " << s.past << " tokens " << s.tokens << " causal "
                         << s.causal << " alibi " << s.alibi;
    }
    // The appended K/V equal the fp32 path's (rounded to the 16-bit type).
    EXPECT_LT(RelErr(kc, kc32), 1e-2);

    std::vector<PagedSeq> dec;
    int64_t row = 0;
    for (PagedSeq s : seqs) {
      s.past += s.tokens;
      s.tokens = 1;
      s.row = row++;
      ASSERT_TRUE(const_cast<BlockTable*>(s.table)->EnsureCapacity(s.past + 1).ok());
      dec.push_back(s);
    }
    const at::Tensor xd = at::randn({row, H * D}, co.dtype(dt));
    auto got_d = fast_paged.Forward(xd, dec, bs);
    ASSERT_TRUE(got_d.ok()) << got_d.status().ToString();
    auto want_d = ref_paged.Forward(xd.to(at::kFloat), dec, bs);
    ASSERT_TRUE(want_d.ok());
    EXPECT_LT(RelErr(*got_d, *want_d), 3e-2) << "variant " << variant << " decode-only pass";
  }
}

// Decode passes replayed from captured CUDA graphs equal the same passes launched eagerly, across batch buckets
// (padding rows must append nothing and leave block 0 zero) and table widths (lengths growing past 16 blocks).
TEST(PagedForwardTriton, GraphReplaysEqualEagerPasses) {
  REQUIRE_CUDA();
  std::mt19937_64 rng(Seed() + 5);
  c10::cuda::CUDAStreamGuard stream_guard(c10::cuda::getStreamFromPool());  // capture needs a side stream
  MqaOptions o;
  o.dim = 1024;
  o.heads = 16;  // head_dim 64
  o.device = "cuda";
  o.dtype = DType::kBFloat16;
  o.attn_impl = AttnImpl::kTriton;
  o.seed = rng();
  auto graphed = std::move(MultiQueryAttention::Create(o)).value();
  o.cuda_graphs = false;
  auto eager = std::move(MultiQueryAttention::Create(o)).value();
  const int32_t bs = 8;
  BlockPool pool(2048, bs);
  const auto co = at::TensorOptions().device(at::kCUDA).dtype(at::kBFloat16);
  at::Tensor kc_g = at::zeros({2048 * bs, 64}, co), vc_g = at::zeros_like(kc_g);
  at::Tensor kc_e = at::zeros_like(kc_g), vc_e = at::zeros_like(kc_g);
  PagedLayer graphed_paged(*graphed, kc_g, vc_g), eager_paged(*eager, kc_e, vc_e);
  std::vector<std::unique_ptr<BlockTable>> tables;
  std::vector<int64_t> lens;
  at::manual_seed(rng());
  for (int b = 0; b < 19; ++b) {
    tables.push_back(std::make_unique<BlockTable>(&pool));
    lens.push_back(100 + 9 * b);  // 100..262: 13..33 blocks of 8, so widths 16, 32 and 64 all occur
  }
  // Steps with 19, 5, 1 and 19 sessions again (buckets 32, 8, 1, 32), several of each so graphs replay.
  const std::vector<int> batches = {19, 19, 5, 5, 1, 1, 19, 19, 5};
  for (size_t step = 0; step < batches.size(); ++step) {
    std::vector<PagedSeq> seqs;
    for (int b = 0; b < batches[step]; ++b) {
      const size_t i = static_cast<size_t>(b);
      ASSERT_TRUE(tables[i]->EnsureCapacity(lens[i] + 1).ok());
      seqs.push_back(PagedSeq{b, 1, lens[i], tables[i].get(), true, b % 3 == 0});
    }
    const at::Tensor x = at::randn({batches[step], 1024}, co);
    auto g = graphed_paged.Forward(x, seqs, bs);
    auto e = eager_paged.Forward(x, seqs, bs);
    ASSERT_TRUE(g.ok() && e.ok()) << g.status().ToString() << " " << e.status().ToString();
    EXPECT_LT(RelErr(*g, *e), 1e-2) << "step " << step << " batch " << batches[step];
    for (int b = 0; b < batches[step]; ++b) ++lens[static_cast<size_t>(b)];
  }
  EXPECT_TRUE(at::equal(kc_g.narrow(0, 0, bs), at::zeros({bs, 64}, co))) << "padding wrote into block 0";
  EXPECT_LT(RelErr(kc_g, kc_e), 1e-2);
  EXPECT_LT(RelErr(vc_g, vc_e), 1e-2);
  const PagedCounters c = graphed_paged.counters();
  EXPECT_GE(c.graph_captures, 3u);
  EXPECT_GE(c.graph_replays, 4u);
  EXPECT_EQ(eager_paged.counters().graph_replays, 0u);
}

TEST(PagedForwardTriton, FallsBackVisiblyWhereTheKernelsCannotServe) {
  // fp32 (any device) and CPU layers compute with the torch path and count it.
  MqaOptions o;
  o.dim = 256;
  o.heads = 4;
  o.attn_impl = AttnImpl::kTriton;
  auto layer = std::move(MultiQueryAttention::Create(o)).value();
  BlockPool pool(8, 4);
  BlockTable table(&pool);
  ASSERT_TRUE(table.EnsureCapacity(3).ok());
  at::Tensor kc = at::zeros({32, 64}), vc = at::zeros({32, 64});
  const at::Tensor x = at::randn({3, 256});
  PagedLayer paged(*layer, kc, vc);
  auto r = paged.Forward(x, {PagedSeq{0, 3, 0, &table, true, false}}, 4);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(paged.counters().fallbacks_to_torch, 1u);
  // Same function as a torch layer of the same weights.
  MqaOptions to = o;
  to.attn_impl = AttnImpl::kTorch;
  auto torch_layer = std::move(MultiQueryAttention::Create(to)).value();
  at::Tensor kc2 = at::zeros({32, 64}), vc2 = at::zeros({32, 64});
  PagedLayer torch_paged(*torch_layer, kc2, vc2);
  auto r2 = torch_paged.Forward(x, {PagedSeq{0, 3, 0, &table, true, false}}, 4);
  ASSERT_TRUE(r2.ok());
  EXPECT_TRUE(at::allclose(*r, *r2));
}

// Exceptions become statuses in CatchAll (tensor_impl.h): running out of memory is RESOURCE_EXHAUSTED, whichever
// allocator reports it and however; everything else stays INTERNAL. Runs everywhere (no GPU needed).
TEST(CatchAll, OutOfMemoryIsResourceExhaustedAndSaysWhatFailed) {
  auto run = [](auto thrower) {
    return CatchAll("Probe", [&]() -> Status {
      thrower();
      return Status();
    });
  };
  const Status cuda = run([] {
    throw c10::OutOfMemoryError({__func__, __FILE__, static_cast<uint32_t>(__LINE__)},
                                "CUDA out of memory. Tried to allocate 20.00 GiB.\nbacktrace line");
  });
  EXPECT_EQ(cuda.code(), StatusCode::kResourceExhausted) << cuda.ToString();
  EXPECT_EQ(cuda.message(), "Probe: out of memory: CUDA out of memory. Tried to allocate 20.00 GiB.");
  const Status host = run([] { throw std::bad_alloc(); });
  EXPECT_EQ(host.code(), StatusCode::kResourceExhausted) << host.ToString();
  EXPECT_NE(host.message().find("Probe: out of memory: a host buffer could not be allocated"), std::string::npos);
  // LibTorch's CPU allocator throws a plain c10::Error (CAFFE_ENFORCE); a real one, from a 2^60-byte buffer.
  const Status cpu = run([] { (void)at::empty({int64_t{1} << 58}, at::kFloat); });
  EXPECT_EQ(cpu.code(), StatusCode::kResourceExhausted) << cpu.ToString();
  EXPECT_NE(cpu.message().find("you tried to allocate 1152921504606846976 bytes"), std::string::npos) << cpu.message();
  const Status other = run([] { TORCH_CHECK(false, "shapes do not match"); });
  EXPECT_EQ(other.code(), StatusCode::kInternal) << other.ToString();
  EXPECT_NE(other.message().find("shapes do not match"), std::string::npos) << other.message();
  const Status plain = run([] { throw std::runtime_error("launch failed"); });
  EXPECT_EQ(plain.code(), StatusCode::kInternal);
  EXPECT_EQ(plain.message(), "Probe: launch failed");
}

}  // namespace
}  // namespace mqa::core
