"""mqa-server's Prometheus endpoint and its extra health port, as a process: the values after real traffic, the
text checked by `promtool check metrics`, a real Prometheus scraping it, and grpc.health.v1 on --health-listen.
Everything listens on 127.0.0.1 and every process is stopped at the end, pass or fail."""

import math
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import json

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import to_wire, require_tool

PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"


@pytest.fixture
def prometheus_tools():
    require_tool(PROMTOOL, "promtool (Debian package prometheus)")
    require_tool(PROMETHEUS, "prometheus")

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')


def scrape(port: int):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.headers.get("Content-Type"), r.read().decode()


def parse(text: str) -> dict:
    """{(name, ((label, value), ...)): float} for every sample line; label values here never hold commas."""
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        assert m, f"not a sample line: {line!r}"
        labels = ()
        if m.group(2):
            labels = tuple(sorted(tuple(kv.split("=", 1)) for kv in m.group(2).split(",")))
            labels = tuple((k, v.strip('"')) for k, v in labels)
        samples[(m.group(1), labels)] = float(m.group(3))
    return samples


def value(samples: dict, name: str, **labels) -> float:
    key = (name, tuple(sorted(labels.items())))
    assert key in samples, f"{key} missing from the scrape"
    return samples[key]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def step(pb, stub, session_id, layer, x, position):
    req = pb.svc.StepRequest(step=pb.svc.StepInput(session_id=session_id, layer=layer, x=to_wire(pb, x),
                                                   position=position))
    return stub.Step(req, timeout=30).result


