"""Validate the independent spec reference (spec_mqa.py) against Zeta's published
MultiQueryAttention wherever Zeta runs, and check make_cases.py's output.

Every run draws a fresh seed (shown in the pytest header; MQA_TEST_SEED=N replays).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import pytest
import torch
from safetensors import safe_open

from spec_mqa import NORM_TYPES, SpecMQA, alibi_bias, alibi_slopes
from zeta_loader import load_zeta_mqa

HERE = os.path.dirname(os.path.abspath(__file__))
F32_LIMIT = 1e-6   # spec vs Zeta, float32
BF16_LIMIT = 1e-2  # spec vs Zeta, bfloat16


# ----------------------------------------------------------------------------- helpers
def sub_seed(run_seed: int, tag: str) -> int:
    h = 0
    for ch in f"{run_seed}/{tag}":
        h = (h * 131 + ord(ch)) % (2**31 - 1)
    return h


def rel_err(got: torch.Tensor, ref: torch.Tensor, what: str = "") -> float:
    """||got - ref|| / ||ref|| over non-NaN elements; NaN positions must coincide."""
    assert tuple(got.shape) == tuple(ref.shape), f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert got.dtype == ref.dtype, f"{what}: dtype {got.dtype} != {ref.dtype}"
    if ref.numel() == 0:
        return 0.0
    g, r = got.double(), ref.double()
    if r.is_floating_point():
        nan_g, nan_r = torch.isnan(g), torch.isnan(r)
        assert torch.equal(nan_g, nan_r), f"{what}: NaN positions differ"
        g, r = g[~nan_r], r[~nan_r]
    if r.numel() == 0:
        return 0.0
    den = r.norm().item()
    num = (g - r).norm().item()
    return num / den if den > 0 else num


def zeta_layer(dim, heads, dtype, seed, randomize_norms=True, **kw):
    MQA, _ = load_zeta_mqa()
    torch.manual_seed(seed)
    layer = MQA(dim, heads, attn_impl="torch", **kw)
    if kw.get("qk_ln") and randomize_norms:
        g = torch.Generator().manual_seed(seed + 7)
        with torch.no_grad():
            for name, p in layer.named_parameters():
                if name.startswith(("q_ln", "k_ln")):
                    noise = 0.3 * torch.randn(p.shape, generator=g)
                    p.copy_(1.0 + noise if name.endswith("weight") else noise)
    return layer.to(dtype).eval()


def spec_like(zeta, dtype, **kw) -> SpecMQA:
    return SpecMQA(zeta.dim, zeta.heads, dtype=dtype, params=zeta.state_dict(), **kw)


def quiet_call(layer, *args, **kwargs):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return layer(*args, **kwargs)


# ----------------------------------------------------------------------------- scenarios
@dataclass
class Call:
    s: int
    past: str = "none"  # none | empty | given | chain
    past_len: int = 0
    causal: bool = True
    needs_weights: bool = True
    bias: Optional[Callable] = None  # (b, H, s_q, s_k, g) -> fp32 tensor
    bias_fp32: bool = False
    mask: Optional[Callable] = None  # (b, s_k, g) -> bool [b, s_k]


@dataclass
class Scenario:
    name: str
    calls: List[Call]
    dim: int = 64
    heads: int = 4
    batch: int = 2
    layer_kw: dict = field(default_factory=dict)

    def __str__(self):
        return self.name


def rand_bias(rows, cols, batch=False, heads=True, extra_rows=0, extra_cols=0):
    def build(b, H, s_q, s_k, g):
        r = 1 if rows == 1 else s_q + extra_rows
        c = 1 if cols == 1 else s_k + extra_cols
        return torch.randn(b if batch else 1, H if heads else 1, r, c, generator=g)
    return build


def alibi_zeta(full, max_len):
    def build(b, H, s_q, s_k, g):
        _, zmod = load_zeta_mqa()
        return zmod.build_alibi_bias(H, max_len, full=full, dtype=torch.float32)
    return build


def neg_inf_row(b, H, s_q, s_k, g):
    t = torch.randn(b, H, s_q, s_k, generator=g)
    t[0, 1, 2, :] = float("-inf")
    return t


def pad_mask(b, s_k, g):
    m = torch.rand(b, s_k, generator=g) > 0.3
    m[0, :] = True
    m[-1, :] = False  # a fully masked batch row
    return m


S = "s"
SCENARIOS = [
    Scenario("no_cache", [Call(6)]),
    Scenario("empty_cache", [Call(5, past="empty")]),
    Scenario("given_cache", [Call(5, past="given", past_len=6)]),
    Scenario("chunk3_after_given4", [Call(3, past="given", past_len=4)]),
    Scenario("decode_given_1_5_12", [Call(1, past="given", past_len=n) for n in (1, 5, 12)]),
    Scenario("chain_prefill4_decode_chunk",
             [Call(4, past="empty"), Call(1, past="chain"), Call(1, past="chain"),
              Call(3, past="chain")]),
    Scenario("noncausal", [Call(6, causal=False), Call(3, past="given", past_len=4, causal=False)]),
    Scenario("no_weights", [Call(5, past="empty", needs_weights=False)]),
    Scenario("mask_nocache", [Call(6, mask=pad_mask)], batch=3),
    Scenario("mask_given_cache", [Call(3, past="given", past_len=5, mask=pad_mask)], batch=3),
    Scenario("mask_chain", [Call(5, past="empty", mask=pad_mask), Call(1, past="chain", mask=pad_mask)],
             batch=3),
    Scenario("mask_and_bias", [Call(4, past="given", past_len=3, mask=pad_mask,
                                    bias=rand_bias(1, S))], batch=3),
    Scenario("bias_1_1_1_sk", [Call(4, past="given", past_len=3, bias=rand_bias(1, S, heads=False))]),
    Scenario("bias_1_H_1_sk", [Call(5, bias=rand_bias(1, S))]),
    Scenario("bias_b_H_s_s", [Call(6, bias=rand_bias(S, S, batch=True))]),
    Scenario("bias_1_H_s_1", [Call(5, past="empty", bias=rand_bias(S, 1))]),
    Scenario("bias_oversized", [Call(3, past="given", past_len=4,
                                     bias=rand_bias(S, S, extra_rows=5, extra_cols=7))]),
    Scenario("bias_fp32", [Call(5, past="empty", bias=rand_bias(S, S, extra_cols=2), bias_fp32=True)]),
    Scenario("bias_neg_inf_row", [Call(5, causal=False, bias=neg_inf_row)]),
    Scenario("bias_neg_inf_row_causal", [Call(5, causal=True, bias=neg_inf_row)]),
    Scenario("alibi_causal_h4", [Call(5, past="empty", bias=alibi_zeta(False, 16)),
                                 Call(1, past="chain", bias=alibi_zeta(False, 16)),
                                 Call(3, past="chain", bias=alibi_zeta(False, 16))]),
    Scenario("alibi_causal_h6", [Call(5, past="empty", bias=alibi_zeta(False, 16)),
                                 Call(1, past="chain", bias=alibi_zeta(False, 16))],
             dim=96, heads=6),
    Scenario("alibi_full_h4", [Call(6, past="empty", causal=False, bias=alibi_zeta(True, 16)),
                               Call(2, past="chain", causal=False, bias=alibi_zeta(True, 16))]),
    Scenario("clip_0p1", [Call(6, past="empty")], layer_kw={"clip_qkv": 0.1}),
    Scenario("clip_0", [Call(6, past="empty")], layer_kw={"clip_qkv": 0.0}),
    Scenario("softmax_scale_0p3", [Call(6, past="empty")], layer_kw={"softmax_scale": 0.3}),
    Scenario("softmax_scale_0", [Call(6, past="empty")], layer_kw={"softmax_scale": 0.0}),
    Scenario("qkln_layernornm", [Call(5, past="empty"), Call(2, past="chain")],
             layer_kw={"qk_ln": True, "norm_type": "layernornm"}),
    Scenario("zero_len", [Call(0, needs_weights=False)]),
    Scenario("dim512_h8", [Call(8, past="empty"), Call(1, past="chain")], dim=512, heads=8),
]


def run_scenario(sc: Scenario, dtype, seed, spec_factory=None):
    """Run Zeta and SpecMQA side by side (each chained on its own cache).

    Returns a list of (label, rel_err) per compared tensor."""
    zeta = zeta_layer(sc.dim, sc.heads, torch.float32, seed, **sc.layer_kw).to(dtype)
    if spec_factory is None:
        spec = spec_like(zeta, dtype, **sc.layer_kw)
    else:
        spec = spec_factory(zeta)
    g = torch.Generator().manual_seed(seed + 1)
    d = sc.dim // sc.heads
    caches = {"zeta": None, "spec": None}
    errs = []
    for i, c in enumerate(sc.calls):
        x = torch.randn(sc.batch, c.s, sc.dim, generator=g).to(dtype)
        given = None
        if c.past == "given":
            given = (torch.randn(sc.batch, 1, d, c.past_len, generator=g).to(dtype),
                     torch.randn(sc.batch, 1, c.past_len, d, generator=g).to(dtype))
        s_past = {"none": 0, "empty": 0, "given": c.past_len}.get(c.past)
        if s_past is None:
            s_past = caches["zeta"][0].shape[-1]
        s_k = s_past + c.s
        bias = None
        if c.bias is not None:
            bias = c.bias(sc.batch, sc.heads, c.s, s_k, g)
            bias = bias if c.bias_fp32 else bias.to(dtype)
        mask = c.mask(sc.batch, s_k, g) if c.mask is not None else None
        results = {}
        for who, layer in (("zeta", zeta), ("spec", spec)):
            past = {"none": None, "empty": (), "given": given}.get(c.past, caches[who])
            out, w, cache = quiet_call(layer, x, past_key_value=past, bias=bias, mask=mask,
                                       causal=c.causal, needs_weights=c.needs_weights)
            caches[who] = cache
            results[who] = (out, w, cache)
        (zo, zw, zc), (so, sw, sc_) = results["zeta"], results["spec"]
        errs.append((f"call{i}.out", rel_err(so, zo, f"call{i}.out")))
        assert (zw is None) == (sw is None) == (not c.needs_weights)
        if zw is not None:
            errs.append((f"call{i}.weights", rel_err(sw, zw, f"call{i}.weights")))
        assert (zc is None) == (sc_ is None) == (c.past == "none")
        if zc is not None:
            errs.append((f"call{i}.k_cache", rel_err(sc_[0], zc[0], f"call{i}.k_cache")))
            errs.append((f"call{i}.v_cache", rel_err(sc_[1], zc[1], f"call{i}.v_cache")))
    return errs


@pytest.mark.parametrize("dtype,limit", [(torch.float32, F32_LIMIT), (torch.bfloat16, BF16_LIMIT)],
                         ids=["f32", "bf16"])
@pytest.mark.parametrize("sc", SCENARIOS, ids=str)
def test_spec_matches_zeta(sc, dtype, limit, run_seed):
    seed = sub_seed(run_seed, sc.name)
    errs = run_scenario(sc, dtype, seed)
    bad = [(k, e) for k, e in errs if not e < limit]
    assert not bad, f"seed={run_seed} {sc.name} {dtype}: relative errors over {limit}: {bad}"


# ----------------------------------------------------------------------------- norms
def test_zeta_norm_registry_is_broken_except_layernornm():
    """Why qk_ln cases with other norm types come from the spec reference."""
    x = torch.randn(2, 3, 64)
    MQA, _ = load_zeta_mqa()
    with pytest.raises(KeyError):
        MQA(64, 4, attn_impl="torch", qk_ln=True, norm_type="layernorm")
    for nt in ("low_precision_layernorm", "rmsnorm"):  # LPLayerNorm subclasses nn.Module
        with pytest.raises(TypeError):
            MQA(64, 4, attn_impl="torch", qk_ln=True, norm_type=nt)
    layer = MQA(64, 4, attn_impl="torch", qk_ln=True, norm_type="low_precision_rmsnorm").eval()
    with pytest.raises(AttributeError):  # LPRMSNorm.forward uses x.device_type
        quiet_call(layer, x)
    quiet_call(MQA(64, 4, attn_impl="torch", qk_ln=True, norm_type="layernornm").eval(), x)


@pytest.mark.parametrize("dtype,limit", [(torch.float32, F32_LIMIT), (torch.bfloat16, BF16_LIMIT)],
                         ids=["f32", "bf16"])
@pytest.mark.parametrize("norm_type", [n for n in NORM_TYPES if n != "layernornm"])
def test_spec_norms_match_zeta_norm_classes(norm_type, dtype, limit, run_seed):
    """Swap working norm modules into a Zeta layer (nn.LayerNorm for layer norms, Zeta's own
    RMSNorm class for RMS norms) and compare with SpecMQA's norm_type."""
    _, zmod = load_zeta_mqa()
    seed = sub_seed(run_seed, "norm-" + norm_type)
    sc = Scenario("norms", [Call(5, past="empty"), Call(2, past="chain")],
                  layer_kw={"qk_ln": True, "norm_type": "layernornm"})

    def factory(zeta):
        if "rms" in norm_type:
            g = torch.Generator().manual_seed(seed + 3)
            for attr, n in (("q_ln", zeta.dim), ("k_ln", zeta.head_dim)):
                norm = zmod.RMSNorm(n)
                with torch.no_grad():
                    norm.weight.copy_(1.0 + 0.3 * torch.randn(n, generator=g))
                setattr(zeta, attr, norm.to(dtype))
        params = {k: v for k, v in zeta.state_dict().items()}
        return SpecMQA(zeta.dim, zeta.heads, qk_ln=True, norm_type=norm_type, dtype=dtype,
                       params=params)

    errs = run_scenario(sc, dtype, seed, spec_factory=factory)
    bad = [(k, e) for k, e in errs if not e < limit]
    assert not bad, f"seed={run_seed} {norm_type} {dtype}: {bad}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_norm_aliases_and_low_precision_variants(dtype, run_seed):
    g = torch.Generator().manual_seed(sub_seed(run_seed, "alias"))
    base = SpecMQA(64, 4, qk_ln=True, norm_type="layernorm", dtype=torch.float32, generator=g)
    base.reset_parameters(g, randomize_norms=True)
    x = torch.randn(2, 5, 64, generator=g).to(dtype)

    def out(nt):
        m = SpecMQA(64, 4, qk_ln=True, norm_type=nt, dtype=dtype, params=base.state_dict())
        return m(x, past_key_value=(), needs_weights=True)

    ref = out("layernorm")
    for nt in ("layernornm", "low_precision_layernorm"):
        got = out(nt)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[2][0], ref[2][0])
    rms = {k: v for k, v in base.state_dict().items() if not k.endswith("ln.bias")}
    a = SpecMQA(64, 4, qk_ln=True, norm_type="rmsnorm", dtype=dtype, params=rms)
    b = SpecMQA(64, 4, qk_ln=True, norm_type="low_precision_rmsnorm", dtype=dtype, params=rms)
    assert torch.equal(a(x)[0], b(x)[0])


