"""Experiment tracking (--track): a federation's parameters and per-round metrics in MLflow or
TensorBoard, where the people training models already compare runs. Optional dependencies,
imported only when a target asks for them; delivery is in the background (base.Dispatcher).

A target is `mlflow://TRACKING_URI` (a local mlruns folder, sqlite:///file.db, http://host:5000)
or `tensorboard://DIR`.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from fedcore.config import Repeatable
from fedcore.tracking.base import Backend, Dispatcher, RunInfo

SCHEMES = {"mlflow": "mlflow", "tensorboard": "tensorboard"}  # scheme -> module it needs


class TrackingError(ValueError):
    """A --track value that cannot work: the operator must change it (a usage error)."""


def parse_target(target: str) -> tuple[str, str]:
    """(scheme, location) of a --track value; TrackingError with the fix when it is wrong."""
    scheme, sep, where = target.partition("://")
    if not sep or scheme not in SCHEMES or not where:
        raise TrackingError(
            f"--track {target!r}: expected mlflow://TRACKING_URI (a folder, sqlite:///FILE.db "
            "or http://HOST:PORT) or tensorboard://DIR"
        )
    if importlib.util.find_spec(SCHEMES[scheme]) is None:
        raise TrackingError(
            f"--track {scheme}://... needs the {scheme} package: pip install 'fedgrpc[{scheme}]'"
        )
    return scheme, where


def check_targets(targets: Sequence[str]) -> None:
    """Refuse bad or unusable --track values before anything starts."""
    for target in targets:
        parse_target(target)


def add_track_arguments(parser: argparse.ArgumentParser, who: str) -> None:
    """--track, repeatable, for `fedserver run|simulate` and `fedclient run`."""
    parser.add_argument(
        "--track",
        action=Repeatable,
        metavar="TARGET",
        help=f"send {who} to mlflow://TRACKING_URI (a folder, sqlite:///FILE.db, "
        "http://HOST:5000) or tensorboard://DIR; repeat for several; in the background: an "
        "unreachable tracker never stops training (off)",
    )


def make_backend(target: str, subdir: str = "") -> Backend:
    """The backend of one target; `subdir` separates runs sharing a TensorBoard folder (a
    client's id). Imports the tracker's package here, never at start-up."""
    scheme, where = parse_target(target)
    if scheme == "mlflow":
        from fedcore.tracking.mlflow_backend import MlflowBackend

        return MlflowBackend(target, where)
    from fedcore.tracking.tensorboard_backend import TensorBoardBackend

    return TensorBoardBackend(target, Path(where) / subdir if subdir else Path(where))


class Tracking:
    """Every --track target of one process, each behind its own Dispatcher."""

    def __init__(self, dispatchers: list[Dispatcher]) -> None:
        self.dispatchers = dispatchers

    @classmethod
    def start(
        cls,
        targets: Sequence[str],
        run: Callable[[str], RunInfo],
        on_open: Callable[[str, str], None] | None = None,
        subdir: str = "",
    ) -> Tracking:
        """One dispatcher per target; `run(target)` says which run (a stored id to continue),
        `on_open(target, run_id)` is told the run's id from the tracker's thread."""
        out = []
        for target in dict.fromkeys(targets):  # the same target twice would log twice
            hook = None if on_open is None else _bind(on_open, target)
            out.append(Dispatcher(make_backend(target, subdir), run(target), hook))
        return cls(out)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        for d in self.dispatchers:
            d.log_metrics(step, metrics)

    def log_artifact(self, path: Path) -> None:
        for d in self.dispatchers:
            d.log_artifact(path)

    def close(self, status: str = "finished", timeout: float = 10.0) -> None:
        """Flush and end every run; all targets share one `timeout` (they flush in parallel)."""
        for d in self.dispatchers:
            d.begin_close(status)
        deadline = time.monotonic() + timeout
        for d in self.dispatchers:
            d.close(status, max(0.0, deadline - time.monotonic()))


def _bind(on_open: Callable[[str, str], None], target: str) -> Callable[[str], None]:
    return lambda run_id: on_open(target, run_id)


__all__ = ["Backend", "Dispatcher", "RunInfo", "Tracking", "TrackingError", "check_targets"]
