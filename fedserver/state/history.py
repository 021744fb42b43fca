"""The coordinator's SQLite history (STATE/state.db): run metadata, committed rounds, per-client
receipts, traffic and known clients. No tensors: those are the checkpoints (store.py).

One connection is shared by the event loop and the checkpoint thread, serialized by `lock`.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# PRAGMA user_version of a state.db this code writes. 1: receipts gained their own base_round
# column (before, the coordinator wrote it into the client's metrics JSON, where a client could
# put its own value and so have one update counted twice on the same version).
# 2: rounds gained fleet_seconds (NULL but under `fedserver simulate --fleet`).
SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY,
    model_version TEXT NOT NULL,
    participants INTEGER NOT NULL,
    num_examples INTEGER NOT NULL,
    metrics TEXT NOT NULL,
    opened_at REAL NOT NULL,
    closed_at REAL NOT NULL,
    duration REAL NOT NULL,
    attempts INTEGER NOT NULL,
    fleet_seconds REAL
);
CREATE TABLE IF NOT EXISTS receipts (
    round INTEGER NOT NULL,
    client_id TEXT NOT NULL,
    num_examples INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    metrics TEXT NOT NULL,
    base_round INTEGER NOT NULL,
    PRIMARY KEY (round, client_id)
);
CREATE TABLE IF NOT EXISTS traffic (
    round INTEGER PRIMARY KEY,
    bytes_in INTEGER NOT NULL,
    bytes_out INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS clients (
    client_id TEXT PRIMARY KEY,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL,
    properties TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class RoundRecord:
    round: int
    model_version: str
    participants: int
    num_examples: int
    metrics: dict[str, float]
    opened_at: float
    closed_at: float
    duration: float  # host seconds, open to committed
    attempts: int
    # Simulated fleets only (simulate --fleet): fleet seconds from open to close.
    fleet_seconds: float | None = None

    def to_json(self) -> dict[str, Any]:
        out = {
            "round": self.round,
            "participants": self.participants,
            "num_examples": self.num_examples,
            "metrics": self.metrics,
            "duration_seconds": round(self.duration, 4),
            "model_version": self.model_version,
            "attempts": self.attempts,
        }
        if self.fleet_seconds is not None:  # fleet time: the round's, and the clock at its close
            out["fleet_seconds"] = round(self.fleet_seconds, 4)
            out["fleet_time"] = round(self.closed_at, 4)
        return out


@dataclass(frozen=True)
class ClientReceipt:
    client_id: str
    num_examples: int
    sha256: str
    metrics: dict[str, float]  # what the client reported, nothing else
    base_round: int  # the round whose model the update was computed on (server-owned)


class RoundHistory:
    def __init__(self, db: sqlite3.Connection, *, create: bool = True) -> None:
        self.db = db
        self.lock = threading.RLock()
        self._joined: dict[str, tuple[float, str]] = {}  # Joins not yet written (record_client)
        if create:
            db.executescript(_SCHEMA)
            _migrate(db)

    # ------------------------------------------------------------------ metadata
    def get_meta(self, key: str, default: str | None = None) -> str | None:
        with self.lock:
            row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    def set_meta(self, **values: object) -> None:
        with self.lock, self.db:
            self.db.execute("BEGIN")
            for k, v in values.items():
                self.db.execute(
                    "INSERT INTO meta(key, value) VALUES (?, ?) "
                    "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    (k, str(v)),
                )

    # ------------------------------------------------------------------ rounds
    def commit_round(self, record: RoundRecord, receipts: list[ClientReceipt]) -> None:
        with self.lock, self.db:
            self.db.execute("BEGIN")
            self.db.execute(
                "INSERT OR REPLACE INTO rounds(round, model_version, participants, num_examples, "
                "metrics, opened_at, closed_at, duration, attempts, fleet_seconds) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.round,
                    record.model_version,
                    record.participants,
                    record.num_examples,
                    json.dumps(record.metrics),
                    record.opened_at,
                    record.closed_at,
                    record.duration,
                    record.attempts,
                    record.fleet_seconds,
                ),
            )
            self.db.executemany(
                "INSERT OR REPLACE INTO receipts"
                "(round, client_id, num_examples, sha256, metrics, base_round) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (
                        record.round,
                        r.client_id,
                        r.num_examples,
                        r.sha256,
                        json.dumps(r.metrics),
                        r.base_round,
                    )
                    for r in receipts
                ],
            )
            self.db.execute(
                "INSERT INTO meta(key, value) VALUES ('last_round', ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (str(record.round),),
            )

    def record_traffic(self, round_number: int, bytes_in: int, bytes_out: int) -> None:
        """Update bytes received / model bytes sent while the round was open (for reports)."""
        with self.lock:
            self.db.execute(
                "INSERT OR REPLACE INTO traffic VALUES (?, ?, ?)",
                (round_number, bytes_in, bytes_out),
            )

    def traffic(self) -> dict[int, dict[str, int]]:
        with self.lock:
            try:
                rows = self.db.execute("SELECT round, bytes_in, bytes_out FROM traffic").fetchall()
            except sqlite3.OperationalError:  # a read-only look at a state dir from before
                return {}
        return {r[0]: {"bytes_in": r[1], "bytes_out": r[2]} for r in rows}

    def merge_round_metrics(self, round_number: int, metrics: dict[str, float]) -> None:
        """Add or overwrite metrics of a committed round (federated evaluation arrives later)."""
        with self.lock, self.db:
            self.db.execute("BEGIN")
            row = self.db.execute(
                "SELECT metrics FROM rounds WHERE round = ?", (round_number,)
            ).fetchone()
            if row is None:
                raise KeyError(f"round {round_number} is not committed")
            merged = {**json.loads(row[0]), **metrics}
            self.db.execute(
                "UPDATE rounds SET metrics = ? WHERE round = ?", (json.dumps(merged), round_number)
            )

    def last_round(self) -> int:
        return int(self.get_meta("last_round", "0") or 0)

    def rounds(self) -> list[RoundRecord]:
        with self.lock:
            rows = self.db.execute("SELECT * FROM rounds ORDER BY round").fetchall()
        return [_record(r) for r in rows]

    def recent_rounds(self, limit: int) -> tuple[list[RoundRecord], int]:
        """The last `limit` rounds (oldest first) and how many rounds there are in all."""
        with self.lock:
            total = self.db.execute("SELECT COUNT(*) FROM rounds").fetchone()[0]
            rows = self.db.execute(
                "SELECT * FROM (SELECT * FROM rounds ORDER BY round DESC LIMIT ?) ORDER BY round",
                (limit,),
            ).fetchall()
        return [_record(r) for r in rows], int(total)

    def receipt_digest(self, round_number: int, client_id: str) -> str | None:
        """The digest of the client's committed update based on `round_number`'s model.

        Synchronous rounds count an update in the round it was based on; asynchronous ones may
        count it in a later round. The receipt's own base_round column says which (never the
        client's metrics: those are the client's to fill)."""
        with self.lock:
            row = self.db.execute(
                "SELECT sha256 FROM receipts WHERE client_id = ? AND round >= ? AND "
                "base_round = ? ORDER BY round",
                (client_id, round_number, round_number),
            ).fetchone()
        return row[0] if row else None

    def model_version_after(self, round_number: int) -> str | None:
        """The version of the model committed by `round_number` (0: the initial model)."""
        if round_number == 0:
            return self.get_meta("initial_version")
        with self.lock:
            row = self.db.execute(
                "SELECT model_version FROM rounds WHERE round = ?", (round_number,)
            ).fetchone()
        return row[0] if row else None

    def record_client(self, client_id: str, properties: dict[str, str]) -> None:
        """Buffered until flush_clients(): one durable commit per Join (an fsync, 1.5 ms on
        ext4) held the event loop 15 s in a storm of 10,000 Joins; a batch costs one."""
        self._joined[client_id] = (time.time(), json.dumps(properties))

    def flush_clients(self) -> None:
        """Write the buffered Joins in one transaction."""
        if not self._joined:
            return
        rows = [(c, t, t, p) for c, (t, p) in self._joined.items()]
        self._joined = {}
        with self.lock, self.db:
            self.db.execute("BEGIN")
            self.db.executemany(
                "INSERT INTO clients VALUES (?, ?, ?, ?) ON CONFLICT(client_id) DO UPDATE SET "
                "last_seen = excluded.last_seen, properties = excluded.properties",
                rows,
            )

    def has_joined(self, client_id: str) -> bool:
        """This client called Join on this state dir at some point (one indexed lookup)."""
        if client_id in self._joined:
            return True
        with self.lock:
            row = self.db.execute(
                "SELECT 1 FROM clients WHERE client_id = ?", (client_id,)
            ).fetchone()
        return row is not None

    def recent_clients(self, limit: int) -> list[str]:
        """The `limit` clients that joined most recently (a restarted coordinator's guess at
        who was still running when its predecessor stopped)."""
        with self.lock:
            rows = self.db.execute(
                "SELECT client_id FROM clients ORDER BY last_seen DESC LIMIT ?", (limit,)
            ).fetchall()
        return [r[0] for r in rows]

    def known_clients(self) -> list[str]:
        with self.lock:
            rows = self.db.execute("SELECT client_id FROM clients ORDER BY client_id").fetchall()
        return [r[0] for r in rows]


def read_status(state_dir: Path) -> dict[str, Any]:
    """What `fedserver status --state-dir` prints; read-only, safe next to a running coordinator."""
    path = Path(state_dir) / "state.db"
    if not path.exists():
        raise FileNotFoundError(f"{state_dir} holds no fedgrpc state (no state.db)")
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        store = RoundHistory(db, create=False)
        rounds = store.rounds()
        traffic = store.traffic()
        total = int(store.get_meta("total_rounds", "0") or 0)
        return {
            "status": store.get_meta("status", "unknown"),
            "failure": store.get_meta("failure", ""),  # why a `failed` run gave up
            "federation_id": store.get_meta("federation_id", ""),
            "task": store.get_meta("task", ""),
            "strategy": store.get_meta("strategy", ""),
            "total_rounds": total,
            "rounds_completed": store.last_round(),
            "clients": len(store.known_clients()),
            "rounds": [r.to_json() | traffic.get(r.round, {}) for r in rounds],
        }
    finally:
        db.close()


def _migrate(db: sqlite3.Connection) -> None:
    """Bring a state.db written by an older fedgrpc to SCHEMA_VERSION, in one transaction.

    Version 0 kept an asynchronous update's base round inside the receipt's metrics JSON,
    next to the client's own names. It moves to its own column; a value only counts if the
    coordinator could have written it (a whole round before the receipt's), since a client
    could put any number there; every other receipt was based on its own round."""
    if db.execute("PRAGMA user_version").fetchone()[0] >= SCHEMA_VERSION:
        return
    with db:
        db.execute("BEGIN IMMEDIATE")
        if "fleet_seconds" not in {row[1] for row in db.execute("PRAGMA table_info(rounds)")}:
            db.execute("ALTER TABLE rounds ADD COLUMN fleet_seconds REAL")
        columns = {row[1] for row in db.execute("PRAGMA table_info(receipts)")}
        if "base_round" not in columns:
            db.execute("ALTER TABLE receipts ADD COLUMN base_round INTEGER NOT NULL DEFAULT 0")
            db.execute(
                "UPDATE receipts SET base_round = CASE "
                "WHEN json_type(metrics, '$.base_round') IN ('integer', 'real') "
                "AND json_extract(metrics, '$.base_round') = "
                "CAST(json_extract(metrics, '$.base_round') AS INTEGER) "
                "AND json_extract(metrics, '$.base_round') BETWEEN 1 AND round - 1 "
                "THEN CAST(json_extract(metrics, '$.base_round') AS INTEGER) ELSE round END"
            )
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def _record(r: tuple[Any, ...]) -> RoundRecord:
    # A read-only look at a state dir from before version 2 has no fleet_seconds column.
    fleet = r[9] if len(r) > 9 else None
    return RoundRecord(r[0], r[1], r[2], r[3], json.loads(r[4]), r[5], r[6], r[7], r[8], fleet)
