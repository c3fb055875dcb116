"""The SQL both fleet stores share: tables' columns, statements, the record and result
types, and :class:`SqlStore`, the writing and reading logic written once for SQLite
(:class:`~toma_edge.host.fleet.store.FleetStore`) and PostgreSQL
(:class:`~toma_edge.host.fleet.store_pg.PgFleetStore`).

    from toma_edge.host.fleet.store import open_store   # users open a store there
    from toma_edge.host.fleet.sql import Record, Reject, StoreUnavailable

See :mod:`toma_edge.host.fleet.store` for the semantics (exactly once, dead letters,
retries); this module has no database driver of its own.
"""

from __future__ import annotations

import contextlib
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import TelemetryError
from ...telemetry import EventMessage, Message, StatusMessage, TelemetryMessage, topic

__all__ = ["SqlStore", "Record", "Reject", "BatchResult", "StoreUnavailable", "DeviceRow",
           "ROLLOUT_COLUMNS", "ROLLOUT_DEVICE_COLUMNS", "TELEMETRY_COLUMNS", "EVENT_COLUMNS",
           "STATUS_COLUMNS", "TABLES", "INSERT_TELEMETRY", "INSERT_EVENT", "UPSERT_STATUS",
           "UPSERT_REJECTED", "INSERT_REJECT", "record_params", "one_line", "split_db"]

_TELEMETRY_FIELDS = [f for f in TelemetryMessage.model_fields if f != "v"]
_STATUS_FIELDS = [f for f in StatusMessage.model_fields if f != "v"]
TELEMETRY_COLUMNS = ["fleet", "device_id", *_TELEMETRY_FIELDS, "received_at"]
EVENT_COLUMNS = ["fleet", "device_id", "seq", "ts", "kind", "fields", "received_at"]
STATUS_COLUMNS = ["fleet", "device_id", *_STATUS_FIELDS, "received_at"]
TABLES = ("telemetry", "events", "status", "rejected", "rejects", "rollouts", "rollout_devices")
ROLLOUT_COLUMNS = ("id", "fleet", "state", "reason", "release_name", "release_version",
                   "bundle_sha256", "bundle_bytes", "bundle_path", "params", "job", "wave",
                   "created_at", "updated_at", "deadline", "finished_at", "owner", "heartbeat")
ROLLOUT_DEVICE_COLUMNS = ("rollout_id", "device_id", "wave", "state", "reason", "detail",
                          "sent_at", "updated_at", "rollback_sent_at", "cleared")


def _values(n: int) -> str:
    return f"VALUES ({', '.join('?' * n)})"


# the same SQL on both dialects (SQLite >= 3.24 has ON CONFLICT); "?" becomes "%s" for psycopg
INSERT_TELEMETRY = (f"INSERT INTO telemetry ({', '.join(TELEMETRY_COLUMNS)}) "
                    f"{_values(len(TELEMETRY_COLUMNS))} ON CONFLICT DO NOTHING")
INSERT_EVENT = (f"INSERT INTO events ({', '.join(EVENT_COLUMNS)}) "
                f"{_values(len(EVENT_COLUMNS))} ON CONFLICT DO NOTHING")
UPSERT_STATUS = (
    f"INSERT INTO status ({', '.join(STATUS_COLUMNS)}) {_values(len(STATUS_COLUMNS))} "
    "ON CONFLICT (fleet, device_id) DO UPDATE SET "
    + ", ".join(f"{f} = excluded.{f}" for f in [*_STATUS_FIELDS, "received_at"])
)
UPSERT_REJECTED = (
    "INSERT INTO rejected (fleet, device_id, count, last_error, last_at) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT (fleet, device_id) DO UPDATE SET count = rejected.count + excluded.count, "
    "last_error = excluded.last_error, last_at = excluded.last_at"
)
INSERT_REJECT = ("INSERT INTO rejects (fleet, device_id, topic, payload, reason, received_at) "
                 "VALUES (?, ?, ?, ?, ?, ?)")


@dataclass(frozen=True)
class Record:
    """One decoded message of a device, as received (``received_at``: unix seconds).

    ``topic`` and ``payload`` (optional) are what arrived, kept for a dead letter should
    the database refuse the record; without them the letter holds the decoded message."""

    fleet: str
    device_id: str
    message: Message
    received_at: float
    topic: str = ""
    payload: bytes = b""

    @property
    def kind(self) -> str:
        m = self.message
        return ("telemetry" if isinstance(m, TelemetryMessage)
                else "events" if isinstance(m, EventMessage) else "status")


