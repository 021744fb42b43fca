"""Asynchronous (buffered) rounds: staleness weights and the buffer machine, without processes."""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict
from collections.abc import Iterator

import pytest

from fedserver.rounds.buffered import (
    AsyncPolicy,
    BufferMachine,
    NoLease,
    OverContributionLimit,
    TooStale,
)
from fedserver.rounds.staleness import StalenessWeight
from fedserver.rounds.synchronous import (
    AlreadySubmitted,
    NotSelected,
    Phase,
    Receipt,
    RoundPolicy,
    StaleRound,
)

pytestmark = pytest.mark.timeout(30)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# ------------------------------------------------------------------ staleness weights
def test_constant_weight_is_one_at_any_staleness() -> None:
    w = StalenessWeight.parse("constant")
    assert [w(t) for t in (0, 1, 50)] == [1.0, 1.0, 1.0]
    assert str(w) == "constant"


def test_poly_weight_is_fedasync_polynomial() -> None:
    w = StalenessWeight.parse("poly:0.5")
    assert w(0) == 1.0
    assert w(3) == pytest.approx(0.5)  # (1 + 3) ** -0.5
    assert w(8) == pytest.approx(1 / 3)
    assert StalenessWeight.parse("poly:2")(1) == pytest.approx(0.25)
    assert str(w) == "poly:0.5"


def test_hinge_weight_is_flat_then_decays() -> None:
    w = StalenessWeight.parse("hinge:10,4")
    assert [w(t) for t in range(5)] == [1.0] * 5
    assert w(5) == pytest.approx(1 / 11)  # 1 / (10 (5 - 4) + 1)
    assert w(6) == pytest.approx(1 / 21)
    assert str(w) == "hinge:10,4"


def test_weights_never_grow_with_staleness() -> None:
    for spec in ("constant", "poly:0.5", "poly:1", "hinge:1,2", "hinge:0.5,0"):
        w = StalenessWeight.parse(spec)
        values = [w(t) for t in range(30)]
        assert all(0 < b <= a <= 1 for a, b in itertools.pairwise(values)), spec


@pytest.mark.parametrize(
    "spec", ["", "poly", "poly:x", "hinge:1", "linear:1", "poly:1,2", "poly:-1"]
)
def test_bad_staleness_weight_specs_are_refused(spec: str) -> None:
    with pytest.raises(ValueError):
        StalenessWeight.parse(spec)


def test_negative_staleness_is_a_bug() -> None:
    with pytest.raises(ValueError):
        StalenessWeight()(-1)


# ------------------------------------------------------------------ the buffer machine
def machine(k: int = 2, s: int = 2, m: int = 0, rounds: int = 10) -> tuple[BufferMachine, Clock]:
    clock = Clock()
    policy = RoundPolicy(total_rounds=rounds, min_clients=1, round_timeout=60)
    bm = BufferMachine(policy, clock, buffering=AsyncPolicy(k, s, m))
    return bm, clock


def fill(bm: BufferMachine, *clients: str, base: int | None = None) -> None:
    """Each client pulls the model (takes a lease), trains and submits."""
    for c in clients:
        bm.touch(c)
        bm.lease(c)
        bm.record(c, Receipt(f"d-{c}-{bm.round}", 10, base or bm.round))


def test_buffer_closes_after_k_updates_and_the_next_opens_at_once() -> None:
    bm, _ = machine(k=3)
    bm.touch("a")
    assert bm.step() == "opened"
    assert bm.deadline == math.inf and bm.expected_updates == 3
    fill(bm, "a", "b")
    assert bm.step() is None
    fill(bm, "c")
    assert bm.step() == "close"
    closed = bm.close()
    assert sorted(closed.receipts) == ["a", "b", "c"]
    bm.complete()
    assert bm.round == 2 and bm.step() == "opened"


def test_staleness_is_versions_since_the_base_and_beyond_s_is_refused() -> None:
    bm, _ = machine(k=1, s=2)
    bm.touch("a")
    bm.step()
    for _ in range(3):  # rounds 1..3 applied, buffer of round 4 open
        fill(bm, "a")
        assert bm.step() == "close"
        bm.close()
        bm.complete()
        bm.step()
    assert bm.round == 4
    bm.touch("b")
    bm.lease("b")
    bm.check_submit("b", 2)  # staleness 2 == S: accepted
    with pytest.raises(TooStale) as refused:
        bm.check_submit("b", 1)  # staleness 3 > S
    assert refused.value.reason == "too_stale"
    assert isinstance(refused.value, StaleRound)  # FAILED_PRECONDITION, like a stale round
    with pytest.raises(StaleRound):
        bm.check_submit("b", 5)  # a round that has not started
    fill(bm, "b", base=2)
    closed = bm.close()
    assert bm.closing_metrics(closed) == {"staleness_mean": 2.0, "staleness_max": 2.0}


