"""Receiving updates, the Coordinator's side: header checks, one count per (client, round),
refusals counted by reason (mixed into Coordinator; the bytes are checked in aggregate.py)."""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

from fedcore import faults
from fedcore.checksums import new_hasher
from fedcore.codecs import Codec, get_codec
from fedcore.selection import Selection
from fedcore.tensors import Manifest, ManifestError
from fedserver.aggregate import (
    BadUpdate,
    SpillCorrupted,
    StagedUpdate,
    UpdateReceiver,
    UpdateTooLarge,
)
from fedserver.messages import (
    BaseVersionMismatch,
    CoordinatorBusy,
    PendingSubmit,
    SubmitHeader,
    SubmitResult,
    TooManyStreams,
    manifest_difference,
)
from fedserver.rounds import AlreadySubmitted, Receipt, SubmitRefused
from fedserver.secure_rounds import check_encoding

if TYPE_CHECKING:
    from fedserver.coordinator import Coordinator

log = logging.getLogger("fedserver")

MAX_NUM_EXAMPLES = 10**9
MAX_STREAMS_PER_CLIENT = 2
# Uploads received at once. Each holds a spill file (a descriptor next to its connection's) and
# decoder state; 10,000 selected clients uploading together ran the coordinator towards twice
# its connections in open files. Beyond this, refuse with a retry delay (docs/protocol.md).
MAX_UPLOADS_IN_FLIGHT = 1024
BUSY_RETRY_AFTER_MS = 2000


