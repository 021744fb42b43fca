"""Receiving updates with memory O(model), whatever the number of clients.

An incoming update is validated chunk by chunk (size, finiteness) and spilled to an
anonymous temp file while its checksum is computed, so a stream that turns out bad
(truncated, wrong checksum) never reaches the round's accumulator (accumulator.py).
Only a verified update is folded, reading its spill back in chunk-sized blocks (under
--encrypt-state once all of it was authenticated against what was written: SpillFile). The
spill lives in the page cache, not the process heap, and is encrypted under --encrypt-state.
"""

from __future__ import annotations

import math
import mmap
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.poly1305 import Poly1305

from fedcore.checksums import UnknownChecksum, new_hasher, receipt_digest
from fedcore.codec_base import FixedWidthDecoder
from fedcore.codecs import Codec, Piece
from fedcore.tensors import DEFAULT_CHUNK_SIZE, ManifestError

# Bytes of a spill mapped at once when it is verified or folded: bounds what the mapping adds
# to the coordinator's RSS (file pages count while mapped), whatever the model's size.
SPILL_WINDOW = 16 << 20
# Pages mapped in one call when a window is mapped (MAP_POPULATE) instead of one fault per 4
# KiB page as they are read: the fold of a mapped spill ran ~20% faster.
_MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
# Largest |value| an update seen in plain may carry (--max-update-value). Finite is not enough:
# the fold sums weight x value in float32, so one value of 1e30 at 1e9 examples (or two of
# 3e38) overflowed to inf and published an inf model (or SCAFFOLD's c). At 1e15, even 1e9
# examples from each of 1e14 updates stay below float32's 3.4e38, and squares (FedAdam's v)
# below it too; no trained model's delta comes near it.
MAX_UPDATE_VALUE = 1e15


class BadUpdate(ValueError):
    """The update's bytes are not acceptable (→ INVALID_ARGUMENT); `reason` labels metrics."""

    def __init__(self, message: str, reason: str = "malformed") -> None:
        super().__init__(message)
        self.reason = reason


class UpdateTooLarge(BadUpdate):
    """→ RESOURCE_EXHAUSTED."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason="too_large")


class SpillCorrupted(BadUpdate):
    """A verified update's spill does not read back as it was written (the disk or someone with
    access to it changed it). Not the client's fault: → INTERNAL, which clients retry."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason="spill_corrupt")


