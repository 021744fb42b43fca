"""Federated evaluation, the Coordinator's side: who is asked to score which model, and the
reports folded into the round's metrics (mixed into Coordinator; EvalCampaign holds the state)."""

from __future__ import annotations

import logging
import math
import random
from typing import TYPE_CHECKING

from fedcore.logs import format_metrics
from fedcore.tensors import FlatModel
from fedserver.aggregate import BadUpdate
from fedserver.fedeval import EvalCampaign
from fedserver.rounds import StaleRound, SubmitRefused
from fedserver.submissions import MAX_NUM_EXAMPLES

if TYPE_CHECKING:
    from fedserver.coordinator import Coordinator

log = logging.getLogger("fedserver")


class EvaluationRounds:
    campaign: EvalCampaign | None

    def _evaluation_for(self: Coordinator, client_id: str) -> int:
        """The round whose model this client should evaluate now, or 0."""
        c = self.campaign
        if c is None or self.shutting_down or c.version != self.model.version:
            return 0
        return c.round if c.pending(client_id) else 0

    def _open_campaign(self: Coordinator, round_number: int, model: FlatModel) -> None:
        self.campaign = None
        if not self.eval_policy.due(round_number, self.policy.total_rounds):
            return
        live = self.machine.live_clients()
        if not live:
            return
        rng = random.Random(self.seed * 1_000_003 + round_number)
        chosen = self.eval_policy.sample(live, rng)
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
            if c is None or c.version != self.model.version:
                raise StaleRound(
                    f"no federated evaluation is open for round {round_number}; "
                    "pull the current model"
                )
            new = c.accept(client_id, round_number, version, num_examples, metrics)
        except (BadUpdate, SubmitRefused) as e:
            raise self._refuse(e) from None
        if not new:
            return False, f"evaluation of round {round_number} was already counted"
        summary = c.summary()
        self.store.merge_round_metrics(c.round, summary)
        log.info(
            "round %d: federated evaluation %d/%d from %s (%d examples) %s",
            c.round,
            len(c.reports),
            len(c.selected),
            client_id,
            num_examples,
            format_metrics({k: v for k, v in summary.items() if "examples" not in k}),
        )
        self._notify()
        return True, f"evaluation of round {round_number} counted"

    def awaiting_evaluations(self: Coordinator) -> bool:
        """Some live client still owes an evaluation of the current model."""
        live = self.machine.live_clients()
        return any(self._evaluation_for(c) for c in live)
