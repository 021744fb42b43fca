"""Client-level DP math (fedcore/privacy.py), the coordinator's DP ledger and the wrapper that
puts it around a round protocol (fedserver/protocols/dp.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from examples.digits import task
from fedclient.local_update import privatize
from fedcore.codecs import get_codec
from fedcore.privacy import (
    Accountant,
    DPConfig,
    add_gaussian_noise,
    client_noise_std,
    effective_noise_multiplier,
    l2_clip,
    mean_noise_std,
    sample_rate,
)
from fedcore.tensors import float_vector
from fedserver.coordinator.assembly import CoordinatorSettings, SetupError, build_coordinator
from fedserver.coordinator.central_eval import initial_model
from fedserver.coordinator.lifecycle import Coordinator
from fedserver.coordinator.offers import TrainingDefaults
from fedserver.protocols.base import (
    Aggregate,
    Contribution,
    Opening,
    ProtocolEnv,
    ProtocolSettings,
    RoundProtocol,
)
from fedserver.protocols.dp import DifferentialPrivacy, DPWrapper
from fedserver.protocols.dp_ledger import DPServer
from fedserver.protocols.plain import PlainProtocol
from fedserver.protocols.registry import PROTOCOLS, protocol_refusal
from fedserver.rounds.synchronous import RoundPolicy
from fedserver.state.store import StateStore
from fedserver.strategies import build_strategy
from fedserver.updates.messages import SubmitHeader

pytestmark = pytest.mark.timeout(60)


# ---------------------------------------------------------------- clipping
@settings(max_examples=60, deadline=None)
@given(
    scale=st.floats(1e-6, 1e4),
    clip=st.floats(1e-3, 100.0),
    seed=st.integers(0, 2**31),
    size=st.integers(1, 500),
)
def test_clip_bounds_norm_and_keeps_direction(
    scale: float, clip: float, seed: int, size: int
) -> None:
    v = (np.random.default_rng(seed).standard_normal(size) * scale).astype(np.float32)
    out = l2_clip(v, clip)
    norm_in = float(np.linalg.norm(v.astype(np.float64)))
    norm_out = float(np.linalg.norm(out.astype(np.float64)))
    assert out.dtype == np.float32
    assert norm_out <= clip
    if norm_in <= clip:
        assert np.array_equal(out, v)  # small updates pass untouched
    else:
        assert norm_out == pytest.approx(clip, rel=1e-5)
        cos = float(out.astype(np.float64) @ v.astype(np.float64)) / (norm_in * norm_out)
        assert cos == pytest.approx(1.0, abs=1e-6)


def test_clip_zero_vector_and_input_not_modified() -> None:
    zero = np.zeros(10, np.float32)
    assert np.array_equal(l2_clip(zero, 1.0), zero)
    v = np.full(4, 3.0, np.float32)  # norm 6
    out = l2_clip(v, 1.5)
    assert np.array_equal(v, np.full(4, 3.0, np.float32))
    np.testing.assert_allclose(out, np.full(4, 0.75), rtol=1e-5)


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="dp-clip"):
        DPConfig(0.0, 1.0)
    with pytest.raises(ValueError, match="noise-multiplier"):
        DPConfig(1.0, -1.0)
    with pytest.raises(ValueError, match="dp-delta"):
        DPConfig(1.0, 1.0, delta=1.0)


# ---------------------------------------------------------------- noise scale
def test_noise_formulas() -> None:
    assert mean_noise_std(1.2, 0.5, 4) == pytest.approx(0.15)
    assert client_noise_std(1.2, 0.5, 4) == pytest.approx(0.3)  # sqrt(4) * 0.3^2 = (0.6)^2
    assert effective_noise_multiplier(1.0, 8, 6) == pytest.approx(math.sqrt(6 / 8))
    assert sample_rate(3, 10) == pytest.approx(0.3)
    assert sample_rate(5, 3) == 1.0


def test_coordinator_noise_has_std_zC_over_n() -> None:
    dim, z, clip, n = 200_000, 1.3, 0.7, 5
    server = DPServer(DPConfig(clip, z, 1e-5), seed=1234)
    mean = np.linspace(-1, 1, dim).astype(np.float32)
    noised, metrics = server.privatize(mean, contributed=n, selected=n, available=10)
    noise = noised.astype(np.float64) - mean
    expected = z * clip / n
    # With 200k draws the sample std is within 1% of the truth with overwhelming probability.
    assert noise.std() == pytest.approx(expected, rel=0.01)
    assert abs(noise.mean()) < 5 * expected / math.sqrt(dim)
    assert metrics["dp_noise_multiplier"] == z
    assert metrics["dp_sample_rate"] == pytest.approx(0.5)


def test_split_noise_sums_to_the_same_std() -> None:
    """Secure aggregation: n clients' noise shares sum to N(0, (zC)^2), mean std z*C/n."""
    dim, z, clip, n = 100_000, 1.0, 2.0, 8
    rng = np.random.default_rng(7)
    std = client_noise_std(z, clip, n)
    total = sum(
        add_gaussian_noise(np.zeros(dim, np.float32), std, rng).astype(np.float64) for _ in range(n)
    )
    assert (total / n).std() == pytest.approx(z * clip / n, rel=0.01)


