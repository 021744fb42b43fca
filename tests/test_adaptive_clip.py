"""Adaptive clipping (Andrew et al., NeurIPS 2021): the clip-norm math, its accounting, and the
DP wrapper's two variants, in process (the real-process run is test_adaptive_clip_e2e.py)."""

from __future__ import annotations

import asyncio
import hashlib
import math
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pytest
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp

from examples.digits import task
from fedclient.local_update import clip_bit, privatize, report_clip_bit
from fedcore.codecs import get_codec
from fedcore.privacy import (
    CLIP_BIT_METRIC,
    MASKED_BIT_TENSOR,
    Accountant,
    AdaptiveClip,
    DPConfig,
    next_clip,
    noised_within_fraction,
    update_noise_multiplier,
    with_masked_bit,
)
from fedcore.tensors import Manifest, TensorSpec, float_vector
from fedserver.coordinator.assembly import CoordinatorSettings, SetupError, build_coordinator
from fedserver.coordinator.central_eval import initial_model
from fedserver.coordinator.lifecycle import Coordinator
from fedserver.coordinator.offers import TrainingDefaults
from fedserver.coordinator.tracking import run_params
from fedserver.modes.synchronous import FedAvg
from fedserver.protocols.base import ProtocolSettings
from fedserver.protocols.dp import DPWrapper
from fedserver.protocols.dp_ledger import DPServer
from fedserver.protocols.registry import protocol_refusal
from fedserver.rounds.eval_campaign import EvalPolicy
from fedserver.rounds.synchronous import RoundPolicy, SubmitRefused
from fedserver.state.store import StateStore
from fedserver.strategies import build_strategy
from fedserver.updates.messages import SubmitHeader
from fedserver.updates.receiver import BadUpdate


def _adaptive(side: str = "server", z: float = 1.0, stddev: float = 5.0, **kw: float) -> DPConfig:
    return DPConfig(kw.pop("clip", 0.1), z, 1e-5, AdaptiveClip(side, stddev, **kw))  # type: ignore[arg-type]


# ---------------------------------------------------------------- the clip-norm update
def test_geometric_update_moves_toward_the_quantile() -> None:
    # More than gamma of the updates within C: C shrinks; fewer: it grows; exactly gamma: stays.
    assert next_clip(1.0, 0.9, 0.5, 0.2) == pytest.approx(math.exp(-0.2 * 0.4))
    assert next_clip(1.0, 0.1, 0.5, 0.2) == pytest.approx(math.exp(0.2 * 0.4))
    assert next_clip(2.0, 0.5, 0.5, 0.2) == 2.0
    # The centred, noised count: no noise gives the plain fraction.
    rng = np.random.default_rng(0)
    assert noised_within_fraction(3, 4, 0.0, rng) == 0.75
    draws = [noised_within_fraction(5, 10, 2.0, rng) for _ in range(20_000)]
    assert np.mean(draws) == pytest.approx(0.5, abs=0.005)
    assert np.std(draws) == pytest.approx(2.0 / 10, rel=0.03)  # sigma_b / n on the fraction


@pytest.mark.parametrize("quantile", [0.5, 0.2, 0.8])
def test_the_clip_converges_to_the_target_quantile_of_the_norms(quantile: float) -> None:
    """Through the ledger itself (DPServer: server-side bits, noised count, geometric update):
    100 updates a round with log-normal norms; from C0 = 0.1, far below the median of about 2.7,
    the clip ends within a few % of the true quantile, with Andrew et al.'s defaults."""
    mu, sigma, n, rounds = 1.0, 0.5, 100, 300
    truth = math.exp(mu + sigma * NormalDist().inv_cdf(quantile))
    ledger = DPServer(_adaptive(stddev=n / 20, target_quantile=quantile), seed=7)
    norms_rng = np.random.default_rng(11)
    clips, within = [], []
    for _ in range(rounds):
        norms = norms_rng.lognormal(mu, sigma, n)
        clips.append(ledger.clip)
        for norm in norms:
            ledger.within += ledger.clip_bit(float(norm), {})
        within.append(ledger.within / n)
        metrics = ledger.adapt(n)
        assert metrics["dp_clip"] == clips[-1] and metrics["dp_clip_next"] == ledger.clip
    late = np.array(clips[-100:])
    assert clips[0] == 0.1
    assert math.exp(np.log(late).mean()) == pytest.approx(truth, rel=0.03)
    assert np.abs(late / truth - 1).max() < 0.15  # every late round, not only on average
    assert np.mean(within[-100:]) == pytest.approx(quantile, abs=0.03)


