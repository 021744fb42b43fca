"""`fedserver.simulation.api.run(...)`: `fedserver simulate` from Python (a notebook, a sweep),
returning the history instead of an exit code.

Keyword arguments are the command's flags (`clients_per_round=10` is `--clients-per-round
10`, `True` a bare switch, `None`/`False` left out), parsed by the command's own parser with
FEDGRPC_* and --config underneath as for the command line, so there is one definition of
every setting. The run is the command's: the same state dir (resumable, readable by `fedserver
status` / `report`), the same model bytes for the same seed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedserver.simulation.cli import SIM_STATE_DIR


@dataclass(frozen=True)
class History:
    """A finished (or failed) simulation: its rounds as `fedserver status --json` lists them."""

    state_dir: Path
    exit_code: int  # what `fedserver simulate` would have exited with: 0, or 3 (failed)
    failure: str  # why training failed; "" when it did not
    rounds: list[dict[str, Any]]  # round, participants, num_examples, metrics, duration_seconds

    def metric(self, name: str) -> list[float]:
        """One metric per round, in round order (NaN where a round did not record it)."""
        return [float(r["metrics"].get(name, math.nan)) for r in self.rounds]

    @property
    def model_path(self) -> Path:
        """The global model after the last round (safetensors; sealed with --encrypt-state)."""
        return self.state_dir / "model.safetensors"


def _argv(task: str, clients: int, state_dir: str | Path, flags: dict[str, Any]) -> list[str]:
    argv = ["simulate", "--task", task, "--clients", str(clients), "--state-dir", str(state_dir)]
    for key, value in flags.items():
        flag = "--" + key.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            argv.append(flag)
        elif isinstance(value, Sequence) and not isinstance(value, str):
            argv += [flag, *(str(v) for v in value)]
        else:
            argv += [flag, str(value)]
    return argv


def run(task: str, clients: int, *, state_dir: str | Path = SIM_STATE_DIR, **flags: Any) -> History:
    """Simulate `clients` virtual clients training `task` (MODULE:ATTR) and return the history.

    ValueError: a flag or the setup is wrong (what the command exits 2 for). A run that fails
    in training (no quorum after --max-attempts...) returns, with `failure` and exit code 3.
    Logging is left to the caller (`logging.basicConfig(level=logging.INFO)` shows rounds).
    """
    from fedcore.config import parse_layered
    from fedserver.coordinator.assembly import SetupError
    from fedserver.simulation.cli import parser, sim_settings
    from fedserver.simulation.driver import simulate

    try:
        args = parse_layered(parser(), _argv(task, clients, state_dir, flags), "server")
    except SystemExit:  # argparse has printed why on stderr
        raise ValueError(f"bad simulate settings: {flags!r} (see the error above)") from None
    if args.log_level != "debug":  # a line per virtual client's update: debug only
        logging.getLogger("fedserver.updates").setLevel(logging.WARNING)
    settings = sim_settings(args)  # ValueError: a flag's value
    try:
        outcome = _run_coroutine(simulate(settings))
    except SetupError as e:
        raise ValueError(str(e)) from None
    return History(
        Path(state_dir),
        outcome.code,
        outcome.failure,
        [r.to_json() for r in outcome.rounds],
    )


def _run_coroutine(coro: Any) -> Any:
    """asyncio.run, also from inside a running loop (Jupyter runs one): then on a thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="simulation") as pool:
        return pool.submit(asyncio.run, coro).result()
