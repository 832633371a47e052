"""mqa-server as a process, driven from Python (grpcio, code generated from proto/ at test time), checked against
Zeta's published module: proves the schema is usable from another language and the numbers are the spec's.
Also: reflection and health through `buf curl`, SIGTERM drain, and the process's structured logs."""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
import torch

from conftest import SMALL, from_wire, to_wire
from zeta_loader import load_zeta_mqa

# buf (from the buf-bin wheel): next to the venv's python, else on PATH (the GPU machine's /tmp/site/bin).
BUF = shutil.which("buf", path=f"{pathlib.Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


def zeta_layer(model: dict, layer: int):
    """The layer the server built: Zeta's module constructed right after torch.manual_seed(seed + layer)."""
    mqa, _ = load_zeta_mqa()
    torch.manual_seed(model["seed"] + layer)
    return mqa(model["dim"], model["heads"], attn_impl="torch").eval()


def rel_err(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def test_python_session_gets_zetas_numbers(pb, start_server, stub_for):
    server = start_server()
    stub = stub_for(server)
    rng = np.random.default_rng(1)
    session = stub.CreateSession(pb.svc.CreateSessionRequest(model="small"), timeout=30).session
    assert len(session.session_id) == 32 and list(session.layer_positions) == [0, 0]
    x = rng.standard_normal((1, 10, 64), dtype=np.float32)
    outs = {0: [], 1: []}
    for layer in (0, 1):
        steps = [(0, 4)] + [(t, t + 1) for t in range(4, 10)]
        for a, b in steps:
            req = pb.svc.StepRequest(step=pb.svc.StepInput(session_id=session.session_id, layer=layer,
                                                           x=to_wire(pb, x[:, a:b]), position=a, sequence=b))
            r = stub.Step(req, timeout=30).result
            assert (r.position, r.num_tokens, r.sequence) == (a, b - a, b)
            outs[layer].append(from_wire(r.out))
    for layer in (0, 1):
        with torch.no_grad():
            want, _, _ = zeta_layer(SMALL, layer)(torch.from_numpy(x), causal=True)
        got = np.concatenate(outs[layer], axis=1)
        assert got.shape == (1, 10, 64)
        assert rel_err(got, want.numpy()) < 1e-5, f"layer {layer}"
    state = stub.GetSession(pb.svc.GetSessionRequest(session_id=session.session_id), timeout=30).session
    assert list(state.layer_positions) == [10, 10]
    stub.CloseSession(pb.svc.CloseSessionRequest(session_id=session.session_id), timeout=30)
    with pytest.raises(grpc.RpcError) as err:
        stub.GetSession(pb.svc.GetSessionRequest(session_id=session.session_id), timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_python_forward_with_cache_and_mask_gets_zetas_numbers(pb, start_server, stub_for):
    server = start_server()
    stub = stub_for(server)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 64), dtype=np.float32)
    k = rng.standard_normal((2, 1, 16, 4), dtype=np.float32)
    v = rng.standard_normal((2, 1, 4, 16), dtype=np.float32)
    mask = np.ones((2, 7), dtype=np.bool_)
    mask[1, 2] = False
    req = pb.svc.ForwardRequest(model="small", layer=1, x=to_wire(pb, x),
                                past_key_value=pb.tensor.KvCache(key=to_wire(pb, k), value=to_wire(pb, v)),
                                return_cache=True, mask=to_wire(pb, mask), needs_weights=True)
    r = stub.Forward(req, timeout=30)
    with torch.no_grad():
        out, w, (ck, cv) = zeta_layer(SMALL, 1)(torch.from_numpy(x), past_key_value=(torch.from_numpy(k),
                                                torch.from_numpy(v)), mask=torch.from_numpy(mask),
                                                needs_weights=True)
    assert rel_err(from_wire(r.out), out.numpy()) < 1e-5
    assert rel_err(from_wire(r.weights), w.numpy()) < 1e-5
    np.testing.assert_array_equal(from_wire(r.cache.key), ck.numpy())
    np.testing.assert_array_equal(from_wire(r.cache.value), cv.numpy())

    half = pb.svc.ForwardRequest(model="small", layer=0, x=to_wire(pb, x.astype(np.float16)))
    r16 = stub.Forward(half, timeout=30)
    assert r16.out.dtype == pb.tensor.DATA_TYPE_FLOAT16  # answered in the caller's dtype

    bad = pb.svc.ForwardRequest(model="small", layer=0, x=to_wire(pb, x[:, :, :32]))
    with pytest.raises(grpc.RpcError) as err:
        stub.Forward(bad, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "64" in err.value.details()


def test_python_stream_multiplexes_sessions(pb, start_server, stub_for):
    server = start_server()
    stub = stub_for(server)
    rng = np.random.default_rng(3)
    n, tokens = 16, 5
    ids = [stub.CreateSession(pb.svc.CreateSessionRequest(model="small"), timeout=30).session.session_id
           for _ in range(n)]
    xs = rng.standard_normal((n, tokens, 64), dtype=np.float32)
    sent = {}

    def requests():
        seq = 0
        for t in range(tokens):
            for i in range(n):
                seq += 1
                sent[seq] = (i, t)
                yield pb.svc.StreamStepsRequest(step=pb.svc.StepInput(
                    session_id=ids[i], layer=0, x=to_wire(pb, xs[i:i + 1, t:t + 1]), sequence=seq))
        seq += 1
        sent[seq] = (-1, -1)  # an error in one step must not end the stream
        yield pb.svc.StreamStepsRequest(step=pb.svc.StepInput(session_id="f" * 32, layer=0,
                                                              x=to_wire(pb, xs[0:1, 0:1]), sequence=seq))

    got = np.zeros((n, tokens, 64), dtype=np.float32)
    codes = {}
    for resp in stub.StreamSteps(requests(), timeout=60):
        i, t = sent[resp.result.sequence]
        codes[resp.result.sequence] = resp.status.code
        if i >= 0:
            assert resp.status.code == 0, resp.status.message
            assert resp.result.position == t
            got[i, t] = from_wire(resp.result.out)[0, 0]
    assert len(codes) == n * tokens + 1
    assert codes[n * tokens + 1] == grpc.StatusCode.NOT_FOUND.value[0]
    layer = zeta_layer(SMALL, 0)
    with torch.no_grad():
        for i in range(n):
            want, _, _ = layer(torch.from_numpy(xs[i:i + 1]))
            assert rel_err(got[i:i + 1], want.numpy()) < 1e-5, f"session {i}"


def buf_curl(server, method: str, data: str = "{}"):
    cmd = [str(BUF), "curl", "--protocol", "grpc", "--http2-prior-knowledge", "--timeout", "20s", "-d", data,
           f"http://{server.target}/{method}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout}\n{r.stderr}"
    return json.loads(r.stdout)


def test_health_and_reflection_answer_buf_curl(pb, start_server):
    assert BUF, "buf not found (scripts/setup.sh installs it through the buf-bin package)"
    server = start_server()
    listed = subprocess.run([str(BUF), "curl", "--protocol", "grpc", "--http2-prior-knowledge", "--list-methods",
                             f"http://{server.target}"], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert "mqa.v1.MqaService/StreamSteps" in listed.stdout
    assert buf_curl(server, "grpc.health.v1.Health/Check") == {"status": "SERVING"}
    assert buf_curl(server, "grpc.health.v1.Health/Check", '{"service": "mqa.v1.MqaService"}') == {
        "status": "SERVING"}
    models = buf_curl(server, "mqa.v1.MqaService/ListModels")
    assert [m["name"] for m in models["models"]] == ["slow", "small"]
    assert models["models"][1]["layers"][0]["headDim"] == "16"


def test_sigterm_drains_then_exits(pb, start_server, stub_for):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    server = start_server(args=["--drain-timeout-ms", "20000"])
    stub = stub_for(server)
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(server.target))
    busy = stub.CreateSession(pb.svc.CreateSessionRequest(model="slow"), timeout=30).session.session_id
    other = stub.CreateSession(pb.svc.CreateSessionRequest(model="small"), timeout=30).session.session_id
    long_x = to_wire(pb, np.random.default_rng(4).standard_normal((1, 3072, 512), dtype=np.float32))
    result = {}

    def long_step():
        try:
            r = stub.Step(pb.svc.StepRequest(step=pb.svc.StepInput(session_id=busy, x=long_x)), timeout=60)
            result["tokens"] = r.result.num_tokens
        except grpc.RpcError as e:  # recorded, asserted below
            result["error"] = e

    t = threading.Thread(target=long_step)
    t.start()
    time.sleep(0.1)  # the long step is in flight
    server.terminate()
    deadline = time.monotonic() + 20
    while health.Check(health_pb2.HealthCheckRequest(), timeout=10).status != health_pb2.HealthCheckResponse.NOT_SERVING:
        assert time.monotonic() < deadline, "health never went NOT_SERVING"
        time.sleep(0.01)
    with pytest.raises(grpc.RpcError) as err:
        stub.CreateSession(pb.svc.CreateSessionRequest(model="small"), timeout=30)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    t.join(timeout=60)
    assert result.get("tokens") == 3072, result  # the in-flight step finished
    x = to_wire(pb, np.ones((1, 1, 64), dtype=np.float32))
    stub.Step(pb.svc.StepRequest(step=pb.svc.StepInput(session_id=other, x=x)), timeout=30)  # still served
    assert server.proc.poll() is None  # open sessions hold the drain
    for sid in (busy, other):
        stub.CloseSession(pb.svc.CloseSessionRequest(session_id=sid), timeout=30)
    closed_at = time.monotonic()
    assert server.wait(timeout=15) == 0
    assert time.monotonic() - closed_at < 10
    log = server.log()
    for event in ("event=server_started", "event=session_created", "event=drain_started", "event=drain_done",
                  "event=server_stopped"):
        assert event in log, f"{event} missing from the server log:\n{log}"


def test_drain_budget_bounds_the_exit(pb, start_server, stub_for):
    server = start_server(args=["--drain-timeout-ms", "1500"])
    stub = stub_for(server)
    stub.CreateSession(pb.svc.CreateSessionRequest(model="small"), timeout=30)  # left open on purpose
    start = time.monotonic()
    server.terminate()
    assert server.wait(timeout=30) == 0
    elapsed = time.monotonic() - start
    assert 1.4 < elapsed < 10, elapsed
    assert "event=drain_budget_spent" in server.log()


def test_json_logs_and_bad_config(pb, start_server, tmp_path):
    server = start_server(config={"models": [SMALL], "log_format": "json"})
    server.terminate()
    assert server.wait(timeout=30) == 0
    events = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    assert any(e["event"] == "server_started" and e["port"] == server.port for e in events), events
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"models": [dict(SMALL, hedas=4)]}))
    r = subprocess.run([os.environ["MQA_SERVER_BIN"], "--config", str(bad)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2
    assert "hedas" in r.stderr and "INVALID_ARGUMENT" in r.stderr


def test_devices_all_places_sessions_and_says_where(pb, start_server, stub_for):
    """--devices all: every GPU torch sees (the CPU, logged, where there is none); sessions report their device."""
    gpus = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    expected = gpus or ["cpu"]
    # A fixed KV budget: the default (90% of each GPU's free memory) would starve tests running beside this one.
    server = start_server(config={"models": [SMALL]}, args=["--devices", "all", "--kv-cache-bytes", str(64 << 20)])
    stub = stub_for(server)
    model = stub.GetModel(pb.svc.GetModelRequest(name="small"), timeout=30).model
    assert list(model.devices) == expected
    assert model.layers[0].device == expected[0]
    assert ("'all' found no CUDA device here, so it means the CPU" in server.log()) == (not gpus)
    # As many sessions as devices: with equal free blocks each goes to the device with the fewest sessions.
    sessions = [stub.CreateSession(pb.svc.CreateSessionRequest(model="small"), timeout=30).session
                for _ in expected]
    assert sorted(s.device for s in sessions) == sorted(expected)
    x = np.random.default_rng(8).standard_normal((1, 3, 64), dtype=np.float32)
    for s in sessions:
        step = pb.svc.StepRequest(step=pb.svc.StepInput(session_id=s.session_id, layer=0, x=to_wire(pb, x)))
        out = from_wire(stub.Step(step, timeout=60).result.out)
        assert out.shape == (1, 3, 64)
        got = stub.GetSession(pb.svc.GetSessionRequest(session_id=s.session_id), timeout=30).session
        assert got.device == s.device and list(got.layer_positions) == [3, 0]


def test_session_demo_reports_prefill_and_decode_apart(start_server):
    """mqa-cli session-demo: prefill and decode each with its tokens, span, tokens/s and p50/p99; the throughput
    line is decode's rate, not decode tokens over a span that includes the prefill."""
    cli = os.environ.get("MQA_CLI_BIN")
    if not cli:
        pytest.fail("MQA_CLI_BIN is not set (run through ctest)")
    server = start_server()
    sessions, prefill, tokens = 3, 24, 5
    done = subprocess.run([cli, "--target", server.target, "session-demo", "--model", "small", "--sessions",
                           str(sessions), "--prefill", str(prefill), "--tokens", str(tokens)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n{server.log()}"
    out = done.stdout
    number = r"([0-9.]+)"
    phase = {}
    for name in ("prefill", "decode"):
        m = re.search(rf"^{name}: {number} tokens in {number} s, {number} tokens/s \(every layer\); "
                      rf"step p50 {number} ms  p99 {number} ms", out, re.M)
        assert m, f"no {name} line in:\n{out}"
        count, seconds, rate, p50, p99 = (float(g) for g in m.groups())
        phase[name] = (count, seconds, rate)
        assert seconds > 0 and 0 < p50 <= p99, m.group(0)
        # The span is printed to the millisecond: the rate must lie between count over the span's two ends.
        low, high = count / (seconds + 0.0005), count / max(seconds - 0.0005, 1e-9)
        assert low * 0.999 <= rate <= high * 1.001, m.group(0)
    assert phase["prefill"][0] == sessions * prefill
    assert phase["decode"][0] == sessions * tokens
    m = re.search(rf"^throughput: {number} tokens/s \(decode, every layer\)", out, re.M)
    assert m, out
    assert float(m.group(1)) == pytest.approx(phase["decode"][2], rel=1e-3)
