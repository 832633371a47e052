"""The stateless Forward's memory and work through a real mqa-server.

Without weights the attention runs in tiles of query rows, so the server's memory grows linearly in s (it grew
with s * s_k: one 1 MiB request of s = 4096 raised the peak RSS by about 540 MiB). The work of one request,
b * H * s * s_k attention scores, is capped by --max-forward-scores, and a needs_weights request whose weights
could not fit a reply is refused up front. Both refusals are RESOURCE_EXHAUSTED naming the limit and the figure.
"""

import warnings

import grpc
import numpy as np
import pytest
import torch

from conftest import from_wire, to_wire
from zeta_loader import load_zeta_mqa

DIM, HEADS, SEED = 64, 4, 21
LIMIT = 1 << 26               # --max-forward-scores for these servers: s = 4096 at b = 1, H = 4 is exactly it
MESSAGE_BYTES = 8 << 20       # --max-message-bytes
RSS_BOUND_MIB = 64            # linear in s: tiles, x, q/k/v, out; the untiled pass needed several hundred


def config() -> dict:
    return {"models": [{"name": impl, "num_layers": 1, "dim": DIM, "heads": HEADS, "seed": SEED, "device": "cpu",
                        "dtype": "float32", "attn_impl": impl, "max_tokens_per_session": 64}
                       for impl in ("torch", "flash")],
            "log_level": "warn"}


def start(start_server):
    return start_server(config(), args=("--max-forward-scores", str(LIMIT),
                                        "--max-message-bytes", str(MESSAGE_BYTES)))


def peak_rss_mib(pid: int) -> float:
    """VmHWM: the process's peak resident set, in MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc/<pid>/status")


def rel_err(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.mark.parametrize("impl", ["torch", "flash"])
def test_largest_admitted_forward_grows_rss_linearly(pb, start_server, stub_for, impl):
    server = start(start_server)
    stub = stub_for(server)
    rng = np.random.default_rng(3)
    s = 4096  # b * H * s * s = 1 * 4 * 4096 * 4096 = LIMIT: the largest admitted
    x = rng.standard_normal((1, s, DIM), dtype=np.float32)
    req = pb.svc.ForwardRequest(model=impl, layer=0, x=to_wire(pb, x))
    if impl == "flash":
        # A key-padding mask takes flash's general path, whose additive mask is as large as the logits.
        mask = np.ones((1, s), dtype=np.bool_)
        mask[0, 5] = False
        req.mask.CopyFrom(to_wire(pb, mask))
    # Warm-up at the same width: thread pools, allocator arenas and gRPC buffers exist before the baseline.
    small = pb.svc.ForwardRequest(model=impl, layer=0, x=to_wire(pb, x[:, :256]))
    stub.Forward(small, timeout=120)
    before = peak_rss_mib(server.proc.pid)
    out = from_wire(stub.Forward(req, timeout=300).out)
    growth = peak_rss_mib(server.proc.pid) - before
    print(f"{impl}: peak RSS {before:.0f} MiB -> +{growth:.1f} MiB for one s={s} Forward")
    assert out.shape == (1, s, DIM) and np.isfinite(out).all()
    assert growth < RSS_BOUND_MIB, f"{impl}: peak RSS grew by {growth:.0f} MiB for one s={s} Forward"


def test_forward_over_the_work_limit_is_refused_naming_it(pb, start_server, stub_for):
    server = start(start_server)
    stub = stub_for(server)
    x = np.zeros((1, 4097, DIM), dtype=np.float32)  # 4 * 4097 * 4097 = 67141636 > LIMIT
    with pytest.raises(grpc.RpcError) as err:
        stub.Forward(pb.svc.ForwardRequest(model="torch", layer=0, x=to_wire(pb, x)), timeout=60)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = err.value.details()
    for needle in ("--max-forward-scores", str(LIMIT), "67141636"):
        assert needle in details, f"{needle!r} not in {details!r}"
    # A past cache counts into s_k: 4 * 2048 * (6145 + 2048) > LIMIT although x alone would pass.
    k = np.zeros((1, 1, DIM // HEADS, 6145), dtype=np.float32)
    v = np.zeros((1, 1, 6145, DIM // HEADS), dtype=np.float32)
    req = pb.svc.ForwardRequest(model="flash", layer=0, x=to_wire(pb, x[:, :2048]),
                                past_key_value=pb.tensor.KvCache(key=to_wire(pb, k), value=to_wire(pb, v)))
    with pytest.raises(grpc.RpcError) as err:
        stub.Forward(req, timeout=60)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "8193" in err.value.details(), err.value.details()
    # Refusals cost nothing and leave the server serving.
    stub.Forward(pb.svc.ForwardRequest(model="torch", layer=0, x=to_wire(pb, x[:, :8])), timeout=60)


def test_weights_that_cannot_fit_a_reply_are_refused_up_front(pb, start_server, stub_for):
    server = start(start_server)
    stub = stub_for(server)
    x = np.zeros((1, 1024, DIM), dtype=np.float32)  # weights [1, 4, 1024, 1024] fp32 = 16 MiB > 8 MiB
    req = pb.svc.ForwardRequest(model="torch", layer=0, x=to_wire(pb, x), needs_weights=True)
    with pytest.raises(grpc.RpcError) as err:
        stub.Forward(req, timeout=60)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = err.value.details()
    for needle in ("needs_weights", "[1, 4, 1024, 1024]", str(16 << 20), str(MESSAGE_BYTES), "max_message_bytes"):
        assert needle in details, f"{needle!r} not in {details!r}"
    # Without weights the same request is fine.
    req.needs_weights = False
    assert from_wire(stub.Forward(req, timeout=120).out).shape == (1, 1024, DIM)


@pytest.mark.parametrize("impl", ["torch", "flash"])
def test_tiled_forward_matches_zeta(pb, start_server, stub_for, impl):
    """Large enough to run in about ten query tiles, with everything a tile must slice or offset: a past cache
    (bottom-right causal rows), a per-row bias, a key-padding mask."""
    server = start(start_server)
    stub = stub_for(server)
    rng = np.random.default_rng(5)
    b, s, past, d = 2, 1100, 5, DIM // HEADS
    x = rng.standard_normal((b, s, DIM), dtype=np.float32)
    k = (0.5 * rng.standard_normal((b, 1, d, past))).astype(np.float32)
    v = (0.5 * rng.standard_normal((b, 1, past, d))).astype(np.float32)
    bias = rng.standard_normal((1, 1, s, s + past), dtype=np.float32)
    mask = np.ones((b, s + past), dtype=np.bool_)
    mask[1, :3] = False
    mask[1, 700] = False
    req = pb.svc.ForwardRequest(model=impl, layer=0, x=to_wire(pb, x),
                                past_key_value=pb.tensor.KvCache(key=to_wire(pb, k), value=to_wire(pb, v)),
                                bias=to_wire(pb, bias), mask=to_wire(pb, mask))
    got = from_wire(stub.Forward(req, timeout=300).out)
    mqa, _ = load_zeta_mqa()
    torch.manual_seed(SEED)
    zeta = mqa(DIM, HEADS, attn_impl="torch").eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Zeta warns when both mask and bias are passed
        want, _, _ = zeta(torch.from_numpy(x), past_key_value=(torch.from_numpy(k), torch.from_numpy(v)),
                          bias=torch.from_numpy(bias), mask=torch.from_numpy(mask), causal=True)
    assert np.isfinite(got).all()
    assert rel_err(got, want.numpy()) < 1e-5
