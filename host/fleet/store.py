"""The fleet's store: status, telemetry and events, each message stored once, on SQLite
(one machine, the default) or PostgreSQL (several collectors on several machines).

    from toma_edge.host.fleet.store import open_store
    store = open_store("fleet.db")                   # or "postgresql://fleet@db:5432/fleet"
    for dev in store.devices(): print(dev.fleet, dev.device_id, dev.online, dev.last_seen)
    rows = store.telemetry("plant-7", "pi-0042")      # oldest first
    print(store.seqs("plant-7", "pi-0042")[:5])       # [1, 2, 3, 4, 5]
    print(store.rejects(limit=5))                     # dead letters, newest first

Telemetry and events have a unique key ``(fleet, device_id, seq)`` and are inserted with
``INSERT ... ON CONFLICT DO NOTHING``: a message delivered twice is stored once, and the
collector acknowledges a message only after :meth:`write_batch` committed it. ``status``
holds the last status per device (an upsert). ``rejects`` holds dead letters (the raw
payload and the reason) and ``rejected`` counts them per device.

A record the database refuses for its data (an integer beyond 64 bits, a NUL in a
PostgreSQL string...) is dead-lettered with the database's reason, never retried: the
batch is redone row by row inside savepoints. A failure that may pass (database locked,
disk full, connection lost) raises :class:`StoreUnavailable`, nothing of the batch stored.

SQLite: one file in WAL mode with ``synchronous=FULL`` (the broker forgets a message once
acked, so the commit must be on disk), shared by collectors on one host and readers.
Opening a store migrates its schema to the newest revision (alembic, see
:mod:`toma_edge.host.fleet.schema`). Retention: :meth:`FleetStore.prune`.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import TelemetryError
from .sql import (
    EVENT_COLUMNS,
    INSERT_EVENT,
    INSERT_TELEMETRY,
    ROLLOUT_COLUMNS,
    ROLLOUT_DEVICE_COLUMNS,
    STATUS_COLUMNS,
    TELEMETRY_COLUMNS,
    UPSERT_STATUS,
    BatchResult,
    DeviceRow,
    Record,
    Reject,
    SqlStore,
    StoreUnavailable,
    one_line,
    split_db,
)

if TYPE_CHECKING:
    from .store_pg import PgFleetStore

__all__ = ["FleetStore", "Record", "ROLLOUT_COLUMNS", "ROLLOUT_DEVICE_COLUMNS", "DeviceRow",
           "BatchResult", "Reject", "StoreUnavailable", "open_store", "EVENT_COLUMNS",
           "STATUS_COLUMNS", "TELEMETRY_COLUMNS"]

def open_store(db: str | Path, *, create: bool = True) -> FleetStore | PgFleetStore:
    """A path (or ``sqlite:///path``) -> the SQLite store; ``postgresql://user@host:port/db``
    -> the PostgreSQL store (password from PGPASSWORD or ~/.pgpass, as libpq reads them).
    Both have the same public methods and are migrated to the newest schema on opening.
    ``create=False``: a missing SQLite file is a TelemetryError (one line), as is an
    unreachable server (:class:`StoreUnavailable`)."""
    kind, target = split_db(db)
    if kind == "postgresql":
        try:
            from .store_pg import PgFleetStore
        except ImportError as e:
            raise TelemetryError(
                f"the PostgreSQL fleet store needs psycopg ({e}); install the host extra: "
                "pip install 'toma-edge[host]'") from e
        return PgFleetStore(target)
    return FleetStore(target, create=create)


_SQLITE_SQL = {"telemetry": INSERT_TELEMETRY, "events": INSERT_EVENT, "status": UPSERT_STATUS}


class FleetStore(SqlStore):
    """The SQLite store; ``busy_timeout_s`` is how long a writer waits for another one."""

    # refused for the data itself: binding an integer beyond 64 bits (OverflowError), a
    # lone surrogate (UnicodeEncodeError), a constraint, a type sqlite3 cannot bind
    _DATA_ERRORS = (OverflowError, UnicodeEncodeError, sqlite3.IntegrityError,
                    sqlite3.DataError, sqlite3.InterfaceError, sqlite3.ProgrammingError)

    def __init__(self, path: str | Path, *, busy_timeout_s: float = 30.0,
                 create: bool = True) -> None:
        self.path = Path(path)
        self.path_or_url = str(self.path)
        if not create and not self.path.is_file():
            raise TelemetryError(
                f"fleet database {str(self.path)!r} does not exist; run `toma-edge fleet "
                "collect --mqtt URL --db PATH` first or pass --db"
            )
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                str(self.path), timeout=busy_timeout_s, isolation_level=None,
                check_same_thread=False,
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: the broker is acked right after COMMIT and then forgets the message, so
            # the commit must be on disk even if the OS crashes (one fsync per batch)
            self._db.execute("PRAGMA synchronous=FULL")
            from .schema import migrate_sqlite

            migrate_sqlite(self.path, busy_timeout_s=busy_timeout_s)
        except TelemetryError:
            raise
        except Exception as e:  # sqlite3.Error, OSError, alembic/SQLAlchemy's errors
            raise TelemetryError(
                f"fleet database {str(self.path)!r} cannot be opened: {one_line(e)}") from e

    def close(self) -> None:
        """Close the connection."""
        self._db.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[None]:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    @contextlib.contextmanager
    def _savepoint(self) -> Iterator[None]:
        db = self._db
        db.execute("SAVEPOINT rec")
        try:
            yield
        except BaseException:
            db.execute("ROLLBACK TO rec")
            db.execute("RELEASE rec")
            raise
        db.execute("RELEASE rec")

    def _bulk(self, kind: str, rows: list[tuple[Any, ...]]) -> int:
        before = self._db.total_changes
        self._db.executemany(_SQLITE_SQL[kind], rows)
        return self._db.total_changes - before

    def _exec(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self._db.execute(sql, params).rowcount

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        try:
            return self._db.execute(sql, params).fetchall()
        except sqlite3.OperationalError as e:
            raise self._unavailable(e) from e

    def _unavailable(self, e: BaseException) -> StoreUnavailable:
        if isinstance(e, StoreUnavailable):
            return e
        return StoreUnavailable(f"fleet database {self.path_or_url!r}: {one_line(e)}")
