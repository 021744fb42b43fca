"""What the transports ask the Coordinator beyond polls and submits (coordinator/api.py):
who owes work now, decide a round at once, wait for a change, status. A mixin of
`Coordinator` (lifecycle.py keeps the round lifecycle; these read it or nudge it through its
own steps), so neither transport reaches into the round machine or a private attribute.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Collection, Iterable
from typing import TYPE_CHECKING, Any

from fedserver.coordinator.api import Due, StatusView
from fedserver.rounds.synchronous import Phase

if TYPE_CHECKING:
    from fedserver.rounds.population import Population
    from fedserver.state.history import RoundRecord


class TransportQueries:
    # Provided by Coordinator (a dataclass); declared loosely so the mixin stays a mixin.
    machine: Any
    store: Any
    evaluations: Any
    policy: Any
    model: Any
    update_floats: Any
    failure: str | None
    shutting_down: bool
    federation_id: str
    rejections: Any
    _changed: asyncio.Event

    # ------------------------------------------------------------------ clients
    def touch_all(self, client_ids: Iterable[str]) -> None:
        """Mark many clients live (what their polls would do), then let the round machine
        react once: `touch` per client would step the machine N times. The enlisted
        population itself is touched in O(its departed), not O(N)."""
        last = None
        population = self.machine.population
        if client_ids is population:
            population.revive_all()
            last = population[-1] if len(population) else None
        else:
            for cid in client_ids:
                self.machine.touch(cid)
                last = cid
        if last is not None:
            self.touch(last)  # type: ignore[attr-defined]

    def enlist(self, population: Population) -> None:
        """Clients that are live without a liveness entry each (a simulation's virtual
        clients, rounds/population.py); `touch_all(population)` revives its departed."""
        self.machine.population = population

    def seen_ago(self, client_id: str) -> float | None:
        """Seconds since `client_id` was last heard from, None unless it is live."""
        seen = self.machine.last_seen.get(client_id)
        if seen is None:  # a population's member is live without a timestamp: never silent
            return 0.0 if self.machine.is_live(client_id) else None
        ago: float = self.machine.clock() - seen
        return ago if ago <= self.policy.client_ttl else None

    def live_ids(self) -> Collection[str]:
        """The ids heard from within the liveness window (a view: O(1))."""
        keys: Collection[str] = self.machine.last_seen.keys()
        return keys

    def task_name(self) -> str:
        return self.store.get_meta("task") or "?"

    def base_model(self) -> str:
        """A LoRA task's frozen-base hash (docs/llm.md), "" when the whole model travels."""
        return self.store.get_meta("base_model") or ""

    # ------------------------------------------------------------------ who owes work
    def round_attempt(self) -> tuple[int, int]:
        """(round, attempt): changes whenever a round opens or re-opens."""
        return (self.machine.round, self.machine.attempts)

    def training_due(self, exclude: Collection[str]) -> Due | None:
        """The selected clients that still owe an update this round (not in `exclude`)."""
        m = self.machine
        if m.phase is not Phase.COLLECTING or self.shutting_down:
            return None
        todo = sorted(
            cid for cid in m.selected if m.expects_update_from(cid) and cid not in exclude
        )
        if not todo:
            return None
        offer = self.offer(todo[0], "")  # type: ignore[attr-defined]
        if offer is None or not offer.selected:
            return None
        return Due(offer, m.round, todo)

    def pull_due(self, client_ids: Collection[str]) -> Due | None:
        """Asynchronous rounds select nobody: these clients poll for the model, as each would
        when free; those handed it (and a lease) are due an update, in client-id order."""
        m = self.machine
        if m.phase is not Phase.COLLECTING or self.shutting_down:
            return None
        first, todo = None, []
        for cid in sorted(client_ids):
            offer = self.offer(cid, "")  # type: ignore[attr-defined]
            if offer is not None and offer.selected:
                first = first or offer
                todo.append(cid)
        return Due(first, m.round, todo) if first is not None else None

    def evaluation_round(self) -> int:
        """The round whose model clients are evaluating now, or 0."""
        campaign = self.evaluations.campaign
        return campaign.round if campaign is not None else 0

    def evaluation_due(self, exclude: Collection[str]) -> Due | None:
        """The clients that still owe an evaluation of the current model (not in `exclude`)."""
        campaign = self.evaluations.campaign
        if campaign is None or campaign.version != self.model.version:
            return None
        todo = sorted(
            cid for cid in campaign.selected if campaign.pending(cid) and cid not in exclude
        )
        if not todo:
            return None
        offer = self.offer(todo[0], "")  # type: ignore[attr-defined]
        if offer is None or not offer.evaluate_round:
            return None
        return Due(offer, campaign.round, todo)

    # ------------------------------------------------------------------ updates, evaluations
    def max_update_tensors(self) -> int:
        """No update lists more tensors than the model has, or than the strategy adds to its
        floats (SCAFFOLD's Δc); codecs pack into 2 at least."""
        return max(len(self.model.manifest.tensors), len(self.update_floats.tensors), 2)

    def submit_evaluation(
        self,
        client_id: str,
        round_number: int,
        model_version: str,
        num_examples: int,
        metrics: dict[str, float],
    ) -> tuple[bool, str]:
        """Fold one evaluation: (new, message); raises BadUpdate or SubmitRefused."""
        result: tuple[bool, str] = self.evaluations.submit_evaluation(
            client_id, round_number, model_version, num_examples, metrics
        )
        return result

    # ------------------------------------------------------------------ time and state
    def decide_now(self, ran: Collection[str]) -> bool:
        """Every client selected in this attempt has reported or ran without reporting (it
        failed, or its update was refused): nothing more can arrive. Whatever the round's
        deadline would decide (close on a quorum, re-open for others, give up after
        --max-attempts), decide it now instead of idling out --round-timeout. True when that
        changed something; False, doing nothing, when no round is collecting or some selected
        client has not run yet."""
        m = self.machine
        if m.phase is not Phase.COLLECTING or self.shutting_down or self.failure:
            return False
        if any(m.expects_update_from(cid) and cid not in ran for cid in m.selected):
            return False
        before = (m.round, m.attempts, m.phase, self.failure)
        m.deadline = min(m.deadline, m.clock())
        self._advance()  # type: ignore[attr-defined]
        return (m.round, m.attempts, m.phase, self.failure) != before

    async def wait_change(self, timeout: float) -> None:
        """Until the coordinator's state changes (a round opens or closes) or `timeout`."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)

    def status(self) -> StatusView:
        m = self.machine
        return StatusView(
            state=self.state_name(),  # type: ignore[attr-defined]
            round=m.round,
            total_rounds=self.policy.total_rounds,
            rounds_completed=m.rounds_completed,
            live_clients=m.live_count(),
            updates_received=len(m.receipts),
            updates_expected=m.expected_updates,
            federation_id=self.federation_id,
            rejections=dict(self.rejections),
            failure=self.failure or "",
        )

    def recent_rounds(self, limit: int) -> tuple[list[RoundRecord], int]:
        """The last `limit` rounds (oldest first) and how many rounds there are in all,
        counting the one published whose commit is still running (its record is final)."""
        rounds, total = self.store.recent_rounds(limit)
        pending = self.publisher.uncommitted  # type: ignore[attr-defined]
        if pending is not None and (not rounds or rounds[-1].round < pending.round):
            rounds, total = [*rounds, pending][-limit:] if limit > 0 else [], total + 1
        return rounds, total
