"""Authenticated encryption of files at rest (AES-256-GCM), streamed in fixed-size segments.

A sealed file is a small plaintext header followed by the payload cut into segments (1 MiB by
default), each encrypted on its own so a multi-GB checkpoint never needs a second whole-model
buffer:

    magic "FGSEAL\\x00\\x01" | key id (8) | segment size u32 | plaintext length u64 |
    nonce base (12) | role length u16 | role (utf-8)    -- the header
    segment 0 ciphertext + 16-byte tag | segment 1 ... -- ceil(length / segment size) segments

Segment i uses nonce = nonce base + i (the base is random per file, so one key seals many files
safely) and associated data = header || i. Authenticating the header with every segment binds
the role ("checkpoint:round-0003", "model") and the exact length: a swapped, truncated,
extended, reordered or bit-flipped file fails to open, and a wrong key is recognised by its key id
before any decryption. Nothing is ever returned from a segment that failed authentication.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import stat
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fedcore.tensors import ManifestError

MAGIC = b"FGSEAL\x00\x01"
SEGMENT_SIZE = 1 << 20
TAG_SIZE = 16
KEY_PREFIX = "fedgrpc-state-key-v1:"
_FIXED = struct.Struct("<8s8sIQ12sH")  # magic, key id, segment size, length, nonce base, role len
_MAX_SEGMENT = 64 << 20


class SealedError(ManifestError):
    """A sealed file that cannot be opened: wrong key, tampering, truncation, wrong role."""


def _key_id(key: bytes) -> bytes:
    # A fingerprint that identifies the key without helping an attacker guess it.
    return hashlib.sha256(b"fedgrpc key id\x00" + key).digest()[:8]


class KeyExists(SealedError):
    """A key file is already there and the caller did not ask to replace it."""


def generate_key_file(path: Path, overwrite: bool = False) -> str:
    """Write a fresh random 256-bit key, readable by the owner only; returns its key id (hex).

    An existing file is refused unless `overwrite`; either way the key lands in a new 0600 file
    renamed into place, so a replaced key file never keeps the old one's permissions.
    """
    from fedcore.files import PRIVATE, atomic_write  # fedcore.files imports this module

    path = Path(path)
    key = AESGCM.generate_key(bit_length=256)
    text = (KEY_PREFIX + base64.b64encode(key).decode() + "\n").encode()
    try:
        atomic_write(path, [text], PRIVATE, overwrite=overwrite)
    except FileExistsError:
        raise KeyExists(f"{path} already exists; refusing to overwrite a key (--force)") from None
    return _key_id(key).hex()


class StateCipher:
    """One AES-256-GCM key and the seal/open operations the state dir uses."""

    def __init__(self, key: bytes, segment_size: int = SEGMENT_SIZE) -> None:
        if len(key) != 32:
            raise SealedError(f"an AES-256 key has 32 bytes, got {len(key)}")
        if not 0 < segment_size <= _MAX_SEGMENT:
            raise ValueError(f"segment size must be in (0, {_MAX_SEGMENT}]")
        self._aead = AESGCM(key)
        self.key_id = _key_id(key)
        self.segment_size = segment_size

    @classmethod
    def from_key_file(cls, path: Path, segment_size: int = SEGMENT_SIZE) -> StateCipher:
        path = Path(path)
        try:
            text = path.read_text().strip()
            mode = path.stat().st_mode
        except OSError as e:
            raise SealedError(f"cannot read key file {path}: {e.strerror}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise SealedError(f"key file {path} is readable by other users; run `chmod 600 {path}`")
        if not text.startswith(KEY_PREFIX):
            raise SealedError(
                f"{path} is not a fedgrpc state key (create one with `fedserver keygen {path}`)"
            )
        try:
            key = base64.b64decode(text.removeprefix(KEY_PREFIX), validate=True)
        except ValueError:
            raise SealedError(f"{path}: the key is not valid base64") from None
        return cls(key, segment_size)

    # ------------------------------------------------------------------ sealing
    def seal(self, parts: Iterable[bytes | memoryview], role: str) -> Iterator[bytes]:
        """The sealed file for the concatenation of `parts`, as a stream of byte strings."""
        parts = [memoryview(p).cast("B") for p in parts]
        total = sum(len(p) for p in parts)
        header = _header(self.key_id, self.segment_size, total, os.urandom(12), role)
        yield header
        nonce_base = header[_FIXED.size - 12 : _FIXED.size]
        for index, segment in enumerate(_segments(parts, self.segment_size, total)):
            aad = header + struct.pack("<Q", index)
            yield self._aead.encrypt(_nonce(nonce_base, index), segment, aad)

    # ------------------------------------------------------------------ opening
    def open(self, path: Path, role: str) -> SealedReader:
        """A read-only file object yielding the authenticated plaintext of a sealed file."""
        return SealedReader(Path(path), self, role)


class SealedReader(io.RawIOBase):
    """Decrypts one segment at a time; raises SealedError on the first bad byte."""

    def __init__(self, path: Path, cipher: StateCipher, role: str) -> None:
        super().__init__()
        self.path = path
        self._aead = cipher._aead
        self._file: BinaryIO = open(path, "rb")  # noqa: SIM115 - closed by close()
        try:
            self._read_header(cipher, role)
        except BaseException:
            self._file.close()
            raise
        self._index = 0
        self._plain = memoryview(b"")

    def _read_header(self, cipher: StateCipher, role: str) -> None:
        fixed = self._file.read(_FIXED.size)
        if not fixed.startswith(MAGIC):
            raise SealedError(
                f"{self.path} is not encrypted, but a key was given: it was written without "
                "encryption (use it without a key, or start a new state dir)"
            )
        if len(fixed) != _FIXED.size:
            raise SealedError(f"{self.path}: encrypted file is truncated (header)")
        _, key_id, seg, total, _, role_len = _FIXED.unpack(fixed)
        raw_role = self._file.read(role_len)
        if key_id != cipher.key_id:
            raise SealedError(
                f"{self.path} was encrypted with key {key_id.hex()}, but the key file given is "
                f"key {cipher.key_id.hex()}: wrong key"
            )
        if not 0 < seg <= _MAX_SEGMENT or len(raw_role) != role_len:
            raise SealedError(f"{self.path}: encrypted file header is corrupt")
        self.header = fixed + raw_role
        self.segment_size, self.length = seg, total
        self.segments = max(1, -(-total // seg))
        self.role = raw_role.decode("utf-8", "replace")
        if self.role != role:
            raise SealedError(f"{self.path} holds {self.role!r}, expected {role!r} (file swapped?)")
        expected = len(self.header) + total + self.segments * TAG_SIZE
        actual = os.fstat(self._file.fileno()).st_size
        if actual != expected:
            raise SealedError(
                f"{self.path} has {actual} bytes, its header promises {expected}: "
                "the file was truncated or extended"
            )

    def _next_segment(self) -> bool:
        if self._index >= self.segments:
            return False
        size = min(self.segment_size, self.length - self._index * self.segment_size)
        blob = self._file.read(size + TAG_SIZE)
        aad = self.header + struct.pack("<Q", self._index)
        nonce = _nonce(self.header[_FIXED.size - 12 : _FIXED.size], self._index)
        try:
            self._plain = memoryview(self._aead.decrypt(nonce, blob, aad))
        except InvalidTag:
            raise SealedError(
                f"{self.path}: authentication failed in segment {self._index}; the file was "
                "modified or corrupted (nothing from it was used)"
            ) from None
        self._index += 1
        return True

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        out = memoryview(buffer).cast("B")
        filled = 0
        while filled < len(out):
            if not self._plain and not self._next_segment():
                break
            n = min(len(out) - filled, len(self._plain))
            out[filled : filled + n] = self._plain[:n]
            self._plain = self._plain[n:]
            filled += n
        return filled

    def close(self) -> None:
        self._file.close()
        super().close()


def _header(key_id: bytes, seg: int, total: int, nonce_base: bytes, role: str) -> bytes:
    raw_role = role.encode()
    return _FIXED.pack(MAGIC, key_id, seg, total, nonce_base, len(raw_role)) + raw_role


def _nonce(base: bytes, index: int) -> bytes:
    # 4 fixed bytes + a 64-bit counter starting at a random value: unique per (file, segment).
    counter = (int.from_bytes(base[4:], "little") + index) % (1 << 64)
    return base[:4] + counter.to_bytes(8, "little")


def _segments(parts: list[memoryview], size: int, total: int) -> Iterator[bytes | memoryview]:
    """Re-cut `parts` into `size`-byte segments, copying only where a segment spans parts."""
    if total == 0:
        yield b""
        return
    pending: list[memoryview] = []
    pending_len = 0
    for part in parts:
        while len(part):
            if not pending and len(part) >= size:
                yield part[:size]
                part = part[size:]
                continue
            take = min(size - pending_len, len(part))
            pending.append(part[:take])
            pending_len += take
            part = part[take:]
            if pending_len == size:
                yield b"".join(pending)
                pending, pending_len = [], 0
    if pending:
        yield b"".join(pending)
