"""Lossy update encodings: fp16, int8 and int4 (per-block scale), top-k with error feedback."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcore.codec_base import SLAB
from fedcore.codecs import ErrorFeedback, Int8Codec, TopKCodec, get_codec
from fedcore.tensors import Manifest, ManifestError, TensorSpec, float32_to_bfloat16_bits
from fedserver.updates.accumulator import Accumulator
from fedserver.updates.receiver import UpdateReceiver
from fedserver.updates.spool import UpdateSpool

FLOATS = Manifest((TensorSpec("w", "float32", (40, 25)), TensorSpec("b", "float64", (7,))))
N = 1007


def _vector(n: int = N, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(n).astype(np.float32)


def _streamed(name: str, payload: np.ndarray, cuts: list[int]) -> np.ndarray:
    """Decode `payload` fed in pieces cut at arbitrary byte offsets."""
    codec = get_codec(name)
    data = payload.tobytes()
    bounds = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    out = np.zeros(N, dtype=np.float32)
    decoder = codec.decoder(N)
    for a, b in itertools.pairwise(bounds):
        for piece in decoder.feed(memoryview(data)[a:b]):
            if piece.indices is None:
                out[piece.offset : piece.offset + piece.values.size] = piece.values
            else:
                out[piece.indices] = piece.values
    decoder.finish()
    return out


@pytest.mark.parametrize(
    ("name", "ratio", "tolerance"),
    [
        ("fp32", 1.0, 0.0),
        ("fp16", 0.5, 2e-3),
        ("int8", 0.254, 0.02),
        ("int4", 0.141, 0.15),
        ("topk", 0.2, None),
    ],
)
def test_wire_size_and_reconstruction(name: str, ratio: float, tolerance: float | None) -> None:
    codec = get_codec(name)
    x = _vector()
    payload = codec.encode(x)
    assert payload.dtype == np.uint8
    assert payload.size == codec.wire_manifest(FLOATS).total_bytes
    assert payload.size == pytest.approx(ratio * 4 * N, rel=0.01)
    decoded = codec.decode(payload, N)
    if tolerance is not None:
        np.testing.assert_allclose(decoded, x, atol=tolerance * np.abs(x).max())
    else:  # top-k keeps exactly the 10% largest magnitudes and zeroes the rest
        kept = np.flatnonzero(decoded)
        assert kept.size == TopKCodec().k(N)
        assert np.abs(x[kept]).min() >= np.abs(np.delete(x, kept)).max()
        np.testing.assert_array_equal(decoded[kept], x[kept])


@given(
    st.sampled_from(["fp16", "int8", "int4", "topk", "topk:0.01"]),
    st.lists(st.integers(0, 10**6), max_size=6),
)
@settings(max_examples=60, deadline=None)
def test_streamed_decoding_equals_whole_decoding(name: str, cuts: list[int]) -> None:
    codec = get_codec(name)
    payload = codec.encode(_vector(seed=len(cuts)))
    np.testing.assert_array_equal(_streamed(name, payload, cuts), codec.decode(payload, N))


def test_int8_keeps_zero_blocks_and_extremes_exact() -> None:
    x = np.zeros(3 * Int8Codec.BLOCK, dtype=np.float32)
    x[Int8Codec.BLOCK + 5] = -3.5
    x[2 * Int8Codec.BLOCK] = 1e30
    decoded = Int8Codec().decode(Int8Codec().encode(x), x.size)
    assert decoded[: Int8Codec.BLOCK].tolist() == [0.0] * Int8Codec.BLOCK
    assert decoded[Int8Codec.BLOCK + 5] == pytest.approx(-3.5)
    assert decoded[2 * Int8Codec.BLOCK] == pytest.approx(1e30, rel=1e-6)


def test_fp16_clips_instead_of_overflowing_to_inf() -> None:
    decoded = get_codec("fp16").decode(get_codec("fp16").encode(np.array([1e6, -1e6])), 2)
    assert np.isfinite(decoded).all() and decoded[0] == 65504.0


def test_error_feedback_delays_but_never_loses_mass() -> None:
    """Over rounds, what top-k sent plus the residual equals everything the client had."""
    codec, feedback = get_codec("topk:0.05"), ErrorFeedback()
    sent = np.zeros(N, dtype=np.float32)
    total = np.zeros(N, dtype=np.float32)
    for r in range(20):
        delta = _vector(seed=r)
        total += delta
        sent += codec.decode(feedback.encode(codec, delta), N)
    assert feedback.residual is not None
    np.testing.assert_allclose(sent + feedback.residual, total, atol=1e-4)
    # Stateless codecs pass through untouched.
    fp16 = get_codec("fp16")
    assert np.array_equal(ErrorFeedback().encode(fp16, _vector()), fp16.encode(_vector()))


def test_bad_top_k_positions_and_names_are_refused() -> None:
    codec = TopKCodec(0.01)
    k = codec.k(N)
    descending = np.arange(k, 0, -1, dtype="<i4")
    with pytest.raises(ManifestError, match="strictly increasing"):
        list(codec.decoder(N).feed(descending.tobytes()))
    beyond = np.arange(N - k + 1, N + 1, dtype="<i4")
    with pytest.raises(ManifestError, match="within the model"):
        list(codec.decoder(N).feed(beyond.tobytes()))
    for bad in ("topk:0", "topk:1.5", "topk:x", "zstd"):
        with pytest.raises(ManifestError):
            get_codec(bad)
    assert get_codec("topk:0.1").name == "topk" and get_codec("topk:0.02").name == "topk:0.02"


@pytest.mark.parametrize("name", ["fp16", "int8", "int4", "topk"])
def test_receiver_accumulator_and_spool_fold_what_the_codec_decodes(
    name: str, tmp_path: Path
) -> None:
    import hashlib

    codec = get_codec(name)
    acc, spool = Accumulator(N), UpdateSpool(N, tmp_path)
    expected = np.zeros(N, dtype=np.float32)
    for seed, weight in ((1, 2.0), (2, 3.0)):
        payload = codec.encode(_vector(seed=seed))
        receiver = UpdateReceiver(codec, N, payload.size, tmp_path)
        for start in range(0, payload.size, 333):
            receiver.add(payload[start : start + 333].tobytes())
        staged = receiver.finish(hashlib.sha256(payload).hexdigest())
        acc.fold(staged, weight)
        spool.append(staged, weight)
        expected += np.float32(weight) * codec.decode(payload, N)
        staged.discard()
    np.testing.assert_allclose(acc.total, expected, rtol=1e-6, atol=1e-6)
    rows = np.asarray(spool.matrix())
    np.testing.assert_allclose(rows[0] * 2 + rows[1] * 3, expected, rtol=1e-6, atol=1e-6)
    spool.close()


def test_sparse_pieces_map_through_a_tensor_selection() -> None:
    from fedcore.codecs import Piece
    from fedcore.selection import Selection

    floats = Manifest(
        (
            TensorSpec("a", "float32", (3,)),
            TensorSpec("b", "float32", (4,)),
            TensorSpec("c", "float32", (5,)),
        )
    )
    sel = Selection.of_names(floats, ["a", "c"])  # update vector = a (0..2) then c (3..7)
    piece = Piece(0, np.array([1, 2, 3, 4], dtype=np.float32), np.array([0, 2, 3, 7]))
    out = np.zeros(12, dtype=np.float32)
    for p in sel.to_full([piece]):
        out[p.indices] = p.values
    assert np.flatnonzero(out).tolist() == [0, 2, 7, 11]
    assert out[[0, 2, 7, 11]].tolist() == [1, 2, 3, 4]


# ---------------------------------------------------------------- a slab at a time
# Codecs encode SLAB values at a time so that a large model's delta needs no model-sized
# temporaries; the bytes must be exactly those of quantizing the whole vector at once.
LONG = 2 * SLAB + 777  # three slabs, the last one partial and odd


def _whole_blocks(x: np.ndarray, block: int, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """Block scales and q for all of `x` at once (how the codecs encoded before slabs)."""
    blocks = -(-x.size // block)
    padded = np.zeros(blocks * block, dtype=np.float32)
    padded[: x.size] = x
    grid = padded.reshape(blocks, block)
    scales = np.abs(grid).max(axis=1) / np.float32(levels)
    safe = np.where(scales > 0, scales, np.float32(1))
    return scales, np.clip(np.rint(grid / safe[:, None]), -levels, levels).reshape(-1)


def _whole_vector_encoding(name: str, x: np.ndarray) -> np.ndarray:
    if name == "fp16":
        return np.clip(x, -65504.0, 65504.0).astype("<f2").view(np.uint8)
    if name == "int8":
        scales, q = _whole_blocks(x, 256, 127)
        values = q.astype(np.int8)[: x.size].view(np.uint8)
        return np.concatenate([scales.astype("<f4").view(np.uint8), values])
    if name == "int4":
        scales, q = _whole_blocks(x, 64, 7)
        nibbles = (q + 8).astype(np.uint8)
        packed = (nibbles[0::2] | (nibbles[1::2] << 4))[: -(-x.size // 2)]
        return np.concatenate([scales.astype("<f4").view(np.uint8), packed])
    assert name == "topk"
    k = TopKCodec().k(x.size)
    top = np.sort(np.argpartition(np.abs(x), x.size - k)[x.size - k :]).astype("<i4")
    return np.concatenate([top.view(np.uint8), x[top].astype("<f4").view(np.uint8)])


def _long_vector(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scale = np.repeat(10.0 ** rng.integers(-6, 2, -(-LONG // 256)), 256)[:LONG]
    return (rng.standard_normal(LONG) * scale).astype(np.float32)


@pytest.mark.parametrize("name", ["fp16", "int8", "int4", "topk"])
def test_encoding_a_slab_at_a_time_gives_the_whole_vector_bytes(name: str) -> None:
    x = _long_vector(seed=7)
    assert np.array_equal(get_codec(name).encode(x), _whole_vector_encoding(name, x))


def test_native_half_tensors_are_encoded_a_slab_at_a_time_too() -> None:
    floats = Manifest(
        (
            TensorSpec("a", "bfloat16", (SLAB + 5,)),
            TensorSpec("b", "float16", (SLAB + 3,)),
            TensorSpec("c", "float32", (7,)),
        )
    )
    x = _long_vector(seed=8)[: 2 * SLAB + 15] * np.float32(1e4)  # some beyond float16
    a, b, c = np.split(x, [SLAB + 5, 2 * SLAB + 8])
    expected = np.concatenate(
        [
            float32_to_bfloat16_bits(a).astype("<u2").view(np.uint8),
            np.clip(b, -65504.0, 65504.0).astype("<f2").view(np.uint8),
            c.astype("<f4").view(np.uint8),
        ]
    )
    assert np.array_equal(get_codec("fp32").bind(floats).encode(x), expected)


@pytest.mark.parametrize("name", ["int4", "topk"])
def test_error_feedback_in_place_equals_the_textbook_formula(name: str) -> None:
    """residual ← (delta + residual) - decode(encode(delta + residual)), bit for bit."""
    codec, feedback = get_codec(name), ErrorFeedback()
    residual = np.zeros(N, dtype=np.float32)
    for r in range(3):
        delta = _vector(seed=r)
        v = delta + residual
        assert np.array_equal(feedback.encode(codec, delta), codec.encode(v))
        residual = v - codec.decode(codec.encode(v), N)
        assert feedback.residual is not None
        assert np.array_equal(feedback.residual, residual)
        assert np.array_equal(delta, _vector(seed=r))  # the caller's delta is left alone


def test_a_read_only_residual_is_replaced_not_written() -> None:
    """A residual loaded from a client's state file may be read-only: it is not written to."""
    codec, kept = get_codec("int4"), np.ones(N, dtype=np.float32)
    kept.flags.writeable = False
    feedback, fresh = ErrorFeedback(), ErrorFeedback()
    feedback.residual, fresh.residual = kept, np.ones(N, dtype=np.float32)
    delta = _vector(seed=5)
    assert np.array_equal(feedback.encode(codec, delta), fresh.encode(codec, delta))
    assert feedback.residual is not None and fresh.residual is not None
    assert np.array_equal(feedback.residual, fresh.residual)
    assert (kept == 1).all()


