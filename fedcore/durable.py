"""Durable file writes: atomic_write (temp file, fsync, rename, fsync the folder), atomic_link.

No dependencies inside fedcore, so every module that writes files (files.py for checkpoints,
sealed.py for key files, he.py for contexts) can use it without importing the others.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import stat
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

import numpy as np
import numpy.typing as npt

log = logging.getLogger("fedcore.durable")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


PRIVATE = 0o600  # what atomic_write gives a file unless told otherwise (docs/security.md)
SHARED = None  # mode=SHARED: as the umask allows (reports, certificates: meant to be read)
PRIVATE_DIR = 0o700


def private_dir(path: Path) -> None:
    """Make `path` (and missing parents) a folder only its owner can enter.

    An existing folder open to group or others is tightened to 0700 and a warning says so: a
    state dir holds the model, checkpoints and client ids, and files written before this check
    (or by other tools) may still be readable by others. If it is not ours to change, warn.
    """
    path.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    mode = stat.S_IMODE(path.stat().st_mode)
    if not mode & 0o077:
        return
    try:
        path.chmod(mode & PRIVATE_DIR)
    except PermissionError:
        log.warning(
            "%s is mode %o and not owned by this user: other users may read the model and "
            "checkpoints in it; use a folder only the coordinator's user can open (chmod 700)",
            path,
            mode,
        )
        return
    log.warning("%s was mode %o (open to other users); changed it to 700", path, mode)


def open_private(path: Path) -> BinaryIO:
    """`path` opened for writing (truncated), mode 0600 whatever the umask: for logs kept in a
    state dir, which may quote client ids and metrics."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE)
    os.fchmod(fd, PRIVATE)  # an existing file keeps its mode through O_CREAT
    return os.fdopen(fd, "wb")


def atomic_write(
    path: Path,
    parts: Iterable[bytes | memoryview],
    mode: int | None = PRIVATE,
    overwrite: bool = True,
    direct: bool = False,
) -> None:
    """Write to a temp file in the same folder, fsync, rename over `path`, fsync the folder.

    A reader (or a restart after kill -9) sees either the old file or the complete new one.
    The file is always a new inode with `mode` (owner-only unless the caller says otherwise;
    SHARED = the umask's), set before any byte is written, so replacing a file never inherits
    the old one's permissions. With overwrite=False an existing `path` is never replaced:
    FileExistsError, atomically (the new file is linked in, which fails if the name exists).
    `direct`: bypass the page cache (O_DIRECT, see _write_direct), for files of a model's size.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask() if mode is None else mode)
        with os.fdopen(fd, "wb") as f:
            if direct:
                _write_direct(f.fileno(), parts)
            else:
                for part in parts:
                    f.write(part)
                f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
            os.unlink(tmp)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


DIRECT_BLOCK = 16 << 20  # bytes per O_DIRECT write (and the size of its aligned buffer)
# Files smaller than this are written through the page cache. O_DIRECT and its fsync were
# faster from 1 MB up on the bench machine (median of 7: 0.9 against 1.3 ms at 1 MB, 6.0
# against 9.0 at 16 MB, 17 against 22-27 at 40 MB, the 8 x 10M bench's checkpoint, written
# every round); below, the page-sized header padding is no longer small.
DIRECT_MIN = 1 << 20
PAGE = 4096  # O_DIRECT offsets, lengths and memory: multiples of the block size


class _Pages(mmap.mmap):
    """Private anonymous memory of our own: page-aligned, so O_DIRECT can write from it."""


def page_aligned_zeros(count: int, dtype: npt.DTypeLike) -> np.ndarray:
    """Zeros like np.zeros (pages untouched until written), at a page-aligned address: a
    checkpoint of a buffer allocated here is written with O_DIRECT straight from it, without
    the copy through _write_direct's aligned buffer (~0.3 s per 2.4 GB)."""
    nbytes = count * np.dtype(dtype).itemsize
    if nbytes == 0:
        return np.zeros(count, dtype)
    pages = _Pages(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):  # as numpy asks for its large arrays: one fault per
        pages.madvise(mmap.MADV_HUGEPAGE)  # 2 MiB, not per 4 KiB (0.3 s less per 2.4 GB fold)
    return np.frombuffer(pages, dtype=dtype, count=count)


