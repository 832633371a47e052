"""MqaService.StepBatch and batches on StreamSteps, from Python (grpcio): one layer's steps of many sessions in one
message. Each session's step must mean exactly what its own Step would: Zeta's numbers for its whole sequence, its
own position check and error (per session, nothing applied for it), and nothing half-applied for a batch the server
cannot read."""

import json
import subprocess

import grpc
import numpy as np
import pytest
import torch

from conftest import SMALL, from_wire, to_wire
from test_affinity import cli_binary
from test_service import rel_err, zeta_layer

OK, INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION = 0, 3, 5, 9


def batch_request(pb, layer, ids, x, positions=(), sequence=0):
    return pb.svc.StepBatchRequest(batch=pb.svc.StepBatchInput(
        layer=layer, session_ids=ids, x=to_wire(pb, x), positions=list(positions), sequence=sequence))


def new_session(pb, stub):
    return stub.CreateSession(pb.svc.CreateSessionRequest(model="small"), timeout=30).session.session_id


def positions_of(pb, stub, sid):
    return list(stub.GetSession(pb.svc.GetSessionRequest(session_id=sid), timeout=30).session.layer_positions)


def test_batched_decode_of_sessions_at_different_positions_gets_zetas_numbers(pb, start_server, stub_for):
    server = start_server()
    stub = stub_for(server)
    rng = np.random.default_rng(7)
    prefill = [0, 1, 3, 6]  # each session's own prefill, stepped alone; then 5 batched decode steps of all four
    total = [p + 5 for p in prefill]
    xs = [rng.standard_normal((1, t, 64), dtype=np.float32) for t in total]
    ids = [new_session(pb, stub) for _ in prefill]
    outs = {(i, layer): [] for i in range(4) for layer in (0, 1)}
    for layer in (0, 1):
        for i, p in enumerate(prefill):
            if p:
                r = stub.Step(pb.svc.StepRequest(step=pb.svc.StepInput(
                    session_id=ids[i], layer=layer, x=to_wire(pb, xs[i][:, :p]))), timeout=30).result
                outs[(i, layer)].append(from_wire(r.out))
        for t in range(5):
            x = np.concatenate([xs[i][:, p + t:p + t + 1] for i, p in enumerate(prefill)], axis=0)
            r = stub.StepBatch(batch_request(pb, layer, ids, x, [p + t for p in prefill], sequence=t), timeout=30).result
            assert (r.layer, r.sequence) == (layer, t)
            assert [s.code for s in r.statuses] == [OK] * 4, [s.message for s in r.statuses]
            assert list(r.positions) == [p + t for p in prefill]
            out = from_wire(r.out)
            assert out.shape == (4, 1, 64)
            for i in range(4):
                outs[(i, layer)].append(out[i:i + 1])
    for i in range(4):
        assert positions_of(pb, stub, ids[i]) == [total[i], total[i]]
        for layer in (0, 1):
            with torch.no_grad():
                want, _, _ = zeta_layer(SMALL, layer)(torch.from_numpy(xs[i]), causal=True)
            got = np.concatenate(outs[(i, layer)], axis=1)
            assert rel_err(got, want.numpy()) < 1e-5, f"session {i} layer {layer}"


def test_one_batch_mixes_valid_and_invalid_sessions_each_isolated(pb, start_server, stub_for):
    server = start_server()
    stub = stub_for(server)
    rng = np.random.default_rng(8)
    a, b, c = (new_session(pb, stub) for _ in range(3))
    ids = [a, "not-a-session-id", "a" * 32, b, c, a]
    positions = [0, -1, -1, 4, -1, 1]  # b holds 0 tokens: its step names the wrong position; a runs twice, in order
    x = rng.standard_normal((6, 1, 64), dtype=np.float32)
    r = stub.StepBatch(batch_request(pb, 0, ids, x, positions), timeout=30).result
    codes = [s.code for s in r.statuses]
    assert codes == [OK, INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION, OK, OK], [s.message for s in r.statuses]
    assert "session_ids[1]" in r.statuses[1].message
    assert "holds 0 tokens" in r.statuses[3].message
    assert list(r.positions) == [0, 0, 0, 0, 0, 1]
    out = from_wire(r.out)
    assert out.shape == (6, 1, 64)
    for failed in (1, 2, 3):
        assert not out[failed].any(), f"row {failed} of a failed session must be zeros"
    assert positions_of(pb, stub, a) == [2, 0]
    assert positions_of(pb, stub, b) == [0, 0]  # refused: unchanged
    assert positions_of(pb, stub, c) == [1, 0]
    # a's two rows are its two tokens, in order: the same as stepping them alone in a fresh session.
    ref = new_session(pb, stub)
    for t, row in ((0, 0), (1, 5)):
        single = stub.Step(pb.svc.StepRequest(step=pb.svc.StepInput(
            session_id=ref, layer=0, x=to_wire(pb, x[row:row + 1]), position=t)), timeout=30).result
        assert rel_err(out[row:row + 1], from_wire(single.out)) < 1e-6
    # x of another width: every session's step is refused with the model's shape, nothing applied.
    wrong = stub.StepBatch(batch_request(pb, 0, [a, c], rng.standard_normal((2, 1, 32), dtype=np.float32)),
                           timeout=30).result
    assert [s.code for s in wrong.statuses] == [INVALID_ARGUMENT] * 2
    assert "[1, s, 64]" in wrong.statuses[0].message
    assert positions_of(pb, stub, a) == [2, 0]


