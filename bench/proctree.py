"""Memory and CPU of a process and everything it starts, read from /proc (benchmarks only)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from bench.round_overhead import ProcWatch


def descendants(pid: int) -> list[tuple[int, int]]:
    """(pid, parent pid) of `pid`'s children, grandchildren, ... (/proc/PID/task/*/children)."""
    found: list[tuple[int, int]] = []
    stack = [pid]
    while stack:
        parent = stack.pop()
        try:
            tasks = list(Path(f"/proc/{parent}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                found.append((child, parent))
                stack.append(child)
    return found


class TreeWatch:
    """Peak memory of a process and every process it starts, through /proc, until stopped.

    bench.round_overhead.ProcWatch follows one pid; the SuperLink starts its ServerApp two
    processes down, so this one rescans the tree every tick. `peak` is the sum over processes of
    their VmHWM (each process's own peak, exact); `peak_rss_sum` is the largest sum of VmRSS seen
    at one tick (a lower bound on the tree's true peak: it can fall between ticks). CPU time
    (utime + stime, as ProcWatch reads it) is summed over the tree and sampled with the wall
    clock, so the CPU of given rounds can be read off afterwards (`cpu_between`).

    With `count_forks`, a child that runs its parent's command line is counted too: NVFlare's
    simulator forks (multiprocessing, no exec) the process that hosts its server. Such a
    child's VmHWM includes the pages it shares with its parent at the fork.
    """

    def __init__(self, pid: int, interval: float = 0.01, count_forks: bool = False) -> None:
        self.root = pid
        self.count_forks = count_forks
        self.hwm: dict[int, int] = {}
        self.names: dict[int, str] = {}
        self.cmdlines: dict[int, bytes] = {}
        self.cpu: dict[int, float] = {}
        self.cpu_samples: list[tuple[float, float]] = []  # (time.time(), CPU s of the tree)
        self.peak_rss_sum = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    @property
    def peak(self) -> int:
        return sum(self.hwm.values())

    def read(self) -> None:
        cmdlines: dict[int, bytes] = {}
        memory: dict[int, tuple[int, int]] = {}
        tree = [(self.root, 0), *descendants(self.root)]
        now = time.time()
        for pid, _ in tree:
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                cmdlines[pid] = Path(f"/proc/{pid}/cmdline").read_bytes()
                stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            cpu = (int(stat[11]) + int(stat[12])) / ProcWatch.TICK
            self.cpu[pid] = max(self.cpu.get(pid, 0.0), cpu)
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            if "VmHWM" in fields:  # a zombie has no memory lines left
                hwm, rss = (int(fields[k].split()[0]) * 1024 for k in ("VmHWM", "VmRSS"))
                memory[pid] = (hwm, rss)
        rss_sum = 0
        for pid, parent in tree:
            if pid not in memory or (
                not self.count_forks and cmdlines[pid] == cmdlines.get(parent)
            ):
                # A child forked to exec something else (a ServerApp, `uname`) carries its
                # parent's address space, copy-on-write, and VmHWM until the exec: not memory
                # of its own, and counting it would add the parent's peak a second time.
                continue
            hwm, rss = memory[pid]
            if self.cmdlines.get(pid) != cmdlines[pid]:
                self.hwm[pid] = 0  # a new program under this pid (exec): a new address space
            self.cmdlines[pid] = cmdlines[pid]
            self.hwm[pid] = max(self.hwm[pid], hwm)
            rss_sum += rss
            # The command's name, not the interpreter's: `python .../flwr-serverapp ...`,
            # `python -m flower_bench.legacy ...`.
            words = [Path(w.decode()).name for w in cmdlines[pid].split(b"\0")[:3] if w]
            names = (w for w in words if not w.startswith(("python", "-")))
            self.names[pid] = next(names, "?")
        self.peak_rss_sum = max(self.peak_rss_sum, rss_sum)
        self.cpu_samples.append((now, sum(self.cpu.values())))

    def cpu_between(self, start: float, end: float) -> float:
        """The tree's CPU seconds from wall time `start` to `end` (to the nearest samples)."""
        before = [cpu for t, cpu in self.cpu_samples if t <= start]
        after = [cpu for t, cpu in self.cpu_samples if t >= end]
        if not before or not after:
            raise RuntimeError("no CPU samples around the rounds")
        return after[0] - before[-1]

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.read()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.read()

    def processes(self) -> dict[str, int]:
        return {f"{self.names.get(pid, '?')}[{pid}]": peak for pid, peak in self.hwm.items()}