def test_rmsnorm_formula():
    from spec_mqa import rms_norm
    x = torch.randn(3, 16)
    w = torch.rand(16) + 0.5
    expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w
    torch.testing.assert_close(rms_norm(x, w), expected, rtol=1e-6, atol=1e-7)
    xb = x.to(torch.bfloat16)
    got = rms_norm(xb, w.to(torch.bfloat16))
    assert got.dtype == torch.bfloat16


# ----------------------------------------------------------------------------- properties
def _spec(run_seed, tag, dim=64, heads=4, dtype=torch.float32, **kw):
    g = torch.Generator().manual_seed(sub_seed(run_seed, tag))
    return SpecMQA(dim, heads, dtype=dtype, generator=g, **kw), g


@pytest.mark.parametrize("bad", [
    (1, 4, 2, 8),   # 2 rows for s_q=3
    (1, 4, 3, 6),   # 6 columns for s_k=8
    (1, 4, 3),      # not 4-D
    (3, 4, 3, 8),   # batch 3 for b=2
    (1, 2, 3, 8),   # 2 heads for H=4
])
def test_spec_rejects_bad_bias_shape(bad, run_seed):
    m, g = _spec(run_seed, "badbias")
    x = torch.randn(2, 3, 64, generator=g)
    past = (torch.randn(2, 1, 16, 5), torch.randn(2, 1, 5, 16))
    with pytest.raises(ValueError):
        m(x, past_key_value=past, bias=torch.zeros(bad))


