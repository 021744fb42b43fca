"""Federated evaluation, the coordinator's side: who is asked to score which model, and the
reports folded into the round's metrics (owned by the Coordinator; EvalCampaign holds the state)."""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fedcore.logs import format_metrics
from fedcore.tensors import FlatModel
from fedserver.coordinator.submissions import MAX_NUM_EXAMPLES
from fedserver.coordinator.tracking import RoundTracker
from fedserver.rounds.eval_campaign import EvalCampaign, EvalPolicy
from fedserver.rounds.synchronous import StaleRound, SubmitRefused
from fedserver.updates.receiver import BadUpdate

log = logging.getLogger("fedserver")


@dataclass
class EvaluationRounds:
    policy: EvalPolicy
    total_rounds: int
    seed: int
    # Merges metrics into a round's record, committed or not yet (RoundPublisher).
    merge_metrics: Callable[[int, dict[str, float]], None]
    live_clients: Callable[[], Sequence[str]]
    model_version: Callable[[], str]  # the current global model's
    refuse: Callable[[Exception], Exception]  # count a refusal by its reason
    notify: Callable[[], None]
    campaign: EvalCampaign | None = None
    tracker: RoundTracker | None = None  # --track (fedserver/coordinator/tracking.py)

    def evaluation_for(self, client_id: str) -> int:
        """The round whose model this client should evaluate now, or 0."""
        c = self.campaign
        if c is None or c.version != self.model_version():
            return 0
        return c.round if c.pending(client_id) else 0

    def open_campaign(self, round_number: int, model: FlatModel) -> None:
        self.campaign = None
        if not self.policy.due(round_number, self.total_rounds):
            return
        live = self.live_clients()
        if not live:
            return
        rng = random.Random(self.seed * 1_000_003 + round_number)
        chosen = self.policy.sample(live, rng)
        self.campaign = EvalCampaign(round_number, model.version, chosen)
        log.info("federated evaluation of round %d: %d client(s) asked", round_number, len(chosen))

    def submit_evaluation(
        self,
        client_id: str,
        round_number: int,
        version: str,
        num_examples: int,
        metrics: dict[str, float],
    ) -> tuple[bool, str]:
        """Fold one client's evaluation; raises BadUpdate or SubmitRefused like updates do."""
        try:
            if not 0 <= num_examples <= MAX_NUM_EXAMPLES:
                raise BadUpdate(
                    f"num_examples must be between 0 and {MAX_NUM_EXAMPLES}, got {num_examples}",
                    reason="bad_num_examples",
                )
            if not all(math.isfinite(v) for v in metrics.values()):
                raise BadUpdate("evaluation metrics contain NaN or Inf", reason="non_finite")
            c = self.campaign
            if c is None or c.version != self.model_version():
                raise StaleRound(
                    f"no federated evaluation is open for round {round_number}; "
                    "pull the current model"
                )
            new = c.accept(client_id, round_number, version, num_examples, metrics)
        except (BadUpdate, SubmitRefused) as e:
            raise self.refuse(e) from None
        if not new:
            return False, f"evaluation of round {round_number} was already counted"
        summary = c.summary()
        self.merge_metrics(c.round, summary)
        if self.tracker is not None:
            self.tracker.evaluated(c.round, summary)
        log.info(
            "round %d: federated evaluation %d/%d from %s (%d examples) %s",
            c.round,
            len(c.reports),
            len(c.selected),
            client_id,
            num_examples,
            format_metrics({k: v for k, v in summary.items() if "examples" not in k}),
        )
        self.notify()
        return True, f"evaluation of round {round_number} counted"

    def awaiting(self) -> bool:
        """Some live client still owes an evaluation of the current model."""
        return any(self.evaluation_for(c) for c in self.live_clients())
