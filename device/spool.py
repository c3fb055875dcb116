"""On-disk outbox of the telemetry agent: nothing leaves it before the broker acknowledged it.

    from toma_edge.device.spool import Spool
    spool = Spool("/var/lib/toma-edge/spool.db", max_messages=50_000)
    seq = spool.put("telemetry", "toma-edge/v1/f/d/telemetry", lambda seq: b'{"seq": %d}' % seq)
    for row in spool.peek(after_id=0, limit=100): print(row.id, row.topic)
    spool.delete([row.id for row in spool.peek(after_id=0, limit=100)])   # after PUBACK

One SQLite file in WAL mode with ``synchronous=FULL``: a message and the ``seq`` counter
it took are committed in one transaction, so a crash (SIGKILL, power loss) neither loses
an accepted message nor reuses a seq. The spool is bounded: when full, the oldest
telemetry is dropped first (then the oldest events), and each drop is counted
(``dropped("telemetry")``, reported in later telemetry as ``spool_dropped``).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, TelemetryError

__all__ = ["Spool", "SpoolRow", "PayloadBuilder"]

PayloadBuilder = Callable[[int], bytes]
"""Builds a message's payload from the ``seq`` the spool gave it (0 for unsequenced kinds)."""

_SEQUENCED = ("telemetry", "events")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_kind ON outbox(kind, id);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class SpoolRow:
    """One spooled message; ``id`` orders messages in the order they were put."""

    id: int
    kind: str
    topic: str
    payload: bytes
    qos: int
    retain: bool


class Spool:
    """A bounded, crash-safe outbox with persistent per-kind ``seq`` counters.

    ``max_messages`` bounds the number of spooled messages (about 1 KiB each for
    telemetry). Thread-safe: one connection guarded by a lock.
    """

    def __init__(self, path: str | Path, *, max_messages: int = 100_000) -> None:
        if max_messages < 1:
            raise ConfigError(f"spool max_messages must be >= 1, got {max_messages}")
        self.path = Path(path)
        self.max_messages = max_messages
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                str(self.path), timeout=30.0, isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except (sqlite3.Error, OSError) as e:
            raise TelemetryError(
                f"spool {str(self.path)!r} cannot be opened: {e}; check the path and its "
                "permissions (--spool PATH)"
            ) from e

    # -- counters ---------------------------------------------------------------------
    def _counter(self, name: str) -> int:
        row = self._db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        return int(row[0]) if row else 0

    def _set_counter(self, name: str, value: int) -> None:
        self._db.execute(
            "INSERT INTO counters(name, value) VALUES(?, ?) "
            "ON CONFLICT(name) DO UPDATE SET value = excluded.value",
            (name, value),
        )

    def last_seq(self, kind: str) -> int:
        """The last ``seq`` given to ``kind`` (0 before the first); survives restarts."""
        with self._lock:
            return self._counter(f"seq:{kind}")

    def dropped(self, kind: str = "telemetry") -> int:
        """How many ``kind`` messages a full spool dropped, ever (persistent)."""
        with self._lock:
            return self._counter(f"dropped:{kind}")

    # -- put / peek / delete ------------------------------------------------------------
    def put(
        self,
        kind: str,
        topic: str,
        build: PayloadBuilder,
        *,
        qos: int = 1,
        retain: bool = False,
    ) -> int:
        """Spool one message; returns the ``seq`` it got (telemetry and events) or 0.

        ``build(seq)`` makes the payload inside the transaction that takes the seq, so the
        message and its seq are committed together or not at all.
        """
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    seq = 0
                    if kind in _SEQUENCED:
                        seq = self._counter(f"seq:{kind}") + 1
                        self._set_counter(f"seq:{kind}", seq)
                    payload = build(seq)
                    self._make_room()
                    self._db.execute(
                        "INSERT INTO outbox(kind, topic, payload, qos, retain, created) "
                        "VALUES(?, ?, ?, ?, ?, ?)",
                        (kind, topic, payload, qos, int(retain), time.time()),
                    )
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.Error as e:
                raise TelemetryError(f"spool {str(self.path)!r} cannot store a message: {e}") from e
            return seq

    def _make_room(self) -> None:
        (n,) = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()
        excess = n - self.max_messages + 1
        if excess <= 0:
            return
        for kind in ("telemetry", "events", "status"):
            ids = [
                r[0]
                for r in self._db.execute(
                    "SELECT id FROM outbox WHERE kind = ? ORDER BY id LIMIT ?", (kind, excess)
                )
            ]
            if ids:
                self._db.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in ids])
                name = f"dropped:{kind}"
                self._set_counter(name, self._counter(name) + len(ids))
                excess -= len(ids)
            if excess <= 0:
                return

    def peek(self, *, after_id: int = 0, limit: int = 100) -> list[SpoolRow]:
        """Up to ``limit`` spooled messages with ``id > after_id``, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, kind, topic, payload, qos, retain FROM outbox WHERE id > ? "
                "ORDER BY id LIMIT ?",
                (after_id, limit),
            ).fetchall()
        return [SpoolRow(r[0], r[1], r[2], bytes(r[3]), r[4], bool(r[5])) for r in rows]

    def delete(self, ids: Iterable[int]) -> None:
        """Remove messages the broker acknowledged (one transaction)."""
        batch = [(i,) for i in ids]
        if not batch:
            return
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.executemany("DELETE FROM outbox WHERE id = ?", batch)
                self._db.execute("COMMIT")
            except sqlite3.Error as e:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise TelemetryError(f"spool {str(self.path)!r} cannot delete: {e}") from e

    def pending(self) -> int:
        """How many messages wait for the broker's acknowledgement."""
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    def close(self) -> None:
        """Close the database (idempotent)."""
        with self._lock:
            self._db.close()
