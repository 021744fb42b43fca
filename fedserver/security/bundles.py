"""`fedserver certs --bundles DIR`: one folder per identity holding only what it may hold.

DIR/NAME/ gets `ca.crt`, `NAME.crt` and `NAME.key` for the coordinator (`server`), the
operator and every client, and nothing else: no CA key, no other identity's key. Each folder is
what one machine (or one container: docker-compose.yml mounts each into one service) receives.

`owner` (uid, gid) hands the folders to another user; docker-compose.yml's certs service runs as
root to write into fresh volumes and gives them to the image's unprivileged user.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from fedcore.files import PRIVATE, atomic_write


def write_bundles(
    out: Path, bundles: Path, stems: Sequence[str], owner: tuple[int, int] | None = None
) -> list[Path]:
    """Copy ca.crt and each stem's pair from `out` into bundles/STEM/; returns the folders.

    Rewritten on every run (a few hundred bytes each), so a bundle always matches `out`.
    """
    ca = (out / "ca.crt").read_bytes()
    made = []
    for stem in stems:
        folder = bundles / stem
        folder.mkdir(parents=True, exist_ok=True)
        # A fresh Docker volume is 0755: the folder holds a private key, so only its owner.
        folder.chmod(0o700)
        files = {
            folder / "ca.crt": (ca, 0o644),
            folder / f"{stem}.crt": ((out / f"{stem}.crt").read_bytes(), 0o644),
            folder / f"{stem}.key": ((out / f"{stem}.key").read_bytes(), PRIVATE),
        }
        for path, (data, mode) in files.items():
            atomic_write(path, [data], mode=mode)
        if owner is not None:
            for path in (folder, *files):
                os.chown(path, *owner)
        made.append(folder)
    return made


def parse_owner(text: str) -> tuple[int, int]:
    """'UID:GID' or 'UID' (gid = uid) -> (uid, gid); numeric only, as inside a container."""
    uid, _, gid = text.partition(":")
    try:
        return int(uid), int(gid or uid)
    except ValueError:
        raise ValueError(f"--owner {text!r}: expected UID[:GID], numbers") from None
