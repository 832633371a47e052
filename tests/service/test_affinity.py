"""Session affinity behind a real proxy: three mqa-server replicas behind Debian's nginx running
deploy/nginx/mqa.conf (upstream servers and listen address rewritten for loopback), which hashes on the
x-mqa-session-key header. Every call of a session must reach the replica that holds it (a step landing anywhere
else fails with NOT_FOUND), and the sessions must spread over the replicas. The C++ client (mqa-cli, which
multiplexes sessions on streams) must work through the proxy too.

MQA_SERVER_BIN names the server; MQA_CLI_BIN names mqa-cli (else <build>/client/mqa-cli next to the server's
build directory). Fails when nginx is missing, unless MQA_ALLOW_MISSING_TOOLS=1."""

import collections
import hashlib
import os
import pathlib
import re
import shutil
import socket
import subprocess
import time

import grpc
import numpy as np
import pytest

from conftest import ROOT, SMALL, to_wire, require_tool

NGINX = shutil.which("nginx", path="/usr/sbin:/usr/bin:" + os.environ.get("PATH", ""))
NGINX_CONF = ROOT / "deploy" / "nginx" / "mqa.conf"
KEY = "x-mqa-session-key"
REPLICAS = 3
SESSIONS = 48

@pytest.fixture(autouse=True)
def _needs_nginx():
    require_tool(NGINX, "nginx")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nginx_config(listen_port: int, upstream_ports) -> str:
    """deploy/nginx/mqa.conf with the replicas and the listen address replaced; everything else as shipped."""
    text = NGINX_CONF.read_text()
    upstream_server = re.compile(r"^( *)server \S+:\d+[^;\n]*;\n", re.MULTILINE)
    shipped = upstream_server.findall(text)
    assert len(shipped) == 3, "expected three upstream servers in deploy/nginx/mqa.conf"
    indent = shipped[0]
    replicas = "".join(f"{indent}server 127.0.0.1:{p} max_fails=1 fail_timeout=10s;\n" for p in upstream_ports)
    first = True

    def replace(_):
        nonlocal first
        out = replicas if first else ""
        first = False
        return out

    text = upstream_server.sub(replace, text)
    text, listens = re.subn(r"listen \d+ http2;", f"listen 127.0.0.1:{listen_port} http2;", text)
    assert listens == 1, "expected one 'listen PORT http2;' in deploy/nginx/mqa.conf"
    return text


class Nginx:
    """The real nginx in the foreground, its prefix, pid file and logs in `tmp`."""

    def __init__(self, tmp: pathlib.Path, upstream_ports):
        self.tmp = tmp
        self.port = free_port()
        self.conf = tmp / "nginx.conf"
        self.conf.write_text(nginx_config(self.port, upstream_ports))
        self.error_log = tmp / "error.log"
        self.access_log = tmp / "access.log"  # the config logs requests to stdout
        self._stdout = open(self.access_log, "wb")
        self._stderr = open(tmp / "stderr.log", "wb")
        directives = f"daemon off; pid {tmp / 'nginx.pid'};"
        self.proc = subprocess.Popen(
            [NGINX, "-p", str(tmp), "-e", str(self.error_log), "-c", str(self.conf), "-g", directives],
            stdout=self._stdout, stderr=self._stderr)
        self.target = f"127.0.0.1:{self.port}"
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"nginx exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"nginx did not listen on {self.target} in 30 s:\n{self.logs()}")
                time.sleep(0.05)

    def logs(self) -> str:
        parts = []
        for path in (self.tmp / "stderr.log", self.error_log):
            if path.exists():
                parts.append(f"--- {path.name}\n{path.read_text(errors='replace')}")
        return "\n".join(parts)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: fast shutdown
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        self._stdout.close()
        self._stderr.close()


@pytest.fixture
def cluster(tmp_path, start_server):
    """Three replicas of the small CPU model and nginx in front of them; all stopped at the end."""
    replicas = [start_server({"models": [SMALL], "log_level": "info"}) for _ in range(REPLICAS)]
    d = tmp_path / "nginx"
    d.mkdir()
    proxy = Nginx(d, [r.port for r in replicas])
    yield replicas, proxy
    proxy.stop()  # start_server's own teardown stops the replicas


@pytest.fixture
def channels():
    opened = []

    def open_channel(target):
        ch = grpc.insecure_channel(target)
        opened.append(ch)
        return ch

    yield open_channel
    for ch in opened:
        ch.close()


def cli_binary() -> pathlib.Path:
    if os.environ.get("MQA_CLI_BIN"):
        return pathlib.Path(os.environ["MQA_CLI_BIN"])
    server = os.environ.get("MQA_SERVER_BIN")
    if not server:
        pytest.fail("MQA_SERVER_BIN is not set (run through ctest)")
    return pathlib.Path(server).resolve().parent.parent / "client" / "mqa-cli"


