"""From a closed round to the next published model: the protocol's aggregate (with what it
records, e.g. DP's ε), the strategy's server step, evaluation, then (in the background, while
the next round runs) checkpoint and commit. No gRPC and no round machine: the Coordinator hands
over a closed round and gets back the new model, its record and the save to run."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

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

T = TypeVar("T")


async def off_loop(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` in a worker thread, like asyncio.to_thread, but holding no reference to
    `args` once it returns. to_thread's work item keeps them until the worker thread gets round
    to dropping it, which can be after the event loop has gone on: the model a round replaced
    then still looked in use to PageRecycler.take, and one round in two summed into fresh
    pages (26 % of the coordinator's CPU at 600M, the kernel zeroing them)."""
    box = [args]
    del args

    def call() -> T:
        return fn(*box.pop())

    return await asyncio.to_thread(call)


@dataclass
class RoundPublisher:
    store: StateStore
    strategy: Strategy
    protocol: RoundProtocol
    metrics: Metrics
    evaluate: Callable[[FlatModel], dict[str, float]] | None = None
    tracker: RoundTracker | None = None  # --track (fedserver/coordinator/tracking.py)
    # The record of a round published but not yet committed (its save is running), if any,
    # and its receipts: what the state dir will say once it is.
    uncommitted: RoundRecord | None = None
    _uncommitted_receipts: tuple[ClientReceipt, ...] = ()

    def merge_round_metrics(self, round_number: int, metrics: dict[str, float]) -> None:
        """Add metrics to a round's record (federated evaluation reports come after it): the
        store's row once committed, else the record its commit will write. Under the store's
        lock, which commit_round holds while it writes the record: none is lost between."""
        with self.store.lock:
            pending = self.uncommitted
            if pending is not None and pending.round == round_number > self.store.last_round():
                pending.metrics.update(metrics)
                return
            self.store.merge_round_metrics(round_number, metrics)

    def receipt_digest(self, round_number: int, client_id: str) -> str | None:
        """store.receipt_digest, also seeing the round whose commit is still running (a client
        retrying an update whose reply it lost gets its duplicate answer meanwhile too)."""
        if self.uncommitted is not None and self.uncommitted.round >= round_number:
            for r in self._uncommitted_receipts:
                if r.client_id == client_id and r.base_round == round_number:
                    return r.sha256
        return self.store.receipt_digest(round_number, client_id)

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
    ) -> tuple[FlatModel, RoundRecord, Coroutine[Any, Any, None]]:
        """Aggregate, step and evaluate `closed`; heavy work runs off the event loop. Returns
        the new model, its record, and `save`: the coroutine that checkpoints and commits the
        round. The caller runs `save` in the background while the next round's clients download
        the new model (a 2.4 GB checkpoint took a second on the round's critical path), and
        awaits it before the next publish: rounds commit in order, each after its checkpoint.
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
        new_model, eval_metrics, state = await off_loop(self._step, model, agg)
        self.protocol.release()
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
        # The round's traffic now: the next round's opening resets the counters.
        traffic = (self.metrics.round_bytes_in, self.metrics.round_bytes_out)
        self.uncommitted, self._uncommitted_receipts = record, tuple(receipts)
        return new_model, record, self._save(record, receipts, new_model, state, traffic)

    def _step(
        self, model: FlatModel, agg: AggregateInput
    ) -> tuple[FlatModel, dict[str, float], dict[str, np.ndarray]]:
        faults.freeze("aggregate", agg.round)
        new_model = self.strategy.apply(model, agg)
        _ = new_model.version, new_model.checksum  # cached off the event loop: headers carry them
        metrics = self.evaluate(new_model) if self.evaluate else {}
        # Taken with the model they belong to (copies): what this round's checkpoint holds.
        return new_model, metrics, self.state_arrays()

    async def _save(
        self,
        record: RoundRecord,
        receipts: list[ClientReceipt],
        model: FlatModel,
        state: dict[str, np.ndarray],
        traffic: tuple[int, int],
    ) -> None:
        try:
            # off_loop: this model is retired in a later round, its pages then taken if free.
            await off_loop(self.store.write_checkpoint, record.round, model, state)
            await off_loop(self._commit, record, receipts, model, traffic)
        finally:
            if self.uncommitted is record:
                self.uncommitted, self._uncommitted_receipts = None, ()

    def _commit(
        self,
        record: RoundRecord,
        receipts: list[ClientReceipt],
        model: FlatModel,
        traffic: tuple[int, int],
    ) -> None:
        faults.freeze("commit", record.round)
        self.store.commit_round(record, receipts)
        bytes_in, bytes_out = traffic
        self.store.record_traffic(record.round, bytes_in, bytes_out)
        self.store.publish_model(model, record.round)
        if self.tracker is not None:  # queued for the tracker's thread: never waits
            self.tracker.round_committed(record, bytes_in, bytes_out)
