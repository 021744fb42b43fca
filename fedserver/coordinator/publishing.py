"""From a closed round to the next published model: the protocol's aggregate (with what it
records, e.g. DP's ε), the strategy's server step, evaluation, checkpoint and commit. No gRPC
and no round machine: the Coordinator hands over a closed round and gets back the new model
and its record."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fedcore import faults
from fedcore.tensors import FlatModel
from fedserver.coordinator.tracking import RoundTracker
from fedserver.protocols.base import RoundProtocol
from fedserver.rounds.synchronous import ClosedRound
from fedserver.state.history import ClientReceipt, RoundRecord
from fedserver.state.metrics import Metrics
from fedserver.state.store import StateStore
from fedserver.strategies import AggregateInput, Strategy

PROTOCOL_STATE = "protocol."  # prefix of the protocol's arrays in the strategy-state file


@dataclass
class RoundPublisher:
    store: StateStore
    strategy: Strategy
    protocol: RoundProtocol
    metrics: Metrics
    evaluate: Callable[[FlatModel], dict[str, float]] | None = None
    tracker: RoundTracker | None = None  # --track (fedserver/coordinator/tracking.py)

    def state_arrays(self) -> dict[str, np.ndarray]:
        """What a checkpoint carries besides the model: the strategy's and the protocol's state."""
        extra = {PROTOCOL_STATE + k: v for k, v in self.protocol.state_arrays().items()}
        return self.strategy.state_arrays() | extra

    async def publish(
        self,
        model: FlatModel,
        closed: ClosedRound,
        metrics: dict[str, float],
        receipts: list[ClientReceipt],
        population: int = 0,
        host_opened: float | None = None,
    ) -> tuple[FlatModel, RoundRecord]:
        """Aggregate, step, checkpoint and commit `closed`; heavy work runs off the event loop.
        `population`: the live clients the round drew from (AggregateInput.population).
        `host_opened`: time.monotonic() when the round opened, when the round machine's clock
        is a simulated fleet's: `closed` is then in fleet time, recorded as fleet_seconds."""
        aggregate = await self.protocol.aggregate()
        mean, count = aggregate.mean, aggregate.count
        metrics = dict(metrics)
        metrics.update(aggregate.metrics)
        agg = AggregateInput(
            closed.round, mean, aggregate.weight, count, aggregate.updates, population
        )
        new_model, eval_metrics = await asyncio.to_thread(self._step_and_save, model, agg)
        metrics.update(eval_metrics)
        record = RoundRecord(
            closed.round,
            new_model.version,
            len(closed.receipts),
            sum(r.num_examples for r in closed.receipts.values()),
            metrics,
            closed.opened_at,
            closed.closed_at,
            time.monotonic() - (closed.opened_at if host_opened is None else host_opened),
            closed.attempts,
            None if host_opened is None else closed.closed_at - closed.opened_at,
        )
        await asyncio.to_thread(self._commit, record, receipts, new_model)
        self.protocol.release()
        return new_model, record

    def _step_and_save(
        self, model: FlatModel, agg: AggregateInput
    ) -> tuple[FlatModel, dict[str, float]]:
        faults.freeze("aggregate", agg.round)
        new_model = self.strategy.apply(model, agg)
        _ = new_model.checksum  # cached here, off the event loop: every model header carries it
        self.store.write_checkpoint(agg.round, new_model, self.state_arrays())
        metrics = self.evaluate(new_model) if self.evaluate else {}
        return new_model, metrics

    def _commit(self, record: RoundRecord, receipts: list[ClientReceipt], model: FlatModel) -> None:
        faults.freeze("commit", record.round)
        self.store.commit_round(record, receipts)
        bytes_in, bytes_out = self.metrics.round_bytes_in, self.metrics.round_bytes_out
        self.store.record_traffic(record.round, bytes_in, bytes_out)
        self.store.publish_model(model, record.round)
        if self.tracker is not None:  # queued for the tracker's thread: never waits
            self.tracker.round_committed(record, bytes_in, bytes_out)
