"""Buffered asynchronous aggregation (`--mode async`, FedBuff): each round is one buffer.

Like plain aggregation, updates fold into one float32 accumulator as they arrive (O(model)
memory), but each is weighted by num_examples x s(staleness), where staleness = the versions
published since the model the client trained on (fedserver/rounds/staleness.py), and the sum divides
by the buffer's examples, not by the weights: FedBuff's rule, under which s damps the step taken
from stale deltas instead of only reweighting them against each other (a buffer of equally
stale deltas otherwise steps as far as a fresh one, which diverges on digits at staleness 2).
The round machine (async_rounds.py) closes the buffer after K contributions; the strategy then
takes its server step on that mean, exactly as for a synchronous round.

One client's weight (its self-reported num_examples) is capped at --max-weight-ratio R times the
median weight of the last RECENT_CLIENTS other clients that contributed, so a client claiming
1e9 examples moves a buffer like one R times the typical size, not like all the others together.

Under --dp-clip the DP wrapper (protocols/dp.py) hands every contribution weight 1, so each
weighs s(staleness) <= 1 instead of its examples and the same rule divides by K: one client
moves the mean by at most C/K and the noise of a synchronous round of K clients (std z C / K)
covers it (docs/algorithms.md).
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
from collections import OrderedDict

import numpy as np

from fedserver.protocols.base import (
    Aggregate,
    Contribution,
    Opening,
    ProtocolEnv,
    ProtocolSettings,
)
from fedserver.protocols.plain import PlainProtocol
from fedserver.rounds.staleness import StalenessWeight

log = logging.getLogger("fedserver")
RECENT_CLIENTS = 64  # distinct clients whose latest weight makes the median


class BufferedProtocol(PlainProtocol):
    def __init__(self, settings: ProtocolSettings, env: ProtocolEnv) -> None:
        if settings.keep_updates:
            raise ValueError("asynchronous aggregation cannot keep every update (robust rules)")
        super().__init__(settings, env)
        self.weight_of = settings.staleness or StalenessWeight()
        self._unweighted = 0.0  # sum of the buffer's weights before s(staleness)
        self.max_weight_ratio = settings.max_weight_ratio
        self._recent: OrderedDict[str, float] = OrderedDict()  # client -> its latest weight

    def round_extra(self) -> dict[str, str]:
        return {"aggregation": "async"}

    def open(self, opening: Opening) -> None:
        super().open(opening)
        if opening.fresh:
            self._unweighted = 0.0

    def accept(self, c: Contribution) -> None:
        staleness = self.env.current_round() - c.round
        weight = self._capped(c.client_id, c.weight)
        super().accept(dataclasses.replace(c, weight=weight * self.weight_of(staleness)))
        self._unweighted += weight

    def _capped(self, client_id: str, weight: float) -> float:
        """min(weight, R x the median of other recent clients' weights); O(RECENT_CLIENTS).
        One vote per client, so a client cannot lift the median by contributing often."""
        recent = self._recent
        others = [w for c, w in recent.items() if c != client_id]
        if self.max_weight_ratio and others:
            cap = self.max_weight_ratio * statistics.median(others)
            if weight > cap:
                log.info(
                    "update from %s weighs %g examples, more than --max-weight-ratio %g x the "
                    "median of recent clients (%g); counted as %g",
                    client_id,
                    weight,
                    self.max_weight_ratio,
                    cap / self.max_weight_ratio,
                    cap,
                )
                weight = cap
        recent[client_id] = weight
        recent.move_to_end(client_id)
        if len(recent) > RECENT_CLIENTS:
            recent.popitem(last=False)
        return weight

    async def aggregate(self) -> Aggregate:
        """sum(n_i s_i delta_i) / sum(n_i): the staleness weights shrink the step."""
        agg = await super().aggregate()
        scale = np.float32(agg.weight / self._unweighted)
        mean = np.multiply(agg.mean, scale, out=agg.mean)
        return Aggregate(mean, agg.count, self._unweighted, metrics=agg.metrics)