def test_client_privatize_clips_and_adds_split_noise() -> None:
    delta = np.full(50_000, 1.0, np.float32)  # norm ~224
    clipped = privatize(delta, {"dp_clip": "2.0"})
    assert np.linalg.norm(clipped.astype(np.float64)) <= 2.0
    noised = privatize(delta, {"dp_clip": "2.0", "dp_client_noise_std": "0.5"})
    assert (noised - clipped).std() == pytest.approx(0.5, rel=0.02)
    assert np.array_equal(privatize(delta, {}), delta)  # DP off: untouched


def test_secagg_mode_adds_no_coordinator_noise_and_accounts_dropouts() -> None:
    server = DPServer(DPConfig(1.0, 1.0, 1e-5), noise_on_clients=True, seed=0)
    assert server.round_extra(4) == {"dp_clip": "1.0", "dp_client_noise_std": "0.5"}
    mean = np.ones(10, np.float32)
    out, metrics = server.privatize(mean, contributed=6, selected=8, available=8)
    assert np.array_equal(out, mean)
    assert metrics["dp_noise_multiplier"] == pytest.approx(math.sqrt(6 / 8))


# ---------------------------------------------------------------- accounting
def test_epsilon_matches_opacus_rdp_analysis() -> None:
    """Our ledger equals Opacus' own analysis functions for a known configuration."""
    z, q, steps, delta = 1.1, 0.1, 50, 1e-5
    acc = Accountant()
    for _ in range(steps):
        acc.step(z, q)
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = compute_rdp(q=q, noise_multiplier=z, steps=steps, orders=orders)
    expected, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    assert acc.epsilon(delta) == pytest.approx(expected, rel=1e-9)
    assert acc.history == [(z, q, steps)]


def test_epsilon_full_participation_matches_gaussian_closed_form() -> None:
    """q = 1: T rounds of the Gaussian mechanism have RDP T*a/(2 z^2) at order a; convert with
    Balle et al. 2020 (the conversion Opacus uses) and minimize over Opacus' orders."""
    z, steps, delta = 2.0, 10, 1e-5
    acc = Accountant()
    for _ in range(steps):
        acc.step(z, 1.0)
    orders = np.array([a for a in RDPAccountant.DEFAULT_ALPHAS if a > 1], dtype=np.float64)
    rdp = steps * orders / (2 * z**2)
    eps = rdp + np.log((orders - 1) / orders) - (np.log(delta) + np.log(orders)) / (orders - 1)
    assert acc.epsilon(delta) == pytest.approx(float(eps.min()), rel=1e-6)


def test_epsilon_grows_per_round_and_resumes_exactly() -> None:
    cfg = DPConfig(1.0, 0.8, 1e-5)
    server = DPServer(cfg, seed=0)
    history = []
    for _ in range(4):
        _, metrics = server.privatize(np.zeros(3, np.float32), 3, 3, 10)
        history.append(metrics)
    eps = [m["epsilon"] for m in history]
    assert eps == sorted(eps) and eps[0] > 0
    resumed = DPServer(cfg, seed=0)
    resumed.resume(history[:2])
    for _ in range(2):
        _, metrics = resumed.privatize(np.zeros(3, np.float32), 3, 3, 10)
    assert metrics["epsilon"] == pytest.approx(eps[-1], rel=1e-12)


def test_zero_noise_records_no_epsilon() -> None:
    server = DPServer(DPConfig(1.0, 0.0), seed=0)
    out, metrics = server.privatize(np.ones(3, np.float32), 2, 2, 2)
    assert "epsilon" not in metrics
    assert np.array_equal(out, np.ones(3, np.float32))


# ---------------------------------------------------------------- the wrapper
class Sealed(RoundProtocol):
    """A toy protocol that declares no place for DP noise (RoundProtocol.noise stays None)."""

    def __init__(self, settings: ProtocolSettings, env: ProtocolEnv) -> None:
        self.settings = settings

    def open(self, opening: Opening) -> None:
        return None

    def accept(self, contribution: Contribution) -> None:
        return None

    async def aggregate(self) -> Aggregate:
        raise AssertionError("never aggregated")


class Seen(PlainProtocol):
    """Plain aggregation that remembers what each contribution was handed in with."""

    seen: list[tuple[str, float, float]] = []

    def accept(self, c: Contribution) -> None:
        self.seen.append((c.client_id, c.weight, c.scale))
        super().accept(c)


