"""Bulyan and q-FedAvg alone (no gRPC): hand-computed values, brute force, refusals.

Flower parity over 3 rounds is tests/test_flower_parity.py; real federations are
tests/test_bulyan_qfedavg_e2e.py.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from fedcore.tensors import FlatModel, flatten_arrays, float_vector
from fedserver.coordinator.assembly import SetupError, check_round_size
from fedserver.rounds.synchronous import RoundPolicy
from fedserver.strategies import AggregateInput, UpdateSet, build_strategy
from fedserver.strategies import base as strategy_base
from fedserver.strategies.bulyan import closest_to_median_mean
from fedserver.strategies.qfedavg import LOSS_BEFORE_TRAINING
from fedserver.updates.spool import UpdateSpool
from tests.test_strategies import staged

pytestmark = pytest.mark.timeout(60)
LOSS = LOSS_BEFORE_TRAINING


def model(values: list[float]) -> FlatModel:
    return flatten_arrays(
        {"w": np.array(values, dtype=np.float32), "steps": np.array([7], dtype=np.int64)}
    )


def agg(rows: list[list[float]], losses: list[float] | None = None) -> AggregateInput:
    vectors = np.array(rows, dtype=np.float32)
    w = np.ones(len(rows))
    metrics = {LOSS: np.array(losses)} if losses is not None else {}
    return AggregateInput(
        1, vectors.mean(axis=0), float(len(rows)), len(rows), UpdateSet(vectors, w, metrics)
    )


def floats(m: FlatModel) -> list[float]:
    return float_vector(m).tolist()


# ---------------------------------------------------------------- Bulyan


def brute_closest_mean(column: np.ndarray, beta: int) -> float:
    """The paper's rule literally: the beta-subset with the least total distance to the median."""
    med = np.median(column)
    best = min(
        itertools.combinations(range(len(column)), beta),
        key=lambda idx: sum(abs(column[i] - med) for i in idx),
    )
    return float(np.mean(column[list(best)]))


@pytest.mark.parametrize(("rows", "beta"), [(5, 1), (5, 3), (6, 2), (7, 3), (9, 5)])
def test_closest_to_median_mean_is_the_papers_subset_mean(rows: int, beta: int) -> None:
    rng = np.random.default_rng(rows * 10 + beta)
    # Skewed columns, so the beta closest to the median are often not the centred window.
    values = rng.exponential(size=(rows, 40)).astype(np.float32) ** 3
    got = closest_to_median_mean(values, beta)
    want = [brute_closest_mean(values[:, j], beta) for j in range(values.shape[1])]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_closest_to_median_differs_from_the_trimmed_mean() -> None:
    # Sorted 0, 1, 2, 3, 100, 101, 102: median 3; the 3 closest are 1, 2, 3 (mean 2), while
    # trimming 2 at each end keeps 2, 3, 100.
    column = np.array([[0], [1], [2], [3], [100], [101], [102]], dtype=np.float32)
    assert closest_to_median_mean(column, 3).tolist() == [2.0]


# Seven 1-D updates, f = 1: n = 4f + 3, θ = 5, β = 3.
BULYAN_ROWS = [[0.0], [1.0], [2.0], [3.0], [4.0], [50.0], [-60.0]]


def test_bulyan_selects_by_repeated_krum_then_averages_around_the_median() -> None:
    s = build_strategy("bulyan", bulyan_byzantine=1)
    # Remaining 7, 4 neighbours: 2 scores 1+1+4+4 = 10, best. Then among 0,1,3,4,50,-60
    # (3 neighbours): 1 -> 1+4+9 = 14 and 3 -> 1+4+9 = 14: the lower index, 1. Then 0,3,4,50,-60
    # (2 neighbours): 3 -> 1+9 = 10, 4 -> 1+16 = 17, 0 -> 9+16 = 25: 3. Then 0,4,50,-60 (1
    # neighbour): 0 and 4 both 16: 0.
    assert s.select(agg(BULYAN_ROWS).updates) == [2, 1, 3, 0, 4]
    # S = {0, 1, 2, 3, 4}: median 2, the 3 closest 1, 2, 3.
    assert floats(s.apply(model([10.0]), agg(BULYAN_ROWS))) == [12.0]


