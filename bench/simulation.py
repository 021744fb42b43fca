"""`fedserver simulate` at scale: round time, wall time and peak memory over its processes.

Grid: N in {1,000, 10,000} virtual clients, 10% per round, two clients: `noop` (trains nothing,
sends a zero delta: the engine's own cost) and the Synthetic(0.5, 0.5) logistic regression of
examples/synthetic.py. Each cell is one real `fedserver simulate` process with 2 workers of the
embedded engine (`fedgrpc`) or of a local Ray (`fedgrpc-ray`); peak memory is the largest
sampled sum of RSS over the driver and all its descendants (workers; for Ray also GCS, raylet,
Ray's agents), sampled every 0.2 s. Round
seconds are the median of the coordinator's recorded round durations after round 1.

Also measured: the in-process intake (inprocess.InProcessTransport.submit) per update.

    python -m bench.simulation                      # the fedgrpc grid, 3 rounds per cell
    python -m bench.simulation --clients 1000 --rounds 3 --only noop
    python -m bench.simulation --intake             # only the per-update intake cost
    python -m bench.simulation --clients 1000000 --per-round 1000 --only synthetic noop \
        --workers 0 1 2                             # the scale point (issue 25, item 5)

With `--engines fedgrpc flower` each cell runs on Flower 1.41's simulation engine first
(bench/flower_app/flower_bench/simulation.py in .venv-flower, `make flower-venv`: the same
Synthetic data and SGD in numpy, a local Ray of 2 CPUs with one per ClientApp, Message API FedAvg
on 10% of the nodes), memory sampled the same way, and the fedgrpc row carries the ratios.
`--engines ray` first measures Ray alone (bench/ray_floor.py: started as fedgrpc starts it, two
idle actors): the memory any engine on a local Ray of 2 workers pays before its clients.

    python -m bench.simulation --engines fedgrpc flower --clients 1000 10000 \
        --flower-max-clients 1000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import TensorDataset

from bench.proctree import descendants
from examples.synthetic import SyntheticTask
from examples.synthetic_data import DIMENSION
from fedclient.task import LocalData, TrainConfig, TrainResult
from tests.procs import REPO, child_env

RESULTS = REPO / "bench" / "results"
FLOWER_PY = REPO / ".venv-flower" / "bin" / "python"
CELL_TIMEOUT = 1800
FEDSERVER = (sys.executable, "-m", "fedserver.cli")


class NoTrainTask(SyntheticTask):
    """The Synthetic model and data shape, but local training is a no-op (a zero delta)."""

    def load_partition(self, partition: Any) -> LocalData:
        return LocalData(TensorDataset(torch.zeros(1, DIMENSION), torch.zeros(1, dtype=torch.long)))

    def train(self, model: torch.nn.Module, data: Any, config: TrainConfig) -> TrainResult:
        return TrainResult(1, {})

    def server_test_data(self) -> None:
        return None


noop = NoTrainTask()
TASKS = {"noop": "bench.simulation:noop", "synthetic": "examples.synthetic:task"}


def _rss_kb(pid: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _ray_pids(ray_dir: str) -> list[str]:
    """Processes naming the cell's Ray temp dir (raylet, GCS): those left behind are killed."""
    out = subprocess.run(["pgrep", "-f", ray_dir], capture_output=True, text=True)
    return out.stdout.split()


def _run_watched(
    args: list[str], env: dict[str, str], ray_dir: str, what: str
) -> tuple[float, int]:
    """Run `args` to the end; (wall seconds, peak KiB of RSS summed over it and its Ray)."""
    started = time.monotonic()
    proc = subprocess.Popen(args, env=env, cwd=REPO, stderr=subprocess.PIPE)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.2):
            pids = {str(proc.pid), *(str(p) for p, _ in descendants(proc.pid)), *_ray_pids(ray_dir)}
            peak = max(peak, sum(_rss_kb(p) for p in pids))

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    try:
        _, err = proc.communicate(timeout=CELL_TIMEOUT)
    except subprocess.TimeoutExpired as e:
        proc.kill()  # ray.shutdown never ran: the cell's Ray processes must go too
        _, err = proc.communicate()
        for pid in _ray_pids(ray_dir):
            subprocess.run(["kill", "-9", pid], check=False)
        raise RuntimeError(f"{what}: no result in {CELL_TIMEOUT} s:\n{err.decode()[-3000:]}") from e
    finally:
        done.set()
        watcher.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{err.decode()[-3000:]}")
    return time.monotonic() - started, peak


