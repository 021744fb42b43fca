"""Plain aggregation (`--secure none`): updates folded into one float32 accumulator as they
arrive, example-weighted (unweighted under the DP wrapper, protocols/dp.py); strategies that read
every update (median, trimmed mean, Krum) also get each one kept as a row of a disk-backed spool."""

from __future__ import annotations

import numpy as np

from fedserver.protocols.base import (
    Aggregate,
    Contribution,
    Opening,
    ProtocolEnv,
    ProtocolSettings,
    RoundProtocol,
)
from fedserver.strategies import UpdateSet
from fedserver.updates.accumulator import Accumulator
from fedserver.updates.spool import UpdateSpool


class PlainProtocol(RoundProtocol):
    noise = "server"  # the coordinator sees the mean in plain and noises it

    def __init__(self, settings: ProtocolSettings, env: ProtocolEnv) -> None:
        self.env = env
        self.keep_updates = settings.keep_updates
        self.update_metrics = settings.update_metrics
        # The spool's rows cover the whole model: only the plain mean folds partial updates per
        # tensor (the DP wrapper refuses them too: its noise covers the whole model).
        self.partial_updates = not settings.keep_updates
        self._accumulator = Accumulator(env.num_values, env.tensor_sizes)
        self._spool: UpdateSpool | None = None

    def open(self, opening: Opening) -> None:
        if not opening.fresh:
            return  # a re-opened round keeps what it counted
        n = self.env.num_values
        reuse = self.env.recycler.take(n, np.float32)
        self._accumulator = Accumulator(n, self.env.tensor_sizes, reuse)
        self._close_spool()
        if self.keep_updates:
            self._spool = UpdateSpool(
                self.env.num_values, self.env.uploads.incoming, self.update_metrics
            )

    def accept(self, c: Contribution) -> None:
        self._accumulator.fold(c.staged, c.weight, c.selection, c.scale)
        if self._spool is not None:
            self._spool.append(c.staged, float(c.num_examples), c.metrics)

    async def aggregate(self) -> Aggregate:
        acc, spool = self._accumulator, self._spool
        updates = None
        if spool is not None:
            kept = {k: np.array(v) for k, v in spool.metrics.items()}
            updates = UpdateSet(spool.matrix(), np.array(spool.weights), kept)
        return Aggregate(acc.mean(), acc.count, acc.weight, updates)

    def release(self) -> None:
        self._close_spool()

    def _close_spool(self) -> None:
        if self._spool is not None:
            self._spool.close()
            self._spool = None