def test_multikrum_selection_scores_once() -> None:
    s = build_strategy("bulyan", bulyan_byzantine=1, bulyan_selection="multikrum")
    # 4 neighbours of 7: 0 -> 1+4+9+16 = 30, 1 -> 1+1+4+9 = 15, 2 -> 10, 3 -> 15, 4 -> 30.
    assert s.select(agg(BULYAN_ROWS).updates) == [2, 1, 3, 0, 4]
    rng = np.random.default_rng(5)
    rows = rng.normal(size=(11, 3)).tolist()
    once = build_strategy("bulyan", bulyan_byzantine=2, bulyan_selection="multikrum")
    dist = ((np.array(rows)[:, None] - np.array(rows)[None]) ** 2).sum(axis=2)
    scores = np.sort(dist, axis=1)[:, 1:8].sum(axis=1)  # 11 - 2 - 2 = 7 neighbours
    assert once.select(agg(rows).updates) == np.argsort(scores, kind="stable")[:7].tolist()


def test_bulyan_ignores_weights_and_survives_an_attacker() -> None:
    rows = [[1.0, -1.0]] * 6 + [[-1000.0, 1000.0]]
    a = agg(rows)
    heavy = AggregateInput(1, a.mean_delta, 1.0, 7, UpdateSet(a.updates.vectors, np.arange(7.0)))  # type: ignore[union-attr]
    s = build_strategy("bulyan")
    assert floats(s.apply(model([0.0, 0.0]), heavy)) == [1.0, -1.0]


def test_bulyan_results_do_not_depend_on_block_size(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(1)
    rows = rng.normal(size=(11, 23)).tolist()
    base = model([0.0] * 23)
    s = build_strategy("bulyan", bulyan_byzantine=2)
    whole = s.apply(base, agg(rows))
    monkeypatch.setattr(strategy_base, "BLOCK_VALUES", 4)
    assert s.apply(base, agg(rows)).version == whole.version


def test_bulyan_refuses_too_few_updates_and_bad_parameters() -> None:
    with pytest.raises(ValueError, match="got 6 updates but needs 7"):
        build_strategy("bulyan").apply(model([0.0]), agg(BULYAN_ROWS[:6]))
    with pytest.raises(ValueError, match="--bulyan-byzantine must be >= 0"):
        build_strategy("bulyan", bulyan_byzantine=-1)
    with pytest.raises(ValueError, match="--bulyan-selection must be one of krum, multikrum"):
        build_strategy("bulyan", bulyan_selection="median")
    with pytest.raises(ValueError, match="does not use --krum-byzantine"):
        build_strategy("bulyan", krum_byzantine=1)


@pytest.mark.parametrize(
    ("policy", "fewest"),
    [
        (RoundPolicy(1, min_clients=2), 2),
        (RoundPolicy(1, min_clients=6, min_fit=9), 6),  # opens with 6 live: 6 selected
        (RoundPolicy(1, min_clients=10, fraction_fit=0.5), 5),  # ceil(0.5 x 10) selected
        (RoundPolicy(1, min_clients=10, clients_per_round=6), 6),
    ],
)
def test_settings_where_a_round_may_close_with_fewer_than_4f_plus_3_are_refused(
    policy: RoundPolicy, fewest: int
) -> None:
    with pytest.raises(SetupError, match=f"needs at least 7 updates .* may close with {fewest} "):
        check_round_size(policy, build_strategy("bulyan", bulyan_byzantine=1))
    if fewest >= 3:
        check_round_size(policy, build_strategy("bulyan", bulyan_byzantine=0))  # needs 3


@pytest.mark.parametrize(
    "policy",
    [
        RoundPolicy(1, min_clients=7),
        RoundPolicy(1, min_clients=8, min_fit=7, fraction_fit=0.5),
        RoundPolicy(1, min_clients=14, fraction_fit=0.5),
    ],
)
def test_settings_that_guarantee_4f_plus_3_are_accepted(policy: RoundPolicy) -> None:
    check_round_size(policy, build_strategy("bulyan", bulyan_byzantine=1))
    check_round_size(policy, build_strategy("fedavg"))


def test_cli_refuses_bulyan_with_too_small_rounds_before_touching_the_state_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedserver.cli import main

    state = tmp_path / "state"
    argv = ["run", "--task", "examples.digits:task", "--state-dir", str(state)]
    assert main([*argv, "--strategy", "bulyan", "--min-clients", "5"]) == 2
    err = capsys.readouterr().err
    assert "strategy bulyan needs at least 7 updates in every round" in err
    assert "set --min-clients to at least 7" in err
    assert not state.exists()


@pytest.mark.parametrize(("f", "needed"), [(0, 3), (1, 5), (2, 7)])
def test_cli_refuses_krum_where_a_round_may_close_with_n_at_most_2f_plus_2(
    f: int, needed: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedserver.cli import main

    state = tmp_path / "state"
    argv = ["run", "--task", "examples.digits:task", "--state-dir", str(state)]
    krum = ["--strategy", "krum", "--krum-byzantine", str(f)]
    assert main([*argv, *krum, "--min-clients", str(needed - 1)]) == 2
    err = capsys.readouterr().err
    assert f"strategy krum needs at least {needed} updates in every round" in err
    assert f"n > 2f + 2 with --krum-byzantine {f}" in err
    assert f"set --min-clients to at least {needed}" in err
    assert not state.exists()
    check_round_size(RoundPolicy(1, min_clients=needed), build_strategy("krum", krum_byzantine=f))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--strategy", "bulyan", "--secure", "secagg"], "cannot be combined with --secure"),
        (["--strategy", "bulyan", "--dp-clip", "1.0"], "cannot be combined with --dp-clip"),
        (["--strategy", "qfedavg", "--secure", "he"], "cannot be combined with --secure"),
        (["--strategy", "qfedavg", "--dp-clip", "1.0"], "cannot be combined with --dp-clip"),
        (
            ["--strategy", "qfedavg", "--mode", "async", "--buffer-size", "2"],
            "cannot be combined with strategy qfedavg",
        ),
    ],
)
def test_they_refuse_what_hides_or_merges_individual_updates(
    flags: list[str], message: str, tmp_path: Path
) -> None:
    from fedserver.cli import build_parser
    from fedserver.commands.run import server_settings
    from fedserver.coordinator.assembly import build_coordinator

    state = tmp_path / "state"
    argv = ["run", "--task", "examples.digits:task", "--state-dir", str(state)]
    settings = server_settings(build_parser().parse_args([*argv, "--min-clients", "7", *flags]))
    with pytest.raises((ValueError, SetupError), match=message):
        build_coordinator(settings)
    assert not state.exists()


