"""Upload streams in flight and refusals counted by reason: what every stream a client sends
(an update, a decrypted aggregate) shares, whichever part of the coordinator checks it."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from fedcore.codecs import Codec
from fedcore.selection import Selection
from fedserver.state.metrics import Metrics
from fedserver.updates.messages import PendingSubmit, SubmitHeader
from fedserver.updates.receiver import (
    MAX_UPDATE_VALUE,
    BadUpdate,
    SpillPool,
    StagedUpdate,
    UpdateReceiver,
)


class Uploads:
    def __init__(
        self,
        incoming: Path,
        spill_key: bytes | None,
        metrics: Metrics,
        rejections: Counter[str],
        max_value: float = MAX_UPDATE_VALUE,
    ) -> None:
        self.max_value = max_value  # --max-update-value: largest |value| of a plain update
        self.incoming = incoming  # where verified bytes are spilled (unlinked temp files)
        self.spills = SpillPool(incoming)  # spill files reused from one update to the next
        self.spill_key = spill_key  # --encrypt-state: spills encrypted under an in-memory key
        self.metrics = metrics
        self.rejections = rejections
        self.streams: Counter[str] = Counter()  # uploads in flight per client
        self.in_flight = 0  # uploads in flight in all (bounded by submissions.py)

    def refuse(self, exc: Exception) -> Exception:
        """Count a refusal by its reason; returns `exc` for `raise uploads.refuse(e)`."""
        reason = getattr(exc, "reason", "refused")
        self.rejections[reason] += 1
        self.metrics.rejected(reason)
        return exc

    def open(
        self,
        header: SubmitHeader,
        codec: Codec,
        num_values: int,
        selection: Selection | None,
        track_norm: bool = False,  # measure the decoded update's L2 norm (DP re-clipping)
    ) -> PendingSubmit:
        """A receiver for the stream; raises BadUpdate (e.g. an unknown checksum algorithm)."""
        receiver = UpdateReceiver(
            codec,
            num_values,
            header.total_bytes,
            self.incoming,
            header.checksum,
            self.spill_key,
            track_norm=track_norm,
            max_value=self.max_value,
            spills=self.spills,
        )
        self.streams[header.client_id] += 1
        self.in_flight += 1
        return PendingSubmit(header, receiver, selection)

    def abort(self, pending: PendingSubmit) -> None:
        """Give the stream's slots back and drop its bytes. Idempotent, so every exit path of
        a stream (a refusal, cancellation, a deadline, a lost link, an error) may call it in a
        `finally`, also after `finish` released the slots: no path can leak them."""
        if self._release(pending):
            pending.receiver.abort()

    def finish(self, pending: PendingSubmit, digest: str) -> StagedUpdate:
        """The verified stream, spilled; raises BadUpdate (counted, stream aborted) otherwise."""
        try:
            staged = pending.receiver.finish(digest)
        except BadUpdate as e:
            self.abort(pending)
            raise self.refuse(e) from None
        except BaseException:  # our disk failed, or the task was cancelled: not counted
            self.abort(pending)
            raise
        self._release(pending)
        return staged

    def _release(self, pending: PendingSubmit) -> bool:
        """Free the stream's place in `streams` and `in_flight` once; False if already done.
        A client whose count returns to zero leaves `streams`: the map holds only clients with
        an upload in flight, not every id that ever sent one."""
        if pending.released:
            return False
        pending.released = True
        client = pending.header.client_id
        if self.streams[client] > 1:
            self.streams[client] -= 1
        else:
            del self.streams[client]
        self.in_flight -= 1
        self.metrics.received(pending.receiver.received)
        return True
