"""Round overhead: a real coordinator and N real no-train clients, against the machine's floor.

For each cell of the grid (N clients x P float32 parameters) it starts `fedserver run` on the
torch-free synthetic task (bench/synthetic.py) and N `bench.client` processes that send a fixed
delta, runs a few rounds and reports per round: seconds (median over rounds after the first),
coordinator peak RSS (VmHWM), payload bytes on the wire. In the same run it measures the floor
for the same bytes (bench/floor.py: bare Python gRPC moving 1 MiB chunks, plus numpy adding
the deltas) and prints round time / floor. The machine is shared and noisy: only ratios
measured in the same run mean anything.

    make bench                                   # the full grid
    python -m bench.round_overhead --quick       # smoke run: N=2, P=1M, 2 rounds
    python -m bench.round_overhead --clients 8 --params 10000000 --rounds 5
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import floor
from bench.output import write_json
from fedserver.state.history import read_status
from tests.procs import REPO, Proc, free_port, spawn, start_coordinator, wait_serving

GRID_CLIENTS = (2, 4, 8, 16)
GRID_PARAMS = (1_000_000, 10_000_000, 50_000_000)
RESULTS = REPO / "bench" / "results"
MB = 1e6


def memory_budget(model_bytes: int) -> int:
    """The acceptance bound on coordinator peak RSS: 4 x model bytes + 200 MB."""
    return 4 * model_bytes + 200 * 1_000_000


class ProcWatch:
    """Follows a process's peak RSS and CPU time through /proc until it exits.

    Peak RSS is VmHWM (/proc/PID/status). Not ru_maxrss from wait4: that counter survives exec,
    so a child forked from a big parent (pytest with torch loaded) inherits the parent's RSS as
    its "peak"; VmHWM belongs to the process's own address space. It only grows, so reading it
    often enough is exact unless the peak falls in the last poll interval before exit (it falls
    at aggregation, well before). CPU time (utime + stime of all threads, /proc/PID/stat) is the
    steadier number on a shared machine: other people's load stretches wall time, not CPU time.
    """

    TICK = os.sysconf("SC_CLK_TCK")

    def __init__(self, pid: int, interval: float = 0.01) -> None:
        self.pid = pid
        self.peak = 0
        self.cpu = 0.0
        self._stop = threading.Event()
        self.read()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def read(self) -> bool:
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
            stat = Path(f"/proc/{self.pid}/stat").read_text()
        except OSError:
            return False
        fields = stat.rsplit(")", 1)[1].split()
        self.cpu = max(self.cpu, (int(fields[11]) + int(fields[12])) / self.TICK)
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                self.peak = max(self.peak, int(line.split()[1]) * 1024)
                return True
        return False  # a zombie has no memory lines left

    def _run(self, interval: float) -> None:
        while self.read() and not self._stop.wait(interval):
            pass

    def stop(self) -> None:
        self.read()
        self._stop.set()
        self._thread.join()


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "loadavg_at_start": os.getloadavg(),
    }


def start_synthetic(
    logs: Path, port: int, state: Path, params: int, rounds: int, clients: int, timeout: int = 600
) -> Proc:
    """`fedserver run` on the synthetic `params`-parameter task, waiting for `clients` a round."""
    flags = ["--rounds", str(rounds), "--min-clients", str(clients)]
    flags += ["--round-timeout", str(timeout)]
    return start_coordinator(logs, port, state, *flags, task=f"bench.synthetic:params_{params}")


def run_cell(
    clients: int, params: int, rounds: int, work: Path, state_root: Path | None = None
) -> dict[str, Any]:
    """One real federation of `clients` bench clients on a `params`-parameter model."""
    port = free_port()
    state = Path(tempfile.mkdtemp(prefix="state-", dir=state_root or work))
    logs = work / f"logs-n{clients}-p{params}"
    server = start_synthetic(logs, port, state, params, rounds, clients)
    procs = [server]
    watch = ProcWatch(server.popen.pid)
    try:
        wait_serving(port, server, timeout=120)
        watch.read()
        cpu_at_start = watch.cpu  # startup (imports, initial model, checkpoint 0) excluded
        for i in range(clients):
            args = ["-m", "bench.client", "--server", f"127.0.0.1:{port}"]
            args += ["--client-id", f"bench-{i}", "--stats", str(logs / f"stats-{i}.json")]
            procs.append(spawn(f"client-{i}", args, logs))
        for p in procs[1:]:
            if p.wait(600) != 0:
                raise RuntimeError(f"{p.name} failed:\n{p.log()[-3000:]}")
        watch.read()  # the clients are done: the round's peak is behind us
        code = server.wait(120)
        if code != 0:
            raise RuntimeError(f"coordinator exited {code}:\n{server.log()[-3000:]}")
    finally:
        for p in procs:
            p.kill()
        watch.stop()
    status = read_status(state)
    durations = [r["duration_seconds"] for r in status["rounds"]]
    stats = [json.loads((logs / f"stats-{i}.json").read_text()) for i in range(clients)]
    wire = sum(s["down_bytes"] + s["up_bytes"] for s in stats) / rounds
    steady = durations[1:] or durations
    return {
        "clients": clients,
        "params": params,
        "model_bytes": params * 4,
        "rounds": rounds,
        "round_seconds": statistics.median(steady),
        "round_seconds_all": durations,
        "peak_rss_bytes": watch.peak,
        "coordinator_cpu_seconds": (watch.cpu - cpu_at_start) / rounds,
        "memory_budget_bytes": memory_budget(params * 4),
        "wire_bytes_per_round": wire,
        "client_pull_seconds": [s["pull_seconds"] for s in stats],
        "client_push_seconds": [s["push_seconds"] for s in stats],
    }


FLOOR_REPEATS = 3


def measure_floor(
    address: str, server_pid: int, clients: int, params: int, repeats: int = FLOOR_REPEATS
) -> dict[str, Any]:
    """The floor for a round's bytes, measured `repeats` times; each figure is the median. One
    measure moved by up to ±13 % from run to run, more than the rounds' median did."""
    runs = [_floor_once(address, server_pid, clients, params) for _ in range(repeats)]
    out: dict[str, Any] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    out["floor_seconds_all"] = [round(r["floor_seconds"], 4) for r in runs]
    return out


