"""The device fleet of `fedserver simulate --fleet` (fedserver/simulation/fleet.py) and its
virtual clock, alone: parsing specs and traces, availability, arrival arithmetic."""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path

import pytest

from fedserver.simulation.clock import VirtualClock
from fedserver.simulation.fleet import DAY, Device, Trip, load_fleet, trip
from fedserver.state.history import SCHEMA_VERSION, RoundRecord, read_status
from fedserver.state.store import StateStore


def test_a_spec_draws_tiers_and_time_zones_from_the_seed_alone() -> None:
    spec = "tiers=1:4:16,speed=2,down=1000,up=500,diurnal=6"
    fleet = load_fleet(spec, 7, 3000)
    again = load_fleet(spec, 7, 3000)
    assert fleet.devices == again.devices
    assert load_fleet(spec, 8, 3000).devices != fleet.devices  # --seed, unless seed= is given
    assert load_fleet(spec + ",seed=7", 8, 3000).devices == fleet.devices
    # Device i is the same whatever N is.
    assert load_fleet(spec, 7, 10).devices == fleet.devices[:10]
    speeds = sorted({d.speed for d in fleet.devices})
    assert speeds == [2.0, 8.0, 32.0]
    for s in speeds:  # about a third each
        share = sum(d.speed == s for d in fleet.devices) / 3000
        assert 0.28 < share < 0.39
    assert all((d.down, d.up, d.period) == (1000, 500, DAY) for d in fleet.devices)
    # 6 of 24 hours online: about a quarter of the devices at any moment.
    for t in (0.0, 5_000.0, 40_000.0, 3 * DAY + 100.0):
        online = len(fleet.available(3000, t))
        assert 600 < online < 900, (t, online)


def test_the_default_spec_is_always_online() -> None:
    fleet = load_fleet("tiers=1", 0, 5)
    assert fleet.available(5, 12345.0) == [0, 1, 2, 3, 4]
    assert fleet.next_change(5, 10.0) > 10.0


def test_windows_wrap_around_midnight_and_say_when_a_device_goes_offline() -> None:
    d = Device(1.0, 1.0, 1.0, period=100.0, windows=((0.0, 10.0), (90.0, 100.0)))
    assert d.available(95.0) and d.available(105.0) and not d.available(50.0)
    assert d.online_until(95.0) == 110.0  # 90-100 goes on in the next period's 0-10
    assert d.online_until(202.0) == 210.0
    assert d.next_online(50.0) == 90.0
    assert d.next_online(150.0) == 190.0
    assert Device(1.0, 1.0, 1.0).online_until(5.0) == math.inf


def test_a_trip_arrives_or_drops_out() -> None:
    d = Device(speed=10.0, down=100.0, up=50.0, period=1000.0, windows=((0.0, 500.0),))
    # 200 bytes down (2 s) + 100 examples (10 s) + 100 bytes up (2 s).
    assert trip(d, 100.0, 200, 100, 100) == Trip(arrives=114.0)
    assert trip(d, 490.0, 200, 100, 100) == Trip(gone=500.0)  # offline before it is done
    assert trip(d, 600.0, 200, 100, 100) == Trip(gone=600.0)  # offline when selected


def test_the_virtual_clock_only_moves_forward() -> None:
    clock = VirtualClock()
    assert clock() == 0.0
    clock.advance_to(3600.0)
    assert clock() == 3600.0
    with pytest.raises(ValueError, match="cannot go back"):
        clock.advance_to(10.0)


def test_a_csv_trace_gives_one_device_per_row(tmp_path: Path) -> None:
    path = tmp_path / "fleet.csv"
    path.write_text(
        "client,speed,down,up,period,windows\n"
        "client-1,2.5,1e6,1e5,86400,3600-7200;80000-86400\n"
        "0,10,2e6,2e5,,\n"
    )
    fleet = load_fleet(str(path), 0, 5)
    assert fleet.devices[0] == Device(10.0, 2e6, 2e5)
    windows = ((3600.0, 7200.0), (80000.0, 86400.0))
    assert fleet.devices[1] == Device(2.5, 1e6, 1e5, 86400.0, windows)
    assert fleet.device(4) == fleet.devices[0]  # client i takes row i mod the rows


