"""fedcore.tracking's dispatcher (retries, one WARNING per outage, bounded queue, bounded
flush), the --track flag's parsing and layering, and the coordinator's round rows."""

from __future__ import annotations

import importlib.util
import logging
import threading
from pathlib import Path
from typing import Any

import pytest

from fedcore.config import CliParser, parse_layered
from fedcore.tracking import TrackingError, add_track_arguments, parse_target
from fedcore.tracking.base import Backend, Dispatcher, RunInfo
from fedserver.coordinator.tracking import RoundTracker, TrackSettings, round_values
from fedserver.state.history import RoundRecord

pytestmark = pytest.mark.timeout(60)


class FakeBackend(Backend):
    """Fails its first `failures` calls; records what it delivered."""

    def __init__(self, failures: int = 0) -> None:
        self.target = "fake://"
        self.failures = failures
        self.delivered: list[tuple[int, dict[str, float]]] = []
        self.closed: list[str] = []
        self.gate = threading.Event()
        self.gate.set()
        self.changed = threading.Condition()

    def _maybe_fail(self) -> None:
        self.gate.wait()
        if self.failures:
            self.failures -= 1
            raise ConnectionError("connection refused")

    def open(self, run: RunInfo) -> str:
        self._maybe_fail()
        return "run-1"

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self._maybe_fail()
        with self.changed:
            self.delivered.append((step, metrics))
            self.changed.notify_all()

    def log_artifact(self, path: Path) -> None:
        self._maybe_fail()

    def close(self, status: str) -> None:
        self._maybe_fail()
        self.closed.append(status)


def test_an_outage_is_retried_in_order_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    backend = FakeBackend(failures=5)
    opened: list[str] = []
    d = Dispatcher(backend, RunInfo("r"), opened.append, max_backoff=0.01)
    with caplog.at_level(logging.INFO, "fedcore.tracking"):
        for step in (1, 2, 3):
            d.log_metrics(step, {"accuracy": step / 10})
        assert d.close("finished", timeout=30)
    assert backend.delivered == [
        (1, {"accuracy": 0.1}),
        (2, {"accuracy": 0.2}),
        (3, {"accuracy": 0.3}),
    ]
    assert backend.closed == ["finished"]
    assert opened == ["run-1"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.getMessage() for r in warnings] == [
        "tracking fake:// unreachable (connection refused); training goes on, retrying in the "
        "background"
    ]
    assert any("reachable again" in r.getMessage() for r in caplog.records)


def test_a_full_queue_drops_the_oldest(caplog: pytest.LogCaptureFixture) -> None:
    backend = FakeBackend()
    backend.gate.clear()  # the backend hangs: nothing leaves the queue
    d = Dispatcher(backend, RunInfo("r"), limit=3, max_backoff=0.01)
    with caplog.at_level(logging.WARNING, "fedcore.tracking"):
        for step in range(1, 7):
            d.log_metrics(step, {"loss": float(step)})
        assert d.dropped == 3
        backend.gate.set()
        assert d.close(timeout=30)
    # The first event was taken by the thread before the gate closed it; of the rest, the newest
    # three survive.
    steps = [s for s, _ in backend.delivered]
    assert steps[-3:] == [4, 5, 6] and len(steps) <= 4
    assert any("3 oldest dropped" in r.getMessage() for r in caplog.records)


def test_closing_gives_up_after_its_timeout(caplog: pytest.LogCaptureFixture) -> None:
    backend = FakeBackend(failures=10**9)  # down for good
    d = Dispatcher(backend, RunInfo("r"), max_backoff=0.01)
    d.log_metrics(1, {"loss": 1.0})
    with caplog.at_level(logging.WARNING, "fedcore.tracking"):
        assert not d.close(timeout=0.3)
    assert backend.delivered == []
    assert any("1 event(s) not delivered" in r.getMessage() for r in caplog.records)


def test_targets_are_checked_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(TrackingError, match="expected mlflow://TRACKING_URI"):
        parse_target("wandb://project")
    with pytest.raises(TrackingError, match="expected"):
        parse_target("mlflow://")
    found = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "mlflow" else found(name)
    )
    with pytest.raises(TrackingError, match=r"pip install 'fedgrpc\[mlflow\]'"):
        parse_target("mlflow://http://127.0.0.1:5000")