# ---------------------------------------------------------------- q-FedAvg


def test_qfedavg_step_by_hand() -> None:
    # q = 1, lr = 0.5 (L = 2). Client 0: D = [1, 0], F = 1; client 1: D = [0, 2], F = 3.
    # g_0 = -2 D_0 = [-2, 0], |g_0|^2 = 4; g_1 = [0, -4], |g_1|^2 = 16.
    # h_0 = 1 * 1^0 * 4 + 2 * 1 = 6; h_1 = 1 * 3^0 * 16 + 2 * 3 = 22; sum h = 28.
    # x - (1 * g_0 + 3 * g_1) / 28 = x + [2, 12] / 28.
    s = build_strategy("qfedavg", q_param=1.0, qffl_learning_rate=0.5)
    out = s.apply(model([0.0, 0.0]), agg([[1.0, 0.0], [0.0, 2.0]], [1.0, 3.0]))
    np.testing.assert_allclose(floats(out), [2 / 28, 12 / 28], rtol=1e-6)


def test_qfedavg_with_q_zero_is_the_unweighted_mean() -> None:
    rows = [[1.0, 2.0], [3.0, -2.0], [2.0, 9.0]]
    s = build_strategy("qfedavg", q_param=0.0, qffl_learning_rate=0.3)
    out = s.apply(model([1.0, 1.0]), agg(rows, [0.1, 5.0, 2.0]))
    np.testing.assert_allclose(floats(out), [3.0, 4.0], rtol=1e-6)


@pytest.mark.parametrize("q", [0.0, 0.5, 1.0, 5.0])
def test_higher_q_weighs_the_worse_off_client_more(q: float) -> None:
    rows, losses = [[1.0], [-1.0], [3.0]], [0.5, 2.0, 1.0]
    c = build_strategy("qfedavg", q_param=q).coefficients(agg(rows, losses))
    # Relative weights are (F_k / F_j)^q; Σh only scales the whole step.
    np.testing.assert_allclose(c / c[0], [1.0, 4.0**q, 2.0**q], rtol=1e-9)


