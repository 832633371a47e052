#!/usr/bin/env python3
"""Write the reference case files for the C++ tests (format: tests/reference/CASES.md).

    python tests/reference/make_cases.py --out DIR [--seed N]

The seed comes from --seed, else the environment variable MQA_TEST_SEED, else it is
drawn fresh; it is printed ("make_cases: seed=N") and stored in DIR/index.json.
DIR/index.json lists the cases of this run; other files already in DIR are left alone.

Expected outputs come from Zeta's published MultiQueryAttention (loaded by
zeta_loader, attn_impl='torch', eval mode) whenever Zeta can run the configuration
("reference": "zeta"). Zeta cannot build or run qk_ln with any norm type except its
misspelled 'layernornm' (its norm registry is broken), so those cases alone come from
spec_mqa.SpecMQA ("reference": "spec").

The fp32 / bf16 / fp16 variants of one case share the same weights and inputs (drawn
in fp32 from a generator seeded by the run seed and the case's base name, then cast).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from spec_mqa import SpecMQA  # noqa: E402
from zeta_loader import load_zeta_mqa  # noqa: E402

F32, BF16, F16 = "float32", "bfloat16", "float16"
DTYPES = {F32: torch.float32, BF16: torch.bfloat16, F16: torch.float16}
SUFFIX = {F32: "f32", BF16: "bf16", F16: "f16"}
TOLERANCE = {F32: 1e-5, BF16: 2e-2, F16: 2e-2}
MAIN = (F32, BF16)
ALL3 = (F32, BF16, F16)
ZETA_QK_NORM = "layernornm"  # the only norm type Zeta's qk_ln registry can run


# ----------------------------------------------------------------------------- case model
@dataclass
class Ctx:
    """What a tensor builder may use: dims of the case/call and the case's generator."""
    g: torch.Generator
    b: int
    heads: int
    head_dim: int
    dim: int
    s_q: int = 0
    s_k: int = 0
    s_past: int = 0

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.g)


Builder = Callable[[Ctx], torch.Tensor]


@dataclass
class CallDef:
    s: int
    past: str = "none"              # none | empty | given | chain
    past_len: int = 0               # for past == given
    causal: bool = True
    needs_weights: bool = False
    bias: Optional[Builder] = None  # returns an fp32 tensor; cast to the bias dtype
    bias_fp32: bool = False         # keep the bias fp32 whatever the case dtype
    mask: Optional[Builder] = None  # returns bool [b, s_k]


@dataclass
class CaseDef:
    base: str
    calls: List[CallDef]
    dtypes: Sequence[str] = MAIN
    dim: int = 64
    heads: int = 4
    batch: int = 2
    clip_qkv: Optional[float] = None
    qk_ln: bool = False
    softmax_scale: Optional[float] = None
    norm_type: str = "low_precision_layernorm"
    expect: Optional[str] = None
    init_seed: bool = False         # weights = Zeta built right after torch.manual_seed(init_seed)
    share: Optional[str] = None     # key for weights+inputs shared between cases (default: base)
    extra: Dict[str, object] = field(default_factory=dict)

    @property
    def reference(self) -> str:
        if self.qk_ln and self.norm_type != ZETA_QK_NORM:
            return "spec"
        return "zeta"


# ----------------------------------------------------------------------------- builders
def bias_shape(rows: str, cols: str, batch: bool = False, per_head: bool = True,
               extra_rows: int = 0, extra_cols: int = 0) -> Builder:
    """Random N(0,1) bias. rows/cols: '1' or 's' (s_q / s_k), plus optional oversize."""
    def build(c: Ctx) -> torch.Tensor:
        r = 1 if rows == "1" else c.s_q + extra_rows
        k = 1 if cols == "1" else c.s_k + extra_cols
        return c.randn(c.b if batch else 1, c.heads if per_head else 1, r, k)
    return build


def bias_neg_inf_row(c: Ctx) -> torch.Tensor:
    t = c.randn(c.b, c.heads, c.s_q, c.s_k)
    t[0, 1 % c.heads, min(2, c.s_q - 1), :] = float("-inf")
    return t


