"""Homomorphic-encryption aggregation (`--secure he`): the coordinator sums ciphertexts.

The coordinator holds only the public CKKS context (fedcore/he.py): it adds the clients'
ciphertexts but cannot read them. At round close it names one key holder (a client of the
round, then any other live client if that one does not answer in time) to decrypt the sum; the
plaintext *sum* is all the coordinator ever sees, and it refuses to ask for one that holds fewer
than MIN_UPDATES updates, which would be an individual update. The "he" stage (the encrypted
aggregate out, the decryption in) is what the servicer's HE RPCs call. Asyncio only, no gRPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

import numpy as np

from fedcore.codecs import get_codec
from fedcore.he import ENCODING, HEAggregator, HEError
from fedcore.limits import excerpt
from fedcore.tensors import Manifest
from fedserver.protocols.base import (
    Aggregate,
    Contribution,
    Opening,
    ProtocolEnv,
    ProtocolSettings,
    RoundProtocol,
)
from fedserver.protocols.secagg_stages import SecAggFailed
from fedserver.rounds.synchronous import AlreadySubmitted, NotSelected, StaleRound, SubmitRefused
from fedserver.updates.messages import (
    PendingSubmit,
    SubmitHeader,
    SubmitResult,
    manifest_difference,
)
from fedserver.updates.receiver import BadUpdate

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


class HEProtocol(RoundProtocol):
    encoding = ENCODING
    # Noise on the clients: the key holder decrypts the sum, and must never see it clean.
    noise = "clients"

    def __init__(self, settings: ProtocolSettings, env: ProtocolEnv) -> None:
        public_context = settings.he_public_key
        if public_context is None:
            raise ValueError("--secure he needs the public context (--he-public-key)")
        self.env = env
        self.stage_timeout = settings.stage_timeout
        self.weighted = not settings.unweighted
        # Loading here refuses a secret context (or a missing file) before the daemon serves.
        self.aggregator = HEAggregator(public_context, env.num_values)
        self.round = 0
        self.weight = 0.0
        self.contributors: list[str] = []
        self.decryption: Decryption | None = None
        log.info("homomorphic aggregation: public CKKS context %s (no secret key)", public_context)

    # ------------------------------------------------------------------ the round
    def open(self, opening: Opening) -> None:
        if opening.fresh or self.round != opening.round:
            self.aggregator.reset()
            self.round, self.weight, self.contributors = opening.round, 0.0, []
            self.decryption = None

    def round_extra(self) -> dict[str, str]:
        return {"he": "1", "he_weighted": "1" if self.weighted else "0"}

    def accept(self, c: Contribution) -> None:
        try:
            self.aggregator.add_payload(c.staged.payload())
        except HEError as e:
            raise BadUpdate(str(e), reason="bad_ciphertext") from None
        self.weight += c.weight
        self.contributors.append(c.client_id)

    def stage(self, kind: str) -> HEProtocol | None:
        return self if kind == "he" else None

    def decryption_for(self, client_id: str) -> int:
        """The round whose aggregate this client should decrypt now, or 0."""
        d = self.decryption
        return d.round if d is not None and d.result is None and d.asked == client_id else 0

    async def aggregate(self) -> Aggregate:
        """At round close: have a key holder decrypt the sum; return the weighted mean."""
        count = self.aggregator.count
        if count < MIN_UPDATES:
            raise SecAggFailed(
                f"round {self.round} has {count} encrypted update(s); decrypting fewer than "
                f"{MIN_UPDATES} would reveal an individual update (raise --min-clients/--min-fit)"
            )
        payload = await asyncio.to_thread(self.aggregator.aggregate_payload)
        d = self.decryption = Decryption(self.round, payload)
        live = set(self.env.live_clients())
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
            self.env.notify()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(d.done.wait(), self.stage_timeout)
            if d.result is not None:
                return Aggregate(d.result / np.float32(self.weight), count, self.weight)
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
                f"(current round: {self.env.current_round()})"
            )
        if client_id != d.asked:
            raise NotSelected(
                f"client {excerpt(client_id)} was not asked to decrypt the aggregate of round "
                f"{round_number}"
            )
        return d

    def encrypted_aggregate(self, client_id: str, round_number: int) -> np.ndarray:
        """The framed ciphertexts for the asked key holder; raises SubmitRefused otherwise."""
        try:
            payload = self._pending(client_id, round_number).payload
        except SubmitRefused as e:
            raise self.env.uploads.refuse(e) from None
        self.env.touch(client_id)  # only now: a refused caller must not become live
        return payload

    def sum_manifest(self) -> Manifest:
        """What the aggregate stands for: the model's float tensors as float32."""
        return get_codec("fp32").wire_manifest(self.env.floats)

    def begin_decryption(self, h: SubmitHeader) -> PendingSubmit:
        """Validate a SubmitDecryption header (the plaintext sum, fp32, the whole model)."""
        try:
            self._pending(h.client_id, h.round)
            if h.encoding != "fp32":
                raise BadUpdate(
                    f"a decrypted aggregate must use encoding 'fp32', got {excerpt(h.encoding)}",
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
            # Opening the stream refuses an unknown checksum algorithm.
            pending = self.env.uploads.open(h, codec, self.env.num_values, None)
        except (BadUpdate, SubmitRefused) as e:
            raise self.env.uploads.refuse(e) from None
        self.env.touch(h.client_id)  # every check passed: only now is the caller live
        return pending

    def finish_decryption(self, pending: PendingSubmit, sha256: str) -> SubmitResult:
        h = pending.header
        staged = self.env.uploads.finish(pending, sha256)
        try:
            total = np.zeros(self.env.num_values, dtype=np.float32)
            for piece in staged.pieces():
                total[piece.offset : piece.offset + piece.values.size] = piece.values
        finally:
            staged.discard()
        d = self.decryption
        if d is None or d.round != h.round:  # the round moved on while the bytes arrived
            raise self.env.uploads.refuse(
                StaleRound(f"round {h.round} is no longer being decrypted")
            )
        if d.result is not None:
            if d.digest == staged.digest:
                return SubmitResult(h.round, True, "duplicate of a decryption already received")
            raise self.env.uploads.refuse(
                AlreadySubmitted(
                    f"the aggregate of round {h.round} was already decrypted", d.digest
                )
            )
        d.result, d.digest = total, staged.digest
        d.done.set()
        log.info("round %d: decrypted aggregate received from %s", h.round, h.client_id)
        return SubmitResult(h.round, False, f"decrypted aggregate of round {h.round} received")


__all__ = ["MIN_UPDATES", "HEProtocol"]
