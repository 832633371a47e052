"""Independent Python reference of /work/shared/spec/mqa-semantics.md.

Written from the spec only, with plain torch operations, to check Zeta's module
where it runs and to stand in for it where it does not (``qk_ln`` with norm types
other than Zeta's misspelled ``layernornm``).

Rounding model: every primitive (linear, norm, q.k, P.v, softmax) is computed in
float64 and rounded once to the working dtype (float32, bfloat16 or float16): an
(almost always) correctly rounded result. This makes the reference independent of
BLAS blocking: a BLAS float32 GEMM rounds differently for a 1-row and a many-row
input, so "incremental decoding == one causal pass" is not bit-exact with plain
float32 matmuls on CPU (MKL), while it is with this reference.

Conventions (the spec's):
  b batch, s = s_q new tokens, H heads, d = dim // H, s_k = past + new tokens.
  cache layout: k [b, 1, d, s_total] (transposed), v [b, 1, s_total, d].
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch

NORM_TYPES = (
    "low_precision_layernorm",
    "layernorm",
    "layernornm",  # Zeta's misspelling; an alias of layernorm
    "rmsnorm",
    "low_precision_rmsnorm",
)
_LAYER_NORMS = ("low_precision_layernorm", "layernorm", "layernornm")
NORM_EPS = 1e-5
_ACC = torch.float64  # internal math precision; results are rounded once to the working dtype


# ----------------------------------------------------------------------------- helpers
def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """y = x W^T + b, computed in float64, rounded once to x's dtype."""
    y = torch.matmul(x.to(_ACC), weight.to(_ACC).t()) + bias.to(_ACC)
    return y.to(x.dtype)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the last dim: eps 1e-5, biased variance; wide math, result in x's dtype."""
    xf = x.to(_ACC)
    mean = xf.mean(dim=-1, keepdim=True)
    var = ((xf - mean) ** 2).mean(dim=-1, keepdim=True)
    y = (xf - mean) / torch.sqrt(var + NORM_EPS)
    y = y * weight.to(_ACC) + bias.to(_ACC)
    return y.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + 1e-5) * w, wide math, result in x's dtype."""
    xf = x.to(_ACC)
    y = xf * torch.rsqrt((xf * xf).mean(dim=-1, keepdim=True) + NORM_EPS)
    y = y * weight.to(_ACC)
    return y.to(x.dtype)


def apply_norm(norm_type: str, x: torch.Tensor, weight: torch.Tensor,
               bias: Optional[torch.Tensor]) -> torch.Tensor:
    """One of the four norms (plus the ``layernornm`` alias).

    The "low precision" variants round input and parameters to x's (low) dtype,
    compute in fp32 and round the result. Since this reference keeps parameters in
    the layer's dtype and rounds every norm result, plain and low-precision variants
    coincide here, in every dtype.
    """
    if norm_type in _LAYER_NORMS:
        if norm_type == "low_precision_layernorm":
            weight, bias = weight.to(x.dtype), bias.to(x.dtype)
        return layer_norm(x, weight, bias)
    if norm_type in ("rmsnorm", "low_precision_rmsnorm"):
        if norm_type == "low_precision_rmsnorm":
            weight = weight.to(x.dtype)
        return rms_norm(x, weight)
    raise ValueError(f"unknown norm_type {norm_type!r}; expected one of {NORM_TYPES}")


# ----------------------------------------------------------------------------- ALiBi
def alibi_slopes(heads: int) -> torch.Tensor:
    """Slopes m_h, shape [heads], fp32 (spec 'ALiBi')."""
    if heads < 1:
        raise ValueError("heads must be >= 1")
    hp = 1
    while hp < heads:
        hp *= 2
    k = torch.arange(1, hp + 1, dtype=torch.float32)
    slopes = 1.0 / torch.pow(2.0, k * (8.0 / hp))
    if hp != heads:
        odd_then_even = torch.cat([slopes[1::2], slopes[0::2]])
        slopes = odd_then_even[:heads]
    return slopes


