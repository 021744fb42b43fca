"""Update compression on digits: wire bytes relative to fp32 and accuracy after 20 rounds.

For each encoding it runs a real coordinator and 3 real `fedclient` processes (IID digits, the
task's default config) with `--encoding E`, and reports the coordinator's held-out accuracy
after the last round and the bytes of one update relative to fp32.

    python -m bench.compression                  # fp32 fp16 int8 int4 topk topk:0.01, 20 rounds
    python -m bench.compression --encodings int8 --rounds 5
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.output import write_json
from examples.digits import task
from fedcore.codecs import get_codec
from fedserver.state.history import read_status
from tests.procs import REPO, free_port, start_client, start_coordinator, wait_serving

ENCODINGS = ("fp32", "fp16", "int8", "int4", "topk", "topk:0.01")


def run_encoding(encoding: str, rounds: int, clients: int, work: Path) -> dict[str, Any]:
    port = free_port()
    logs = work / f"logs-{encoding.replace(':', '_')}"
    server = start_coordinator(
        logs,
        port,
        work / f"state-{encoding.replace(':', '_')}",
        "--rounds",
        str(rounds),
        "--min-clients",
        str(clients),
    )
    procs = [server]
    try:
        wait_serving(port, server)
        procs += [
            start_client(logs, port, f"{i}/{clients}", "--encoding", encoding)
            for i in range(clients)
        ]
        for p in procs[1:]:
            if p.wait(600) != 0:
                raise RuntimeError(f"{p.name} failed:\n{p.log()[-3000:]}")
        if server.wait(120) != 0:
            raise RuntimeError(f"coordinator failed:\n{server.log()[-3000:]}")
    finally:
        for p in procs:
            p.kill()
    status = read_status(work / f"state-{encoding.replace(':', '_')}")
    floats = task.initial_model(0).manifest.floats()
    update = get_codec(encoding).wire_manifest(floats).total_bytes
    fp32 = get_codec("fp32").wire_manifest(floats).total_bytes
    return {
        "encoding": encoding,
        "rounds": status["rounds_completed"],
        "accuracy": status["rounds"][-1]["metrics"]["accuracy"],
        "update_bytes": update,
        "bytes_vs_fp32": update / fp32,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.compression", description=__doc__.splitlines()[0])
    parser.add_argument("--encodings", nargs="+", default=list(ENCODINGS))
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    rows = []
    print(f"{'encoding':>10} {'bytes/update':>12} {'vs fp32':>8} {'accuracy':>9}", flush=True)
    with tempfile.TemporaryDirectory(prefix="fedgrpc-compression-") as tmp:
        for encoding in args.encodings:
            row = run_encoding(encoding, args.rounds, args.clients, Path(tmp))
            rows.append(row)
            print(
                f"{encoding:>10} {row['update_bytes']:>12} {row['bytes_vs_fp32']:>8.3f} "
                f"{row['accuracy']:>9.4f}",
                flush=True,
            )
    write_json(
        args.out, "compression", {"rounds": args.rounds, "clients": args.clients, "rows": rows}
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
