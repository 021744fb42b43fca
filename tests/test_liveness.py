"""Liveness on the coordinator, driven by an injected clock: --client-timeout, heartbeats, failure
reports, who sent nothing, and a run that gives up showing as `failed` in `fedserver status`.

The round machine's own rules are in tests/test_rounds.py and tests/test_async_rounds.py; the
processes (a crashing Task, a client killed mid-training, a training longer than the timeout)
in tests/test_dead_clients.py.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import threading
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from examples.digits import task
from fedclient.liveness import Heartbeat, report_failure
from fedcore.config import parse_layered
from fedcore.proto import coordinator_pb2 as pb
from fedserver import cli
from fedserver.commands.run import server_settings
from fedserver.coordinator.central_eval import initial_model
from fedserver.coordinator.lifecycle import Coordinator
from fedserver.rounds.synchronous import Phase, RoundPolicy
from fedserver.simulation.inprocess import InProcessTransport
from fedserver.state.history import read_status
from fedserver.state.store import StateStore
from fedserver.strategies import build_strategy
from tests.test_rounds import FakeClock

pytestmark = pytest.mark.timeout(60)


def _coordinator(tmp: Path, clock: FakeClock, **overrides: float) -> Coordinator:
    settings: dict[str, float] = {"total_rounds": 2, "min_clients": 2, "round_timeout": 100.0}
    settings |= {"max_attempts": 2, "client_ttl": 30.0} | overrides
    policy = RoundPolicy(**settings)  # type: ignore[arg-type]
    coord = Coordinator(
        StateStore(tmp), build_strategy("fedavg"), policy, initial_model(task, 0), clock=clock
    )
    coord.initialize_store("examples.digits:task")
    return coord


def test_dead_clients_are_named_expired_and_the_run_fails_with_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.INFO, logger="fedserver")
    clock = FakeClock()

    async def scenario() -> None:
        coord = _coordinator(tmp_path, clock)
        for c in ("a", "b"):
            coord.touch(c, {})
        m = coord.machine
        assert m.selected == {"a", "b"}
        for _ in range(6):  # a trains for 60 s and heartbeats every 10 s; b went silent
            clock.advance(10)
            assert coord.liveness.heartbeat("a")
            coord._advance()
        assert m.live_clients() == ["a"]  # what GetStatus reports as live_clients
        assert m.expects_update_from("a") and m.attempts == 1
        assert not coord.liveness.heartbeat("b")  # the servicer answers FAILED_PRECONDITION

        # a's Task raises; it reports before exiting
        assert coord.liveness.failed("a", 1, "ValueError: boom " + "x" * 200)
        assert m.live_count() == 0
        assert not coord.liveness.failed("stranger", 1, "spam")  # not live: refused, not logged
        assert m.attempts == 1  # nobody to ask instead: the round waits for the deadline

        clock.now = m.deadline
        coord._advance()
        assert m.attempts == 2
        clock.now = m.deadline
        coord._advance()  # the second attempt ends without quorum: the run gives up
        assert coord.done.is_set()
        coord.store.close()

    asyncio.run(scenario())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert (
        "round 1: nothing heard for 30s (--client-timeout) from selected client(s) b: no longer "
        "live; the round stops waiting for them"
    ) in warnings
    failed = [w for w in warnings if w.startswith("client a failed in round 1 and left: ")]
    assert len(failed) == 1 and "'ValueError: boom xxx" in failed[0]
    assert "... (217 characters)" in failed[0]  # an excerpt, not the whole reason
    assert failed[0].endswith("; round 1 stops waiting for it")
    assert not any("stranger" in w for w in warnings)
    assert "round 1/2 deadline passed: no update from 2 of 2 selected client(s): a, b" in warnings
    assert any(w.startswith("round 1 re-opened with nobody to ask") for w in warnings)

    why = "round 1 reached no quorum in 2 attempts (0 of 2 updates)"
    status = read_status(tmp_path)
    assert status["status"] == "failed"
    assert status["failure"].startswith(why)
    capsys.readouterr()
    assert cli.main(["status", "--state-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("failed: 0/2 rounds")
    assert out[1].startswith(f"gave up: {why}")


def test_a_resumed_run_is_running_again(tmp_path: Path) -> None:
    clock = FakeClock()

    async def scenario() -> None:
        coord = _coordinator(tmp_path, clock)
        coord._fail("round 1 reached no quorum in 2 attempts")
        coord.store.close()
        again = _coordinator(tmp_path, clock)  # restarted on the same state dir
        again.store.close()

    asyncio.run(scenario())
    status = read_status(tmp_path)
    assert (status["status"], status["failure"]) == ("running", "")


def test_simulation_keeps_every_virtual_client_live_through_a_long_round(tmp_path: Path) -> None:
    """A round longer than --client-timeout must not expire the N - K virtual clients that did
    not train: the next round would select among the last K only (and DP's population be K)."""
    clock = FakeClock()
    ids = [f"v{i}" for i in range(6)]

    async def until(condition: Callable[[], bool]) -> None:
        for _ in range(1000):  # the keep-alive task runs between these yields
            if condition():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("the keep-alive task never ran")

    async def scenario() -> None:
        coord = _coordinator(tmp_path, clock, clients_per_round=2, round_timeout=1000.0)
        seam = InProcessTransport(coord)
        alive = asyncio.create_task(seam.keep_alive(ids, every=0.01))
        m = coord.machine
        await until(lambda: m.phase is Phase.COLLECTING)
        assert len(m.selected) == 2
        clock.advance(200)  # the selected clients train for 200 s, more than the 30 s timeout
        await until(lambda: all(t == clock.now for t in m.last_seen.values()))
        assert m.live_clients() == ids
        assert m.departed == set() and m.attempts == 1
        alive.cancel()
        coord.store.close()

    asyncio.run(scenario())


def test_client_timeout_is_a_flag_with_env_and_default(monkeypatch: pytest.MonkeyPatch) -> None:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    shown = " ".join(sub.choices["run"].format_help().split())
    assert "--client-timeout SECONDS a client not heard from this long is no longer live" in shown
    assert "every third of it while training (90)" in shown
    base = ["run", "--task", "examples.digits:task"]
    args = parse_layered(parser, base, "server")
    assert server_settings(args).policy.client_ttl == 90.0
    monkeypatch.setenv("FEDGRPC_CLIENT_TIMEOUT", "12.5")
    args = parse_layered(cli.build_parser(), base, "server")
    assert server_settings(args).policy.client_ttl == 12.5
    args = parse_layered(cli.build_parser(), [*base, "--client-timeout", "7"], "server")
    assert server_settings(args).policy.client_ttl == 7.0


class _Steps:
    """Stands in for Event.wait: each call returns False (time for a heartbeat) until the test
    has seen `n` sends, then waits for the real event, so no test sleeps."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.calls = 0

    def __call__(self, done: threading.Event, timeout: float) -> bool:
        self.calls += 1
        if self.calls > self.n:
            return done.wait()
        return done.is_set()


def test_client_heartbeats_while_busy_and_stops_after() -> None:
    sent: list[tuple[pb.HeartbeatRequest, float]] = []

    def send(request: pb.HeartbeatRequest, timeout: float) -> pb.HeartbeatReply:
        sent.append((request, timeout))
        return pb.HeartbeatReply(live=True)

    with Heartbeat(send, "c-1", 4, 10.0, wait=_Steps(3)) as beat:
        assert beat._thread is not None
        for _ in range(3000):  # the thread's three sends, without sleeping on a timer
            if len(sent) == 3:
                break
            beat.done.wait(0.01)
    assert beat._thread is not None and not beat._thread.is_alive()
    assert [(r.client_id, r.round, t) for r, t in sent] == [("c-1", 4, 10.0)] * 3
    with Heartbeat(send, "c-1", 4, 0.0) as old:  # a coordinator without Heartbeat: none sent
        assert old._thread is None


class _Refused(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE


def test_client_reports_a_task_failure_best_effort() -> None:
    reports: list[pb.FailureReport] = []
    report_failure(lambda r, timeout: reports.append(r), "c-1", 3, ValueError("bad batch"))
    assert [(r.client_id, r.round, r.reason) for r in reports] == [
        ("c-1", 3, "ValueError: bad batch")
    ]

    def down(request: pb.FailureReport, timeout: float) -> pb.FailureReply:
        raise _Refused()

    report_failure(down, "c-1", 3, RuntimeError("x" * 1000))  # unreachable: no exception
