"""Many clients: thousands of virtual clients in a few processes through rounds of a small model.

Each worker process runs hundreds to thousands of asyncio clients (bench/virtual_clients.py),
each with its own TCP connection to the coordinator, as separate devices would have. Reports
p50/p99 latency of Join, model pull and submit, the coordinator's round times, peak RSS, CPU
and open files, and the load average around the run (the machine is shared); prints a table and
writes JSON to --out. The worker processes run at nice 10 (--client-nice): real clients bring
their own CPUs, and here they would otherwise take most of the coordinator's cores.

    python -m bench.many_clients                                  # 1000 clients, 3 rounds
    python -m bench.many_clients --clients 10000 --clients-per-round 100 --rounds 5
    python -m bench.many_clients --clients 10000 --rounds 2 --kill-restart
        # kill -9 the coordinator after round 1, restart it on the same state; all clients
        # must come back (--min-clients = --clients) and round 2 complete
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.output import write_json
from bench.round_overhead import ProcWatch
from bench.virtual_clients import run_worker
from fedserver.state.history import read_status
from tests.procs import REPO, Proc, free_port, spawn, start_coordinator, wait_serving

# Real clients bring their own CPUs; here 10,000 of them share the coordinator's 2 cores, and a
# join storm needs more client CPU than coordinator CPU. The workers run at a lower priority
# (nice 10) so that the coordinator gets the cores first, as it would on a machine of its own:
# latencies then measure the coordinator, not the bench. --client-nice 0 measures both at once.
CLIENT_NICE = 10


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    q = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else values * 99
    return {"n": len(values), "p50": q[49], "p99": q[98], "max": max(values)}


class FilesWatch:
    """Peak number of open file descriptors of a process (one per connected client)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak = pid, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            try:
                self.peak = max(self.peak, len(os.listdir(f"/proc/{self.pid}/fd")))
            except OSError:
                return

    def stop(self) -> None:
        self._stop.set()


def _wait_rounds(
    state: Path, server: Proc, rounds: int, timeout: float, workers: Sequence[Proc] = ()
) -> None:
    """Until `rounds` rounds are committed (polling the read-only status, as an operator would);
    a failed worker fails the run at once (the round would wait for its clients)."""
    until = time.monotonic() + timeout
    while time.monotonic() < until:
        if server.popen.poll() is not None:
            raise RuntimeError(f"coordinator exited early:\n{server.log()[-3000:]}")
        for p in workers:
            if p.popen.poll() not in (None, 0):
                raise RuntimeError(f"{p.name} failed:\n{p.log()[-3000:]}")
        if (state / "state.db").exists() and read_status(state)["rounds_completed"] >= rounds:
            return
        time.sleep(0.2)
    raise RuntimeError(f"round {rounds} not committed within {timeout:.0f}s")


def _wait_workers(workers: list[Proc], timeout: float) -> None:
    """Until every worker exited 0; the first one to fail fails the run at once (the others
    would wait for its clients until the round deadline)."""
    until = time.monotonic() + timeout
    running = list(workers)
    while running:
        for p in list(running):
            code = p.popen.poll()
            if code is None:
                continue
            if code != 0:
                raise RuntimeError(f"{p.name} failed:\n{p.log()[-3000:]}")
            running.remove(p)
        if time.monotonic() > until:
            raise RuntimeError(f"{[p.name for p in running]} still running after {timeout:.0f}s")
        time.sleep(0.2)


