"""`fedserver simulate --fleet`: rounds, deadlines and async buffers in fleet time on a virtual
clock, while the host runs as fast as it can (nothing sleeps)."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from fedserver.simulation import api as simulation
from tests.procs import fedserver

SYNTHETIC = "examples.synthetic:task"
CLIENTS = 12
FAST, SLOW = 10.0, 0.001  # examples per second: a slow device needs hours for a few examples


def _trace(path: Path, slow: float = SLOW) -> Path:
    """Even clients fast, odd ones slow; links so fast that transfers take nanoseconds."""
    rows = ["client,speed,down,up,period,windows"]
    rows += [f"{i},{FAST if i % 2 == 0 else slow},1e12,1e12,," for i in range(CLIENTS)]
    path.write_text("\n".join(rows) + "\n")
    return path


def _examples(state: Path) -> dict[int, dict[str, int]]:
    db = sqlite3.connect(state / "state.db")
    try:
        rows = db.execute("SELECT round, client_id, num_examples FROM receipts").fetchall()
    finally:
        db.close()
    out: dict[int, dict[str, int]] = {}
    for r, cid, n in rows:
        out.setdefault(r, {})[cid] = n
    return out


def _speed(cid: str, slow: float = SLOW) -> float:
    return FAST if int(cid.removeprefix("client-")) % 2 == 0 else slow


@pytest.mark.timeout(240)
def test_a_deadline_closes_rounds_in_fleet_time_without_host_sleeping(tmp_path: Path) -> None:
    state = tmp_path / "s"
    started = time.monotonic()
    history = simulation.run(
        SYNTHETIC,
        CLIENTS,
        state_dir=state,
        fleet=str(_trace(tmp_path / "fleet.csv")),
        rounds=4,
        clients_per_round=6,
        min_fit=2,
        round_timeout=3600,
        seed=1,
        workers=0,
    )
    host = time.monotonic() - started
    assert (history.exit_code, history.failure) == (0, "")
    examples = _examples(state)
    total = 0.0
    missed = 0
    for r in history.rounds:
        arrivals = [n / _speed(cid) for cid, n in examples[r["round"]].items()]
        assert all(_speed(cid) == FAST for cid in examples[r["round"]])  # slow ones missed it
        if r["participants"] < 6:  # a slow client was selected: closed at the deadline
            missed += 1
            assert r["fleet_seconds"] == pytest.approx(3600.0, abs=1e-3)
        else:  # everyone fast: closed when the slowest of them arrived
            assert r["fleet_seconds"] == pytest.approx(max(arrivals), abs=1e-3)
        total += r["fleet_seconds"]
        assert r["fleet_time"] == pytest.approx(total, abs=1e-3)  # always online: no gaps
    assert missed >= 2  # a seed where the deadline mattered
    # Hours of fleet time in host seconds: nothing waited for the deadline.
    assert total >= 2 * 3600 and host < 60, (total, host)
    # Each round's host seconds stay the host's (not the fleet clock's).
    assert all(0 < r["duration_seconds"] < host for r in history.rounds)
    # status and report show both clocks.
    out = fedserver("status", "--state-dir", str(state), timeout=60)
    assert "host s" in out.stdout and "fleet s" in out.stdout and "3600.0" in out.stdout
    report = tmp_path / "report"
    assert fedserver("report", "--state-dir", str(state), "--out", str(report)).returncode == 0
    header = (report / "rounds.csv").read_text().splitlines()[0].split(",")
    assert {"duration_seconds", "fleet_seconds", "fleet_time"} <= set(header)


@pytest.mark.timeout(300)
def test_same_seed_same_model_on_a_fleet_on_any_number_of_workers(tmp_path: Path) -> None:
    trace = str(_trace(tmp_path / "fleet.csv", slow=0.05))
    flags = {"rounds": 3, "clients_per_round": 5, "min_fit": 2, "round_timeout": 600, "seed": 3}
    runs = [
        simulation.run(
            SYNTHETIC, CLIENTS, state_dir=tmp_path / f"w{w}", fleet=trace, workers=w, **flags
        )
        for w in (0, 1)
    ]
    assert [h.exit_code for h in runs] == [0, 0]
    assert [r["fleet_seconds"] for r in runs[0].rounds] == [
        r["fleet_seconds"] for r in runs[1].rounds
    ]
    assert runs[0].model_path.read_bytes() == runs[1].model_path.read_bytes()


@pytest.mark.timeout(240)
def test_async_buffers_fill_in_fleet_time(tmp_path: Path) -> None:
    """FedBuff on a fleet: fast devices fill buffers while slow ones train, and a slow
    device's update counts stale, versions after the one it pulled."""
    state = tmp_path / "a"
    history = simulation.run(
        SYNTHETIC,
        CLIENTS,
        state_dir=state,
        fleet=str(_trace(tmp_path / "fleet.csv", slow=1.0)),
        mode="async",
        buffer_size=2,
        max_concurrency=6,
        rounds=6,
        round_timeout=3600,
        seed=2,
        workers=0,
    )
    assert (history.exit_code, history.failure) == (0, "")
    assert [r["participants"] for r in history.rounds] == [2] * 6
    times = [r["fleet_time"] for r in history.rounds]
    assert times == sorted(times) and times[0] > 0
    assert sum(r["fleet_seconds"] for r in history.rounds) == pytest.approx(times[-1], abs=1e-3)
    examples = _examples(state)
    slow_counted = [c for r in examples.values() for c in r if _speed(c, 1.0) == 1.0]
    stale = [r["metrics"].get("staleness_max", 0) for r in history.rounds]
    # Fast devices (10x) make the versions; the slow ones arrive late and stale.
    fast_counted = sum(len(r) for r in examples.values()) - len(slow_counted)
    assert fast_counted > len(slow_counted) and max(stale) >= 1
    again = simulation.run(
        SYNTHETIC,
        CLIENTS,
        state_dir=tmp_path / "b",
        fleet=str(tmp_path / "fleet.csv"),
        mode="async",
        buffer_size=2,
        max_concurrency=6,
        rounds=6,
        round_timeout=3600,
        seed=2,
        workers=0,
    )
    assert again.model_path.read_bytes() == history.model_path.read_bytes()


