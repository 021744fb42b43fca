"""Glue between the Coordinator and a round's SecAggRound (`fedserver run --secure secagg`).

Kept out of coordinator.py so the plain path stays readable: the coordinator calls the hooks
below when a round opens, when it folds an update, and when it aggregates; the servicer calls the
message handlers. Asyncio only (no gRPC); the math is in fedcore/secagg.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from fedcore.he import ENCODING as HE_ENCODING
from fedcore.secagg import quantize
from fedcore.secagg.keys import round_context
from fedserver.aggregate import BadUpdate, StagedUpdate
from fedserver.secagg import SecAggFailed, SecAggRefused, SecAggRound

if TYPE_CHECKING:
    from fedserver.coordinator import Coordinator
    from fedserver.he_rounds import HERounds

ENCODING = "masked-u64"
log = logging.getLogger("fedserver.secagg")


SECURE_ENCODINGS = (ENCODING, HE_ENCODING)


def check_encoding(secure: SecureRounds | HERounds | None, encoding: str) -> None:
    """Masked/encrypted updates only under a --secure mode, and only its encoding then."""
    if secure is not None and encoding != secure.encoding:
        raise BadUpdate(
            f"this coordinator runs secure aggregation: updates must use encoding "
            f"{secure.encoding!r}, got {encoding!r}",
            reason="bad_encoding",
        )
    if secure is None and encoding in SECURE_ENCODINGS:
        raise BadUpdate(
            f"encoding {encoding!r} is for --secure aggregation, which this coordinator does "
            "not run",
            reason="bad_encoding",
        )


class SecureRounds:
    encoding = ENCODING

    def __init__(self, coordinator: Coordinator, stage_timeout: float = 30.0) -> None:
        self.c = coordinator
        self.stage_timeout = stage_timeout
        self.current: SecAggRound | None = None
        self._timer: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------ coordinator hooks
    def on_open(self, fresh: bool) -> None:
        m = self.c.machine
        if fresh or self.current is None or self.current.round != m.round:
            self.current = SecAggRound(
                m.round,
                m.selected,
                round_context(self.c.federation_id, m.round),
                self.c._num_values(),
                self.stage_timeout,
                time.monotonic,
            )
        else:
            self.current.extend(m.selected)
        self.tick()

    def tick(self) -> None:
        """Let the key/share stages close on completeness or time; re-arm the stage timer."""
        sa = self.current
        if sa is None:
            return
        if sa.step():
            self.c._notify()
            sa.step()
        if self._timer:
            self._timer.cancel()
        delay = max(0.0, sa.deadline - time.monotonic()) + 0.01
        self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.current is not None and self.current.step():
            self.c._notify()
            self.tick()

    def round_extra(self, weighted: bool) -> dict[str, str]:
        return {"secagg": "1", "secagg_weighted": "1" if weighted else "0"}

    def fold(self, client_id: str, round_number: int, staged: StagedUpdate, weight: float) -> None:
        sa = self._round(round_number)
        sa.fold(client_id, ((p.offset, p.values) for p in staged.pieces()), weight)

    def decryption_for(self, client_id: str) -> int:
        return 0  # only homomorphic aggregation has a decryption stage

    async def aggregate_mean(self) -> np.ndarray:
        """At round close: ask survivors for shares, rebuild, and return the weighted mean."""
        sa = self.current
        if sa is None:
            raise SecAggFailed("no secure-aggregation state for the closing round")
        sa.begin_unmask()
        self.c._notify()
        loop = asyncio.get_running_loop()
        while not sa.unmask_ready():
            changed = self.c._changed
            remaining = sa.deadline - time.monotonic()
            if remaining <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), remaining + 0.01)
        sa.stop_reveals()
        total, weight = await loop.run_in_executor(None, sa.finish)
        log.info(
            "round %d: unmasked the sum of %d masked updates (%d dropped after the key exchange; "
            "shares from %d, threshold %d)",
            sa.round,
            len(sa.survivors),
            len(sa.dropped),
            len(sa.reveals),
            sa.threshold,
        )
        return quantize.decode_sum(total, weight)

    def contributed(self) -> tuple[int, float]:
        """(masked updates in the sum, their total weight) of the round being aggregated."""
        sa = self.current
        return (len(sa.survivors), sa.total_weight) if sa is not None else (0, 0.0)

    # ------------------------------------------------------------------ client messages
    def max_peers(self) -> int:
        """The most entries a share or reveal list can have: the current round's selection."""
        return len(self.current.selected) if self.current is not None else 0

    def _round(self, round_number: int) -> SecAggRound:
        sa = self.current
        if sa is None or sa.round != round_number or round_number != self.c.machine.round:
            raise SecAggRefused(
                f"round {round_number} has no secure aggregation in progress "
                f"(current round: {self.c.machine.round})"
            )
        return sa

    # A client is marked live (Coordinator.touch) only after its message passed every check:
    # a refused caller must not become selectable or hold up the round.
    def advertise(self, client_id: str, round_number: int, channel: bytes, mask: bytes) -> None:
        self._round(round_number).advertise(client_id, channel, mask)
        self.c.touch(client_id)
        self.tick()

    def share(self, client_id: str, round_number: int, shares: Mapping[str, bytes]) -> None:
        self._round(round_number).post_shares(client_id, shares)
        self.c.touch(client_id)
        self.tick()

    def reveal(
        self,
        client_id: str,
        round_number: int,
        seeds: Mapping[str, bytes],
        keys: Mapping[str, bytes],
    ) -> None:
        self._round(round_number).reveal(client_id, seeds, keys)
        self.c._notify()

    async def poll(
        self, client_id: str, round_number: int, want: str, wait: float
    ) -> dict[str, object] | None:
        """Long-poll until the stage `want` ("roster", "inbox", "unmask") is ready, or `wait`."""
        loop = asyncio.get_running_loop()
        until = loop.time() + max(0.0, wait)
        while True:
            changed = self.c._changed
            view = self._round(round_number).stage_view(client_id, want)
            self.c.touch(client_id)
            remaining = until - loop.time()
            if view is not None or remaining <= 0:
                return view
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), remaining)


__all__ = ["ENCODING", "SecureRounds"]
