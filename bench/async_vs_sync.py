"""Asynchronous (FedBuff) vs synchronous FedAvg with slow clients: wall-clock to a target accuracy.

Real processes on this machine: one coordinator and 10 `fedclient` processes on digits, whose
speeds differ (a log-normal spread, the fastest at 1, and 3 of 10 clients 10x slower, through
the clients' `--slowdown` testing aid, which scales the CPU time of local training). Digits
trains an epoch in a few milliseconds here, so every client is also made --base-slowdown times
slower than this host (10): compute, not the RPC round trip, then dominates a round, as it does
on phones and old servers. The same clients race in every setting, one after the other in the
same run, and each race stops once a published model reaches the target held-out accuracy (the
coordinator evaluates every version):

    sync-all             synchronous FedAvg, every client each round, no deadline pressure
    sync-deadline-D      every client selected, round closes after D s with >= half of them
    sync-overselect-D    7 of 10 selected at random, closes after D s with >= 5 (over-selection)
    async-K              --mode async --buffer-size K: a version every K deltas, staleness-weighted

Both are tuned as a user would: each deadline D of --deadlines and each K of --buffer-sizes is
raced, and the best time of each family is the one compared (a synchronous round that misses
its quorum is re-opened, up to 50 times).

    .venv/bin/python -m bench.async_vs_sync [--deadlines 0.5,1,2,4] [--buffer-sizes 2,3,5]
    .venv/bin/python -m bench.async_vs_sync --only sync-deadline,async --deadlines 0.5,1 \
        --buffer-sizes 2,3 --repeat 3                 # the best of each family, median of 3

Time to target = from round 1 opening (all clients joined) to the commit of the first model at
or above the target. Updates are those counted; refused are uploads the coordinator refused
(a synchronous round that closed while the client trained: its work and bytes were spent all
the same); update bytes are the payload bytes received.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sqlite3
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedserver.rounds.staleness import StalenessWeight
from tests.procs import Proc, free_port, start_client, start_coordinator, wait_serving

_TICK = threading.Event()
DEFAULT_WEIGHT = str(StalenessWeight())  # the coordinator's --staleness-weight default
REFUSED = "update not counted"  # fedclient's log line for an upload the coordinator refused


def speeds(clients: int, slow: int, sigma: float, seed: int, base: float = 1.0) -> list[float]:
    """--slowdown per client: `base` x a log-normal spread (the fastest at 1), the first `slow`
    x10."""
    spread = np.exp(np.random.default_rng(seed).normal(0.0, sigma, clients))
    spread = spread / spread.min()
    return [round(base * float(f) * (10.0 if i < slow else 1.0), 2) for i, f in enumerate(spread)]


def settings(
    deadlines: Sequence[float],
    buffer_sizes: Sequence[int],
    max_staleness: int,
    weights: Sequence[str] = (DEFAULT_WEIGHT,),
) -> dict[str, list[str]]:
    chosen = {"sync-all": ["--round-timeout", "600"]}
    retry = ["--max-attempts", "50"]
    for d in deadlines:
        chosen[f"sync-deadline-{d:g}"] = ["--round-timeout", str(d), "--min-fit", "5", *retry]
    for d in deadlines:
        chosen[f"sync-overselect-{d:g}"] = [
            "--round-timeout", str(d), "--clients-per-round", "7", "--min-fit", "5", *retry
        ]  # fmt: skip
    for k in buffer_sizes:
        for w in weights:
            name = f"async-{k}" if len(weights) == 1 else f"async-{k}-{w}"
            chosen[name] = [
                "--mode", "async", "--buffer-size", str(k), "--max-staleness", str(max_staleness),
                "--staleness-weight", w,
            ]  # fmt: skip
    return chosen


def _read(state: Path) -> tuple[list[tuple[Any, ...]], dict[int, int], list[tuple[Any, ...]]]:
    db = state / "state.db"
    if not db.exists():
        return [], {}, []
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rounds = con.execute(
            "SELECT round, metrics, opened_at, duration, participants FROM rounds ORDER BY round"
        ).fetchall()
        traffic = dict(con.execute("SELECT round, bytes_in FROM traffic").fetchall())
        receipts = con.execute("SELECT round, metrics FROM receipts").fetchall()
    except sqlite3.OperationalError:  # tables not created yet
        return [], {}, []
    finally:
        con.close()
    return rounds, traffic, receipts


def race(
    name: str, flags: list[str], slowdowns: list[float], target: float, timeout: float, work: Path
) -> dict[str, Any]:
    port, state, logs = free_port(), work / name / "state", work / name / "logs"
    n = len(slowdowns)
    procs: list[Proc] = []
    try:
        server = start_coordinator(
            logs, port, state, "--rounds", "500", "--min-clients", str(n), *flags
        )
        procs.append(server)
        wait_serving(port, server, timeout=300)
        for i, f in enumerate(slowdowns):
            procs.append(start_client(logs, port, f"{i}/{n}", "--slowdown", str(f)))
        until = time.monotonic() + timeout
        reached = None
        while reached is None and time.monotonic() < until:
            _TICK.wait(0.5)  # polling a database a separate process writes; no event to wait on
            rounds, traffic, receipts = _read(state)
            reached = next(
                (r for r in rounds if json.loads(r[1]).get("accuracy", 0.0) >= target), None
            )
            if server.popen.poll() is not None:
                break
    finally:
        for p in procs:
            p.kill(signal.SIGKILL)
    # Uploads the coordinator refused (a synchronous round that closed while the client was
    # still training): the client spent the training and the bytes all the same. Counted up
    # to the race's end, up to 0.5 s after the target was reached.
    refused = sum(p.log().count(REFUSED) for p in procs[1:])
    rounds, traffic, receipts = _read(state)
    result: dict[str, Any] = {"setting": name, "flags": flags, "reached": reached is not None}
    if not rounds:
        return result
    start = rounds[0][2]
    last = reached[0] if reached else rounds[-1][0]
    done = [r for r in rounds if r[0] <= last]
    staleness: Counter[int] = Counter()
    for rnd, metrics in receipts:
        if rnd <= last:
            staleness[rnd - int(json.loads(metrics).get("base_round", rnd))] += 1
    result |= {
        "rounds": last,
        "seconds": round(done[-1][2] + done[-1][3] - start, 2) if reached else math.inf,
        "accuracy": json.loads(done[-1][1]).get("accuracy", 0.0),
        "updates": sum(r[4] for r in done),
        "refused": refused,
        "update_bytes": sum(traffic.get(r[0], 0) for r in done),
        "staleness": dict(sorted(staleness.items())),
    }
    return result


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median time (the slower middle one of an even count), with every
    run's time: a race's time to target varies from run to run with the order the updates
    happen to arrive in."""
    ordered = sorted(runs, key=lambda r: r.get("seconds", math.inf))
    return ordered[len(ordered) // 2] | {"times": [r.get("seconds", math.inf) for r in runs]}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--slow", type=int, default=3, help="clients 10x slower (3)")
    p.add_argument("--sigma", type=float, default=0.5, help="log-normal speed spread (0.5)")
    p.add_argument("--target", type=float, default=0.95)
    p.add_argument(
        "--deadlines",
        default="0.5,1,2,4",
        help="sync round timeouts to race, s; the best of each family counts (0.5,1,2,4)",
    )
    p.add_argument(
        "--base-slowdown",
        type=float,
        default=10.0,
        help="every client this much slower than this host, emulating devices (10)",
    )
    p.add_argument("--buffer-sizes", default="2,3,5", help="async buffer sizes K to race (2,3,5)")
    p.add_argument("--max-staleness", type=int, default=10)
    p.add_argument(
        "--staleness-weights",
        default=DEFAULT_WEIGHT,
        help=f"async staleness weights to race, separated by ';' ({DEFAULT_WEIGHT})",
    )
    p.add_argument("--timeout", type=float, default=600.0, help="per setting, s (600)")
    p.add_argument("--only", default="", help="comma-separated setting prefixes to run (all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--repeat", type=int, default=1, help="race each setting N times; the median run counts"
    )
    p.add_argument("--out", type=Path, default=Path("async_vs_sync.json"))
    args = p.parse_args(argv)

    slowdowns = speeds(args.clients, args.slow, args.sigma, args.seed, args.base_slowdown)
    print(f"clients' --slowdown: {slowdowns}", flush=True)
    deadlines = [float(d) for d in args.deadlines.split(",")]
    sizes = [int(k) for k in args.buffer_sizes.split(",")]
    chosen = settings(deadlines, sizes, args.max_staleness, args.staleness_weights.split(";"))
    if args.only:
        wanted = args.only.split(",")
        chosen = {k: v for k, v in chosen.items() if any(k.startswith(w) for w in wanted)}
    results = []
    with tempfile.TemporaryDirectory(prefix="async-bench-") as tmp:
        for name, flags in chosen.items():
            runs = []
            for i in range(args.repeat):
                r = race(name, flags, slowdowns, args.target, args.timeout, Path(tmp) / str(i))
                print(f"  {name}: {r}", flush=True)
                runs.append(r)
            results.append(median_run(runs))
    sync = [r for r in results if r["setting"].startswith("sync") and r.get("reached")]
    best = min(sync, key=lambda r: r["seconds"]) if sync else None
    fast = [r for r in results if r["setting"].startswith("async") and r.get("reached")]
    best_async = min(fast, key=lambda r: r["seconds"]) if fast else None
    print(f"\ntime to {args.target} held-out accuracy on digits, {args.clients} clients")
    if best is not None and best_async is not None:
        print(
            f"best synchronous: {best['setting']} ({best['seconds']} s, {best['updates']} "
            f"updates); best asynchronous: {best_async['setting']} ({best_async['seconds']} s, "
            f"{best_async['updates']} updates): {best['seconds'] / best_async['seconds']:.2f}x"
        )
    print(
        f"{'setting':<20} {'time s':>8} {'rounds':>7} {'updates':>8} {'refused':>8} "
        f"{'upd. bytes':>11} ratio  times s"
    )
    for r in results:
        ratio = best["seconds"] / r["seconds"] if best and r.get("reached") else float("nan")
        print(
            f"{r['setting']:<20} {r.get('seconds', math.inf):>8} {r.get('rounds', 0):>7} "
            f"{r.get('updates', 0):>8} {r.get('refused', 0):>8} {r.get('update_bytes', 0):>11} "
            f"{ratio:5.2f}x  {' '.join(str(t) for t in r['times'])}"
        )
        r["speedup_vs_best_sync"] = ratio
    for r in results:
        if r["setting"].startswith("async"):
            print(f"{r['setting']} staleness (versions behind: updates): {r.get('staleness')}")
    report = {
        "slowdowns": slowdowns,
        "target": args.target,
        "best_sync": best["setting"] if best else None,
        "best_async": best_async["setting"] if best_async else None,
        "results": results,
    }
    args.out.write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