def test_spec_accepts_broadcast_and_oversized_bias(run_seed):
    m, g = _spec(run_seed, "okbias")
    x = torch.randn(2, 3, 64, generator=g)
    past = (torch.randn(2, 1, 16, 5), torch.randn(2, 1, 5, 16))
    for shape in [(1, 1, 1, 1), (2, 4, 3, 8), (1, 4, 1, 8), (1, 1, 3, 1), (1, 4, 9, 20)]:
        m(x, past_key_value=past, bias=torch.zeros(shape))


def test_spec_rejects_bad_cache_layout_mask_and_dims(run_seed):
    m, g = _spec(run_seed, "badcache")
    x = torch.randn(2, 3, 64, generator=g)
    with pytest.raises(ValueError):  # the seed document's wrong layout [b, H, s, d]
        m(x, past_key_value=(torch.randn(2, 4, 10, 16), torch.randn(2, 4, 10, 16)))
    with pytest.raises(ValueError):
        m(x, mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError):
        m(x, mask=torch.ones(2, 3))
    with pytest.raises(ValueError):
        SpecMQA(60, 8)
    with pytest.raises(ValueError):
        SpecMQA(64, 4, norm_type="batchnorm")


@pytest.mark.parametrize("dim,heads", [(64, 4), (512, 8)])
def test_incremental_decoding_equals_full_pass_fp32(dim, heads, run_seed):
    m, g = _spec(run_seed, f"incr{dim}", dim=dim, heads=heads)
    x = torch.randn(3, 7, dim, generator=g)
    full, _, (fk, fv) = m(x, past_key_value=())
    # prefill 4 + three single-token steps
    out, _, cache = m(x[:, :4], past_key_value=())
    outs = [out]
    for t in range(4, 7):
        out, _, cache = m(x[:, t:t + 1], past_key_value=cache)
        outs.append(out)
    assert torch.equal(torch.cat(outs, 1), full), f"seed={run_seed}"
    assert torch.equal(cache[0], fk) and torch.equal(cache[1], fv)
    # prefill 4 + one 3-token chunk
    o1, _, c1 = m(x[:, :4], past_key_value=())
    o2, _, c2 = m(x[:, 4:], past_key_value=c1)
    assert torch.equal(torch.cat([o1, o2], 1), full), f"seed={run_seed}"
    assert torch.equal(c2[0], fk) and torch.equal(c2[1], fv)