def alibi(full: bool, max_len: int) -> Builder:
    def build(c: Ctx) -> torch.Tensor:
        _, zmod = load_zeta_mqa()
        return zmod.build_alibi_bias(c.heads, max_len, full=full, dtype=torch.float32)
    return build


def padding_mask(c: Ctx) -> torch.Tensor:
    """Row 0 attends everywhere; row 1 has its first 2 keys padded plus one random hole;
    the last row (when b >= 3) is fully masked (-> uniform attention rows)."""
    m = torch.ones(c.b, c.s_k, dtype=torch.bool)
    if c.b >= 2 and c.s_k > 0:
        m[1, : min(2, c.s_k)] = False
        if c.s_k > 3:
            hole = 2 + int(torch.randint(0, c.s_k - 2, (1,), generator=c.g))
            m[1, hole] = False
    if c.b >= 3:
        m[c.b - 1, :] = False
    return m


# ----------------------------------------------------------------------------- case list
def case_defs() -> List[CaseDef]:
    C = CallDef
    cases = [
        # cache modes, causal / non-causal, weights
        CaseDef("nocache_causal", [C(6)], dtypes=ALL3),
        CaseDef("emptycache_causal", [C(5, past="empty")]),
        CaseDef("given6_s5_causal", [C(5, past="given", past_len=6, needs_weights=True)]),
        CaseDef("noncausal_nocache", [C(6, causal=False)]),
        CaseDef("noncausal_given4_s3", [C(3, past="given", past_len=4, causal=False)]),
        CaseDef("needs_weights", [C(5, past="empty", needs_weights=True)], dtypes=ALL3, batch=3),
        # single-token decode against given caches of several lengths
        CaseDef("decode_past1", [C(1, past="given", past_len=1, needs_weights=True)]),
        CaseDef("decode_past5", [C(1, past="given", past_len=5, needs_weights=True)], dtypes=ALL3),
        CaseDef("decode_past12", [C(1, past="given", past_len=12, needs_weights=True)], batch=3),
        # incremental decoding: same weights and the same 7 tokens in all three
        CaseDef("incr_full7_causal", [C(7, past="empty", needs_weights=True)],
                dtypes=ALL3, share="incr"),
        CaseDef("incr_prefill4_decode1x3",
                [C(4, past="empty")] + [C(1, past="chain", needs_weights=True) for _ in range(3)],
                dtypes=ALL3, share="incr"),
        CaseDef("incr_prefill4_chunk3",
                [C(4, past="empty"), C(3, past="chain", needs_weights=True)],
                dtypes=ALL3, share="incr"),
        # a chunk appended to a given cache
        CaseDef("chunk3_after_given4_causal", [C(3, past="given", past_len=4, needs_weights=True)]),
        # key padding masks (last batch row fully masked)
        CaseDef("mask_nocache", [C(6, mask=padding_mask, needs_weights=True)],
                batch=3, expect="uniform_rows"),
        CaseDef("mask_given5_s3", [C(3, past="given", past_len=5, mask=padding_mask,
                                     needs_weights=True)], batch=3, expect="uniform_rows"),
        CaseDef("mask_chain_prefill5_decode1",
                [C(5, past="empty", mask=padding_mask), C(1, past="chain", mask=padding_mask,
                                                           needs_weights=True)],
                batch=3, expect="uniform_rows"),
        CaseDef("mask_and_bias_given3_s4",
                [C(4, past="given", past_len=3, mask=padding_mask, bias=bias_shape("1", "s"),
                   needs_weights=True)], batch=3, expect="uniform_rows"),
        # bias shapes
        CaseDef("bias_1_1_1_sk", [C(4, past="given", past_len=3,
                                    bias=bias_shape("1", "s", per_head=False))]),
        CaseDef("bias_1_H_1_sk", [C(5, bias=bias_shape("1", "s"), needs_weights=True)]),
        CaseDef("bias_b_H_s_s", [C(6, bias=bias_shape("s", "s", batch=True), needs_weights=True)]),
        CaseDef("bias_1_H_s_1", [C(5, past="empty", bias=bias_shape("s", "1"))]),
        CaseDef("bias_oversized_given4_s3",
                [C(3, past="given", past_len=4, needs_weights=True,
                   bias=bias_shape("s", "s", extra_rows=5, extra_cols=7))]),
        CaseDef("bias_fp32_on_lowp", [C(5, past="empty", needs_weights=True, bias_fp32=True,
                                        bias=bias_shape("s", "s", extra_cols=2))],
                dtypes=(BF16, F16)),
        CaseDef("bias_neg_inf_row_nan", [C(5, causal=False, needs_weights=True,
                                           bias=bias_neg_inf_row)], expect="nan_rows"),
        # the same -inf row under causal masking: the causal overwrite leaves finite minima on the
        # hidden (future) keys, so that row attends uniformly to its future keys -- finite, no NaN
        CaseDef("bias_neg_inf_row_causal", [C(5, causal=True, needs_weights=True,
                                              bias=bias_neg_inf_row)]),
        # ALiBi (Zeta's build_alibi_bias), one bias built for 16 positions serving every step
        CaseDef("alibi_causal_h4",
                [C(5, past="empty", bias=alibi(False, 16)),
                 C(1, past="chain", bias=alibi(False, 16)),
                 C(1, past="chain", bias=alibi(False, 16)),
                 C(3, past="chain", bias=alibi(False, 16), needs_weights=True)]),
        CaseDef("alibi_causal_h6",
                [C(5, past="empty", bias=alibi(False, 16)),
                 C(1, past="chain", bias=alibi(False, 16)),
                 C(3, past="chain", bias=alibi(False, 16), needs_weights=True)],
                dim=96, heads=6),
        CaseDef("alibi_full_h4_noncausal",
                [C(6, past="empty", causal=False, bias=alibi(True, 16)),
                 C(2, past="chain", causal=False, bias=alibi(True, 16), needs_weights=True)]),
        # clip_qkv
        CaseDef("clip_0p1", [C(6, past="empty", needs_weights=True)], clip_qkv=0.1),
        CaseDef("clip_0", [C(6, past="empty")], clip_qkv=0.0),
        # softmax_scale override
        CaseDef("softmax_scale_0p3", [C(6, past="empty", needs_weights=True)], softmax_scale=0.3),
        CaseDef("softmax_scale_0", [C(6, past="empty", needs_weights=True)], softmax_scale=0.0),
        # softmax_scale <= 0 (with 0.5 as the control) through every attention path: fused kernels mask with -inf
        # before they scale, so a scale of 0 or below broke them where they mask (causal, s >= 2). The _incr cases
        # also run as session steps through the engine's paged pass (tests/cpp/reference_test.cc), with head_dim 64
        # so that attn_impl triton's own kernels serve their bf16 variants on CUDA.
        *[CaseDef(f"scale_{tag}", [C(s, causal=causal) for causal in (True, False) for s in (1, 2, 3, 7)],
                  softmax_scale=scale)
          for tag, scale in (("0", 0.0), ("neg0p25", -0.25), ("0p5", 0.5))],
        *[CaseDef(f"scale_{tag}_incr",
                  [C(4, past="empty"), C(1, past="chain"), C(1, past="chain"), C(3, past="chain")],
                  softmax_scale=scale, dim=128, heads=2)
          for tag, scale in (("0", 0.0), ("neg0p25", -0.25), ("0p5", 0.5))],
        # zero-length input
        CaseDef("zero_len_nocache", [C(0)]),
        CaseDef("zero_len_given4_noncausal", [C(0, past="given", past_len=4, causal=False)]),
        # larger layer (fp32 only: its weights alone are 2.4 MB)
        CaseDef("dim512_h8", [C(8, past="empty"), C(1, past="chain", needs_weights=True)],
                dim=512, heads=8, dtypes=(F32,)),
        # weights from torch.manual_seed(init_seed), as built by Zeta
        CaseDef("init_seed", [C(5, past="empty")], dtypes=(F32,), init_seed=True),
    ]
    # qk_ln with every norm type; 'layernornm' through Zeta, the others through the spec
    for nt in ("layernornm", "layernorm", "low_precision_layernorm", "rmsnorm",
               "low_precision_rmsnorm"):
        dts = ALL3 if nt in ("layernornm", "low_precision_rmsnorm") else MAIN
        cases.append(CaseDef(f"qkln_{nt}",
                             [C(5, past="empty"), C(2, past="chain", needs_weights=True)],
                             qk_ln=True, norm_type=nt, dtypes=dts))
    return cases


