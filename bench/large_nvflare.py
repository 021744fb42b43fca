"""NVIDIA FLARE's side of bench.large_model: its simulator on the same no-train workload.

bench/nvflare_app/job.py runs NumpyFedAvgRecipe in SimEnv from NVFlare's own venv
(.venv-nvflare, `make nvflare-venv`: pip resolves other grpcio and cryptography versions for it
than fedgrpc pins, and a Flask/SQLAlchemy/aiohttp stack). This module starts it, follows its
processes' memory through /proc and reads its rounds off its log.
"""

from __future__ import annotations

import itertools
import os
import re
import statistics
import subprocess
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from bench.compare_flower import kill_tree
from bench.floor import CHUNK
from bench.proctree import TreeWatch
from tests.procs import REPO, Proc

NVFLARE_VENV = REPO / ".venv-nvflare"
NVFLARE_APP = REPO / "bench" / "nvflare_app"
NVFLARE_VERSION = "2.9.0"
NVFLARE_MODES = {"streaming": [], "no-streaming": ["--no-streaming"]}
INSTALL_HINT = (
    "NVFlare is not installed: only fedgrpc's side runs. For the side by side, build its venv:\n"
    "    make nvflare-venv            # .venv-nvflare: nvflare==2.9.0 from "
    "bench/nvflare-constraints.txt\n"
    "or pass --nvflare-python PATH to a python that has nvflare 2.9."
)


def find_nvflare(explicit: Path | None = None) -> tuple[Path, str] | None:
    """(python with nvflare importable, its version), or None when NVFlare is not installed."""
    python = explicit or NVFLARE_VENV / "bin" / "python"
    try:
        out = subprocess.run(
            [str(python), "-c", "import nvflare; print(nvflare.__version__)"],
            capture_output=True,
            text=True,
            timeout=120,
        )
    except OSError:
        return None
    return (python, out.stdout.strip()) if out.returncode == 0 else None


def write_initial(path: Path, params: int) -> None:
    """The NVFlare round-0 model as .npy, random like bench.synthetic's, written in blocks."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(params,))
    rng = np.random.default_rng(0)
    block = CHUNK * 16
    for start in range(0, params, block):
        part = out[start : start + block]
        part[...] = rng.standard_normal(part.size, dtype=np.float32) * np.float32(0.01)
    out.flush()
    del out


_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
_ROUND = re.compile(r"Round (\d+) started\.")


def nvflare_rounds(log: str) -> list[float]:
    """Round seconds from the simulator's log: from each "Round k started" banner to the next
    one, the last to "Finished FedAvg" (a banner's time is its log record's, a line above)."""
    stamp: datetime | None = None
    marks: list[datetime] = []
    for line in log.splitlines():
        if m := _STAMP.match(line):
            stamp = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f")
        if stamp is not None and (_ROUND.search(line) or "Finished FedAvg." in line):
            marks.append(stamp)
    return [(b - a).total_seconds() for a, b in itertools.pairwise(marks)]


def wait_quiet(proc: Proc, timeout: float, stall: float) -> None:
    """Wait for `proc` to exit; kill its whole tree and raise if it runs past `timeout` or its
    log stops growing for `stall` seconds. Under load, a simulated client can lose its
    connection at start-up ("Connection reset by peer") and the simulator then waits for it
    forever."""
    deadline = time.monotonic() + timeout
    size, grew = -1, time.monotonic()
    try:
        while True:
            try:
                proc.popen.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                pass
            now = time.monotonic()
            if (current := proc.log_path.stat().st_size) != size:
                size, grew = current, now
            if now > deadline or now - grew > stall:
                why = f"no output for {stall:.0f} s" if now <= deadline else "past its timeout"
                raise RuntimeError(f"{proc.name}: {why}:\n{proc.log()[-3000:]}")
    finally:
        kill_tree(proc)  # the simulator's forks and workers too, whatever happened
    if proc.popen.returncode != 0:
        raise RuntimeError(f"{proc.name} exited {proc.popen.returncode}:\n{proc.log()[-3000:]}")


def nvflare_cell(
    mode: str,
    python: Path,
    params: int,
    clients: int,
    rounds: int,
    work: Path,
    timeout: float,
    stall: float,
) -> dict[str, Any]:
    """One NVFlare simulator run of NumpyFedAvgRecipe; its rounds and peak memory."""
    logs = Path(tempfile.mkdtemp(prefix=f"nvflare-{mode}-p{params}-", dir=work))
    initial = logs / "initial.npy"
    write_initial(initial, params)
    cmd = [str(python), str(NVFLARE_APP / "job.py"), "--initial", str(initial)]
    cmd += ["--clients", str(clients), "--rounds", str(rounds), "--workdir", str(logs)]
    cmd += NVFLARE_MODES[mode]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing of fedgrpc's
    env["PYTHONUNBUFFERED"] = "1"
    log_path = logs / "simulator.log"
    with open(log_path, "wb") as log:
        popen = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=logs)
    proc = Proc(f"nvflare-{mode}", popen, log_path)
    watch = TreeWatch(popen.pid, count_forks=True)
    try:
        wait_quiet(proc, timeout, stall)
    finally:
        watch.stop()
        initial.unlink()
    seconds = nvflare_rounds(proc.log())
    if len(seconds) != rounds:
        raise RuntimeError(f"nvflare: {len(seconds)} rounds of {rounds}:\n{proc.log()[-3000:]}")
    processes = watch.processes()
    server = {k: v for k, v in processes.items() if k.startswith("nvflare.private.fed.app.sim")}
    workers = [v for k, v in server.items() if "simulator_worker" in k]
    server = {k: v for k, v in server.items() if "simulator_worker" not in k}
    cpu = {f"{watch.names.get(pid, '?')}[{pid}]": t for pid, t in watch.cpu.items()}
    return {
        "coordinator_cpu_seconds_total": sum(cpu[k] for k in server),
        "client_cpu_seconds_total": [cpu[k] for k in cpu if "simulator_worker" in k],
        "system": f"nvflare-{mode}",
        "round_seconds": statistics.median(seconds[1:] or seconds),
        "round_seconds_all": seconds,
        "coordinator_peak_bytes": sum(server.values()),
        "client_peak_bytes": max(workers, default=0),
        "client_peaks_bytes": workers,
        "processes": processes,
    }