def test_a_json_trace_is_the_same_rows(tmp_path: Path) -> None:
    path = tmp_path / "fleet.json"
    rows = [
        {"client": 0, "speed": 10, "down": 2e6, "up": 2e5},
        {
            "client": "client-1",
            "speed": 2.5,
            "down": 1e6,
            "up": 1e5,
            "period": 86400,
            "windows": [[3600, 7200]],
        },
    ]
    path.write_text(json.dumps(rows))
    fleet = load_fleet(str(path), 0, 2)
    assert fleet.devices == (
        Device(10.0, 2e6, 2e5),
        Device(2.5, 1e6, 1e5, 86400.0, ((3600.0, 7200.0),)),
    )


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("tiers=1:4:16,sped=3", r"--fleet: unknown item 'sped=3'"),
        ("tiers=1:x", r"--fleet: tiers must be a number, got 'x'"),
        ("tiers=1,speed=0", r"--fleet: speed must be > 0"),
        ("diurnal=25", r"--fleet: diurnal is online hours a day, at most 24"),
        ("down=-1", r"--fleet: down must be > 0"),
        ("seed=a", r"--fleet: seed must be an integer"),
        ("no-such-file.csv", r"--fleet 'no-such-file.csv': no such trace file"),
    ],
)
def test_bad_specs_name_the_flag(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_fleet(spec, 0, 10)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("client,speed,down\n0,1,1\n", r"the CSV header lacks up"),
        ("client,speed,down,up\n", r"no devices in the trace"),
        ("client,speed,down,up\nx,1,1,1\n", r"row 1: client must be an index"),
        ("client,speed,down,up\n0,1,1,1\n0,1,1,1\n", r"row 2: client 0 appears twice"),
        ("client,speed,down,up\n1,1,1,1\n", r"clients must be 0\.\.0"),
        ("client,speed,down,up\n0,fast,1,1\n", r"row 1: speed must be a number"),
        ("client,speed,down,up,period,windows\n0,1,1,1,100,50-200\n", r"window '50-200' must"),
        ("client,speed,down,up,period,windows\n0,1,1,1,,5-10\n", r"windows need a period"),
    ],
)
def test_bad_traces_name_the_flag_and_the_row(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "t.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=r"--fleet .*t\.csv.*" + message):
        load_fleet(str(path), 0, 4)


def test_bad_json_trace(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    path.write_text('{"client": 0}')
    with pytest.raises(ValueError, match=r"--fleet .*expected a JSON list of objects"):
        load_fleet(str(path), 0, 4)


# The rounds table as fedgrpc wrote it before SCHEMA_VERSION 2 (no fleet_seconds).
_OLD_ROUNDS = """CREATE TABLE rounds (
    round INTEGER PRIMARY KEY, model_version TEXT NOT NULL, participants INTEGER NOT NULL,
    num_examples INTEGER NOT NULL, metrics TEXT NOT NULL, opened_at REAL NOT NULL,
    closed_at REAL NOT NULL, duration REAL NOT NULL, attempts INTEGER NOT NULL
)"""


def test_a_state_dir_from_before_fleet_seconds_still_opens(tmp_path: Path) -> None:
    StateStore(tmp_path).close()
    db = sqlite3.connect(tmp_path / "state.db")
    with db:
        db.execute("DROP TABLE rounds")
        db.execute(_OLD_ROUNDS)
        db.execute("INSERT INTO rounds VALUES (1, 'v1', 2, 20, '{}', 0.0, 1.0, 1.5, 1)")
        db.execute("INSERT INTO meta VALUES ('last_round', '1')")
        db.execute("PRAGMA user_version = 1")
    db.close()
    # Read-only (fedserver status next to an old coordinator): no column, no fleet time shown.
    status = read_status(tmp_path)
    assert status["rounds"][0]["duration_seconds"] == 1.5
    assert "fleet_seconds" not in status["rounds"][0]
    store = StateStore(tmp_path)  # a coordinator opening it migrates
    try:
        assert store.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        store.commit_round(RoundRecord(2, "v2", 2, 20, {}, 1.0, 61.0, 0.2, 1, 60.0), [])
        rounds = store.rounds()
        assert [r.fleet_seconds for r in rounds] == [None, 60.0]
    finally:
        store.close()
    rows = read_status(tmp_path)["rounds"]
    assert rows[1]["fleet_seconds"] == 60.0 and rows[1]["fleet_time"] == 61.0
