"""Central DP without trusting the clients: the coordinator re-clips what it sees in plain,
noise goes on the clients whenever the coordinator (or a key holder) sees only sums, and ε is
computed off the event loop. Pure: the real Coordinator in process, no gRPC (the servicer's part
is in tests/test_dp_trust_e2e.py)."""

from __future__ import annotations

import asyncio
import hashlib
import math
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from examples.digits import task
from fedclient.local_update import privatize
from fedcore.codecs import get_codec
from fedcore.privacy import Accountant, DPConfig, clip_factor, l2_clip
from fedcore.tensors import FlatModel, float_vector, iter_chunks
from fedserver.coordinator.assembly import CoordinatorSettings, build_coordinator
from fedserver.coordinator.central_eval import initial_model
from fedserver.coordinator.lifecycle import Coordinator
from fedserver.coordinator.offers import TrainingDefaults
from fedserver.protocols.dp import DifferentialPrivacy, DPWrapper
from fedserver.protocols.dp_ledger import DPServer
from fedserver.rounds.synchronous import RoundPolicy
from fedserver.state.store import StateStore
from fedserver.strategies import build_strategy
from fedserver.updates.accumulator import Accumulator
from fedserver.updates.messages import SubmitHeader
from fedserver.updates.receiver import StagedUpdate, UpdateReceiver

pytestmark = pytest.mark.timeout(120)

CLIP = 1.0


def _stage(tmp: Path, codec_name: str, vector: np.ndarray) -> StagedUpdate:
    """`vector` encoded with a codec and received the way the coordinator receives updates."""
    codec = get_codec(codec_name)
    payload = codec.encode(vector.astype(np.float32)).tobytes()
    receiver = UpdateReceiver(
        codec, vector.size, len(payload), tmp / "spill", "sha256", track_norm=True
    )
    for chunk in iter_chunks(payload, 1000):  # values split across chunks
        receiver.add(bytes(chunk))
    return receiver.finish(hashlib.sha256(payload).hexdigest())


def _norm(v: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(v, dtype=np.float64)))


# ---------------------------------------------------------------- the re-clip, alone
@pytest.mark.parametrize("codec_name", ["fp32", "fp16", "int8", "topk"])
def test_receiver_measures_the_norm_of_the_decoded_update(tmp_path: Path, codec_name: str) -> None:
    """What is clipped is the delta as decoded (fp16/int8 rounding, top-k's kept values)."""
    vector = np.random.default_rng(1).normal(0, 3.0, 5000).astype(np.float32)
    staged = _stage(tmp_path, codec_name, vector)
    decoded = get_codec(codec_name).decode(
        b"".join(staged.file.blocks()), vector.size
    )  # the same bytes, decoded in one go
    assert staged.norm == pytest.approx(_norm(decoded), rel=1e-12)
    staged.discard()


def test_clip_factor_is_exactly_one_within_the_bound() -> None:
    assert clip_factor(0.0, CLIP) == 1.0
    assert clip_factor(CLIP, CLIP) == 1.0
    assert clip_factor(0.3, CLIP) == 1.0
    assert clip_factor(4.0, CLIP) == pytest.approx(0.25, rel=1e-5) and clip_factor(4.0, CLIP) < 0.25


@pytest.mark.parametrize("codec_name", ["fp32", "fp16", "int8", "topk"])
def test_reclip_bounds_a_huge_update_and_leaves_an_honest_one_bit_for_bit(
    tmp_path: Path, codec_name: str
) -> None:
    rng = np.random.default_rng(2)
    dp = DPServer(DPConfig(CLIP, 0.0), seed=0)
    huge = rng.normal(0, 100.0, 5000).astype(np.float32)  # norm ~7000: a dishonest client
    honest = l2_clip(rng.normal(0, 0.01, 5000).astype(np.float32), CLIP)  # norm ~0.7

    acc = Accumulator(huge.size)
    staged = _stage(tmp_path, codec_name, huge)
    factor = dp.reclip_factor(staged.norm)
    assert factor < 1.0
    acc.fold(staged, 1.0, scale=factor)  # DP: every client weighs 1
    assert _norm(acc.total) <= CLIP  # the whole contribution of that client
    # Same direction as what was sent: a scaled copy, not something else.
    sent = get_codec(codec_name).decode(b"".join(staged.file.blocks()), huge.size)
    np.testing.assert_allclose(acc.total, sent * (CLIP / _norm(sent)), rtol=2e-6, atol=1e-12)

    plain, reclipped = Accumulator(honest.size), Accumulator(honest.size)
    staged = _stage(tmp_path, codec_name, honest)
    plain.fold(staged, 1.0)
    if codec_name == "fp32":  # exactly what the client clipped: within C, untouched
        assert dp.reclip_factor(staged.norm) == 1.0
    reclipped.fold(staged, 1.0, scale=dp.reclip_factor(staged.norm))
    assert reclipped.total.tobytes() == plain.total.tobytes()