# ---------------------------------------------------------------- accounting
def test_update_multiplier_makes_the_combined_mechanism_z() -> None:
    """The updates (sensitivity C, noise z_delta C) and the centred count (sensitivity 1/2,
    noise sigma_b) are one Gaussian mechanism: their RDP at every order, per Opacus' own
    analysis, adds up to that of a single Gaussian with multiplier z, for q = 1 (exactly
    additive) — so stepping the accountant with z (any q) accounts for both."""
    z, stddev = 1.3, 2.5
    z_delta = update_noise_multiplier(z, stddev)
    assert z_delta == pytest.approx((z**-2 - (2 * stddev) ** -2) ** -0.5)
    assert z_delta > z
    orders = RDPAccountant.DEFAULT_ALPHAS
    parts = compute_rdp(q=1.0, noise_multiplier=z_delta, steps=1, orders=orders) + compute_rdp(
        q=1.0, noise_multiplier=2 * stddev, steps=1, orders=orders
    )
    whole = compute_rdp(q=1.0, noise_multiplier=z, steps=1, orders=orders)
    assert np.allclose(parts, whole, rtol=1e-12)
    assert update_noise_multiplier(0.0, 0.0) == 0.0  # no noise: clipping only
    with pytest.raises(ValueError, match=r"raise --dp-clipped-count-stddev above 0\.5"):
        update_noise_multiplier(1.0, 0.5)  # 2 sigma_b must exceed z
    with pytest.raises(ValueError, match="dp-clipped-count-stddev"):
        DPConfig(0.1, 1.0, 1e-5, AdaptiveClip("server", 0.15))  # 3 clients / 20


def test_epsilon_equals_the_accountants_for_the_combined_z_and_noise_uses_this_rounds_clip() -> (
    None
):
    z, q, n, dim = 0.9, 0.25, 4, 200_000
    ledger = DPServer(_adaptive(z=z, stddev=2.0, clip=1.0), seed=3)
    reference = RDPAccountant()
    for round_no in range(1, 4):
        clip = ledger.clip
        ledger.within = round_no % 2 * n  # all within, then none: the clip moves both ways
        adapted = ledger.adapt(n)
        assert ledger.clip != clip
        noised, metrics = ledger.privatize(np.zeros(dim, np.float32), n, n, int(n / q), clip)
        reference.step(noise_multiplier=z, sample_rate=q)
        assert metrics["dp_noise_multiplier"] == z and metrics["dp_sample_rate"] == q
        assert metrics["epsilon"] == pytest.approx(reference.get_epsilon(1e-5), rel=1e-9)
        z_delta = adapted["dp_update_noise_multiplier"]
        assert z_delta == pytest.approx(update_noise_multiplier(z, 2.0))
        # The mean's noise is z_delta * C_t / n with C_t the clip the updates were clipped to.
        assert float(np.std(noised)) == pytest.approx(z_delta * clip / n, rel=0.01)
    # A restarted coordinator continues both the accountant and the clip exactly.
    past = [{"dp_noise_multiplier": z, "dp_sample_rate": q, "dp_clip_next": c} for c in (0.5, 0.7)]
    resumed = DPServer(_adaptive(z=z, stddev=2.0, clip=1.0), seed=0)
    resumed.resume(past)
    assert resumed.clip == 0.7
    again = Accountant([(z, q, 2)])
    assert resumed.accountant.epsilon(1e-5) == pytest.approx(again.epsilon(1e-5), rel=1e-12)


