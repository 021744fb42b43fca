"""Lossy update encodings: fp16, int8 and int4 (per-block scale), top-k with error feedback."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcore.codecs import ErrorFeedback, Int8Codec, TopKCodec, get_codec
from fedcore.tensors import Manifest, ManifestError, TensorSpec
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
