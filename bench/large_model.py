"""Large models: fedgrpc at 600 M and 100 M float32 parameters against its floor and NVIDIA FLARE.

Per size P (default 600 M and 100 M, 3 clients, 3 rounds) one real federation on 127.0.0.1:
`fedserver run` on the torch-free synthetic task (bench/synthetic.py) and N `fedclient run`
processes whose Task (bench/large_task.py) builds the torch model and trains nothing: it adds
1e-4 to every parameter. Reported per size: round seconds (median of the rounds after the first,
from the coordinator's history; the first waits for clients to start), the floor for the same
bytes measured in the same run (bench/floor.py: bare gRPC moving N models down and N deltas up,
plus numpy adding N deltas), their ratio, the coordinator's peak RSS and the largest client's
(VmHWM through /proc, every process each one starts included: bench/proctree.py), each against
the model's size and the issue's bounds (coordinator <= 2 x model + 200 MB, client <= 2 x model
+ 300 MB). Each --fedclients K is one fedgrpc run in which only K of the N clients are fedclients
and the others bench.client (the protocol without torch, O(chunk) memory): `--fedclients 3 0`
measures the whole system, then the coordinator's path alone.

At the sizes in --nvflare-params (default 100 M) NVFlare 2.9's simulator runs the same workload
right after: NumpyFedAvgRecipe with one float32 array of P values in SimEnv with N clients,
each returning the array + 1e-4 (bench/nvflare_app), once with its default chunked download
streaming and once without (np_download_chunk_size = 0). Its round seconds are the gaps between
the server's "Round k started" log lines (the last round ends at "Finished FedAvg"), the median
of those after the first, so the simulator's start-up is not counted. Its server peak is the sum
of VmHWM over the simulator's processes (the launcher and the processes it forks, one of which
hosts the server and starts the clients); the clients are the `simulator_worker` processes; the
bench's driver script (job.py, which only builds the recipe) counts for neither.

NVFlare lives in its own venv (.venv-nvflare, `make nvflare-venv`). Without it the fedgrpc side
runs alone and the install command is printed. Before each run the bench checks that
MemAvailable covers an estimate of what the run needs, and skips the run if not (--force runs
it anyway). The machine is shared: only ratios measured in the same run mean anything, and
--repeat K runs each fedgrpc federation K times, each against its own floor, for the median.

    make bench-large                  # --fedclients 3 0: 600 M and 100 M, NVFlare at 100 M
    python -m bench.large_model --params 100000000     # one size
    python -m bench.large_model --quick                # smoke run: N=2, P=2M, 2 rounds
    python -m bench.large_model --params 600000000 --fedclients 0 --repeat 5 --nvflare-params
                                      # the coordinator's path, median of 5 runs and floors
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.large_nvflare import (
    INSTALL_HINT,
    NVFLARE_MODES,
    NVFLARE_VERSION,
    find_nvflare,
    nvflare_cell,
)
from bench.output import write_json
from bench.proctree import TreeWatch
from bench.round_overhead import MB, RESULTS, machine, measure_floor, start_synthetic
from fedserver.state.history import read_status
from tests.procs import (
    Proc,
    free_port,
    spawn,
    start_client,
    wait_serving,
)

SIZES = (600_000_000, 100_000_000)
CELL_TIMEOUT = 3600.0
# Memory a run needs, in model sizes, to skip a size the machine cannot hold. fedgrpc (issue
# 23's data path): the coordinator peaks at 2.05 x model, a no-train fedclient at 1.13 x (600 M:
# its model is the download buffer, the base of a round on disk; fedclient/model_memory.py).
# NVFlare 2.9 at 100 M, 3 clients: its server peaked at 19 x model, and MemAvailable fell by
# 25 x model while it ran (its clients' peaks do not coincide). 1 GB covers interpreters, torch
# and gRPC.
COORDINATOR_MODELS, FEDCLIENT_MODELS, FIXED_BYTES = 2.2, 1.2, 1_000_000_000
NVFLARE_SERVER_MODELS, NVFLARE_CLIENT_MODELS = 19.0, 2.0


def coordinator_budget(model_bytes: int) -> int:
    """The issue's bound on the coordinator's peak RSS: 2 x model + 200 MB."""
    return 2 * model_bytes + 200_000_000


def client_budget(model_bytes: int) -> int:
    """The issue's bound on a no-train fedclient's peak RSS: 2 x model + 300 MB."""
    return 2 * model_bytes + 300_000_000


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def needed_bytes(system: str, params: int, clients: int, fedclients: int) -> int:
    """About what one run of `system` takes at this size (the runs go one after the other)."""
    if system.startswith("fedgrpc"):
        models = COORDINATOR_MODELS + FEDCLIENT_MODELS * fedclients
    else:
        models = NVFLARE_SERVER_MODELS + NVFLARE_CLIENT_MODELS * clients
    return int(models * params * 4) + FIXED_BYTES


def wait_all(procs: Sequence[Proc], timeout: float) -> None:
    for p in procs:
        if p.wait(timeout) != 0:
            raise RuntimeError(f"{p.name} exited {p.popen.returncode}:\n{p.log()[-3000:]}")


def fedgrpc_system(clients: int, fedclients: int) -> str:
    """ "fedgrpc" with fedclients only; else how many of its clients were bench.client."""
    return "fedgrpc" if fedclients >= clients else f"fedgrpc-{clients - fedclients}-bench"


def fedgrpc_cell(
    params: int,
    clients: int,
    fedclients: int,
    rounds: int,
    work: Path,
    floor_address: str,
    floor_pid: int,
    timeout: float,
) -> dict[str, Any]:
    """One federation of `clients` clients, the first `fedclients` of them `fedclient run` with
    the no-train Task, the others bench.client; its rounds, floor and peak memory."""
    port = free_port()
    state = Path(tempfile.mkdtemp(prefix="state-", dir=work))
    logs = work / f"fedgrpc-p{params}"
    server = start_synthetic(logs, port, state, params, rounds, clients, int(timeout))
    procs = [server]
    watch = TreeWatch(server.popen.pid)
    client_watches: list[TreeWatch] = []
    try:
        wait_serving(port, server, timeout=300)
        for i in range(clients):
            if i < fedclients:
                task = f"bench.large_task:params_{params}"
                procs.append(start_client(logs, port, f"{i}/{clients}", task=task))
                client_watches.append(TreeWatch(procs[-1].popen.pid))
            else:
                args = ["-m", "bench.client", "--server", f"127.0.0.1:{port}"]
                procs.append(spawn(f"bench-{i}", [*args, "--client-id", f"bench-{i}"], logs))
        wait_all(procs[1:], timeout)
        wait_all(procs[:1], 300)
    finally:
        for p in procs:
            p.kill()
        for w in [watch, *client_watches]:
            w.stop()
    durations = [r["duration_seconds"] for r in read_status(state)["rounds"]]
    if len(durations) != rounds:
        raise RuntimeError(f"fedgrpc: {len(durations)} rounds of {rounds}")
    model = params * 4
    client_peaks = [w.peak for w in client_watches]
    cell: dict[str, Any] = {
        "system": fedgrpc_system(clients, fedclients),
        # utime + stime over each process's life, start-up included (torch's import, too)
        "coordinator_cpu_seconds_total": sum(watch.cpu.values()),
        "client_cpu_seconds_total": [sum(w.cpu.values()) for w in client_watches],
        "round_seconds": statistics.median(durations[1:] or durations),
        "round_seconds_all": durations,
        "coordinator_peak_bytes": watch.peak,
        "coordinator_budget_bytes": coordinator_budget(model),
        "fedclients": fedclients,
        # fedclient processes only: a bench.client holds O(chunk), whatever the model.
        "client_peak_bytes": max(client_peaks, default=None),
        "client_peaks_bytes": client_peaks,
        "client_budget_bytes": client_budget(model),
    }
    cell.update(measure_floor(floor_address, floor_pid, clients, params))
    return cell


def verdict(ours: dict[str, Any], theirs: dict[str, Any]) -> str:
    """The issue's targets at 100 M: >= 4x faster and >= 5x less server memory."""
    speed = theirs["round_seconds"] / ours["round_seconds"]
    memory = theirs["coordinator_peak_bytes"] / ours["coordinator_peak_bytes"]
    line = (
        f"P={ours['params'] / 1e6:g}M against {theirs['system']}: {speed:.2f}x faster (target "
        f"4x: {'met' if speed >= 4 else 'NOT met'}), {memory:.2f}x less server memory (target "
        f"5x: {'met' if memory >= 5 else 'NOT met'})"
    )
    if ours["fedclients"] < ours["clients"]:
        line += f"; NOT like for like: {ours['clients'] - ours['fedclients']} fedgrpc client(s) "
        line += "were bench.client, which computes nothing"
    return line