# ----------------------------------------------------------------------------- generation
def derive_seed(run_seed: int, key: str) -> int:
    h = hashlib.sha256(f"{run_seed}:{key}".encode()).digest()
    return int.from_bytes(h[:8], "little") % (2**31 - 1)


def _randomize_norms(params: Dict[str, torch.Tensor], g: torch.Generator) -> None:
    for name in list(params):
        if name.startswith(("q_ln.", "k_ln.")):
            shape = params[name].shape
            noise = 0.3 * torch.randn(shape, generator=g)
            params[name] = (1.0 + noise) if name.endswith(".weight") else noise


def build_reference(cd: CaseDef, dtype: torch.dtype, run_seed: int):
    """Returns (callable forward, fp32->dtype state dict, init_seed or None)."""
    share = cd.share or cd.base
    init_seed = derive_seed(run_seed, "init_seed") if cd.init_seed else None
    layer_seed = init_seed if cd.init_seed else derive_seed(run_seed, share + ":layer")
    norm_g = torch.Generator().manual_seed(derive_seed(run_seed, share + ":norms"))
    if cd.reference == "zeta":
        MQA, _ = load_zeta_mqa()
        torch.manual_seed(layer_seed)
        module = MQA(cd.dim, cd.heads, attn_impl="torch", clip_qkv=cd.clip_qkv, qk_ln=cd.qk_ln,
                     softmax_scale=cd.softmax_scale, attn_pdrop=0.0, norm_type=cd.norm_type,
                     fc_type="torch")
        if cd.qk_ln and not cd.init_seed:
            sd = {k: v.clone() for k, v in module.state_dict().items()}
            _randomize_norms(sd, norm_g)
            module.load_state_dict(sd)
        module = module.to(dtype).eval()
        state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        return module, state, init_seed
    g = torch.Generator().manual_seed(layer_seed)
    spec32 = SpecMQA(cd.dim, cd.heads, clip_qkv=cd.clip_qkv, qk_ln=cd.qk_ln,
                     softmax_scale=cd.softmax_scale, norm_type=cd.norm_type, dtype=torch.float32,
                     generator=g)
    spec32.reset_parameters(g, randomize_norms=True)
    spec = SpecMQA(cd.dim, cd.heads, clip_qkv=cd.clip_qkv, qk_ln=cd.qk_ln,
                   softmax_scale=cd.softmax_scale, norm_type=cd.norm_type, dtype=dtype,
                   params=spec32.state_dict())
    return spec, spec.state_dict(), init_seed


