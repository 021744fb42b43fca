"""What the coordinator and its servicer hand each other: headers, offers, results, refusals.

Plain data and the refusals that are specific to submitting (the round machine's own refusals
live in rounds.py, the byte-level ones in aggregate.py). No gRPC, no arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedcore.limits import excerpt, excerpts
from fedcore.selection import Selection
from fedcore.tensors import FlatModel, Manifest
from fedserver.aggregate import UpdateReceiver
from fedserver.rounds import StaleRound, SubmitRefused


class BaseVersionMismatch(StaleRound):
    reason = "stale_base"


class TooManyStreams(SubmitRefused):
    """Transient: the client already has uploads in flight (→ ABORTED, retried)."""

    reason = "too_many_streams"


class CoordinatorBusy(SubmitRefused):
    """Transient: too many uploads in flight (→ UNAVAILABLE with trailing metadata
    retry-after-ms; clients come back after a jittered delay of at least that)."""

    reason = "busy"

    def __init__(self, message: str, retry_after_ms: int) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


@dataclass(frozen=True)
class TrainingDefaults:
    """Round settings sent to clients; None means "the task's default_config()"."""

    local_epochs: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    encoding: str = "fp32"
    # "fedavg": clients train and send a delta; "fedsgd": clients send one gradient (negated, a
    # pseudo-gradient the strategy applies) over `gradient_batch` examples (0 = all they hold).
    mode: str = "fedavg"
    gradient_batch: int = 0
    # --train-tensors: patterns of the tensors trained and sent ("" = all); ';' rotates groups.
    train_tensors: str = ""

    def resolved(self, task_default: TrainingDefaults) -> TrainingDefaults:
        return TrainingDefaults(
            self.local_epochs or task_default.local_epochs or 1,
            self.lr or task_default.lr or 0.05,
            self.batch_size or task_default.batch_size or 32,
            self.encoding,
            self.mode,
            self.gradient_batch,
            self.train_tensors,
        )

    def mode_extra(self) -> dict[str, str]:
        """Round-config `extra` entries telling clients what to compute."""
        if self.mode == "fedavg":
            return {}
        return {"mode": self.mode, "gradient_batch": str(self.gradient_batch)}


@dataclass(frozen=True)
class Offer:
    """What GetGlobalModel answers: the state, and the model if the client should train."""

    state: str  # waiting_for_clients | training | finished | shutting_down
    round: int
    selected: bool
    model: FlatModel
    send_bytes: bool
    config: dict[str, object]
    deadline_seconds: float
    message: str
    evaluate_round: int = 0  # > 0: evaluate `model` (the model after this round) locally
    decrypt_round: int = 0  # > 0 (--secure he): decrypt this round's encrypted aggregate


@dataclass
class SubmitHeader:
    client_id: str
    round: int
    base_version: str
    num_examples: int
    metrics: dict[str, float]
    encoding: str
    manifest: Manifest
    total_bytes: int
    checksum: str = "sha256"  # the trailer's algorithm (fedcore/checksums.py)


@dataclass
class PendingSubmit:
    header: SubmitHeader
    receiver: UpdateReceiver
    selection: Selection | None = None  # the tensors a partial update carries (None: all)
    released: bool = False  # its upload slots were given back (Uploads.abort/finish)


@dataclass
class SubmitResult:
    round: int
    duplicate: bool
    message: str


def manifest_difference(got: Manifest, want: Manifest) -> str:
    gotd = {t.name: t for t in got.tensors}
    wantd = {t.name: t for t in want.tensors}
    missing = sorted(wantd.keys() - gotd.keys())
    extra = sorted(gotd.keys() - wantd.keys())
    if missing or extra:
        return (
            "update tensors do not match the model: "
            f"missing {excerpts(missing)}, unexpected {excerpts(extra)}"
        )
    for name, w in wantd.items():
        g = gotd[name]
        if g.shape != w.shape:
            return (
                f"tensor {excerpt(name)} has shape {list(g.shape)}, the model has {list(w.shape)}"
            )
        if g.dtype != w.dtype:
            return f"tensor {excerpt(name)} is {g.dtype}, this encoding requires {w.dtype}"
    return "update tensors are not in the model's order"