HEADER = (
    f"{'system':<22} {'P':>5} {'N':>2} {'round s':>8} {'floor s':>8} {'ratio':>6} "
    f"{'server MB':>9} {'x model':>7} {'client MB':>9} {'x model':>7}"
)


def row_line(row: dict[str, Any]) -> str:
    model, client = row["params"] * 4, row["client_peak_bytes"]
    shown = f"{client / MB:>9.0f} {client / model:>7.2f}" if client else f"{'-':>9} {'-':>7}"
    return (
        f"{row['system']:<22} {row['params'] / 1e6:>4g}M {row['clients']:>2} "
        f"{row['round_seconds']:>8.2f} {row['floor_seconds']:>8.2f} "
        f"{row['ratio_to_floor']:>6.2f} {row['coordinator_peak_bytes'] / MB:>9.0f} "
        f"{row['coordinator_peak_bytes'] / model:>7.2f} {shown}"
    )


def budget_line(row: dict[str, Any]) -> str:
    """fedgrpc's row against the issue's bounds."""
    ok = row["coordinator_peak_bytes"] <= row["coordinator_budget_bytes"]
    line = f"P={row['params'] / 1e6:g}M {row['system']}: coordinator {'within' if ok else 'OVER'} "
    line += "2 x model + 200 MB, "
    if row["client_peak_bytes"] is not None:
        ok = row["client_peak_bytes"] <= row["client_budget_bytes"]
        line += f"fedclients {'within' if ok else 'OVER'} 2 x model + 300 MB, "
    return line + f"round {row['ratio_to_floor']:.2f} x floor (target 1.3)"