def make_case(cd: CaseDef, dtype_name: str, run_seed: int):
    """Returns (name, tensors, metadata) for one case in one dtype."""
    dtype = DTYPES[dtype_name]
    name = f"{cd.base}_{SUFFIX[dtype_name]}"
    layer, state, init_seed = build_reference(cd, dtype, run_seed)
    d = cd.dim // cd.heads
    share = cd.share or cd.base
    g = torch.Generator().manual_seed(derive_seed(run_seed, share + ":inputs"))
    total = sum(c.s for c in cd.calls)
    x_all = torch.randn(cd.batch, total, cd.dim, generator=g)

    tensors: Dict[str, torch.Tensor] = {k: v.contiguous() for k, v in state.items()}
    calls_meta = []
    cache = None
    offset = 0
    for i, call in enumerate(cd.calls):
        x = x_all[:, offset:offset + call.s].to(dtype)
        offset += call.s
        ctx = Ctx(g=g, b=cd.batch, heads=cd.heads, head_dim=d, dim=cd.dim, s_q=call.s)
        if call.past == "none":
            past = None
        elif call.past == "empty":
            past = ()
        elif call.past == "given":
            pk = (0.5 * ctx.randn(cd.batch, 1, d, call.past_len)).to(dtype)
            pv = (0.5 * ctx.randn(cd.batch, 1, call.past_len, d)).to(dtype)
            past = (pk, pv)
            tensors[f"call{i}.past_k"] = pk
            tensors[f"call{i}.past_v"] = pv
        elif call.past == "chain":
            if cache is None:
                raise ValueError(f"{name}: call {i} chains but call {i - 1} returned no cache")
            past = cache
        else:
            raise ValueError(f"{name}: bad past mode {call.past!r}")
        ctx.s_past = 0 if not past else past[0].shape[-1]
        ctx.s_k = ctx.s_past + call.s

        bias = None
        if call.bias is not None:
            bias = call.bias(ctx).to(torch.float32 if call.bias_fp32 else dtype)
            tensors[f"call{i}.bias"] = bias
        mask = None
        if call.mask is not None:
            mask = call.mask(ctx)
            tensors[f"call{i}.mask"] = mask
        tensors[f"call{i}.x"] = x

        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Zeta warns when both mask and bias are passed
            out, weights, cache = layer(x, past_key_value=past, bias=bias, mask=mask,
                                        causal=call.causal, needs_weights=call.needs_weights)
        tensors[f"call{i}.out"] = out
        if call.needs_weights:
            tensors[f"call{i}.weights"] = weights
        if call.past != "none":
            tensors[f"call{i}.k_cache"] = cache[0]
            tensors[f"call{i}.v_cache"] = cache[1]
        if cd.expect != "nan_rows" and not torch.isfinite(out).all():
            raise AssertionError(f"{name}: call {i} produced non-finite output")
        calls_meta.append({"past": call.past, "causal": call.causal,
                           "needs_weights": call.needs_weights,
                           "has_bias": bias is not None, "has_mask": mask is not None})
    if cd.expect == "nan_rows" and not any(
            torch.isnan(v).any() for k, v in tensors.items() if k.endswith(".out")):
        raise AssertionError(f"{name}: expected NaN rows, got none")

    config = {
        "name": name, "reference": cd.reference, "dim": cd.dim, "heads": cd.heads,
        "clip_qkv": cd.clip_qkv, "qk_ln": cd.qk_ln, "softmax_scale": cd.softmax_scale,
        "norm_type": cd.norm_type, "dtype": dtype_name, "tolerance": TOLERANCE[dtype_name],
        "attn_pdrop": 0.0, "init_seed": init_seed,
    }
    if cd.expect:
        config["expect"] = cd.expect
    metadata = {"config": json.dumps(config), "calls": json.dumps(calls_meta)}
    # fresh contiguous storage for every tensor (safetensors refuses shared/strided ones)
    tensors = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    return name, tensors, metadata


