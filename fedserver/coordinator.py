"""The coordinator's brain: global model, round machine, accumulator, store; no gRPC here.

All state changes happen on the asyncio event loop; heavy work (aggregation, checkpointing,
evaluation) runs in a worker thread on immutable inputs and is applied back on the loop.
The servicer (service.py) validates messages and translates the exceptions raised here into
gRPC status codes. Receiving updates is in submissions.py, federated evaluation in
evaluation_rounds.py (both mixed into Coordinator).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedcore import faults
from fedcore.limits import MAX_ROUND_METRICS
from fedcore.logs import format_metrics
from fedcore.selection import Selection, round_selection
from fedcore.tensors import FlatModel
from fedserver.aggregate import (
    Accumulator,
    UpdateSpool,
    spill_key,
)
from fedserver.dp import DPServer
from fedserver.evaluation_rounds import EvaluationRounds
from fedserver.fedeval import EvalCampaign, EvalPolicy
from fedserver.he_rounds import HERounds
from fedserver.messages import (
    Offer,
    TrainingDefaults,
)
from fedserver.metrics import Metrics
from fedserver.rounds import (
    ClosedRound,
    Phase,
    RoundMachine,
    RoundPolicy,
    RoundsExhausted,
)
from fedserver.secure_rounds import SecureRounds
from fedserver.store import ClientReceipt, RoundRecord, StateStore
from fedserver.strategies import AggregateInput, Strategy, UpdateSet
from fedserver.submissions import UpdateIntake
from fedserver.wakeups import Wakeups

log = logging.getLogger("fedserver")


@dataclass
class Coordinator(UpdateIntake, EvaluationRounds):
    store: StateStore
    strategy: Strategy
    policy: RoundPolicy
    model: FlatModel
    defaults: TrainingDefaults = field(default_factory=TrainingDefaults)
    evaluate: Callable[[FlatModel], dict[str, float]] | None = None
    max_update_bytes: int = 4 << 30
    seed: int = 0
    dp: DPServer | None = None
    # "secagg": the coordinator only ever sees masked updates; "he": only ciphertexts and sums
    secure: str = "none"
    secagg_stage_timeout: float = 30.0  # each secure stage's wait for slow clients
    he_public_key: Path | None = None  # --secure he: the public CKKS context
    eval_policy: EvalPolicy = field(default_factory=EvalPolicy)
    rejections: Counter[str] = field(default_factory=Counter)
    metrics: Metrics = field(default_factory=Metrics)

    def __post_init__(self) -> None:
        start = self.store.last_round() + 1
        self.federation_id = self.store.get_meta("federation_id") or uuid.uuid4().hex
        self.machine = RoundMachine(
            self.policy, time.monotonic, random.Random(self.seed + start), round=start
        )
        # Under --encrypt-state, update spills are encrypted with a key that never leaves memory.
        self.spill_key = spill_key(self.store.cipher is not None)
        self._accumulator = Accumulator(self._num_values(), self._tensor_sizes())
        self._spool: UpdateSpool | None = None
        self.campaign: EvalCampaign | None = None
        self._client_metrics: dict[str, dict[str, float]] = {}
        self._available = 0  # live clients when the round opened (DP sample rate)
        self.secure_rounds: SecureRounds | HERounds | None = None
        if self.secure == "secagg":
            self.secure_rounds = SecureRounds(self, self.secagg_stage_timeout)
        elif self.secure == "he":
            if self.he_public_key is None:
                raise ValueError("--secure he needs the public context (--he-public-key)")
            self.secure_rounds = HERounds(self, self.he_public_key, self.secagg_stage_timeout)
        self._streams: Counter[str] = Counter()
        self._uploads = 0  # SubmitUpdate streams being received (submissions.py)
        self._changed = asyncio.Event()  # secure-aggregation stages wait on this
        self._wakeups = Wakeups()  # long-polling GetGlobalModel calls, by client
        self._flush_joins: asyncio.TimerHandle | None = None
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._aggregating: asyncio.Task[None] | None = None
        self.shutting_down = False
        self.failure: str | None = None
        self.told_finished: set[str] = set()
        self.done = asyncio.Event()
        if self.machine.phase is Phase.FINISHED:
            self.done.set()

    def _num_values(self) -> int:
        return sum(t.numel for t in self.model.manifest.floats().tensors)

    def _tensor_sizes(self) -> list[int]:
        return [t.numel for t in self.model.manifest.floats().tensors]

    def round_selection(self) -> Selection:
        """The tensors trained and sent this round (--train-tensors; all by default)."""
        spec = self.defaults.train_tensors
        return round_selection(self.model.manifest.floats(), spec, self.machine.round)

    # ------------------------------------------------------------------ startup
    def initialize_store(self, task_name: str) -> None:
        if self.store.last_round() == 0 and not self.store.checkpoint_path(0).exists():
            self.store.write_checkpoint(0, self.model, self.strategy.state_arrays())
            self.store.publish_model(self.model, 0)
        self.store.set_meta(
            federation_id=self.federation_id,
            total_rounds=self.policy.total_rounds,
            task=task_name,
            strategy=self.strategy.name,
            strategy_params=json.dumps(self.strategy.params(), sort_keys=True),
            status="finished" if self.machine.phase is Phase.FINISHED else "running",
        )

    # ------------------------------------------------------------------ events
    def _notify(self, clients: Collection[str] | None = None) -> None:
        """Something changed: wake the long-polls of `clients` (whose answer changed), or of
        everyone when None. Secure-stage waiters are always woken (only K of them)."""
        event, self._changed = self._changed, asyncio.Event()
        event.set()
        if clients is None:
            self._wakeups.wake_all()
        else:
            self._wakeups.wake(clients)

    def _advance(self) -> None:
        """Let the round machine react to the current time and clients."""
        if self.failure or self.shutting_down:
            return
        try:
            action = self.machine.step()
        except RoundsExhausted as e:
            self.failure = str(e)
            log.error("%s", e)
            self.done.set()
            self._notify()
            return
        if action in ("opened", "reopened"):
            m = self.machine
            verb = "opened" if action == "opened" else f"re-opened (attempt {m.attempts})"
            log.info(
                "round %d/%d %s: %d client(s) selected, deadline in %.0fs",
                m.round,
                self.policy.total_rounds,
                verb,
                len(m.selected),
                self.policy.round_timeout,
            )
            if action == "opened":
                self.metrics.round_opened()
                self._accumulator = Accumulator(self._num_values(), self._tensor_sizes())
                self._open_spool()
                self._client_metrics = {}
                self._available = m.live_count()
            if self.secure_rounds is not None:
                self.secure_rounds.on_open(fresh=action == "opened")
            self._schedule_deadline()
            # Only the selected clients' answer changed: the other N - K keep sleeping.
            self._notify(m.selected)
        elif action == "close":
            closed = self.machine.close()
            self._aggregating = asyncio.get_running_loop().create_task(self._finish_round(closed))

    def _open_spool(self) -> None:
        """Strategies that need every update get them kept on disk, not only folded."""
        if self._spool is not None:
            self._spool.close()
            self._spool = None
        if self.strategy.needs_all_updates:
            self._spool = UpdateSpool(self._num_values(), self.store.dir / "incoming")

    def _schedule_deadline(self) -> None:
        if self._deadline_timer:
            self._deadline_timer.cancel()
        delay = max(0.0, self.machine.deadline - time.monotonic()) + 0.01
        self._deadline_timer = asyncio.get_running_loop().call_later(delay, self._advance)

    def touch(self, client_id: str, properties: dict[str, str] | None = None) -> None:
        self.machine.touch(client_id)
        if properties is not None:
            self.store.record_client(client_id, properties)
            if self._flush_joins is None:  # one write per 0.2 s of Joins, not one per Join
                loop = asyncio.get_running_loop()
                self._flush_joins = loop.call_later(0.2, self._write_joins)
        self._advance()

    def _write_joins(self) -> None:
        self._flush_joins = None
        self.store.flush_clients()

    # ------------------------------------------------------------------ pulling the model
    def state_name(self) -> str:
        if self.shutting_down:
            return "shutting_down"
        if self.failure or self.machine.phase is Phase.FINISHED:
            return "finished"
        if self.machine.phase is Phase.WAITING:
            return "waiting_for_clients"
        return "training"

    def round_config(self) -> dict[str, object]:
        d = self.defaults
        extra = self.strategy.round_config(self.machine.round) | d.mode_extra()
        if d.train_tensors:
            extra["train_tensors"] = ",".join(self.round_selection().names)
        if self.dp is not None:
            extra |= self.dp.round_extra(len(self.machine.selected))
        encoding = d.encoding
        if self.secure_rounds is not None:
            extra |= self.secure_rounds.round_extra(weighted=self.dp is None)
            encoding = self.secure_rounds.encoding
        return {
            "local_epochs": d.local_epochs,
            "lr": d.lr,
            "batch_size": d.batch_size,
            "encoding": encoding,
            "extra": extra,
        }

    def offer(self, client_id: str, known_version: str) -> Offer | None:
        """The answer for this client now, or None if it should keep waiting."""
        state = self.state_name()
        selected = self.machine.expects_update_from(client_id) and state == "training"
        evaluate = self._evaluation_for(client_id)
        decrypt = self.secure_rounds.decryption_for(client_id) if self.secure_rounds else 0
        if state == "finished":
            self.told_finished.add(client_id)
            msg = self.failure or f"training finished after {self.machine.rounds_completed} rounds"
        elif state == "shutting_down":
            msg = "coordinator is shutting down; retry later"
        elif selected:
            msg = f"selected for round {self.machine.round}"
        elif evaluate:
            msg = f"selected to evaluate the model of round {evaluate}"
        elif decrypt:
            msg = f"asked to decrypt the encrypted aggregate of round {decrypt}"
        else:
            return None
        deadline = max(0.0, self.machine.deadline - time.monotonic()) if selected else 0.0
        return Offer(
            state,
            self.machine.round,
            selected,
            self.model,
            (selected or evaluate > 0) and known_version != self.model.version,
            self.round_config(),
            deadline if math.isfinite(deadline) else 0.0,
            msg,
            evaluate,
            decrypt,
        )

    def idle_offer(self, client_id: str) -> Offer:
        m = self.machine
        if m.phase is Phase.WAITING:
            msg = f"waiting for clients: {m.live_count()} of {self.policy.min_clients} live"
        elif client_id in m.receipts:
            msg = f"update for round {m.round} received; waiting for the round to close"
        else:
            msg = f"not selected for round {m.round}; waiting for the next round"
        return Offer(self.state_name(), m.round, False, self.model, False, {}, 0.0, msg)

    async def poll(self, client_id: str, known_version: str, wait: float) -> Offer:
        """Long-poll: answer as soon as there is something for the client, or after `wait`."""
        self.touch(client_id)
        loop = asyncio.get_running_loop()
        until = loop.time() + max(0.0, wait)
        while True:
            offer = self.offer(client_id, known_version)
            remaining = until - loop.time()
            if offer is not None or remaining <= 0:
                return offer or self.idle_offer(client_id)
            await self._wakeups.wait(client_id, remaining)
            self.touch(client_id)

    # ------------------------------------------------------------------ closing rounds
    async def _finish_round(self, closed: ClosedRound) -> None:
        try:
            await self._aggregate_round(closed)
        except Exception as e:
            # Disk full, a strategy bug...: stop rather than hang; the last committed round is
            # intact on disk and a restart resumes from it.
            log.exception("aggregating round %d failed", closed.round)
            self.failure = f"aggregating round {closed.round} failed: {e}"
            self.done.set()
            self._notify()
        finally:
            self._aggregating = None

    async def _aggregate_round(self, closed: ClosedRound) -> None:
        started = time.monotonic()
        if self.secure_rounds is not None:
            mean = await self.secure_rounds.aggregate_mean()
            count, weight = self.secure_rounds.contributed()
        else:
            mean = self._accumulator.mean()
            count, weight = self._accumulator.count, self._accumulator.weight
        metrics = self._client_metric_means(closed)
        if self.dp is not None:
            # Off the event loop: the noise is O(model) and Opacus' ε takes up to 0.5 s.
            mean, dp_metrics = await asyncio.to_thread(
                self.dp.privatize, mean, count, len(self.machine.selected), self._available
            )
            metrics.update(dp_metrics)
        spool = self._spool
        agg = AggregateInput(
            closed.round,
            mean,
            weight,
            count,
            UpdateSet(spool.matrix(), np.array(spool.weights)) if spool is not None else None,
        )
        new_model, eval_metrics = await asyncio.to_thread(self._aggregate_and_save, agg, closed)
        metrics.update(eval_metrics)
        record = RoundRecord(
            closed.round,
            new_model.version,
            len(closed.receipts),
            sum(r.num_examples for r in closed.receipts.values()),
            metrics,
            closed.opened_at,
            closed.closed_at,
            time.monotonic() - closed.opened_at,
            closed.attempts,
        )
        receipts = [
            ClientReceipt(c, r.num_examples, r.digest, self._client_metrics.get(c, {}))
            for c, r in sorted(closed.receipts.items())
        ]
        await asyncio.to_thread(self._commit, record, receipts, new_model)
        self.model = new_model
        self._open_campaign(closed.round, new_model)
        if spool is not None:
            spool.close()
            self._spool = None
        self.machine.complete()
        self.metrics.round_closed(record.participants, record.duration, time.monotonic() - started)
        shown = format_metrics(metrics)
        log.info(
            "round %d/%d closed: %d update(s), %s (aggregated in %.2fs, round %.2fs)",
            closed.round,
            self.policy.total_rounds,
            len(closed.receipts),
            shown or "no metrics",
            time.monotonic() - started,
            record.duration,
        )
        if self.machine.phase is Phase.FINISHED:
            self.store.set_meta(status="finished")
            log.info("training finished: %d rounds", self.machine.rounds_completed)
            self.done.set()
        self._advance()  # opens the next round: wakes its selected clients
        # Everyone else's answer changes only if training ended or an evaluation was asked for.
        everyone = self.campaign is not None or self.machine.phase is Phase.FINISHED
        self._notify(None if everyone else ())

    def _aggregate_and_save(
        self, agg: AggregateInput, closed: ClosedRound
    ) -> tuple[FlatModel, dict[str, float]]:
        faults.freeze("aggregate", closed.round)
        new_model = self.strategy.apply(self.model, agg)
        self.store.write_checkpoint(closed.round, new_model, self.strategy.state_arrays())
        metrics = self.evaluate(new_model) if self.evaluate else {}
        return new_model, metrics

    def _commit(self, record: RoundRecord, receipts: list[ClientReceipt], model: FlatModel) -> None:
        faults.freeze("commit", record.round)
        self.store.commit_round(record, receipts)
        self.store.record_traffic(
            record.round, self.metrics.round_bytes_in, self.metrics.round_bytes_out
        )
        self.store.publish_model(model, record.round)

    def _client_metric_means(self, closed: ClosedRound) -> dict[str, float]:
        total: Counter[str] = Counter()
        weight: Counter[str] = Counter()
        for client, receipt in closed.receipts.items():
            for k, v in self._client_metrics.get(client, {}).items():
                total[k] += v * receipt.num_examples
                weight[k] += receipt.num_examples
        # Each client sends at most MAX_METRICS names, but they may all differ: keep the names
        # most examples reported (then by name), so a round's record stays bounded.
        kept = sorted((k for k in total if weight[k]), key=lambda k: (-weight[k], k))
        return {k: total[k] / weight[k] for k in kept[:MAX_ROUND_METRICS]}

    # ------------------------------------------------------------------ shutdown
    async def wait_idle(self) -> None:
        """Wait for an aggregation in progress so its round is committed before exit."""
        if self._aggregating is not None:
            await asyncio.shield(self._aggregating)

    def begin_shutdown(self) -> None:
        self.shutting_down = True
        if self._deadline_timer:
            self._deadline_timer.cancel()
        self._notify()


__all__ = ["Coordinator"]
