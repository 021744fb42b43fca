"""The coordinator's experiment tracking (--track): one run per federation in each target,
its parameters, one step per round with the round's row of `fedserver status --json`, and the
final model on request (--track-model). Delivery is fedcore.tracking's background dispatcher:
nothing here blocks the event loop or can fail a round."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fedcore.tracking import (
    RunInfo,
    Tracking,
    TrackingError,
    add_track_arguments,
    check_targets,
)
from fedserver.coordinator.offers import TrainingDefaults
from fedserver.modes.base import RoundMode
from fedserver.rounds.eval_campaign import EvalPolicy
from fedserver.rounds.synchronous import RoundPolicy
from fedserver.state.history import RoundRecord
from fedserver.state.store import StateStore
from fedserver.strategies import Strategy

log = logging.getLogger("fedserver")
RUN_ID_META = "track_run_id "  # + the --track value: the run a resumed state dir continues
# The round row's own numbers (history.RoundRecord.to_json + traffic), beside its metrics.
ROUND_PREFIX = "round/"


@dataclass(frozen=True)
class TrackSettings:
    targets: tuple[str, ...]  # --track values: mlflow://URI, tensorboard://DIR
    model: bool = False  # --track-model: the final model.safetensors as an artifact
    timeout: float = 30.0  # --track-timeout: seconds to flush at exit


class RoundTracker:
    """Turns committed rounds and federated evaluations into tracked metrics.

    A federated evaluation of round r is folded into r's row as clients report; its running
    means are held back until the campaign can change no more (the next round commits, or the
    run ends), so each metric gets one value per round, the one status reports."""

    def __init__(self, tracking: Tracking, settings: TrackSettings, store: StateStore) -> None:
        self.tracking = tracking
        self.settings = settings
        self.store = store
        self._lock = threading.Lock()  # commits come from a worker thread, evaluations not
        self._pending: dict[int, dict[str, float]] = {}

    def round_committed(self, record: RoundRecord, bytes_in: int, bytes_out: int) -> None:
        """Called by the publisher once `record` is durable (any thread)."""
        row = round_values(record.to_json() | {"bytes_in": bytes_in, "bytes_out": bytes_out})
        with self._lock:
            self._flush_before(record.round)
        self.tracking.log_metrics(record.round, row)

    def evaluated(self, round_number: int, summary: dict[str, float]) -> None:
        """Federated evaluation's running summary of a committed round (the event loop)."""
        with self._lock:
            self._pending[round_number] = dict(summary)

    def _flush_before(self, round_number: int) -> None:
        for r in sorted(k for k in self._pending if k < round_number):
            self.tracking.log_metrics(r, self._pending.pop(r))

    def close(self, failure: str | None) -> None:
        """The run is over (finished, failed or stopped): flush, attach the model, end it.
        Before the state dir closes: the tracker's thread may still store a run id there."""
        try:
            with self._lock:
                self._flush_before(1 << 62)
            status = "failed" if failure else self.store.get_meta("status", "stopped")
            if self.settings.model and status == "finished":
                self.tracking.log_artifact(self.store.model_path)
            status = status if status in ("finished", "failed") else "stopped"
        except Exception as e:  # tracking never turns a run's exit into a failure
            log.warning("tracking: could not end the run cleanly: %s", e)
            status = "stopped"
        self.tracking.close(status, self.settings.timeout)


def round_values(row: dict[str, Any]) -> dict[str, float]:
    """A status row as metrics: its metrics under their own names, its other numbers under
    round/ (participants, num_examples, duration_seconds, attempts, bytes_in, bytes_out)."""
    out = {k: float(v) for k, v in row.get("metrics", {}).items()}
    for k, v in row.items():
        if k not in ("metrics", "round") and isinstance(v, int | float):
            out[ROUND_PREFIX + k] = float(v)
    return out


