"""Streaming update validation, the weighted accumulator, and the FedAvg step."""

from __future__ import annotations

import asyncio
import hashlib
import mmap
import os
import weakref
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import blake3
import grpc
import numpy as np
import pytest
import torch
import xxhash

from examples.digits import task as digits_task
from fedcore import checksums
from fedcore.codecs import get_codec
from fedcore.sealed import StateCipher
from fedcore.tensors import flatten_state_dict, float_vector, iter_chunks, to_state_dict
from fedserver.coordinator.central_eval import initial_model
from fedserver.coordinator.lifecycle import Coordinator
from fedserver.rounds.synchronous import RoundPolicy
from fedserver.state.store import StateStore
from fedserver.strategies import STRATEGIES, AggregateInput, build_strategy
from fedserver.strategies.fedavg import FedAvg
from fedserver.transport.rpc import status_for
from fedserver.updates.accumulator import Accumulator
from fedserver.updates.messages import SubmitHeader
from fedserver.updates.receiver import (
    BadUpdate,
    SpillCorrupted,
    SpillFile,
    SpillPool,
    StagedUpdate,
    UpdateReceiver,
    UpdateTooLarge,
    spill_key,
)

FP32 = get_codec("fp32")


def _payload(values: list[float]) -> bytes:
    return FP32.encode(np.array(values, dtype=np.float32)).tobytes()


def _receiver(tmp_path: Path, num_values: int, expected_bytes: int | None = None) -> UpdateReceiver:
    nbytes = num_values * 4 if expected_bytes is None else expected_bytes
    return UpdateReceiver(FP32, num_values, nbytes, tmp_path / "spill")


def _receive(
    tmp_path: Path, payload: bytes, num_values: int, chunk_size: int = 3, sha: str | None = None
) -> StagedUpdate:
    receiver = _receiver(tmp_path, num_values)
    for chunk in iter_chunks(payload, chunk_size):
        receiver.add(bytes(chunk))
    return receiver.finish(hashlib.sha256(payload).hexdigest() if sha is None else sha)


def _snapshot(acc: Accumulator) -> tuple[bytes, float, int]:
    return acc.total.tobytes(), acc.weight, acc.count


# ---------------------------------------------------------------- FedAvg through the stream


def test_weighted_mean_of_three_updates(tmp_path: Path) -> None:
    acc = Accumulator(2)
    for values, weight in (([1, 2], 1.0), ([3, 4], 2.0), ([5, 6], 3.0)):
        acc.fold(_receive(tmp_path, _payload(values), 2), weight)
    assert acc.count == 3
    assert acc.weight == 6.0
    assert acc.total.tolist() == [1 + 6 + 15, 2 + 8 + 18]
    expected = np.array([(1 + 6 + 15) / 6, (2 + 8 + 18) / 6], dtype=np.float32)
    np.testing.assert_array_equal(acc.mean(), expected)
    np.testing.assert_allclose(acc.mean(), [3.6666667, 4.6666667], rtol=1e-7)


