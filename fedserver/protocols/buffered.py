"""Buffered asynchronous aggregation (`--mode async`, FedBuff): each round is one buffer.

Like plain aggregation, updates fold into one float32 accumulator as they arrive (O(model)
memory), but each is weighted by num_examples x s(staleness), where staleness = the versions
published since the model the client trained on (fedserver/staleness.py). The round machine
(async_rounds.py) closes the buffer after K contributions; the strategy then takes its server
step on the mean, exactly as for a synchronous round.

Under --dp-clip every contribution weighs s(staleness) <= 1 and the mean divides by K, not by
the sum of weights, so one client still moves the mean by at most C/K and the noise of a
synchronous round of K clients (std z C / K) covers it (docs/algorithms.md).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fedserver.protocols.base import Aggregate, Contribution, ProtocolEnv, ProtocolSettings
from fedserver.protocols.plain import PlainProtocol
from fedserver.staleness import StalenessWeight


class BufferedProtocol(PlainProtocol):
    def __init__(self, settings: ProtocolSettings, env: ProtocolEnv) -> None:
        if settings.keep_updates:
            raise ValueError("asynchronous aggregation cannot keep every update (robust rules)")
        super().__init__(settings, env)
        self.dp = settings.dp
        self.weight_of = settings.staleness or StalenessWeight()

    def round_extra(self) -> dict[str, str]:
        return {"aggregation": "async"}

    def accept(self, c: Contribution) -> None:
        staleness = self.env.current_round() - c.round
        super().accept(dataclasses.replace(c, weight=c.weight * self.weight_of(staleness)))

    async def aggregate(self) -> Aggregate:
        agg = await super().aggregate()
        if not self.dp:
            return agg
        # sum(s_i x clipped_i) / K: the weights only ever shrink a contribution.
        scale = np.float32(agg.weight / agg.count)
        return Aggregate(np.multiply(agg.mean, scale, out=agg.mean), agg.count, float(agg.count))
