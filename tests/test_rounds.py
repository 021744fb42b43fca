"""The round state machine, driven by a fake clock and a seeded RNG."""

from __future__ import annotations

import math
import random

import pytest

from fedserver.rounds.synchronous import (
    AlreadySubmitted,
    NotSelected,
    Phase,
    Receipt,
    RoundMachine,
    RoundPolicy,
    RoundsExhausted,
    StaleRound,
    SubmitRefused,
)


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _machine(clock: FakeClock, **policy: float | int | None) -> RoundMachine:
    settings: dict[str, float | int | None] = {"total_rounds": 3, "client_ttl": 10_000.0}
    settings.update(policy)
    return RoundMachine(RoundPolicy(**settings), clock, random.Random(0))  # type: ignore[arg-type]


def _touch(machine: RoundMachine, *clients: str) -> None:
    for client in clients:
        machine.touch(client)


def _receipt(client: str) -> Receipt:
    return Receipt(digest=f"sha-{client}", num_examples=10)


def _open(clock: FakeClock, clients: list[str], **policy: float | int | None) -> RoundMachine:
    machine = _machine(clock, **policy)
    _touch(machine, *clients)
    assert machine.step() == "opened"
    return machine


# ---------------------------------------------------------------- opening and selection


def test_waits_until_min_clients_are_live() -> None:
    clock = FakeClock()
    machine = _machine(clock, min_clients=3)
    assert machine.phase is Phase.WAITING
    assert machine.step() is None
    _touch(machine, "a", "b")
    assert machine.step() is None
    assert machine.phase is Phase.WAITING
    assert not machine.expects_update_from("a")
    clock.advance(5)
    machine.touch("c")
    assert machine.step() == "opened"
    assert machine.phase is Phase.COLLECTING
    assert machine.selected == {"a", "b", "c"}
    assert machine.attempts == 1
    assert machine.opened_at == clock.now
    assert machine.deadline == clock.now + 120.0
    assert machine.step() is None  # nothing to do until updates arrive or time passes


@pytest.mark.parametrize(
    ("policy", "live", "expected"),
    [
        ({"fraction_fit": 1.0}, 5, 5),
        ({"fraction_fit": 0.5}, 5, 3),  # ceil(2.5)
        ({"fraction_fit": 0.1}, 5, 1),  # at least one
        ({"fraction_fit": 0.25, "min_fit": 4}, 5, 4),  # never fewer than min_fit
        ({"clients_per_round": 2, "fraction_fit": 0.1}, 5, 2),  # overrides fraction_fit
        ({"clients_per_round": 10}, 5, 5),  # capped at the live clients
        ({"min_fit": 9}, 5, 5),
    ],
)
def test_selection_size(policy: dict[str, float | int], live: int, expected: int) -> None:
    clients = [f"c{i}" for i in range(live)]
    machine = _open(FakeClock(), clients, min_clients=1, **policy)
    assert len(machine.selected) == expected
    assert machine.selected <= set(clients)


def test_selection_is_deterministic_for_a_seed() -> None:
    clients = [f"c{i}" for i in range(20)]
    picks = [_open(FakeClock(), clients, min_clients=1, fraction_fit=0.3).selected for _ in "ab"]
    assert picks[0] == picks[1]
    assert len(picks[0]) == 6


def test_closes_when_all_selected_have_reported() -> None:
    clock = FakeClock()
    machine = _open(clock, ["a", "b", "c"], min_clients=3)
    opened = clock.now
    for client in ("a", "b"):
        clock.advance(1)
        assert machine.expects_update_from(client)
        machine.record(client, _receipt(client))
        assert not machine.expects_update_from(client)
        assert machine.step() is None
    clock.advance(1)
    machine.record("c", _receipt("c"))
    assert machine.step() == "close"
    closed = machine.close()
    assert machine.phase is Phase.AGGREGATING
    assert closed.round == 1
    assert closed.receipts == {c: _receipt(c) for c in "abc"}
    assert (closed.opened_at, closed.closed_at, closed.attempts) == (opened, clock.now, 1)
    assert machine.step() is None