def run(
    clients: int,
    procs: int,
    params: int,
    rounds: int,
    work: Path,
    per_round: int | None = None,
    kill_restart: bool = False,
    timeout: float = 1800,
    client_nice: int = CLIENT_NICE,
    arrival: float = 0.0,
) -> dict[str, Any]:
    port, state = free_port(), work / "state"
    flags = ["--rounds", str(rounds), "--min-clients", str(clients), "--round-timeout", "900"]
    flags += ["--linger", "120"]
    if per_round:
        flags += ["--clients-per-round", str(per_round)]

    def start() -> Proc:
        task = f"bench.synthetic:params_{params}"
        server = start_coordinator(work, port, state, *flags, task=task)
        wait_serving(port, server)
        return server

    load_before = os.getloadavg()
    started = time.monotonic()
    server = start()
    watches = [ProcWatch(server.popen.pid)]
    files = [FilesWatch(server.popen.pid)]
    baseline_rss = watches[0].peak
    restart: dict[str, float] = {}
    workers: list[Proc] = []
    worker_watches: list[ProcWatch] = []
    try:
        per = -(-clients // procs)
        for w in range(procs):
            first, count = w * per, min(per, clients - w * per)
            args = ["-m", "bench.many_clients", "worker", "--server", f"127.0.0.1:{port}"]
            args += ["--first", str(first), "--count", str(count)]
            args += ["--stats", str(work / f"lat-{w}.json"), "--nice", str(client_nice)]
            args += ["--arrival-seconds", str(arrival)]
            workers.append(spawn(f"worker-{w}", args, work))
        worker_watches += [ProcWatch(p.popen.pid, interval=0.5) for p in workers]
        if kill_restart:
            _wait_rounds(state, server, 1, timeout, workers)
            server.kill()  # SIGKILL: no goodbye to the clients, no flush
            t = time.monotonic()
            server = start()
            restart["restart_seconds"] = time.monotonic() - t
            watches.append(ProcWatch(server.popen.pid))
            files.append(FilesWatch(server.popen.pid))
            _wait_rounds(state, server, 2, timeout, workers)
            restart["next_round_committed_after_kill_seconds"] = time.monotonic() - t
        _wait_workers(workers, timeout)
        for watch in watches:
            watch.read()
        if server.wait(180) != 0:
            raise RuntimeError(f"coordinator failed:\n{server.log()[-3000:]}")
    finally:
        for p in [server, *workers]:
            p.kill()
        for watch in [*watches, *worker_watches]:
            watch.stop()
        for f in files:
            f.stop()
    lat: dict[str, list[float]] = defaultdict(list)
    for w in range(procs):
        for k, v in json.loads((work / f"lat-{w}.json").read_text()).items():
            lat[k] += v
    status = read_status(state)
    counts = {k: len(lat.pop(k, [])) for k in ("transient_errors", "refused_after_restart")}
    peak = max(w.peak for w in watches)
    return {
        "clients": clients,
        "clients_per_round": per_round,
        "procs": procs,
        "params": params,
        "kill_restart": kill_restart,
        "client_nice": client_nice,
        "arrival_seconds": arrival,
        "rounds": [r["duration_seconds"] for r in status["rounds"]],
        "participants": [r["participants"] for r in status["rounds"]],
        "latency": {k: percentiles(v) for k, v in sorted(lat.items())},
        "coordinator_baseline_rss_bytes": baseline_rss,
        "coordinator_peak_rss_bytes": peak,
        "coordinator_rss_per_client_bytes": (peak - baseline_rss) / clients,
        "coordinator_cpu_seconds": sum(w.cpu for w in watches),
        "coordinator_peak_open_files": max(f.peak for f in files),
        # The clients share the machine's cores with the coordinator: their CPU is the rest.
        "workers_cpu_seconds": sum(w.cpu for w in worker_watches),
        "wall_seconds": time.monotonic() - started,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        **counts,
        **restart,
    }


def print_table(r: dict[str, Any]) -> None:
    k = r["clients_per_round"] or r["clients"]
    print(f"{r['clients']} clients ({k} per round) in {r['procs']} processes, {r['params']} params")
    print("round seconds:", " ".join(f"{s:.2f}" for s in r["rounds"]))
    print("participants:", r["participants"])
    print(f"client processes at nice {r['client_nice']}", end="")
    arrival = r["arrival_seconds"]
    print(f", clients arriving within {arrival:g} s" if arrival else ", all clients at once")
    print(f"{'':>9} {'n':>6} {'p50 ms':>9} {'p99 ms':>9} {'max ms':>9}")
    for kind, q in r["latency"].items():
        ms = [q.get(x, 0) * 1e3 for x in ("p50", "p99", "max")]
        print(f"{kind:>9} {q['n']:>6} {ms[0]:>9.1f} {ms[1]:>9.1f} {ms[2]:>9.1f}")
    print(
        f"coordinator: peak RSS {r['coordinator_peak_rss_bytes'] / 1e6:.0f} MB "
        f"({r['coordinator_rss_per_client_bytes'] / 1e3:.1f} kB/client over an idle "
        f"{r['coordinator_baseline_rss_bytes'] / 1e6:.0f} MB), "
        f"CPU {r['coordinator_cpu_seconds']:.1f} s (clients {r['workers_cpu_seconds']:.1f} s), "
        f"peak open files "
        f"{r['coordinator_peak_open_files']}"
    )
    print(f"transient errors {r['transient_errors']}, wall {r['wall_seconds']:.0f} s")
    if r["kill_restart"]:
        print(
            f"kill -9 after round 1: restarted in {r['restart_seconds']:.1f} s, round 2 "
            f"committed {r['next_round_committed_after_kill_seconds']:.1f} s after the kill"
        )
    before, after = r["load_average_before"], r["load_average_after"]
    print(
        f"load average before {before[0]:.2f} {before[1]:.2f}, after {after[0]:.2f} {after[1]:.2f}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.many_clients", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    worker = sub.add_parser("worker", help="(internal) one process of virtual clients")
    worker.add_argument("--server", required=True)
    worker.add_argument("--first", type=int, required=True)
    worker.add_argument("--count", type=int, required=True)
    worker.add_argument("--stats", type=Path, required=True)
    worker.add_argument("--nice", type=int, default=0)
    worker.add_argument("--arrival-seconds", type=float, default=0.0)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--procs", type=int, default=4)
    parser.add_argument("--params", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients-per-round", type=int, help="sample K of the clients (all)")
    parser.add_argument("--kill-restart", action="store_true", help="kill -9 after round 1")
    parser.add_argument(
        "--client-nice",
        type=int,
        default=CLIENT_NICE,
        help=f"CPU priority of the client processes (default {CLIENT_NICE}: below the "
        "coordinator's, standing in for clients on machines of their own; 0: same priority)",
    )
    parser.add_argument(
        "--arrival-seconds",
        type=float,
        default=0.0,
        help="each client starts at a random time within this many seconds, as clients do "
        "after a restart with their jittered backoff; its latencies count from its own start "
        "(default 0: all clients at the same instant)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--keep", type=Path, help="work (logs, state) here instead of a temp dir")
    args = parser.parse_args(argv)
    if args.command == "worker":
        os.nice(args.nice)
        lat = asyncio.run(run_worker(args.server, args.first, args.count, args.arrival_seconds))
        args.stats.write_text(json.dumps(lat))
        return 0
    if args.kill_restart and args.rounds < 2:
        parser.error("--kill-restart needs --rounds 2 or more")
    with tempfile.TemporaryDirectory(prefix="fedgrpc-many-") as tmp:
        if args.keep:
            shutil.rmtree(args.keep, ignore_errors=True)
        result = run(
            args.clients,
            args.procs,
            args.params,
            args.rounds,
            args.keep or Path(tmp),
            args.clients_per_round,
            args.kill_restart,
            client_nice=args.client_nice,
            arrival=args.arrival_seconds,
        )
    print_table(result)
    write_json(args.out, "many_clients", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
