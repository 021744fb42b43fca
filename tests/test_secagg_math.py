"""Secure-aggregation math alone: quantization, Shamir, key agreement, masks that cancel."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from cryptography.exceptions import InvalidTag
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcore.secagg import quantize, shamir
from fedcore.secagg.keys import KeyPair, expand, open_sealed, random_seed, seal
from fedcore.secagg.masking import mask, pair_seed, unmask

pytestmark = pytest.mark.timeout(60)
CTX = b"federation-x/round-3"


# ---------------------------------------------------------------- quantization
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(1, 20), dim=st.integers(1, 300))
def test_quantized_sum_matches_weighted_mean_within_bound(seed: int, n: int, dim: int) -> None:
    rng = np.random.default_rng(seed)
    xs = rng.normal(0, 0.1, size=(n, dim)).astype(np.float32)
    ws = rng.integers(1, 5000, size=n).astype(np.float64)
    total = np.zeros(dim, np.uint64)
    for x, w in zip(xs, ws, strict=True):
        total = quantize.add(total, quantize.encode(x, w))
    got = quantize.decode_sum(total, ws.sum())
    exact = (xs.astype(np.float64) * ws[:, None]).sum(0) / ws.sum()
    # Rounding bound 2^-25 plus the float32 rounding of the output.
    tol = quantize.ERROR_BOUND + np.abs(exact) * 2**-23
    assert np.all(np.abs(got.astype(np.float64) - exact) <= tol)


def test_extreme_values_do_not_overflow_at_the_stated_limit() -> None:
    """The largest supported round: total weight 2^31 - 1, every value at +RANGE (or -RANGE)."""
    w = quantize.MAX_TOTAL_WEIGHT
    assert w == 2**31 - 1
    for sign in (1.0, -1.0):
        parts = [
            quantize.encode(np.full(4, sign * 1e6), w // 2),  # clipped to ±RANGE
            quantize.encode(np.full(4, sign * quantize.RANGE), w - w // 2),
        ]
        total = quantize.add(parts[0], parts[1])
        np.testing.assert_allclose(quantize.decode_sum(total, w), sign * quantize.RANGE)
    with pytest.raises(ValueError, match="weight"):
        quantize.encode(np.zeros(1), w + 1)


# ---------------------------------------------------------------- Shamir
def test_shamir_any_t_shares_rebuild_and_fewer_do_not() -> None:
    secret = random_seed()
    shares = shamir.split(secret, 3, [1, 2, 3, 4, 5])
    for pick in ([1, 2, 3], [5, 3, 1], [2, 4, 5], [1, 2, 3, 4, 5]):
        assert shamir.combine({x: shares[x] for x in pick}, 3) == secret
    with pytest.raises(ValueError, match="need 3"):
        shamir.combine({1: shares[1], 2: shares[2]}, 3)
    # Two shares with a forged third give garbage (or an out-of-range error), not the secret.
    forged = {1: shares[1], 2: shares[2], 3: bytes(shamir.SHARE_BYTES)}
    with contextlib.suppress(ValueError):
        assert shamir.combine(forged, 3) != secret


def test_shamir_validates_arguments() -> None:
    with pytest.raises(ValueError):
        shamir.split(b"short", 2, [1, 2])
    with pytest.raises(ValueError):
        shamir.split(random_seed(), 3, [1, 2])
    with pytest.raises(ValueError):
        shamir.split(random_seed(), 2, [1, 1])


# ---------------------------------------------------------------- keys and streams
def test_agreement_is_symmetric_and_bound_to_context() -> None:
    a, b = KeyPair(), KeyPair()
    assert a.agree(b.public_bytes(), b"mask", CTX) == b.agree(a.public_bytes(), b"mask", CTX)
    assert a.agree(b.public_bytes(), b"mask", CTX) != a.agree(b.public_bytes(), b"mask", b"other")
    assert a.agree(b.public_bytes(), b"mask", CTX) != a.agree(b.public_bytes(), b"share", CTX)
    again = KeyPair.from_private_bytes(a.private_bytes())
    assert again.public_bytes() == a.public_bytes()


def test_expand_is_deterministic_chacha20_and_uniform() -> None:
    seed = bytes(range(32))
    s = expand(seed, 100_000)
    assert np.array_equal(s, expand(seed, 100_000))
    assert np.array_equal(expand(seed, 10), s[:10])  # a prefix of the same keystream
    # Top bits are fair coins.
    assert abs((s >> np.uint64(63)).mean() - 0.5) < 0.01


def test_sealed_shares_reject_tampering_and_misrouting() -> None:
    key = random_seed()
    box = seal(key, b"share", b"a->b")
    assert open_sealed(key, box, b"a->b") == b"share"
    with pytest.raises(InvalidTag):
        open_sealed(key, box, b"a->c")
    with pytest.raises(InvalidTag):
        open_sealed(key, box[:-1] + bytes([box[-1] ^ 1]), b"a->b")


# ---------------------------------------------------------------- masks
def _setup(n: int, dim: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = [f"c{i}" for i in range(n)]
    keys = {c: KeyPair() for c in ids}
    publics = {c: keys[c].public_bytes() for c in ids}
    selfs = {c: random_seed() for c in ids}
    qs = {c: quantize.encode(rng.normal(0, 0.05, dim), 10) for c in ids}
    ys = {c: mask(qs[c], c, selfs[c], publics, keys[c], CTX) for c in ids}
    return ids, keys, publics, selfs, qs, ys


def test_pairwise_masks_cancel_and_dropouts_are_removed() -> None:
    ids, keys, publics, selfs, qs, ys = _setup(6, 1000)
    survivors = ids[:4]  # c4, c5 shared keys but their masked input never arrived
    total = np.zeros(1000, np.uint64)
    for c in survivors:
        total = quantize.add(total, ys[c])
    got = unmask(
        total,
        [selfs[c] for c in survivors],
        {d: keys[d] for d in ids[4:]},
        {c: publics[c] for c in survivors},
        CTX,
    )
    want = np.zeros(1000, np.uint64)
    for c in survivors:
        want = quantize.add(want, qs[c])
    assert np.array_equal(got, want)


def test_pair_seed_matches_between_peers() -> None:
    a, b = KeyPair(), KeyPair()
    assert pair_seed(a, b.public_bytes(), CTX) == pair_seed(b, a.public_bytes(), CTX)


def test_masked_codec_keeps_ring_elements_exact() -> None:
    from fedcore.codecs import get_codec
    from fedcore.tensors import Manifest, TensorSpec

    codec = get_codec("masked-u64")
    floats = Manifest((TensorSpec("w", "float32", (3,)),))
    assert codec.wire_manifest(floats).tensors[0].dtype == "int64"
    y = np.array([0, 2**64 - 1, 2**63 + 5], dtype=np.uint64)
    payload = codec.encode(y).tobytes()
    decoder = codec.decoder(3)
    pieces = list(decoder.feed(payload[:5])) + list(decoder.feed(payload[5:]))
    decoder.finish()
    got = np.concatenate([p.values for p in pieces])
    assert got.dtype == np.uint64 and np.array_equal(got, y)
    with pytest.raises(ValueError, match="masked"):
        codec.encode(np.zeros(3, np.float32))