def test_zeta_incremental_close_to_full_fp32(run_seed):
    """Informative: Zeta on CPU is close, not necessarily bit-exact (BLAS blocking)."""
    zeta = zeta_layer(64, 4, torch.float32, sub_seed(run_seed, "zincr"))
    x = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(sub_seed(run_seed, "zx")))
    full = quiet_call(zeta, x, past_key_value=())[0]
    out, _, cache = quiet_call(zeta, x[:, :4], past_key_value=())
    outs = [out]
    for t in range(4, 7):
        out, _, cache = quiet_call(zeta, x[:, t:t + 1], past_key_value=cache)
        outs.append(out)
    inc = torch.cat(outs, 1)
    err = rel_err(inc, full)
    print(f"zeta incremental vs full: bit-exact={torch.equal(inc, full)} rel_err={err:.3g}")
    assert err < F32_LIMIT


def test_fully_masked_row_is_uniform_and_neg_inf_bias_row_is_nan(run_seed):
    m, g = _spec(run_seed, "rows")
    x = torch.randn(2, 4, 64, generator=g)
    past = (torch.randn(2, 1, 16, 3, generator=g), torch.randn(2, 1, 3, 16, generator=g))
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1] = False
    out, w, _ = m(x, past_key_value=past, mask=mask, needs_weights=True)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(w[1], torch.full_like(w[1], 1.0 / 7))
    bias = torch.zeros(1, 4, 4, 4)
    bias[0, 2, 3, :] = float("-inf")
    out, w, _ = m(x, bias=bias, causal=False, needs_weights=True)
    assert torch.isnan(out[:, 3]).all() and torch.isfinite(out[:, :3]).all()
    assert torch.isnan(w[:, 2, 3]).all() and not torch.isnan(w[:, :2]).any()
    # under causal masking the same row is finite: the hidden future keys hold the finite
    # minimum, so query 1 attends uniformly to keys 2 and 3
    bias = torch.zeros(1, 4, 4, 4)
    bias[0, 2, 1, :] = float("-inf")
    out, w, _ = m(x, bias=bias, causal=True, needs_weights=True)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(w[:, 2, 1], torch.tensor([0.0, 0.0, 0.5, 0.5]).expand(2, 4))