def repeat_medians(cells: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per fedgrpc system and size run more than once (--repeat): the median of the runs'
    ratios to their own floors, and the largest peaks (a bound must hold in every run)."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for row in cells:
        if "fedclients" in row:
            groups.setdefault((row["system"], row["params"]), []).append(row)
    medians = []
    for (system, params), rows in groups.items():
        if len(rows) < 2:
            continue
        ratios = [r["ratio_to_floor"] for r in rows]
        peak = max(r["coordinator_peak_bytes"] for r in rows)
        clients = [r["client_peak_bytes"] for r in rows if r["client_peak_bytes"] is not None]
        line = (
            f"P={params / 1e6:g}M {system}, median of {len(rows)} runs: round "
            f"{statistics.median(r['round_seconds'] for r in rows):.2f} s, ratio "
            f"{statistics.median(ratios):.2f} x floor (runs: "
            f"{', '.join(f'{x:.2f}' for x in ratios)}; target 1.3), coordinator peak "
            f"{peak / MB:.0f} MB"
        )
        if clients:
            line += f", client peak {max(clients) / MB:.0f} MB"
        medians.append(
            {
                "system": system,
                "params": params,
                "runs": len(rows),
                "ratio_to_floor_median": statistics.median(ratios),
                "ratios_to_floor": ratios,
                "round_seconds_median": statistics.median(r["round_seconds"] for r in rows),
                "coordinator_peak_bytes_max": peak,
                "client_peak_bytes_max": max(clients, default=None),
                "line": line,
            }
        )
    return medians


@dataclass
class Outcome:
    """What the bench found: rows (printed as they come), sizes skipped, NVFlare failures."""

    cells: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    verdicts: list[str] = field(default_factory=list)

    def add(self, row: dict[str, Any], args: argparse.Namespace, params: int) -> None:
        """A fedgrpc row has its own floor; NVFlare's are judged against the size's first
        fedgrpc row, with its floor (the same bytes move in every system)."""
        mine = (c for c in self.cells if c["params"] == params and "fedclients" in c)
        ours = row if "fedclients" in row else next(mine)
        row.update(clients=args.clients, params=params, rounds=args.rounds)
        row["model_bytes"] = params * 4
        row["floor_seconds"] = ours["floor_seconds"]
        row["ratio_to_floor"] = row["round_seconds"] / ours["floor_seconds"]
        row["loadavg_after"] = os.getloadavg()
        if row is not ours:
            self.verdicts.append(verdict(ours, row))
        self.cells.append(row)
        print(row_line(row), flush=True)

    def room_for(
        self, system: str, params: int, args: argparse.Namespace, fedclients: int = 0
    ) -> bool:
        """MemAvailable covers the run (or --force); else the run is skipped, and says so."""
        need = needed_bytes(system, params, args.clients, fedclients)
        have = mem_available()
        if need <= have or args.force:
            return True
        print(
            f"{system} at P={params / 1e6:g}M skipped: needs about {need / 1e9:.1f} GB, "
            f"MemAvailable {have / 1e9:.1f} GB (--force runs it anyway)",
            flush=True,
        )
        entry = {"system": system, "params": params, "needed_bytes": need}
        self.skipped.append({**entry, "available_bytes": have})
        return False


def run_size(
    params: int,
    args: argparse.Namespace,
    nvflare: tuple[Path, str] | None,
    work: Path,
    floor: Proc,
    outcome: Outcome,
) -> None:
    """fedgrpc at `params` (once per --fedclients value), then NVFlare in each mode if it
    runs at this size."""
    address = f"127.0.0.1:{args.floor_port}"
    for fedclients in args.fedclients:
        system = fedgrpc_system(args.clients, fedclients)
        if outcome.room_for(system, params, args, fedclients):
            for _ in range(args.repeat):
                ours = fedgrpc_cell(
                    params, args.clients, fedclients, args.rounds, work, address,
                    floor.popen.pid, args.timeout,
                )  # fmt: skip
                outcome.add(ours, args, params)
    if not any(c["params"] == params for c in outcome.cells):
        return  # no floor without a fedgrpc run: NVFlare is not run alone either
    for mode in args.nvflare_modes if nvflare and params in args.nvflare_params else []:
        system = f"nvflare-{mode}"
        if not outcome.room_for(system, params, args):
            continue
        for attempt in (1, 2):  # its simulator sometimes loses a client at start-up, under load
            try:
                cell = nvflare_cell(
                    mode, nvflare[0], params, args.clients, args.rounds, work, args.timeout,
                    args.nvflare_stall,
                )  # fmt: skip
            except RuntimeError as e:
                print(f"{system} attempt {attempt} failed: {str(e)[:2000]}", flush=True)
                outcome.failures.append({"system": system, "params": params, "error": str(e)})
                continue
            outcome.add(cell, args, params)
            break


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench.large_model", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: N=2, P=2M, 2 rounds")
    parser.add_argument("--params", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--clients", type=int, default=3, help="clients per federation (3)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per federation (3)")
    parser.add_argument(
        "--fedclients",
        type=int,
        nargs="+",
        help="how many of the clients are `fedclient run` with the no-train torch Task (all); "
        "the others are bench.client (the protocol without torch, O(chunk) memory). Several "
        "values: one fedgrpc run each; NVFlare is compared with the first",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run each fedgrpc federation this many times, each with its own floor, and report "
        "the median ratio (1); the floor moves by a third between runs on a shared machine",
    )
    parser.add_argument(
        "--nvflare-params",
        type=int,
        nargs="*",
        default=[100_000_000],
        help="the sizes NVFlare also runs at (100M; none: fedgrpc only)",
    )
    parser.add_argument(
        "--nvflare-modes", nargs="+", choices=list(NVFLARE_MODES), default=list(NVFLARE_MODES)
    )
    parser.add_argument("--nvflare-python", type=Path, help="a python with nvflare 2.9")
    parser.add_argument(
        "--timeout", type=float, help="seconds one federation may take (3600; --quick: 240)"
    )
    parser.add_argument(
        "--nvflare-stall",
        type=float,
        help="seconds without simulator output after which an NVFlare run is killed and tried "
        "once more (300; --quick: 60)",
    )
    parser.add_argument(
        "--force", action="store_true", help="run a size even if MemAvailable looks too small"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON results folder")
    parser.add_argument("--keep-logs", type=Path, help="keep every process's log here")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.quick:
        args.params, args.clients, args.rounds = [2_000_000], 2, 2
        args.nvflare_params = args.params
        args.timeout = args.timeout or 240.0
        args.nvflare_stall = args.nvflare_stall or 60.0
    args.nvflare_stall = args.nvflare_stall or 300.0
    args.timeout = args.timeout or CELL_TIMEOUT
    args.fedclients = [min(k, args.clients) for k in args.fedclients or [args.clients]]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    nvflare = find_nvflare(args.nvflare_python) if args.nvflare_params else None
    if args.nvflare_params and nvflare is None:
        print(INSTALL_HINT, file=sys.stderr)
    elif nvflare is not None and nvflare[1] != NVFLARE_VERSION:
        print(f"warning: nvflare {nvflare[1]} (this benchmark was written for {NVFLARE_VERSION})")
    info = machine()
    print(f"load average {info['loadavg_at_start']}; nvflare {nvflare and nvflare[1]}", flush=True)
    outcome = Outcome()
    with tempfile.TemporaryDirectory(prefix="fedgrpc-large-") as tmp:
        work = Path(tmp)
        if args.keep_logs:
            args.keep_logs.mkdir(parents=True, exist_ok=True)
            work = Path(tempfile.mkdtemp(prefix="run-", dir=args.keep_logs))
        args.floor_port = free_port()
        floor = spawn("floor", ["-m", "bench.floor", "--port", str(args.floor_port)], work)
        print(HEADER, flush=True)
        try:
            for params in args.params:
                run_size(params, args, nvflare, work, floor, outcome)
        finally:
            floor.kill()
    for row in outcome.cells:
        if "fedclients" in row:
            print(budget_line(row))
    medians = repeat_medians(outcome.cells)
    for line in outcome.verdicts + [m["line"] for m in medians]:
        print(line)
    summary = {
        "machine": info,
        "command": ["python", "-m", "bench.large_model", *(argv or sys.argv[1:])],
        "nvflare_version": nvflare and nvflare[1],
        "cells": outcome.cells,
        "skipped": outcome.skipped,
        "verdicts": outcome.verdicts,
        "repeat_medians": medians,
        "nvflare_failures": outcome.failures,
    }
    write_json(args.out, "large_model", summary)
    return 1 if outcome.failures else 0


if __name__ == "__main__":
    sys.exit(main())
