"""t-of-n Shamir secret sharing of 32-byte seeds over GF(p), p = 2^521 - 1 (a Mersenne prime).

Any t shares rebuild the secret by Lagrange interpolation at 0; fewer reveal nothing about it.
Share x-coordinates are 1..n (a client's position in the round's sorted roster, plus one).
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping

PRIME = (1 << 521) - 1
SHARE_BYTES = 66  # 521 bits, big-endian
SECRET_BYTES = 32


def split(secret: bytes, threshold: int, xs: list[int]) -> dict[int, bytes]:
    """Shares of `secret` for the given x-coordinates: {x: y as SHARE_BYTES bytes}."""
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"secret must be {SECRET_BYTES} bytes")
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold {threshold} must be in 1..{len(xs)}")
    if len(set(xs)) != len(xs) or not all(0 < x < PRIME for x in xs):
        raise ValueError("share x-coordinates must be distinct and nonzero")
    coeffs = [int.from_bytes(secret, "big")] + [
        secrets.randbelow(PRIME) for _ in range(threshold - 1)
    ]
    out = {}
    for x in xs:
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        out[x] = y.to_bytes(SHARE_BYTES, "big")
    return out


def combine(shares: Mapping[int, bytes], threshold: int) -> bytes:
    """The secret from at least `threshold` shares {x: y}."""
    if len(shares) < threshold:
        raise ValueError(f"need {threshold} shares, got {len(shares)}")
    points = [(x, int.from_bytes(y, "big")) for x, y in sorted(shares.items())[:threshold]]
    secret = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * (-xj) % PRIME
                den = den * (xi - xj) % PRIME
        secret = (secret + yi * num * pow(den, -1, PRIME)) % PRIME
    if secret >= 1 << (8 * SECRET_BYTES):
        raise ValueError("shares are inconsistent (reconstructed value is out of range)")
    return secret.to_bytes(SECRET_BYTES, "big")