def test_a_client_has_at_most_one_update_in_a_buffer() -> None:
    bm, _ = machine(k=3)
    bm.touch("a")
    bm.step()
    fill(bm, "a")
    assert not bm.expects_update_from("a")  # told to wait until the buffer is applied
    with pytest.raises(AlreadySubmitted) as dup:
        bm.check_submit("a", 1)
    assert dup.value.digest == "d-a-1"
    fill(bm, "b", "c")
    bm.close()
    bm.complete()
    bm.step()
    assert bm.expects_update_from("a")


def test_max_concurrency_caps_leases_and_a_submit_frees_a_slot() -> None:
    bm, clock = machine(k=5, m=2)
    bm.touch("a")
    bm.step()
    for c in ("a", "b"):
        assert bm.expects_update_from(c)
        bm.lease(c)
    assert not bm.expects_update_from("c")
    assert bm.expects_update_from("a")  # a lease holder may pull again
    fill(bm, "a")
    assert bm.step() == "wake"  # long-pollers should look again
    assert bm.expects_update_from("c")
    bm.lease("c")
    assert not bm.expects_update_from("d")
    clock.now += 61  # leases lapse after the round timeout: a vanished client frees its slot
    assert bm.expects_update_from("d")


def test_no_submits_while_waiting_or_after_the_last_round() -> None:
    bm, _ = machine(k=1, rounds=1)
    with pytest.raises(StaleRound):
        bm.check_submit("a", 1)
    bm.touch("a")
    bm.step()
    fill(bm, "a")
    bm.step()
    bm.close()
    bm.complete()
    assert bm.phase is Phase.FINISHED
    with pytest.raises(StaleRound):
        bm.check_submit("a", 1)


def test_bad_async_policies_are_refused() -> None:
    for args in ((0,), (2, -1), (2, 1, -1)):
        with pytest.raises(ValueError):
            AsyncPolicy(*args)


# ------------------------------------------------------------------ leases (issue 21 item 3, 4)
class CountingLeases(OrderedDict[str, float]):
    """Counts the entries any code walks (frozenset(leases), scans, prunes)."""

    walked = 0

    def __iter__(self) -> Iterator[str]:
        for key in super().__iter__():
            CountingLeases.walked += 1
            yield key


def _work_per_offer(n: int, cap: int) -> int:
    """Entries walked by one offer + lease + counted update with n clients holding leases."""
    clock = Clock()
    policy = RoundPolicy(total_rounds=10, min_clients=1, round_timeout=60)
    leases = CountingLeases()
    bm = BufferMachine(policy, clock, buffering=AsyncPolicy(5, 2, cap), leases=leases)
    for i in range(n):
        bm.touch(f"c{i}")
    bm.step()
    for i in range(n):
        assert bm.expects_update_from(f"c{i}")
        bm.lease(f"c{i}")
    bm.touch("new")
    CountingLeases.walked = 0
    assert bm.expects_update_from("new")
    bm.lease("new")
    bm.step()
    bm.record("new", Receipt("d", 10, bm.round))
    bm.step()
    return CountingLeases.walked


@pytest.mark.parametrize("cap", [0, 100_000])
def test_lease_bookkeeping_per_offer_does_not_grow_with_the_clients(cap: int) -> None:
    assert _work_per_offer(10, cap) == _work_per_offer(2_000, cap) <= 4  # a peek per step


def test_a_lapsed_lease_frees_its_slot_and_its_late_update_is_refused_with_a_retry_hint() -> None:
    bm, clock = machine(k=5, m=1)
    bm.touch("a")
    bm.step()
    assert bm.expects_update_from("a")
    bm.lease("a")
    bm.touch("b")
    assert not bm.expects_update_from("b")  # the one slot is a's
    assert "training slots are taken (--max-concurrency)" in str(bm.waiting_reason("b"))
    clock.now += 61  # a's lease lapses (--round-timeout 60): its slot is b's now
    bm.touch("a")
    assert bm.step() == "wake" and bm.woken() == ["b"]
    assert bm.expects_update_from("b")
    bm.lease("b")
    with pytest.raises(NoLease) as late:
        bm.check_submit("a", 1)  # a is live, trained too long: FAILED_PRECONDITION, pull again
    assert isinstance(late.value, StaleRound) and late.value.reason == "no_lease"
    assert "--round-timeout" in str(late.value) and "pull the current model" in str(late.value)
    bm.check_submit("b", 1)


def test_an_update_from_an_id_that_never_joined_is_refused_like_an_unselected_one() -> None:
    bm, _ = machine(k=2)
    bm.touch("a")
    bm.step()
    with pytest.raises(NotSelected) as refused:  # PERMISSION_DENIED, as in a synchronous round
        bm.check_submit("ghost", 1)
    assert "has not joined" in str(refused.value)
    assert not bm.receipts


