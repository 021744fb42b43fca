"""Dead and slow clients, with real processes: who is gone is noticed, named and expired, a run
that gives up says so in `fedserver status`, and a training longer than --client-timeout is kept
live by heartbeats.

The same rules with an injected clock: tests/test_liveness.py.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from fedcore.proto import coordinator_pb2 as pb
from fedcore.proto import coordinator_pb2_grpc as pb_grpc
from tests.procs import (
    Proc,
    fedserver,
    free_port,
    start_client,
    start_serving,
    status_json,
    wait_until,
)
from tests.raw_client import lone_client, pull

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

LONG = "x" * 300  # over the 256-character limit of a free string field
FAILURE = "ValueError: loss is NaN at batch 3: check the learning rate"


def test_crashed_clients_are_named_expired_and_the_run_fails(
    tmp_path: Path, procs: list[Proc]
) -> None:
    port, state, logs = free_port(), tmp_path / "state", tmp_path / "logs"
    (graves := tmp_path / "graves").mkdir()
    server = start_serving(
        procs, logs, port, state, "--rounds", "3", "--min-clients", "2", "--round-timeout", "8",
        "--max-attempts", "2", "--client-timeout", "3", "--linger", "2",
    )  # fmt: skip
    # client-0's training code raises; client-1 is killed (-9) in training, says nothing
    broken = start_client(logs, port, "0/2", task="tests.flaky_task:broken")
    killed = start_client(
        logs, port, "1/2", task="tests.flaky_task:task",
        env={"FLAKY_P": "1", "FLAKY_DIR": str(graves)},
    )  # fmt: skip
    procs += [broken, killed]
    assert broken.wait(120) == 1, broken.log()
    assert f"told the coordinator that this client failed ({FAILURE})" in broken.log()
    assert killed.wait(120) == -9, killed.log()

    expired = (
        "round 1: nothing heard for 3s (--client-timeout) from selected client(s) client-1: no "
        "longer live; the round stops waiting for them"
    )
    wait_until(lambda: expired in server.log(), 60, "client-1 to expire")
    live = fedserver("status", "--server", f"127.0.0.1:{port}")
    assert live.returncode == 0, live.stderr
    assert "round 1: 0/2 updates, 0 live client(s)" in live.stdout

    assert server.wait(120) == 3, server.log()  # EXIT_FAILED
    text = server.log()
    assert f"WARNING client client-0 failed in round 1 and left: '{FAILURE}'" in text
    assert "round 1 stops waiting for it" in text
    assert (
        "WARNING round 1/3 deadline passed: no update from 2 of 2 selected client(s): "
        "client-0, client-1"
    ) in text
    assert "WARNING round 1 re-opened with nobody to ask" in text
    why = "round 1 reached no quorum in 2 attempts (0 of 2 updates)"
    assert why in text

    out = fedserver("status", "--state-dir", str(state))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("failed: 0/3 rounds"), out.stdout
    assert lines[1].startswith(f"gave up: {why}"), out.stdout
    status = status_json(state)
    assert status["status"] == "failed"
    assert status["failure"].startswith(why)


def test_a_training_longer_than_the_client_timeout_stays_live(
    tmp_path: Path, procs: list[Proc]
) -> None:
    port, state, logs = free_port(), tmp_path / "state", tmp_path / "logs"
    (gate := tmp_path / "gate").mkdir()
    server = start_serving(
        procs, logs, port, state, "--rounds", "1", "--min-clients", "1",
        "--client-timeout", "3", "--round-timeout", "120", "--linger", "30",
    )  # fmt: skip
    trainer = start_client(
        logs, port, "0/1", task="tests.flaky_task:gated",
        env={"GATE_CALL": "1", "FLAKY_DIR": str(gate)},
    )  # fmt: skip
    procs.append(trainer)
    wait_until((gate / "gate-waiting").exists, 120, "client-0 to start training")
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        # A client that joins once and goes silent: once it has expired, more than the timeout
        # has passed while client-0 was training (it started before this Join).
        stub.Join(pb.JoinRequest(client_id="silent"), timeout=10)
        assert stub.GetStatus(pb.GetStatusRequest(), timeout=10).live_clients == 2

        def silent_expired() -> bool:
            return stub.GetStatus(pb.GetStatusRequest(), timeout=10).live_clients < 2

        wait_until(silent_expired, 60, "the silent client to expire")
        reply = stub.GetStatus(pb.GetStatusRequest(), timeout=10)
        assert (reply.live_clients, reply.updates_expected) == (1, 1)
    (gate / "gate-open").write_text("")
    assert trainer.wait(120) == 0, trainer.log()
    assert "round 1: update accepted" in trainer.log()
    assert server.wait(60) == 0, server.log()
    text = server.log()
    assert "nothing heard" not in text and "re-opened" not in text, text
    assert status_json(state)["status"] == "finished"


def test_heartbeat_and_failure_report_are_validated(tmp_path: Path) -> None:
    with lone_client(tmp_path, "c-0", "--client-timeout", "60") as joined:
        stub = joined.stub
        assert stub.Join(pb.JoinRequest(client_id="c-0"), timeout=10).heartbeat_seconds == 20.0
        assert stub.Heartbeat(pb.HeartbeatRequest(client_id="c-0", round=1), timeout=10).live
        refusals = [
            (stub.Heartbeat, pb.HeartbeatRequest(client_id="stranger"), "FAILED_PRECONDITION"),
            (stub.Heartbeat, pb.HeartbeatRequest(client_id=""), "INVALID_ARGUMENT"),
            (stub.ReportFailure, pb.FailureReport(client_id="stranger"), "FAILED_PRECONDITION"),
            (stub.ReportFailure, pb.FailureReport(client_id="c", reason=LONG), "INVALID_ARGUMENT"),
        ]  # fmt: skip
        for call, request, code in refusals:
            with pytest.raises(grpc.RpcError) as refused:
                call(request, timeout=10)
            assert refused.value.code().name == code  # type: ignore[attr-defined]
        assert (
            "Join again"
            in stub.Heartbeat.future(  # type: ignore[attr-defined]
                pb.HeartbeatRequest(client_id="stranger"), timeout=10
            )
            .exception()
            .details()
        )
        stub.ReportFailure(pb.FailureReport(client_id="c-0", round=1, reason="boom"), timeout=10)
        reply = stub.GetStatus(pb.GetStatusRequest(), timeout=10)
        assert (reply.live_clients, reply.updates_expected) == (0, 1)
        with pytest.raises(grpc.RpcError) as gone:  # no longer live: must Join again
            stub.Heartbeat(pb.HeartbeatRequest(client_id="c-0"), timeout=10)
        assert gone.value.code() is grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]
        log = (tmp_path / "logs" / "server.log").read_text()
        assert "client c-0 failed in round 1 and left: 'boom'; round 1 stops waiting for it" in log


def test_a_restarted_coordinator_lingers_for_the_clients_of_the_run_before(
    tmp_path: Path, procs: list[Proc]
) -> None:
    """A client of a killed coordinator may be in reconnect back-off while the restarted one
    finishes without it: the linger waits for it too (CI once lost such a client to a
    coordinator that had stopped before it reconnected)."""
    port, state, logs = free_port(), tmp_path / "state", tmp_path / "logs"
    flags = ("--rounds", "1", "--min-clients", "1", "--linger", "120")
    first = start_serving(procs, logs, port, state, *flags, name="server-0")
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        pb_grpc.CoordinatorStub(channel).Join(pb.JoinRequest(client_id="earlier"), timeout=10)
    wait_until(lambda: status_json(state)["clients"] == 1, 60, "the Join to be written")
    first.kill()
    first.wait(30)

    server = start_serving(procs, logs, port, state, *flags, name="server-1")
    trainer = start_client(logs, port, "0/1")
    procs.append(trainer)
    assert trainer.wait(120) == 0, trainer.log()
    # Training is over and its one live client told, yet the coordinator still serves.
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        header, _ = pull(pb_grpc.CoordinatorStub(channel), "earlier", timeout=30)
    assert header.state == pb.FINISHED
    assert server.wait(60) == 0, server.log()
    assert "telling 1 client(s) that training is finished" in server.log()