@pytest.mark.parametrize("case,want", [
    ("no_sessions", "at least one session"),
    ("rows_mismatch", "one row per session"),
    ("positions_mismatch", "positions: expected none or one per session"),
    ("no_x", "x: required"),
    ("not_3d", "[B, s, dim]"),
])
def test_a_batch_the_server_cannot_read_is_invalid_argument_and_applies_nothing(pb, start_server, stub_for, case,
                                                                                 want):
    server = start_server()
    stub = stub_for(server)
    a = new_session(pb, stub)
    x = np.zeros((2, 1, 64), dtype=np.float32)
    req = {
        "no_sessions": lambda: batch_request(pb, 0, [], x[:0]),
        "rows_mismatch": lambda: batch_request(pb, 0, [a], x),
        "positions_mismatch": lambda: batch_request(pb, 0, [a, a], x, [0]),
        "no_x": lambda: pb.svc.StepBatchRequest(batch=pb.svc.StepBatchInput(layer=0, session_ids=[a])),
        "not_3d": lambda: batch_request(pb, 0, [a], np.zeros((1, 64), dtype=np.float32)),
    }[case]()
    with pytest.raises(grpc.RpcError) as err:
        stub.StepBatch(req, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert want in err.value.details()
    assert positions_of(pb, stub, a) == [0, 0]


def test_batches_and_steps_share_a_stream(pb, start_server, stub_for):
    server = start_server()
    stub = stub_for(server)
    rng = np.random.default_rng(9)
    ids = [new_session(pb, stub) for _ in range(3)]
    ref = [new_session(pb, stub) for _ in range(3)]
    xs = rng.standard_normal((4, 3, 1, 64), dtype=np.float32)  # 4 tokens of 3 sessions
    msgs = []
    for t in range(4):
        if t % 2 == 0:
            msgs.append(pb.svc.StreamStepsRequest(batch=pb.svc.StepBatchInput(
                layer=1, session_ids=ids, x=to_wire(pb, xs[t]), positions=[t] * 3, sequence=100 + t)))
        else:
            for i in range(3):
                msgs.append(pb.svc.StreamStepsRequest(step=pb.svc.StepInput(
                    session_id=ids[i], layer=1, x=to_wire(pb, xs[t, i:i + 1]), position=t, sequence=10 * t + i)))
    both = pb.svc.StreamStepsRequest(step=pb.svc.StepInput(session_id=ids[0], x=to_wire(pb, xs[0, :1])),
                                     batch=pb.svc.StepBatchInput(layer=1, session_ids=ids, x=to_wire(pb, xs[0]),
                                                                 sequence=999))
    msgs.append(both)
    answers = list(stub.StreamSteps(iter(msgs), timeout=60))
    got = {i: {} for i in range(3)}
    for ans in answers:
        if ans.HasField("batch"):
            if ans.batch.sequence == 999:
                assert ans.status.code == INVALID_ARGUMENT and "not both" in ans.status.message
                continue
            assert ans.status.code == OK
            t = ans.batch.sequence - 100
            assert [s.code for s in ans.batch.statuses] == [OK] * 3
            out = from_wire(ans.batch.out)
            for i in range(3):
                got[i][t] = out[i:i + 1]
        else:
            assert ans.status.code == OK, ans.status.message
            got[ans.result.sequence % 10][ans.result.sequence // 10] = from_wire(ans.result.out)
    assert len(answers) == 2 + 6 + 1
    for i in range(3):
        assert positions_of(pb, stub, ids[i]) == [0, 4]  # the message with both applied nothing
        for t in range(4):
            want = stub.Step(pb.svc.StepRequest(step=pb.svc.StepInput(
                session_id=ref[i], layer=1, x=to_wire(pb, xs[t, i:i + 1]), position=t)), timeout=30).result
            assert rel_err(got[i][t], from_wire(want.out)) < 1e-6, f"session {i} token {t}"


def test_a_repeated_batch_is_answered_from_the_kept_answers_and_applied_once(pb, start_server, stub_for):
    server = start_server()
    stub = stub_for(server)
    rng = np.random.default_rng(10)
    ids = [new_session(pb, stub) for _ in range(3)]
    x = rng.standard_normal((3, 2, 64), dtype=np.float32)
    first = stub.StepBatch(batch_request(pb, 0, ids, x, [0, 0, 0]), timeout=30).result
    again = stub.StepBatch(batch_request(pb, 0, ids, x, [0, 0, 0]), timeout=30).result
    assert [s.code for s in again.statuses] == [OK] * 3
    assert list(again.positions) == [0, 0, 0]
    assert np.array_equal(from_wire(first.out), from_wire(again.out))
    for sid in ids:
        assert positions_of(pb, stub, sid) == [2, 0]


def test_cli_bench_batch_rpc_steps_every_session_exactly_once(pb, start_server, tmp_path):
    server = start_server()
    out = tmp_path / "bench.json"
    done = subprocess.run([str(cli_binary()), "--target", server.target, "--model", "small", "bench", "--sessions", "5", "--streams", "2",
                           "--prefill", "3", "--warmup", "1", "--tokens", "4", "--batch-rpc", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    # The bench itself checks with GetSession that every layer of every session holds prefill + warm-up + tokens.
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    assert report["mode"] == "step_batch"
    row = report["rows"][0]
    assert row["sessions"] == 5 and row["streams"] == 2
    assert row["decode_steps"] == 2 * 4 * 2  # groups x tokens x layers: one StepBatch each
    assert row["tokens_per_s"] > 0