# ---------------------------------------------------------------- deadlines


def test_deadline_with_quorum_closes() -> None:
    clock = FakeClock()
    machine = _open(clock, ["a", "b", "c"], min_clients=3, min_fit=2, round_timeout=60)
    machine.record("a", _receipt("a"))
    machine.record("b", _receipt("b"))
    clock.advance(59.999)
    assert machine.step() is None
    clock.advance(0.001)
    assert machine.step() == "close"
    assert set(machine.close().receipts) == {"a", "b"}


def test_deadline_quorum_defaults_to_min_clients() -> None:
    clock = FakeClock()
    machine = _open(clock, ["a", "b", "c", "d"], min_clients=2, round_timeout=60)
    machine.record("a", _receipt("a"))
    clock.advance(60)
    assert machine.step() == "reopened"
    machine.record("b", _receipt("b"))
    clock.advance(60)
    assert machine.step() == "close"


def test_deadline_without_quorum_reopens_keeping_receipts() -> None:
    clock = FakeClock()
    clients = ["a", "b", "c", "d", "e"]
    machine = _open(clock, clients, min_clients=3, clients_per_round=3, min_fit=3, round_timeout=60)
    opened = clock.now
    first = sorted(machine.selected)
    reported, silent = first[:2], first[2]
    for client in reported:
        machine.record(client, _receipt(client))
    clock.advance(60)
    assert machine.step() == "reopened"
    assert machine.phase is Phase.COLLECTING
    assert machine.attempts == 2
    assert machine.opened_at == opened
    assert machine.deadline == clock.now + 60
    assert set(machine.receipts) == set(reported)
    assert set(reported) < machine.selected
    assert len(machine.selected) == 3
    (fresh,) = machine.selected - set(reported)
    assert fresh in set(clients) - set(reported)
    assert machine.expects_update_from(fresh)
    assert not machine.expects_update_from(reported[0])
    if fresh != silent:
        with pytest.raises(NotSelected):
            machine.check_submit(silent, 1)
    machine.record(fresh, _receipt(fresh))
    assert machine.step() == "close"
    closed = machine.close()
    assert closed.attempts == 2
    assert closed.opened_at == opened
    assert set(closed.receipts) == {*reported, fresh}


def test_reopen_selects_only_live_clients() -> None:
    clock = FakeClock()
    machine = _open(
        clock, ["a", "b", "c", "d"], min_clients=2, min_fit=2, round_timeout=60, client_ttl=30
    )
    assert machine.selected == {"a", "b", "c", "d"}
    machine.record("a", _receipt("a"))
    clock.advance(45)
    machine.touch("d")  # b and c went silent; a was last seen when it reported
    clock.advance(15)
    assert machine.live_clients() == ["d"]
    assert machine.step() == "reopened"
    assert machine.selected == {"a", "d"}


def test_rounds_exhausted_after_max_attempts() -> None:
    clock = FakeClock()
    machine = _open(clock, ["a", "b"], min_clients=2, max_attempts=3, round_timeout=10)
    for attempt in (2, 3):
        clock.advance(10)
        assert machine.step() == "reopened"
        assert machine.attempts == attempt
        _touch(machine, "a", "b")
    clock.advance(10)
    with pytest.raises(RoundsExhausted, match=r"round 1 reached no quorum in 3 attempts") as info:
        machine.step()
    assert "--min-fit" in str(info.value) and "--round-timeout" in str(info.value)


def test_reopen_without_candidates_does_not_close_below_quorum() -> None:
    clock = FakeClock()
    machine = _open(clock, ["a", "b"], min_clients=2, min_fit=2, round_timeout=100, client_ttl=50)
    machine.record("a", _receipt("a"))  # b crashes and never comes back
    clock.advance(100)
    assert machine.step() == "reopened"
    assert machine.step() != "close"  # 1 update < min_fit 2: must not close