def _floor_once(address: str, server_pid: int, clients: int, params: int) -> dict[str, float]:
    server = ProcWatch(server_pid, interval=3600)
    before = server.cpu
    down, up = floor.grpc_seconds(address, clients, params * 4)
    server.stop()
    acc = floor.accumulate_seconds(clients, params)
    return {
        "down_seconds": down,
        "up_seconds": up,
        "accumulate_seconds": acc,
        "floor_seconds": down + up + acc,
        # The bare server's CPU for the same bytes, plus the adding: what the coordinator's CPU
        # per round compares with.
        "floor_server_cpu_seconds": server.cpu - before + acc,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench.round_overhead", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: N=2, P=1M, 2 rounds")
    parser.add_argument("--clients", type=int, nargs="+", default=list(GRID_CLIENTS))
    parser.add_argument("--params", type=int, nargs="+", default=list(GRID_PARAMS))
    parser.add_argument("--rounds", type=int, default=3, help="rounds per cell (3)")
    parser.add_argument("--repeat", type=int, default=1, help="run each cell this many times")
    parser.add_argument(
        "--state-root", type=Path, help="where coordinators keep state (a temp dir)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON results folder")
    args = parser.parse_args(argv)
    if args.quick:
        args.clients, args.params, args.rounds = [2], [1_000_000], 2

    cells: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fedgrpc-bench-") as tmp:
        work = Path(tmp)
        floor_port = free_port()
        floor_proc = spawn("floor", ["-m", "bench.floor", "--port", str(floor_port)], work)
        try:
            print(
                f"{'N':>3} {'P':>6} {'round s':>8} {'floor s':>8} {'ratio':>6} "
                f"{'cpu s':>6} {'floor cpu':>9} {'ratio':>6} "
                f"{'peak MB':>8} {'budget MB':>9} {'wire MB':>8}",
                flush=True,
            )
            for params, clients, _ in itertools.product(
                args.params, args.clients, range(args.repeat)
            ):
                cell = run_cell(clients, params, args.rounds, work, args.state_root)
                cell.update(
                    measure_floor(f"127.0.0.1:{floor_port}", floor_proc.popen.pid, clients, params)
                )
                cell["cpu_ratio_to_floor"] = (
                    cell["coordinator_cpu_seconds"] / cell["floor_server_cpu_seconds"]
                )
                cell["ratio_to_floor"] = cell["round_seconds"] / cell["floor_seconds"]
                cells.append(cell)
                print(
                    f"{clients:>3} {params / 1e6:>5g}M {cell['round_seconds']:>8.3f} "
                    f"{cell['floor_seconds']:>8.3f} {cell['ratio_to_floor']:>6.2f} "
                    f"{cell['coordinator_cpu_seconds']:>6.2f} "
                    f"{cell['floor_server_cpu_seconds']:>9.2f} "
                    f"{cell['cpu_ratio_to_floor']:>6.2f} "
                    f"{cell['peak_rss_bytes'] / MB:>8.0f} "
                    f"{cell['memory_budget_bytes'] / MB:>9.0f} "
                    f"{cell['wire_bytes_per_round'] / MB:>8.0f}",
                    flush=True,
                )
        finally:
            floor_proc.kill()
    write_json(args.out, "round_overhead", {"machine": machine(), "cells": cells})
    over = [c for c in cells if c["peak_rss_bytes"] > c["memory_budget_bytes"]]
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
