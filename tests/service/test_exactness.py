"""Every answer right, and every step applied exactly once, seen from an outside Python grpcio client against
Zeta's published module: steps the engine chunks (non-causal, ALiBi), empty steps, and steps retried after
their answer was lost (DEADLINE_EXCEEDED)."""

import random
import urllib.request

import grpc
import numpy as np
import pytest
import torch

from conftest import from_wire, to_wire
from spec_mqa import alibi_bias
from test_service import rel_err, zeta_layer

MODEL = {"name": "m", "num_layers": 1, "dim": 64, "heads": 4, "seed": 11, "device": "cpu", "dtype": "float32",
         "max_tokens_per_session": 256}


def step(pb, sid, x, position=None, layer=0, seq=0):
    kw = {} if position is None else {"position": position}
    return pb.svc.StepRequest(step=pb.svc.StepInput(session_id=sid, layer=layer, x=to_wire(pb, x), sequence=seq,
                                                    **kw))


def zeta_steps(model, steps, causal, alibi):
    """Zeta's layer run step by step with its own cache: the spec's answer for each step."""
    layer = zeta_layer(model, 0)
    total = sum(x.shape[1] for x in steps)
    bias = alibi_bias(model["heads"], total, full=not causal) if alibi else None
    past, outs = None, []
    with torch.no_grad():
        for x in steps:
            out, _, past = layer(torch.from_numpy(x), past_key_value=past if past is not None else (),
                                 bias=bias, causal=causal)
            outs.append(out.numpy())
    return outs


@pytest.mark.parametrize("chunk", [1, 4, 7])
def test_chunked_steps_equal_zeta_for_every_mask(pb, start_server, stub_for, chunk):
    """A step longer than --max-prefill-chunk gives the spec's answer, causal or not, with or
    without ALiBi (the engine used to cut non-causal steps so early queries missed later keys)."""
    server = start_server({"models": [MODEL]}, args=("--max-prefill-chunk", str(chunk)))
    stub = stub_for(server)
    rng = np.random.default_rng(chunk)
    for causal in (True, False):
        for alibi in (False, True):
            for lengths in ([6], [3, 9], [1, 17, 2]):
                bias = pb.svc.POSITION_BIAS_ALIBI if alibi else pb.svc.POSITION_BIAS_NONE
                sid = stub.CreateSession(pb.svc.CreateSessionRequest(model="m", causal=causal, position_bias=bias),
                                         timeout=30).session.session_id
                xs = [rng.standard_normal((1, n, 64), dtype=np.float32) for n in lengths]
                pos, got = 0, []
                for x in xs:
                    r = stub.Step(step(pb, sid, x, position=pos), timeout=60).result
                    assert (r.position, r.num_tokens) == (pos, x.shape[1])
                    got.append(from_wire(r.out))
                    pos += x.shape[1]
                want = zeta_steps(MODEL, xs, causal, alibi)
                for i, (g, w) in enumerate(zip(got, want)):
                    assert rel_err(g, w) < 1e-5, (causal, alibi, lengths, i)
                stub.CloseSession(pb.svc.CloseSessionRequest(session_id=sid), timeout=30)


def test_empty_step_is_an_empty_answer(pb, start_server, stub_for):
    """The spec gives an empty output for a zero-length input; a step with s = 0 is answered so,
    in either mask, and changes nothing."""
    server = start_server({"models": [MODEL]})
    stub = stub_for(server)
    for causal in (True, False):
        sid = stub.CreateSession(pb.svc.CreateSessionRequest(model="m", causal=causal), timeout=30).session.session_id
        stub.Step(step(pb, sid, np.ones((1, 2, 64), np.float32)), timeout=30)
        r = stub.Step(step(pb, sid, np.zeros((1, 0, 64), np.float32), position=2), timeout=30).result
        assert (r.position, r.num_tokens, list(r.out.shape)) == (2, 0, [1, 0, 64])
        s = stub.GetSession(pb.svc.GetSessionRequest(session_id=sid), timeout=30).session
        assert list(s.layer_positions) == [2]


def metric(server, sample):
    body = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    for line in body.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no sample {sample}")


def dropped(server, reason):
    return metric(server, f'mqa_requests_dropped_total{{reason="{reason}"}}')


def test_retried_steps_apply_every_token_exactly_once(pb, start_server, stub_for):
    """Unary steps with deadlines of 1 us to 2 ms; whatever came back DEADLINE_EXCEEDED is sent
    again (same position, same input) until it is answered. Every token is applied exactly once, the answers are
    Zeta's, and the dropped ones count as deadline drops, not cancellations."""
    server = start_server({"models": [MODEL]})
    stub = stub_for(server)
    rng = np.random.default_rng(3)
    pyrng = random.Random(3)
    n = 200
    sid = stub.CreateSession(pb.svc.CreateSessionRequest(model="m"), timeout=30).session.session_id
    xs = [rng.standard_normal((1, 1, 64), dtype=np.float32) for _ in range(n)]
    got, lost = [], 0
    for pos, x in enumerate(xs):
        req = step(pb, sid, x, position=pos)
        try:
            r = stub.Step(req, timeout=pyrng.uniform(1e-6, 2e-3)).result
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED, e
            lost += 1
            r = stub.Step(req, timeout=30).result  # the retry: answered whether or not the first ran
        assert r.position == pos
        got.append(from_wire(r.out))
    assert lost > 0, "no deadline fired: the test did not test anything"
    s = stub.GetSession(pb.svc.GetSessionRequest(session_id=sid), timeout=30).session
    assert list(s.layer_positions) == [n]
    want = zeta_steps(MODEL, xs, True, False)
    assert rel_err(np.concatenate(got, 1), np.concatenate(want, 1)) < 1e-5
    # A repeat with other input is refused with the current position; nothing is applied.
    with pytest.raises(grpc.RpcError) as e:
        stub.Step(step(pb, sid, xs[0] + 1, position=n - 1), timeout=30)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"holds {n} tokens" in e.value.details()
    assert dropped(server, "cancelled") == 0
    # Each lost answer was dropped by the server for its deadline, replayed to the retry, or never reached it.
    replayed = metric(server, "mqa_steps_replayed_total")
    assert dropped(server, "deadline") + replayed <= lost
    print(f"{lost} of {n} steps lost their answer: {dropped(server, 'deadline'):.0f} dropped for their deadline, "
          f"{replayed:.0f} applied and answered again to the retry")