def test_zero_len_and_softmax_scale_zero(run_seed):
    m, g = _spec(run_seed, "zero")
    out, w, cache = m(torch.zeros(2, 0, 64), needs_weights=True)
    assert out.shape == (2, 0, 64) and w.shape == (2, 4, 0, 0) and cache is None
    m0, g = _spec(run_seed, "scale0", softmax_scale=0.0)
    _, w, _ = m0(torch.randn(2, 4, 64, generator=g), causal=False, needs_weights=True)
    torch.testing.assert_close(w, torch.full_like(w, 0.25))


def test_fp32_bias_promotes_weights_not_out(run_seed):
    m, g = _spec(run_seed, "promote", dtype=torch.bfloat16)
    x = torch.randn(2, 4, 64, generator=g).to(torch.bfloat16)
    out, w, (k, v) = m(x, past_key_value=(), bias=torch.randn(1, 4, 1, 4, generator=g),
                       needs_weights=True)
    assert out.dtype == torch.bfloat16 and w.dtype == torch.float32
    assert k.dtype == v.dtype == torch.bfloat16


# ----------------------------------------------------------------------------- ALiBi
@pytest.mark.parametrize("heads", range(1, 17))
def test_alibi_slopes_match_zeta(heads):
    _, zmod = load_zeta_mqa()
    ref = zmod.gen_slopes(heads).flatten()
    torch.testing.assert_close(alibi_slopes(heads), ref, rtol=0, atol=0)