class SpillFile:
    """An anonymous (unlinked) temp file holding one update's bytes while it is verified.

    It vanishes even on kill -9. With a `key` (the coordinator runs --encrypt-state) the bytes
    are AES-256-CTR encrypted under that key, which only ever exists in the process's memory:
    what reaches the disk is unreadable, during the round and after a crash.

    Encrypted, the spill is also authenticated before it is used: every `block_size` bytes as
    written to disk get a Poly1305 tag under a fresh random one-time key; keys and tags stay in
    memory (48 bytes per MiB). `verify()` reads the whole file back and checks every block
    before any of it is used (the first read does so by itself), so bytes changed on disk after
    the update was verified, which CTR alone would let anyone flip at will, are refused whole
    instead of folded. Poly1305 because it is the cheapest sound MAC here (~4 GB/s, BLAKE3
    ~2.2 GB/s); sealed.py's AES-GCM wants the whole payload up front, while a spill is written in
    whatever pieces the client sends. The read that follows verify() is not checked again: it
    comes from the page cache verify() just filled, which only someone able to write into this
    process's open files could change, and they could as well change its memory.

    Plain, only the spill's length is checked. Without --encrypt-state nothing in the state
    dir is protected from whoever can write it (checkpoints, state.db and the published model
    are plain files they could rewrite at will), and a spill is less exposed than those: it has
    no name, in a 0700 folder, so writing it takes the coordinator's own uid or root, which can
    as well change the process's memory. Its two MAC passes bought no protection there, and
    cost 15-18 % of the coordinator's CPU per round (docs/performance.md, "Plain spills").
    """

    def __init__(
        self,
        spill_dir: Path,
        key: bytes | None = None,
        block_size: int = DEFAULT_CHUNK_SIZE,
        pool: SpillPool | None = None,
        size: int = 0,
    ) -> None:
        """`pool`: take the file from it and give it back on close, sized to `size` (the
        update's declared length, so that verify's length check still holds)."""
        self._pool = pool
        if pool is not None:
            self._file: BinaryIO = pool.take(size)
        else:
            spill_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._file = tempfile.TemporaryFile(dir=spill_dir)  # noqa: SIM115
        self._cipher = Cipher(algorithms.AES(key), modes.CTR(os.urandom(16))) if key else None
        self._encryptor = self._cipher.encryptor() if self._cipher else None
        self.authenticated = key is not None
        self._block_size = block_size
        self._tags: list[tuple[bytes, bytes]] = []  # (one-time key, tag) per block
        self._mac_key = os.urandom(32)
        self._mac = Poly1305(self._mac_key) if self.authenticated else None
        self._filled = 0  # bytes in the current block
        self._written = 0
        self.verified = False

    def write(self, data: bytes | memoryview) -> None:
        if self.verified:
            raise ValueError("the spill was already verified; it cannot grow")
        out = self._encryptor.update(data) if self._encryptor else data
        view = memoryview(out).cast("B")
        self._written += len(view)
        while self._mac is not None and len(view):
            take = min(self._block_size - self._filled, len(view))
            self._mac.update(view[:take])
            self._filled += take
            view = view[take:]
            if self._filled == self._block_size:
                self._end_block()
        self._file.write(out)

    def _end_block(self) -> None:
        assert self._mac is not None  # bytes are counted in a block only when MACed
        self._tags.append((self._mac_key, self._mac.finalize()))
        self._mac_key = os.urandom(32)
        self._mac = Poly1305(self._mac_key)
        self._filled = 0

    def verify(self) -> None:
        """SpillCorrupted (nothing used) if the file has another length than was written or,
        encrypted, if any block on disk no longer matches its tag."""
        if self._filled:
            self._end_block()
        self._file.flush()
        size = os.fstat(self._file.fileno()).st_size
        if size != self._written:
            raise SpillCorrupted(
                f"update spill has {size} bytes on disk, {self._written} were written: the file "
                "was changed after the update was verified; resend"
            )
        # Mapped, not read: the MAC runs over the page cache without copying it (-30%). A
        # window at a time: mapped pages count in the process's RSS, and a whole 2.4 GB spill
        # mapped at once added a model's size to the coordinator's peak.
        for start, view in self._windows() if self.authenticated else ():
            try:
                self._check_blocks(start // self._block_size, view)
            finally:
                view.release()
        self.verified = True

    def _windows(self) -> Iterator[tuple[int, memoryview]]:
        """(offset, read-only view) of the file in mapped windows of whole blocks. Each window
        is unmapped once nothing refers to it any more (the mmap's last reference goes)."""
        step = self._block_size * max(1, SPILL_WINDOW // self._block_size)
        if step % mmap.ALLOCATIONGRANULARITY:  # mmap offsets must be page-aligned
            step = self._block_size * mmap.ALLOCATIONGRANULARITY
        fd = self._file.fileno()
        for start in range(0, self._written, step):
            length = min(step, self._written - start)
            # No reference kept here: the window goes as soon as the caller is done with it,
            # not when the next one is already mapped.
            yield start, memoryview(mmap.mmap(fd, length, _MAP_FLAGS, mmap.PROT_READ, offset=start))

    def _check_blocks(self, first: int, view: memoryview) -> None:
        for n, start in enumerate(range(0, len(view), self._block_size)):
            index = first + n
            key, tag = self._tags[index]
            block = view[start : start + self._block_size]
            try:
                Poly1305.verify_tag(key, block, tag)
            except InvalidSignature:
                raise SpillCorrupted(
                    f"update spill block {index} changed on disk after the update was verified "
                    "(nothing from it was used); resend"
                ) from None
            finally:
                block.release()

    def blocks(self, size: int = DEFAULT_CHUNK_SIZE) -> Iterator[bytes]:
        """The plaintext from the start, in blocks of `size` (fresh buffers); verified first."""
        if not self.verified:
            self.verify()
        self._file.seek(0)
        decryptor = self._cipher.decryptor() if self._cipher else None
        while block := self._file.read(size):
            yield decryptor.update(block) if decryptor else block

    def views(self, size: int = DEFAULT_CHUNK_SIZE) -> Iterator[memoryview | bytes]:
        """Like `blocks`, without copying a plain spill: read-only views of the mapped page
        cache, each valid until the caller drops it (do not keep them: a kept view keeps its
        window mapped). Encrypted spills are decrypted into fresh buffers as by `blocks`."""
        if self._cipher is not None:
            yield from self.blocks(size)
            return
        if not self.verified:
            self.verify()
        for _, window in self._windows():
            for start in range(0, len(window), size):
                yield window[start : start + size]
            window.release()  # views still held keep the mapping; ours goes now

    def close(self) -> None:
        if self._pool is not None:
            self._pool.give(self._file)
        else:
            self._file.close()


class SpillPool:
    """Spill files kept for the next update instead of closed. Writing over pages the page
    cache already holds took half the time of filling a new file (2.0 against 4.6 ms per
    40 MB, closing included), and giving a file back frees nothing; a round's updates are
    mostly one size, so a file is sized once. Idle files keep their pages and their disk up to
    the last update they held: what a round's concurrent uploads use anyway. Unlinked, like
    every spill: they vanish with the process, even on kill -9."""

    def __init__(self, spill_dir: Path, keep: int = 16) -> None:
        self.spill_dir = spill_dir
        self.keep = keep
        self._idle: list[BinaryIO] = []

    def take(self, size: int) -> BinaryIO:
        """A file of `size` bytes, positioned at 0 (its old bytes are overwritten or cut)."""
        if self._idle:
            file = self._idle.pop()
        else:
            self.spill_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            file = tempfile.TemporaryFile(dir=self.spill_dir)  # noqa: SIM115
        file.seek(0)
        if os.fstat(file.fileno()).st_size != size:
            file.truncate(size)
        return file

    @property
    def idle(self) -> int:
        """Files kept open for the next update."""
        return len(self._idle)

    def give(self, file: BinaryIO) -> None:
        if len(self._idle) < self.keep and not file.closed:
            self._idle.append(file)
        else:
            file.close()


def spill_key(encrypted_state: bool) -> bytes | None:
    """A fresh in-memory key for update spills when the state is encrypted at rest."""
    return os.urandom(32) if encrypted_state else None


@dataclass
class StagedUpdate:
    """A verified update waiting on disk to be folded (or kept for robust aggregation)."""

    file: SpillFile
    nbytes: int
    digest: str
    codec: Codec
    num_values: int
    # L2 norm of the decoded update, measured as it arrived (UpdateReceiver(track_norm=True));
    # what the coordinator re-clips by under --dp-clip.
    norm: float | None = None

    def verify(self) -> None:
        """Check the spill still holds what was verified, before any of it is used."""
        self.file.verify()

    def pieces(self, block: int = DEFAULT_CHUNK_SIZE, transient: bool = False) -> Iterator[Piece]:
        """The decoded update in pieces. By default each block is a fresh buffer, so pieces
        stay valid if a caller keeps them; `transient` ones are views of the spill's page cache
        (no copy), for a caller that is done with each piece before it takes the next."""
        decoder = self.codec.decoder(self.num_values)
        source = self.file.views(block) if transient else self.file.blocks(block)
        for block_bytes in source:
            yield from decoder.feed(block_bytes)
            # A view of a mapped window: let it go before the next one is mapped, or two
            # windows count in the coordinator's RSS at once.
            del block_bytes
        decoder.finish()

    def payload(self) -> bytes:
        """The whole update as received (for encodings folded as a unit, e.g. ciphertexts)."""
        return b"".join(self.file.blocks())

    def discard(self) -> None:
        self.file.close()


class UpdateReceiver:
    """Checks one update stream as it arrives and spills it to disk."""

    def __init__(
        self,
        codec: Codec,
        num_values: int,
        expected_bytes: int,
        spill_dir: Path,
        checksum: str = "sha256",
        spill_key: bytes | None = None,
        track_norm: bool = False,
        max_value: float = MAX_UPDATE_VALUE,
        spills: SpillPool | None = None,
    ) -> None:
        self.codec = codec
        self.max_value = max_value
        self.num_values = num_values
        self.expected_bytes = expected_bytes
        self.received = 0
        self.checksum = checksum
        try:
            self._hash = new_hasher(checksum)  # fedcore/checksums.py: which and why
        except UnknownChecksum as e:
            raise BadUpdate(str(e), reason="bad_checksum") from None
        self._decoder = codec.decoder(num_values)
        # Sum of squares of the decoded values, in float64; None when nobody needs the norm.
        self._sum_squares: float | None = 0.0 if track_norm else None
        # Closed (or given back to `spills`) by finish/abort/discard.
        self._file = SpillFile(spill_dir, spill_key, pool=spills, size=expected_bytes)

    def add(self, data: bytes) -> None:
        self.received += len(data)
        if self.received > self.expected_bytes:
            raise UpdateTooLarge(
                f"update stream exceeds the {self.expected_bytes} bytes its header declared"
            )
        try:
            for piece in self._decoder.feed(data):
                values, most = piece.values, self.max_value
                # min/max are NaN when any value is: one comparison refuses NaN, Inf and huge.
                # Floats only: masked ring elements (secagg's uint64) are uniform by design.
                floats = values.dtype.kind == "f" and values.size
                if floats and not (-most <= values.min() and values.max() <= most):
                    self._refuse_values(values, piece.offset)
                if self._sum_squares is not None:
                    # Sparse (top-k) positions are unique, so squares add up either way.
                    # Squared in float64 by numpy's own loop: a float64 BLAS dot fights for
                    # threads and took 10-40x longer on a loaded machine.
                    self._sum_squares += float(np.square(piece.values, dtype=np.float64).sum())
        except ManifestError as e:
            raise BadUpdate(str(e)) from None
        self._hash.update(data)
        self._file.write(data)

    def _refuse_values(self, values: np.ndarray, offset: int) -> None:
        if not np.isfinite(values).all():
            bad = int(np.flatnonzero(~np.isfinite(values))[0]) + offset
            raise BadUpdate(
                f"update contains NaN or Inf (first at value {bad}); "
                "check the learning rate and the loss for divergence",
                reason="non_finite",
            )
        big = int(np.flatnonzero(np.abs(values) > self.max_value)[0])
        raise BadUpdate(
            f"update value {big + offset} is {float(values[big]):.6g}, beyond "
            f"--max-update-value {self.max_value:g}; check the learning rate and the loss "
            "for divergence",
            reason="out_of_range",
        )

    def finish(self, expected_digest: str) -> StagedUpdate:
        try:
            self._decoder.finish()
        except ManifestError as e:
            raise BadUpdate(str(e), reason="truncated") from None
        # Not kept while the update is folded (the fold decodes the spill with its own): its
        # head, int4's scales, is 37.5 MB at 600M values. A decoder of nothing takes its place.
        self._decoder = FixedWidthDecoder(np.dtype("u1"), 0)
        if self.received != self.expected_bytes:
            raise BadUpdate(
                f"update stream ended after {self.received} of {self.expected_bytes} bytes",
                reason="truncated",
            )
        digest = self._hash.hexdigest()
        if expected_digest.lower() != digest:
            raise BadUpdate(
                "update checksum mismatch: the bytes were corrupted in transit, resend",
                reason="checksum",
            )
        return StagedUpdate(
            self._file,
            self.received,
            receipt_digest(self.checksum, digest),
            self.codec,
            self.num_values,
            math.sqrt(self._sum_squares) if self._sum_squares is not None else None,
        )

    def abort(self) -> None:
        self._file.close()
