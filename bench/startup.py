"""CPU seconds (user + sys) per process start: what every integration test pays per process.

    python -m bench.startup                 # 5 runs of each, medians
    python -m bench.startup --runs 9 --task examples.breast_cancer:task

coordinator: `fedserver run --task TASK` until its health check answers SERVING, then SIGTERM.
client:      a client's imports plus its task's data (what it does before its first RPC).
help:        `fedserver --help` and `fedclient run --help` (the CLIs alone).
CPU time, not wall time: the machine is shared, and waiting for a core is not start-up cost.
"""

from __future__ import annotations

import argparse
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from tests.procs import REPO, child_env, free_port, start_coordinator, wait_serving


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # waited-for children only
    return usage.ru_utime + usage.ru_stime


def coordinator(task: str) -> float:
    before = children_cpu()
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        server = start_coordinator(Path(tmp), port, Path(tmp) / "state", task=task)
        wait_serving(port, server)
        server.kill(signal.SIGTERM)  # kill() waits, so its CPU is in RUSAGE_CHILDREN
    return children_cpu() - before


def python(*args: str) -> float:
    before = children_cpu()
    subprocess.run(
        [sys.executable, *args],
        env=child_env(),
        cwd=REPO,
        capture_output=True,
        timeout=300,
        check=True,
    )
    return children_cpu() - before


def client(task: str) -> float:
    module, _, name = task.partition(":")
    load = f"{module}.{name}.load_partition(Partition(0, 3))"
    return python(
        "-c", f"import fedclient.cli, {module}; from fedclient.partition import Partition; {load}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--task", default="examples.digits:task")
    args = parser.parse_args()
    measures: dict[str, Callable[[], float]] = {
        "coordinator": lambda: coordinator(args.task),
        "client": lambda: client(args.task),
        "fedserver --help": lambda: python("-m", "fedserver.cli", "--help"),
        "fedclient run --help": lambda: python("-m", "fedclient.cli", "run", "--help"),
    }
    samples: dict[str, list[float]] = {name: [] for name in measures}
    for _ in range(args.runs):  # interleaved, so a burst of load hits every measure alike
        for name, measure in measures.items():
            samples[name].append(measure())
    for name, values in samples.items():
        spread = f"{min(values):.2f}..{max(values):.2f}"
        print(f"{name:22} {statistics.median(values):5.2f} CPU s  (runs {spread})")


if __name__ == "__main__":
    main()
