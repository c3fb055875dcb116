"""The fleet store on PostgreSQL (psycopg 3): several collectors on several machines.

    from toma_edge.host.fleet.store import open_store
    store = open_store("postgresql://fleet@db.example:5432/fleet")   # PGPASSWORD / ~/.pgpass
    print(store.path_or_url, store.count())

Same methods and semantics as the SQLite :class:`~toma_edge.host.fleet.store.FleetStore`
(unique ``(fleet, device_id, seq)``, ``INSERT ... ON CONFLICT DO NOTHING``, one
transaction per batch, dead letters, StoreUnavailable for what may pass). A batch is
written with COPY into a temporary table, then ``INSERT ... SELECT ... ON CONFLICT DO
NOTHING`` (measured against ``executemany`` in pipeline mode and a multi-row VALUES
insert with ``python bench/bench_telemetry.py --only pg-insert``: see
bench/results/telemetry.md). The connection runs in autocommit for reads; a batch is an
explicit transaction. A lost connection raises StoreUnavailable and is reopened on the
next call. Time-based retention: :meth:`prune` (by ``received_at``, indexed).
"""

from __future__ import annotations

import contextlib
import urllib.parse
from collections.abc import Iterator, Sequence
from typing import Any

import psycopg

from ...errors import TelemetryError
from .sql import (
    EVENT_COLUMNS,
    INSERT_EVENT,
    INSERT_TELEMETRY,
    STATUS_COLUMNS,
    TELEMETRY_COLUMNS,
    UPSERT_STATUS,
    SqlStore,
    StoreUnavailable,
    one_line,
)

__all__ = ["PgFleetStore", "redact_url"]

_SQL = {k: v.replace("?", "%s") for k, v in
        (("telemetry", INSERT_TELEMETRY), ("events", INSERT_EVENT), ("status", UPSERT_STATUS))}
METHODS = ("values", "executemany", "copy")
_VALUES_CHUNK = 1000  # rows per multi-row INSERT (24 columns: well under 65535 parameters)
_COLUMNS = {"telemetry": TELEMETRY_COLUMNS, "events": EVENT_COLUMNS, "status": STATUS_COLUMNS}


def redact_url(url: str) -> str:
    """``postgresql://u:secret@h/db`` -> ``postgresql://u@h/db`` (for messages and logs)."""
    try:
        p = urllib.parse.urlsplit(url)
    except ValueError:
        return "postgresql://?"
    if p.password is None:
        return url
    host = p.netloc.rsplit("@", 1)[-1]
    user = p.netloc.rsplit("@", 1)[0].split(":", 1)[0]
    return urllib.parse.urlunsplit(p._replace(netloc=f"{user}@{host}"))