@pytest.mark.timeout(240)
def test_offline_devices_are_not_selected_and_dropouts_miss_the_round(tmp_path: Path) -> None:
    """Clients 0-5 are online from fleet time 0 to 100 only; 6-11 from 50 on: round 1 opens at
    0 among 0-5, and a second round that opens after 100 selects among 6-11."""
    trace = tmp_path / "fleet.csv"
    rows = ["client,speed,down,up,period,windows"]
    rows += [f"{i},1,1e12,1e12,100000,0-100" for i in range(6)]
    rows += [f"{i},1,1e12,1e12,100000,50-100000" for i in range(6, 12)]
    trace.write_text("\n".join(rows) + "\n")
    state = tmp_path / "s"
    history = simulation.run(
        SYNTHETIC,
        CLIENTS,
        state_dir=state,
        fleet=str(trace),
        rounds=2,
        clients_per_round=3,
        min_fit=1,
        round_timeout=50000,
        seed=1,
        workers=0,
    )
    assert history.exit_code == 0, history.failure
    examples = _examples(state)
    first = {int(c.removeprefix("client-")) for c in examples[1]}
    second = {int(c.removeprefix("client-")) for c in examples[2]}
    # At 1 example/s, clients 0-5 (tens of examples) go offline at 100 before most finish.
    assert first <= set(range(6)) and history.rounds[0]["participants"] < 3
    assert second <= set(range(6, 12))
    # Round 1 waited for its dropouts until they lapsed, in fleet time: offline at 100, then
    # --client-timeout (90 s) without a heartbeat.
    assert history.rounds[0]["fleet_seconds"] == pytest.approx(100.0 + 90.0)


@pytest.mark.timeout(240)
def test_a_failing_client_on_a_fleet_costs_no_deadline(tmp_path: Path) -> None:
    """Client 1's training raises: it reports the failure at once, and the round closes when
    the others have arrived (under a second of fleet time), not at the 3,600 s deadline."""
    history = simulation.run(
        "tests.sim_tasks:failing",
        4,
        state_dir=tmp_path / "s",
        fleet="speed=1000",
        rounds=2,
        clients_per_round=4,
        min_fit=2,
        round_timeout=3600,
        seed=1,
        workers=0,
    )
    assert history.exit_code == 0, history.failure
    assert [r["participants"] for r in history.rounds] == [3, 3]
    assert all(0 < r["fleet_seconds"] < 5 for r in history.rounds), history.rounds


