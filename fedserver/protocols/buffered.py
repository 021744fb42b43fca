"""Buffered asynchronous aggregation (`--mode async`, FedBuff): each round is one buffer.

Like plain aggregation, updates fold into one float32 accumulator as they arrive (O(model)
memory), but each is weighted by num_examples x s(staleness), where staleness = the versions
published since the model the client trained on (fedserver/staleness.py), and the sum divides by
the buffer's examples, not by the weights: FedBuff's rule, under which s damps the step taken
from stale deltas instead of only reweighting them against each other (a buffer of equally
stale deltas otherwise steps as far as a fresh one, which diverges on digits at staleness 2).
The round machine (async_rounds.py) closes the buffer after K contributions; the strategy then
takes its server step on that mean, exactly as for a synchronous round.

Under --dp-clip every contribution weighs s(staleness) <= 1 instead of its examples, so the
same rule divides by K: one client moves the mean by at most C/K and the noise of a
synchronous round of K clients (std z C / K) covers it (docs/algorithms.md).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fedserver.protocols.base import (
    Aggregate,
    Contribution,
    Opening,
    ProtocolEnv,
    ProtocolSettings,
)
from fedserver.protocols.plain import PlainProtocol
from fedserver.staleness import StalenessWeight


class BufferedProtocol(PlainProtocol):
    def __init__(self, settings: ProtocolSettings, env: ProtocolEnv) -> None:
        if settings.keep_updates:
            raise ValueError("asynchronous aggregation cannot keep every update (robust rules)")
        super().__init__(settings, env)
        self.weight_of = settings.staleness or StalenessWeight()
        self._unweighted = 0.0  # sum of the buffer's weights before s(staleness)

    def round_extra(self) -> dict[str, str]:
        return {"aggregation": "async"}

    def open(self, opening: Opening) -> None:
        super().open(opening)
        if opening.fresh:
            self._unweighted = 0.0

    def accept(self, c: Contribution) -> None:
        staleness = self.env.current_round() - c.round
        super().accept(dataclasses.replace(c, weight=c.weight * self.weight_of(staleness)))
        self._unweighted += c.weight

    async def aggregate(self) -> Aggregate:
        """sum(n_i s_i delta_i) / sum(n_i): the staleness weights shrink the step."""
        agg = await super().aggregate()
        scale = np.float32(agg.weight / self._unweighted)
        mean = np.multiply(agg.mean, scale, out=agg.mean)
        return Aggregate(mean, agg.count, self._unweighted)