class PgFleetStore(SqlStore):
    """The PostgreSQL store at ``url`` (``postgresql://user@host:port/db``); ``method``:
    how a batch is inserted, ``"copy"`` (COPY into a temporary table, then INSERT ...
    SELECT ... ON CONFLICT DO NOTHING), ``"executemany"`` (pipeline mode) or ``"values"``
    (multi-row INSERT)."""

    # refused for the data itself (22xxx data exceptions: out of range, NUL in text,
    # invalid encoding; 23xxx constraints), also when psycopg refuses it before sending
    _DATA_ERRORS = (psycopg.DataError, psycopg.IntegrityError, OverflowError,
                    UnicodeEncodeError)

    def __init__(self, url: str, *, method: str = "copy",
                 connect_timeout_s: float = 10.0) -> None:
        if method not in METHODS:
            raise TelemetryError(
                f"insert method {method!r} is unknown; use one of {', '.join(METHODS)}")
        self._url = url
        self.path_or_url = redact_url(url)
        self.method = method
        self._timeout = connect_timeout_s
        self._conn: psycopg.Connection[Any] | None = None
        self._temp_ready = False
        try:
            from .schema import migrate_postgres

            migrate_postgres(url)
            self._connect()
        except TelemetryError:
            raise
        except psycopg.OperationalError as e:
            raise self._unavailable(e) from e
        except Exception as e:
            raise TelemetryError(
                f"fleet database {self.path_or_url} cannot be opened: {one_line(e)}") from e

    def _connect(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            try:
                self._conn = psycopg.connect(self._url, autocommit=True,
                                             connect_timeout=max(1, int(self._timeout)))
            except psycopg.Error as e:
                raise self._unavailable(e) from e
            self._temp_ready = False
        if self.method == "copy" and not self._temp_ready and self._has_schema():
            # outside any batch (autocommit): a rolled-back batch cannot take them along
            for t in ("telemetry", "events"):
                self._conn.execute(f"CREATE TEMP TABLE IF NOT EXISTS _in_{t} "
                                   f"(LIKE {t} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS")
            self._temp_ready = True
        return self._conn

    def _has_schema(self) -> bool:
        assert self._conn is not None
        row = self._conn.execute("SELECT to_regclass('telemetry') IS NOT NULL").fetchone()
        return bool(row and row[0])

    def close(self) -> None:
        """Close the connection."""
        if self._conn is not None:
            self._conn.close()

    def _unavailable(self, e: BaseException) -> StoreUnavailable:
        if isinstance(e, StoreUnavailable):
            return e
        if self._conn is not None and (self._conn.closed or self._conn.broken):
            self._conn = None  # reopened on the next call
        msg = one_line(e)
        if "password" in msg and "PGPASSWORD" not in msg:
            msg += " (give the password in PGPASSWORD or ~/.pgpass, as libpq reads them)"
        return StoreUnavailable(f"fleet database {self.path_or_url}: {msg}")

    @contextlib.contextmanager
    def _tx(self) -> Iterator[None]:
        with self._connect().transaction():
            yield

    @contextlib.contextmanager
    def _savepoint(self) -> Iterator[None]:
        assert self._conn is not None
        with self._conn.transaction():
            yield

    def _bulk(self, kind: str, rows: list[tuple[Any, ...]]) -> int:
        assert self._conn is not None
        if self.method == "copy" and kind != "status" and len(rows) > 1 and self._temp_ready:
            return self._copy(kind, rows)
        if self.method == "values" and len(rows) > 1:
            return self._values(kind, rows)
        with self._conn.cursor() as cur:
            cur.executemany(_SQL[kind], rows)
            return max(0, cur.rowcount)

    def _one(self, kind: str, row: tuple[Any, ...]) -> int:
        assert self._conn is not None
        with self._conn.cursor() as cur:
            cur.execute(_SQL[kind], row)
            return max(0, cur.rowcount)

    def _values(self, kind: str, rows: list[tuple[Any, ...]]) -> int:
        assert self._conn is not None
        head, tail = _SQL[kind].split(" VALUES ", 1)
        one, rest = tail.split(")", 1)
        n = 0
        with self._conn.cursor() as cur:
            for i in range(0, len(rows), _VALUES_CHUNK):
                chunk = rows[i:i + _VALUES_CHUNK]
                sql = f"{head} VALUES {', '.join([one + ')'] * len(chunk))}{rest}"
                cur.execute(sql.encode(), [v for r in chunk for v in r])  # type: ignore[arg-type]
                n += max(0, cur.rowcount)
        return n

    def _copy(self, kind: str, rows: list[tuple[Any, ...]]) -> int:
        assert self._conn is not None
        cols = ", ".join(_COLUMNS[kind])
        with self._conn.cursor() as cur:
            with cur.copy(f"COPY _in_{kind} ({cols}) FROM STDIN") as cp:
                for r in rows:
                    cp.write_row(r)
            cur.execute(f"INSERT INTO {kind} ({cols}) SELECT {cols} FROM _in_{kind} "
                        "ON CONFLICT DO NOTHING")
            n = max(0, cur.rowcount)
            cur.execute(f"TRUNCATE _in_{kind}")  # a later batch of this transaction
            return n

    def _exec(self, sql: str, params: Sequence[Any] = ()) -> int:
        assert self._conn is not None
        with self._conn.cursor() as cur:
            cur.execute(sql.replace("?", "%s"), params)  # type: ignore[arg-type]
            return max(0, cur.rowcount)

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        try:
            with self._connect().cursor() as cur:
                cur.execute(sql.replace("?", "%s"), params)  # type: ignore[arg-type]
                return cur.fetchall()
        except psycopg.OperationalError as e:
            raise self._unavailable(e) from e
        except psycopg.InterfaceError as e:
            raise self._unavailable(e) from e

    def _device_keys(self) -> list[tuple[str, str]]:
        # a loose index scan over telemetry's primary key: one probe per device, not a
        # scan of every window (SELECT DISTINCT would read the whole table)
        return [(str(f), str(d)) for f, d in self._rows(
            "WITH RECURSIVE t AS ("
            " (SELECT fleet, device_id FROM telemetry ORDER BY fleet, device_id LIMIT 1)"
            " UNION ALL SELECT n.fleet, n.device_id FROM t, LATERAL ("
            "  SELECT fleet, device_id FROM telemetry WHERE (fleet, device_id) > "
            "  (t.fleet, t.device_id) ORDER BY fleet, device_id LIMIT 1) n)"
            " SELECT fleet, device_id FROM t UNION SELECT fleet, device_id FROM status"
            " UNION SELECT fleet, device_id FROM rejected")]
