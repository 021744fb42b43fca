"""Glue between the Coordinator and homomorphic-encryption aggregation (`--secure he`).

The coordinator holds only the public CKKS context (fedcore/he.py): it adds the clients'
ciphertexts but cannot read them. At round close it names one key holder (a client of the
round, then any other live client if that one does not answer in time) to decrypt the sum; the
plaintext *sum* is all the coordinator ever sees, and it refuses to ask for one that holds fewer
than MIN_UPDATES updates, which would be an individual update. Same hooks as SecureRounds
(fedserver/secure_rounds.py), plus the decryption stage. Asyncio only, no gRPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedcore.codecs import get_codec
from fedcore.he import ENCODING, HEAggregator, HEError
from fedcore.tensors import Manifest
from fedserver.aggregate import BadUpdate, StagedUpdate, UpdateReceiver
from fedserver.messages import PendingSubmit, SubmitHeader, SubmitResult, manifest_difference
from fedserver.rounds import AlreadySubmitted, NotSelected, StaleRound, SubmitRefused
from fedserver.secagg import SecAggFailed

if TYPE_CHECKING:
    from fedserver.coordinator import Coordinator

log = logging.getLogger("fedserver.he")

MIN_UPDATES = 2  # decrypting a sum of one update would reveal it


@dataclass
class Decryption:
    """The encrypted sum of one round, waiting for a key holder to decrypt it."""

    round: int
    payload: np.ndarray  # framed ciphertexts (fedcore.he.frame)
    asked: str = ""  # the key holder asked now
    result: np.ndarray | None = None  # the plaintext sum, once returned
    digest: str = ""
    done: asyncio.Event = field(default_factory=asyncio.Event)


class HERounds:
    encoding = ENCODING

    def __init__(
        self, coordinator: Coordinator, public_context: Path, stage_timeout: float
    ) -> None:
        self.c = coordinator
        self.stage_timeout = stage_timeout
        # Loading here refuses a secret context (or a missing file) before the daemon serves.
        self.aggregator = HEAggregator(public_context, coordinator._num_values())
        self.round = 0
        self.weight = 0.0
        self.contributors: list[str] = []
        self.decryption: Decryption | None = None
        log.info("homomorphic aggregation: public CKKS context %s (no secret key)", public_context)

    # ------------------------------------------------------------------ coordinator hooks
    def on_open(self, fresh: bool) -> None:
        m = self.c.machine
        if fresh or self.round != m.round:
            self.aggregator.reset()
            self.round, self.weight, self.contributors = m.round, 0.0, []
            self.decryption = None

    def round_extra(self, weighted: bool) -> dict[str, str]:
        return {"he": "1", "he_weighted": "1" if weighted else "0"}

    def fold(self, client_id: str, round_number: int, staged: StagedUpdate, weight: float) -> None:
        try:
            self.aggregator.add_payload(staged.payload())
        except HEError as e:
            raise BadUpdate(str(e), reason="bad_ciphertext") from None
        self.weight += weight
        self.contributors.append(client_id)

    def contributed(self) -> tuple[int, float]:
        return self.aggregator.count, self.weight

    def decryption_for(self, client_id: str) -> int:
        """The round whose aggregate this client should decrypt now, or 0."""
        d = self.decryption
        return d.round if d is not None and d.result is None and d.asked == client_id else 0

    async def aggregate_mean(self) -> np.ndarray:
        """At round close: have a key holder decrypt the sum; return the weighted mean."""
        count = self.aggregator.count
        if count < MIN_UPDATES:
            raise SecAggFailed(
                f"round {self.round} has {count} encrypted update(s); decrypting fewer than "
                f"{MIN_UPDATES} would reveal an individual update (raise --min-clients/--min-fit)"
            )
        payload = await asyncio.to_thread(self.aggregator.aggregate_payload)
        d = self.decryption = Decryption(self.round, payload)
        live = set(self.c.machine.live_clients())
        others = sorted(live.difference(self.contributors))
        for client_id in [*self.contributors, *others]:
            if client_id not in live:
                continue
            d.asked = client_id
            log.info(
                "round %d: asking %s to decrypt the sum of %d encrypted updates (%d bytes)",
                d.round,
                client_id,
                count,
                payload.size,
            )
            self.c._notify()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(d.done.wait(), self.stage_timeout)
            if d.result is not None:
                return d.result / np.float32(self.weight)
            log.warning(
                "round %d: %s did not return the decryption within %.0fs; asking another key "
                "holder",
                d.round,
                client_id,
                self.stage_timeout,
            )
        raise SecAggFailed(f"no key holder returned the decrypted aggregate of round {d.round}")

    # ------------------------------------------------------------------ the decryption stage
    def _pending(self, client_id: str, round_number: int) -> Decryption:
        d = self.decryption
        if d is None or d.round != round_number:
            raise StaleRound(
                f"no encrypted aggregate of round {round_number} is waiting for decryption "
                f"(current round: {self.c.machine.round})"
            )
        if client_id != d.asked:
            raise NotSelected(
                f"client {client_id!r} was not asked to decrypt the aggregate of round "
                f"{round_number}"
            )
        return d

    def encrypted_aggregate(self, client_id: str, round_number: int) -> np.ndarray:
        """The framed ciphertexts for the asked key holder; raises SubmitRefused otherwise."""
        try:
            payload = self._pending(client_id, round_number).payload
        except SubmitRefused as e:
            raise self.c.reject(e) from None
        self.c.touch(client_id)  # only now: a refused caller must not become live
        return payload

    def sum_manifest(self) -> Manifest:
        """What the aggregate stands for: the model's float tensors as float32."""
        return get_codec("fp32").wire_manifest(self.c.model.manifest.floats())

    def begin_decryption(self, h: SubmitHeader) -> PendingSubmit:
        """Validate a SubmitDecryption header (the plaintext sum, fp32, the whole model)."""
        try:
            self._pending(h.client_id, h.round)
            if h.encoding != "fp32":
                raise BadUpdate(
                    f"a decrypted aggregate must use encoding 'fp32', got {h.encoding!r}",
                    reason="bad_encoding",
                )
            codec = get_codec("fp32")
            expected = self.sum_manifest()
            if h.manifest != expected:
                raise BadUpdate(manifest_difference(h.manifest, expected), reason="bad_manifest")
            if h.total_bytes != expected.total_bytes:
                raise BadUpdate(
                    f"header declares {h.total_bytes} bytes; the decrypted aggregate of this "
                    f"model has {expected.total_bytes}",
                    reason="bad_size",
                )
            receiver = UpdateReceiver(  # refuses an unknown checksum algorithm
                codec,
                self.c._num_values(),
                h.total_bytes,
                self.c.store.dir / "incoming",
                h.checksum,
                self.c.spill_key,
            )
        except (BadUpdate, SubmitRefused) as e:
            raise self.c.reject(e) from None
        self.c.touch(h.client_id)  # every check passed: only now is the caller live
        self.c._streams[h.client_id] += 1
        return PendingSubmit(h, receiver, None)

    def finish_decryption(self, pending: PendingSubmit, sha256: str) -> SubmitResult:
        h = pending.header
        try:
            staged = pending.receiver.finish(sha256)
        except BadUpdate as e:
            self.c.abort_submit(pending)
            raise self.c.reject(e) from None
        self.c._streams[h.client_id] -= 1
        self.c.metrics.received(pending.receiver.received)
        try:
            total = np.zeros(self.c._num_values(), dtype=np.float32)
            for piece in staged.pieces():
                total[piece.offset : piece.offset + piece.values.size] = piece.values
        finally:
            staged.discard()
        d = self.decryption
        if d is None or d.round != h.round:  # the round moved on while the bytes arrived
            raise self.c.reject(StaleRound(f"round {h.round} is no longer being decrypted"))
        if d.result is not None:
            if d.digest == staged.digest:
                return SubmitResult(h.round, True, "duplicate of a decryption already received")
            raise self.c.reject(
                AlreadySubmitted(
                    f"the aggregate of round {h.round} was already decrypted", d.digest
                )
            )
        d.result, d.digest = total, staged.digest
        d.done.set()
        log.info("round %d: decrypted aggregate received from %s", h.round, h.client_id)
        return SubmitResult(h.round, False, f"decrypted aggregate of round {h.round} received")


__all__ = ["MIN_UPDATES", "HERounds"]