# ---------------------------------------------------------------- through the Coordinator
def _coordinator(state: Path, dp: DPWrapper, clients: int) -> tuple[Coordinator, StateStore]:
    store = StateStore(state)
    policy = RoundPolicy(total_rounds=1, min_clients=clients, round_timeout=60.0)
    strategy = build_strategy("fedavg")
    coord = Coordinator(store, strategy, policy, initial_model(task, 0), protocol_wrappers=(dp,))
    coord.initialize_store("examples.digits:task")
    return coord, store


def _submit(coord: Coordinator, client: str, payload: bytes, encoding: str = "fp32") -> None:
    codec = get_codec(encoding)
    wire = codec.wire_manifest(coord.round_selection().manifest)
    header = SubmitHeader(
        client, coord.machine.round, coord.model.version, 10, {}, encoding, wire, len(payload)
    )
    pending = coord.begin_submit(header)
    for chunk in iter_chunks(payload, 1 << 16):
        pending.receiver.add(bytes(chunk))
    coord.finish_submit(pending, hashlib.sha256(payload).hexdigest())


def test_coordinator_reclips_a_dishonest_update_before_folding(tmp_path: Path) -> None:
    """A client that skips clipping moves the model by at most C/n, like an honest one."""

    async def scenario() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        coord, store = _coordinator(tmp_path / "state", DPWrapper(DPConfig(CLIP, 0.0), seed=0), 2)
        base = coord.model
        for c in ("honest", "cheater"):
            coord.touch(c, {})
        n = float_vector(base).size
        honest = l2_clip(np.random.default_rng(3).normal(0, 0.01, n).astype(np.float32), CLIP)
        huge = np.full(n, 50.0, np.float32)  # norm ~3500, never clipped by its sender
        _submit(coord, "honest", get_codec("fp32").encode(honest).tobytes())
        _submit(coord, "cheater", get_codec("fp32").encode(huge).tobytes())
        await asyncio.wait_for(coord.done.wait(), 60)
        assert coord.failure is None
        store.close()
        return float_vector(base), float_vector(coord.model), honest

    base, new, honest = asyncio.run(scenario())
    moved = new.astype(np.float64) - base
    clipped_huge = np.full(base.size, CLIP / math.sqrt(base.size))
    want = (honest.astype(np.float64) + clipped_huge) / 2
    assert _norm(moved) <= (_norm(honest) + CLIP) / 2 + 1e-5
    np.testing.assert_allclose(moved, want, atol=1e-6)


def test_epsilon_is_computed_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    where: list[int] = []
    real = Accountant.epsilon

    def spy(self: Accountant, delta: float) -> float:
        where.append(threading.get_ident())
        return real(self, delta)

    monkeypatch.setattr(Accountant, "epsilon", spy)

    async def scenario() -> tuple[int, dict[str, float]]:
        loop_thread = threading.get_ident()
        coord, store = _coordinator(tmp_path / "state", DPWrapper(DPConfig(CLIP, 1.0), seed=0), 2)
        zeros = (
            get_codec("fp32").encode(np.zeros(float_vector(coord.model).size, np.float32)).tobytes()
        )
        for c in ("a", "b"):
            coord.touch(c, {})
        for c in ("a", "b"):
            _submit(coord, c, zeros)
        await asyncio.wait_for(coord.done.wait(), 60)
        assert coord.failure is None
        metrics = store.rounds()[0].metrics
        store.close()
        return loop_thread, metrics

    loop_thread, metrics = asyncio.run(scenario())
    assert where and loop_thread not in where
    acc = Accountant()
    acc.step(1.0, 1.0)
    assert metrics["epsilon"] == pytest.approx(acc.epsilon(1e-5), rel=1e-12)