def test_metrics_after_traffic_pass_promtool_and_reach_prometheus(pb, start_server, stub_for, tmp_path, prometheus_tools):
    server = start_server()
    assert server.metrics_port > 0
    stub = stub_for(server)
    rng = np.random.default_rng(3)

    # Three sessions, each a prefill of 5 tokens and one decode token on both layers: 12 steps. Two are closed,
    # one stays open, so the KV cache is in use when scraped.
    sessions = [stub.CreateSession(pb.svc.CreateSessionRequest(model="small"), timeout=30).session.session_id
                for _ in range(3)]
    for sid in sessions:
        for layer in (0, 1):
            step(pb, stub, sid, layer, rng.standard_normal((1, 5, 64), dtype=np.float32), 0)
            step(pb, stub, sid, layer, rng.standard_normal((1, 1, 64), dtype=np.float32), 5)
    for sid in sessions[:2]:
        stub.CloseSession(pb.svc.CloseSessionRequest(session_id=sid), timeout=30)
    with pytest.raises(grpc.RpcError) as err:
        step(pb, stub, "0" * 32, 0, rng.standard_normal((1, 1, 64), dtype=np.float32), 0)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    content_type, text = scrape(server.metrics_port)
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    s = parse(text)
    assert value(s, "mqa_sessions_created_total") == 3
    assert value(s, "mqa_sessions_evicted_total", reason="closed") == 2
    assert value(s, "mqa_sessions_evicted_total", reason="expired") == 0
    assert value(s, "mqa_sessions", state="idle") + value(s, "mqa_sessions", state="active") == 1
    assert value(s, "mqa_steps_total") == 12
    assert value(s, "mqa_step_errors_total", code="NOT_FOUND") >= 1
    assert value(s, "mqa_step_errors_total", code="INTERNAL") == 0
    assert value(s, "mqa_step_duration_seconds_count") == 12
    assert value(s, "mqa_step_duration_seconds_bucket", le="+Inf") == 12
    assert 0 < value(s, "mqa_step_duration_seconds_sum") < 60
    # Cumulative buckets never decrease, and the last finite one (10 s) holds every step here.
    buckets = [(float(le), v) for (name, labels), v in s.items() if name == "mqa_step_duration_seconds_bucket"
               for _, le in labels if le != "+Inf"]
    buckets.sort()
    assert [v for _, v in buckets] == sorted(v for _, v in buckets) and buckets[-1] == (10.0, 12)
    assert value(s, "mqa_batch_size_count") >= 1
    assert value(s, "mqa_batch_size_bucket", le="+Inf") == value(s, "mqa_batch_size_count")
    assert value(s, "mqa_batch_size_sum") >= 12
    # The workers' time in those passes, by phase; on the CPU every pass synchronises, so none overlapped.
    assert value(s, "mqa_pass_worker_seconds_total", phase="launch") > 0
    for phase in ("gather", "wait", "scatter"):
        assert value(s, "mqa_pass_worker_seconds_total", phase=phase) >= 0
    assert value(s, "mqa_pass_worker_seconds_total", phase="wait") == 0
    assert value(s, "mqa_passes_overlapped_total") == 0
    assert 0 < value(s, "mqa_kv_cache_usage_ratio") <= 1
    used, total = value(s, "mqa_kv_cache_blocks_used"), value(s, "mqa_kv_cache_blocks")
    assert used > 0 and math.isclose(value(s, "mqa_kv_cache_usage_ratio"), used / total)
    assert value(s, "mqa_kv_cache_block_size_tokens") == 16
    # Per device (one here, the CPU): the same numbers as the totals.
    assert value(s, "mqa_device_kv_cache_blocks", device="cpu") == total
    assert value(s, "mqa_device_kv_cache_blocks_used", device="cpu") == used
    assert value(s, "mqa_device_sessions", device="cpu") == 1
    assert value(s, "mqa_device_queued_requests", device="cpu") == 0
    assert value(s, "mqa_device_running_requests", device="cpu") == 0
    assert value(s, "mqa_queued_requests") == 0 and value(s, "mqa_running_requests") == 0
    assert value(s, "mqa_kv_cache_exhausted_total") == 0
    assert value(s, "mqa_requests_dropped_total", reason="cancelled") == 0
    assert value(s, "mqa_requests_dropped_total", reason="deadline") == 0
    assert value(s, "mqa_draining") == 0
    assert value(s, "mqa_build_info", version="0.1.0") == 1
    for name in ("mqa_queued_requests", "mqa_step_duration_seconds", "mqa_batch_size", "mqa_sessions"):
        assert f"# HELP {name} " in text and f"# TYPE {name} " in text
    with pytest.raises(urllib.error.HTTPError) as http_err:
        urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/", timeout=10)
    assert http_err.value.code == 404

    # Prometheus' own linter on the real output: format and naming conventions.
    lint = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert lint.returncode == 0, f"promtool check metrics:\n{lint.stdout}{lint.stderr}"

    # A real Prometheus scraping the endpoint every second, then asked through its HTTP API.
    prom_port = free_port()
    prom_dir = tmp_path / "prometheus"
    (prom_dir / "data").mkdir(parents=True)
    (prom_dir / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: mqa\n    scrape_interval: 1s\n    scrape_timeout: 1s\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{server.metrics_port}']\n")
    log = open(prom_dir / "prometheus.log", "wb")
    prom = subprocess.Popen(
        [PROMETHEUS, f"--config.file={prom_dir / 'prometheus.yml'}", f"--storage.tsdb.path={prom_dir / 'data'}",
         f"--web.listen-address=127.0.0.1:{prom_port}"],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        query = urllib.parse.urlencode({"query": "mqa_sessions_created_total"})
        url = f"http://127.0.0.1:{prom_port}/api/v1/query?{query}"
        deadline = time.monotonic() + 60
        result = []
        while time.monotonic() < deadline:
            assert prom.poll() is None, "prometheus exited:\n" + (prom_dir / "prometheus.log").read_text()
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    body = json.load(r)
                result = body["data"]["result"]
                if result:
                    break
            except (urllib.error.URLError, ConnectionError):
                pass  # not listening yet
            time.sleep(0.5)
        assert result, "prometheus never had mqa_sessions_created_total:\n" + \
            (prom_dir / "prometheus.log").read_text()
        assert result[0]["metric"]["job"] == "mqa"
        assert float(result[0]["value"][1]) == 3
    finally:
        prom.terminate()
        try:
            prom.wait(timeout=30)
        except subprocess.TimeoutExpired:
            prom.kill()
            prom.wait(timeout=30)
        log.close()


def test_metrics_endpoint_can_be_disabled(start_server):
    server = start_server(args=["--metrics-listen="])
    assert server.metrics_port == 0


def test_draining_shows_in_metrics(pb, start_server, stub_for):
    server = start_server(args=["--drain-timeout-ms", "5000"])
    stub = stub_for(server)
    sid = stub.CreateSession(pb.svc.CreateSessionRequest(model="small"), timeout=30).session.session_id
    server.terminate()  # the open session keeps the drain going until it is closed
    deadline = time.monotonic() + 30
    while value(parse(scrape(server.metrics_port)[1]), "mqa_draining") != 1:
        assert time.monotonic() < deadline, "mqa_draining never became 1"
        time.sleep(0.05)
    stub.CloseSession(pb.svc.CloseSessionRequest(session_id=sid), timeout=30)
    assert server.wait(timeout=60) == 0


def test_health_listen_serves_grpc_health(start_server, tmp_path):
    health_port_file = tmp_path / "health_port"
    server = start_server(args=["--health-listen", "127.0.0.1:0", "--health-port-file", str(health_port_file)])
    health_port = int(health_port_file.read_text().strip())
    assert health_port > 0 and health_port != server.port
    with grpc.insecure_channel(f"127.0.0.1:{health_port}") as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "mqa.v1.MqaService"):
            resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=30)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING, service


