"""Secure aggregation (`fedserver run --secure secagg`): the coordinator only sees masked updates.

A round's SecAggRound (fedserver/protocols/secagg_stages.py) runs the key exchange and share stages
while clients train; masked updates are summed modulo 2^64 as they arrive; at close the survivors
reveal shares and the sum is unmasked. This module is the protocol: timers, folding, unmasking, and
the "secagg" stage the servicer's secure-aggregation RPCs call. Asyncio only (no gRPC); the math is
in fedcore/secagg.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping

from fedcore.secagg import quantize
from fedcore.secagg.keys import round_context
from fedserver.protocols.base import (
    Aggregate,
    Contribution,
    Opening,
    ProtocolEnv,
    ProtocolSettings,
    RoundProtocol,
)
from fedserver.protocols.secagg_stages import SecAggFailed, SecAggRefused, SecAggRound

ENCODING = "masked-u64"
log = logging.getLogger("fedserver.secagg")


class SecAggProtocol(RoundProtocol):
    encoding = ENCODING
    noise = "clients"  # the coordinator only sees the unmasked sum: each client adds its share

    def __init__(self, settings: ProtocolSettings, env: ProtocolEnv) -> None:
        self.env = env
        self.stage_timeout = settings.stage_timeout
        self.weighted = not settings.unweighted
        self.current: SecAggRound | None = None
        self._timer: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------ the round
    def open(self, opening: Opening) -> None:
        if opening.fresh or self.current is None or self.current.round != opening.round:
            self.current = SecAggRound(
                opening.round,
                opening.selected,
                round_context(self.env.federation_id, opening.round),
                self.env.num_values,
                self.stage_timeout,
                self.env.clock,
            )
        else:
            self.current.extend(opening.selected)
        self.tick()

    def tick(self) -> None:
        """Let the key/share stages close on completeness or time; re-arm the stage timer."""
        sa = self.current
        if sa is None:
            return
        if sa.step():
            self.env.notify()
            sa.step()
        if self._timer:
            self._timer.cancel()
        delay = max(0.0, sa.deadline - self.env.clock()) + 0.01
        self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.current is not None and self.current.step():
            self.env.notify()
            self.tick()

    def round_extra(self) -> dict[str, str]:
        return {"secagg": "1", "secagg_weighted": "1" if self.weighted else "0"}

    def accept(self, c: Contribution) -> None:
        sa = self._round(c.round)
        sa.fold(c.client_id, ((p.offset, p.values) for p in c.staged.pieces()), c.weight)

    async def aggregate(self) -> Aggregate:
        """At round close: ask survivors for shares, rebuild, and return the weighted mean."""
        sa = self.current
        if sa is None:
            raise SecAggFailed("no secure-aggregation state for the closing round")
        sa.begin_unmask()
        self.env.notify()
        loop = asyncio.get_running_loop()
        while not sa.unmask_ready():
            changed = self.env.changed()
            remaining = sa.deadline - self.env.clock()
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
        return Aggregate(quantize.decode_sum(total, weight), len(sa.survivors), sa.total_weight)

    def stage(self, kind: str) -> SecAggProtocol | None:
        return self if kind == "secagg" else None

    # ------------------------------------------------------------------ the "secagg" stage
    def max_peers(self) -> int:
        """The most entries a share or reveal list can have: the current round's selection."""
        return len(self.current.selected) if self.current is not None else 0

    def _round(self, round_number: int) -> SecAggRound:
        sa = self.current
        current = self.env.current_round()
        if sa is None or sa.round != round_number or round_number != current:
            raise SecAggRefused(
                f"round {round_number} has no secure aggregation in progress "
                f"(current round: {current})"
            )
        return sa

    # A client is marked live (env.touch) only after its message passed every check:
    # a refused caller must not become selectable or hold up the round.
    def advertise(self, client_id: str, round_number: int, channel: bytes, mask: bytes) -> None:
        self._round(round_number).advertise(client_id, channel, mask)
        self.env.touch(client_id)
        self.tick()

    def share(self, client_id: str, round_number: int, shares: Mapping[str, bytes]) -> None:
        self._round(round_number).post_shares(client_id, shares)
        self.env.touch(client_id)
        self.tick()

    def reveal(
        self,
        client_id: str,
        round_number: int,
        seeds: Mapping[str, bytes],
        keys: Mapping[str, bytes],
    ) -> None:
        self._round(round_number).reveal(client_id, seeds, keys)
        self.env.notify()

    async def poll(
        self, client_id: str, round_number: int, want: str, wait: float
    ) -> dict[str, object] | None:
        """Long-poll until the stage `want` ("roster", "inbox", "unmask") is ready, or `wait`."""
        loop = asyncio.get_running_loop()
        until = loop.time() + max(0.0, wait)
        while True:
            changed = self.env.changed()
            view = self._round(round_number).stage_view(client_id, want)
            self.env.touch(client_id)
            remaining = until - loop.time()
            if view is not None or remaining <= 0:
                return view
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), remaining)


__all__ = ["ENCODING", "SecAggProtocol"]