def routed_upstreams(access_log: pathlib.Path):
    """key -> the set of upstream addresses nginx sent that key's requests to (requests with a key only)."""
    seen = collections.defaultdict(set)
    for line in access_log.read_text(errors="replace").splitlines():
        m = re.search(r" key=(\S*) upstream=(\S+)", line)
        if m and m.group(1) and m.group(1) != "-":
            seen[m.group(1)].add(m.group(2))
    return seen


def test_sessions_stick_to_one_replica_through_nginx(pb, cluster, channels):
    replicas, proxy = cluster
    stub = pb.grpc.MqaServiceStub(channels(proxy.target))
    rng = np.random.default_rng(7)
    keys = [hashlib.sha256(f"affinity-{i}".encode()).hexdigest()[:32] for i in range(SESSIONS)]

    ids = []
    for key in keys:
        md = ((KEY, key),)
        s = stub.CreateSession(pb.svc.CreateSessionRequest(model="small"), metadata=md, timeout=30).session
        ids.append(s.session_id)
    # Prefill 4 tokens, then 3 decodes, on both layers: every step must find its session (NOT_FOUND otherwise).
    for key, sid in zip(keys, ids):
        md = ((KEY, key),)
        for a, b in [(0, 4), (4, 5), (5, 6), (6, 7)]:
            for layer in (0, 1):
                x = rng.standard_normal((1, b - a, SMALL["dim"]), dtype=np.float32)
                req = pb.svc.StepRequest(step=pb.svc.StepInput(session_id=sid, layer=layer, x=to_wire(pb, x),
                                                               position=a, sequence=b))
                r = stub.Step(req, metadata=md, timeout=30).result
                assert (r.position, r.num_tokens) == (a, b - a)
        got = stub.GetSession(pb.svc.GetSessionRequest(session_id=sid), metadata=md, timeout=30).session
        assert list(got.layer_positions) == [7, 7]

    # Ask each replica directly: exactly one holds each session, and each holds some.
    holder = {}
    per_replica = [0] * REPLICAS
    for r, replica in enumerate(replicas):
        direct = pb.grpc.MqaServiceStub(channels(replica.target))
        for sid in ids:
            try:
                s = direct.GetSession(pb.svc.GetSessionRequest(session_id=sid), timeout=30).session
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.NOT_FOUND, err
                continue
            assert sid not in holder, f"session {sid} on replicas {holder[sid]} and {r}"
            assert list(s.layer_positions) == [7, 7]
            holder[sid] = r
            per_replica[r] += 1
    assert sorted(holder) == sorted(ids), "some session is held by no replica"
    assert all(n > 0 for n in per_replica), f"sessions per replica: {per_replica}"

    # The header, not luck, does the routing: session A asked for with a key that lives on another replica is
    # not found there.
    a = 0
    b = next(i for i in range(SESSIONS) if holder[ids[i]] != holder[ids[a]])
    with pytest.raises(grpc.RpcError) as err:
        stub.GetSession(pb.svc.GetSessionRequest(session_id=ids[a]), metadata=((KEY, keys[b]),), timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    for key, sid in zip(keys, ids):
        stub.CloseSession(pb.svc.CloseSessionRequest(session_id=sid), metadata=((KEY, key),), timeout=30)
    routes = routed_upstreams(proxy.access_log)
    assert all(len(routes[k]) == 1 for k in keys), {k: v for k, v in routes.items() if len(v) != 1}


def test_cpp_client_streams_through_nginx(cluster):
    replicas, proxy = cluster
    cli = cli_binary()
    assert cli.exists(), f"{cli} not built (set MQA_CLI_BIN)"
    runs = [
        # Eight sessions multiplexed on one stream: they share the stream's routing key.
        ["session-demo", "--sessions", "8", "--prefill", "4", "--tokens", "6"],
        # Six sessions on three streams: each session takes its stream's key.
        ["bench", "--sessions", "6", "--streams", "3", "--prefill", "4", "--warmup", "1", "--tokens", "4"],
        # The same as one StepBatch per stream and layer step: a batch carries its stream's key too.
        ["bench", "--sessions", "6", "--streams", "3", "--prefill", "4", "--warmup", "1", "--tokens", "4",
         "--batch-rpc"],
    ]
    for args in runs:
        done = subprocess.run([str(cli), "--target", proxy.target, *args], capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, f"mqa-cli {args[0]}: {done.returncode}\n{done.stdout}\n{done.stderr}\n" \
                                     f"{proxy.logs()}"
    # Every keyed request (sessions, their streams, their closes) of one key went to one replica, and the
    # three bench streams' keys are not all the same (the demo's stream adds a fourth).
    routes = routed_upstreams(proxy.access_log)
    assert len(routes) >= 4, routes
    assert all(len(v) == 1 for v in routes.values()), routes
