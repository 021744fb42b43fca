"""Fault injection for the reliability tests: inert unless FEDGRPC_FAULT is set.

    FEDGRPC_FAULT=POINT:ROUND[,POINT:ROUND...]   e.g. FEDGRPC_FAULT=checkpoint:3
    FEDGRPC_FAULT_DIR=DIR                        where markers go (default: the working dir)

When a process reaches POINT during round ROUND it writes DIR/POINT-ROUND.hit (so a test knows
exactly where it is) and then does what the point is for; each point fires once per process:

    coordinator  collect     an update of the round was counted in memory -> freeze the daemon
                 aggregate   the round closed, aggregation not started     -> freeze the worker
                 checkpoint  the round's checkpoint is half written        -> freeze the worker
                 commit      checkpoint on disk, SQLite row not written    -> freeze the worker
                 reply       an update was counted -> its reply is dropped (UNAVAILABLE) once
    client       upload      the update's first chunk was sent -> the upload stalls

"Freeze" blocks the thread forever: the test then kill -9s the process at that exact point.
Production code only calls fire() / freeze(); with FEDGRPC_FAULT unset both return at once.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

_fired: set[tuple[str, int]] = set()
_lock = threading.Lock()


def _armed() -> set[tuple[str, int]]:
    spec = os.environ.get("FEDGRPC_FAULT", "")
    points = set()
    for item in filter(None, (s.strip() for s in spec.split(","))):
        point, _, round_text = item.partition(":")
        points.add((point, int(round_text)))
    return points


def fire(point: str, round_number: int) -> bool:
    """True once if POINT:ROUND is armed (after writing its marker); False otherwise."""
    if "FEDGRPC_FAULT" not in os.environ:
        return False
    key = (point, round_number)
    with _lock:
        if key not in _armed() or key in _fired:
            return False
        _fired.add(key)
    marker = Path(os.environ.get("FEDGRPC_FAULT_DIR", ".")) / f"{point}-{round_number}.hit"
    marker.write_text(str(os.getpid()))
    return True


def freeze(point: str, round_number: int) -> None:
    """Block this thread forever if POINT:ROUND is armed, so the test can kill -9 us here."""
    if fire(point, round_number):
        threading.Event().wait()
