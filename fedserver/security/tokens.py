"""Per-client bearer tokens, stored only as SHA-256 hashes in a JSON file.

Why SHA-256 and not scrypt/argon2: the tokens are 256-bit random strings we generate
(`secrets.token_urlsafe(32)`), not human passwords. A slow KDF protects low-entropy secrets from
offline guessing; against 2^256 candidates a fast hash is already out of reach, and a KDF would
cost tens of milliseconds of CPU on every RPC (every long poll, every upload). A stolen token
file therefore reveals no usable token. The file is re-read when it changes, so `tokens add` and
`tokens revoke` take effect on a running coordinator without a restart.

File (0600):  {"version": 1, "tokens": [{"name", "role", "sha256", "created"}]}
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from fedcore.files import atomic_write
from fedserver.security.certs import ROLE_CLIENT, ROLE_OPERATOR

ROLES = (ROLE_CLIENT, ROLE_OPERATOR)
TOKEN_PREFIX = "fgt_"


class TokenFileError(ValueError):
    pass


@dataclass(frozen=True)
class TokenEntry:
    name: str
    role: str
    sha256: str
    created: float


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _load(path: Path) -> list[TokenEntry]:
    try:
        data = json.loads(Path(path).read_text())
        return [TokenEntry(**e) for e in data["tokens"]]
    except FileNotFoundError:
        raise TokenFileError(
            f"token file {path} does not exist; create it with `fedserver tokens add NAME`"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TokenFileError(f"token file {path} is unreadable or malformed: {e}") from None


def _save(path: Path, entries: list[TokenEntry]) -> None:
    data = {"version": 1, "tokens": [e.__dict__ for e in entries]}
    atomic_write(path, [json.dumps(data, indent=2).encode()], mode=0o600)


def add_token(path: Path, name: str, role: str = ROLE_CLIENT) -> str:
    """Create (or rotate) NAME's token; returns the token, which is not stored anywhere."""
    if role not in ROLES:
        raise TokenFileError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    if not name or not name.isprintable() or len(name) > 128:
        raise TokenFileError("a token name must be 1-128 printable characters (the client id)")
    entries = _load(path) if Path(path).exists() else []
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    entries = [e for e in entries if e.name != name]
    entries.append(TokenEntry(name, role, token_hash(token), time.time()))
    _save(path, entries)
    return token


def revoke_token(path: Path, name: str) -> bool:
    entries = _load(path)
    kept = [e for e in entries if e.name != name]
    _save(path, kept)
    return len(kept) != len(entries)


def list_tokens(path: Path) -> list[TokenEntry]:
    return _load(path)


class TokenStore:
    """Looks tokens up by hash; reloads the file when its mtime or size changes."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._stamp: tuple[int, int] | None = None
        self._by_hash: dict[str, TokenEntry] = {}
        self._refresh()

    def _refresh(self) -> None:
        st = os.stat(self.path)
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            self._by_hash = {e.sha256: e for e in _load(self.path)}
            self._stamp = stamp

    def lookup(self, token: str) -> TokenEntry | None:
        # On a read error keep the last good set rather than lock everyone out mid-edit.
        with contextlib.suppress(OSError, TokenFileError):
            self._refresh()
        # A dict lookup by hash is not constant-time, but timing can at most reveal a prefix of
        # the hash of a 256-bit secret, which does not help forge the token.
        return self._by_hash.get(token_hash(token))