@dataclass(frozen=True)
class Reject:
    """One dead letter: a message acknowledged but not stored (``received_at``: unix s)."""

    fleet: str          # "?" when the topic itself was unusable
    device_id: str      # "?" likewise
    topic: str
    payload: bytes      # raw, as received (bounded by the collector's max payload)
    reason: str         # one line
    received_at: float


@dataclass(frozen=True)
class BatchResult:
    """What one committed batch did: telemetry+event rows newly stored, ignored as
    duplicates, and records the database refused (moved to ``rejects``)."""

    stored: int
    duplicates: int
    dead_lettered: int = 0


class StoreUnavailable(TelemetryError):
    """The database cannot take writes NOW (locked past the busy timeout, disk full,
    connection lost, server down): retry later with backoff; nothing of the batch stored."""


@dataclass(frozen=True)
class DeviceRow:
    """One device as ``fleet status`` shows it (times in unix seconds, sizes in bytes)."""

    fleet: str
    device_id: str
    online: bool | None
    model: str | None
    model_version: str | None
    target: str | None
    last_seen: float | None
    latency_p99_s: float | None
    rss_bytes: int | None
    peak_rss_bytes: int | None
    budget_bytes: int | None
    requests: int
    errors: int
    telemetry_count: int
    rejected: int

    @property
    def headroom_bytes(self) -> int | None:
        """Budget less the peak RSS of the last window (negative: over budget)."""
        if self.budget_bytes is None or self.peak_rss_bytes is None:
            return None
        return self.budget_bytes - self.peak_rss_bytes

    @property
    def error_rate(self) -> float | None:
        """Errors per request over the windows counted (None without requests)."""
        return self.errors / self.requests if self.requests else None


def split_db(db: str | Path) -> tuple[str, str]:
    """``("sqlite", path)`` or ``("postgresql", conninfo URL)`` for what ``--db`` names."""
    s = str(db)
    low = s.lower()
    if low.startswith(("postgresql://", "postgres://")):
        return "postgresql", s
    if low.startswith("postgresql+psycopg://"):
        return "postgresql", "postgresql://" + s[len("postgresql+psycopg://"):]
    if low.startswith("sqlite:///"):
        return "sqlite", s[len("sqlite:///"):]
    if "://" in s:
        raise TelemetryError(
            f"fleet database {s.split('://')[0]}:// is not supported; use a file path "
            "(SQLite) or postgresql://user@host:port/db")
    return "sqlite", s


def one_line(e: BaseException) -> str:
    """An exception as one line (drivers' messages span lines)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 500 else text[:497] + "..."


def _clean(text: str) -> str:
    """Text any database takes: valid UTF-8 (lone surrogates escaped), no NUL."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")


def _payload_of(r: Record) -> bytes:
    if r.payload:
        return r.payload
    return r.message.model_dump_json().encode("utf-8", "backslashreplace")


def _topic_of(r: Record) -> str:
    if r.topic:
        return r.topic
    try:
        return topic(r.fleet, r.device_id, r.kind)  # type: ignore[arg-type]
    except Exception:
        return f"toma-edge/v1/{r.fleet}/{r.device_id}/{r.kind}"


def _json(fields: dict[str, Any]) -> str:
    import json

    return json.dumps(fields, sort_keys=True)


def record_params(r: Record) -> tuple[Any, ...]:
    """The row of one record for its table's INSERT (column order of ``*_COLUMNS``)."""
    m = r.message
    if isinstance(m, TelemetryMessage):
        return (r.fleet, r.device_id, *(getattr(m, f) for f in _TELEMETRY_FIELDS),
                r.received_at)
    if isinstance(m, EventMessage):
        return (r.fleet, r.device_id, m.seq, m.ts, m.kind, _json(m.fields), r.received_at)
    return (r.fleet, r.device_id, *(getattr(m, f) for f in _STATUS_FIELDS), r.received_at)