def test_top_k_sends_nan_and_takes_ties_by_position() -> None:
    codec = TopKCodec(0.01)
    k = codec.k(N)
    x = np.full(N, 0.5, dtype=np.float32)  # every value ties
    assert np.flatnonzero(codec.decode(codec.encode(x), N)).tolist() == list(range(k))
    x[[3, 500, 900]] = np.nan  # NaN counts as the largest: sent, for the coordinator to refuse
    x[[10, 20]] = 2.0
    kept = np.flatnonzero(codec.decode(codec.encode(x), N) != 0)
    ties = [i for i in range(N) if i not in (3, 500, 900, 10, 20)][: k - 5]
    assert kept.tolist() == sorted([3, 500, 900, 10, 20, *ties])


_PEAK_SCRIPT = """
import sys
import numpy as np
from fedcore.codecs import ErrorFeedback, get_codec

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

name, n = sys.argv[1], int(sys.argv[2])
delta = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
codec, feedback = get_codec(name), ErrorFeedback()
feedback.encode(codec, delta[:4096].copy())  # imports and first-call allocations
feedback.residual = None
before = status("VmRSS")
payloads = [feedback.encode(codec, delta) for _ in range(2)]  # the second with a residual
print((status("VmHWM") - before) / (4 * n))
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("name", "models"), [("int4", 1.3), ("int8", 0.6), ("topk", 2.5)])
def test_encoding_a_large_delta_holds_no_model_sized_temporaries(name: str, models: float) -> None:
    """Peak memory of two rounds of ErrorFeedback.encode on a 16M-value delta, in models: the
    residual (int4, top-k), top-k's |x| for its threshold, the two payloads, and slabs. Before
    slabs: int4 5.4, int8 3.3, top-k 5.7."""
    n = 16 * SLAB
    out = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, name, str(n)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    peak = float(out.stdout)
    assert peak <= models + (48 << 20) / (4 * n), f"{name}: {peak:.2f} models"
