"""Fixtures for the service tests: Python code generated from our proto at test time, and real mqa-server
processes on 127.0.0.1 (ephemeral ports), stopped at the end of every test.

MQA_SERVER_BIN names the server binary (CTest sets it).
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import types

import grpc
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "reference"))


def require_tool(path, what: str):
    """A test that needs an outside program (nginx, Prometheus): CI installs them (scripts/setup.sh), so their
    absence fails the test there. Only a run that sets MQA_ALLOW_MISSING_TOOLS=1 (the GPU machine, which has none
    of them) skips instead."""
    if path and os.path.exists(path):
        return
    if os.environ.get("MQA_ALLOW_MISSING_TOOLS") == "1":
        pytest.skip(f"{what} is not installed here (MQA_ALLOW_MISSING_TOOLS=1)")
    pytest.fail(f"{what} is not installed: run scripts/setup.sh")


def _generate(out: pathlib.Path) -> types.SimpleNamespace:
    import grpc_tools
    from grpc_tools import protoc

    wkt = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    args = ["protoc", f"-I{ROOT / 'proto'}", f"-I{wkt}", f"--python_out={out}", f"--grpc_python_out={out}",
            "mqa/v1/tensor.proto", "mqa/v1/mqa_service.proto"]
    assert protoc.main(args) == 0, "grpc_tools.protoc failed on proto/mqa/v1"
    sys.path.insert(0, str(out))
    from mqa.v1 import mqa_service_pb2, mqa_service_pb2_grpc, tensor_pb2  # noqa: E402

    return types.SimpleNamespace(svc=mqa_service_pb2, grpc=mqa_service_pb2_grpc, tensor=tensor_pb2)


@pytest.fixture(scope="session")
def pb(tmp_path_factory):
    return _generate(tmp_path_factory.mktemp("generated"))


_NP = {1: np.float32, 3: np.float16}


def to_wire(pb, array: np.ndarray):
    t = pb.tensor.Tensor()
    a = np.ascontiguousarray(array)
    if a.dtype == np.float32:
        t.dtype = pb.tensor.DATA_TYPE_FLOAT32
    elif a.dtype == np.float16:
        t.dtype = pb.tensor.DATA_TYPE_FLOAT16
    elif a.dtype == np.bool_:
        t.dtype = pb.tensor.DATA_TYPE_BOOL
    else:
        raise TypeError(a.dtype)
    t.shape.extend(a.shape)
    t.data = a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
    return t


def from_wire(t) -> np.ndarray:
    if t.dtype == 2:  # bfloat16: the upper half of a float32
        raw = np.frombuffer(t.data, dtype="<u2").astype(np.uint32) << 16
        return raw.view(np.float32).reshape(tuple(t.shape))
    return np.frombuffer(t.data, dtype=np.dtype(_NP[t.dtype]).newbyteorder("<")).reshape(tuple(t.shape))


class ServerProcess:
    """One mqa-server child process configured from a dict (written as a JSON config file)."""

    def __init__(self, tmp: pathlib.Path, config: dict, args=(), env_extra=None):
        binary = os.environ.get("MQA_SERVER_BIN")
        if not binary:
            pytest.fail("MQA_SERVER_BIN is not set (run through ctest)")
        self.tmp = tmp
        cfg = tmp / "config.json"
        cfg.write_text(json.dumps(config))
        self.port_file = tmp / "port"
        self.metrics_port_file = tmp / "metrics_port"
        self.log_path = tmp / "server.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("MQA_")}
        env.update(env_extra or {})
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            # /metrics on an ephemeral loopback port, never the shared default 0.0.0.0:9400 (args may override).
            [binary, "--config", str(cfg), "--listen", "127.0.0.1:0", "--port-file", str(self.port_file),
             "--metrics-listen", "127.0.0.1:0", "--metrics-port-file", str(self.metrics_port_file), *args],
            stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 120
        while not self.port_file.exists():
            if self.proc.poll() is not None:
                pytest.fail(f"mqa-server exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"mqa-server did not start in 120 s:\n{self.log()}")
            time.sleep(0.02)
        self.port = int(self.port_file.read_text().strip())
        self.target = f"127.0.0.1:{self.port}"
        # Written before the main port file; 0 when the endpoint is disabled.
        self.metrics_port = int(self.metrics_port_file.read_text().strip())

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self._log.close()


SMALL = {"name": "small", "num_layers": 2, "dim": 64, "heads": 4, "seed": 5, "device": "cpu",
         "dtype": "float32", "max_tokens_per_session": 256}
SLOW = {"name": "slow", "num_layers": 1, "dim": 512, "heads": 8, "seed": 9, "device": "cpu",
        "dtype": "float32", "max_tokens_per_session": 8192}


@pytest.fixture
def start_server(tmp_path):
    started = []

    def start(config=None, args=(), env_extra=None):
        cfg = config if config is not None else {"models": [SMALL, SLOW], "log_level": "debug"}
        d = tmp_path / f"server{len(started)}"
        d.mkdir()
        s = ServerProcess(d, cfg, args, env_extra)
        started.append(s)
        return s

    yield start
    for s in started:
        s.kill()


@pytest.fixture
def stub_for(pb):
    channels = []

    def make(server):
        # Long prefills answer with more than gRPC's default 4 MiB.
        ch = grpc.insecure_channel(server.target, options=[("grpc.max_receive_message_length", -1)])
        channels.append(ch)
        return pb.grpc.MqaServiceStub(ch)

    yield make
    for ch in channels:
        ch.close()