def _coordinator(store: StateStore, secure: str, dp: DPWrapper | None) -> Coordinator:
    return Coordinator(
        store,
        build_strategy("fedavg"),
        RoundPolicy(total_rounds=1, min_clients=2, round_timeout=60.0),
        initial_model(task, 0),
        secure=secure,
        protocol_wrappers=(dp,) if dp else (),
    )


def test_the_dp_wrapper_refuses_a_protocol_that_declares_no_noise_placement(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(PROTOCOLS, "sealed", Sealed)
    dp = DPWrapper(DPConfig(1.0, 1.0), seed=0)
    why = "--dp-clip cannot be combined with round protocol 'sealed': it declares no place"
    assert why in (protocol_refusal(ProtocolSettings("sealed"), [dp]) or "")
    assert protocol_refusal(ProtocolSettings("sealed"), []) is None
    for name in ("none", "secagg", "he", "buffered"):  # every shipped protocol says where
        assert protocol_refusal(ProtocolSettings(name), [dp]) is None, name
    # The wrapper's other refusals, in the same place: what its noise would not cover.
    robust = protocol_refusal(ProtocolSettings("none", keep_updates=True), [dp]) or ""
    assert "reads every individual update" in robust and "--dp-clip" in robust
    partial = protocol_refusal(ProtocolSettings("none", partial_rounds=True), [dp]) or ""
    assert partial.startswith("--train-tensors cannot be combined with --dp-clip")
    store = StateStore(tmp_path / "state")
    try:
        with pytest.raises(ValueError, match="round protocol 'sealed': it declares no place"):
            _coordinator(store, "sealed", dp)
        assert isinstance(_coordinator(store, "sealed", None).protocol, Sealed)  # no DP: fine
    finally:
        store.close()
    # `fedserver run` refuses it in the same words, before the state dir is touched.
    settings = CoordinatorSettings(
        task="examples.digits:task",
        state_dir=tmp_path / "fresh",
        policy=RoundPolicy(total_rounds=1),
        defaults=TrainingDefaults(),
        dp=DPConfig(1.0, 1.0),
        secure="sealed",
    )
    with pytest.raises(SetupError, match="round protocol 'sealed': it declares no place"):
        build_coordinator(settings)
    assert not (tmp_path / "fresh").exists()
    partial_run = dataclasses.replace(
        settings, secure="none", defaults=TrainingDefaults(train_tensors="0.*")
    )
    with pytest.raises(SetupError, match="--train-tensors cannot be combined with --dp-clip"):
        build_coordinator(partial_run)
    assert not (tmp_path / "fresh").exists()


@pytest.mark.parametrize("with_dp", [False, True])
def test_the_weight_becomes_one_and_the_update_is_reclipped_only_in_the_wrapper(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, with_dp: bool
) -> None:
    monkeypatch.setitem(PROTOCOLS, "seen", Seen)
    monkeypatch.setattr(Seen, "seen", [])
    dp = DPWrapper(DPConfig(1.0, 0.0), seed=0) if with_dp else None

    async def scenario() -> Coordinator:
        store = StateStore(tmp_path / "state")
        coord = _coordinator(store, "seen", dp)
        base = coord.model
        n = float_vector(base).size
        codec = get_codec("fp32")
        wire = codec.wire_manifest(base.manifest.floats())
        for client in ("small", "huge"):
            coord.touch(client, {})
        for client, examples, value in (("small", 30, 0.0), ("huge", 10, 50.0)):
            payload = codec.encode(np.full(n, value, np.float32)).tobytes()
            header = SubmitHeader(client, 1, base.version, examples, {}, "fp32", wire, len(payload))
            pending = coord.begin_submit(header)
            pending.receiver.add(payload)
            coord.finish_submit(pending, hashlib.sha256(payload).hexdigest())
        await asyncio.wait_for(coord.done.wait(), 30)
        store.close()
        return coord

    coord = asyncio.run(scenario())
    assert coord.failure is None and coord.machine.rounds_completed == 1
    inner = coord.protocol
    if with_dp:
        assert isinstance(inner, DifferentialPrivacy)
        inner = inner.inner
    assert isinstance(inner, Seen) and not isinstance(inner, DifferentialPrivacy)
    (small, small_w, small_s), (huge, huge_w, huge_s) = Seen.seen
    assert (small, huge) == ("small", "huge")
    if with_dp:  # unweighted, and the update above C re-clipped (an honest zero one is not)
        assert (small_w, huge_w, small_s) == (1.0, 1.0, 1.0) and 0 < huge_s < 1e-3
    else:  # the coordinator hands the protocol example weights and no scale
        assert (small_w, huge_w, small_s, huge_s) == (30.0, 10.0, 1.0, 1.0)
