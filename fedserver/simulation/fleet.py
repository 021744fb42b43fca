"""A device fleet for `fedserver simulate --fleet`: each virtual client's compute speed, link
bandwidth and availability, and the pure arithmetic of when its update would arrive.

Two sources (docs/simulation.md, "Fleets"): a SPEC of seeded distributions,

    tiers=1:4:16,speed=20,down=1e6,up=2.5e5,diurnal=8,day=86400,seed=1

or a trace file (.csv or .json) with one row per device. No I/O beyond reading that file, no
asyncio, no torch (numpy for whole-fleet availability): tests/test_fleet.py checks it alone.
Every error is a ValueError whose message names the flag (the command turns it into exit
code 2).
"""

from __future__ import annotations

import csv
import io
import json
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FLAG = "--fleet"
DAY = 86_400.0
# SPEC keys and their defaults: speed in examples of the device's data per second of a whole
# local update (all epochs), bandwidths in bytes per second, diurnal in online hours a day.
SPEC_DEFAULTS: dict[str, str] = {
    "tiers": "1",
    "speed": "10",
    "down": "1e6",
    "up": "2.5e5",
    "diurnal": "24",
    "day": str(DAY),
    "seed": "",
}
TRACE_COLUMNS = ("client", "speed", "down", "up", "period", "windows")


@dataclass(frozen=True)
class Device:
    """One device: `speed` examples/s, `down`/`up` bytes/s, online during `windows` (start,
    end) seconds of every `period` seconds (fleet time 0 is the start of a period); period 0:
    always online."""

    speed: float
    down: float
    up: float
    period: float = 0.0
    windows: tuple[tuple[float, float], ...] = ()

    def available(self, t: float) -> bool:
        if not self.period:
            return True
        p = t % self.period
        return any(s <= p < e for s, e in self.windows)

    def online_until(self, t: float) -> float:
        """When a device online at `t` goes offline (inf: never); `t` itself if it is not."""
        if not self.period:
            return math.inf
        base = t - t % self.period
        end = t
        # Walk the windows forward (a window ending at the period's end may go on in the
        # next period's window at 0): at most two periods' worth.
        for offset in (0.0, self.period, 2 * self.period):
            for s, e in self.windows:
                if base + offset + s <= end < base + offset + e:
                    end = base + offset + e
        return end if end < base + 2 * self.period else math.inf

    def next_online(self, t: float) -> float:
        """The first moment >= t the device is online (inf: never)."""
        if self.available(t):
            return t
        if not self.windows:
            return math.inf
        base = t - t % self.period
        starts = [base + off + s for off in (0.0, self.period) for s, _ in self.windows]
        return min(s for s in starts if s >= t)

    def transfer_seconds(self, down_bytes: int, up_bytes: int) -> float:
        return down_bytes / self.down + up_bytes / self.up

    def compute_seconds(self, examples: int) -> float:
        return examples / self.speed