@pytest.mark.parametrize(("q", "huge"), [(2.0, 1e300), (5.0, 1e80), (0.2, 1.7e308)])
def test_a_huge_reported_loss_gets_at_most_the_whole_step_never_nan(q: float, huge: float) -> None:
    # The loss is the client's word: F^q of a finite loss overflowed to inf, the coefficients
    # became inf / inf = NaN and the published model NaN. Now that client gets (almost) all of
    # the step, its coefficient at most 1: the step is at most its own delta.
    s = build_strategy("qfedavg", q_param=q)
    rows = [[1.0, 0.0], [0.0, 2.0]]
    c = s.coefficients(agg(rows, [1.0, huge]))
    assert np.isfinite(c).all() and 0 <= c[0] < 1e-12 and c[1] == pytest.approx(1.0)
    out = s.apply(model([0.5, 0.5]), agg(rows, [1.0, huge]))
    np.testing.assert_allclose(floats(out), [0.5, 2.5], rtol=1e-6)
    # Every loss 0 and every delta 0: a zero step, not 0 / 0.
    zero = s.coefficients(agg([[0.0, 0.0], [0.0, 0.0]], [0.0, 0.0]))
    assert np.isfinite(zero).all()


def test_qfedavg_asks_for_the_loss_only_when_it_reads_loss_before_training() -> None:
    assert build_strategy("qfedavg").round_config(1) == {LOSS: "1"}
    flower = build_strategy("qfedavg", qffl_loss_metric="train_loss")
    assert flower.round_config(1) == {}
    assert flower.update_metrics == ("train_loss",)


def test_qfedavg_checks_each_updates_loss() -> None:
    s = build_strategy("qfedavg")
    assert s.check_update_metrics({LOSS: 0.0, "train_loss": 1.0}) is None
    missing = s.check_update_metrics({"train_loss": 1.0})
    assert missing is not None and "reads metric loss_before_training" in missing
    negative = s.check_update_metrics({LOSS: -0.5})
    assert negative is not None and ">= 0, got -0.5" in negative
    assert build_strategy("fedavg").check_update_metrics({}) is None
    with pytest.raises(ValueError, match="--q-param must be >= 0"):
        build_strategy("qfedavg", q_param=-1.0)
    with pytest.raises(ValueError, match="--qffl-learning-rate must be > 0"):
        build_strategy("qfedavg", qffl_learning_rate=0.0)


def test_qfedavg_results_do_not_depend_on_block_size(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(2)
    rows, losses = rng.normal(size=(5, 23)).tolist(), rng.uniform(0, 3, size=5).tolist()
    base = model([0.0] * 23)
    s = build_strategy("qfedavg", q_param=2.0)
    whole = s.apply(base, agg(rows, losses))
    monkeypatch.setattr(strategy_base, "BLOCK_VALUES", 4)
    assert s.apply(base, agg(rows, losses)).version == whole.version


def test_spool_keeps_the_metrics_the_strategy_reads_beside_each_row(tmp_path: Path) -> None:
    spool = UpdateSpool(3, tmp_path, ("train_loss",))
    for i in range(3):
        update = staged(tmp_path, np.full(3, i, dtype=np.float32))
        spool.append(update, 1.0, {"train_loss": 0.5 * i, "train_accuracy": 0.9})
        update.discard()
    assert spool.metrics == {"train_loss": [0.0, 0.5, 1.0]}
    np.testing.assert_array_equal(spool.matrix()[:, 0], [0, 1, 2])
    spool.close()


# ---------------------------------------------------------------- the client's loss


def test_fedclient_reports_the_received_models_loss_when_the_round_asks() -> None:
    import torch

    from examples.digits import task
    from fedclient.local_update import local_update
    from fedclient.partition import Partition
    from fedclient.task import TrainConfig
    from fedcore.selection import Selection
    from fedcore.tensors import to_state_dict

    data = task.load_partition(Partition(0, 3))
    base = task.initial_model(0)
    everything = Selection.everything(base.manifest.floats())
    asked = TrainConfig(seed=3, extra={LOSS: "1"})
    result, vector = local_update(task, task.build_model(), data, base, asked, everything)
    plain, plain_vector = local_update(
        task, task.build_model(), data, base, TrainConfig(seed=3), everything
    )
    # Training is the same whether or not the loss was asked for; only the metric is added.
    assert vector.tobytes() == plain_vector.tobytes()
    assert LOSS not in plain.metrics
    assert result.metrics == plain.metrics | {LOSS: result.metrics[LOSS]}
    fresh = task.build_model()
    fresh.load_state_dict(to_state_dict(base))
    with torch.no_grad():
        assert result.metrics[LOSS] == task.evaluate(fresh, data.train)["loss"]
    assert result.metrics[LOSS] > result.metrics["train_loss"]  # the untrained model's
