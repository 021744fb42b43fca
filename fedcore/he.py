"""Homomorphic-encryption aggregation with CKKS (TenSEAL): sum updates without seeing them.

One key pair is shared by the clients (`fedserver he-keygen` writes it): clients hold the secret
context, the coordinator only the public one, which can encrypt and add but never decrypt
(TenSEAL refuses: "the current context of the tensor doesn't hold a secret_key"). A client
encrypts its example-weighted update n_k * delta_k in chunks of `slots` values (one CKKS
ciphertext each), the coordinator adds ciphertexts chunk by chunk, and a key holder decrypts the
sum; the coordinator divides by sum(n_k) (plaintext, from the update headers).

Contexts and ciphertexts use TenSEAL's own serialization (SEAL's binary format in protobuf), never
pickle. Parameters: polynomial degree 8192 (4096 slots per ciphertext), coefficient moduli
60/40/40/60 bits, scale 2^40: ~128-bit security (HE standard) and ~1e-7 absolute error on sums of
values up to 1e3 (measured by tests/test_he.py; the bound asserted there is 1e-5).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

POLY_DEGREE = 8192
COEFF_BITS = (60, 40, 40, 60)
SCALE_BITS = 40
SLOTS = POLY_DEGREE // 2
SECRET_FILE = "he-secret.ctx"  # for clients only
PUBLIC_FILE = "he-public.ctx"  # for the coordinator


class HEError(ValueError):
    """A context or ciphertext that cannot be used (wrong kind of key, corrupt bytes)."""


def _ts():  # type: ignore[no-untyped-def]
    try:
        import tenseal
    except ImportError:  # pragma: no cover - tenseal is a dependency of the `he` extra
        raise HEError("--secure he needs TenSEAL: pip install 'fedgrpc[he]'") from None
    return tenseal


def generate_keys(out_dir: Path) -> tuple[Path, Path]:
    """Write (secret context for clients, public context for the coordinator), mode 600."""
    ts = _ts()
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, POLY_DEGREE, coeff_mod_bit_sizes=list(COEFF_BITS))
    ctx.global_scale = 2**SCALE_BITS
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = (out_dir / SECRET_FILE, out_dir / PUBLIC_FILE)
    blobs = (ctx.serialize(save_secret_key=True), ctx.serialize(save_secret_key=False))
    for path, blob in zip(paths, blobs, strict=True):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
    return paths


def _load(path: Path):  # type: ignore[no-untyped-def]
    ts = _ts()
    try:
        return ts.context_from(Path(path).read_bytes())
    except OSError as e:
        raise HEError(f"cannot read HE context {path}: {e.strerror}") from None
    except Exception as e:  # TenSEAL raises ValueError/RuntimeError on bad bytes
        raise HEError(f"{path} is not a TenSEAL context ({e})") from None


class HEClient:
    """A key holder: encrypts its weighted update, decrypts the coordinator's aggregate."""

    def __init__(self, secret_context: Path) -> None:
        self.ctx = _load(secret_context)
        if not self.ctx.is_private():
            raise HEError(f"{secret_context} holds no secret key; clients need {SECRET_FILE}")

    def encrypt(self, vector: np.ndarray, weight: float = 1.0) -> list[bytes]:
        ts = _ts()
        scaled = np.asarray(vector, dtype=np.float64) * weight
        return [
            ts.ckks_vector(self.ctx, scaled[i : i + SLOTS].tolist()).serialize()
            for i in range(0, scaled.size, SLOTS)
        ]

    def decrypt(self, chunks: Iterable[bytes], num_values: int) -> np.ndarray:
        ts = _ts()
        out = np.empty(num_values, dtype=np.float64)
        pos = 0
        for blob in chunks:
            try:
                values = ts.ckks_vector_from(self.ctx, blob).decrypt()
            except Exception as e:
                raise HEError(f"aggregate chunk cannot be decrypted ({e})") from None
            n = min(SLOTS, num_values - pos)
            out[pos : pos + n] = values[:n]
            pos += n
        if pos != num_values:
            raise HEError(f"aggregate decrypts to {pos} values, expected {num_values}")
        return out.astype(np.float32)


class HEAggregator:
    """The coordinator's side: adds ciphertexts chunk by chunk with the public context only."""

    def __init__(self, public_context: Path, num_values: int) -> None:
        self.ctx = _load(public_context)
        if self.ctx.is_private():
            raise HEError(
                f"{public_context} contains the secret key; give the coordinator {PUBLIC_FILE}"
            )
        self.num_chunks = -(-num_values // SLOTS)
        self._sum: list = [None] * self.num_chunks  # type: ignore[type-arg]
        self.count = 0

    def add(self, chunks: list[bytes]) -> None:
        """Fold one client's ciphertexts; raises HEError (nothing folded) on bad input."""
        ts = _ts()
        if len(chunks) != self.num_chunks:
            raise HEError(f"update has {len(chunks)} ciphertexts, expected {self.num_chunks}")
        try:
            parsed = [ts.ckks_vector_from(self.ctx, blob) for blob in chunks]
        except Exception as e:
            raise HEError(f"update is not a CKKS ciphertext of this federation ({e})") from None
        for i, vec in enumerate(parsed):
            self._sum[i] = vec if self._sum[i] is None else self._sum[i] + vec
        self.count += 1

    def aggregate(self) -> list[bytes]:
        if self.count == 0:
            raise HEError("no encrypted updates to aggregate")
        return [vec.serialize() for vec in self._sum]