def test_what_computed_each_model_is_counted_by_path_and_reason(pb, start_server, stub_for):
    """attn_impl triton on the CPU cannot use the fused kernels: every paged pass and every stateless Forward of
    that model is served by the torch path and counted with its reason; a torch model counts none."""
    models = [{"name": impl, "num_layers": 1, "dim": 64, "heads": 4, "seed": 5, "device": "cpu", "dtype": "float32",
               "attn_impl": impl, "max_tokens_per_session": 64} for impl in ("torch", "triton")]
    server = start_server({"models": models, "log_level": "warn"})
    stub = stub_for(server)
    rng = np.random.default_rng(4)
    for impl in ("torch", "triton"):
        sid = stub.CreateSession(pb.svc.CreateSessionRequest(model=impl), timeout=30).session.session_id
        step(pb, stub, sid, 0, rng.standard_normal((1, 3, 64), dtype=np.float32), 0)   # one pass each, run alone
        step(pb, stub, sid, 0, rng.standard_normal((1, 1, 64), dtype=np.float32), 3)
        x = to_wire(pb, rng.standard_normal((1, 2, 64), dtype=np.float32))
        stub.Forward(pb.svc.ForwardRequest(model=impl, layer=0, x=x), timeout=30)
        stub.Forward(pb.svc.ForwardRequest(model=impl, layer=0, x=x, needs_weights=True), timeout=30)
    s = parse(scrape(server.metrics_port)[1])
    for impl in ("torch", "triton"):
        assert value(s, "mqa_paged_passes_total", model=impl, device="cpu", attn_impl=impl) == 2
        assert value(s, "mqa_cuda_graph_captures_total", model=impl, device="cpu", attn_impl=impl) == 0
        assert value(s, "mqa_cuda_graph_replays_total", model=impl, device="cpu", attn_impl=impl) == 0
        assert value(s, "mqa_cuda_graph_failures_total", model=impl, device="cpu", attn_impl=impl) == 0
    fallbacks = {labels: v for (name, labels), v in s.items() if name == "mqa_attention_fallbacks_total"}
    assert fallbacks == {
        (("attn_impl", "triton"), ("device", "cpu"), ("model", "triton"), ("path", "paged"),
         ("reason", "unsupported_layer")): 2,
        (("attn_impl", "triton"), ("device", "cpu"), ("model", "triton"), ("path", "forward"),
         ("reason", "unsupported_layer")): 1,
        (("attn_impl", "triton"), ("device", "cpu"), ("model", "triton"), ("path", "forward"),
         ("reason", "needs_weights")): 1,
    }
