"""The fleet's SQLite store: status, telemetry and events, each message stored once.

    from toma_edge.host.fleet.store import FleetStore
    store = FleetStore("fleet.db")
    for dev in store.devices(): print(dev.fleet, dev.device_id, dev.online, dev.last_seen)
    rows = store.telemetry("plant-7", "pi-0042")      # oldest first
    print(store.seqs("plant-7", "pi-0042")[:5])       # [1, 2, 3, 4, 5]

One file in WAL mode, so several collectors on one host and readers (``fleet status``)
share it. Telemetry and events have a primary key ``(fleet, device_id, seq)`` and are
inserted with INSERT OR IGNORE: a message delivered twice is stored once. ``status``
holds the last status per device (an upsert).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import TelemetryError
from ...telemetry import EventMessage, Message, StatusMessage, TelemetryMessage

__all__ = ["FleetStore", "Record", "DeviceRow", "BatchResult"]

_TELEMETRY_FIELDS = [f for f in TelemetryMessage.model_fields if f != "v"]
_STATUS_FIELDS = [f for f in StatusMessage.model_fields if f != "v"]

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS status (
    fleet TEXT NOT NULL, device_id TEXT NOT NULL,
    {", ".join(f + (" INTEGER" if f == "online" else "") for f in _STATUS_FIELDS)},
    received_at REAL NOT NULL,
    PRIMARY KEY (fleet, device_id)
);
CREATE TABLE IF NOT EXISTS telemetry (
    fleet TEXT NOT NULL, device_id TEXT NOT NULL,
    {", ".join(_TELEMETRY_FIELDS)},
    received_at REAL NOT NULL,
    PRIMARY KEY (fleet, device_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    fleet TEXT NOT NULL, device_id TEXT NOT NULL,
    seq INTEGER NOT NULL, ts REAL NOT NULL, kind TEXT NOT NULL, fields TEXT NOT NULL,
    received_at REAL NOT NULL,
    PRIMARY KEY (fleet, device_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS rejected (
    fleet TEXT NOT NULL, device_id TEXT NOT NULL,
    count INTEGER NOT NULL, last_error TEXT NOT NULL, last_at REAL NOT NULL,
    PRIMARY KEY (fleet, device_id)
);
"""

_INSERT_TELEMETRY = (
    f"INSERT OR IGNORE INTO telemetry (fleet, device_id, {', '.join(_TELEMETRY_FIELDS)}, "
    f"received_at) VALUES ({', '.join('?' * (len(_TELEMETRY_FIELDS) + 3))})"
)
_INSERT_EVENT = (
    "INSERT OR IGNORE INTO events (fleet, device_id, seq, ts, kind, fields, received_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_UPSERT_STATUS = (
    f"INSERT INTO status (fleet, device_id, {', '.join(_STATUS_FIELDS)}, received_at) "
    f"VALUES ({', '.join('?' * (len(_STATUS_FIELDS) + 3))}) "
    f"ON CONFLICT(fleet, device_id) DO UPDATE SET "
    + ", ".join(f"{f} = excluded.{f}" for f in [*_STATUS_FIELDS, "received_at"])
)
_UPSERT_REJECT = (
    "INSERT INTO rejected (fleet, device_id, count, last_error, last_at) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT(fleet, device_id) DO UPDATE SET count = count + excluded.count, "
    "last_error = excluded.last_error, last_at = excluded.last_at"
)


@dataclass(frozen=True)
class Record:
    """One decoded message of a device, as received (``received_at``: unix seconds)."""

    fleet: str
    device_id: str
    message: Message
    received_at: float


@dataclass(frozen=True)
class BatchResult:
    """What one committed batch did: rows newly stored, and duplicates ignored."""

    stored: int
    duplicates: int


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