@pytest.mark.parametrize("full", [False, True], ids=["causal", "full"])
@pytest.mark.parametrize("heads,seq", [(1, 1), (4, 9), (6, 16), (8, 5), (12, 7), (16, 3)])
def test_alibi_bias_matches_zeta(heads, seq, full):
    _, zmod = load_zeta_mqa()
    ref = zmod.build_alibi_bias(heads, seq, full=full, dtype=torch.float32)
    got = alibi_bias(heads, seq, full=full)
    assert got.shape == ref.shape == ((1, heads, seq, seq) if full else (1, heads, 1, seq))
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    assert alibi_bias(heads, seq, full=full, dtype=torch.bfloat16).dtype == torch.bfloat16


# ----------------------------------------------------------------------------- loader
def test_zeta_loader_skips_package_init():
    MQA, zmod = load_zeta_mqa()
    assert MQA.__name__ == "MultiQueryAttention"
    assert zmod.__name__ == "zeta.nn.attention.multiquery_attention"
    assert os.path.basename(zmod.__file__) == "multiquery_attention.py"
    assert callable(zmod.gen_slopes) and callable(zmod.build_alibi_bias)
    # zeta/nn/attention/__init__.py would have imported zeta.structs
    assert "zeta.structs" not in sys.modules
    assert load_zeta_mqa()[0] is MQA