def test_without_mlflow_installed_run_exits_2(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    from fedserver import cli

    found = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "mlflow" else found(name)
    )
    state = tmp_path / "state"
    argv = ["run", "--task", "examples.digits:task", "--state-dir", str(state)]
    assert cli.main([*argv, "--track", "mlflow://sqlite:///x.db"]) == 2
    assert "needs the mlflow package: pip install 'fedgrpc[mlflow]'" in capfd.readouterr().err
    assert not state.exists()  # refused before the state dir was touched


def test_track_is_repeatable_and_the_command_line_replaces_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def parser() -> CliParser:  # parse_layered keeps its defaults: one parser per parse
        p = CliParser(prog="p")
        add_track_arguments(p.add_subparsers(dest="command").add_parser("run"), "metrics")
        return p

    monkeypatch.setenv("FEDGRPC_TRACK", "mlflow://a tensorboard://b")
    assert tuple(parse_layered(parser(), ["run"], "server").track) == (
        "mlflow://a",
        "tensorboard://b",
    )
    args = parse_layered(parser(), ["run", "--track", "mlflow://c", "--track", "mlflow://d"], "s")
    assert args.track == ["mlflow://c", "mlflow://d"]
    monkeypatch.delenv("FEDGRPC_TRACK")
    assert tuple(parse_layered(parser(), ["run"], "server").track) == ()


class FakeTracking:
    def __init__(self) -> None:
        self.logged: list[tuple[int, dict[str, float]]] = []

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.logged.append((step, metrics))

    def log_artifact(self, path: Path) -> None:
        raise AssertionError("no --track-model")

    def close(self, status: str, timeout: float) -> None:
        self.logged.append((-1, {status: timeout}))


class FakeStore:
    def get_meta(self, key: str, default: str | None = None) -> str | None:
        return {"status": "finished"}.get(key, default)


def record(r: int, metrics: dict[str, float]) -> RoundRecord:
    return RoundRecord(r, "v", 2, 100, metrics, 0.0, 1.0, 1.5, 1)


def test_a_round_is_its_status_row_and_evaluations_wait_for_their_campaign() -> None:
    tracking = FakeTracking()
    store: Any = FakeStore()
    tracker = RoundTracker(tracking, TrackSettings(("x://",), timeout=5.0), store)  # type: ignore[arg-type]
    tracker.round_committed(record(1, {"accuracy": 0.5}), 10, 20)
    tracker.evaluated(1, {"fed_accuracy": 0.4, "fed_examples": 3})
    tracker.evaluated(1, {"fed_accuracy": 0.45, "fed_examples": 6})  # a second report
    assert len(tracking.logged) == 1  # the campaign can still change
    tracker.round_committed(record(2, {"accuracy": 0.6}), 11, 21)
    tracker.evaluated(2, {"fed_accuracy": 0.55, "fed_examples": 6})
    tracker.close(None)
    row1 = {
        "accuracy": 0.5,
        "round/participants": 2.0,
        "round/num_examples": 100.0,
        "round/duration_seconds": 1.5,
        "round/attempts": 1.0,
        "round/bytes_in": 10.0,
        "round/bytes_out": 20.0,
    }
    assert tracking.logged[0] == (1, row1)
    assert tracking.logged[1] == (1, {"fed_accuracy": 0.45, "fed_examples": 6})
    assert tracking.logged[2][0] == 2
    assert tracking.logged[3] == (2, {"fed_accuracy": 0.55, "fed_examples": 6})
    assert tracking.logged[4] == (-1, {"finished": 5.0})
    assert round_values(record(3, {}).to_json())["round/participants"] == 2.0


def test_track_model_with_encrypted_state_is_refused(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    from fedserver import cli

    state = tmp_path / "state"
    argv = ["run", "--task", "examples.digits:task", "--state-dir", str(state)]
    argv += ["--track", f"tensorboard://{tmp_path / 'tb'}", "--track-model"]
    assert cli.main([*argv, "--encrypt-state", str(tmp_path / "key")]) == 2
    assert "--track-model cannot be combined with --encrypt-state" in capfd.readouterr().err
    assert not state.exists()


def test_simulate_takes_the_same_track_flags(tmp_path: Path) -> None:
    from fedcore.config import parse_layered
    from fedserver.cli import build_parser
    from fedserver.simulation.cli import sim_settings

    target = f"tensorboard://{tmp_path / 'tb'}"
    argv = ["simulate", "--task", "examples.digits:task", "--clients", "4"]
    args = parse_layered(build_parser(), [*argv, "--track", target, "--track-timeout", "5"], "s")
    track = sim_settings(args).server.track
    assert track is not None and track.targets == (target,) and track.timeout == 5.0
