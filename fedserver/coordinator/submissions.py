"""Receiving updates: header checks, one count per (client, round), refusals counted by reason.

The bytes are checked in aggregate.py; a verified update is handed to the round protocol
(fedserver/protocols) and recorded in the round machine. Owned by the Coordinator, which hands
it what it needs; it never sees the Coordinator.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from fedcore import faults
from fedcore.checksums import UnknownChecksum, new_hasher
from fedcore.codecs import Codec, get_codec
from fedcore.limits import CLIENT_METRIC_PREFIX, MAX_ROUND_METRICS, excerpt
from fedcore.selection import Selection
from fedcore.tensors import Manifest, ManifestError
from fedserver.protocols.base import Contribution, RoundProtocol
from fedserver.rounds.synchronous import AlreadySubmitted, Receipt, RoundMachine, SubmitRefused
from fedserver.state.history import ClientReceipt
from fedserver.updates.messages import (
    BaseVersionMismatch,
    CoordinatorBusy,
    PendingSubmit,
    SubmitHeader,
    SubmitResult,
    TooManyStreams,
    manifest_difference,
)
from fedserver.updates.receiver import BadUpdate, SpillCorrupted, StagedUpdate, UpdateTooLarge
from fedserver.updates.uploads import Uploads

# One line per counted update: `fedserver simulate` turns it down to DEBUG-only (thousands of
# virtual clients), where the round's closing line is the summary people read.
update_log = logging.getLogger("fedserver.updates")

MAX_NUM_EXAMPLES = 10**9
MAX_STREAMS_PER_CLIENT = 2
# Uploads received at once. Each holds a spill file (a descriptor next to its connection's) and
# decoder state; 10,000 selected clients uploading together ran the coordinator towards twice
# its connections in open files. Beyond this, refuse with a retry delay (docs/protocol.md).
MAX_UPLOADS_IN_FLIGHT = 1024
BUSY_RETRY_AFTER_MS = 2000


@dataclass
class UpdateIntake:
    uploads: Uploads
    machine: RoundMachine
    protocol: RoundProtocol
    base_version: Callable[[int], str | None]  # the model an update for round r must be based on
    # The tensors trained in round r (--train-tensors rotates groups by round): an update is
    # checked against its base round's group, which under async may be an earlier one.
    round_selection: Callable[[int], Selection]
    past_digest: Callable[[int, str], str | None]  # the store's receipt of an earlier round
    touch: Callable[[str], None]
    advance: Callable[[], None]  # let the round machine react (an update may close the round)
    max_update_bytes: int
    strategy_name: str
    # Why the strategy cannot use an update with these client metrics (Strategy), or None.
    check_metrics: Callable[[Mapping[str, float]], str | None] = lambda metrics: None
    strategy_partial: bool = True  # Strategy.partial_updates
    client_metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # this round's

    def _refuse(self, exc: Exception) -> Exception:
        return self.uploads.refuse(exc)

    def begin_submit(self, header: SubmitHeader) -> PendingSubmit:
        """Validate a header; raises SubmitRefused or BadUpdate (counters updated)."""
        try:
            codec, selection = self._check_header(header)
        except (SubmitRefused, BadUpdate) as e:
            raise self._refuse(e) from None
        if self.uploads.streams[header.client_id] >= MAX_STREAMS_PER_CLIENT:
            raise self._refuse(
                TooManyStreams(
                    f"client {excerpt(header.client_id)} already has {MAX_STREAMS_PER_CLIENT} "
                    "uploads in flight"
                )
            )
        if (busy := self.uploads.in_flight) >= MAX_UPLOADS_IN_FLIGHT:
            raise self._refuse(
                CoordinatorBusy(
                    f"{busy} uploads in flight; retry in {BUSY_RETRY_AFTER_MS} ms",
                    BUSY_RETRY_AFTER_MS,
                )
            )
        self.touch(header.client_id)
        num_values = (
            selection.num_values if selection else self.round_selection(header.round).num_values
        )
        # The protocol may need each update's norm (the DP wrapper re-clips by it).
        track_norm = self.protocol.needs_norm
        return self.uploads.open(header, codec, num_values, selection, track_norm)

    def _check_header(self, h: SubmitHeader) -> tuple[Codec, Selection | None]:
        if not h.client_id:
            raise BadUpdate("update header has no client_id")
        if not 0 < h.num_examples <= MAX_NUM_EXAMPLES:
            raise BadUpdate(
                f"num_examples must be between 1 and {MAX_NUM_EXAMPLES}, got {h.num_examples}",
                reason="bad_num_examples",
            )
        if not all(math.isfinite(v) for v in h.metrics.values()):
            raise BadUpdate("update metrics contain NaN or Inf", reason="non_finite")
        if problem := self.check_metrics(h.metrics):
            raise BadUpdate(problem, reason="bad_metrics")
        self.protocol.check_metrics(h.metrics)  # e.g. DP's clip bit, before the bytes
        try:
            codec = get_codec(h.encoding)
        except ManifestError as e:
            raise BadUpdate(str(e), reason="bad_encoding") from None
        try:
            new_hasher(h.checksum)
        except UnknownChecksum as e:
            raise BadUpdate(str(e), reason="bad_checksum") from None
        self.protocol.check_encoding(h.encoding)
        expected, selection = self._expected_manifest(h, codec)
        codec = codec.bind(expected)  # fp32 of a bfloat16/float16 model: each at its own dtype
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
        version = self.base_version(h.round) or "(unknown)"
        if h.base_version != version:
            raise BaseVersionMismatch(
                f"update was computed against model {h.base_version[:12] or '(none)'}, "
                f"round {h.round} is based on {version[:12]}; pull the model again"
            )
        return codec, selection

    def _expected_manifest(
        self, h: SubmitHeader, codec: Codec
    ) -> tuple[Manifest, Selection | None]:
        """The manifest `h` must declare, and its selection when it is a partial update.

        A round that trains a subset (--train-tensors) expects exactly that subset; a client
        keeping personal tensors (FedPer) may send any part of it, in model order.
        """
        round_sel = self.round_selection(h.round)
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
        if not (self.protocol.partial_updates and self.strategy_partial):
            raise BadUpdate(
                "partial updates (personal tensors) cannot be combined with --dp-clip, --secure "
                f"or strategy {self.strategy_name}; send every tensor of the round",
                reason="bad_manifest",
            )
        return codec.wire_manifest(part.manifest), part

    def finish_submit(self, pending: PendingSubmit, digest: str) -> SubmitResult:
        """Verify the whole stream, then count it exactly once; raises like begin_submit."""
        h = pending.header
        staged = self.uploads.finish(pending, digest)
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
                    f"client {excerpt(h.client_id)} already submitted a different update for "
                    f"round {h.round}; updates cannot be replaced",
                    known,
                )
            )
        try:
            self.machine.check_submit(h.client_id, h.round)
            staged.verify()  # bytes changed on disk since they were verified: refused, unfolded
        except (SubmitRefused, SpillCorrupted) as e:
            raise self._refuse(e) from None
        # Example-weighted; a wrapper may reweigh (DP: 1 each) and scale (DP: re-clip).
        weight = float(h.num_examples)
        contribution = Contribution(
            h.client_id, h.round, staged, weight, h.num_examples, selection, metrics=h.metrics
        )
        try:
            self.protocol.accept(contribution)
        except (SubmitRefused, BadUpdate) as e:
            raise self._refuse(e) from None
        self.machine.record(h.client_id, Receipt(staged.digest, h.num_examples, h.round))
        # What the protocol reads from the metrics is its input, never recorded (a DP wrapper's
        # clip bit: the round's mean of it would be an un-noised count).
        hidden = self.protocol.private_metrics
        self.client_metrics[h.client_id] = {k: v for k, v in h.metrics.items() if k not in hidden}
        self.uploads.metrics.accepted(staleness=self.machine.round - h.round)
        faults.freeze("collect", h.round)  # tests: crash with an update counted only in memory
        m = self.machine
        update_log.info(
            "round %d: update %d/%d from %s (%d examples%s)",
            m.round,
            len(m.receipts),
            m.expected_updates,
            h.client_id,
            h.num_examples,
            f", based on round {h.round}" if h.round != m.round else "",
        )
        # No _notify(): a counted update changes no other client's offer. Waking every
        # long-poller on every update cost O(clients^2) wake-ups per round at 1000 clients;
        # advance() notifies when the round opens or closes, which is what pollers wait for.
        self.advance()
        return SubmitResult(h.round, False, f"update counted for round {h.round}")

    def metric_means(self, receipts: Mapping[str, Receipt]) -> dict[str, float]:
        """The counted clients' reported metrics, averaged weighted by their examples, each
        named CLIENT_METRIC_PREFIX + the client's name: what clients say about themselves never
        shares a name with what the coordinator measured (its held-out `accuracy`, ε)."""
        total: Counter[str] = Counter()
        weight: Counter[str] = Counter()
        for client, receipt in receipts.items():
            for k, v in self.client_metrics.get(client, {}).items():
                total[k] += v * receipt.num_examples
                weight[k] += receipt.num_examples
        # Each client sends at most MAX_METRICS names, but they may all differ: keep the names
        # most examples reported (then by name), so a round's record stays bounded.
        kept = sorted((k for k in total if weight[k]), key=lambda k: (-weight[k], k))
        return {CLIENT_METRIC_PREFIX + k: total[k] / weight[k] for k in kept[:MAX_ROUND_METRICS]}

    def client_receipts(
        self, receipts: Mapping[str, Receipt], round_no: int
    ) -> list[ClientReceipt]:
        """What the history keeps of each counted update: its digest, the client's reported
        metrics, and, in a column of its own, the round it trained on (so a retry of an update
        counted in a later round is recognised: store.receipt_digest)."""
        return [
            ClientReceipt(
                client,
                r.num_examples,
                r.digest,
                dict(self.client_metrics.get(client, {})),
                r.base_round or round_no,
            )
            for client, r in sorted(receipts.items())
        ]

    def _known_digest(self, round_number: int, client_id: str) -> str | None:
        """Digest of the client's update based on `round_number` already counted, if any (in
        this round, or, committed, in that round or, asynchronously, a later one)."""
        receipt = self.machine.receipts.get(client_id)
        if receipt is not None and (receipt.base_round or self.machine.round) == round_number:
            return receipt.digest
        if round_number < self.machine.round:
            return self.past_digest(round_number, client_id)
        return None
