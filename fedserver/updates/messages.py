"""What a submitted update carries and gets back between servicer and coordinator: its
header, the pending upload, the result, and the refusals specific to submitting (the
round machine's own refusals live in rounds/synchronous.py, the byte-level ones in
receiver.py; what a poll is offered is coordinator/offers.py). No gRPC, no arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedcore.limits import excerpt, excerpts
from fedcore.selection import Selection
from fedcore.tensors import Manifest
from fedserver.rounds.synchronous import StaleRound, SubmitRefused
from fedserver.updates.receiver import UpdateReceiver


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