# ---------------------------------------------------------------- submissions


def test_check_submit_refusals_are_actionable() -> None:
    clock = FakeClock()
    machine = _machine(clock, min_clients=2)
    machine.touch("a")
    with pytest.raises(StaleRound, match="round 1 is not open yet"):
        machine.check_submit("a", 1)

    _touch(machine, "b", "c")
    assert machine.step() == "opened"
    with pytest.raises(
        StaleRound, match=r"round 0 is closed \(current round: 1\); pull the current model"
    ):
        machine.check_submit("a", 0)
    with pytest.raises(StaleRound, match=r"round 2 has not started \(current round: 1\)"):
        machine.check_submit("a", 2)
    with pytest.raises(NotSelected, match="'zed' is not selected for round 1") as not_sel:
        machine.check_submit("zed", 1)
    assert not_sel.value.reason == "not_selected"

    machine.check_submit("a", 1)  # allowed
    machine.record("a", Receipt("digest-a", 5))
    with pytest.raises(AlreadySubmitted, match="'a' already submitted for round 1") as dup:
        machine.check_submit("a", 1)
    assert dup.value.digest == "digest-a"
    assert dup.value.reason == "duplicate"
    with pytest.raises(AlreadySubmitted):
        machine.record("a", Receipt("digest-other", 5))
    assert machine.receipts["a"] == Receipt("digest-a", 5)


def test_submissions_during_aggregation_are_stale() -> None:
    clock = FakeClock()
    machine = _open(clock, ["a", "b"], min_clients=2)
    machine.record("a", _receipt("a"))
    machine.record("b", _receipt("b"))
    machine.close()
    with pytest.raises(StaleRound, match=r"round 1 is closed .*pull the current model") as info:
        machine.check_submit("a", 1)
    assert info.value.reason == "stale_round"
    assert isinstance(info.value, SubmitRefused)


def test_submissions_after_training_finished_are_stale() -> None:
    clock = FakeClock()
    machine = _open(clock, ["a"], total_rounds=1, min_clients=1)
    machine.record("a", _receipt("a"))
    machine.close()
    machine.complete()
    assert machine.phase is Phase.FINISHED
    with pytest.raises(StaleRound, match="training is finished"):
        machine.check_submit("a", 1)
    with pytest.raises(StaleRound, match="training is finished"):
        machine.check_submit("a", 2)


def test_record_refreshes_liveness() -> None:
    clock = FakeClock()
    machine = _open(clock, ["a", "b"], min_clients=2)
    clock.advance(50)
    machine.record("a", _receipt("a"))
    assert machine.last_seen["a"] == clock.now


# ---------------------------------------------------------------- liveness


def test_clients_older_than_ttl_are_not_live() -> None:
    clock = FakeClock(0.0)
    machine = _machine(clock, min_clients=2, client_ttl=10)
    machine.touch("a")
    clock.advance(5)
    machine.touch("b")
    clock.advance(5)
    assert machine.live_clients() == ["a", "b"]  # exactly ttl old is still live
    clock.advance(0.5)
    assert machine.live_clients() == ["b"]
    assert machine.step() is None  # a no longer counts towards min_clients
    machine.touch("a")
    assert machine.step() == "opened"
    machine.forget("b")
    assert machine.live_clients() == ["a"]
    machine.forget("never-seen")


# ---------------------------------------------------------------- completion


def test_complete_moves_to_the_next_round_then_finishes() -> None:
    clock = FakeClock()
    machine = _machine(clock, total_rounds=2, min_clients=1)
    machine.touch("a")
    for round_number in (1, 2):
        assert machine.round == round_number
        assert machine.rounds_completed == round_number - 1
        assert machine.step() == "opened"
        machine.record("a", _receipt("a"))
        assert machine.step() == "close"
        machine.close()
        machine.complete()
        assert machine.selected == frozenset()
        assert machine.receipts == {}
        assert machine.deadline == math.inf
    assert machine.phase is Phase.FINISHED
    assert machine.rounds_completed == 2
    assert machine.step() is None


