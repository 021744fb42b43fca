"""The int4 encoding: block-wise symmetric 4-bit values with error feedback (issue 23)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from examples.digits import task
from fedcore.codecs import ErrorFeedback, Int4Codec, get_codec
from fedcore.tensors import Manifest, ManifestError, TensorSpec
from fedserver.state.history import read_status
from fedserver.updates.accumulator import Accumulator
from fedserver.updates.receiver import BadUpdate, UpdateReceiver
from tests.procs import Proc, free_port, start_clients, start_serving, wait_finished

BLOCK = Int4Codec.BLOCK


def _vector(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # Blocks of very different magnitudes: each gets its own scale.
    return (
        rng.standard_normal(n) * np.repeat(10.0 ** rng.integers(-6, 2, -(-n // 64)), 64)[:n]
    ).astype(np.float32)


def _payload_bytes(n: int) -> int:
    return 4 * -(-n // BLOCK) + -(-n // 2)


@pytest.mark.parametrize("n", [0, 1, 2, 63, 64, 65, 127, 1007, 4810])
def test_round_trip_error_within_half_a_step_per_block(n: int) -> None:
    codec = get_codec("int4")
    x = _vector(n, seed=n)
    payload = codec.encode(x)
    assert payload.dtype == np.uint8 and payload.size == _payload_bytes(n)
    floats = Manifest((TensorSpec("w", "float32", (n,)),))
    assert payload.size == codec.wire_manifest(floats).total_bytes
    decoded = codec.decode(payload, n)
    for start in range(0, n, BLOCK):
        block = x[start : start + BLOCK]
        bound = np.abs(block).max() / 7 / 2  # half of one quantization step
        err = np.abs(decoded[start : start + BLOCK] - block).max()
        assert err <= bound * (1 + 1e-5)


def test_bytes_are_an_eighth_of_fp32_plus_the_scales() -> None:
    n = 4810  # digits
    floats = Manifest((TensorSpec("w", "float32", (n,)),))
    int4 = get_codec("int4").wire_manifest(floats).total_bytes
    assert int4 == n // 2 + 4 * 76
    assert int4 / (4 * n) == pytest.approx(1 / 8 + 1 / 64, abs=0.002)
    assert [t.name for t in get_codec("int4").wire_manifest(floats).tensors] == [
        "int4.scales",
        "int4.values",
    ]


def test_zeros_and_block_extremes_are_exact() -> None:
    x = np.zeros(3 * BLOCK, dtype=np.float32)
    x[BLOCK + 5] = -3.5
    x[2 * BLOCK] = 1e30
    x[2 * BLOCK + 1] = -1e30
    decoded = get_codec("int4").decode(get_codec("int4").encode(x), x.size)
    assert decoded[:BLOCK].tolist() == [0.0] * BLOCK
    assert decoded[BLOCK + 5] == pytest.approx(-3.5)
    assert decoded[2 * BLOCK] == pytest.approx(1e30, rel=1e-6)
    assert decoded[2 * BLOCK + 1] == pytest.approx(-1e30, rel=1e-6)


@pytest.mark.parametrize("n", [129, 1007])
@pytest.mark.parametrize("step", [1, 3, 5, 7, 33, 257])
def test_streaming_decode_across_odd_chunk_splits(n: int, step: int) -> None:
    codec = get_codec("int4")
    x = _vector(n, seed=step)
    data = codec.encode(x).tobytes()
    whole = codec.decode(np.frombuffer(data, dtype=np.uint8), n)
    out = np.full(n, np.nan, dtype=np.float32)
    decoder = codec.decoder(n)
    next_offset = 0
    for start in range(0, len(data), step):
        for piece in decoder.feed(memoryview(data)[start : start + step]):
            assert piece.offset == next_offset and piece.values.dtype == np.float32
            out[piece.offset : piece.offset + piece.values.size] = piece.values
            next_offset += piece.values.size
    decoder.finish()
    np.testing.assert_array_equal(out, whole)


def test_error_feedback_keeps_the_accumulated_error_bounded() -> None:
    """Without feedback the rounding errors of 40 rounds add up; with it, what was sent plus
    the residual is everything the client had, and the sent sum stays one round's error off."""
    n, rounds = 1007, 40
    codec = get_codec("int4")
    feedback = ErrorFeedback()
    total = np.zeros(n, dtype=np.float64)
    with_fb = np.zeros(n, dtype=np.float64)
    without = np.zeros(n, dtype=np.float64)
    for r in range(rounds):
        # A consistent direction plus noise, like successive local updates.
        delta = (np.linspace(-1, 1, n) + 0.3 * np.random.default_rng(r).standard_normal(n)).astype(
            np.float32
        )
        total += delta
        with_fb += codec.decode(feedback.encode(codec, delta), n)
        without += codec.decode(codec.encode(delta), n)
    assert feedback.residual is not None
    np.testing.assert_allclose(with_fb + feedback.residual, total, atol=1e-3)
    err_fb = np.linalg.norm(with_fb - total)
    err_plain = np.linalg.norm(without - total)
    assert err_fb < err_plain / 4, (err_fb, err_plain)