def test_a_joined_client_that_trained_past_its_lease_and_liveness_is_told_to_pull_again() -> None:
    clock = Clock()
    policy = RoundPolicy(total_rounds=10, min_clients=1, round_timeout=60, client_ttl=30)
    bm = BufferMachine(policy, clock, buffering=AsyncPolicy(2), joined={"a"}.__contains__)
    bm.touch("a")
    bm.step()
    bm.lease("a")
    clock.now += 61  # no longer live, lease lapsed: but it joined, so it is not a stranger
    bm.touch("other")
    with pytest.raises(NoLease):
        bm.check_submit("a", 1)
    with pytest.raises(NotSelected):
        bm.check_submit("stranger", 1)


def test_leases_of_ids_that_went_quiet_are_bounded_by_the_live_clients() -> None:
    bm, clock = machine(k=5)  # round timeout 60 s; liveness 90 s by default
    policy = RoundPolicy(total_rounds=10, min_clients=1, round_timeout=600, client_ttl=30)
    bm = BufferMachine(policy, clock, buffering=AsyncPolicy(5))
    bm.touch("a")
    bm.step()
    for i in range(1_000):  # made-up ids pull once each and vanish
        bm.touch(f"ghost{i}")
        bm.expects_update_from(f"ghost{i}")
        bm.lease(f"ghost{i}")
    clock.now += 31  # they are no longer live; their leases have not lapsed yet
    for i in range(40):
        bm.touch(f"c{i}")
        bm.lease(f"c{i}")
    assert len(bm.leases) <= 2 * bm.live_count() + 16


def test_a_freed_slot_wakes_one_waiter_and_a_new_version_wakes_only_buffer_waiters() -> None:
    bm, _ = machine(k=1, m=1)
    bm.touch("a")
    bm.step()
    assert bm.expects_update_from("a")
    bm.lease("a")
    for i in range(100):  # slot waiters
        bm.touch(f"w{i}")
        assert not bm.expects_update_from(f"w{i}")
    bm.record("a", Receipt("d", 10, 1))
    assert bm.step() == "close"
    bm.close()
    assert not bm.expects_update_from("a")  # its update is being applied: waits for the next
    bm.complete()
    assert bm.step() == "opened"
    assert bm.woken() == ["a"]  # the 100 slot waiters' answer did not change, but the
    assert bm.step() == "wake" and bm.woken() == ["w0"]  # slot a freed wakes one of them
    assert bm.step() is None


def test_one_client_contributes_to_at_most_l_of_w_versions_while_enough_are_live() -> None:
    clock = Clock()
    policy = RoundPolicy(total_rounds=20, min_clients=1, round_timeout=60)
    limit = AsyncPolicy(1, 10, 0, max_contributions=2, contribution_window=4)
    assert limit.limit_needs == 2  # ceil(K W / L)
    bm = BufferMachine(policy, clock, buffering=limit)
    bm.touch("a")
    bm.step()
    for _ in range(2):  # alone, a may fill every buffer: nobody else could
        fill(bm, "a")
        bm.close()
        bm.complete()
        bm.step()
    assert bm.round == 3 and bm.expects_update_from("a")
    bm.touch("b")  # now two are live: a has 2 of the last 4 versions and must wait
    assert not bm.expects_update_from("a")
    assert "--max-contributions" in str(bm.waiting_reason("a"))
    bm.lease("a")  # (a lease taken anyway does not help)
    with pytest.raises(OverContributionLimit) as over:
        bm.check_submit("a", 3)
    assert over.value.reason == "contribution_limit" and isinstance(over.value, StaleRound)
    assert "--max-contributions" in str(over.value)
    for _ in range(2):  # b fills versions 3 and 4; a's version 1 leaves the window at 5
        fill(bm, "b")
        bm.close()
        bm.complete()
        bm.step()
    assert bm.round == 5 and "a" in bm.woken() and bm.expects_update_from("a")


def test_heartbeats_keep_a_long_training_lease_and_the_client_live() -> None:
    """A training longer than both the lease (the round timeout, 60 s) and the client timeout
    (90 s) keeps its slot while the client heartbeats; a silent lease holder loses its."""
    bm, clock = machine(k=5, m=1)
    bm.touch("a")
    bm.step()
    bm.lease("a")
    for _ in range(10):  # 300 s of local training, a heartbeat every 30 s
        clock.now += 30
        assert bm.renew("a")
        assert not bm.expects_update_from("b")  # the one slot is still a's
    assert bm.live_clients() == ["a"]
    bm.check_submit("a", 1)  # its finished update is taken
    fill(bm, "a")
    bm.touch("b")
    bm.lease("b")  # b never heartbeats: its slot lapses after the lease time
    clock.now += 61
    assert bm.expects_update_from("c")