def run_cell(
    task: str,
    clients: int,
    rounds: int,
    engine: str = "embedded",
    per_round: int | None = None,
    workers: int = 2,
) -> dict[str, Any]:
    """One fedgrpc cell: `workers` workers of `engine` (embedded: local processes, 0: in the
    driver; ray: a local Ray), `per_round` clients a round (default 10% of `clients`)."""
    name = "fedgrpc" if engine == "embedded" else f"fedgrpc {engine}"
    if workers != 2:
        name += f" w{workers}"
    per_round = per_round or clients // 10
    with tempfile.TemporaryDirectory(prefix="simb") as tmp:
        ray_dir = tempfile.mkdtemp(prefix="rayb", dir="/tmp")
        state = Path(tmp) / "state"
        args = [sys.executable, "-m", "fedserver.cli", "simulate", "--task", TASKS[task]]
        args += ["--clients", str(clients), "--clients-per-round", str(per_round)]
        args += ["--rounds", str(rounds), "--state-dir", str(state), "--workers", str(workers)]
        args += ["--engine", engine, "--ray-temp-dir", ray_dir, "--log-level", "warning"]
        wall, peak = _run_watched(args, child_env(), ray_dir, f"{name} {task} N={clients}")
        status = json.loads(
            subprocess.run(
                [*FEDSERVER, "status", "--state-dir", str(state), "--json"],
                capture_output=True,
                env=child_env(),
                cwd=REPO,
                check=True,
            ).stdout
        )
    durations = [r["duration_seconds"] for r in status["rounds"]]
    return _row(name, task, clients, rounds, durations, wall, peak, per_round) | {
        "accuracy": status["rounds"][-1]["metrics"].get("accuracy")
    }


def run_flower_cell(task: str, clients: int, rounds: int) -> dict[str, Any]:
    """The same cell on Flower 1.41's simulation engine (bench/flower_app/.../simulation.py)."""
    with tempfile.TemporaryDirectory(prefix="simf") as tmp:
        ray_dir = tempfile.mkdtemp(prefix="rayf", dir="/tmp")
        out = Path(tmp) / "rounds.json"
        args = [str(FLOWER_PY), "-m", "flower_bench.simulation", "--task", task]
        args += ["--clients", str(clients), "--rounds", str(rounds), "--ray-dir", ray_dir]
        args += ["--out", str(out)]
        env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
        env["PYTHONPATH"] = os.pathsep.join([str(REPO / "bench" / "flower_app"), str(REPO)])
        wall, peak = _run_watched(args, env, ray_dir, f"flower {task} N={clients}")
        durations = json.loads(out.read_text())["round_seconds"]
    return _row("flower", task, clients, rounds, durations, wall, peak) | {"accuracy": None}


def run_ray_floor() -> dict[str, Any]:
    """Ray alone, started as fedgrpc starts it, with 2 idle actors (bench/ray_floor.py)."""
    ray_dir = tempfile.mkdtemp(prefix="rayr", dir="/tmp")
    args = [sys.executable, "-m", "bench.ray_floor", "--ray-dir", ray_dir]
    wall, peak = _run_watched(args, child_env(), ray_dir, "ray alone")
    return _row("ray alone", "idle", 0, 0, [0.0], wall, peak)


def _row(
    engine: str,
    task: str,
    clients: int,
    rounds: int,
    durations: list[float],
    wall: float,
    peak: int,
    per_round: int | None = None,
) -> dict[str, Any]:
    return {
        "engine": engine,
        "task": task,
        "clients": clients,
        "per_round": per_round or clients // 10,
        "rounds": rounds,
        "round_s": statistics.median(durations[1:] or durations),
        "first_round_s": durations[0],
        "wall_s": wall,
        "peak_mb": peak / 1024,
    }