def test_hostile_payloads_are_refused() -> None:
    codec = Int4Codec()
    n = 200  # 4 blocks: 16 bytes of scales, 100 of values
    good = codec.encode(_vector(n)).tobytes()
    for cut in (0, 3, 16, 17, 115):  # inside the scales, at their end, inside the values
        decoder = codec.decoder(n)
        list(decoder.feed(good[:cut]))
        with pytest.raises(ManifestError, match="truncated"):
            decoder.finish()
    with pytest.raises(ManifestError, match="more than"):
        list(codec.decoder(n).feed(good + b"\x88"))
    for bad in (np.nan, np.inf, -1.0):
        scales = np.frombuffer(good[:16], dtype="<f4").copy()
        scales[2] = bad
        with pytest.raises(ManifestError, match="int4 block scales must be finite and >= 0"):
            list(codec.decoder(n).feed(scales.tobytes() + good[16:]))


def test_receiver_refuses_a_nan_scale_and_folds_a_good_update(tmp_path: Path) -> None:
    codec, n = get_codec("int4"), 1007
    payload = codec.encode(_vector(n, seed=3))
    bad = payload.copy()
    bad[:4] = np.frombuffer(np.array([np.nan], dtype="<f4").tobytes(), dtype=np.uint8)
    receiver = UpdateReceiver(codec, n, bad.size, tmp_path)
    with pytest.raises(BadUpdate, match="int4 block scales"):
        receiver.add(bad.tobytes())
    receiver.abort()
    receiver = UpdateReceiver(codec, n, payload.size, tmp_path)
    for start in range(0, payload.size, 101):
        receiver.add(payload[start : start + 101].tobytes())
    staged = receiver.finish(hashlib.sha256(payload).hexdigest())
    acc = Accumulator(n)
    acc.fold(staged, 2.0)
    staged.discard()
    np.testing.assert_allclose(acc.total, 2 * codec.decode(payload, n), rtol=1e-6)


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_int4_federation_on_digits(tmp_path: Path, procs: list[Proc]) -> None:
    port = free_port()
    state, logs = tmp_path / "state", tmp_path / "logs"
    server = start_serving(procs, logs, port, state, "--rounds", "4", "--min-clients", "2")
    clients = start_clients(procs, logs, port, 2, "--encoding", "int4")
    wait_finished(server, clients, 200)
    status = read_status(state)
    assert status["rounds_completed"] == 4
    assert status["rounds"][-1]["metrics"]["accuracy"] >= 0.85
    size = get_codec("int4").wire_manifest(task.initial_model(0).manifest.floats()).total_bytes
    assert size == 2709
    for client in clients:
        assert client.log().count(f"update accepted ({size} bytes)") == 4
