"""Each strategy against hand-computed values; resume from a checkpoint is exact."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest

from fedcore.codecs import get_codec
from fedcore.tensors import FlatModel, flatten_arrays, float_vector
from fedserver.state.store import StateStore
from fedserver.strategies import STRATEGIES, AggregateInput, UpdateSet, build_strategy
from fedserver.strategies import base as strategy_base
from fedserver.strategies.krum import pairwise_sq_distances
from fedserver.updates.accumulator import Accumulator
from fedserver.updates.receiver import UpdateReceiver
from fedserver.updates.spool import UpdateSpool

pytestmark = pytest.mark.timeout(60)


def model(*values: float) -> FlatModel:
    # An int tensor rides along: strategies must leave non-float tensors alone.
    arrays = {
        "w": np.array(values, dtype=np.float32),
        "steps": np.array([7], dtype=np.int64),
    }
    return flatten_arrays(arrays)


def agg_of(
    rows: list[list[float]],
    weights: list[float] | None = None,
    rnd: int = 1,
    metrics: dict[str, list[float]] | None = None,
) -> AggregateInput:
    vectors = np.array(rows, dtype=np.float32)
    w = np.array(weights or [1.0] * len(rows))
    mean = (vectors * w[:, None]).sum(axis=0) / w.sum()
    kept = {k: np.array(v) for k, v in (metrics or {}).items()}
    return AggregateInput(
        rnd, mean.astype(np.float32), float(w.sum()), len(rows), UpdateSet(vectors, w, kept)
    )


def floats(m: FlatModel) -> list[float]:
    return float_vector(m).tolist()


# ---------------------------------------------------------------- FedAvg family


def test_fedavg_adds_the_weighted_mean_delta() -> None:
    out = build_strategy("fedavg").apply(model(1, 1), agg_of([[1, 0], [4, 3]], [2, 1]))
    assert floats(out) == [3.0, 2.0]  # (2*[1,0] + [4,3]) / 3 = [2, 1]
    assert out.raw("steps").tolist() == [7]


def test_fedprox_sends_mu_and_aggregates_like_fedavg() -> None:
    s = build_strategy("fedprox", proximal_mu=0.25)
    assert s.round_config(3) == {"proximal_mu": "0.25"}
    assert floats(s.apply(model(1, 1), agg_of([[1, 0], [3, 2]]))) == [3.0, 2.0]


def test_fedavgm_momentum_over_three_rounds() -> None:
    s = build_strategy("fedavgm", server_lr=1.0, server_momentum=0.5)
    x = model(0, 0)
    for delta in ([1, -2], [2, 0], [0, 4]):
        x = s.apply(x, agg_of([delta]))
    # v1 = [1,-2]; v2 = .5 v1 + [2,0] = [2.5,-1]; v3 = .5 v2 + [0,4] = [1.25,3.5]
    assert s.state_arrays()["velocity"].tolist() == [1.25, 3.5]
    assert floats(x) == [4.75, 0.5]


# Three rounds of one coordinate: delta 2, 0, 1; beta1 = beta2 = 0.5, tau = 1 (v starts at
# tau^2 = 1), eta = 1. m: 1, 0.5, 0.75 for every variant.
FEDOPT_V = {
    # Adam: v <- .5 v + .5 d^2 -> 2.5, 1.25, 1.125
    "fedadam": [2.5, 1.25, 1.125],
    # Yogi: v <- v - .5 d^2 sign(v - d^2) -> 1 + 2 = 3, 3, 3 - .5 = 2.5
    "fedyogi": [3.0, 3.0, 2.5],
    # Adagrad: v <- v + d^2 -> 5, 5, 6
    "fedadagrad": [5.0, 5.0, 6.0],
}


@pytest.mark.parametrize("name", sorted(FEDOPT_V))
def test_fedopt_moments_over_three_rounds(name: str) -> None:
    params = {"server_lr": 1.0, "beta1": 0.5, "tau": 1.0}
    if name != "fedadagrad":
        params["beta2"] = 0.5
    s = build_strategy(name, **params)
    x, expected_x = model(0.0), 0.0
    for delta, m, v in zip((2.0, 0.0, 1.0), (1.0, 0.5, 0.75), FEDOPT_V[name], strict=True):
        x = s.apply(x, agg_of([[delta]]))
        state = s.state_arrays()
        assert state["m"].tolist() == [m]
        assert state["v"].tolist() == [v]
        expected_x += m / (math.sqrt(v) + 1.0)
        assert floats(x)[0] == pytest.approx(expected_x, rel=1e-6)


def test_fedadagrad_has_no_beta2() -> None:
    with pytest.raises(ValueError, match="does not use --beta2"):
        build_strategy("fedadagrad", beta2=0.5)


# ---------------------------------------------------------------- robust


ROWS = [[1, 10], [2, -5], [100, 0], [3, 1], [4, 2]]


def test_median_is_coordinatewise() -> None:
    out = build_strategy("median").apply(model(0, 0), agg_of(ROWS))
    assert floats(out) == [3.0, 1.0]  # sorted: [1,2,3,4,100] and [-5,0,1,2,10]


def test_median_of_even_count_averages_the_middle_pair() -> None:
    out = build_strategy("median").apply(model(0), agg_of([[1], [2], [10], [-50]]))
    assert floats(out) == [1.5]


def test_trimmed_mean_drops_k_each_side_and_ignores_weights() -> None:
    s = build_strategy("trimmed_mean", trim_fraction=0.2)  # k = floor(.2 * 5) = 1
    out = s.apply(model(0, 0), agg_of(ROWS, weights=[1, 1, 1000, 1, 1]))
    assert floats(out) == [3.0, 1.0]  # mean(2,3,4), mean(0,1,2)
    assert (
        s.trimmed(2) == 0
        and s.trimmed(10) == 2
        and build_strategy("trimmed_mean", trim_fraction=0.45).trimmed(3) == 1
    )


KRUM_ROWS = [[0.0], [1.0], [2.0], [10.0], [-20.0]]


def test_krum_picks_the_update_closest_to_its_neighbours() -> None:
    # n=5, f=1: 2 nearest neighbours. Scores: 0 -> 1+4, 1 -> 1+1, 2 -> 1+4, 10 -> 64+81,
    # -20 -> 400+441. Krum: row 1.
    s = build_strategy("krum", krum_byzantine=1)
    assert s.select(agg_of(KRUM_ROWS).updates).tolist() == [1]
    assert floats(s.apply(model(5), agg_of(KRUM_ROWS))) == [6.0]


def test_multi_krum_averages_the_m_best() -> None:
    s = build_strategy("krum", krum_byzantine=1, multi_krum_m=3)
    assert s.select(agg_of(KRUM_ROWS).updates).tolist() == [1, 0, 2]
    assert floats(s.apply(model(0), agg_of(KRUM_ROWS))) == [1.0]


def test_pairwise_distances_match_direct_computation() -> None:
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(6, 11)).astype(np.float32)
    got = pairwise_sq_distances(UpdateSet(rows, np.ones(6)))
    want = ((rows[:, None, :].astype(np.float64) - rows[None, :, :]) ** 2).sum(axis=2)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["median", "trimmed_mean", "krum"])
def test_robust_results_do_not_depend_on_block_size(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(1)
    rows = rng.normal(size=(7, 23)).astype(np.float32).tolist()
    base = model(*([0.0] * 23))
    whole = build_strategy(name).apply(base, agg_of(rows))
    monkeypatch.setattr(strategy_base, "BLOCK_VALUES", 4)
    assert build_strategy(name).apply(base, agg_of(rows)).version == whole.version


def test_robust_strategies_refuse_to_run_without_the_updates() -> None:
    agg = AggregateInput(1, np.zeros(1, dtype=np.float32), 1.0, 1)
    with pytest.raises(ValueError, match="needs every update"):
        build_strategy("median").apply(model(0), agg)


# ---------------------------------------------------------------- the disk-backed store


def staged(tmp: Path, values: np.ndarray):  # type: ignore[no-untyped-def]
    codec = get_codec("fp32")
    payload = codec.encode(values)
    receiver = UpdateReceiver(codec, values.size, payload.size, tmp)
    for start in range(0, payload.size, 20):  # several pieces per update
        receiver.add(bytes(payload[start : start + 20]))
    return receiver.finish(hashlib.sha256(payload).hexdigest())


def test_spool_keeps_every_update_as_a_memmapped_row(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    rows = rng.normal(size=(4, 13)).astype(np.float32)
    spool = UpdateSpool(13, tmp_path)
    acc = Accumulator(13)
    for i, row in enumerate(rows):
        update = staged(tmp_path, row)
        acc.fold(update, float(i + 1))
        spool.append(update, float(i + 1))
        update.discard()
    matrix = spool.matrix()
    assert isinstance(matrix, np.memmap)
    np.testing.assert_array_equal(matrix, rows)
    assert spool.weights == [1.0, 2.0, 3.0, 4.0]
    spool.close()
    assert list(tmp_path.iterdir()) == []  # anonymous files only


# ---------------------------------------------------------------- parameters and resume


def test_unknown_strategy_and_bad_parameters_are_usage_errors() -> None:
    with pytest.raises(ValueError, match="choose one of"):
        build_strategy("fedsgd")
    with pytest.raises(ValueError, match="does not use --proximal-mu"):
        build_strategy("fedavg", proximal_mu=0.1)
    with pytest.raises(ValueError, match="--trim-fraction must be in"):
        build_strategy("trimmed_mean", trim_fraction=0.5)
    with pytest.raises(ValueError, match="--server-momentum"):
        build_strategy("fedavgm", server_momentum=1.0)


def test_loading_state_of_another_strategy_is_refused() -> None:
    with pytest.raises(ValueError, match="another --strategy"):
        build_strategy("fedadam").load_state_arrays({"velocity": np.zeros(2, np.float32)})


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_resume_from_checkpoint_gives_the_same_next_model(name: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    # 7 updates: Bulyan's 4f + 3 with f = 1; q-FedAvg reads each client's loss; SCAFFOLD's
    # updates carry Δc after Δy.
    width = 18 if name == "scaffold" else 9
    rounds = [rng.normal(scale=0.1, size=(7, width)).astype(np.float32).tolist() for _ in range(3)]
    losses = {"loss_before_training": rng.uniform(0.5, 2.0, size=7).tolist()}
    start = model(*rng.normal(size=9).tolist())

    straight = build_strategy(name)
    x = start
    for r, rows in enumerate(rounds, 1):
        x = straight.apply(x, agg_of(rows, rnd=r, metrics=losses))

    first = build_strategy(name)
    y = start
    for r, rows in enumerate(rounds[:2], 1):
        y = first.apply(y, agg_of(rows, rnd=r, metrics=losses))
    store = StateStore(tmp_path / "state")
    store.write_checkpoint(2, y, first.state_arrays())
    store.close()
    model2, state = StateStore(tmp_path / "state").load_checkpoint(2)
    resumed = build_strategy(name)
    resumed.load_state_arrays(state)
    z = resumed.apply(model2, agg_of(rounds[2], rnd=3, metrics=losses))
    assert z.version == x.version
    assert {k: v.tolist() for k, v in resumed.state_arrays().items()} == {
        k: v.tolist() for k, v in straight.state_arrays().items()
    }


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--strategy", "fedavg", "--proximal-mu", "0.1"], "does not use --proximal-mu"),
        (["--strategy", "median", "--dp-clip", "1.0"], "cannot be combined with --dp-clip"),
        (["--strategy", "krum", "--krum-byzantine", "-1"], "--krum-byzantine must be >= 0"),
    ],
)
def test_cli_refuses_bad_strategy_flags_before_touching_the_state_dir(
    flags: list[str], message: str, tmp_path: Path
) -> None:
    from fedserver.cli import build_parser
    from fedserver.commands.run import server_settings
    from fedserver.coordinator.assembly import SetupError, build_coordinator

    state = tmp_path / "state"
    argv = ["run", "--task", "examples.digits:task", "--state-dir", str(state), *flags]
    settings = server_settings(build_parser().parse_args(argv))
    with pytest.raises((ValueError, SetupError), match=message):  # both exit 2 in main()
        build_coordinator(settings)
    assert not state.exists()


def test_fedavg_makes_a_float32_model_in_the_rounds_mean_without_a_copy() -> None:
    """A float32-only model: the new model's buffer is the mean's own memory (the mean is
    consumed), so aggregating a 2.4 GB model holds two models, not three. Others: a copy."""
    base = flatten_arrays({"a": np.array([1.0, 2.0], np.float32), "b": np.array([4.0], np.float32)})
    mean = np.array([0.5, -1.0, 0.25], dtype=np.float32)
    new = build_strategy("fedavg").apply(base, AggregateInput(1, mean, 1.0, 1))
    assert np.shares_memory(new.buffer, mean)
    assert floats(new) == [1.5, 1.0, 4.25]
    assert floats(base) == [1.0, 2.0, 4.0]  # the old model is untouched (clients may hold it)
    # The round's own mean: the accumulator's page-aligned sum (its checkpoint is then written
    # with O_DIRECT from it) is consumed the same way.
    acc = Accumulator(3)
    acc.total[:] = [1.0, -2.0, 0.5]
    acc.weight, acc.count, acc.tensor_weight[:] = 2.0, 1, 2.0
    mean = acc.mean()
    new = build_strategy("fedavg").apply(base, AggregateInput(1, mean, 2.0, 1))
    assert np.shares_memory(new.buffer, mean) and floats(new) == [1.5, 1.0, 4.25]
    mixed = model(1.0, 2.0)  # an int64 tensor beside the floats: the vector is not the buffer
    mean = np.array([0.5, 0.5], dtype=np.float32)
    out = build_strategy("fedavg").apply(mixed, AggregateInput(1, mean, 1.0, 1))
    assert not np.shares_memory(out.buffer, mean) and floats(out) == [1.5, 2.5]
    halved = build_strategy("fedavg", server_lr=0.5).apply(base, agg_of([[2.0, 2.0, 2.0]]))
    assert floats(halved) == [2.0, 3.0, 5.0]
