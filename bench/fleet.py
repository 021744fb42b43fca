"""Sync vs sync with a deadline and over-selection vs async (FedBuff) on a simulated device
fleet: fleet time to a target accuracy, and the host time each run took.

Every run is `fedserver simulate --fleet` (through fedserver.simulation.api.run, in this
process, --workers 0) on the same fleet: --clients devices (10,000) in three speed tiers
(1x, 4x, 16x of --speed examples per second, a third each, drawn with the seed) online
--diurnal hours a day at a time-zone offset of their own, training Synthetic(0.5, 0.5)
(examples.synthetic:task). Settings:

    sync                 --clients-per-round K, no deadline to speak of (--round-timeout 1e7):
                         a round waits for its slowest client (or its lapse, if it goes offline)
    sync-D-xO            --overselect O: K*O selected, closes on the first K updates (or at
                         its D fleet-second deadline with >= K)
    async-B[-cC]         --mode async --buffer-size B --max-concurrency K (or C of
                         --concurrency): a version every B
                         updates, as many updates in all as the sync runs (--async-updates)

Each family is tuned over the values given (--deadlines, --overselect, --buffers), and the best
of each is compared with `sync` of the same run (ratio = fleet time to target / sync's).
Time to target = fleet time at the close of the first round (version) at which the mean
held-out accuracy (the coordinator's evaluation, every round) of the last --smooth rounds is
>= --target; "best accuracy" is the best such mean.

    .venv/bin/python -m bench.fleet                      # table + bench/results/fleet.json
    .venv/bin/python -m bench.fleet --clients 1000 --sync-rounds 10 --buffers 10
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any

from fedserver.simulation import api as simulation

TASK = "examples.synthetic:task"


def fleet_spec(a: argparse.Namespace) -> str:
    return f"tiers=1:4:16,speed={a.speed:g},diurnal={a.diurnal:g},seed={a.seed}"


def settings(a: argparse.Namespace) -> list[tuple[str, str, dict[str, Any]]]:
    """(family, name, flags) of every run."""
    k = a.per_round
    runs: list[tuple[str, str, dict[str, Any]]] = [
        (
            "sync",
            "sync",
            {
                "clients_per_round": k,
                "min_fit": k,
                "round_timeout": 1e7,
                "max_attempts": 50,  # a dropout lapses; the round re-opens with another client
                "rounds": a.sync_rounds,
            },
        )
    ]
    for d in a.deadlines:
        for o in a.overselect:
            runs.append(
                (
                    "sync-deadline",
                    f"sync-{d:g}s-x{o:g}",
                    {
                        "clients_per_round": k,
                        "overselect": o,
                        "min_fit": k,
                        "round_timeout": d,
                        "max_attempts": 50,
                        "rounds": a.sync_rounds,
                    },
                )
            )
    for b in a.buffers:
        for c in a.concurrency or [k]:
            runs.append(
                (
                    "async",
                    f"async-{b}" + (f"-c{c}" if a.concurrency else ""),
                    {
                        "mode": "async",
                        "buffer_size": b,
                        "max_concurrency": c,
                        "round_timeout": a.lease,
                        "rounds": math.ceil((a.async_updates or a.sync_rounds * k) / b),
                    },
                )
            )
    return runs


def race(a: argparse.Namespace, name: str, flags: dict[str, Any], root: Path) -> dict[str, Any]:
    started = time.monotonic()
    history = simulation.run(
        a.task,
        a.clients,
        state_dir=root / name,
        fleet=fleet_spec(a),
        seed=a.seed,
        workers=0,
        **flags,
    )
    host = time.monotonic() - started
    rounds = history.rounds
    acc = [r["metrics"].get("accuracy", 0.0) for r in rounds]
    # The mean of the last --smooth evaluations: one lucky evaluation of a noisy metric is not
    # the target reached (async evaluates every version: more draws of the noise).
    # Only once there are that many: a first round's single evaluation is one draw as well.
    smooth = [
        sum(acc[i + 1 - a.smooth : i + 1]) / a.smooth if i + 1 >= a.smooth else 0.0
        for i in range(len(acc))
    ]
    hit = next((r for r, m in zip(rounds, smooth, strict=True) if m >= a.target), None)
    return {
        "name": name,
        "exit_code": history.exit_code,
        "rounds": len(rounds),
        "updates": sum(r["participants"] for r in rounds),
        "fleet_to_target_s": hit["fleet_time"] if hit else None,
        "rounds_to_target": hit["round"] if hit else None,
        "fleet_total_s": rounds[-1]["fleet_time"] if rounds else 0.0,
        "best_accuracy": max(smooth, default=0.0),
        "host_s": host,
        "flags": flags,
        "curve": [
            [round(r["fleet_time"], 1), round(x, 4)] for r, x in zip(rounds, acc, strict=True)
        ],
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--clients", type=int, default=10_000)
    p.add_argument("--per-round", type=int, default=100, help="K: the updates a round needs")
    p.add_argument("--speed", type=float, default=1.0, help="1x tier: examples/s (1)")
    p.add_argument("--diurnal", type=float, default=12.0, help="online hours a day (12)")
    p.add_argument("--target", type=float, default=0.16, help="held-out accuracy (0.16)")
    p.add_argument("--sync-rounds", type=int, default=20)
    p.add_argument(
        "--async-updates",
        type=int,
        help="async: versions = this / B (default: what the sync runs count, rounds x K)",
    )
    p.add_argument("--deadlines", type=float, nargs="+", default=[60.0, 200.0])
    p.add_argument("--overselect", type=float, nargs="+", default=[1.3])
    p.add_argument("--buffers", type=int, nargs="+", default=[10, 25])
    p.add_argument("--concurrency", type=int, nargs="+", help="async --max-concurrency values (K)")
    p.add_argument("--task", default=TASK, help=f"({TASK})")
    p.add_argument("--lease", type=float, default=3600.0, help="async --round-timeout (3600)")
    p.add_argument("--smooth", type=int, default=3, help="evaluations averaged (3)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--only", nargs="+", help="run only these names")
    p.add_argument("--out", type=Path, default=Path("bench/results/fleet.json"))
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # stale async updates refused: a line each
    results = []
    with tempfile.TemporaryDirectory(prefix="fleet-bench-") as tmp:
        for family, name, flags in settings(a):
            if a.only and name not in a.only:
                continue
            r = race(a, name, flags, Path(tmp)) | {"family": family}
            results.append(r)
            print(f"{name}: {_fmt(r['fleet_to_target_s'])} fleet s to target, "
                  f"{r['host_s']:.1f} host s", flush=True)  # fmt: skip
    base = next((r for r in results if r["name"] == "sync"), None)
    best: dict[str, dict[str, Any]] = {}
    for r in results:
        t = r["fleet_to_target_s"]
        b = best.get(r["family"])
        if t is not None and (b is None or b["fleet_to_target_s"] > t):
            best[r["family"]] = r
    for r in results:
        t, bt = r["fleet_to_target_s"], base["fleet_to_target_s"] if base else None
        r["ratio_vs_sync"] = t / bt if t is not None and bt else None
        r["best_of_family"] = best.get(r["family"]) is r
    _table(a, results)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(
        json.dumps(
            {
                "fleet": fleet_spec(a),
                "task": a.task,
                "clients": a.clients,
                "target": a.target,
                "runs": results,
            },
            indent=2,
        )
    )
    print(f"wrote {a.out}")


def _fmt(x: float | None, digits: int = 0) -> str:
    return "not reached" if x is None else f"{x:,.{digits}f}"


def _table(a: argparse.Namespace, results: list[dict[str, Any]]) -> None:
    print(f"\n{a.task} on fleet {fleet_spec(a)}, {a.clients:,} devices, target {a.target}")
    head = "| setting | rounds | updates | rounds to target | fleet s to target | ratio vs sync "
    head += "| best accuracy | fleet s total | host s |"
    print(head)
    print("|" + "---|" * 9)
    for r in results:
        mark = " *" if r["best_of_family"] else ""
        ratio = r["ratio_vs_sync"]
        print(
            f"| {r['name']}{mark} | {r['rounds']} | {r['updates']:,} | "
            f"{r['rounds_to_target'] or '-'} | {_fmt(r['fleet_to_target_s'])} | "
            f"{'-' if ratio is None else f'{ratio:.2f}'} | {r['best_accuracy']:.3f} | "
            f"{r['fleet_total_s']:,.0f} | {r['host_s']:.1f} |"
        )


if __name__ == "__main__":
    main()
