"""--mode async through an in-process Coordinator (no gRPC): what one client may do to the
model, DP accounting, rotating --train-tensors, state kept per client, start-up refusals."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import numpy as np
import pytest

from examples.digits import task
from fedcore.codecs import get_codec
from fedcore.privacy import Accountant, DPConfig
from fedcore.selection import round_selection
from fedcore.tensors import float_vector, iter_chunks
from fedserver.coordinator.assembly import CoordinatorSettings, SetupError, build_coordinator
from fedserver.coordinator.central_eval import initial_model
from fedserver.coordinator.lifecycle import Coordinator
from fedserver.coordinator.offers import TrainingDefaults
from fedserver.modes.buffered import Buffered
from fedserver.modes.registry import MODES
from fedserver.protocols.dp import DPWrapper
from fedserver.rounds.buffered import AsyncPolicy
from fedserver.rounds.synchronous import Phase, RoundPolicy
from fedserver.state.store import StateStore
from fedserver.strategies import build_strategy
from fedserver.updates.messages import SubmitHeader

pytestmark = pytest.mark.timeout(120)
TASK = "examples.digits:task"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _coordinator(
    state: Path,
    buffering: AsyncPolicy,
    rounds: int = 3,
    dp: DPWrapper | None = None,
    train_tensors: str = "",
    min_clients: int = 1,
) -> tuple[Coordinator, StateStore]:
    store = StateStore(state)
    policy = RoundPolicy(total_rounds=rounds, min_clients=min_clients, round_timeout=60.0)
    coord = Coordinator(
        store,
        build_strategy("fedavg"),
        policy,
        initial_model(task, 0),
        defaults=TrainingDefaults(1, 0.1, 32, train_tensors=train_tensors),
        protocol_wrappers=(dp,) if dp else (),
        mode=Buffered(buffering),
    )
    coord.initialize_store(TASK)
    return coord, store


def _pull(coord: Coordinator, client: str) -> int:
    """Join and pull the model: the client is handed a lease on the current round."""
    coord.touch(client, {})
    offer = coord.offer(client, "")
    assert offer is not None and offer.selected, client
    return offer.round


def _submit(
    coord: Coordinator, client: str, base: int, value: float, num_examples: int = 10
) -> None:
    selection = round_selection(coord.model.manifest.floats(), coord.defaults.train_tensors, base)
    payload = np.full(selection.num_values, value, np.float32).tobytes()
    wire = get_codec("fp32").wire_manifest(selection.manifest)
    version = coord.base_version(base) or ""
    header = SubmitHeader(client, base, version, num_examples, {}, "fp32", wire, len(payload))
    pending = coord.begin_submit(header)
    for chunk in iter_chunks(payload, 1 << 16):
        pending.receiver.add(bytes(chunk))
    coord.finish_submit(pending, hashlib.sha256(payload).hexdigest())


async def _published(coord: Coordinator, version: int) -> None:
    async def done() -> None:
        while coord.machine.rounds_completed < version:
            await asyncio.sleep(0)  # a yield, not a timed wait: the aggregation runs meanwhile

    await asyncio.wait_for(done(), 60)
    assert coord.failure is None


def test_one_client_claiming_huge_num_examples_weighs_at_most_r_times_the_median(
    tmp_path: Path,
) -> None:
    async def scenario() -> tuple[np.ndarray, np.ndarray]:
        coord, store = _coordinator(tmp_path / "s", AsyncPolicy(3))  # default ratio R = 4
        base = float_vector(coord.model).astype(np.float64)
        for c in ("a", "b", "liar"):
            _pull(coord, c)
        _submit(coord, "a", 1, 0.0, 10)
        _submit(coord, "b", 1, 0.0, 10)
        _submit(coord, "liar", 1, 1.0, 10**9)
        await _published(coord, 1)
        store.close()
        return base, float_vector(coord.model).astype(np.float64)

    base, new = asyncio.run(scenario())
    # Weights 10, 10 and min(1e9, 4 x median(10, 10)) = 40: the liar moves the mean by 40/60,
    # not by ~1 (its share of the buffer is capped, whatever it claims).
    np.testing.assert_allclose(new - base, 40 / 60, atol=1e-6)


def test_async_dp_epsilon_is_accounted_with_sample_rate_one(tmp_path: Path) -> None:
    async def scenario() -> dict[str, float]:
        dp = DPWrapper(DPConfig(1.0, 1.0, 1e-5), seed=0)
        coord, store = _coordinator(tmp_path / "s", AsyncPolicy(2), 1, dp, min_clients=10)
        for i in range(10):  # 10 live clients: q would be 2/10 if buffers were a random draw
            coord.touch(f"c{i}", {})
        for c in ("c0", "c1"):
            _pull(coord, c)
            _submit(coord, c, 1, 0.0)
        await _published(coord, 1)
        metrics = store.rounds()[0].metrics
        store.close()
        return metrics

    metrics = asyncio.run(scenario())
    acc = Accountant()
    acc.step(1.0, 1.0)
    assert metrics["dp_sample_rate"] == 1.0
    assert metrics["epsilon"] == pytest.approx(acc.epsilon(1e-5), rel=1e-12)


def test_a_late_partial_update_is_checked_against_the_group_it_was_trained_on(
    tmp_path: Path,
) -> None:
    async def scenario() -> tuple[np.ndarray, np.ndarray]:
        coord, store = _coordinator(tmp_path / "s", AsyncPolicy(1), train_tensors="0.*;2.*")
        base = float_vector(coord.model).astype(np.float64)
        assert _pull(coord, "fast") == 1 and _pull(coord, "slow") == 1  # both train 0.*
        _submit(coord, "fast", 1, 0.5)
        await _published(coord, 1)  # version 2 trains 2.*
        assert coord.round_selection().names == ("2.weight", "2.bias")
        _submit(coord, "slow", 1, 0.25)  # one version late, still group 0.*: counted
        await _published(coord, 2)
        store.close()
        return base, float_vector(coord.model).astype(np.float64)

    base, new = asyncio.run(scenario())
    moved = new - base
    n0 = 4096 + 64
    # fast's 0.5 then slow's 0.25 x s(1) = 0.25 / sqrt(2) on the 0.* tensors; 2.* untouched.
    np.testing.assert_allclose(moved[:n0], 0.5 + 0.25 / np.sqrt(2), atol=1e-6)
    np.testing.assert_allclose(moved[n0:], 0.0, atol=0)


def test_told_finished_is_bounded_by_the_live_clients(tmp_path: Path) -> None:
    async def scenario() -> int:
        coord, store = _coordinator(tmp_path / "s", AsyncPolicy(1))
        clock = Clock()
        coord.machine.clock = clock
        coord.machine.phase = Phase.FINISHED
        for batch in range(10):  # made-up ids ask once each, then go quiet
            for i in range(200):
                coord.touch(f"ghost{batch}-{i}")
                assert coord.offer(f"ghost{batch}-{i}", "") is not None
            clock.now += coord.policy.client_ttl + 1
        store.close()
        return len(coord.told_finished)

    assert asyncio.run(scenario()) <= 2 * 200 + 16


# ------------------------------------------------------------------ start-up refusals
def _settings(
    state: Path, buffering: AsyncPolicy | None, mode: str = "fedavg"
) -> CoordinatorSettings:
    return CoordinatorSettings(
        task=TASK,
        state_dir=state,
        policy=RoundPolicy(total_rounds=3, min_clients=1),
        defaults=TrainingDefaults(mode="fedavg" if buffering else mode),
        mode=Buffered(buffering) if buffering else MODES[mode](),
    )


@pytest.mark.parametrize(
    ("first", "then", "message"),
    [
        (AsyncPolicy(3), None, "holds a run with --mode async, not fedavg"),
        (None, AsyncPolicy(3), "holds a run with --mode fedavg, not async"),
        (AsyncPolicy(3), AsyncPolicy(5), "holds a run with --buffer-size 3, not 5"),
    ],
)
def test_a_resumed_state_dir_keeps_its_mode_and_buffer_size(
    tmp_path: Path, first: AsyncPolicy | None, then: AsyncPolicy | None, message: str
) -> None:
    state = tmp_path / "state"
    build_coordinator(_settings(state, first)).store.close()
    build_coordinator(_settings(state, first)).store.close()  # the same flags resume
    with pytest.raises(SetupError) as refused:
        build_coordinator(_settings(state, then))
    assert message in str(refused.value) and str(state) in str(refused.value)


ASYNC_FLAGS = [(f.dest, f.option) for f in Buffered.flags]  # --mode async's own flags


def test_every_async_flag_has_a_policy_field() -> None:
    fields = set(AsyncPolicy.__dataclass_fields__) | {"staleness_weight"}
    assert {dest for dest, _ in ASYNC_FLAGS[1:]} <= fields
