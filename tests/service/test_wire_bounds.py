"""What a client can send that is not what the schema expects, and what it must get back: messages that do not
parse, timeouts at the edge of a Duration, strings far too long, and a stream whose answers are never read.
A real mqa-server on 127.0.0.1, raw bytes through grpcio's generic calls where the stubs would refuse them."""

import os
import time

import grpc
import numpy as np
import pytest
from google.protobuf.duration_pb2 import Duration

from conftest import to_wire

MODEL = {"name": "m", "num_layers": 1, "dim": 64, "heads": 4, "seed": 2, "device": "cpu", "dtype": "float32",
         "max_tokens_per_session": 4096}
GARBAGE = b"\xff\xff\xff\xff"  # field 0x1fffffff... with wire type 7: no protobuf parser takes it


def new_session(pb, stub, model="m"):
    return stub.CreateSession(pb.svc.CreateSessionRequest(model=model), timeout=30).session.session_id


def stream_request(pb, sid, x, seq, **kw):
    return pb.svc.StreamStepsRequest(step=pb.svc.StepInput(session_id=sid, layer=0, x=to_wire(pb, x), sequence=seq,
                                                           **kw))


def raw_channel(server):
    return grpc.insecure_channel(server.target, options=[("grpc.max_receive_message_length", -1)])


def test_a_bad_frame_ends_the_stream_with_invalid_argument(pb, start_server, stub_for):
    """Valid, unparseable, valid. The first is answered, the stream ends INVALID_ARGUMENT saying
    the message did not parse, and the third step is not applied."""
    server = start_server({"models": [MODEL]})
    stub = stub_for(server)
    sid = new_session(pb, stub)
    x = np.ones((1, 1, 64), np.float32)
    frames = [stream_request(pb, sid, x, 1).SerializeToString(), GARBAGE,
              stream_request(pb, sid, x, 3).SerializeToString()]
    with raw_channel(server) as ch:
        call = ch.stream_stream("/mqa.v1.MqaService/StreamSteps", request_serializer=lambda b: b,
                                response_deserializer=pb.svc.StreamStepsResponse.FromString)
        answers = []
        with pytest.raises(grpc.RpcError) as e:
            for a in call(iter(frames), timeout=30):
                answers.append(a)
    assert [a.result.sequence for a in answers] == [1] and answers[0].status.code == 0
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value
    assert "message 2 of the stream" in e.value.details() and "does not parse" in e.value.details()
    s = stub.GetSession(pb.svc.GetSessionRequest(session_id=sid), timeout=30).session
    assert list(s.layer_positions) == [1]


@pytest.mark.parametrize("method", ["ListModels", "GetModel", "Forward", "CreateSession", "GetSession",
                                    "CloseSession", "Step"])
