"""Homomorphic-encryption aggregation with CKKS (TenSEAL): sum updates without seeing them.

One key pair is shared by the clients (`fedserver he-keygen` writes it): clients hold the secret
context, the coordinator only the public one, which can encrypt and add but never decrypt
(TenSEAL refuses: "the current context of the tensor doesn't hold a secret_key"). A client
encrypts its example-weighted update n_k * delta_k in chunks of `slots` values (one CKKS
ciphertext each), the coordinator adds ciphertexts chunk by chunk, and a key holder decrypts the
sum; the coordinator divides by sum(n_k) (plaintext, from the update headers).

Contexts and ciphertexts use TenSEAL's own serialization (SEAL's binary format in protobuf), not
Python object serialization. Parameters: polynomial degree 8192 (4096 slots per ciphertext),
coefficient moduli 60/40/40/60 bits, scale 2^40: ~128-bit security (HE standard) and ~1e-7
absolute error on sums of values up to 1e3 (measured by tests/test_he.py; the bound asserted
there is 1e-5).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from fedcore.codecs import Codec, Piece, StreamDecoder
from fedcore.files import PRIVATE, atomic_write
from fedcore.tensors import Manifest, ManifestError

POLY_DEGREE = 8192
COEFF_BITS = (60, 40, 40, 60)
SCALE_BITS = 40
SLOTS = POLY_DEGREE // 2
SECRET_FILE = "he-secret.ctx"  # for clients only
PUBLIC_FILE = "he-public.ctx"  # for the coordinator
ENCODING = "he-ckks"
# A serialized degree-8192 ciphertext is ~0.3-0.4 MB; anything far larger is not one of ours.
MAX_CIPHERTEXT_BYTES = 1 << 20
_LENGTH = struct.Struct("<I")


class HEError(ValueError):
    """A context or ciphertext that cannot be used (wrong kind of key, corrupt bytes)."""


def num_ciphertexts(num_values: int) -> int:
    return -(-num_values // SLOTS)


# ---------------------------------------------------------------- wire framing
# An encrypted update (or aggregate) is its ciphertexts back to back, each preceded by its byte
# length (uint32 little-endian): serialized ciphertexts vary in size (SEAL compresses them).
def frame(blobs: Iterable[bytes]) -> np.ndarray:
    """Ciphertexts -> one uint8 payload."""
    parts: list[bytes] = []
    for blob in blobs:
        parts += (_LENGTH.pack(len(blob)), blob)
    return np.frombuffer(b"".join(parts), dtype=np.uint8)


def unframe(data: bytes | memoryview | np.ndarray, expected: int) -> list[bytes]:
    """The ciphertexts of a payload; HEError unless it holds exactly `expected` well-framed ones."""
    decoder = _FrameDecoder(expected, keep=True)
    for _ in decoder.feed(memoryview(data).cast("B")):
        pass
    try:
        decoder.finish()
    except ManifestError as e:
        raise HEError(str(e)) from None
    return decoder.blobs


class _FrameDecoder(StreamDecoder):
    """Checks the framing as chunks arrive (lengths, count); yields no plaintext pieces."""

    def __init__(self, expected: int, keep: bool = False) -> None:
        self.expected = expected
        self.count = 0
        self.blobs: list[bytes] = []
        self._keep = keep
        self._head = b""
        self._left = 0  # bytes of the current ciphertext still to come
        self._current: list[bytes] = []

    def feed(self, data: bytes | memoryview) -> Iterator[Piece]:
        view = memoryview(data).cast("B")
        while view:
            if self._left == 0:
                need = _LENGTH.size - len(self._head)
                self._head += bytes(view[:need])
                view = view[need:]
                if len(self._head) < _LENGTH.size:
                    break
                (length,) = _LENGTH.unpack(self._head)
                self._head = b""
                self.count += 1
                if self.count > self.expected:
                    raise ManifestError(
                        f"update holds more than the {self.expected} ciphertext(s) this model needs"
                    )
                if not 0 < length <= MAX_CIPHERTEXT_BYTES:
                    raise ManifestError(
                        f"ciphertext {self.count} declares {length} bytes; a CKKS ciphertext "
                        f"of this federation has 1 to {MAX_CIPHERTEXT_BYTES}"
                    )
                self._left = length
            take = view[: self._left]
            view = view[len(take) :]
            self._left -= len(take)
            if self._keep:
                self._current.append(bytes(take))
                if self._left == 0:
                    self.blobs.append(b"".join(self._current))
                    self._current = []
        yield from ()

    def finish(self) -> None:
        if self._left or self._head or self.count != self.expected:
            raise ManifestError(
                f"update stream ended inside ciphertext {self.count} of {self.expected} (truncated)"
                if self._left or self._head
                else f"update holds {self.count} ciphertext(s); this model needs {self.expected}"
            )


class CKKSCodec(Codec):
    """Encoding "he-ckks": the update as CKKS ciphertexts (see HEClient.encrypt_update).

    The manifest names the float32 tensors the ciphertexts stand for; the byte size varies, so
    the coordinator checks it against `max_bytes` instead of an exact figure.
    """

    name = ENCODING

    def wire_manifest(self, floats: Manifest) -> Manifest:
        return floats.with_dtype("float32")

    def encode(self, delta: np.ndarray) -> np.ndarray:
        raise HEError("encrypting needs a key holder's context: use HEClient.encrypt_update")

    def decoder(self, num_values: int) -> StreamDecoder:
        return _FrameDecoder(num_ciphertexts(num_values))

    def max_bytes(self, num_values: int) -> int:
        return num_ciphertexts(num_values) * (_LENGTH.size + MAX_CIPHERTEXT_BYTES)


def _ts():  # type: ignore[no-untyped-def]
    try:
        import tenseal
    except ImportError:  # pragma: no cover - tenseal is a dependency of the `he` extra
        raise HEError("--secure he needs TenSEAL: pip install 'fedgrpc[he]'") from None
    return tenseal


def generate_keys(out_dir: Path, overwrite: bool = False) -> tuple[Path, Path]:
    """Write (secret context for clients, public context for the coordinator), mode 600.

    Existing files are refused (FileExistsError, nothing written) unless `overwrite`: a new key
    pair silently replacing the one the clients hold would make every round undecryptable.
    Each file is a new 0600 inode renamed into place, so a replaced file never keeps the old
    one's permissions (a `chmod 644` secret stays readable by others otherwise).
    """
    out_dir = Path(out_dir)
    paths = (out_dir / SECRET_FILE, out_dir / PUBLIC_FILE)
    existing = [str(p) for p in paths if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{' and '.join(existing)} already exist(s); refusing to replace HE keys the clients "
            "may hold (--force to make a new pair)"
        )
    ts = _ts()
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, POLY_DEGREE, coeff_mod_bit_sizes=list(COEFF_BITS))
    ctx.global_scale = 2**SCALE_BITS
    blobs = (ctx.serialize(save_secret_key=True), ctx.serialize(save_secret_key=False))
    for path, blob in zip(paths, blobs, strict=True):
        atomic_write(path, [blob], PRIVATE, overwrite=overwrite)
    return paths


def _load(path: Path):  # type: ignore[no-untyped-def]
    ts = _ts()
    try:
        return ts.context_from(Path(path).read_bytes())
    except OSError as e:
        raise HEError(f"cannot read HE context {path}: {e.strerror}") from None
    except Exception as e:  # TenSEAL raises ValueError/RuntimeError on bad bytes
        raise HEError(f"{path} is not a TenSEAL context ({e})") from None


def load_public_context(path: Path):  # type: ignore[no-untyped-def]
    """The coordinator's context; HEError if unreadable or if it holds the secret key."""
    ctx = _load(path)
    if ctx.is_private():
        raise HEError(f"{path} contains the secret key; give the coordinator {PUBLIC_FILE}")
    return ctx


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

    def encrypt_update(self, vector: np.ndarray, weight: float = 1.0) -> np.ndarray:
        """weight x vector as the "he-ckks" wire payload."""
        return frame(self.encrypt(vector, weight))

    def decrypt_payload(self, payload: bytes | memoryview, num_values: int) -> np.ndarray:
        """A framed aggregate (GetEncryptedAggregate's bytes) -> float32 plaintext sum."""
        return self.decrypt(unframe(payload, num_ciphertexts(num_values)), num_values)

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
        self.ctx = load_public_context(public_context)
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

    def reset(self) -> None:
        """Start a new sum (a new round) with the same context."""
        self._sum = [None] * self.num_chunks
        self.count = 0

    def add_payload(self, payload: bytes | memoryview) -> None:
        self.add(unframe(payload, self.num_chunks))

    def aggregate(self) -> list[bytes]:
        if self.count == 0:
            raise HEError("no encrypted updates to aggregate")
        return [vec.serialize() for vec in self._sum]

    def aggregate_payload(self) -> np.ndarray:
        return frame(self.aggregate())
