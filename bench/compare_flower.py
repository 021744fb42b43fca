"""fedgrpc against Flower 1.41: round time and coordinator memory on the same no-train workload.

Per grid cell (N clients x P float32 parameters, default N = 8, P = 10M) it runs three real
federations on 127.0.0.1, one after the other, each for a few rounds:

- fedgrpc: `fedserver run` + N `bench.client` processes (bench/round_overhead.py's run_cell);
- Flower's deployment engine: `flower-superlink` + N `flower-supernode` + `flwr run` of the app in
  bench/flower_app (Message API FedAvg; since 1.41 every API of the SuperLink is HTTP);
- Flower's legacy gRPC path: `start_server` + N `start_client`
  (bench/flower_app/flower_bench/legacy.py).

Every client adds a fixed 1e-4 to the model and trains nothing. Round seconds are the median of
the rounds after the first (the first includes waiting for clients to connect); coordinator CPU
per round (utime + stime) is the steadier number on a shared machine. Coordinator
memory is peak RSS: VmHWM of `fedserver`, of the `start_server` process, and for the SuperLink
path the sum of VmHWM over the SuperLink and its descendants (`flower-superexec` and the
`flwr-serverapp` it starts), followed through /proc every 10 ms. The sum of per-process peaks
can exceed the peak of the sum; the JSON also carries the largest sampled sum of VmRSS.

Flower runs from its own venv (.venv-flower, `make flower-venv`): flwr 1.41 needs protobuf < 7
and fedgrpc pins protobuf 7.36, so the two cannot share .venv. The machine is shared and noisy:
only ratios measured in the same run mean anything.

    make bench-flower                                     # N=8, P=10M, 3 rounds
    python -m bench.compare_flower --quick                # smoke run: N=2, P=100k, 2 rounds
    python -m bench.compare_flower --only legacy --rounds 4
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.output import write_json
from bench.proctree import TreeWatch, descendants
from bench.round_overhead import MB, RESULTS, machine, run_cell
from tests.procs import REPO, Proc, free_port, wait_until

FLOWER_VENV = REPO / ".venv-flower"
FLOWER_APP = REPO / "bench" / "flower_app"
FLOWER_VERSION = "1.41.0"
SYSTEMS = ("superlink", "legacy")
RATIOS = {
    "time_ratio_ours_to_this": "round_seconds",
    "memory_ratio_ours_to_this": "coordinator_peak_bytes",
    "cpu_ratio_ours_to_this": "coordinator_cpu_seconds",
}
INSTALL_HINT = (
    "Flower is not installed. Build its venv and run the comparison with\n"
    "    make bench-flower            # or: make flower-venv, then python -m bench.compare_flower\n"
    "(.venv-flower holds flwr==1.41.0 from bench/flower-constraints.txt; it cannot go into\n"
    "fedgrpc's .venv: flwr 1.41 needs protobuf<7, fedgrpc pins protobuf 7.36)\n"
    "or pass --flower-python PATH to a python that has flwr 1.41."
)


def find_flower(explicit: Path | None = None) -> tuple[Path, str] | None:
    """(python with flwr importable, flwr version), or None when Flower is not installed."""
    candidates = [explicit] if explicit else [FLOWER_VENV / "bin" / "python", Path(sys.executable)]
    for python in candidates:
        try:
            out = subprocess.run(
                [str(python), "-c", "import flwr; print(flwr.__version__)"],
                capture_output=True,
                text=True,
                timeout=120,
            )
        except OSError:
            continue
        if out.returncode == 0:
            # No .resolve(): a venv's python is a symlink, and its bin/ holds flwr's commands.
            return python, out.stdout.strip()
    return None


def flower_env(python: Path, home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{python.parent}{os.pathsep}{env.get('PATH', '')}"  # flower-superexec & co.
    env["PYTHONPATH"] = str(FLOWER_APP)  # flower_bench, and nothing of fedgrpc's
    env["PYTHONUNBUFFERED"] = "1"
    env["FLWR_HOME"] = str(home)
    env["FLWR_TELEMETRY_ENABLED"] = "0"  # no network here but loopback
    return env


def launch(name: str, cmd: Sequence[str], logs: Path, env: dict[str, str]) -> Proc:
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{name}.log"
    with open(log_path, "ab") as log:
        popen = subprocess.Popen(
            list(cmd), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=FLOWER_APP
        )
    return Proc(name, popen, log_path)


def kill_tree(proc: Proc) -> None:
    """Kill `proc` and everything it started (superexec runs in a session of its own)."""
    for pid, _ in [*descendants(proc.popen.pid), (proc.popen.pid, 0)]:
        with contextlib.suppress(OSError):  # already gone
            os.kill(pid, 9)
    proc.popen.wait(timeout=30)


def listening(port: int, proc: Proc) -> bool:
    if proc.popen.poll() is not None:
        raise RuntimeError(f"{proc.name} exited early:\n{proc.log()[-3000:]}")
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def finished(out: Path, procs: list[Proc]) -> bool:
    """The rounds file is written; raises as soon as a process died before that."""
    if out.exists():
        return True
    for p in procs:
        if p.popen.poll() is not None:
            raise RuntimeError(f"{p.name} exited {p.popen.returncode}:\n{p.log()[-3000:]}")
    return False


def flower_cell(
    system: str, python: Path, clients: int, params: int, rounds: int, work: Path, timeout: float
) -> dict[str, Any]:
    """One Flower federation; returns its rounds and the coordinator side's peak memory."""
    logs = work / f"flower-{system}-n{clients}-p{params}"
    home = logs / "flwr-home"
    home.mkdir(parents=True)
    env = flower_env(python, home)
    out = logs / "rounds.json"
    port = free_port()
    bin_dir = python.parent
    procs: list[Proc] = []
    try:
        if system == "superlink":
            (home / "config.toml").write_text(
                '[superlink]\ndefault = "bench"\n\n'
                f'[superlink.bench]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
            )
            # No dependency installation: it would run `uv sync` against a package index.
            cmd = [str(bin_dir / "flower-superlink"), "--insecure", "--host", "127.0.0.1"]
            cmd += ["--port", str(port), "--disable-runtime-dependency-installation"]
            server = launch("superlink", cmd, logs, env)
        else:
            cmd = [str(python), "-m", "flower_bench.legacy", "server", "--port", str(port)]
            cmd += ["--clients", str(clients), "--params", str(params)]
            cmd += ["--rounds", str(rounds), "--out", str(out)]
            server = launch("server", cmd, logs, env)
        procs.append(server)
        watch = TreeWatch(server.popen.pid)
        # The legacy client gives up on a refused connection: start clients once it listens.
        wait_until(lambda: listening(port, server), 120, f"{server.name} on port {port}")
        for i in range(clients):
            if system == "superlink":
                cmd = [str(bin_dir / "flower-supernode"), "--insecure"]
                cmd += ["--superlink", f"127.0.0.1:{port}", "--port", str(free_port())]
            else:
                cmd = [str(python), "-m", "flower_bench.legacy", "client", "--port", str(port)]
            procs.append(launch(f"client-{i}", cmd, logs, env))
        if system == "superlink":
            config = f"num-rounds={rounds} num-params={params} num-clients={clients} "
            config += f'out-path="{out}"'
            started = subprocess.run(
                [str(bin_dir / "flwr"), "run", str(FLOWER_APP), "bench", "--run-config", config],
                capture_output=True,
                text=True,
                env=env,
                cwd=logs,
                timeout=300,
            )
            if started.returncode != 0:
                raise RuntimeError(f"flwr run failed:\n{started.stdout}{started.stderr}")
        wait_until(lambda: finished(out, procs), timeout, f"{system}'s rounds")
        watch.stop()
        if not out.exists():
            raise RuntimeError(f"{system}: no rounds.json; see logs in {logs}")
    finally:
        for p in procs:
            kill_tree(p)
    timing = json.loads(out.read_text())
    seconds, spans = timing["round_seconds"], timing["spans"]
    if len(seconds) != rounds:
        raise RuntimeError(f"{system}: {len(seconds)} rounds of {rounds}")
    steady = spans[1:] or spans  # as the round seconds: after the first round
    cpu = watch.cpu_between(steady[0][0], steady[-1][1]) / len(steady)
    return {
        "system": f"flower-{system}",
        "round_seconds": statistics.median(seconds[1:] or seconds),
        "round_seconds_all": seconds,
        "coordinator_peak_bytes": watch.peak,
        "coordinator_peak_rss_sum_bytes": watch.peak_rss_sum,
        "coordinator_cpu_seconds": cpu,
        "coordinator_processes": watch.processes(),
    }


