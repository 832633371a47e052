"""softmax_scale <= 0 through a real mqa-server, against Zeta's published module.

The spec uses any set scale as given, 0 and negative ones included: the logits are (q . k) * scale, then masked,
then softmaxed, so a scale of 0 attends uniformly to the unmasked keys and a negative one prefers the least
similar keys. Fused attention kernels that mask with -inf before applying the scale got NaN there (0 * -inf) or
+inf; these tests sweep the stateless Forward over both attention paths and the paged pass of sessions.
"""

import numpy as np
import pytest
import torch

from conftest import from_wire, to_wire
from zeta_loader import load_zeta_mqa

DIM, HEADS, SEED = 32, 4, 11
SCALES = {"zero": 0.0, "neg": -0.25, "pos": 0.5}  # pos: the control, which already worked
IMPLS = ("torch", "flash")


def model_name(impl: str, tag: str) -> str:
    return f"{impl}-{tag}"


def config() -> dict:
    models = []
    for impl in IMPLS:
        for tag, scale in SCALES.items():
            models.append({"name": model_name(impl, tag), "num_layers": 1, "dim": DIM, "heads": HEADS,
                           "seed": SEED, "device": "cpu", "dtype": "float32", "attn_impl": impl,
                           "softmax_scale": scale, "max_tokens_per_session": 64})
    return {"models": models, "log_level": "warn"}


def zeta(scale: float):
    """The layer every model above built: Zeta's module right after torch.manual_seed(seed) (layer 0)."""
    mqa, _ = load_zeta_mqa()
    torch.manual_seed(SEED)
    return mqa(DIM, HEADS, attn_impl="torch", softmax_scale=scale).eval()


def rel_err(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.fixture(scope="module")
def server_and_stub(pb, tmp_path_factory):
    import grpc

    from conftest import ServerProcess

    server = ServerProcess(tmp_path_factory.mktemp("softmax_scale"), config())
    channel = grpc.insecure_channel(server.target)
    yield server, pb.grpc.MqaServiceStub(channel)
    channel.close()
    server.kill()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("tag", list(SCALES))
def test_forward_matches_zeta_for_every_scale_causality_and_length(pb, server_and_stub, impl, tag):
    _, stub = server_and_stub
    reference = zeta(SCALES[tag])
    rng = np.random.default_rng(10 * IMPLS.index(impl) + list(SCALES).index(tag))
    failures = []
    for causal in (None, True, False):  # None: the field left unset (the spec's default, causal)
        for s in (1, 2, 3, 7):
            x = rng.standard_normal((2, s, DIM), dtype=np.float32)
            req = pb.svc.ForwardRequest(model=model_name(impl, tag), layer=0, x=to_wire(pb, x))
            if causal is not None:
                req.causal = causal
            got = from_wire(stub.Forward(req, timeout=60).out)
            with torch.no_grad():
                want, _, _ = reference(torch.from_numpy(x), causal=True if causal is None else causal)
            want = want.numpy()
            assert np.isfinite(want).all(), "Zeta's output itself is not finite"
            where = f"causal={causal} s={s}"
            if not np.isfinite(got).all():
                rows = sorted({int(i) for i in np.argwhere(~np.isfinite(got))[:, 1]})
                failures.append(f"{where}: non-finite output in query rows {rows}")
            elif rel_err(got, want) > 1e-5:
                failures.append(f"{where}: relative error {rel_err(got, want):.3g}")
    assert not failures, f"{impl} with softmax_scale={SCALES[tag]}: " + "; ".join(failures)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("tag", list(SCALES))
def test_session_steps_match_zeta_for_every_scale(pb, server_and_stub, impl, tag):
    """Prefill, decode steps and a later chunk go through the engine's paged pass (its prefill attention against
    the paged cache, its batched decode attention); together they must equal one causal pass of Zeta's."""
    _, stub = server_and_stub
    rng = np.random.default_rng(7)
    x = rng.standard_normal((1, 10, DIM), dtype=np.float32)
    sid = stub.CreateSession(pb.svc.CreateSessionRequest(model=model_name(impl, tag)), timeout=30).session.session_id
    outs = []
    for a, b in [(0, 4), (4, 5), (5, 6), (6, 7), (7, 10)]:
        req = pb.svc.StepRequest(step=pb.svc.StepInput(session_id=sid, layer=0, x=to_wire(pb, x[:, a:b]),
                                                       position=a, sequence=b))
        outs.append(from_wire(stub.Step(req, timeout=60).result.out))
    got = np.concatenate(outs, axis=1)
    with torch.no_grad():
        want, _, _ = zeta(SCALES[tag])(torch.from_numpy(x), causal=True)
    assert np.isfinite(got).all(), f"non-finite step output: {np.argwhere(~np.isfinite(got))[:4]}"
    assert rel_err(got, want.numpy()) < 1e-5
