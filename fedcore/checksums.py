"""Update checksums: which algorithms a SubmitUpdate trailer may use, and the digests they give.

The coordinator hashes every byte of every update it receives (to verify the trailer, and to
recognise a retry of an update it already counted), so the algorithm's speed is part of every
round: on the 2-core bench machines sha256 runs at ~1 GB/s (with SHA-NI) and BLAKE3 at ~5 GB/s,
both cryptographic with 256-bit digests. fedclient sends BLAKE3; sha256 stays accepted for
clients that predate UpdateHeader.checksum (empty means sha256).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any, Protocol

import blake3

from fedcore.limits import excerpt
from fedcore.tensors import ManifestError

DEFAULT = "blake3"
LEGACY = "sha256"  # what an empty UpdateHeader.checksum means


class Hasher(Protocol):
    def update(self, data: Any, /) -> Any: ...

    def hexdigest(self) -> str: ...


_ALGORITHMS: dict[str, Callable[[], Hasher]] = {
    "blake3": lambda: blake3.blake3(max_threads=1),
    "sha256": hashlib.sha256,
}
ALGORITHMS = tuple(_ALGORITHMS)


def new_hasher(algorithm: str) -> Hasher:
    """A fresh hasher for `algorithm` ("" = sha256); ManifestError names the ones known."""
    try:
        return _ALGORITHMS[algorithm or LEGACY]()
    except KeyError:
        raise ManifestError(
            f"unknown update checksum {excerpt(algorithm)}; supported: {', '.join(ALGORITHMS)}"
        ) from None


def hexdigest(algorithm: str, data: Any) -> str:
    h = new_hasher(algorithm)
    h.update(memoryview(data).cast("B"))
    return h.hexdigest()


def receipt_digest(algorithm: str, hex_digest: str) -> str:
    """How a counted update is remembered for idempotency: sha256 digests bare (as receipts
    were stored before the field existed), others prefixed with their algorithm, so digests of
    different algorithms never compare equal."""
    algorithm = algorithm or LEGACY
    return hex_digest if algorithm == LEGACY else f"{algorithm}:{hex_digest}"