def ours_cell(clients: int, params: int, rounds: int, work: Path) -> dict[str, Any]:
    cell = run_cell(clients, params, rounds, work)
    return {
        "system": "fedgrpc",
        "round_seconds": cell["round_seconds"],
        "round_seconds_all": cell["round_seconds_all"],
        "coordinator_peak_bytes": cell["peak_rss_bytes"],
        "coordinator_cpu_seconds": cell["coordinator_cpu_seconds"],
        "wire_bytes_per_round": cell["wire_bytes_per_round"],
    }


def verdict(rows: list[dict[str, Any]]) -> str:
    """The issue's targets, judged against Flower's faster path in this run."""
    ours = rows[0]
    flower = rows[1:]
    if not flower:
        return ""
    fast = min(flower, key=lambda r: r["round_seconds"])
    speed = fast["round_seconds"] / ours["round_seconds"]
    memory = fast["coordinator_peak_bytes"] / ours["coordinator_peak_bytes"]
    return (
        f"against {fast['system']} (Flower's faster path here): {speed:.1f}x faster "
        f"(target 5x: {'met' if speed >= 5 else 'NOT met'}), {memory:.1f}x less coordinator "
        f"memory (target 4x: {'met' if memory >= 4 else 'NOT met'})"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.compare_flower", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smoke run: N=2, P=100k, 2 rounds")
    parser.add_argument("--clients", type=int, nargs="+", default=[8])
    parser.add_argument("--params", type=int, nargs="+", default=[10_000_000])
    parser.add_argument("--rounds", type=int, default=3, help="rounds per run (3)")
    parser.add_argument("--only", choices=SYSTEMS, help="run one Flower path (and ours)")
    parser.add_argument("--flower-python", type=Path, help="a python with flwr (.venv-flower)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per Flower run")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON results folder")
    parser.add_argument("--keep-logs", type=Path, help="keep every process's log here")
    args = parser.parse_args(argv)
    if args.quick:
        args.clients, args.params, args.rounds = [2], [100_000], 2
    found = find_flower(args.flower_python)
    if found is None:
        print(INSTALL_HINT, file=sys.stderr)
        return 2
    python, version = found
    if not version.startswith(FLOWER_VERSION.rsplit(".", 1)[0] + "."):
        print(f"warning: flwr {version} (this benchmark was written for {FLOWER_VERSION})")
    systems = [args.only] if args.only else list(SYSTEMS)
    info = machine()
    print(f"flwr {version} from {python}; load average {info['loadavg_at_start']}", flush=True)
    print(
        f"{'N':>3} {'P':>6}  {'system':<17} {'round s':>8} {'coord MB':>9} {'cpu s':>6} "
        f"{'time ours/this':>14} {'mem ours/this':>13} {'cpu ours/this':>13}",
        flush=True,
    )
    cells: list[dict[str, Any]] = []
    verdicts: list[str] = []
    with tempfile.TemporaryDirectory(prefix="fedgrpc-vs-flower-") as tmp:
        work = Path(tmp)
        if args.keep_logs:
            work = Path(tempfile.mkdtemp(prefix="run-", dir=args.keep_logs))
        for params, clients in itertools.product(args.params, args.clients):
            rows = [ours_cell(clients, params, args.rounds, work)]
            rows[0]["loadavg_after"] = os.getloadavg()
            for system in systems:
                rows.append(
                    flower_cell(system, python, clients, params, args.rounds, work, args.timeout)
                )
                rows[-1]["loadavg_after"] = os.getloadavg()
            ours = rows[0]
            for row in rows:
                row.update(clients=clients, params=params, rounds=args.rounds)
                for ratio, key in RATIOS.items():
                    # A tiny quick run can use less CPU than one clock tick: no ratio then.
                    row[ratio] = ours[key] / row[key] if row[key] else float("nan")
                print(
                    f"{clients:>3} {params / 1e6:>5g}M  {row['system']:<17} "
                    f"{row['round_seconds']:>8.3f} {row['coordinator_peak_bytes'] / MB:>9.0f} "
                    f"{row['coordinator_cpu_seconds']:>6.2f} "
                    f"{row['time_ratio_ours_to_this']:>14.3f} "
                    f"{row['memory_ratio_ours_to_this']:>13.3f} "
                    f"{row['cpu_ratio_ours_to_this']:>13.3f}",
                    flush=True,
                )
            cells.extend(rows)
            verdicts.append(f"N={clients} P={params / 1e6:g}M: {verdict(rows)}")
    for line in verdicts:
        print(line)
    print(f"load average at the end: {os.getloadavg()}")
    summary = {"machine": info, "flwr_version": version, "cells": cells, "verdicts": verdicts}
    write_json(args.out, "compare_flower", summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