def test_unary_calls_that_do_not_parse_are_invalid_argument(pb, start_server, method):
    server = start_server({"models": [MODEL]})
    with raw_channel(server) as ch:
        call = ch.unary_unary(f"/mqa.v1.MqaService/{method}", request_serializer=lambda b: b,
                              response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as e:
            call(GARBAGE, timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value
    assert "does not parse as mqa.v1." in e.value.details()


def test_huge_and_negative_step_timeouts(pb, start_server, stub_for):
    """A timeout of 300 years or protobuf's maximum is simply no tighter than the stream's; a
    negative one is INVALID_ARGUMENT for that step only."""
    server = start_server({"models": [MODEL]})
    stub = stub_for(server)
    sid = new_session(pb, stub)
    x = np.ones((1, 1, 64), np.float32)
    reqs = [stream_request(pb, sid, x, 1, timeout=Duration(seconds=10**10)),
            stream_request(pb, sid, x, 2, timeout=Duration(seconds=315576000000, nanos=999999999)),
            stream_request(pb, sid, x, 3, timeout=Duration(seconds=300 * 365 * 86400)),
            stream_request(pb, sid, x, 4, timeout=Duration(seconds=-1)),
            stream_request(pb, sid, x, 5, timeout=Duration(seconds=1, nanos=-5))]
    answers = {a.result.sequence: a for a in stub.StreamSteps(iter(reqs), timeout=60)}
    for seq in (1, 2, 3):
        assert answers[seq].status.code == 0, answers[seq].status
    for seq in (4, 5):
        assert answers[seq].status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0], answers[seq].status
        assert "timeout" in answers[seq].status.message
    s = stub.GetSession(pb.svc.GetSessionRequest(session_id=sid), timeout=30).session
    assert list(s.layer_positions) == [3]


def test_long_strings_are_refused_short_and_never_echoed_whole(pb, start_server, stub_for):
    """A 200 kB model name or a 20 000-character session id is INVALID_ARGUMENT with a short
    message, not RESOURCE_EXHAUSTED from overflowing trailers; and they do not flood the log."""
    server = start_server({"models": [MODEL]})
    stub = stub_for(server)
    name = "n" * 200_000
    sid = "a" * 20_000
    x = to_wire(pb, np.ones((1, 1, 64), np.float32))
    log_before = os.path.getsize(server.log_path)
    calls = [
        lambda: stub.GetModel(pb.svc.GetModelRequest(name=name), timeout=30),
        lambda: stub.CreateSession(pb.svc.CreateSessionRequest(model=name), timeout=30),
        lambda: stub.Forward(pb.svc.ForwardRequest(model=name, x=x), timeout=30),
        lambda: stub.GetSession(pb.svc.GetSessionRequest(session_id=sid), timeout=30),
        lambda: stub.CloseSession(pb.svc.CloseSessionRequest(session_id=sid), timeout=30),
        lambda: stub.Step(pb.svc.StepRequest(step=pb.svc.StepInput(session_id=sid, x=x)), timeout=30),
        lambda: stub.GetSession(pb.svc.GetSessionRequest(session_id="0123456789ABCDEF0123456789abcdef"), timeout=30),
    ]
    for call in calls:
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value
        assert len(e.value.details()) < 400, e.value.details()[:200]
    answers = list(stub.StreamSteps(iter([pb.svc.StreamStepsRequest(step=pb.svc.StepInput(
        session_id=sid, x=x, sequence=9))]), timeout=30))
    assert answers[0].status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert len(answers[0].result.session_id) <= 64 and len(answers[0].status.message) < 400
    for _ in range(4):
        with pytest.raises(grpc.RpcError):
            stub.CreateSession(pb.svc.CreateSessionRequest(model="m" * 500_000), timeout=30)
    assert os.path.getsize(server.log_path) - log_before < 20_000
    # A real id of a session that does not exist is still NOT_FOUND.
    with pytest.raises(grpc.RpcError) as e:
        stub.GetSession(pb.svc.GetSessionRequest(session_id="0" * 32), timeout=30)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def rss_bytes(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_a_stream_whose_answers_are_never_read_holds_bounded_memory(pb, start_server, stub_for):
    """600 steps whose answers are 64 KiB each, the answers never read. The stream stops reading
    requests at its bound (2 MiB here), so few steps are applied while it stalls and the server's memory
    stays bounded; once the client reads, every step is answered and applied exactly once, none dropped."""
    bound = 2 << 20
    server = start_server({"models": [MODEL], "max_sessions": 2048},
                          args=("--stream-max-pending-bytes", str(bound)))
    stub = stub_for(server)
    x = np.random.default_rng(0).standard_normal((1, 256, 64), dtype=np.float32)  # 64 KiB in and out
    n = 600

    def run(read: bool):
        sids = [new_session(pb, stub) for _ in range(n)]
        sent = []

        def requests():
            for i, sid in enumerate(sids):
                sent.append(i)
                yield stream_request(pb, sid, x, i, position=0)
        call = stub.StreamSteps(requests(), timeout=300)
        if read:
            answers = list(call)
        else:
            # Not reading: wait until the server has stopped applying steps, then measure.
            applied, last = -1, -2
            while applied != last:
                last = applied
                time.sleep(1.0)
                applied = sum(stub.GetSession(pb.svc.GetSessionRequest(session_id=s), timeout=30)
                              .session.layer_positions[0] > 0 for s in sids)
            held = rss_bytes(server.proc.pid)
            answers = list(call)
            return sids, answers, applied, held
        return sids, answers, n, rss_bytes(server.proc.pid)

    sids, answers, _, _ = run(read=True)  # warm-up: allocator arenas, KV blocks, threads
    for s in sids:
        stub.CloseSession(pb.svc.CloseSessionRequest(session_id=s), timeout=30)
    base = rss_bytes(server.proc.pid)
    sids, answers, applied_while_stalled, held = run(read=False)
    assert len(answers) == n and all(a.status.code == 0 for a in answers)
    assert sorted(a.result.sequence for a in answers) == list(range(n))
    for s in sids[:: 50]:
        assert list(stub.GetSession(pb.svc.GetSessionRequest(session_id=s), timeout=30).session.layer_positions) == [256]
    # The stall: the bound's worth of answers (32 of 64 KiB) held by the server, plus what HTTP/2's windows and
    # the sockets took on their way to the client (grpc grows its windows to a few MiB); far from all of them.
    assert applied_while_stalled < n // 2, applied_while_stalled
    growth = held - base
    print(f"stalled with {applied_while_stalled} steps applied; RSS growth {growth / 2**20:.1f} MiB "
          f"(unbounded, the answers alone would be {n * 64 / 1024:.1f} MiB)")
    assert growth < 24 << 20, growth