@dataclass(frozen=True)
class Fleet:
    """Device i of N (client-i), from a spec's distributions or a trace's rows (cyclically)."""

    devices: tuple[Device, ...]
    source: str  # the flag's value, for the log
    # Every availability window as rows (device, start, end, period), and who is always
    # online: who is online is then a few numpy operations per round, not a Python loop
    # over N devices (1,000,000 devices: 0.7 s a round as a loop).
    windows: np.ndarray = field(init=False, repr=False, compare=False)
    always: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        rows = [
            (i, s, e, d.period)
            for i, d in enumerate(self.devices)
            if d.period
            for s, e in d.windows
        ]
        table = np.array(rows, dtype=np.float64).reshape(-1, 4)
        always = np.array([not d.period for d in self.devices], dtype=bool)
        object.__setattr__(self, "windows", table)  # frozen: set once, here
        object.__setattr__(self, "always", always)

    def device(self, index: int) -> Device:
        return self.devices[index % len(self.devices)]

    def available(self, count: int, t: float) -> list[int]:
        """Indices of the devices of `count` online at `t`: O(N) in numpy, once per round."""
        w = self.windows
        online = self.always.copy()
        if len(w):
            p = np.mod(t, w[:, 3])
            inside = (w[:, 1] <= p) & (p < w[:, 2])
            online[w[inside, 0].astype(np.int64)] = True
        rows = len(self.devices)
        reps = -(-count // rows)  # client i takes row i mod the rows
        mask = np.tile(online, reps)[:count] if reps > 1 else online[:count]
        return np.flatnonzero(mask).tolist()  # type: ignore[no-any-return]

    def next_change(self, count: int, t: float) -> float:
        """The next moment after t a window of some device opens (inf: never): a device may
        come online then."""
        w = self.windows
        if count < len(self.devices):
            w = w[w[:, 0] < count]
        if not len(w):
            return math.inf
        period = w[:, 3]
        start = t - np.mod(t, period) + w[:, 1]
        start = np.where(start > t, start, start + period)
        return float(start.min())


@dataclass(frozen=True)
class Trip:
    """Where a dispatched client's update is at fleet time: it `arrives` at that time, or it
    is `gone` (offline) from that time on and never arrives."""

    arrives: float = math.inf
    gone: float = math.inf


def trip(device: Device, start: float, down_bytes: int, examples: int, up_bytes: int) -> Trip:
    """A client handed `down_bytes` of model at `start` that trains on `examples` and sends
    `up_bytes` back: when it arrives, or when it drops out (offline before it is done)."""
    if not device.available(start):
        return Trip(gone=start)
    done = start + device.transfer_seconds(down_bytes, up_bytes) + device.compute_seconds(examples)
    until = device.online_until(start)
    return Trip(arrives=done) if done <= until else Trip(gone=until)


# ---------------------------------------------------------------------------- parsing
def load_fleet(text: str, default_seed: int, count: int) -> Fleet:
    """--fleet FILE|SPEC: a SPEC has '=' in it, anything else names a trace file."""
    if "=" in text:
        return Fleet(tuple(_spec_devices(text, default_seed, count)), text)
    path = Path(text)
    if not path.is_file():
        raise ValueError(f"{FLAG} {text!r}: no such trace file (or give a SPEC like tiers=1:4:16)")
    raw = path.read_text(encoding="utf-8")
    rows = _json_rows(raw, text) if path.suffix.lower() == ".json" else _csv_rows(raw, text)
    return Fleet(tuple(_trace_devices(rows, text)), text)


def _number(
    key: str, value: str, where: str = ": ", minimum: float = 0.0, strict: bool = True
) -> float:
    try:
        x = float(value)
    except ValueError:
        raise ValueError(f"{FLAG}{where}{key} must be a number, got {value!r}") from None
    if not math.isfinite(x) or x < minimum or (strict and x == minimum):
        op = ">" if strict else ">="
        raise ValueError(f"{FLAG}{where}{key} must be {op} {minimum:g}, got {value!r}")
    return x


def parse_spec(text: str) -> dict[str, str]:
    values = dict(SPEC_DEFAULTS)
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in SPEC_DEFAULTS:
            keys = ", ".join(SPEC_DEFAULTS)
            raise ValueError(f"{FLAG}: unknown item {part!r} in {text!r} (keys: {keys})")
        values[key] = value.strip()
    return values


def _spec_devices(text: str, default_seed: int, count: int) -> Iterator[Device]:
    v = parse_spec(text)
    tiers = [_number("tiers", t) for t in v["tiers"].split(":")]
    speed = _number("speed", v["speed"])
    down, up = _number("down", v["down"]), _number("up", v["up"])
    hours = _number("diurnal", v["diurnal"])
    if hours > 24:
        raise ValueError(f"{FLAG}: diurnal is online hours a day, at most 24, got {hours:g}")
    day = _number("day", v["day"])
    try:
        seed = int(v["seed"]) if v["seed"] else default_seed
    except ValueError:
        raise ValueError(f"{FLAG}: seed must be an integer, got {v['seed']!r}") from None
    online = day * hours / 24
    for i in range(count):
        # Each device from (seed, i) alone: the same device whatever N is.
        rng = random.Random(f"fleet:{seed}:{i}")
        tier = tiers[rng.randrange(len(tiers))]
        if hours >= 24:
            yield Device(speed * tier, down, up)
            continue
        start = rng.uniform(0, day)  # its time zone
        yield Device(speed * tier, down, up, day, _wrap(start, online, day))


def _wrap(start: float, length: float, period: float) -> tuple[tuple[float, float], ...]:
    end = start + length
    if end <= period:
        return ((start, end),)
    return ((0.0, end - period), (start, period))


def _csv_rows(raw: str, name: str) -> list[dict[str, str]]:
    reader = csv.DictReader(io.StringIO(raw))
    missing = [c for c in TRACE_COLUMNS[:4] if c not in (reader.fieldnames or [])]
    if missing:
        raise ValueError(
            f"{FLAG} {name}: the CSV header lacks {', '.join(missing)} "
            f"(columns: {', '.join(TRACE_COLUMNS)})"
        )
    return [dict(r) for r in reader]


def _json_rows(raw: str, name: str) -> list[dict[str, str]]:
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{FLAG} {name}: not JSON ({e})") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ValueError(f"{FLAG} {name}: expected a JSON list of objects, one per device")
    rows = []
    for r in data:
        windows = r.get("windows", "")
        if isinstance(windows, list):  # [[start, end], ...]
            windows = ";".join(f"{w[0]}-{w[1]}" for w in windows if isinstance(w, list | tuple))
        rows.append({k: str(r[k]) for k in TRACE_COLUMNS if k in r} | {"windows": str(windows)})
    return rows


def _trace_devices(rows: Sequence[dict[str, str]], name: str) -> list[Device]:
    if not rows:
        raise ValueError(f"{FLAG} {name}: no devices in the trace")
    by_index: dict[int, Device] = {}
    for n, r in enumerate(rows, start=1):
        where = f" {name} row {n}: "
        cid = str(r.get("client", "")).strip()
        try:
            index = int(cid.removeprefix("client-"))
        except ValueError:
            raise ValueError(
                f"{FLAG}{where}client must be an index or client-INDEX, got {cid!r}"
            ) from None
        if index in by_index:
            raise ValueError(f"{FLAG}{where}client {index} appears twice")
        for key in TRACE_COLUMNS[1:4]:
            if key not in r or r[key] in ("", "None"):
                raise ValueError(f"{FLAG}{where}{key} is missing")
        period = _number("period", r.get("period") or "0", where, strict=False)
        windows = _windows(r.get("windows") or "", period, where)
        by_index[index] = Device(
            _number("speed", r["speed"], where),
            _number("down", r["down"], where),
            _number("up", r["up"], where),
            period if windows else 0.0,
            windows,
        )
    if sorted(by_index) != list(range(len(by_index))):
        raise ValueError(
            f"{FLAG} {name}: clients must be 0..{len(by_index) - 1}, each once "
            "(client i of a larger --clients takes row i mod the rows)"
        )
    return [by_index[i] for i in range(len(by_index))]


def _windows(text: str, period: float, where: str) -> tuple[tuple[float, float], ...]:
    """`start-end;start-end` seconds within the period; empty: always online."""
    if not text.strip():
        return ()
    if period <= 0:
        raise ValueError(f"{FLAG}{where}windows need a period > 0")
    out = []
    for part in text.split(";"):
        s, sep, e = part.strip().partition("-")
        start = _number("window start", s, where, strict=False) if sep else -1.0
        end = _number("window end", e, where) if sep else -1.0
        if not sep or not start < end <= period:
            raise ValueError(
                f"{FLAG}{where}window {part.strip()!r} must be START-END with "
                f"0 <= START < END <= period ({period:g})"
            )
        out.append((start, end))
    return tuple(sorted(out))