# ---------------------------------------------------------------- the two variants' wire
def test_server_side_tells_clients_nothing_client_side_asks_for_the_bit() -> None:
    server = DPServer(_adaptive("server", clip=0.3), seed=0)
    assert server.round_extra(5) == {}  # clients send unclipped updates: C_t is measured here
    client = DPServer(_adaptive("client", clip=0.3), seed=0)
    extra = client.round_extra(5)
    assert extra == {"dp_clip": "0.3", "dp_report_clip_bit": "1"}
    # The client reports the bit of its norm *before* clipping, then clips.
    big, small = np.full(4, 1.0, np.float32), np.full(4, 0.1, np.float32)  # norms 2.0, 0.2
    assert clip_bit(big, extra) == 0.0 and clip_bit(small, extra) == 1.0
    sent = Manifest((TensorSpec("w", "float32", (4,)),))
    clipped = privatize(big, extra)
    assert float(np.linalg.norm(clipped)) <= 0.3
    out, manifest, report = report_clip_bit(0.0, clipped, sent, extra)
    assert report == {CLIP_BIT_METRIC: 0.0} and manifest == sent and out is clipped
    assert clip_bit(big, {"dp_clip": "0.3"}) is None  # a fixed clip asks for nothing
    assert client.clip_bit(None, {CLIP_BIT_METRIC: 1.0}) is True
    for bad in ({}, {CLIP_BIT_METRIC: 0.5}):
        with pytest.raises(BadUpdate, match=r"must be 1 .* or 0") as e:
            client.clip_bit(None, bad)
        assert e.value.reason == "bad_metrics"


def test_under_secagg_the_bit_travels_masked_with_its_share_of_the_count_noise() -> None:
    cfg = _adaptive("client", z=1.0, stddev=2.0, clip=0.3)
    ledger = DPServer(cfg, noise_on_clients=True, seed=0)
    extra = ledger.round_extra(4)
    assert extra["dp_report_clip_bit"] == "masked"  # never a metric the coordinator reads
    # The update's share is z_delta's, the count's sigma_b / sqrt(n): both sum to the whole.
    assert float(extra["dp_client_noise_std"]) == pytest.approx(
        cfg.update_noise_multiplier * 0.3 / 2
    )
    assert float(extra["dp_client_count_noise_std"]) == pytest.approx(2.0 / 2)
    sent = Manifest((TensorSpec("w", "float32", (4,)),))
    big = np.full(4, 1.0, np.float32)
    quiet = extra | {"dp_client_count_noise_std": "0", "dp_client_noise_std": "0"}
    out, manifest, report = report_clip_bit(
        clip_bit(big, quiet), privatize(big, quiet), sent, quiet
    )
    assert report == {} and out.size == 5 and out[-1] == 0.0
    assert manifest == with_masked_bit(sent) and manifest.tensors[-1].name == MASKED_BIT_TENSOR
    noised, _, _ = report_clip_bit(1.0, np.zeros(4, np.float32), sent, extra)
    assert noised[-1] != 1.0  # this client's share of sigma_b is in the masked value
    # The coordinator adapts from the unmasked sum as it is: no noise of its own on top.
    exact = DPServer(_adaptive("client", z=0.0, stddev=3.0, clip=1.0), noise_on_clients=True)
    metrics = exact.adapt(4, masked_sum=1.0)
    assert metrics["dp_within_clip_fraction"] == 0.25
    assert metrics["dp_clip_next"] == pytest.approx(math.exp(-0.2 * (0.25 - 0.5)))


@pytest.mark.parametrize("masked_sum", [1e6, -1e6, -1e300, float("nan"), float("inf"), 4 + 6.6])
def test_a_masked_bit_sum_no_honest_round_gives_keeps_the_clip_and_never_raises(
    masked_sum: float, caplog: pytest.LogCaptureFixture
) -> None:
    # One client under secagg/HE masks 1e6 (or -1e6...) instead of 0/1 in dp:within_clip. It
    # drove the clip to 0 for good (every later update zeroed) or raised OverflowError in
    # exp(), which failed the round and stopped the federation.
    ledger = DPServer(_adaptive("client", z=1.0, stddev=1.0, clip=0.5), noise_on_clients=True)
    metrics = ledger.adapt(4, masked_sum=masked_sum)
    assert ledger.clip == 0.5
    assert metrics["dp_clip"] == metrics["dp_clip_next"] == 0.5
    assert "dp_within_clip_fraction" not in metrics
    assert "outside what 4 updates of 0 or 1" in caplog.text and "dp:within_clip" in caplog.text
    # What honest clients give, their count noise included (6 stddevs), still moves the clip.
    for honest in (-5.9, 0.0, 4.0, 9.9):
        moved = DPServer(_adaptive("client", z=1.0, stddev=1.0, clip=0.5), noise_on_clients=True)
        assert moved.adapt(4, masked_sum=honest)["dp_clip_next"] == pytest.approx(
            next_clip(0.5, honest / 4, 0.5, 0.2)
        )


