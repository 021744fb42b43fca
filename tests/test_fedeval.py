"""Federated evaluation bookkeeping: who is asked, how reports fold, where they are stored."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from fedserver.coordinator.publishing import RoundPublisher
from fedserver.rounds.eval_campaign import EvalCampaign, EvalPolicy
from fedserver.rounds.synchronous import NotSelected, StaleRound
from fedserver.state.history import ClientReceipt, RoundRecord
from fedserver.state.store import StateStore

pytestmark = pytest.mark.timeout(30)


def test_policy_is_due_every_k_rounds_and_for_the_final_model() -> None:
    policy = EvalPolicy(every=3)
    assert [r for r in range(0, 11) if policy.due(r, 10)] == [3, 6, 9, 10]
    assert not any(EvalPolicy(every=0).due(r, 10) for r in range(11))


def test_policy_samples_a_fraction_of_live_clients_at_least_one() -> None:
    live = [f"c{i}" for i in range(10)]
    assert len(EvalPolicy(1, 0.3).sample(live, random.Random(0))) == 3
    assert len(EvalPolicy(1, 0.01).sample(live, random.Random(0))) == 1
    assert EvalPolicy(1, 1.0).sample(live, random.Random(0)) == frozenset(live)
    with pytest.raises(ValueError, match="fraction-evaluate"):
        EvalPolicy(1, 0.0)


def test_campaign_folds_example_weighted_means() -> None:
    c = EvalCampaign(4, "v4", frozenset({"a", "b", "c"}))
    assert c.accept("a", 4, "v4", 30, {"accuracy": 0.9, "loss": 0.3})
    assert c.accept("b", 4, "v4", 10, {"accuracy": 0.5, "loss": 1.1})
    assert c.accept("c", 4, "v4", 0, {})  # no test data: counted as answered, weighs nothing
    assert not c.accept("a", 4, "v4", 30, {"accuracy": 0.9, "loss": 0.3})  # retry
    assert c.summary() == pytest.approx(
        {
            "fed_accuracy": (30 * 0.9 + 10 * 0.5) / 40,
            "fed_loss": (30 * 0.3 + 10 * 1.1) / 40,
            "fed_examples": 40.0,
            "fed_clients": 2.0,
        }
    )
    assert not c.pending("a") and not c.pending("zed")


def test_campaign_refuses_stale_and_unselected_reports() -> None:
    c = EvalCampaign(4, "v4", frozenset({"a"}))
    with pytest.raises(StaleRound, match="round 3 is closed"):
        c.accept("a", 3, "v3", 5, {})
    with pytest.raises(StaleRound):
        c.accept("a", 4, "other-version", 5, {})
    with pytest.raises(NotSelected):
        c.accept("b", 4, "v4", 5, {})


def test_store_merges_federated_metrics_into_a_committed_round(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.commit_round(RoundRecord(1, "v1", 2, 20, {"accuracy": 0.8}, 0.0, 1.0, 1.0, 1), [])
    store.merge_round_metrics(1, {"fed_accuracy": 0.75})
    store.merge_round_metrics(1, {"fed_accuracy": 0.7, "fed_examples": 9.0})
    assert store.rounds()[0].metrics == {
        "accuracy": 0.8,
        "fed_accuracy": 0.7,
        "fed_examples": 9.0,
    }
    with pytest.raises(KeyError):
        store.merge_round_metrics(2, {"fed_accuracy": 0.1})


def test_a_round_whose_commit_is_still_running_gets_its_metrics_and_answers_retries(
    tmp_path: Path,
) -> None:
    """The coordinator commits a round in the background while the next one runs: federated
    evaluation reports and retried updates of that round meanwhile must not be lost."""
    store = StateStore(tmp_path)
    publisher = RoundPublisher(store, None, None, None)  # type: ignore[arg-type]
    record = RoundRecord(1, "v1", 1, 10, {"accuracy": 0.8}, 0.0, 1.0, 1.0, 1)
    receipt = ClientReceipt("a", 10, "xxh3_128:ab", {}, 1)
    publisher.uncommitted, publisher._uncommitted_receipts = record, (receipt,)
    publisher.merge_round_metrics(1, {"fed_accuracy": 0.7})
    assert store.receipt_digest(1, "a") is None
    assert publisher.receipt_digest(1, "a") == "xxh3_128:ab"
    assert publisher.receipt_digest(1, "b") is None
    store.commit_round(record, [receipt])  # what the background save does
    publisher.merge_round_metrics(1, {"fed_examples": 9.0})  # committed, not yet cleared
    publisher.uncommitted = None
    publisher.merge_round_metrics(1, {"fed_loss": 0.2})
    assert store.rounds()[0].metrics == {
        "accuracy": 0.8,
        "fed_accuracy": 0.7,
        "fed_examples": 9.0,
        "fed_loss": 0.2,
    }
    assert publisher.receipt_digest(1, "a") == "xxh3_128:ab"