class SqlStore(ABC):
    """What both stores share: the batch logic, dead letters and every query; a dialect
    provides ``_tx``, ``_savepoint``, ``_bulk``, ``_one``, ``_rows``, ``_dicts`` and the
    error classification."""

    path_or_url: str
    _DATA_ERRORS: tuple[type[BaseException], ...] = ()

    # -- dialect hooks ----------------------------------------------------------------------
    @abstractmethod
    def _tx(self) -> contextlib.AbstractContextManager[Any]:
        ...

    @abstractmethod
    def _savepoint(self) -> contextlib.AbstractContextManager[Any]:
        ...

    @abstractmethod
    def _bulk(self, kind: str, rows: list[tuple[Any, ...]]) -> int:
        """Insert rows of ``kind`` (telemetry, events, status); returns rows new."""
        ...

    def _one(self, kind: str, row: tuple[Any, ...]) -> int:
        return self._bulk(kind, [row])

    @abstractmethod
    def _exec(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one statement; returns the rows it changed."""
        ...

    @abstractmethod
    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        ...

    @abstractmethod
    def _unavailable(self, e: BaseException) -> StoreUnavailable:
        ...

    @abstractmethod
    def close(self) -> None:
        ...

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing --------------------------------------------------------------------------
    def write_batch(
        self,
        records: Sequence[Record],
        rejects: Iterable[Reject | tuple[str, str, int, str]] = (),
    ) -> BatchResult:
        """Store ``records`` and dead letters ``rejects`` in ONE transaction and commit.

        Telemetry/events are inserted once per ``(fleet, device_id, seq)``, statuses
        upserted (the last of a device in the batch wins), each :class:`Reject` goes to
        ``rejects`` and bumps ``rejected`` (a legacy ``(fleet, device_id, count, error)``
        tuple only bumps the counter). Records the database refuses for their data are
        dead-lettered with its reason (``dead_lettered``). StoreUnavailable: nothing stored,
        retry later."""
        letters: list[Reject] = []
        counters: list[tuple[str, str, int, str]] = []
        for rej in rejects:
            if isinstance(rej, Reject):
                letters.append(rej)
            else:
                counters.append(rej)
        items = [(r.kind, r, record_params(r)) for r in records]
        try:
            new = 0
            with self._tx():
                for kind in ("telemetry", "events"):
                    rows = [p for k, _r, p in items if k == kind]
                    if rows:
                        new += self._bulk(kind, rows)
                last: dict[tuple[str, str], tuple[Any, ...]] = {}
                for k, r, p in items:
                    if k == "status":
                        last[(r.fleet, r.device_id)] = p
                if last:
                    self._bulk("status", list(last.values()))
                self._put_rejects(letters, counters)
            n = sum(1 for k, _r, _p in items if k != "status")
            return BatchResult(stored=new, duplicates=n - new, dead_lettered=0)
        except self._DATA_ERRORS:
            pass  # some record is refused: find it, row by row
        except Exception as e:
            raise self._unavailable(e) from e
        return self._write_rows(items, letters, counters)

    def _write_rows(self, items: list[tuple[str, Record, tuple[Any, ...]]],
                    letters: list[Reject], counters: list[tuple[str, str, int, str]],
                    ) -> BatchResult:
        now = time.time()
        try:
            with self._tx():
                new = refused_rows = 0
                refused: list[Reject] = []
                for kind, r, params in items:
                    try:
                        with self._savepoint():
                            changed = self._one(kind, params)
                    except self._DATA_ERRORS as e:
                        refused.append(Reject(
                            r.fleet, r.device_id, _topic_of(r), _payload_of(r),
                            f"database refused the {kind} record: {one_line(e)}", now))
                        refused_rows += kind != "status"
                        continue
                    if kind != "status":
                        new += changed
                self._put_rejects(letters + refused, counters)
        except Exception as e:
            raise self._unavailable(e) from e
        n = sum(1 for k, _r, _p in items if k != "status")
        return BatchResult(stored=new, duplicates=n - new - refused_rows,
                           dead_lettered=len(refused))

    def _put_rejects(self, letters: Sequence[Reject],
                     counters: Sequence[tuple[str, str, int, str]]) -> None:
        now = time.time()
        bump: dict[tuple[str, str], list[Any]] = {}
        for f, d, n, err in counters:
            e = bump.setdefault((_clean(f), _clean(d)), [0, ""])
            e[0] += n
            e[1] = _clean(err)
        for x in letters:
            f, d = _clean(x.fleet), _clean(x.device_id)
            self._exec(INSERT_REJECT, (f, d, _clean(x.topic), bytes(x.payload),
                                       _clean(x.reason), float(x.received_at)))
            e = bump.setdefault((f, d), [0, ""])
            e[0] += 1
            e[1] = _clean(x.reason)
        for (f, d), (n, err) in bump.items():
            self._exec(UPSERT_REJECTED, (f, d, n, err, now))

    def prune(self, older_than_s: float) -> dict[str, int]:
        """Retention: delete telemetry, events and dead letters received more than
        ``older_than_s`` seconds ago (by the collector's clock, ``received_at``); status
        and the per-device reject counters stay. Returns rows deleted per table."""
        if not older_than_s >= 0:
            raise TelemetryError(f"retention must be >= 0 seconds, got {older_than_s}")
        cutoff = time.time() - older_than_s
        out: dict[str, int] = {}
        try:
            with self._tx():
                for table in ("telemetry", "events", "rejects"):
                    out[table] = self._exec(f"DELETE FROM {table} WHERE received_at < ?",
                                            (cutoff,))
        except Exception as e:
            raise self._unavailable(e) from e
        return out

    # -- reading --------------------------------------------------------------------------
    def _dicts(self, sql: str, params: Sequence[Any], cols: Sequence[str]
               ) -> list[dict[str, Any]]:
        return [dict(zip(cols, row, strict=True)) for row in self._rows(sql, params)]

    def seqs(self, fleet: str, device_id: str, *, table: str = "telemetry") -> list[int]:
        """Stored seqs of one device, ascending (``table``: telemetry or events)."""
        if table not in ("telemetry", "events"):
            raise TelemetryError(f"table {table!r} has no seq; use telemetry or events")
        return [int(r[0]) for r in self._rows(
            f"SELECT seq FROM {table} WHERE fleet = ? AND device_id = ? ORDER BY seq",
            (fleet, device_id))]

    def count(self, table: str = "telemetry") -> int:
        """Rows in ``table`` (telemetry, events, status, rejected, rejects)."""
        if table not in TABLES:
            raise TelemetryError(f"unknown table {table!r}; use one of {', '.join(TABLES)}")
        return int(self._rows(f"SELECT COUNT(*) FROM {table}")[0][0])

    def telemetry(self, fleet: str, device_id: str, *, since: float | None = None,
                  limit: int | None = None) -> list[dict[str, Any]]:
        """Telemetry windows of one device, oldest first, as dicts of the columns (the
        message fields, fleet, device_id, received_at): those with ``ts >= since`` (unix
        seconds), the newest ``limit`` of them."""
        where = "fleet = ? AND device_id = ?"
        params: list[Any] = [fleet, device_id]
        if since is not None:
            where += " AND ts >= ?"
            params.append(float(since))
        cols = ", ".join(TELEMETRY_COLUMNS)
        if limit is None:
            sql = f"SELECT {cols} FROM telemetry WHERE {where} ORDER BY seq"
        else:
            sql = (f"SELECT {cols} FROM (SELECT {cols} FROM telemetry WHERE {where} "
                   f"ORDER BY seq DESC LIMIT {max(0, int(limit))}) AS t ORDER BY seq")
        return self._dicts(sql, params, TELEMETRY_COLUMNS)

    def events(self, fleet: str, device_id: str) -> list[dict[str, Any]]:
        """Every event of one device, oldest first (``fields``: a JSON object's text)."""
        return self._dicts(
            "SELECT seq, ts, kind, fields FROM events WHERE fleet = ? AND device_id = ? "
            "ORDER BY seq", (fleet, device_id), ("seq", "ts", "kind", "fields"))

    def rejects(self, *, limit: int = 100) -> list[dict[str, Any]]:
        """Dead letters, newest first: fleet, device_id, topic, payload (bytes), reason,
        received_at."""
        cols = ("fleet", "device_id", "topic", "payload", "reason", "received_at")
        out = self._dicts(f"SELECT {', '.join(cols)} FROM rejects ORDER BY id DESC "
                          f"LIMIT {max(0, int(limit))}", (), cols)
        for d in out:
            d["payload"] = bytes(d["payload"])
        return out

    # -- rollouts (issue 15; the controller is toma_edge.host.fleet.rollout) ----------------
    def create_rollout(self, row: dict[str, Any], devices: Sequence[tuple[str, int]]) -> str:
        """Insert a rollout (``row``: the ROLLOUT_COLUMNS but ``id``) and its targeted
        ``(device_id, wave)`` rows in one transaction; returns its new id,
        ``r-YYYYMMDD-NNNN`` (the date of ``created_at``, UTC; NNNN counts that day's)."""
        day = time.strftime("%Y%m%d", time.gmtime(float(row["created_at"])))
        cols = [c for c in ROLLOUT_COLUMNS if c != "id"]
        sql = (f"INSERT INTO rollouts (id, {', '.join(cols)}) "
               f"VALUES ({', '.join('?' * (len(cols) + 1))}) ON CONFLICT DO NOTHING")
        try:
            for _attempt in range(20):
                with self._tx():
                    n = int(self._rows("SELECT COUNT(*) FROM rollouts WHERE id LIKE ?",
                                       (f"r-{day}-%",))[0][0])
                    rid = f"r-{day}-{n + 1:04d}"
                    if not self._exec(sql, (rid, *(row[c] for c in cols))):
                        continue  # another controller took that number: count again
                    for dev, wave in devices:
                        self._exec(
                            "INSERT INTO rollout_devices (rollout_id, device_id, wave, state, "
                            "updated_at) VALUES (?, ?, ?, 'pending', ?)",
                            (rid, dev, int(wave), float(row["created_at"])))
                    return rid
        except TelemetryError:
            raise
        except Exception as e:
            raise self._unavailable(e) from e
        raise StoreUnavailable("fleet database: no free rollout id after 20 attempts")

    def rollout(self, rollout_id: str) -> dict[str, Any] | None:
        """One rollout as a dict of ROLLOUT_COLUMNS (None: no such id)."""
        rows = self._dicts(f"SELECT {', '.join(ROLLOUT_COLUMNS)} FROM rollouts WHERE id = ?",
                           (rollout_id,), ROLLOUT_COLUMNS)
        return rows[0] if rows else None

    def rollouts(self, *, fleet: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """Rollouts newest first (of ``fleet``, or all), as dicts of ROLLOUT_COLUMNS."""
        where, params = ("WHERE fleet = ?", (fleet,)) if fleet else ("", ())
        return self._dicts(
            f"SELECT {', '.join(ROLLOUT_COLUMNS)} FROM rollouts {where} "
            f"ORDER BY created_at DESC, id DESC LIMIT {max(0, int(limit))}",
            params, ROLLOUT_COLUMNS)

    def rollout_devices(self, rollout_id: str) -> list[dict[str, Any]]:
        """The targeted devices of a rollout by wave and id (ROLLOUT_DEVICE_COLUMNS)."""
        return self._dicts(
            f"SELECT {', '.join(ROLLOUT_DEVICE_COLUMNS)} FROM rollout_devices "
            "WHERE rollout_id = ? ORDER BY wave, device_id", (rollout_id,),
            ROLLOUT_DEVICE_COLUMNS)

    def update_rollout(self, rollout_id: str, *, where_owner: str | None = None,
                       **fields: Any) -> bool:
        """Set columns of a rollout (and ``updated_at``); with ``where_owner`` only while
        that controller owns it. True when a row changed."""
        return self._update("rollouts", ROLLOUT_COLUMNS, "id = ?", (rollout_id,),
                            where_owner, fields)

    def update_rollout_device(self, rollout_id: str, device_id: str, **fields: Any) -> bool:
        """Set columns of one targeted device of a rollout (and ``updated_at``)."""
        return self._update("rollout_devices", ROLLOUT_DEVICE_COLUMNS,
                            "rollout_id = ? AND device_id = ?", (rollout_id, device_id),
                            None, fields)

    def _update(self, table: str, columns: Sequence[str], where: str, key: tuple[Any, ...],
                owner: str | None, fields: dict[str, Any]) -> bool:
        bad = [c for c in fields if c not in columns or c in ("id", "rollout_id", "device_id")]
        if bad:
            raise TelemetryError(f"{table} has no settable column {bad[0]!r}")
        fields.setdefault("updated_at", time.time())
        sets = ", ".join(f"{c} = ?" for c in fields)
        params: list[Any] = [*fields.values(), *key]
        if owner is not None:
            where += " AND owner = ?"
            params.append(owner)
        try:
            with self._tx():
                return self._exec(f"UPDATE {table} SET {sets} WHERE {where}", params) > 0
        except Exception as e:
            raise self._unavailable(e) from e

    def claim_rollout(self, rollout_id: str, owner: str, *, now: float,
                      take_from: str | None = None, stale_s: float = 30.0) -> bool:
        """Make ``owner`` the controller of a running rollout: when nobody owns it, it is
        ``owner`` already, its owner is ``take_from`` (known dead) or silent for
        ``stale_s`` seconds (heartbeat). False: another live controller holds it."""
        try:
            with self._tx():
                return self._exec(
                    "UPDATE rollouts SET owner = ?, heartbeat = ? WHERE id = ? AND "
                    "(owner = '' OR owner = ? OR owner = ? OR heartbeat IS NULL "
                    "OR heartbeat < ?)",
                    (owner, now, rollout_id, owner, take_from or owner, now - stale_s)) > 0
        except Exception as e:
            raise self._unavailable(e) from e

    def rollout_events(self, fleet: str, *, since: float = 0.0) -> list[dict[str, Any]]:
        """The ``rollout.*`` events of ``fleet``'s devices received at or after ``since``
        (unix s, the collector's clock), by device and seq: device_id, seq, ts, kind,
        fields (the JSON object's text), received_at."""
        cols = ("device_id", "seq", "ts", "kind", "fields", "received_at")
        return self._dicts(
            f"SELECT {', '.join(cols)} FROM events WHERE fleet = ? AND kind LIKE ? "
            "AND received_at >= ? ORDER BY device_id, seq", (fleet, "rollout.%", since), cols)

    def fleet_device_ids(self, fleet: str) -> list[str]:
        """Every device of ``fleet`` the store knows (status or telemetry), sorted."""
        return sorted({str(d) for (f, d) in self._device_keys() if f == fleet})

    def _device_keys(self) -> list[tuple[str, str]]:
        return [(str(f), str(d)) for f, d in self._rows(
            "SELECT fleet, device_id FROM status UNION SELECT fleet, device_id FROM telemetry "
            "UNION SELECT fleet, device_id FROM rejected")]

    def devices(self, *, error_window_s: float = 3600.0) -> list[DeviceRow]:
        """One row per device seen (status, telemetry or rejects), sorted by fleet and id.

        Memory comes from the device's last telemetry window; p99 latency from its last
        window that served requests within ``error_window_s`` seconds of it (an idle last
        window has no latency to show); the error rate counts those seconds' windows.
        """
        out: list[DeviceRow] = []
        for fleet, dev in sorted(self._device_keys()):
            key = (fleet, dev)
            st = self._rows(
                "SELECT online, model, model_version, target, received_at, budget_bytes "
                "FROM status WHERE fleet = ? AND device_id = ?", key)
            st0 = st[0] if st else None
            lasts = self._rows(
                "SELECT ts, latency_p99_s, rss_bytes, peak_rss_bytes, budget_bytes, model, "
                "model_version, received_at FROM telemetry WHERE fleet = ? AND device_id = ? "
                "ORDER BY seq DESC LIMIT 1", key)
            last = lasts[0] if lasts else None
            n, req, err = 0, 0, 0
            p99 = None
            if last is not None:
                since = float(last[0]) - error_window_s
                row = self._rows(
                    "SELECT latency_p99_s FROM telemetry WHERE fleet = ? AND device_id = ? "
                    "AND latency_p99_s IS NOT NULL AND ts >= ? ORDER BY seq DESC LIMIT 1",
                    (*key, since))
                p99 = row[0][0] if row else None
                n, req, err = self._rows(
                    "SELECT COUNT(*), COALESCE(SUM(requests), 0), COALESCE(SUM(errors), 0) "
                    "FROM telemetry WHERE fleet = ? AND device_id = ? AND ts >= ?",
                    (*key, since))[0]
            rej = self._rows("SELECT count FROM rejected WHERE fleet = ? AND device_id = ?", key)
            seen = [t for t in (st0[4] if st0 else None, last[7] if last else None) if t]
            out.append(DeviceRow(
                fleet=fleet, device_id=dev,
                online=bool(st0[0]) if st0 and st0[0] is not None else None,
                model=(last[5] if last and last[5] else (st0[1] if st0 else None)),
                model_version=(last[6] if last and last[6] else (st0[2] if st0 else None)),
                target=st0[3] if st0 else None,
                last_seen=max(seen) if seen else None,
                latency_p99_s=p99,
                rss_bytes=last[2] if last else None,
                peak_rss_bytes=last[3] if last else None,
                budget_bytes=(last[4] if last and last[4] is not None
                              else (st0[5] if st0 else None)),
                requests=int(req), errors=int(err), telemetry_count=int(n),
                rejected=int(rej[0][0]) if rej else 0,
            ))
        return out