def test_complete_resets_to_waiting() -> None:
    clock = FakeClock()
    machine = _open(clock, ["a"], min_clients=1)
    machine.record("a", _receipt("a"))
    machine.close()
    machine.complete()
    assert machine.phase is Phase.WAITING
    assert machine.round == 2
    with pytest.raises(StaleRound, match=r"round 1 is closed \(current round: 2\)"):
        machine.check_submit("a", 1)


def test_close_and_complete_refuse_the_wrong_phase() -> None:
    machine = _machine(FakeClock())
    with pytest.raises(RuntimeError, match="cannot close round 1 in phase waiting_for_clients"):
        machine.close()
    with pytest.raises(RuntimeError, match="round 1 is not being aggregated"):
        machine.complete()


def test_machine_resumed_past_the_last_round_is_finished() -> None:
    machine = RoundMachine(RoundPolicy(total_rounds=3), FakeClock(), random.Random(0), round=4)
    assert machine.phase is Phase.FINISHED
    assert machine.rounds_completed == 3


# ---------------------------------------------------------------- policy


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"total_rounds": 0}, "rounds must be at least 1"),
        ({"min_clients": 0}, "min-clients must be at least 1"),
        ({"fraction_fit": 0.0}, r"fraction-fit must be in \(0, 1\]"),
        ({"fraction_fit": 1.5}, r"fraction-fit must be in \(0, 1\]"),
        ({"fraction_fit": math.nan}, r"fraction-fit must be in \(0, 1\]"),
        ({"clients_per_round": 0}, "clients-per-round must be at least 1"),
        ({"min_fit": 0}, "min-fit must be at least 1"),
        ({"round_timeout": 0.0}, "round-timeout must be positive"),
        ({"round_timeout": -5.0}, "round-timeout must be positive"),
    ],
)
def test_policy_validation(kwargs: dict[str, float], message: str) -> None:
    settings: dict[str, float] = {"total_rounds": 1, **kwargs}
    with pytest.raises(ValueError, match=message):
        RoundPolicy(**settings)  # type: ignore[arg-type]


def test_policy_quorum() -> None:
    assert RoundPolicy(1, min_clients=3).quorum(5) == 3
    assert RoundPolicy(1, min_clients=3).quorum(2) == 2
    assert RoundPolicy(1, min_clients=3, min_fit=4).quorum(5) == 4
    assert RoundPolicy(1, min_clients=1).quorum(0) == 1


# ---------------------------------------------------------------- liveness (--client-timeout)


def test_heartbeats_keep_a_training_client_live_past_the_timeout() -> None:
    clock = FakeClock()
    machine = _open(clock, ["a", "b"], client_ttl=30.0, round_timeout=1000.0, min_clients=1)
    for _ in range(9):  # 90 s of training, a heartbeat every 10 s (a third of the timeout)
        clock.advance(10)
        assert machine.renew("a")
        assert machine.step() is None
    assert machine.live_clients() == ["a"]  # b said nothing for 90 s: expired
    assert machine.expects_update_from("a")
    assert machine.departed == {"b"}
    assert not machine.renew("b")  # not live: it must Join again
    machine.record("a", _receipt("a"))
    assert machine.step() == "close"  # b's slot is not waited for: it departed
    assert machine.missed == ["b"]


def test_round_stops_waiting_when_every_selected_client_left() -> None:
    clock = FakeClock()
    machine = _open(clock, ["a", "b", "c"], clients_per_round=2, min_clients=2)
    chosen = sorted(machine.selected)
    other = ({"a", "b", "c"} - machine.selected).pop()
    assert machine.depart(chosen[0])
    assert machine.step() is None  # the other selected client may still report
    assert machine.depart(chosen[1])
    assert machine.step() == "reopened"  # at once, not at the deadline 120 s out
    assert machine.missed == chosen
    assert machine.attempts == 2
    assert machine.selected == {other}
    assert not machine.depart("stranger")  # never selected: nothing to stop waiting for