def start_tracking(
    settings: TrackSettings | None, store: StateStore, federation_id: str, params: dict[str, str]
) -> RoundTracker | None:
    """One run per target, continuing the state dir's runs; None without --track."""
    if settings is None or not settings.targets:
        return None
    info = RunInfo(
        name=f"{store.dir.resolve().name}-{federation_id[:8]}",
        tags={"fedgrpc.role": "coordinator", "fedgrpc.federation_id": federation_id},
        params=params,
    )

    def run_for(target: str) -> RunInfo:
        return dataclasses.replace(info, run_id=store.get_meta(RUN_ID_META + target))

    def remember(target: str, run_id: str) -> None:  # in the tracking thread
        if store.get_meta(RUN_ID_META + target) != run_id:
            store.set_meta(**{RUN_ID_META + target: run_id})

    log.info("tracking to %s", ", ".join(dict.fromkeys(settings.targets)))
    return RoundTracker(Tracking.start(settings.targets, run_for, remember), settings, store)


def run_params(
    *,
    task: str,
    strategy: Strategy,
    defaults: TrainingDefaults,
    policy: RoundPolicy,
    eval_policy: EvalPolicy,
    privacy: Any,
    mode: RoundMode,
    secure: str,
    seed: int,
) -> dict[str, str]:
    """Every setting that changes the math, flattened: what comparing two runs needs."""
    params: dict[str, Any] = {
        "task": task,
        "strategy": strategy.name,
        "mode": mode.name,
        "secure": secure,
        "seed": seed,
        **{f"strategy.{k}": v for k, v in strategy.params().items()},
        **_flat("rounds", dataclasses.asdict(policy)),
        **_flat("train", dataclasses.asdict(defaults)),
        **_flat("eval", dataclasses.asdict(eval_policy)),
        "dp": privacy is not None,
    }
    if privacy is not None:  # --dp-clip's settings (a dataclass), handed on by assembly
        params.update(_flat("dp", dataclasses.asdict(privacy)))
    params.update(_flat(mode.name, mode.tracked_params()))
    return {k: str(v) for k, v in params.items()}


def _flat(prefix: str, values: dict[str, Any]) -> dict[str, Any]:
    """`prefix.key` for each set value; a nested dataclass's fields as `prefix.key.field`."""
    flat: dict[str, Any] = {}
    for k, v in values.items():
        if isinstance(v, dict):
            flat |= _flat(f"{prefix}.{k}", v)
        elif v is not None:
            flat[f"{prefix}.{k}"] = v
    return flat


def add_track_flags(run: argparse.ArgumentParser, seconds: Callable[[str], float]) -> None:
    """`fedserver run`'s tracking flags (`simulate` copies them from run's parser); `seconds`:
    run's own check of a positive number."""
    track = run.add_argument_group("experiment tracking (docs/operations.md)")
    add_track_arguments(track, "parameters and per-round metrics (the rows of `fedserver status`)")
    track.add_argument(
        "--track-model",
        action="store_true",
        help="when training finishes, attach model.safetensors to the tracked run (off)",
    )
    track.add_argument(
        "--track-timeout",
        type=seconds,
        default=30.0,
        help="seconds to deliver what is still queued for the trackers at exit (30)",
    )


def track_settings(args: argparse.Namespace) -> TrackSettings | None:
    """--track's targets, checked (TrackingError: a usage error, e.g. mlflow not installed)."""
    targets = tuple(args.track or ())
    if not targets:
        if args.track_model:
            raise TrackingError("--track-model needs --track mlflow://... or tensorboard://...")
        return None
    check_targets(targets)
    if args.track_model and args.encrypt_state:
        # The tracker would hold a plaintext copy of what --encrypt-state seals at rest.
        raise TrackingError(
            "--track-model cannot be combined with --encrypt-state: the tracked copy would be "
            "unencrypted; export the model with `fedserver export` where that is wanted"
        )
    return TrackSettings(targets, args.track_model, args.track_timeout)