def test_adaptive_clipping_is_refused_where_it_cannot_be_sound(tmp_path: Path) -> None:
    dp = DPWrapper(_adaptive("client"), seed=0)
    # plain, --mode async, and secagg/he (the bit is masked inside the update): sound
    for name in ("none", "buffered", "secagg", "he"):
        assert protocol_refusal(ProtocolSettings(name), [dp]) is None
    server = DPWrapper(_adaptive("server"), seed=0)
    for name in ("secagg", "he"):
        why = protocol_refusal(ProtocolSettings(name), [server]) or ""
        assert why.startswith(f"--dp-adaptive-clip server cannot be combined with --secure {name}")
        assert "sees no update's norm" in why
    settings = CoordinatorSettings(
        task="examples.digits:task",
        state_dir=tmp_path / "fresh",
        policy=RoundPolicy(total_rounds=1),
        defaults=TrainingDefaults(),
        dp=_adaptive("server"),
        secure="secagg",
    )
    with pytest.raises(SetupError, match="--dp-adaptive-clip server cannot be combined with --s"):
        build_coordinator(settings)
    assert not (tmp_path / "fresh").exists()


def _round(
    tmp_path: Path, side: str, sent: list[tuple[str, float, dict[str, float]]]
) -> tuple[Coordinator, dict[str, float], list[str]]:
    """One real round through the Coordinator's intake: (client, value of every coordinate,
    metrics) each; fedavg, z = 0 so the mean is exactly the clipped mean. Returns the
    coordinator, the committed round's metrics and the receipts' stored metrics (JSON)."""
    dp = DPWrapper(DPConfig(1.0, 0.0, 1e-5, AdaptiveClip(side, 0.0)), seed=0)  # type: ignore[arg-type]

    async def scenario() -> tuple[Coordinator, dict[str, float], list[str]]:
        store = StateStore(tmp_path / "state")
        coord = Coordinator(
            store,
            build_strategy("fedavg"),
            RoundPolicy(total_rounds=1, min_clients=len(sent), round_timeout=60.0),
            initial_model(task, 0),
            protocol_wrappers=(dp,),
        )
        base = coord.model
        n = float_vector(base).size
        codec = get_codec("fp32")
        wire = codec.wire_manifest(base.manifest.floats())
        for client, _, _ in sent:
            coord.touch(client, {})
        for client, value, metrics in sent:
            payload = codec.encode(np.full(n, value / math.sqrt(n), np.float32)).tobytes()
            header = SubmitHeader(client, 1, base.version, 5, metrics, "fp32", wire, len(payload))
            try:  # a bad clip bit is refused at the header, anything else after the bytes
                pending = coord.begin_submit(header)
                pending.receiver.add(payload)
                coord.finish_submit(pending, hashlib.sha256(payload).hexdigest())
            except (BadUpdate, SubmitRefused) as e:
                coord.failure = f"refused {client}: {e}"
                break
        else:
            await asyncio.wait_for(coord.done.wait(), 30)
        records = store.rounds()
        stored = [r[0] for r in store.db.execute("SELECT metrics FROM receipts").fetchall()]
        store.close()
        return coord, records[0].metrics if records else {}, stored

    return asyncio.run(scenario())


def test_server_side_round_records_the_clip_and_counts_measured_norms(tmp_path: Path) -> None:
    # Norms 0.5, 3 and 4 against C = 1: one within. The clients' own bits are not asked for.
    coord, m, _ = _round(tmp_path, "server", [("a", 0.5, {}), ("b", 3.0, {}), ("c", 4.0, {})])
    assert coord.failure is None
    assert m["dp_clip"] == 1.0 and m["dp_within_clip_fraction"] == pytest.approx(1 / 3)
    assert m["dp_clip_next"] == pytest.approx(math.exp(-0.2 * (1 / 3 - 0.5)))
    # The update's norm after the coordinator's clip: (0.5 + 1 + 1) / 3 of the unit direction.
    moved = float_vector(coord.model) - float_vector(initial_model(task, 0))
    assert float(np.linalg.norm(moved)) == pytest.approx(2.5 / 3, rel=1e-5)