def test_silent_selected_clients_expire_and_the_round_waits_for_new_ones() -> None:
    clock = FakeClock()
    machine = _open(clock, ["a", "b"], client_ttl=30.0, round_timeout=100.0, max_attempts=2)
    clock.advance(31)
    assert machine.step() is None  # both silent past the timeout, nobody else to ask
    assert machine.lapsed == ["a", "b"] and machine.live_count() == 0
    machine.touch("c")
    machine.touch("d")
    assert machine.step() == "reopened"  # new clients: asked now, not at the deadline
    assert machine.selected == {"c", "d"}
    assert machine.deadline == clock.now + 100.0


def test_a_last_attempt_with_nobody_left_gives_up_without_waiting_out_the_deadline() -> None:
    clock = FakeClock()
    machine = _open(clock, ["a", "b"], max_attempts=1)
    machine.depart("a")
    machine.depart("b")
    with pytest.raises(RoundsExhausted, match="no quorum in 1 attempts"):
        machine.step()
    assert machine.missed == ["a", "b"]


def test_client_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError, match="client-timeout must be positive"):
        RoundPolicy(total_rounds=1, client_ttl=0.0)


def test_overselect_selects_more_and_closes_on_the_first_arrivals() -> None:
    clock = FakeClock()
    m = _machine(clock, clients_per_round=4, overselect=1.5, min_clients=2)
    _touch(m, *(f"c{i}" for i in range(10)))
    assert m.step() == "opened"
    assert len(m.selected) == 6  # 4 needed x 1.5
    first, *rest = sorted(m.selected)
    for cid in [first, *rest[:2]]:
        m.check_submit(cid, 1)
        m.record(cid, Receipt(digest=cid, num_examples=1))
        assert m.step() is None  # 3 of the 4 needed: keep waiting, deadline far away
    m.check_submit(rest[2], 1)
    m.record(rest[2], Receipt(digest=rest[2], num_examples=1))
    assert m.step() == "close"  # the 4th arrival closes it; two selected still training
    closed = m.close()
    assert len(closed.receipts) == 4
    with pytest.raises(StaleRound):  # a straggler's late update
        m.check_submit(rest[3], 1)


def test_overselect_keeps_the_quorum_as_a_floor_and_caps_at_the_live_clients() -> None:
    clock = FakeClock()
    m = _machine(clock, clients_per_round=2, overselect=3.0, min_clients=4, min_fit=3)
    _touch(m, *(f"c{i}" for i in range(5)))
    assert m.step() == "opened"
    assert len(m.selected) == 5  # 3 (min-fit raises the target) x 3, capped at 5 live
    for i, cid in enumerate(sorted(m.selected)[:3]):
        m.check_submit(cid, 1)
        m.record(cid, Receipt(digest=cid, num_examples=1))
        assert m.step() == ("close" if i == 2 else None)


def test_without_overselect_a_round_waits_for_every_selected_client() -> None:
    clock = FakeClock()
    m = _machine(clock, clients_per_round=4, min_clients=2)
    _touch(m, *(f"c{i}" for i in range(10)))
    assert m.step() == "opened" and len(m.selected) == 4
    for cid in sorted(m.selected)[:3]:
        m.check_submit(cid, 1)
        m.record(cid, Receipt(digest=cid, num_examples=1))
        assert m.step() is None


@pytest.mark.parametrize("factor", [0.5, 0.99, 101.0, math.nan])
def test_overselect_out_of_range_is_refused(factor: float) -> None:
    with pytest.raises(ValueError, match="--overselect"):
        RoundPolicy(total_rounds=1, overselect=factor)