class PageRecycler:
    """Keeps the last retired page_aligned_zeros() array so that the next one of its size is
    made of its pages: a fresh mapping costs the kernel a zeroed page per page touched, ~0.25 s
    per 2.4 GB on bare metal and 45 % of the coordinator's CPU at 600M on the bench's VM, whose
    host backs a freshly touched page only then. Holds one array at most; `take` hands it over
    only if nothing else can reach its memory any more, else lets it go."""

    def __init__(self) -> None:
        self._retired: np.ndarray | None = None

    def retire(self, array: np.ndarray) -> None:
        """`array` (or a view of a page_aligned_zeros() array) is no longer ours to use."""
        self._retired = array

    def release(self) -> None:
        """Let go of an array nobody took (a protocol that makes no accumulator of its own,
        or a round that did not open yet): kept, it would be one model more in memory."""
        self._retired = None

    def take(self, count: int, dtype: npt.DTypeLike) -> np.ndarray | None:
        """The retired pages as `count` `dtype` values (stale contents), or None."""
        array, self._retired = self._retired, None
        # References allowed: `array` here and getrefcount's argument; for each base below
        # it, the .base of the array above, `base` here and the argument. Anything more (a
        # download still streaming it, a view, an exported buffer) and the pages are not free.
        if array is None or sys.getrefcount(array) > 2:
            return None
        base = array.base
        while isinstance(base, np.ndarray):
            if sys.getrefcount(base) > 3:
                return None
            base = base.base
        nbytes = count * np.dtype(dtype).itemsize
        if not _is_pages(base) or sys.getrefcount(base) > 3 or base.nbytes != nbytes:
            return None
        del array  # the old views go; the mapping stays with `base`
        return np.frombuffer(base, dtype=dtype, count=count)


def owns_its_pages(array: np.ndarray) -> bool:
    """Whether `array` is a page_aligned_zeros() array itself (not a view of one)."""
    return _is_pages(array.base)  # frombuffer's base is a memoryview of the mapping


def _is_pages(base: object) -> bool:
    return isinstance(base, memoryview) and isinstance(base.obj, _Pages)


def _address(data: memoryview) -> int:
    return int(np.frombuffer(data, dtype=np.uint8, count=1).ctypes.data) if len(data) else 0


def _write_direct(fd: int, parts: Iterable[bytes | memoryview]) -> None:
    """Write `parts` to `fd` (empty, at offset 0) with O_DIRECT.

    A checkpoint is written once and not read back: through the page cache, a 2.4 GB one cost
    2.3-3.0 s (allocating and copying every page, then waiting for writeback in fsync), with
    O_DIRECT 1.0-1.1 s on the same disk, and the cache keeps what it held. Bytes at a
    page-aligned address that go to a page-aligned offset are written from where they are
    (the header is padded to a page for this, see page_aligned_zeros); the rest is copied
    through one aligned buffer (anonymous memory), whose last block is padded to the alignment
    and the file cut back to its length. A file system without O_DIRECT (tmpfs) gets buffered
    writes.
    """
    direct = _set_direct(fd, True)
    block = mmap.mmap(-1, DIRECT_BLOCK)
    buffer = memoryview(block)
    filled = size = 0
    try:
        for part in parts:
            data = memoryview(part).cast("B")
            while len(data):
                whole = len(data) // PAGE * PAGE
                if direct and whole and filled % PAGE == 0 and _address(data) % PAGE == 0:
                    if filled:
                        direct = _write_all(fd, buffer[:filled], direct)
                        size, filled = size + filled, 0
                    take = min(whole, DIRECT_BLOCK)
                    direct = _write_all(fd, data[:take], direct)
                    size += take
                    data = data[take:]
                    continue
                take = min(len(data), DIRECT_BLOCK - filled)
                buffer[filled : filled + take] = data[:take]
                filled += take
                data = data[take:]
                if filled == DIRECT_BLOCK:
                    direct = _write_all(fd, buffer, direct)
                    size, filled = size + filled, 0
        if filled:
            padded = -(-filled // PAGE) * PAGE
            buffer[filled:padded] = bytes(padded - filled)
            _write_all(fd, buffer[:padded], direct)
            size += filled
        os.ftruncate(fd, size)
    finally:
        buffer.release()
        block.close()
        _set_direct(fd, False)


def _set_direct(fd: int, on: bool) -> bool:
    """Turn O_DIRECT on or off for `fd`; whether it is on (False where unsupported)."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT if on else flags & ~os.O_DIRECT)
    except OSError:
        return False
    return on


def _write_all(fd: int, data: memoryview, direct: bool) -> bool:
    """Write all of `data`; a file system that refuses the O_DIRECT write (EINVAL) gets it
    buffered, and so do the writes after it. Returns whether O_DIRECT is still on."""
    while len(data):
        try:
            written = os.write(fd, data)
        except OSError as e:
            if not direct or e.errno != errno.EINVAL:
                raise
            direct = _set_direct(fd, False)
            continue
        data = data[written:]
    return direct


def atomic_link(source: Path, path: Path) -> None:
    """Make `path` another name of the (already durable) file `source`, atomically.

    Publishing a file that already exists under another name costs a directory entry instead of
    rewriting and fsyncing every byte. Both names must be on one filesystem; raises OSError
    otherwise (callers fall back to atomic_write). Safe because our files are only ever
    replaced by rename, never modified in place, so the shared inode never changes.
    """
    path = Path(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}-{time.monotonic_ns()}.tmp"
    os.link(source, tmp)
    try:
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