def test_mean_is_independent_of_chunking(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    vectors = [rng.standard_normal(50).astype(np.float32) for _ in range(3)]
    means = []
    for chunk_size in (1, 7, 200):
        acc = Accumulator(50)
        for i, v in enumerate(vectors):
            acc.fold(_receive(tmp_path, v.tobytes(), 50, chunk_size), float(i + 1))
        means.append(acc.mean().tobytes())
    assert means[0] == means[1] == means[2]


def test_staged_update_carries_digest_and_size(tmp_path: Path) -> None:
    payload = _payload([1.5, -2.5, 3.5])
    staged = _receive(tmp_path, payload, 3)
    assert staged.digest == hashlib.sha256(payload).hexdigest()
    assert staged.nbytes == 12 and staged.num_values == 3
    values = np.concatenate([p.values.copy() for p in staged.pieces(block=5)])
    assert values.tolist() == [1.5, -2.5, 3.5]
    staged.discard()


def test_checksum_is_case_insensitive(tmp_path: Path) -> None:
    payload = _payload([1.0])
    staged = _receive(tmp_path, payload, 1, sha=hashlib.sha256(payload).hexdigest().upper())
    assert staged.digest == hashlib.sha256(payload).hexdigest()


def test_staged_pieces_stay_valid_when_collected(tmp_path: Path) -> None:
    staged = _receive(tmp_path, _payload([0, 1, 2, 3, 4, 5, 6, 7, 8, 9]), 10)
    pieces = list(staged.pieces(block=8))
    assert np.concatenate([p.values for p in pieces]).tolist() == list(range(10))


def test_mean_without_updates_is_an_error() -> None:
    with pytest.raises(ValueError, match="no updates"):
        Accumulator(3).mean()


# ---------------------------------------------------------------- rejected updates


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_value_is_rejected(tmp_path: Path, bad: float) -> None:
    receiver = _receiver(tmp_path, 4)
    payload = _payload([1.0, 2.0, bad, 4.0])
    receiver.add(payload[:6])
    with pytest.raises(BadUpdate, match="first at value 2") as info:
        receiver.add(payload[6:])
    assert info.value.reason == "non_finite"
    assert "learning rate" in str(info.value)


def test_a_value_beyond_max_update_value_is_rejected_and_the_bound_is_inclusive(
    tmp_path: Path,
) -> None:
    # Finite but huge: one update of 1e30 at 1e9 examples overflowed the float32 sum to inf.
    receiver = _receiver(tmp_path, 4)
    with pytest.raises(
        BadUpdate, match=r"update value 1 is -1e\+30, beyond --max-update-value"
    ) as e:
        receiver.add(_payload([1.0, -1e30, 3.0, 4.0]))
    assert e.value.reason == "out_of_range"
    assert status_for(e.value) == grpc.StatusCode.INVALID_ARGUMENT
    receiver.abort()
    edge = _receive(tmp_path, _payload([1e15, -1e15, 0.0, 2.0]), 4)  # at the bound: kept
    acc = Accumulator(4)
    acc.fold(edge, 1e9)
    acc.fold(_receive(tmp_path, _payload([1e15, 1.0, 1.0, 1.0]), 4), 1e9)
    assert np.isfinite(acc.mean()).all()
    # Secure aggregation's masked ring elements are uniform uint64s, not values: not bounded.
    ring = np.array([2**64 - 1, 2**63], dtype="<u8").view(np.uint8).tobytes()
    masked = UpdateReceiver(get_codec("masked-u64"), 2, 16, tmp_path / "spill", max_value=10.0)
    masked.add(ring)
    masked.finish(hashlib.sha256(ring).hexdigest()).discard()
    low = UpdateReceiver(FP32, 2, 8, tmp_path / "spill", max_value=10.0)
    with pytest.raises(BadUpdate, match="--max-update-value 10;"):
        low.add(_payload([10.0, 10.5]))


def test_wrong_checksum_is_rejected(tmp_path: Path) -> None:
    payload = _payload([1.0, 2.0])
    with pytest.raises(BadUpdate, match="checksum mismatch") as info:
        _receive(tmp_path, payload, 2, sha=hashlib.sha256(payload + b"x").hexdigest())
    assert info.value.reason == "checksum"


@pytest.mark.parametrize(
    ("algorithm", "reference"),
    [
        ("blake3", lambda b: blake3.blake3(b).hexdigest()),
        ("xxh3_128", lambda b: xxhash.xxh3_128(b).hexdigest()),
    ],
)
def test_checksum_and_its_receipt_digest(
    tmp_path: Path, algorithm: str, reference: Callable[[bytes], str]
) -> None:
    payload = _payload([1.0, 2.0, 3.0])
    digest = reference(payload)  # the library's one-shot digest, as docs/protocol.md says
    receiver = UpdateReceiver(FP32, 3, len(payload), tmp_path / "spill", checksum=algorithm)
    receiver.add(payload[:5])
    receiver.add(payload[5:])
    staged = receiver.finish(digest.upper())
    # Prefixed, so a sha256 receipt of the same bytes never compares equal to it.
    assert staged.digest == f"{algorithm}:{digest}"
    staged.discard()
    receiver = UpdateReceiver(FP32, 3, len(payload), tmp_path / "spill", checksum=algorithm)
    receiver.add(payload)
    with pytest.raises(BadUpdate, match="checksum mismatch") as info:
        receiver.finish(hashlib.sha256(payload).hexdigest())
    assert info.value.reason == "checksum"


def test_unknown_checksum_algorithm_is_refused(tmp_path: Path) -> None:
    supported = "supported: xxh3_128, blake3, sha256"
    with pytest.raises(BadUpdate, match=f"unknown update checksum 'crc32'; {supported}") as e:
        UpdateReceiver(FP32, 1, 4, tmp_path / "spill", checksum="crc32")
    assert e.value.reason == "bad_checksum"


def test_a_client_sends_the_first_checksum_offered_that_it_knows() -> None:
    assert checksums.choose(checksums.ALGORITHMS) == "xxh3_128"
    assert checksums.choose(["crc64", "sha256", "blake3"]) == "sha256"
    # A coordinator older than JoinReply.checksums offers none and accepts blake3.
    assert checksums.choose([]) == "blake3"


@pytest.mark.parametrize("cut", [1, 4, 5])
def test_truncated_update_is_rejected(tmp_path: Path, cut: int) -> None:
    payload = _payload([1.0, 2.0, 3.0])
    receiver = _receiver(tmp_path, 3)
    receiver.add(payload[:-cut])
    with pytest.raises(BadUpdate, match="truncated") as info:
        receiver.finish(hashlib.sha256(payload).hexdigest())
    assert info.value.reason == "truncated"


def test_stream_shorter_than_declared_bytes_is_truncated(tmp_path: Path) -> None:
    payload = _payload([1.0, 2.0])
    receiver = _receiver(tmp_path, 2, expected_bytes=12)
    receiver.add(payload)
    with pytest.raises(BadUpdate, match="ended after 8 of 12 bytes") as info:
        receiver.finish(hashlib.sha256(payload).hexdigest())
    assert info.value.reason == "truncated"


def test_stream_longer_than_declared_is_too_large(tmp_path: Path) -> None:
    receiver = _receiver(tmp_path, 2)
    receiver.add(_payload([1.0]))
    with pytest.raises(UpdateTooLarge, match="exceeds the 8 bytes") as info:
        receiver.add(_payload([2.0, 3.0]))
    assert info.value.reason == "too_large"
    assert isinstance(info.value, BadUpdate)


def test_more_values_than_declared_is_malformed(tmp_path: Path) -> None:
    receiver = _receiver(tmp_path, 1, expected_bytes=8)
    with pytest.raises(BadUpdate, match="more than the 1 values") as info:
        receiver.add(_payload([1.0, 2.0]))
    assert info.value.reason == "malformed"


def test_rejected_updates_leave_the_accumulator_unchanged(tmp_path: Path) -> None:
    acc = Accumulator(2)
    acc.fold(_receive(tmp_path, _payload([1, 2]), 2), 1.0)
    before = _snapshot(acc)

    def attempt(payload: bytes, sha: str | None = None, num_values: int = 2) -> None:
        staged = _receive(tmp_path, payload, num_values, chunk_size=4, sha=sha)
        acc.fold(staged, 5.0)  # only reached if the receiver accepted the update

    with pytest.raises(BadUpdate, match="NaN"):
        attempt(_payload([10.0, float("nan")]))
    assert _snapshot(acc) == before
    with pytest.raises(BadUpdate, match="checksum"):
        attempt(_payload([10.0, 20.0]), sha="0" * 64)
    assert _snapshot(acc) == before
    with pytest.raises(BadUpdate, match="truncated"):
        attempt(_payload([10.0, 20.0])[:-2])
    assert _snapshot(acc) == before
    with pytest.raises(UpdateTooLarge):
        attempt(_payload([10.0, 20.0, 30.0]))
    assert _snapshot(acc) == before

    acc.fold(_receive(tmp_path, _payload([3, 4]), 2), 2.0)
    assert acc.total.tolist() == [1 + 6, 2 + 8]
    assert (acc.weight, acc.count) == (3.0, 2)


def test_aborted_receiver_closes_its_spill(tmp_path: Path) -> None:
    receiver = _receiver(tmp_path, 2)
    receiver.add(_payload([1.0]))
    receiver.abort()
    assert list((tmp_path / "spill").iterdir()) == []  # spills are anonymous files


# ---------------------------------------------------------------- the FedAvg strategy


def test_fedavg_apply_adds_the_mean_delta() -> None:
    model = flatten_state_dict(
        {
            "w": torch.tensor([1.0, -2.0, 0.25]),
            "steps": torch.tensor([7, -3], dtype=torch.int64),
            "h": torch.tensor([1.0, 2.0, 2.0], dtype=torch.float16),
        }
    )
    before = model.buffer.tobytes()
    delta = np.array([0.5, 0.5, -0.25, 0.5, 0.0003, 0.0015], dtype=np.float32)
    agg = AggregateInput(round=1, mean_delta=delta, total_weight=6.0, num_updates=3)
    out = to_state_dict(FedAvg().apply(model, agg))

    assert out["w"].tolist() == [1.5, -1.5, 0.0]
    assert out["steps"].dtype == torch.int64
    assert out["steps"].tolist() == [7, -3]
    assert out["h"].dtype == torch.float16
    # float16 spacing in [2, 4) is 2**-9 = 0.001953125: 2.0003 rounds down, 2.0015 rounds up.
    assert out["h"].tolist() == [1.5, 2.0, 2.001953125]
    assert model.buffer.tobytes() == before


def test_fedavg_with_zero_delta_is_bit_identical() -> None:
    model = flatten_state_dict(
        {"w": torch.tensor([0.1, 0.2]), "b": torch.tensor([0.3], dtype=torch.bfloat16)}
    )
    agg = AggregateInput(round=1, mean_delta=np.zeros(3, np.float32), total_weight=1, num_updates=1)
    assert FedAvg().apply(model, agg).version == model.version


def test_build_strategy() -> None:
    assert isinstance(build_strategy("fedavg"), FedAvg)
    assert "fedavg" in STRATEGIES
    with pytest.raises(
        ValueError, match="unknown strategy 'nope'; choose one of: bulyan, fedadagrad"
    ):
        build_strategy("nope")


def test_fedavg_keeps_no_state() -> None:
    strategy = FedAvg()
    assert strategy.state_arrays() == {}
    assert strategy.round_config(1) == {}
    strategy.load_state_arrays({})
    with pytest.raises(ValueError, match="keeps no state"):
        strategy.load_state_arrays({"momentum": np.zeros(1)})


def test_encrypted_spill_holds_no_plaintext_and_folds_the_same(tmp_path: Path) -> None:
    """--encrypt-state: the update's bytes on disk are ciphertext under an in-memory key."""
    values = np.random.default_rng(7).normal(size=3000).astype(np.float32)
    payload = _payload(values.tolist())
    folded = []
    for key in (None, spill_key(True)):
        spill = tmp_path / "spill"
        receiver = UpdateReceiver(FP32, values.size, len(payload), spill, "sha256", key)
        for chunk in iter_chunks(payload, 1000):
            receiver.add(bytes(chunk))
        staged = receiver.finish(hashlib.sha256(payload).hexdigest())
        raw = staged.file._file
        raw.seek(0)
        on_disk = raw.read()
        assert len(on_disk) == len(payload)
        assert (on_disk == payload) is (key is None)
        if key is not None:
            assert payload[:64] not in on_disk and payload[-64:] not in on_disk
        acc = Accumulator(values.size)
        acc.fold(staged, 2.0)
        folded.append(acc.total.tobytes())
        staged.discard()
    assert folded[0] == folded[1]
    assert spill_key(False) is None


# ---------------------------------------------------------------- spills read back authenticated

BIG = (5 << 20) // 8  # 2.5 MiB of float32: three spill blocks, the last one partial


def _big_payload() -> tuple[np.ndarray, bytes]:
    values = np.random.default_rng(11).normal(size=BIG).astype(np.float32)
    return values, _payload(values.tolist())


def _staged_big(
    tmp_path: Path, payload: bytes, key: bytes | None, pool: SpillPool | None = None
) -> StagedUpdate:
    values = len(payload) // 4  # BIG, or what a pool's file held before
    receiver = UpdateReceiver(
        FP32, values, len(payload), tmp_path / "spill", "sha256", key, spills=pool
    )
    for chunk in iter_chunks(payload, 300_000):  # chunks that straddle the 1 MiB blocks
        receiver.add(bytes(chunk))
    return receiver.finish(hashlib.sha256(payload).hexdigest())


def _tamper(spill: SpillFile, offset: int) -> None:
    """What someone with write access to the coordinator's disk could do to a spill."""
    spill._file.flush()
    fd = spill._file.fileno()
    (byte,) = os.pread(fd, 1, offset)
    os.pwrite(fd, bytes([byte ^ 0x01]), offset)  # one bit: CTR would decrypt it to one bit


@pytest.mark.parametrize("offset", [0, (2 << 20) + 5], ids=["first-block", "last-block"])
def test_encrypted_spill_changed_after_verification_is_refused_and_nothing_is_folded(
    tmp_path: Path, offset: int
) -> None:
    _, payload = _big_payload()
    staged = _staged_big(tmp_path, payload, spill_key(True))
    _tamper(staged.file, offset)  # after the stream's checksum matched, before the fold
    acc = Accumulator(BIG)
    with pytest.raises(SpillCorrupted, match="changed on disk") as e:
        staged.verify()  # what the coordinator does before folding (submissions._count)
    assert (e.value.reason, status_for(e.value)) == ("spill_corrupt", grpc.StatusCode.INTERNAL)
    assert _snapshot(acc) == (bytes(BIG * 4), 0.0, 0)
    # Every reader verifies the whole spill first, whether verify() was called or not.
    with pytest.raises(SpillCorrupted):
        acc.fold(staged, 1.0)
    with pytest.raises(SpillCorrupted):
        staged.payload()
    staged.discard()


def test_plain_spill_is_folded_without_mac_passes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --encrypt-state the state dir is not protected from whoever can write it (the
    checkpoints are plain files), and a nameless spill in a 0700 folder is less exposed than
    they are: no Poly1305 pass is made over a plain spill, written or read back."""
    from fedserver.updates import receiver

    def no_mac(*args: object) -> None:
        raise AssertionError("a plain spill was MACed")

    monkeypatch.setattr(receiver, "Poly1305", no_mac)
    monkeypatch.setattr(SpillFile, "_check_blocks", no_mac)
    values, payload = _big_payload()
    staged = _staged_big(tmp_path, payload, None)
    assert not staged.file.authenticated
    staged.verify()
    acc = Accumulator(BIG)
    acc.fold(staged, 1.0)
    assert acc.total.tobytes() == values.tobytes()
    staged.discard()


@pytest.mark.parametrize("pooled", [False, True], ids=["new", "reused"])
@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
@pytest.mark.parametrize("size", [0, 100, (5 << 20) + 1], ids=["emptied", "truncated", "extended"])
def test_spill_of_another_length_is_refused(
    tmp_path: Path, size: int, encrypted: bool, pooled: bool
) -> None:
    _, payload = _big_payload()
    pool = SpillPool(tmp_path / "spill") if pooled else None
    if pool is not None:  # a file that held a longer update first
        _staged_big(tmp_path, payload + payload, None, pool).discard()
    staged = _staged_big(tmp_path, payload, spill_key(encrypted), pool)
    os.ftruncate(staged.file._file.fileno(), size)
    with pytest.raises(SpillCorrupted, match="bytes on disk"):
        staged.verify()
    staged.discard()


def test_reused_spill_files_hold_exactly_each_update(tmp_path: Path) -> None:
    """Files go back to the pool and serve the next update, larger or smaller, with its bytes
    only; at most `keep` stay idle."""
    _, payload = _big_payload()
    pool = SpillPool(tmp_path / "spill", keep=2)
    small = _payload([1.0, -2.0, 3.0])
    for first, second in ((payload, small), (small, payload)):
        _staged_big(tmp_path, first, None, pool).discard()
        staged = _staged_big(tmp_path, second, None, pool)
        assert b"".join(staged.file.blocks()) == second
        acc = Accumulator(len(second) // 4)
        acc.fold(staged, 1.0)
        assert acc.total.tobytes() == second
        staged.discard()
    held = [_staged_big(tmp_path, payload, None, pool) for _ in range(3)]
    for staged in held:
        staged.discard()
    assert pool.idle == 2


def test_untouched_spill_verifies_and_folds_bit_exactly(tmp_path: Path) -> None:
    values, payload = _big_payload()
    for key in (None, spill_key(True)):
        staged = _staged_big(tmp_path, payload, key)
        staged.verify()
        acc = Accumulator(BIG)
        acc.fold(staged, 1.0)
        assert acc.total.tobytes() == values.tobytes()
        staged.discard()


def _submit(coord: Coordinator, client: str, delta: np.ndarray, tamper: bool = False) -> None:
    payload = delta.tobytes()
    wire = FP32.wire_manifest(coord.model.manifest.floats())
    header = SubmitHeader(client, 1, coord.model.version, 10, {}, "fp32", wire, len(payload))
    pending = coord.begin_submit(header)
    pending.receiver.add(payload)
    if tamper:  # the stream arrived intact; its spill is changed before it is folded
        _tamper(pending.receiver._file, len(payload) // 2)
    coord.finish_submit(pending, hashlib.sha256(payload).hexdigest())


async def _one_round(state: Path, tamper: bool) -> tuple[bytes, Counter[str]]:
    base = initial_model(digits_task, 0)
    store = StateStore(state, StateCipher(bytes(range(32))))  # spills MACed: --encrypt-state
    policy = RoundPolicy(total_rounds=1, min_clients=2, round_timeout=30.0)
    coord = Coordinator(store, build_strategy("fedavg"), policy, base)
    coord.initialize_store("examples.digits:task")
    for c in ("client-0", "client-1"):
        coord.touch(c, {})
    rng = np.random.default_rng(5)
    deltas = [rng.normal(0, 0.01, float_vector(base).size).astype(np.float32) for _ in range(2)]
    if tamper:
        with pytest.raises(SpillCorrupted) as e:
            _submit(coord, "client-0", deltas[0], tamper=True)
        assert status_for(e.value) is grpc.StatusCode.INTERNAL  # fedclient retries it
        assert coord.protocol._accumulator.count == 0 and coord.failure is None
    _submit(coord, "client-0", deltas[0])  # the client's retry is counted
    _submit(coord, "client-1", deltas[1])
    await asyncio.wait_for(coord.done.wait(), 60)
    assert coord.failure is None
    store.close()
    return coord.model.buffer.tobytes(), coord.rejections


def test_coordinator_refuses_a_tampered_encrypted_spill_and_the_round_ends_as_without_it(
    tmp_path: Path,
) -> None:
    clean, _ = asyncio.run(_one_round(tmp_path / "clean", tamper=False))
    tampered, rejections = asyncio.run(_one_round(tmp_path / "tampered", tamper=True))
    assert rejections["spill_corrupt"] == 1
    assert tampered == clean  # bit for bit: nothing of the refused copy was folded


def test_a_fold_maps_one_window_of_the_spill_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A window is unmapped before the next is mapped: a view of it kept until the next one
    (the fold's loop variable, the decoder's input) put two windows in the coordinator's RSS."""
    from fedserver.updates import receiver

    monkeypatch.setattr(receiver, "SPILL_WINDOW", 2 * 4096)
    live: list[weakref.ref[mmap.mmap]] = []
    overlaps: list[int] = []
    real_mmap = receiver.mmap.mmap

    def recording(*args: int, **kw: int) -> mmap.mmap:
        overlaps.append(sum(ref() is not None for ref in live))
        window = real_mmap(*args, **kw)
        live.append(weakref.ref(window))
        return window

    monkeypatch.setattr(receiver.mmap, "mmap", recording)
    values = np.arange(1 << 20, dtype=np.float32)  # 4 MiB: 4 windows of one 1 MiB block each
    staged = _receive(tmp_path, FP32.encode(values).tobytes(), values.size, chunk_size=1 << 16)
    acc = Accumulator(values.size)
    acc.fold(staged, 2.0)
    assert np.array_equal(acc.total, values * 2)
    assert overlaps == [0] * 4, overlaps
    staged.discard()


def test_a_spill_is_verified_and_read_a_window_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mapped pages count in RSS: a 2.4 GB spill mapped whole added a model to the peak. Every
    mapping is at most SPILL_WINDOW; a block changed in a later window is still refused."""
    from fedserver.updates import receiver

    monkeypatch.setattr(receiver, "SPILL_WINDOW", 2 * 4096)
    lengths: list[int] = []
    real_mmap = receiver.mmap.mmap

    def recording(fd: int, length: int, *args: int, **kw: int) -> object:
        lengths.append(length)
        return real_mmap(fd, length, *args, **kw)

    monkeypatch.setattr(receiver.mmap, "mmap", recording)
    data = bytes(range(256)) * 160  # 40 KiB: 10 blocks of 4 KiB, 5 windows
    spill = SpillFile(tmp_path, spill_key(True), block_size=4096)
    spill.write(data[:1000])
    spill.write(data[1000:])
    spill.verify()
    assert b"".join(bytes(v) for v in spill.views(3000)) == data
    assert lengths and all(0 < n <= 2 * 4096 for n in lengths), lengths
    os.pwrite(spill._file.fileno(), b"\xff", 9 * 4096 + 5)  # the last window
    with pytest.raises(SpillCorrupted, match="block 9"):
        spill.verify()
    spill.close()