def intake(updates: int = 1000) -> float:
    """Seconds per update through InProcessTransport.submit (610-parameter model)."""
    import numpy as np

    from fedcore import checksums
    from fedcore.codecs import get_codec
    from fedcore.proto import coordinator_pb2 as pb
    from fedcore.wire import manifest_to_proto
    from fedserver.coordinator.assembly import CoordinatorSettings, build_coordinator
    from fedserver.coordinator.offers import TrainingDefaults
    from fedserver.rounds.synchronous import RoundPolicy
    from fedserver.simulation.inprocess import InProcessTransport

    async def measure() -> float:
        with tempfile.TemporaryDirectory() as tmp:
            policy = RoundPolicy(1, min_clients=updates + 1, clients_per_round=updates + 1)
            s = CoordinatorSettings(TASKS["noop"], Path(tmp), policy, TrainingDefaults())
            c = build_coordinator(s)
            transport = InProcessTransport(c)
            transport.touch_all(f"client-{i}" for i in range(updates + 1))
            work = transport.training_work(set())
            assert work is not None
            codec = get_codec("fp32")
            payload = codec.encode(np.zeros(610, np.float32))
            digest = checksums.hexdigest(checksums.DEFAULT, payload)
            manifest = manifest_to_proto(codec.wire_manifest(c.model.manifest.floats()))
            headers = [
                pb.UpdateHeader(
                    client_id=cid,
                    round=1,
                    base_version=c.model.version,
                    num_examples=1,
                    encoding="fp32",
                    manifest=manifest,
                    total_bytes=payload.size,
                    checksum=checksums.DEFAULT,
                ).SerializeToString()
                for cid in work.client_ids[:updates]
            ]
            t = time.perf_counter()
            for h in headers:
                assert transport.submit(h, payload, digest) is None
            c.store.close()
            return (time.perf_counter() - t) / updates

    return asyncio.run(measure())


def _print(r: dict[str, Any]) -> None:
    acc = f"{r['accuracy']:.3f}" if r.get("accuracy") is not None else "-"
    ratios = f"{r['round_ratio']:.2f} | {r['memory_ratio']:.2f}" if "round_ratio" in r else "- | -"
    print(
        f"| {r['engine']} | {r['task']} | {r['clients']} | {r['per_round']} | "
        f"{r['round_s']:.2f} | {r['first_round_s']:.2f} | {r['wall_s']:.1f} | "
        f"{r['peak_mb']:.0f} | {acc} | {ratios} |",
        flush=True,
    )


def main() -> None:
    import logging

    logging.disable(logging.INFO)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--clients", type=int, nargs="+", default=[1000, 10000])
    p.add_argument("--only", choices=sorted(TASKS), nargs="+", default=sorted(TASKS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--per-round",
        type=int,
        default=None,
        help="clients per round of the fedgrpc cells (default: 10%% of N; Flower's is 10%%)",
    )
    p.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=[2],
        help="fedgrpc worker counts, one row each (embedded 0: clients in the driver process)",
    )
    p.add_argument(
        "--engines",
        choices=["ray", "fedgrpc", "fedgrpc-ray", "flower"],
        nargs="+",
        default=["fedgrpc"],
        help="fedgrpc: the embedded engine (2 worker processes); fedgrpc-ray: --engine ray "
        "(a local Ray, 2 workers); ray: Ray alone with 2 idle actors, the memory floor of any "
        "Ray engine",
    )
    p.add_argument(
        "--flower-max-clients", type=int, default=10**9, help="skip Flower cells above this N"
    )
    p.add_argument("--intake", action="store_true", help="only the per-update intake cost")
    args = p.parse_args()
    if "flower" in args.engines and not FLOWER_PY.exists():
        sys.exit("Flower is not installed: `make flower-venv` builds .venv-flower")
    load = Path("/proc/loadavg").read_text().split()[0]
    per_update = intake()
    print(f"in-process intake: {per_update * 1e3:.2f} ms per update (load {load})")
    rows = []
    if not args.intake:
        print(
            "| engine | client | N | K | round s | first round s | wall s | peak MB | acc "
            "| round ratio fedgrpc/flower | memory ratio |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        if "ray" in args.engines:
            rows.append(run_ray_floor())
            _print(rows[-1])
        for clients in args.clients:
            for task in args.only:
                cell: dict[str, dict[str, Any]] = {}
                if "flower" in args.engines and clients <= args.flower_max_clients:
                    cell["flower"] = run_flower_cell(task, clients, args.rounds)
                    _print(cell["flower"])
                for engine, flag in (("fedgrpc", "embedded"), ("fedgrpc-ray", "ray")):
                    if engine not in args.engines:
                        continue
                    for workers in args.workers:
                        if flag == "ray" and workers == 0:
                            continue  # in-process is the embedded engine's
                        r = run_cell(task, clients, args.rounds, flag, args.per_round, workers)
                        cell[f"{engine} w{workers}"] = r
                        if "flower" in cell:
                            r["round_ratio"] = r["round_s"] / cell["flower"]["round_s"]
                            r["memory_ratio"] = r["peak_mb"] / cell["flower"]["peak_mb"]
                        _print(r)
                rows.extend(cell.values())
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "simulation.json"
    out.write_text(json.dumps({"load": load, "intake_s": per_update, "cells": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