def alibi_bias(heads: int, seq_len: int, full: bool = False,
               dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Causal form [1,H,1,S]: m_h*(j-(S-1)); full form [1,H,S,S]: -m_h*|i-j|."""
    m = alibi_slopes(heads).view(1, heads, 1, 1)
    j = torch.arange(seq_len, dtype=torch.float32)
    if full:
        dist = (j.view(seq_len, 1) - j.view(1, seq_len)).abs()
        out = -dist.view(1, 1, seq_len, seq_len) * m
    else:
        out = (j - (seq_len - 1)).view(1, 1, 1, seq_len) * m
    return out if dtype is None else out.to(dtype)


# ----------------------------------------------------------------------------- layer
class SpecMQA:
    """Multi-Query Attention exactly as the spec describes it (eval mode, no dropout).

    ``params`` maps state-dict names (``Wqkv.weight``, ``Wqkv.bias``,
    ``out_proj.weight``, ``out_proj.bias``, and with ``qk_ln`` ``q_ln.weight``,
    ``k_ln.weight`` plus ``q_ln.bias``/``k_ln.bias`` for layer norms) to tensors of
    ``dtype``.
    """

    def __init__(self, dim: int, heads: int, clip_qkv: Optional[float] = None,
                 qk_ln: bool = False, softmax_scale: Optional[float] = None,
                 norm_type: str = "low_precision_layernorm",
                 dtype: torch.dtype = torch.float32,
                 params: Optional[Dict[str, torch.Tensor]] = None,
                 generator: Optional[torch.Generator] = None):
        if heads <= 0 or dim <= 0 or dim % heads != 0:
            raise ValueError(f"dim ({dim}) must be a positive multiple of heads ({heads})")
        if norm_type not in NORM_TYPES:
            raise ValueError(f"unknown norm_type {norm_type!r}; expected one of {NORM_TYPES}")
        self.dim = dim
        self.heads = heads
        self.head_dim = dim // heads
        self.clip_qkv = clip_qkv
        self.qk_ln = qk_ln
        self.norm_type = norm_type
        self.dtype = dtype
        self.softmax_scale = (1.0 / math.sqrt(self.head_dim)
                              if softmax_scale is None else float(softmax_scale))
        self.params: Dict[str, torch.Tensor] = {}
        if params is None:
            self.reset_parameters(generator)
        else:
            self.load_state_dict(params)

    # -- parameters
    def param_shapes(self) -> Dict[str, Tuple[int, ...]]:
        d, dim = self.head_dim, self.dim
        shapes = {
            "Wqkv.weight": (dim + 2 * d, dim),
            "Wqkv.bias": (dim + 2 * d,),
            "out_proj.weight": (dim, dim),
            "out_proj.bias": (dim,),
        }
        if self.qk_ln:
            shapes["q_ln.weight"] = (dim,)
            shapes["k_ln.weight"] = (d,)
            if self.norm_type in _LAYER_NORMS:
                shapes["q_ln.bias"] = (dim,)
                shapes["k_ln.bias"] = (d,)
        return shapes

    def reset_parameters(self, generator: Optional[torch.Generator] = None,
                         randomize_norms: bool = False) -> None:
        """nn.Linear-like init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias.

        Norm weights are 1 and biases 0, unless ``randomize_norms`` (then
        weight ~ 1 + 0.3 N(0,1), bias ~ 0.3 N(0,1), so the affine parts matter).
        """
        params = {}
        for name, shape in self.param_shapes().items():
            if name.startswith(("Wqkv", "out_proj")):
                bound = 1.0 / math.sqrt(self.dim)
                t = (torch.rand(shape, generator=generator) * 2.0 - 1.0) * bound
            elif name.endswith(".weight"):
                t = torch.ones(shape)
                if randomize_norms:
                    t = t + 0.3 * torch.randn(shape, generator=generator)
            else:
                t = torch.zeros(shape)
                if randomize_norms:
                    t = 0.3 * torch.randn(shape, generator=generator)
            params[name] = t.to(self.dtype)
        self.params = params

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        shapes = self.param_shapes()
        missing = sorted(set(shapes) - set(state))
        extra = sorted(set(state) - set(shapes))
        if missing or extra:
            raise ValueError(f"state dict mismatch: missing {missing}, unexpected {extra}")
        for name, shape in shapes.items():
            if tuple(state[name].shape) != shape:
                raise ValueError(f"{name}: expected shape {shape}, got {tuple(state[name].shape)}")
        self.params = {k: state[k].detach().to(self.dtype).clone() for k in shapes}

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.params.items()}

    # -- forward pieces
    def _slice_bias(self, bias: torch.Tensor, b: int, s_q: int, s_k: int) -> torch.Tensor:
        if bias.dim() != 4:
            raise ValueError(f"bias must be 4-D [b|1, H|1, rows, cols], got shape {tuple(bias.shape)}")
        bb, bh, rows, cols = bias.shape
        if bb not in (1, b):
            raise ValueError(f"bias dim 0 is {bb}; expected 1 or batch {b}")
        if bh not in (1, self.heads):
            raise ValueError(f"bias dim 1 is {bh}; expected 1 or heads {self.heads}")
        if rows != 1 and rows < s_q:
            raise ValueError(f"bias has {rows} rows; expected 1 or at least s_q={s_q}")
        if cols != 1 and cols < s_k:
            raise ValueError(f"bias has {cols} columns; expected 1 or at least s_k={s_k}")
        if rows >= s_q:
            bias = bias[:, :, rows - s_q:, :]
        if cols >= s_k:
            bias = bias[:, :, :, cols - s_k:]
        return bias

    def forward(self, x: torch.Tensor, past_key_value=None, bias: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None, causal: bool = True,
                needs_weights: bool = False):
        """Returns (out [b,s,dim], weights [b,H,s_q,s_k] | None, (k_cache, v_cache) | None)."""
        p = self.params
        dim, H, d = self.dim, self.heads, self.head_dim
        if x.dim() != 3 or x.shape[-1] != dim:
            raise ValueError(f"x must be [b, s, {dim}], got {tuple(x.shape)}")
        x = x.to(self.dtype)
        b, s_q, _ = x.shape

        # 1-2: fused projection, optional clipping (0.0 / None = off)
        qkv = _linear(x, p["Wqkv.weight"], p["Wqkv.bias"])
        if self.clip_qkv:
            qkv = qkv.clamp(-self.clip_qkv, self.clip_qkv)

        # 3: split, qk norm
        q = qkv[..., :dim]
        k = qkv[..., dim:dim + d]
        v = qkv[..., dim + d:]
        if self.qk_ln:
            q = apply_norm(self.norm_type, q, p["q_ln.weight"], p.get("q_ln.bias")).to(qkv.dtype)
            k = apply_norm(self.norm_type, k, p["k_ln.weight"], p.get("k_ln.bias")).to(qkv.dtype)

        # 4: heads. q [b,H,s_q,d]; k as [b,1,d,s] (transposed), v [b,1,s,d]
        qh = q.reshape(b, s_q, H, d).permute(0, 2, 1, 3)
        kt = k.transpose(1, 2).unsqueeze(1)
        vh = v.unsqueeze(1)

        # 5: cache
        cache = None
        if past_key_value is not None:
            if len(past_key_value) != 0:
                pk, pv = past_key_value
                if (pk.dim() != 4 or pv.dim() != 4 or pk.shape[:3] != (b, 1, d)
                        or pv.shape[0:2] != (b, 1) or pv.shape[3] != d
                        or pk.shape[3] != pv.shape[2]):
                    raise ValueError(
                        f"past_key_value must be k [{b}, 1, {d}, s_past] and v [{b}, 1, s_past, {d}]; "
                        f"got {tuple(pk.shape)} and {tuple(pv.shape)}")
                kt = torch.cat([pk.to(kt.dtype), kt], dim=3)
                vh = torch.cat([pv.to(vh.dtype), vh], dim=2)
            cache = (kt, vh)
        s_k = kt.shape[-1]

        # 6: logits, wide math rounded to the working dtype
        logits = (torch.matmul(qh.to(_ACC), kt.to(_ACC)) * self.softmax_scale).to(qh.dtype)

        # 7: additive bias, last s_q rows / last s_k columns (dtype promotion as in torch)
        if bias is not None:
            logits = logits + self._slice_bias(bias, b, s_q, s_k)

        min_val = torch.finfo(q.dtype).min
        # 8: key padding mask overwrites
        if mask is not None:
            if mask.dtype != torch.bool or tuple(mask.shape) != (b, s_k):
                raise ValueError(f"mask must be bool [{b}, {s_k}], got {mask.dtype} {tuple(mask.shape)}")
            logits = logits.masked_fill(~mask.view(b, 1, 1, s_k), min_val)

        # 9: bottom-right causal, only for s_q > 1
        if causal and s_q > 1:
            i = torch.arange(s_q).view(s_q, 1)
            j = torch.arange(s_k).view(1, s_k)
            hidden = j > i + (s_k - s_q)
            logits = logits.masked_fill(hidden.view(1, 1, s_q, s_k), min_val)

        # 10: softmax over keys, result in the logits' dtype
        probs = torch.softmax(logits.to(_ACC), dim=-1).to(logits.dtype)

        # 12: P v, heads concatenated head-major, output projection
        pv_dtype = vh.dtype
        ctx = torch.matmul(probs.to(pv_dtype).to(_ACC), vh.to(_ACC)).to(pv_dtype)
        ctx = ctx.permute(0, 2, 1, 3).reshape(b, s_q, dim)
        out = _linear(ctx, p["out_proj.weight"], p["out_proj.bias"])
        return out, (probs if needs_weights else None), cache

    __call__ = forward


__all__ = ["SpecMQA", "NORM_TYPES", "alibi_slopes", "alibi_bias", "layer_norm", "rms_norm",
           "apply_norm"]