# ---------------------------------------------------------------- --secure he with DP
@pytest.fixture(scope="module")
def he_keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    pytest.importorskip("tenseal")
    from fedcore.he import PUBLIC_FILE, generate_keys

    secret, public = generate_keys(tmp_path_factory.mktemp("clients"))
    moved = Path(shutil.move(public, tmp_path_factory.mktemp("coordinator") / PUBLIC_FILE))
    return secret, moved


def test_he_with_dp_noises_on_the_clients_so_the_key_holder_never_sees_a_clean_sum(
    tmp_path: Path, he_keys: tuple[Path, Path]
) -> None:
    from fedcore.he import HEClient
    from fedserver.protocols.he import HEProtocol

    secret, public = he_keys
    z = 2.0
    settings = CoordinatorSettings(
        task="examples.digits:task",
        state_dir=tmp_path / "state",
        policy=RoundPolicy(total_rounds=1, min_clients=2, round_timeout=60.0),
        defaults=TrainingDefaults(),
        dp=DPConfig(CLIP, z),
        secure="he",
        he_public_key=public,
        dp_seed=0,
    )
    he = HEClient(secret)
    ids = ("a", "b")

    async def scenario() -> tuple[FlatModel, FlatModel, np.ndarray, dict[str, float]]:
        coord = build_coordinator(settings)
        base = coord.model
        for c in ids:
            coord.touch(c, {})
        extra = coord.round_config()["extra"]
        assert isinstance(extra, dict)
        # Each client's share of the noise: the n shares sum to std z*C.
        assert float(extra["dp_client_noise_std"]) == pytest.approx(z * CLIP / math.sqrt(2))
        n = float_vector(coord.model).size
        for c in ids:
            # What fedclient does: clip, add its noise share, encrypt (unweighted under DP).
            assert extra["he_weighted"] == "0"
            delta = privatize(np.zeros(n, np.float32), {k: str(v) for k, v in extra.items()})
            _submit(coord, c, he.encrypt_update(delta, 1.0).tobytes(), encoding="he-ckks")
        wrapper = coord.protocol
        assert isinstance(wrapper, DifferentialPrivacy)
        secure = wrapper.inner
        assert isinstance(secure, HEProtocol)

        # The key holder: decrypt what the coordinator hands over and return it.
        async def asked() -> str:
            while True:
                changed = coord._changed  # set when the coordinator names a key holder
                holder = next((c for c in ids if secure.decryption_for(c)), None)
                if holder is not None:
                    return holder
                await changed.wait()

        holder = await asyncio.wait_for(asked(), 30)
        payload = secure.encrypted_aggregate(holder, 1)
        total = he.decrypt_payload(payload.tobytes(), n)
        plain = get_codec("fp32").encode(total).tobytes()
        header = SubmitHeader(
            holder, 1, "", 0, {}, "fp32", secure.sum_manifest(), len(plain), "sha256"
        )
        pending = secure.begin_decryption(header)
        pending.receiver.add(plain)
        secure.finish_decryption(pending, hashlib.sha256(plain).hexdigest())
        await asyncio.wait_for(coord.done.wait(), 60)
        assert coord.failure is None
        metrics = coord.store.rounds()[0].metrics
        coord.store.close()
        return base, coord.model, total, metrics

    base, new, total, metrics = asyncio.run(scenario())
    # The decrypted sum of two zero updates already carries the full noise, std z*C ...
    assert float(np.std(total.astype(np.float64))) == pytest.approx(z * CLIP, rel=0.1)
    # ... and the coordinator adds none: new model = base + sum / 2, up to float32 rounding.
    moved = float_vector(new).astype(np.float64) - float_vector(base)
    np.testing.assert_allclose(moved, total.astype(np.float64) / 2, atol=1e-5)
    # Both noise shares arrived: the full z is what is accounted (q = 1).
    assert metrics["dp_noise_multiplier"] == pytest.approx(z)
    acc = Accountant()
    acc.step(z, 1.0)
    assert metrics["epsilon"] == pytest.approx(acc.epsilon(1e-5), rel=1e-12)