def test_bad_fleet_exits_2_naming_the_flag(tmp_path: Path) -> None:
    out = fedserver(
        *("simulate", "--task", SYNTHETIC, "--clients", "4", "--workers", "0"),
        *("--state-dir", str(tmp_path / "s"), "--fleet", "tiers=1:4,sped=2"),
        timeout=60,
    )
    assert out.returncode == 2
    assert "--fleet: unknown item 'sped=2'" in out.stderr
    assert not (tmp_path / "s").exists()


@pytest.mark.timeout(240)
def test_a_resumed_fleet_goes_on_in_fleet_time(tmp_path: Path) -> None:
    trace = str(_trace(tmp_path / "fleet.csv", slow=1.0))
    flags = {"clients_per_round": 4, "min_fit": 2, "round_timeout": 600, "seed": 4, "workers": 0}
    state = tmp_path / "s"
    first = simulation.run(SYNTHETIC, CLIENTS, state_dir=state, fleet=trace, rounds=1, **flags)
    resumed = simulation.run(SYNTHETIC, CLIENTS, state_dir=state, fleet=trace, rounds=2, **flags)
    assert (first.exit_code, resumed.exit_code) == (0, 0)
    one, two = resumed.rounds
    assert one["fleet_time"] == first.rounds[0]["fleet_time"] > 0
    assert two["fleet_time"] == pytest.approx(one["fleet_time"] + two["fleet_seconds"], abs=1e-3)


@pytest.mark.timeout(240)
def test_overselected_rounds_close_on_their_first_arrivals_in_fleet_time(tmp_path: Path) -> None:
    """8 fast devices, 4 slow ones (clients 0, 3, 6, 9): 6 selected for 2 updates always hold
    at least 2 fast ones, so no round waits for a slow device or the deadline."""
    rows = ["client,speed,down,up,period,windows"]
    rows += [f"{i},{SLOW if i % 3 == 0 else FAST},1e12,1e12,," for i in range(CLIENTS)]
    trace = tmp_path / "fleet.csv"
    trace.write_text("\n".join(rows) + "\n")
    state = tmp_path / "s"
    history = simulation.run(
        SYNTHETIC,
        CLIENTS,
        state_dir=state,
        fleet=str(trace),
        rounds=4,
        clients_per_round=2,
        overselect=3,
        min_fit=2,
        round_timeout=3600,
        seed=1,
        workers=0,
    )
    assert (history.exit_code, history.failure) == (0, "")
    examples = _examples(state)
    for r in history.rounds:
        counted = examples[r["round"]]
        assert r["participants"] == 2 and len(counted) == 2
        assert all(int(cid.removeprefix("client-")) % 3 for cid in counted)  # fast ones only
        # Closed when the second update arrived: the arrivals of the two counted ones.
        assert r["fleet_seconds"] == pytest.approx(max(n / FAST for n in counted.values()))
        assert r["fleet_seconds"] < 3600


def test_overselect_is_refused_under_async(tmp_path: Path) -> None:
    out = fedserver(
        "simulate", "--task", SYNTHETIC, "--clients", "4", "--rounds", "1",
        "--mode", "async", "--buffer-size", "2", "--overselect", "2",
        "--state-dir", str(tmp_path / "s"), timeout=60,
    )  # fmt: skip
    assert out.returncode == 2
    assert "--overselect" in out.stderr and "--mode async" in out.stderr


def test_overselect_is_refused_with_secure_aggregation(tmp_path: Path) -> None:
    out = fedserver(
        "run", "--task", SYNTHETIC, "--rounds", "1", "--secure", "secagg",
        "--overselect", "1.3", "--state-dir", str(tmp_path / "s"), timeout=60,
    )  # fmt: skip
    assert out.returncode == 2
    assert "--overselect" in out.stderr and "--secure secagg" in out.stderr
