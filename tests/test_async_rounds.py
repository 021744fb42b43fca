"""Asynchronous (buffered) rounds: staleness weights and the buffer machine, without processes."""

from __future__ import annotations

import itertools
import math

import pytest

from fedserver.async_rounds import AsyncPolicy, BufferMachine, TooStale
from fedserver.rounds import AlreadySubmitted, Phase, Receipt, RoundPolicy, StaleRound
from fedserver.staleness import StalenessWeight

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
    for c in clients:
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