# ----------------------------------------------------------------------------- make_cases
CONFIG_KEYS = {"name", "reference", "dim", "heads", "clip_qkv", "qk_ln", "softmax_scale",
               "norm_type", "dtype", "tolerance", "attn_pdrop", "init_seed"}
CALL_KEYS = {"past", "causal", "needs_weights", "has_bias", "has_mask"}
DT = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def test_resolve_seed(monkeypatch):
    import make_cases
    assert make_cases.resolve_seed(17) == 17
    monkeypatch.setenv("MQA_TEST_SEED", "123")
    assert make_cases.resolve_seed(None) == 123
    monkeypatch.delenv("MQA_TEST_SEED")
    assert isinstance(make_cases.resolve_seed(None), int)


def _load(path):
    with safe_open(path, "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return json.loads(meta["config"]), json.loads(meta["calls"]), tensors


def _check_and_replay(cfg, calls, t):
    """Check the tensor inventory of one case file and replay it through SpecMQA."""
    name, dtype = cfg["name"], DT[cfg["dtype"]]
    b = t["call0.x"].shape[0]
    H, dim = cfg["heads"], cfg["dim"]
    d = dim // H
    wnames = {"Wqkv.weight", "Wqkv.bias", "out_proj.weight", "out_proj.bias"}
    if cfg["qk_ln"]:
        wnames |= {"q_ln.weight", "k_ln.weight"}
        if "layernorm" in cfg["norm_type"] or cfg["norm_type"] == "layernornm":
            wnames |= {"q_ln.bias", "k_ln.bias"}
    expected_names = set(wnames)
    for n in wnames:
        assert t[n].dtype == dtype, f"{name}: {n} dtype"
    spec = SpecMQA(dim, H, clip_qkv=cfg["clip_qkv"], qk_ln=cfg["qk_ln"],
                   softmax_scale=cfg["softmax_scale"], norm_type=cfg["norm_type"], dtype=dtype,
                   params={n: t[n] for n in wnames})
    cache, s_total = None, 0
    errs = []
    for i, c in enumerate(calls):
        assert set(c) == CALL_KEYS, f"{name}: call keys {set(c)}"
        p = f"call{i}."
        x = t[p + "x"]
        assert x.dtype == dtype and x.dim() == 3 and x.shape[0] == b and x.shape[2] == dim
        s = x.shape[1]
        expected_names |= {p + "x", p + "out"}
        if c["past"] == "none":
            past, s_past = None, 0
        elif c["past"] == "empty":
            past, s_past = (), 0
        elif c["past"] == "given":
            past = (t[p + "past_k"], t[p + "past_v"])
            s_past = past[0].shape[3]
            assert past[0].shape == (b, 1, d, s_past) and past[1].shape == (b, 1, s_past, d)
            assert past[0].dtype == past[1].dtype == dtype
            expected_names |= {p + "past_k", p + "past_v"}
        elif c["past"] == "chain":
            assert i > 0 and calls[i - 1]["past"] != "none", f"{name}: chain without cache"
            past, s_past = cache, s_total
        else:
            raise AssertionError(f"{name}: past={c['past']}")
        s_k = s_past + s
        bias = t.get(p + "bias")
        assert (bias is not None) == c["has_bias"], f"{name}: {p}bias presence"
        if bias is not None:
            assert bias.dim() == 4
            expected_names.add(p + "bias")
        mask = t.get(p + "mask")
        assert (mask is not None) == c["has_mask"], f"{name}: {p}mask presence"
        if mask is not None:
            assert mask.dtype == torch.bool and mask.shape == (b, s_k)
            expected_names.add(p + "mask")
        out, w, cache = spec(x, past_key_value=past, bias=bias, mask=mask, causal=c["causal"],
                             needs_weights=c["needs_weights"])
        ref_out = t[p + "out"]
        assert ref_out.shape == (b, s, dim) and ref_out.dtype == dtype
        errs.append((p + "out", rel_err(out, ref_out, f"{name} {p}out")))
        if c["needs_weights"]:
            rw = t[p + "weights"]
            assert rw.shape == (b, H, s, s_k)
            errs.append((p + "weights", rel_err(w, rw, f"{name} {p}weights")))
            expected_names.add(p + "weights")
            if cfg.get("expect") == "uniform_rows" and mask is not None:
                for row in range(b):
                    if not mask[row].any():
                        torch.testing.assert_close(rw[row].float(),
                                                   torch.full((H, s, s_k), 1.0 / s_k),
                                                   rtol=1e-2, atol=1e-3)
        else:
            assert p + "weights" not in t
        if c["past"] != "none":
            kc, vc = t[p + "k_cache"], t[p + "v_cache"]
            assert kc.shape == (b, 1, d, s_k) and vc.shape == (b, 1, s_k, d)
            assert kc.dtype == vc.dtype == dtype
            errs.append((p + "k_cache", rel_err(cache[0], kc, f"{name} {p}k_cache")))
            errs.append((p + "v_cache", rel_err(cache[1], vc, f"{name} {p}v_cache")))
            expected_names |= {p + "k_cache", p + "v_cache"}
            cache = (kc, vc)  # continue from the reference's own cache, like the C++ side
            s_total = s_k
        else:
            s_total = 0
    assert set(t) == expected_names, f"{name}: unexpected {set(t) - expected_names}, " \
                                     f"missing {expected_names - set(t)}"
    return errs


def test_make_cases_smoke(tmp_path, run_seed):
    out_dir = tmp_path / "cases"
    proc = subprocess.run([sys.executable, os.path.join(HERE, "make_cases.py"), "--out", str(out_dir),
                           "--seed", str(run_seed)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"make_cases: seed={run_seed}" in proc.stdout
    index = json.loads((out_dir / "index.json").read_text())
    assert index["seed"] == run_seed
    names = index["cases"]
    assert len(names) == len(set(names)) >= 40
    files = {p.name for p in out_dir.iterdir()}
    assert files == {f"{n}.safetensors" for n in names} | {"index.json"}
    total = sum((out_dir / f).stat().st_size for f in files)
    assert total < 8e6, f"case directory is {total / 1e6:.1f} MB"

    seen_refs, seen_dtypes = set(), set()
    for n in names:
        cfg, calls, t = _load(out_dir / f"{n}.safetensors")
        assert CONFIG_KEYS <= set(cfg) <= CONFIG_KEYS | {"expect"}, f"{n}: config keys"
        assert cfg["name"] == n
        assert cfg["attn_pdrop"] == 0
        assert cfg["tolerance"] == (1e-5 if cfg["dtype"] == "float32" else 2e-2)
        assert cfg["norm_type"] in NORM_TYPES
        assert cfg.get("expect") in (None, "nan_rows", "uniform_rows")
        spec_only = cfg["qk_ln"] and cfg["norm_type"] != "layernornm"
        assert cfg["reference"] == ("spec" if spec_only else "zeta"), n
        seen_refs.add(cfg["reference"])
        seen_dtypes.add(cfg["dtype"])
        errs = _check_and_replay(cfg, calls, t)
        # the spec reference must reproduce every case: tightly where Zeta made it in fp32
        limit = F32_LIMIT if cfg["dtype"] == "float32" else cfg["tolerance"]
        bad = [(k, e) for k, e in errs if not e < limit]
        assert not bad, f"seed={run_seed} {n}: {bad}"
        has_nan = any(torch.isnan(v).any() for k, v in t.items() if k.endswith(".out"))
        assert has_nan == (cfg.get("expect") == "nan_rows"), n
        if cfg["init_seed"] is not None:
            MQA, _ = load_zeta_mqa()
            torch.manual_seed(cfg["init_seed"])
            fresh = MQA(cfg["dim"], cfg["heads"], attn_impl="torch").state_dict()
            for k, v in fresh.items():
                assert torch.equal(v, t[k]), f"{n}: {k} is not torch.manual_seed(init_seed) init"
    assert seen_refs == {"zeta", "spec"}
    assert seen_dtypes == {"float32", "bfloat16", "float16"}
