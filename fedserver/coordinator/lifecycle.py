"""The coordinator's brain: global model, round lifecycle, store; no gRPC here.

All state changes happen on the asyncio event loop; heavy work (aggregation, checkpointing,
evaluation) runs in a worker thread on immutable inputs and is applied back on the loop.
The servicer (service.py) validates messages and translates the exceptions raised here into
gRPC status codes. The Coordinator owns, and hands each only what it needs: one round protocol
(fedserver/protocols: how contributions become the aggregate), the update intake
(submissions.py), federated evaluation (evaluation_rounds.py) and the publisher that turns a
closed round into the next model (publishing.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable, Collection, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedcore.durable import PageRecycler
from fedcore.logs import format_metrics
from fedcore.selection import Selection, round_selection
from fedcore.tensors import FlatModel
from fedserver.coordinator.federated_eval import EvaluationRounds
from fedserver.coordinator.liveness import LivenessWatch
from fedserver.coordinator.offers import TrainingDefaults
from fedserver.coordinator.polls import ModelOffers
from fedserver.coordinator.publishing import RoundPublisher
from fedserver.coordinator.queries import TransportQueries
from fedserver.coordinator.submissions import UpdateIntake
from fedserver.coordinator.wakeups import Wakeups
from fedserver.modes.base import RoundMode
from fedserver.modes.synchronous import FedAvg
from fedserver.protocols.base import (
    Opening,
    ProtocolEnv,
    ProtocolSettings,
    ProtocolWrapper,
    RoundProtocol,
)
from fedserver.protocols.registry import build_protocol, update_manifest
from fedserver.protocols.secagg_stages import SecAggFailed
from fedserver.rounds.eval_campaign import EvalPolicy
from fedserver.rounds.synchronous import ClosedRound, Phase, RoundPolicy, RoundsExhausted
from fedserver.state.metrics import Metrics
from fedserver.state.store import StateStore
from fedserver.strategies import Strategy
from fedserver.updates.messages import PendingSubmit, SubmitHeader, SubmitResult
from fedserver.updates.receiver import MAX_UPDATE_VALUE, spill_key
from fedserver.updates.uploads import Uploads

log = logging.getLogger("fedserver")
EARLIER_CLIENTS_REMEMBERED = 10_000  # newest Joins a restarted coordinator waits to tell


@dataclass
class Coordinator(ModelOffers, TransportQueries):  # implements coordinator/api.py's CoordinatorAPI
    store: StateStore
    strategy: Strategy
    policy: RoundPolicy
    model: FlatModel
    defaults: TrainingDefaults = field(default_factory=TrainingDefaults)
    evaluate: Callable[[FlatModel], dict[str, float]] | None = None
    max_update_bytes: int = 4 << 30
    max_update_value: float = MAX_UPDATE_VALUE  # --max-update-value (updates/receiver.py)
    seed: int = 0
    # Around the protocol, handed to its registry as they are (--dp-clip: protocols/dp.py).
    protocol_wrappers: tuple[ProtocolWrapper, ...] = ()
    # The round protocol (fedserver/protocols/registry.py), from the --secure flag: "none";
    # "secagg": the coordinator only ever sees masked updates; "he": only ciphertexts and sums
    secure: str = "none"
    secagg_stage_timeout: float = 30.0  # each secure stage's wait for slow clients
    he_public_key: Path | None = None  # --secure he: the public CKKS context
    eval_policy: EvalPolicy = field(default_factory=EvalPolicy)
    mode: RoundMode = field(default_factory=FedAvg)  # --mode: how rounds run (fedserver/modes)
    rejections: Counter[str] = field(default_factory=Counter)
    metrics: Metrics = field(default_factory=Metrics)
    clock: Callable[[], float] = time.monotonic  # round deadlines and liveness (tests inject)
    # `clock` is a simulated fleet's (fedserver/simulation/clock.py): rounds record its seconds
    # (RoundRecord.fleet_seconds) beside the host's.
    fleet_time: bool = False

    def __post_init__(self) -> None:
        start = self.store.last_round() + 1
        # What an update carries: the model's floats, what the strategy adds (SCAFFOLD's Δc),
        # then what a protocol wrapper adds (adaptive DP clipping's masked bit under secagg/he).
        settings = ProtocolSettings(
            self.mode.protocol(self.secure),
            keep_updates=self.strategy.needs_all_updates,
            update_metrics=self.strategy.update_metrics,
            partial_rounds=bool(self.defaults.train_tensors),
            stage_timeout=self.secagg_stage_timeout,
            he_public_key=self.he_public_key,
            **self.mode.protocol_settings(),
        )
        self.update_floats = update_manifest(
            settings, self.strategy.exchanged(self.model.manifest.floats()), self.protocol_wrappers
        )
        self.federation_id = self.store.get_meta("federation_id") or uuid.uuid4().hex
        self.machine = self.mode.machine(
            self.policy,
            clock=self.clock,
            rng=random.Random(self.seed + start),
            round=start,
            joined=self.store.has_joined,
        )
        self._changed = asyncio.Event()  # secure-aggregation stages wait on this
        self._wakeups = Wakeups()  # long-polling GetGlobalModel calls, by client
        self._flush_joins: asyncio.TimerHandle | None = None
        self.recycler = PageRecycler()
        # Under --encrypt-state, update spills are encrypted with a key that never leaves memory.
        key = spill_key(self.store.cipher is not None)
        self.uploads = Uploads(
            self.store.dir / "incoming", key, self.metrics, self.rejections, self.max_update_value
        )
        self.protocol: RoundProtocol = build_protocol(
            settings,
            ProtocolEnv(
                self.update_floats,
                self.federation_id,
                self.uploads,
                self.clock,
                lambda: self.machine.round,
                self.machine.live_clients,
                self.touch,
                self._notify,
                lambda: self._changed,
                lambda: self.machine.selected,
                lambda: self.machine.expected_updates,
                self._drawn_from,
                self.recycler,
            ),
            self.protocol_wrappers,
        )
        self.publisher = RoundPublisher(
            self.store, self.strategy, self.protocol, self.metrics, self.evaluate
        )
        self.intake = UpdateIntake(
            self.uploads,
            self.machine,
            self.protocol,
            self.base_version,
            self.round_selection,
            self.publisher.receipt_digest,
            self.touch,
            self._advance,
            self.max_update_bytes,
            strategy_name=self.strategy.name,
            check_metrics=self.strategy.check_update_metrics,
            strategy_partial=self.strategy.partial_updates,
        )
        self.evaluations = EvaluationRounds(
            self.eval_policy,
            self.policy.total_rounds,
            self.seed,
            self.publisher.merge_round_metrics,
            self.machine.live_clients,
            lambda: self.model.version,
            self.uploads.refuse,
            self._notify,
        )
        self.liveness = LivenessWatch(
            self.machine, self.clock, self._advance, self.policy.total_rounds
        )
        self._available = 0  # live clients when the round opened (drawn_from)
        self._host_opened: float | None = None  # time.monotonic() then, under fleet_time
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._aggregating: asyncio.Task[None] | None = None
        # The last published round's checkpoint and commit, running while the next round does.
        self._saving: asyncio.Task[None] | None = None
        self.shutting_down = False
        self.failure: str | None = None
        self.told_finished: set[str] = set()
        # Clients of an earlier run of this state dir (a restart): the linger tells them too,
        # though this process has not heard from them yet (they may be in reconnect back-off).
        self.earlier_clients: set[str] = set()
        self.done = asyncio.Event()
        if self.machine.phase is Phase.FINISHED:
            self.done.set()

    def base_version(self, round_number: int) -> str | None:
        """The model an update for `round_number` must be based on: the one after the round
        before (older than the current round only under asynchronous aggregation)."""
        if round_number == self.machine.round:
            return self.model.version
        return self.store.model_version_after(round_number - 1)

    def round_selection(self, round_number: int | None = None) -> Selection:
        """The tensors trained and sent in a round (--train-tensors; all by default): the
        current one, or an update's base round (under async the group it was trained on)."""
        spec = self.defaults.train_tensors
        at = self.machine.round if round_number is None else round_number
        return round_selection(self.update_floats, spec, at)

    # ------------------------------------------------------------------ startup
    def initialize_store(self, task_name: str) -> None:
        self.earlier_clients = set(self.store.recent_clients(EARLIER_CLIENTS_REMEMBERED))
        _ = self.model.checksum  # cached before serving: every model header carries it
        if self.store.last_round() == 0 and not self.store.checkpoint_path(0).exists():
            self.store.write_checkpoint(0, self.model, self.publisher.state_arrays())
            self.store.publish_model(self.model, 0)
            self.store.set_meta(initial_version=self.model.version)
        self.store.set_meta(
            federation_id=self.federation_id,
            total_rounds=self.policy.total_rounds,
            task=task_name,
            strategy=self.strategy.name,
            strategy_params=json.dumps(self.strategy.params(), sort_keys=True),
            status="finished" if self.machine.phase is Phase.FINISHED else "running",
            failure="",  # a resumed run that gave up before is running again
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
            self.liveness.after_step("exhausted")  # who sent nothing, before giving up
            self._fail(str(e))
            return
        self.liveness.after_step(action)
        if action in ("opened", "reopened"):
            m = self.machine
            verb = "opened" if action == "opened" else f"re-opened (attempt {m.attempts})"
            log.info("round %d/%d %s: %s", m.round, self.policy.total_rounds, verb, m.describe())
            if action == "opened":
                self.metrics.round_opened()
                self.intake.client_metrics = {}
                self._available = m.live_count()
                self._host_opened = time.monotonic() if self.fleet_time else None
            self.protocol.open(Opening(m.round, m.selected, fresh=action == "opened"))
            self._schedule_deadline()
            # Only these clients' answer changed (the selected ones; under async those that
            # waited for a buffer to open): the others keep sleeping.
            self._notify(m.woken())
        elif action == "wake":  # training slots came free: as many waiters as slots
            self._notify(self.machine.woken())
        elif action == "close" and self.protocol.can_close():
            closed = self.machine.close()
            self._aggregating = asyncio.get_running_loop().create_task(self._finish_round(closed))

    def _schedule_deadline(self) -> None:
        if self._deadline_timer:
            self._deadline_timer.cancel()
        delay = max(0.0, self.machine.deadline - self.clock()) + 0.01
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

    # ------------------------------------------------------------------ closing rounds
    async def _finish_round(self, closed: ClosedRound) -> None:
        try:
            await self._aggregate_round(closed)
        except SecAggFailed as e:
            # Clients caused it (too few survivors, no key holder's decryption accepted): an
            # expected event, one line with the reason, never a traceback.
            self._fail(f"aggregating round {closed.round} failed: {e}")
        except Exception as e:
            # Disk full, a strategy bug...: stop rather than hang; the last committed round is
            # intact on disk and a restart resumes from it.
            log.exception("aggregating round %d failed", closed.round)
            self._fail(f"aggregating round {closed.round} failed: {e}")
        finally:
            self._aggregating = None

    def _drawn_from(self) -> int:
        """How many clients the round's participants were drawn from at random (ProtocolEnv).
        A buffer filled by whoever finishes first was not drawn at random: its own size, so
        DP amplification by sampling is not claimed for it (q = 1)."""
        m = self.machine
        return self._available if m.samples_clients_at_random else m.expected_updates

    async def _aggregate_round(self, closed: ClosedRound) -> None:
        started = time.monotonic()
        await self.wait_saved()  # rounds commit in order: the one before first
        if self.failure is not None:
            return  # its save failed: the coordinator is stopping
        metrics = self.intake.metric_means(closed.receipts)
        metrics.update(self.machine.closing_metrics(closed))
        receipts = self.intake.client_receipts(closed.receipts, closed.round)
        new_model, record, save = await self.publisher.publish(
            self.model,
            closed,
            metrics,
            receipts,
            population=self._drawn_from(),
            host_opened=self._host_opened,
        )
        self._saving = asyncio.get_running_loop().create_task(self._save_round(closed.round, save))
        if closed.round >= self.policy.total_rounds:
            # The last round: clients hear "finished" only once it is committed.
            await self.wait_saved()
            if self.failure is not None:
                return
        self.recycler.retire(self.model.buffer)  # the next round sums into it if it is free
        self.model = new_model
        self.evaluations.open_campaign(closed.round, new_model)
        self.machine.complete()
        self.metrics.round_closed(record.participants, record.duration, time.monotonic() - started)
        shown = format_metrics(record.metrics)
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
        self.recycler.release()  # whatever its opening did not take
        # Everyone else's answer changes only if training ended or an evaluation was asked for.
        everyone = self.evaluations.campaign is not None or self.machine.phase is Phase.FINISHED
        self._notify(None if everyone else ())

    async def _save_round(self, round_number: int, save: Coroutine[Any, Any, None]) -> None:
        try:
            await save
        except Exception as e:
            # Disk full...: stop; the round before is committed and a restart redoes this one.
            log.exception("saving round %d failed", round_number)
            self._fail(f"saving round {round_number} failed: {e}")

    async def wait_saved(self) -> None:
        """Until the last published round is committed (its checkpoint on disk)."""
        if self._saving is not None:
            await asyncio.shield(self._saving)

    def _fail(self, why: str) -> None:
        """Give up: `failed` (and why) in the state dir, so `fedserver status` says so after
        the process is gone; clients are told on their next poll."""
        self.failure = why
        log.error("%s", why)
        self.liveness.close()
        self.store.set_meta(status="failed", failure=why)
        self.done.set()
        self._notify()

    # ------------------------------------------------------------------ updates and evaluations
    async def settled(self) -> None:
        """Under asynchronous aggregation, wait out a buffer being applied: an update arriving
        meanwhile counts in the next buffer a moment later instead of being refused."""
        while self.machine.holds_submits_while_aggregating and self._aggregating is not None:
            await asyncio.shield(self._aggregating)

    def begin_submit(self, header: SubmitHeader) -> PendingSubmit:
        return self.intake.begin_submit(header)

    def finish_submit(self, pending: PendingSubmit, digest: str) -> SubmitResult:
        return self.intake.finish_submit(pending, digest)

    def abort_submit(self, pending: PendingSubmit) -> None:
        self.uploads.abort(pending)

    def reject(self, exc: Exception) -> Exception:
        return self.uploads.refuse(exc)

    def untold_clients(self) -> set[str]:
        """Who has not heard that training finished: the live clients and, after a restart,
        those of the run before (the linger waits for them, up to --linger)."""
        self.machine.live_count()  # expires the silent ones; live_clients() would also sort
        return (self.machine.last_seen.keys() | self.earlier_clients) - self.told_finished

    def awaiting_evaluations(self) -> bool:
        """Some live client still owes an evaluation of the current model."""
        return not self.shutting_down and self.evaluations.awaiting()

    # ------------------------------------------------------------------ shutdown
    async def wait_idle(self) -> None:
        """Wait for an aggregation in progress so its round is committed before exit."""
        if self._aggregating is not None:
            await asyncio.shield(self._aggregating)
        await self.wait_saved()

    async def shut_down(self) -> None:
        """Ctrl-C or SIGTERM: refuse new work, commit the round being aggregated, then stop."""
        log.info("stop requested: finishing the round being aggregated, then shutting down")
        self.shutting_down = True
        if self._deadline_timer:
            self._deadline_timer.cancel()
        self.liveness.close()
        self._notify()
        await self.wait_idle()
        if not self.done.is_set():
            self.store.set_meta(status="stopped")