def all_cases(run_seed: int):
    for cd in case_defs():
        for dt in cd.dtypes:
            yield make_case(cd, dt, run_seed)


def resolve_seed(arg: Optional[int]) -> int:
    if arg is not None:
        return int(arg)
    env = os.environ.get("MQA_TEST_SEED", "").strip()
    if env:
        return int(env)
    return secrets.randbelow(2**31 - 1)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--seed", type=int, default=None,
                    help="run seed (default: $MQA_TEST_SEED, else fresh random)")
    args = ap.parse_args(argv)
    seed = resolve_seed(args.seed)
    print(f"make_cases: seed={seed}", flush=True)
    t0 = time.time()
    os.makedirs(args.out, exist_ok=True)
    names = []
    total_bytes = 0
    for name, tensors, metadata in all_cases(seed):
        path = os.path.join(args.out, f"{name}.safetensors")
        save_file(tensors, path, metadata=metadata)
        os.chmod(path, 0o644)
        total_bytes += os.path.getsize(path)
        names.append(name)
    if len(set(names)) != len(names):
        raise AssertionError("duplicate case names")
    with open(os.path.join(args.out, "index.json"), "w") as f:
        json.dump({"seed": seed, "cases": names}, f, indent=1)
        f.write("\n")
    print(f"make_cases: wrote {len(names)} cases ({total_bytes / 1e6:.2f} MB) to {args.out} "
          f"in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
