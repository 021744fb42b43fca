"""`fedserver report`: per-round CSV and JSON plus PNG plots of a run, from its state dir.

Reads the same read-only view as `fedserver status` (safe next to a running coordinator).
Plots use matplotlib's object API on the Agg canvas: no display, no pyplot global state.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedcore.files import SHARED, atomic_write
from fedcore.limits import CLIENT_METRIC_PREFIX
from fedserver.state.history import read_status

BASE_COLUMNS = (
    "round",
    "participants",
    "num_examples",
    "duration_seconds",
    "bytes_in",
    "bytes_out",
)
FLEET_COLUMNS = ("fleet_seconds", "fleet_time")


def _byte_unit(rounds: Sequence[dict[str, Any]]) -> tuple[int, str]:
    peak = max((r.get(k, 0) for r in rounds for k in ("bytes_in", "bytes_out")), default=0)
    for scale, unit in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if peak >= scale:
            return scale, unit
    return 1, "bytes"


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    report = sub.add_parser(
        "report",
        help="write per-round CSV, JSON and PNG plots of a run",
        description="Writes rounds.csv, report.json, accuracy.png, loss.png, participants.png "
        "and bytes.png into --out.",
    )
    report.add_argument("--config", type=Path, help="TOML file with a [server] table")
    report.add_argument("--state-dir", type=Path, default=Path("state"), help="(./state)")
    report.add_argument("--out", type=Path, default=Path("report"), help="(./report)")
    report.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    try:
        written = write_report(args.state_dir, args.out)
    except FileNotFoundError as e:
        print(f"fedserver report: {e}", file=sys.stderr)
        return 1
    print(f"fedserver report: wrote {', '.join(p.name for p in written)} to {args.out}")
    return 0


def write_report(state_dir: Path, out: Path) -> list[Path]:
    status = read_status(state_dir)
    rounds = status["rounds"]
    out.mkdir(parents=True, exist_ok=True)
    # Reports are meant to be shared (no tensors, no secrets): SHARED = as the umask allows.
    written = [_write_csv(out / "rounds.csv", rounds), out / "report.json"]
    atomic_write(written[1], [json.dumps(status, indent=2).encode()], SHARED)
    title = f"{status['task']} · {status['strategy']} · {status['rounds_completed']} rounds"
    written += _plots(out, rounds, title)
    return written


def _metric_names(rounds: Sequence[dict[str, Any]]) -> list[str]:
    return sorted({k for r in rounds for k in r["metrics"]})


# A cell a spreadsheet would read as a formula (OWASP "CSV injection"): metric names come from
# clients, and a name like `=HYPERLINK(...)` must stay text when rounds.csv is opened.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: object) -> object:
    """`value` safe for a spreadsheet: text starting like a formula gets a leading `'`.

    Numbers are written as they are (a negative loss is a number, not a formula)."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def _write_csv(path: Path, rounds: Sequence[dict[str, Any]]) -> Path:
    names = _metric_names(rounds)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    # A simulated fleet's rounds (simulate --fleet) add their fleet time beside the host's.
    fleet = FLEET_COLUMNS if any("fleet_seconds" in r for r in rounds) else ()
    columns = (*BASE_COLUMNS, *fleet)
    writer.writerow([csv_cell(c) for c in (*columns, *names)])
    for r in rounds:
        cells = [*(r.get(c, "") for c in columns), *(r["metrics"].get(n, "") for n in names)]
        writer.writerow([csv_cell(c) for c in cells])
    atomic_write(path, [buf.getvalue().encode()], SHARED)
    return path


def _series(rounds: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in rounds:
        value = r["metrics"].get(key, r.get(key))
        if value is not None:
            xs.append(int(r["round"]))
            ys.append(float(value))
    return xs, ys


def _plots(out: Path, rounds: Sequence[dict[str, Any]], title: str) -> list[Path]:
    from matplotlib.figure import Figure  # imported here: only reports need matplotlib

    def figure(name: str, ylabel: str, lines: dict[str, str], bars: bool = False) -> Path:
        fig = Figure(figsize=(6.4, 4.0), dpi=100, layout="constrained")
        ax = fig.add_subplot()
        plotted = 0
        scale, unit = _byte_unit(rounds) if ylabel == "bytes" else (1, "")
        for i, (key, label) in enumerate(lines.items()):
            xs, ys = _series(rounds, key)
            ys = [y / scale for y in ys]
            if not xs:
                continue
            plotted += 1
            if bars:
                width = 0.8 / len(lines)
                ax.bar([x + (i - (len(lines) - 1) / 2) * width for x in xs], ys, width, label=label)
            else:
                ax.plot(xs, ys, marker="o", markersize=3, label=label)
        if not plotted:
            ax.text(0.5, 0.5, "no data recorded", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("round")
        ax.set_ylabel(f"{unit} per round" if unit else ylabel)
        ax.set_title(title, fontsize=9)
        ax.grid(True, alpha=0.3)
        if plotted and bars:
            fig.legend(loc="outside lower center", ncols=len(lines), frameon=False)
        elif plotted:
            ax.legend()
        ax.xaxis.get_major_locator().set_params(integer=True)
        if name == "participants":
            ax.yaxis.get_major_locator().set_params(integer=True)
        path = out / f"{name}.png"
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        atomic_write(path, [buf.getvalue()], SHARED)
        return path

    return [
        figure(
            "accuracy",
            "accuracy",
            {
                "accuracy": "held-out (coordinator)",
                CLIENT_METRIC_PREFIX + "train_accuracy": "train (clients, mean)",
            },
        ),
        figure(
            "loss",
            "loss",
            {
                "loss": "held-out (coordinator)",
                CLIENT_METRIC_PREFIX + "train_loss": "train (clients)",
            },
        ),
        figure("participants", "updates per round", {"participants": "participants"}, bars=True),
        figure(
            "bytes",
            "bytes",
            {"bytes_in": "updates received", "bytes_out": "model sent"},
            bars=True,
        ),
    ]