class FleetStore:
    """The SQLite store; ``busy_timeout_s`` is how long a writer waits for another one."""

    def __init__(self, path: str | Path, *, busy_timeout_s: float = 30.0,
                 create: bool = True) -> None:
        self.path = Path(path)
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
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as e:
            raise TelemetryError(f"fleet database {str(self.path)!r} cannot be opened: {e}") from e

    def close(self) -> None:
        """Close the connection."""
        self._db.close()

    # -- writing --------------------------------------------------------------------------
    def write_batch(
        self,
        records: Sequence[Record],
        rejects: Iterable[tuple[str, str, int, str]] = (),
    ) -> BatchResult:
        """Store records (and reject counts ``(fleet, device_id, count, error)``) in ONE
        transaction; returns what was new. Raises sqlite3.Error (nothing stored) on failure."""
        tel: list[tuple[Any, ...]] = []
        ev: list[tuple[Any, ...]] = []
        st: list[tuple[Any, ...]] = []
        for r in records:
            m = r.message
            if isinstance(m, TelemetryMessage):
                tel.append((r.fleet, r.device_id, *(getattr(m, f) for f in _TELEMETRY_FIELDS),
                            r.received_at))
            elif isinstance(m, EventMessage):
                ev.append((r.fleet, r.device_id, m.seq, m.ts, m.kind,
                           _json(m.fields), r.received_at))
            else:
                st.append((r.fleet, r.device_id, *(getattr(m, f) for f in _STATUS_FIELDS),
                           r.received_at))
        now = time.time()
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            before = db.total_changes
            if tel:
                db.executemany(_INSERT_TELEMETRY, tel)
            if ev:
                db.executemany(_INSERT_EVENT, ev)
            new = db.total_changes - before
            if st:
                db.executemany(_UPSERT_STATUS, st)
            rej = [(f, d, n, err, now) for f, d, n, err in rejects]
            if rej:
                db.executemany(_UPSERT_REJECT, rej)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return BatchResult(stored=new, duplicates=len(tel) + len(ev) - new)

    # -- reading --------------------------------------------------------------------------
    def seqs(self, fleet: str, device_id: str, *, table: str = "telemetry") -> list[int]:
        """Stored seqs of one device, ascending (``table``: telemetry or events)."""
        if table not in ("telemetry", "events"):
            raise TelemetryError(f"table {table!r} has no seq; use telemetry or events")
        return [r[0] for r in self._db.execute(
            f"SELECT seq FROM {table} WHERE fleet = ? AND device_id = ? ORDER BY seq",
            (fleet, device_id))]

    def count(self, table: str = "telemetry") -> int:
        """Rows in ``table`` (telemetry, events, status)."""
        if table not in ("telemetry", "events", "status", "rejected"):
            raise TelemetryError(f"unknown table {table!r}")
        return int(self._db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])

    def telemetry(self, fleet: str, device_id: str) -> list[dict[str, Any]]:
        """Every telemetry window of one device, oldest first, as dicts of the message fields."""
        cur = self._db.execute(
            "SELECT * FROM telemetry WHERE fleet = ? AND device_id = ? ORDER BY seq",
            (fleet, device_id))
        cols = [c[0] for c in cur.description]
        return [dict(zip(cols, row, strict=True)) for row in cur]

    def events(self, fleet: str, device_id: str) -> list[dict[str, Any]]:
        """Every event of one device, oldest first."""
        cur = self._db.execute(
            "SELECT seq, ts, kind, fields FROM events WHERE fleet = ? AND device_id = ? "
            "ORDER BY seq", (fleet, device_id))
        return [{"seq": s, "ts": t, "kind": k, "fields": f} for s, t, k, f in cur]

    def devices(self, *, error_window_s: float = 3600.0) -> list[DeviceRow]:
        """One row per device seen (status or telemetry), sorted by fleet and id.

        Memory comes from the device's last telemetry window; p99 latency from its last
        window that served requests within ``error_window_s`` seconds of it (an idle last
        window has no latency to show); the error rate counts those seconds' windows.
        """
        keys = self._db.execute(
            "SELECT fleet, device_id FROM status UNION SELECT fleet, device_id FROM telemetry "
            "UNION SELECT fleet, device_id FROM rejected ORDER BY 1, 2").fetchall()
        out: list[DeviceRow] = []
        for fleet, dev in keys:
            st = self._db.execute(
                "SELECT online, model, model_version, target, received_at, budget_bytes "
                "FROM status WHERE fleet = ? AND device_id = ?", (fleet, dev)).fetchone()
            last = self._db.execute(
                "SELECT ts, latency_p99_s, rss_bytes, peak_rss_bytes, budget_bytes, model, "
                "model_version, received_at FROM telemetry WHERE fleet = ? AND device_id = ? "
                "ORDER BY seq DESC LIMIT 1", (fleet, dev)).fetchone()
            n, req, err = 0, 0, 0
            p99 = None
            if last is not None:
                row = self._db.execute(
                    "SELECT latency_p99_s FROM telemetry WHERE fleet = ? AND device_id = ? "
                    "AND latency_p99_s IS NOT NULL AND ts >= ? ORDER BY seq DESC LIMIT 1",
                    (fleet, dev, last[0] - error_window_s)).fetchone()
                p99 = row[0] if row else None
                n, req, err = self._db.execute(
                    "SELECT COUNT(*), COALESCE(SUM(requests), 0), COALESCE(SUM(errors), 0) "
                    "FROM telemetry WHERE fleet = ? AND device_id = ? AND ts >= ?",
                    (fleet, dev, last[0] - error_window_s)).fetchone()
            rej = self._db.execute(
                "SELECT count FROM rejected WHERE fleet = ? AND device_id = ?",
                (fleet, dev)).fetchone()
            seen = [t for t in (st[4] if st else None, last[7] if last else None) if t]
            out.append(DeviceRow(
                fleet=fleet, device_id=dev,
                online=bool(st[0]) if st else None,
                model=(last[5] if last and last[5] else (st[1] if st else None)),
                model_version=(last[6] if last and last[6] else (st[2] if st else None)),
                target=st[3] if st else None,
                last_seen=max(seen) if seen else None,
                latency_p99_s=p99,
                rss_bytes=last[2] if last else None,
                peak_rss_bytes=last[3] if last else None,
                budget_bytes=(last[4] if last and last[4] is not None
                              else (st[5] if st else None)),
                requests=int(req), errors=int(err), telemetry_count=int(n),
                rejected=int(rej[0]) if rej else 0,
            ))
        return out


def _json(fields: dict[str, Any]) -> str:
    import json

    return json.dumps(fields, sort_keys=True)
