"""A ResNet-18 (11.2 M parameters) trained through fedgrpc on CPU: round time, bytes per update
for each encoding and for a partial update, and the accuracy reached.

For each setting it runs a real coordinator and N real `fedclient` processes (IID digits as
12x12 images, examples/resnet_digits.py; the task's defaults: 1 local epoch, batch 32, lr 0.02)
for a few rounds and reports: the median round time (opened to committed, over every round; each
includes pulling the 45 MB model), the payload bytes of one update as the coordinator counted
them (`bytes_in` per round over the participants) beside what the encoding's manifest says, the
coordinator's held-out accuracy after the last round, its peak RSS and its CPU seconds per
round. The partial setting trains and sends only the tensors `--partial` names
(`fedserver run --train-tensors`), the rest of the model frozen for the round.

    python -m bench.cnn                                   # every setting, 3 clients, 3 rounds
    python -m bench.cnn --settings fp32 int4 --rounds 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.output import write_json
from bench.round_overhead import RESULTS, ProcWatch, machine
from fedcore.codecs import get_codec
from fedcore.plugins import load_object
from fedcore.selection import Selection
from fedserver.state.history import read_status
from tests.procs import free_port, start_client, start_coordinator, wait_serving

TASK = "examples.resnet_digits:task"
# Every stage but the last, and the head: 2.9 M of the 11.2 M parameters (the last stage, at 2x2
# pixels, holds three quarters of them).
PARTIAL = "stem.*,layers.0.*,layers.1.*,layers.2.*,fc.*"
SETTINGS = ("fp32", "fp16", "int8", "int4", "topk", "topk:0.01", "partial")


@dataclass(frozen=True)
class Setting:
    name: str
    encoding: str  # the clients' --encoding
    train_tensors: str = ""  # the coordinator's --train-tensors


def setting(name: str, partial: str) -> Setting:
    return Setting(name, "fp32", partial) if name == "partial" else Setting(name, name)


def expected_bytes(task: str, s: Setting) -> int:
    """What one update of setting `s` should take (the encoding's wire manifest, payload only)."""
    floats = load_object(task).initial_model(0).manifest.floats()
    if s.train_tensors:
        chosen = Selection.matching(floats, s.train_tensors).indices
        floats = type(floats)(tuple(floats.tensors[i] for i in chosen))
    return int(get_codec(s.encoding).wire_manifest(floats).total_bytes)


def run_setting(s: Setting, task: str, rounds: int, clients: int, work: Path) -> dict[str, Any]:
    port = free_port()
    tag = s.name.replace(":", "_")
    state, logs = work / f"state-{tag}", work / f"logs-{tag}"
    extra = ["--train-tensors", s.train_tensors] if s.train_tensors else []
    server = start_coordinator(
        logs,
        port,
        state,
        *("--rounds", str(rounds), "--min-clients", str(clients), "--round-timeout", "1200"),
        *extra,
        task=task,
    )
    procs = [server]
    watch = ProcWatch(server.popen.pid)
    try:
        wait_serving(port, server, timeout=180)
        procs += [
            start_client(logs, port, f"{i}/{clients}", "--encoding", s.encoding, task=task)
            for i in range(clients)
        ]
        for p in procs[1:]:
            if p.wait(3600) != 0:
                raise RuntimeError(f"{p.name} failed:\n{p.log()[-3000:]}")
        if server.wait(300) != 0:
            raise RuntimeError(f"coordinator failed:\n{server.log()[-3000:]}")
    finally:
        watch.stop()
        for p in procs:
            p.kill()
    status = read_status(state)
    done = status["rounds"]
    per_update = [r["bytes_in"] / r["participants"] for r in done if r.get("bytes_in")]
    fp32 = expected_bytes(task, Setting("fp32", "fp32"))
    expected = expected_bytes(task, s)
    return {
        "setting": s.name,
        "encoding": s.encoding,
        "train_tensors": s.train_tensors,
        "rounds": status["rounds_completed"],
        "round_seconds": statistics.median(r["duration_seconds"] for r in done),
        "round_seconds_each": [r["duration_seconds"] for r in done],
        "update_bytes_received": round(statistics.mean(per_update)) if per_update else None,
        "update_bytes_payload": expected,
        "vs_fp32": expected / fp32,
        "accuracy": done[-1]["metrics"]["accuracy"],
        "accuracy_each": [r["metrics"]["accuracy"] for r in done],
        "coordinator_peak_rss": watch.peak,
        "coordinator_cpu_per_round": watch.cpu / max(1, len(done)),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.cnn", description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), help="(all)")
    parser.add_argument("--rounds", type=int, default=3, help="(3)")
    parser.add_argument("--clients", type=int, default=3, help="(3)")
    parser.add_argument("--task", default=TASK, help=f"({TASK})")
    parser.add_argument(
        "--partial", default=PARTIAL, help=f"the partial setting's tensors ({PARTIAL})"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    params = load_object(args.task).initial_model(0).manifest.floats().total_bytes // 4
    print(f"{args.task}: {params:,} parameters, {args.clients} clients, {args.rounds} rounds")
    head = f"{'setting':>10} {'round s':>8} {'bytes/update':>13} {'vs fp32':>8} {'accuracy':>9}"
    print(f"{head} {'coord MB':>9} {'coord cpu/rd':>12}", flush=True)
    rows = []
    started = machine()
    with tempfile.TemporaryDirectory(prefix="fedgrpc-cnn-") as tmp:
        for name in args.settings:
            row = run_setting(
                setting(name, args.partial), args.task, args.rounds, args.clients, Path(tmp)
            )
            rows.append(row)
            print(
                f"{name:>10} {row['round_seconds']:>8.1f} {row['update_bytes_received']:>13,} "
                f"{row['vs_fp32']:>8.3f} {row['accuracy']:>9.4f} "
                f"{row['coordinator_peak_rss'] / 1e6:>9.0f} "
                f"{row['coordinator_cpu_per_round']:>12.2f}",
                flush=True,
            )
    report = {"task": args.task, "parameters": params, "clients": args.clients}
    report |= {"rounds": args.rounds, "machine": started, "rows": rows}
    write_json(args.out, "cnn", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
