"""Update checksums: which algorithms a SubmitUpdate trailer may use, and the digests they give.

The coordinator hashes every byte of every update it receives (to verify the trailer, and to
recognise a retry of an update it already counted), so the algorithm's speed is part of every
round. On the 2-core bench machines sha256 runs at ~1 GB/s (with SHA-NI), BLAKE3 at ~7 GB/s and
XXH3-128 at ~33 GB/s (1 MiB chunks, one core). The checksum catches bytes corrupted or lost
between the client's encoder and the coordinator's spill, and names an update for retries of
the same client in the same round; it authenticates nothing (TLS and tokens do, and a client
could only collide with its own update), so a 128-bit non-cryptographic hash does the job.

The coordinator offers what it accepts in JoinReply.checksums, preferred first, and fedclient
sends the first it knows (`choose`); a coordinator older than that field offers nothing and
gets BLAKE3. sha256 stays accepted for clients that predate UpdateHeader.checksum (empty means
sha256).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import blake3
import xxhash

from fedcore.limits import excerpt

DEFAULT = "xxh3_128"  # what fedclient sends a coordinator that offers it
UNOFFERED = "blake3"  # what it sends a coordinator that offers none (older than the offer)
LEGACY = "sha256"  # what an empty UpdateHeader.checksum means


class Hasher(Protocol):
    def update(self, data: Any, /) -> Any: ...

    def hexdigest(self) -> str: ...


# Preferred first: JoinReply.checksums lists them in this order.
_ALGORITHMS: dict[str, Callable[[], Hasher]] = {
    "xxh3_128": xxhash.xxh3_128,
    "blake3": lambda: blake3.blake3(max_threads=1),
    "sha256": hashlib.sha256,
}
ALGORITHMS = tuple(_ALGORITHMS)


class UnknownChecksum(ValueError):
    """An algorithm this side does not know (the coordinator refuses it as bad_checksum)."""


def new_hasher(algorithm: str) -> Hasher:
    """A fresh hasher for `algorithm` ("" = sha256); UnknownChecksum names the ones known."""
    try:
        return _ALGORITHMS[algorithm or LEGACY]()
    except KeyError:
        raise UnknownChecksum(
            f"unknown update checksum {excerpt(algorithm)}; supported: {', '.join(ALGORITHMS)}"
        ) from None


def choose(offered: Sequence[str]) -> str:
    """The checksum to send a coordinator whose JoinReply offered `offered` (preferred first)."""
    for name in offered:
        if name in _ALGORITHMS:
            return name
    return UNOFFERED


def hexdigest(algorithm: str, data: Any) -> str:
    h = new_hasher(algorithm)
    h.update(memoryview(data).cast("B"))
    return h.hexdigest()


def tagged(algorithm: str, data: Any) -> str:
    """`algorithm:hex` of `data`: a self-describing checksum (ModelHeader.model_checksum)."""
    return f"{algorithm}:{hexdigest(algorithm, data)}"


def parse_tagged(value: str) -> tuple[str, str] | None:
    """(algorithm, hex) of a `tagged` checksum in an algorithm we know; None otherwise (empty,
    or from a newer peer: the caller falls back to what it checked before the field)."""
    algorithm, sep, digest = value.partition(":")
    return (algorithm, digest.lower()) if sep and algorithm in _ALGORITHMS else None


def receipt_digest(algorithm: str, hex_digest: str) -> str:
    """How a counted update is remembered for idempotency: sha256 digests bare (as receipts
    were stored before the field existed), others prefixed with their algorithm, so digests of
    different algorithms never compare equal."""
    algorithm = algorithm or LEGACY
    return hex_digest if algorithm == LEGACY else f"{algorithm}:{hex_digest}"
