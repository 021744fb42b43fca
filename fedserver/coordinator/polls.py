"""What a polling client is answered: the round config, the offer (train, evaluate, decrypt,
or finished) and the long-poll that waits for one. A mixin of `Coordinator` (lifecycle.py keeps
the round lifecycle; this reads it, and hands out the training leases a round machine counts).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Any

from fedserver.coordinator.offers import Offer
from fedserver.rounds.synchronous import Phase


class ModelOffers:
    # Provided by Coordinator (a dataclass); declared loosely so the mixin stays a mixin.
    machine: Any
    defaults: Any
    strategy: Any
    protocol: Any
    evaluations: Any
    policy: Any
    model: Any
    liveness: Any
    clock: Any
    failure: str | None
    shutting_down: bool
    told_finished: set[str]
    _wakeups: Any
    touch: Callable[..., None]
    round_selection: Callable[..., Any]

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
        extra |= self.protocol.round_extra()
        return {
            "local_epochs": d.local_epochs,
            "lr": d.lr,
            "batch_size": d.batch_size,
            "encoding": self.protocol.encoding or d.encoding,
            "extra": extra,
        }

    def offer(self, client_id: str, known_version: str) -> Offer | None:
        """The answer for this client now, or None if it should keep waiting."""
        state = self.state_name()
        selected = self.machine.expects_update_from(client_id) and state == "training"
        if selected:
            self.machine.lease(client_id)
        evaluate = 0 if self.shutting_down else self.evaluations.evaluation_for(client_id)
        decrypt = self.protocol.decryption_for(client_id)
        if state == "finished":
            self._told_finished(client_id)
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
        deadline = max(0.0, self.machine.deadline - self.clock()) if selected else 0.0
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
            self.strategy.client_tensors(self.model) if selected else None,
        )

    def _told_finished(self, client_id: str) -> None:
        """Remember who heard that training finished (the linger waits for the live rest),
        bounded by the live clients: ids that went quiet are dropped once the set outgrows
        twice their number (amortized O(1) per call, however many ids an attacker makes up)."""
        told = self.told_finished
        told.add(client_id)
        if len(told) > 2 * self.machine.live_count() + 16:
            told.intersection_update(self.machine.last_seen.keys())

    def idle_offer(self, client_id: str) -> Offer:
        m = self.machine
        if m.phase is Phase.WAITING:
            msg = f"waiting for clients: {m.live_count()} of {self.policy.min_clients} live"
        elif client_id in m.receipts:
            msg = f"update for round {m.round} received; waiting for the round to close"
        elif reason := m.waiting_reason(client_id):
            msg = reason
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
            # A waiting client stays live: it is re-touched at least every third of the timeout.
            await self._wakeups.wait(client_id, min(remaining, self.liveness.heartbeat_interval()))
            self.touch(client_id)