def test_client_side_bits_are_counted_never_recorded_and_required(tmp_path: Path) -> None:
    bits = [
        ("a", 0.5, {CLIP_BIT_METRIC: 1.0, "train_loss": 0.25}),
        ("b", 0.9, {CLIP_BIT_METRIC: 0.0, "train_loss": 0.75}),
    ]
    coord, metrics, receipts = _round(tmp_path / "ok", "client", bits)
    assert coord.failure is None
    assert metrics["dp_within_clip_fraction"] == 0.5  # the clients' word, not the norm
    assert metrics["client_train_loss"] == 0.5
    assert not [k for k in metrics if k.startswith("client_dp")]
    assert len(receipts) == 2 and all("train_loss" in r and "dp_" not in r for r in receipts)
    refused, _, _ = _round(tmp_path / "bad", "client", [("a", 0.5, {}), ("b", 0.5, {})])
    assert refused.failure is not None and "dp_within_clip" in refused.failure


@pytest.mark.parametrize("bit", [1e9, -5.0, 0.5])
def test_a_client_bit_other_than_0_or_1_is_refused_not_counted(bit: float, tmp_path: Path) -> None:
    # In plain mode a bit of 1e9 would be one client steering the clip by itself.
    sent = [("a", 0.5, {CLIP_BIT_METRIC: 1.0}), ("b", 0.5, {CLIP_BIT_METRIC: bit})]
    coord, metrics, _ = _round(tmp_path, "client", sent)
    assert coord.failure is not None and "refused b" in coord.failure
    assert f"must be 1 (norm within the round's clip) or 0, got {bit!r}" in coord.failure
    assert metrics == {} and coord.protocol.ledger.within == 1  # only a's bit  # type: ignore[attr-defined]
    for bad in ({}, {CLIP_BIT_METRIC: bit}):  # missing or wrong: refused before the bytes
        with pytest.raises(BadUpdate, match=r"must be 1 .* or 0") as e:
            coord.begin_submit(
                SubmitHeader(
                    "b", 1, coord.model.version, 5, bad, "fp32", coord.round_selection().manifest, 4
                )
            )
        assert e.value.reason == "bad_metrics" and coord.uploads.in_flight == 0
    with pytest.raises(BadUpdate, match="NaN or Inf") as e:  # refused at the header
        coord.begin_submit(
            SubmitHeader(
                "b",
                1,
                coord.model.version,
                5,
                {CLIP_BIT_METRIC: math.nan},
                "fp32",
                coord.round_selection().manifest,
                4,
            )
        )
    assert e.value.reason == "non_finite"


def test_tracking_records_the_adaptive_parameters() -> None:
    params = run_params(
        task="examples.digits:task",
        strategy=build_strategy("fedavg"),
        defaults=TrainingDefaults(),
        policy=RoundPolicy(total_rounds=1),
        eval_policy=EvalPolicy(),
        privacy=_adaptive("client", z=0.7, stddev=2.0, target_quantile=0.3),
        mode=FedAvg(),
        secure="none",
        seed=0,
    )
    assert params["dp.clip"] == "0.1" and params["dp.noise_multiplier"] == "0.7"
    assert params["dp.adaptive.side"] == "client"
    assert params["dp.adaptive.target_quantile"] == "0.3"
    assert params["dp.adaptive.count_stddev"] == "2.0" and params["dp.adaptive.lr"] == "0.2"


def test_flowers_sign_convention_drives_the_clip_away_from_the_quantile() -> None:
    """docs/algorithms.md, conventions 1: Flower 1.41 counts *clipped* updates (norm_bit =
    scaling_factor < 1) into the paper's update C * exp(-lr (fraction - target)). Fed the same
    log-normal norms (no count noise), that rule takes C towards 0 from below the median, where
    the paper's, which counts updates within the clip, settles on the median."""
    norms_rng = np.random.default_rng(5)
    ours = flowers = 0.1
    for _ in range(200):
        norms = norms_rng.lognormal(1.0, 0.5, 100)
        ours = next_clip(ours, float(np.mean(norms <= ours)), 0.5, 0.2)
        flowers = next_clip(flowers, float(np.mean(norms > flowers)), 0.5, 0.2)
    assert ours == pytest.approx(math.e, rel=0.1)  # the median of the norms
    assert flowers < 1e-3