class UpdateIntake:
    def _refuse(self: Coordinator, exc: Exception) -> Exception:
        reason = getattr(exc, "reason", "refused")
        self.rejections[reason] += 1
        self.metrics.rejected(reason)
        return exc

    def begin_submit(self: Coordinator, header: SubmitHeader) -> PendingSubmit:
        """Validate a header; raises SubmitRefused or BadUpdate (counters updated)."""
        try:
            codec, selection = self._check_header(header)
        except (SubmitRefused, BadUpdate) as e:
            raise self._refuse(e) from None
        if self._streams[header.client_id] >= MAX_STREAMS_PER_CLIENT:
            raise self._refuse(
                TooManyStreams(
                    f"client {header.client_id!r} already has {MAX_STREAMS_PER_CLIENT} "
                    "uploads in flight"
                )
            )
        if self._uploads >= MAX_UPLOADS_IN_FLIGHT:
            raise self._refuse(
                CoordinatorBusy(
                    f"{self._uploads} uploads in flight; retry in {BUSY_RETRY_AFTER_MS} ms",
                    BUSY_RETRY_AFTER_MS,
                )
            )
        self.touch(header.client_id)
        num_values = selection.num_values if selection else self._num_values()
        receiver = UpdateReceiver(
            codec,
            num_values,
            header.total_bytes,
            self.store.dir / "incoming",
            header.checksum,
            self.spill_key,
            # --dp-clip: the coordinator re-clips what it sees in plain, so it needs the norm.
            track_norm=self.dp is not None and self.secure_rounds is None,
        )
        self._streams[header.client_id] += 1
        self._uploads += 1
        return PendingSubmit(header, receiver, selection)

    def _check_header(self: Coordinator, h: SubmitHeader) -> tuple[Codec, Selection | None]:
        if not h.client_id:
            raise BadUpdate("update header has no client_id")
        if not 0 < h.num_examples <= MAX_NUM_EXAMPLES:
            raise BadUpdate(
                f"num_examples must be between 1 and {MAX_NUM_EXAMPLES}, got {h.num_examples}",
                reason="bad_num_examples",
            )
        if not all(math.isfinite(v) for v in h.metrics.values()):
            raise BadUpdate("update metrics contain NaN or Inf", reason="non_finite")
        try:
            codec = get_codec(h.encoding)
        except ManifestError as e:
            raise BadUpdate(str(e), reason="bad_encoding") from None
        try:
            new_hasher(h.checksum)
        except ManifestError as e:
            raise BadUpdate(str(e), reason="bad_checksum") from None
        check_encoding(self.secure_rounds, h.encoding)
        expected, selection = self._expected_manifest(h, codec)
        if h.manifest != expected:
            raise BadUpdate(manifest_difference(h.manifest, expected), reason="bad_manifest")
        most = codec.max_bytes(sum(t.numel for t in expected.tensors))
        if most is not None:  # ciphertexts: the size varies
            if not 0 < h.total_bytes <= most:
                raise BadUpdate(
                    f"header declares {h.total_bytes} bytes; a {codec.name} update of this "
                    f"model has 1 to {most}",
                    reason="bad_size",
                )
        elif h.total_bytes != expected.total_bytes:
            raise BadUpdate(
                f"header declares {h.total_bytes} bytes; a {codec.name} update of this model "
                f"has {expected.total_bytes}",
                reason="bad_size",
            )
        if h.total_bytes > self.max_update_bytes:
            raise UpdateTooLarge(
                f"update of {h.total_bytes} bytes exceeds --max-update-bytes "
                f"{self.max_update_bytes}"
            )
        if self._known_digest(h.round, h.client_id) is not None:
            return codec, selection  # read the stream: a byte-identical retry is acknowledged
        self.machine.check_submit(h.client_id, h.round)
        if h.base_version != self.model.version:
            raise BaseVersionMismatch(
                f"update was computed against model {h.base_version[:12] or '(none)'}, "
                f"round {h.round} is based on {self.model.version[:12]}; pull the model again"
            )
        return codec, selection

    def _expected_manifest(
        self, h: SubmitHeader, codec: Codec
    ) -> tuple[Manifest, Selection | None]:
        """The manifest `h` must declare, and its selection when it is a partial update.

        A round that trains a subset (--train-tensors) expects exactly that subset; a client
        keeping personal tensors (FedPer) may send any part of it, in model order.
        """
        round_sel = self.round_selection()
        full = None if round_sel.is_everything else round_sel
        expected = codec.wire_manifest(round_sel.manifest)
        names = [t.name for t in h.manifest.tensors]
        if h.manifest == expected or names == list(round_sel.names):
            return expected, full
        try:
            part = round_sel.subset(names)
        except ManifestError as e:
            raise BadUpdate(
                f"{e} (this round trains {len(round_sel.names)} tensors)", reason="bad_manifest"
            ) from None
        if self.dp or self.secure_rounds or self.strategy.needs_all_updates:
            raise BadUpdate(
                "partial updates (personal tensors) cannot be combined with --dp-clip, --secure "
                f"or strategy {self.strategy.name}; send every tensor of the round",
                reason="bad_manifest",
            )
        return codec.wire_manifest(part.manifest), part

    def abort_submit(self: Coordinator, pending: PendingSubmit) -> None:
        pending.receiver.abort()
        self.metrics.received(pending.receiver.received)
        self._streams[pending.header.client_id] -= 1
        self._uploads -= 1

    def reject(self: Coordinator, exc: Exception) -> Exception:
        return self._refuse(exc)

    def finish_submit(self: Coordinator, pending: PendingSubmit, digest: str) -> SubmitResult:
        """Verify the whole stream, then count it exactly once; raises like begin_submit."""
        h = pending.header
        try:
            staged = pending.receiver.finish(digest)
        except BadUpdate as e:
            self.abort_submit(pending)
            raise self._refuse(e) from None
        self._streams[h.client_id] -= 1
        self._uploads -= 1
        self.metrics.received(pending.receiver.received)
        try:
            return self._count(h, staged, pending.selection)
        finally:
            staged.discard()

    def _count(
        self, h: SubmitHeader, staged: StagedUpdate, selection: Selection | None = None
    ) -> SubmitResult:
        known = self._known_digest(h.round, h.client_id)
        if known is not None:
            if known == staged.digest:
                return SubmitResult(h.round, True, "duplicate of an update already counted")
            raise self._refuse(
                AlreadySubmitted(
                    f"client {h.client_id!r} already submitted a different update for "
                    f"round {h.round}; updates cannot be replaced",
                    known,
                )
            )
        try:
            self.machine.check_submit(h.client_id, h.round)
            staged.verify()  # bytes changed on disk since they were verified: refused, unfolded
        except (SubmitRefused, SpillCorrupted) as e:
            raise self._refuse(e) from None
        # DP-FedAvg bounds each client's influence only for an unweighted mean.
        weight = 1.0 if self.dp else float(h.num_examples)
        if self.secure_rounds is not None:
            try:
                self.secure_rounds.fold(h.client_id, h.round, staged, weight)
            except (SubmitRefused, BadUpdate) as e:
                raise self._refuse(e) from None
        else:
            self._accumulator.fold(staged, weight, selection, self._reclip(h, staged))
            if self._spool is not None:
                self._spool.append(staged, float(h.num_examples))
        self.machine.record(h.client_id, Receipt(staged.digest, h.num_examples))
        self._client_metrics[h.client_id] = dict(h.metrics)
        self.metrics.accepted()
        faults.freeze("collect", h.round)  # tests: crash with an update counted only in memory
        m = self.machine
        log.info(
            "round %d: update %d/%d from %s (%d examples)",
            m.round,
            len(m.receipts),
            len(m.selected),
            h.client_id,
            h.num_examples,
        )
        # No _notify(): a counted update changes no other client's offer. Waking every
        # long-poller on every update cost O(clients^2) wake-ups per round at 1000 clients;
        # _advance notifies when the round opens or closes, which is what pollers wait for.
        self._advance()
        return SubmitResult(h.round, False, f"update counted for round {h.round}")

    def _reclip(self: Coordinator, h: SubmitHeader, staged: StagedUpdate) -> float:
        """The DP re-clip factor of an update seen in plain (1.0 without --dp-clip).

        The sensitivity bound, and so the reported ε, must not depend on clients clipping
        honestly: the decoded delta (after fp16/int8/top-k decoding, before the unweighted
        fold) is scaled to norm C here. An update an honest client clipped is within C
        (factor 1.0: nothing multiplied); fp16/int8 rounding may lift it ~1e-5 over C.
        """
        if self.dp is None:
            return 1.0
        factor = self.dp.reclip_factor(staged.norm)
        if factor < 1.0:
            # fp16/int8 rounding can lift an honestly clipped update a hair over C: not news.
            clear = staged.norm is not None and staged.norm > 1.001 * self.dp.config.clip
            log.log(
                logging.INFO if clear else logging.DEBUG,
                "round %d: update from %s has L2 norm %.6g > --dp-clip %g; clipped by the "
                "coordinator (factor %.6g)",
                h.round,
                h.client_id,
                staged.norm,
                self.dp.config.clip,
                factor,
            )
        return factor

    def _known_digest(self: Coordinator, round_number: int, client_id: str) -> str | None:
        """Digest of the update already counted for (round, client), if any."""
        if round_number == self.machine.round:
            receipt = self.machine.receipts.get(client_id)
            return receipt.digest if receipt else None
        if round_number < self.machine.round:
            return self.store.receipt_digest(round_number, client_id)
        return None
