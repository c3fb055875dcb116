"""The fleet store's contract on SQLite AND PostgreSQL (a real server), and its migrations.

    python -m pytest -q tests/test_fleet_store.py

Each contract test runs on both stores (``store_db``: a fleet.db path, or a fresh database
on the session's PostgreSQL 15); migrations are tested from a fleet.db written with the
schema as it landed (before alembic) and from a PostgreSQL database at revision 0001.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from toma_edge.errors import TelemetryError
from toma_edge.host.fleet.schema import HEAD, migrate
from toma_edge.host.fleet.store import (
    EVENT_COLUMNS,
    STATUS_COLUMNS,
    TELEMETRY_COLUMNS,
    BatchResult,
    FleetStore,
    Record,
    Reject,
    StoreUnavailable,
    open_store,
)
from toma_edge.telemetry import EventMessage, StatusMessage, TelemetryMessage

if TYPE_CHECKING:
    from pg_fixtures import PgServer

pytest_plugins = ["pg_fixtures"]  # pg_server, pg_url, pg_factory

T0 = 1_764_000_000.0


def tel(dev: str, seq: int, *, fleet: str = "f", **kw: Any) -> Record:
    fields: dict[str, Any] = dict(seq=seq, ts=T0 + seq, window_s=1.0, requests=10, errors=seq % 2,
                                  rows=40, latency_p99_s=0.01 * seq, rss_bytes=100 << 20,
                                  peak_rss_bytes=120 << 20, budget_bytes=256 << 20,
                                  model="m", model_version="v1")
    fields.update(kw)
    return Record(fleet, dev, TelemetryMessage(**fields), T0 + seq + 0.5)


def refused(dev: str, seq: int) -> Record:
    """A telemetry record no database stores: its seq does not fit 64 bits (built past the
    model's validation, as a record the database is the first to refuse)."""
    r = tel(dev, 1)
    return Record(r.fleet, dev, r.message.model_copy(update={"seq": seq}), r.received_at)


def status(dev: str, online: bool, ts: float) -> Record:
    return Record("f", dev, StatusMessage(online=online, ts=ts, model="m", target="rpi4",
                                          budget_bytes=256 << 20), ts)


def event(dev: str, seq: int) -> Record:
    return Record("f", dev, EventMessage(seq=seq, ts=T0 + seq, kind="model_loaded",
                                         fields={"model": "m", "n": seq}), T0 + seq)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "fleet.db")
    url: str = request.getfixturevalue("pg_url")
    return url


@pytest.fixture
def store(store_db: str) -> Any:
    s = open_store(store_db)
    yield s
    s.close()


# -- the contract, on both stores ------------------------------------------------------------
def test_exactly_once_and_duplicates(store: Any) -> None:
    batch = [tel("d1", i) for i in range(1, 51)] + [event("d1", 1), event("d1", 2)]
    assert store.write_batch(batch) == BatchResult(stored=52, duplicates=0, dead_lettered=0)
    # redelivered after a crash before the ack, plus new ones, plus a duplicate in-batch
    again = batch[40:] + [tel("d1", 51), tel("d1", 51), tel("d2", 1)]
    assert store.write_batch(again) == BatchResult(stored=2, duplicates=13, dead_lettered=0)
    assert store.seqs("f", "d1") == list(range(1, 52))
    assert store.seqs("f", "d1", table="events") == [1, 2]
    assert store.count() == 52 and store.count("events") == 2
    with pytest.raises(TelemetryError, match="unknown table"):
        store.count("users; DROP TABLE telemetry")


def test_status_upsert_last_wins(store: Any) -> None:
    store.write_batch([status("d1", True, T0)])
    store.write_batch([status("d1", False, T0 + 5), status("d2", True, T0 + 1),
                       status("d2", False, T0 + 2)])  # two of d2 in one batch
    rows = {d.device_id: d for d in store.devices()}
    assert store.count("status") == 2
    assert rows["d1"].online is False and rows["d1"].last_seen == T0 + 5
    assert rows["d2"].online is False and rows["d2"].target == "rpi4"


def test_refused_record_is_dead_lettered_not_retried(store: Any) -> None:
    """Issue 12 class 3: a record the database refuses goes to rejects with the reason; the
    rest of its batch is stored; the same batch again stores nothing twice."""
    bad = refused("d1", 2**63)
    batch = [tel("d1", 1), bad, tel("d1", 2), status("d1", True, T0)]
    res = store.write_batch(batch)
    assert res == BatchResult(stored=2, duplicates=0, dead_lettered=1)
    assert store.seqs("f", "d1") == [1, 2]
    (letter,) = store.rejects()
    assert letter["fleet"] == "f" and letter["device_id"] == "d1"
    assert letter["topic"] == "toma-edge/v1/f/d1/telemetry"
    assert b"9223372036854775808" in letter["payload"]
    assert "database refused the telemetry record" in letter["reason"]
    assert "\n" not in letter["reason"]
    assert next(d for d in store.devices() if d.device_id == "d1").rejected == 1
    # redelivered (e.g. the ack was lost): dead-lettered again, never an endless retry
    res = store.write_batch(batch)
    assert res == BatchResult(stored=0, duplicates=2, dead_lettered=1)
    assert store.count("status") == 1 and store.count("rejects") == 2


@pytest.mark.parametrize("method", ["copy", "executemany", "values"])
def test_postgres_insert_methods_agree(pg_url: str, method: str) -> None:
    from toma_edge.host.fleet.store_pg import PgFleetStore

    with PgFleetStore(pg_url, method=method) as s:
        batch = [tel("d1", i) for i in range(1, 30)] + [event("d1", 1), event("d1", 2)]
        assert s.write_batch(batch) == BatchResult(31, 0, 0)
        assert s.write_batch(batch[20:] + [tel("d1", 30)]) == BatchResult(1, 11, 0)
        bad = [refused("d2", 2**64), tel("d2", 1), tel("d2", 2)]
        assert s.write_batch(bad + [tel("d2", 3, model="m\u00e9")]) == BatchResult(3, 0, 1)
        assert s.seqs("f", "d2") == [1, 2, 3]
        assert s.write_batch(bad) == BatchResult(0, 2, 1)  # same transaction's temp tables
        assert "bigint" in s.rejects(limit=1)[0]["reason"]


def test_collector_rejects_stored_raw(store: Any) -> None:
    raw = b'{"v":1,"seq":"3"}\x00\xff'
    res = store.write_batch([tel("d1", 1)], [
        Reject("f", "d1", "toma-edge/v1/f/d1/telemetry", raw, "seq: not an integer", T0),
        Reject("?", "?", "toma-edge/v1/\ud800/x", b"", "topic \ud800\x00 unusable", T0 + 1),
        ("f", "d1", 3, "legacy counter"),  # the old tuple form only bumps the counter
    ])
    assert res == BatchResult(stored=1, duplicates=0, dead_lettered=0)
    newest, oldest = store.rejects()
    assert oldest["payload"] == raw and oldest["reason"] == "seq: not an integer"
    assert newest["fleet"] == "?" and "\x00" not in newest["reason"]
    assert store.rejects(limit=1) == [newest]
    rejected = {d.device_id: d.rejected for d in store.devices()}
    assert rejected == {"?": 1, "d1": 4}
    assert store.count("rejected") == 2


def test_reads_and_prune(store: Any) -> None:
    store.write_batch([tel("d1", i) for i in range(1, 21)] + [status("d1", True, T0)])
    rows = store.telemetry("f", "d1", since=T0 + 15)
    assert [r["seq"] for r in rows] == [15, 16, 17, 18, 19, 20]
    assert [r["seq"] for r in store.telemetry("f", "d1", limit=3)] == [18, 19, 20]
    assert list(rows[0]) == TELEMETRY_COLUMNS
    (dev,) = store.devices(error_window_s=4.5)
    assert dev.telemetry_count == 5 and dev.requests == 50 and dev.errors == 2
    assert dev.latency_p99_s == pytest.approx(0.2) and dev.headroom_bytes == 136 << 20
    # retention by the collector's clock: these rows were received in 2025
    assert store.prune(older_than_s=3600) == {"telemetry": 20, "events": 0, "rejects": 0}
    assert store.count() == 0 and store.count("status") == 1
    with pytest.raises(TelemetryError, match=">= 0"):
        store.prune(float("nan"))


def test_both_stores_answer_alike(tmp_path: Path, pg_url: str) -> None:
    """The same batches into SQLite and PostgreSQL read back equal (types included)."""
    batches = [
        [tel("d1", i) for i in range(1, 31)] + [status("d1", True, T0), event("d1", 1)],
        [tel("d2", i, latency_p99_s=None, requests=0, cpu_temp_c=51.5) for i in range(1, 6)]
        + [status("d3", False, T0 + 3), tel("d1", 30)],
        [tel("d1", 31, fleet="g")],
    ]
    out = []
    for db in (str(tmp_path / "fleet.db"), pg_url):
        with open_store(db) as s:
            results = [s.write_batch(b, [Reject("f", "d2", "t", b"x", "r", T0)]) for b in batches]
            out.append((results, s.devices(), s.devices(error_window_s=3.0),
                        [s.telemetry(f, d) for f, d in (("f", "d1"), ("f", "d2"), ("g", "d1"))],
                        s.events("f", "d1"), s.rejects(), s.seqs("f", "d2")))
    assert out[0] == out[1]
    assert [type(v) for v in out[0][3][1][0].values()] == \
        [type(v) for v in out[1][3][1][0].values()]


def test_columns_follow_the_messages(store: Any) -> None:
    """A field added to a message needs a migration adding its column (this fails first)."""
    assert TELEMETRY_COLUMNS[2:-1] == [f for f in TelemetryMessage.model_fields if f != "v"]
    for table, cols in (("telemetry", TELEMETRY_COLUMNS), ("events", EVENT_COLUMNS),
                        ("status", STATUS_COLUMNS)):
        assert _columns(store, table) == cols, table


def _columns(store: Any, table: str) -> list[str]:
    if isinstance(store, FleetStore):
        return [r[1] for r in store._db.execute(f"PRAGMA table_info({table})")]
    return [r[0] for r in store._rows(
        "SELECT column_name FROM information_schema.columns WHERE table_name = ? "
        "ORDER BY ordinal_position", (table,))]


# -- failures ---------------------------------------------------------------------------------
def test_sqlite_locked_is_unavailable_then_recovers(tmp_path: Path) -> None:
    db = tmp_path / "fleet.db"
    store = FleetStore(db, busy_timeout_s=0.2)
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another writer holds the lock past our busy timeout
    with pytest.raises(StoreUnavailable, match="locked"):
        store.write_batch([tel("d1", 1)])
    other.execute("ROLLBACK")
    assert store.count() == 0
    assert store.write_batch([tel("d1", 1)]).stored == 1


def test_postgres_down_is_unavailable_then_recovers(pg_factory: type[PgServer]) -> None:
    srv = pg_factory.start_new()
    url = srv.create_db("fleet")
    store = open_store(url)
    store.write_batch([tel("d1", 1)])
    srv.stop()
    with pytest.raises(StoreUnavailable) as e:
        store.write_batch([tel("d1", 2)])
    assert "\n" not in str(e.value) and url in str(e.value)
    with pytest.raises(StoreUnavailable, match="Connection refused"):
        store.devices()
    with pytest.raises(TelemetryError, match="Connection refused") as e2:
        open_store(url, create=False)
    assert "\n" not in str(e2.value)
    srv.start()
    deadline = time.monotonic() + 10
    while True:  # the first call after a restart may still find the old connection dead
        try:
            res = store.write_batch([tel("d1", 2)])
            break
        except StoreUnavailable:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    assert res.stored == 1 and store.seqs("f", "d1") == [1, 2]


def test_missing_sqlite_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(TelemetryError, match="does not exist") as e:
        open_store(tmp_path / "nope.db", create=False)
    assert "\n" not in str(e.value) and not (tmp_path / "nope.db").exists()
    with pytest.raises(TelemetryError, match="not supported"):
        open_store("mysql://x@y/z")


def test_postgres_password_from_environment(pg_server: PgServer,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    url = pg_server.create_password_role(pg_server.create_db().rsplit("/", 1)[1])
    PW_ROLE_PASSWORD = pg_server.role_password  # noqa: N806
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", "/nonexistent")
    with pytest.raises(TelemetryError, match="PGPASSWORD"):
        open_store(url)
    monkeypatch.setenv("PGPASSWORD", PW_ROLE_PASSWORD)
    with open_store(url) as s:
        assert s.write_batch([tel("d1", 1)]).stored == 1
    # a password in the URL works but is never shown
    monkeypatch.delenv("PGPASSWORD")
    with_pw = url.replace("fleet_pw@", f"fleet_pw:{PW_ROLE_PASSWORD}@")
    with open_store(with_pw) as s:
        assert s.count() == 1 and PW_ROLE_PASSWORD not in s.path_or_url
    with pytest.raises(TelemetryError) as e:
        open_store(with_pw.replace(PW_ROLE_PASSWORD, "wrong-pw-1"))
    assert "wrong-pw-1" not in str(e.value)


# -- migrations -------------------------------------------------------------------------------
LANDED_SCHEMA = """
CREATE TABLE IF NOT EXISTS status (
    fleet TEXT NOT NULL, device_id TEXT NOT NULL,
    online INTEGER, ts, model, model_version, model_sha256, target, budget_bytes, interval_s, agent,
    received_at REAL NOT NULL,
    PRIMARY KEY (fleet, device_id)
);
CREATE TABLE IF NOT EXISTS telemetry (
    fleet TEXT NOT NULL, device_id TEXT NOT NULL,
    seq, ts, window_s, requests, errors, rows, latency_p50_s, latency_p95_s, latency_p99_s, latency_max_s, throughput_rps, rows_per_s, batch_size, rss_bytes, peak_rss_bytes, budget_bytes, cpu_temp_c, model, model_version, model_sha256, spool_dropped,
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
"""  # noqa: E501  (verbatim: FleetStore._SCHEMA at 067d650, as the landed code wrote it)


def test_landed_sqlite_file_is_upgraded_in_place(tmp_path: Path) -> None:
    db = tmp_path / "fleet.db"
    old = sqlite3.connect(db)
    old.execute("PRAGMA journal_mode=WAL")
    old.executescript(LANDED_SCHEMA)
    cols = ", ".join(TELEMETRY_COLUMNS)
    with old:
        for seq in range(1, 11):
            old.execute(f"INSERT INTO telemetry ({cols}) VALUES "
                        f"({', '.join('?' * len(TELEMETRY_COLUMNS))})",
                        ("f", "old", seq, T0 + seq, 1.0, 1, 0, 1, *[None] * 4, 0.0, 0.0,
                         None, 1, 2, 3, None, "m", "v0", None, 0, T0 + seq))
        old.execute("INSERT INTO rejected VALUES ('f', 'old', 4, 'bad json', ?)", (T0,))
    old.close()
    store = open_store(db)
    assert isinstance(store, FleetStore)
    assert store._db.execute("SELECT version_num FROM alembic_version").fetchall() == [(HEAD,)]
    assert store.seqs("f", "old") == list(range(1, 11))
    (dev,) = store.devices()
    assert dev.rejected == 4 and dev.model_version == "v0"
    assert store.write_batch([tel("old", 10), tel("old", 11)], [
        Reject("f", "old", "t", b"{", "bad", T0)]) == BatchResult(1, 1, 0)
    assert store.count("rejects") == 1
    # WAL and synchronous=FULL as before (FULL = 2)
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2
    idx = {r[0] for r in store._db.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert {"telemetry_device_ts", "telemetry_received_at"} <= idx
    store.close()
    assert migrate(db) == HEAD  # at head: nothing to do


def test_head_is_alembic_head() -> None:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    import toma_edge.host.fleet.schema as schema

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(schema.__file__).parent / "migrations"))
    assert ScriptDirectory.from_config(cfg).get_current_head() == HEAD


def _upgrade_to(db: str, revision: str) -> None:
    """Bring a store to an older ``revision`` with alembic itself (an older toma-edge)."""
    from alembic import command
    from sqlalchemy import create_engine

    from toma_edge.host.fleet.schema import _alembic_config

    url = db if db.startswith("postgresql") else f"sqlite:///{db}"
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.begin() as conn:
        command.upgrade(_alembic_config(conn), revision)
    engine.dispose()


def test_older_revision_is_upgraded_keeping_rows(store_db: str) -> None:
    _upgrade_to(store_db, "0001")
    with _raw(store_db) as ins:
        ins(("f", "d9", 5, T0, 1.0, 1, 0, 1, None, None, None, None, 0.0, 0.0, None, 1, 2, 3,
             None, "m", "v0", None, 0, T0))
    with open_store(store_db) as s:
        assert s.seqs("f", "d9") == [5]
        assert s.write_batch([tel("d9", 5)], [Reject("f", "d9", "t", b"", "r", T0)]) \
            == BatchResult(0, 1, 0)
        assert s.count("rejects") == 1


class _raw:
    """Insert one telemetry row without the store (the store would migrate first)."""

    def __init__(self, db: str) -> None:
        self.db = db

    def __enter__(self) -> Any:
        cols = ", ".join(TELEMETRY_COLUMNS)
        if self.db.startswith("postgresql"):
            import psycopg

            self.conn: Any = psycopg.connect(self.db, autocommit=True)
            ph = ", ".join(["%s"] * len(TELEMETRY_COLUMNS))
        else:
            self.conn = sqlite3.connect(self.db, isolation_level=None)
            ph = ", ".join("?" * len(TELEMETRY_COLUMNS))
        return lambda row: self.conn.execute(f"INSERT INTO telemetry ({cols}) VALUES ({ph})", row)

    def __exit__(self, *exc: object) -> None:
        self.conn.close()


def test_newer_database_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "fleet.db"
    open_store(db).close()
    with sqlite3.connect(db) as c:
        c.execute("UPDATE alembic_version SET version_num = '0999'")
    with pytest.raises(TelemetryError, match="newer than this toma-edge") as e:
        open_store(db)
    assert "\n" not in str(e.value)


def _open_and_count(db: str) -> int:
    with open_store(db) as s:
        return int(s.count())


def test_concurrent_openers_migrate_once(store_db: str) -> None:
    """Collectors starting at once on a new database: one migration, no error."""
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(4) as pool:
        assert pool.map(_open_and_count, [store_db] * 4) == [0] * 4
    with open_store(store_db) as s:
        assert s._rows("SELECT version_num FROM alembic_version") == [(HEAD,)]


# -- r0003: rollouts ---------------------------------------------------------------------------

def _rollout_row(t: float = T0) -> dict[str, Any]:
    return dict(fleet="f", state="running", reason="", release_name="m",
                release_version="2", bundle_sha256="ab" * 32, bundle_bytes=123,
                bundle_path="/b.tar.gz", params="{}", job="{}", wave=0, created_at=t,
                updated_at=t, deadline=t + 600, finished_at=None, owner="", heartbeat=None)


def test_rollout_tables_round_trip(store: Any) -> None:
    rid = store.create_rollout(_rollout_row(), [("d1", 0), ("d2", 1), ("d3", 1)])
    rid2 = store.create_rollout(_rollout_row(), [("d1", 0)])
    day = time.strftime("%Y%m%d", time.gmtime(T0))
    assert (rid, rid2) == (f"r-{day}-0001", f"r-{day}-0002")
    assert [r["id"] for r in store.rollouts(fleet="f")] == [rid2, rid]
    assert store.rollouts(fleet="other") == []
    devs = store.rollout_devices(rid)
    assert [(d["device_id"], d["wave"], d["state"]) for d in devs] == [
        ("d1", 0, "pending"), ("d2", 1, "pending"), ("d3", 1, "pending")]
    assert store.update_rollout_device(rid, "d2", state="sent", sent_at=T0 + 1)
    assert not store.update_rollout_device(rid, "nope", state="sent")
    assert store.rollout_devices(rid)[1]["state"] == "sent"
    # ownership: one controller at a time; a stale or dead owner is taken over
    assert store.claim_rollout(rid, "host:1", now=T0)
    assert not store.claim_rollout(rid, "host:2", now=T0 + 1)
    assert store.claim_rollout(rid, "host:2", now=T0 + 1, take_from="host:1")
    assert not store.update_rollout(rid, where_owner="host:1", wave=1)
    assert store.update_rollout(rid, where_owner="host:2", wave=1)
    assert store.claim_rollout(rid, "host:3", now=T0 + 100)  # host:2 silent for 99 s
    assert store.rollout(rid)["wave"] == 1 and store.rollout("r-x") is None
    with pytest.raises(TelemetryError, match="no settable column"):
        store.update_rollout(rid, bogus=1)
    assert store.count("rollout_devices") == 4


def test_rollout_events_are_read_by_kind(store: Any) -> None:
    ev = [Record("f", "d1", EventMessage(seq=i, ts=T0 + i, kind=k, fields={"rollout_id": "r"}),
                 T0 + i) for i, k in enumerate(["model_loaded", "rollout.received",
                                                "rollout.healthy"], start=1)]
    store.write_batch(ev)
    got = store.rollout_events("f", since=T0)
    assert [e["kind"] for e in got] == ["rollout.received", "rollout.healthy"]
    assert store.rollout_events("f", since=T0 + 3)[0]["kind"] == "rollout.healthy"
    assert store.rollout_events("g") == []


def test_r0002_store_is_upgraded_to_rollouts(store_db: str) -> None:
    _upgrade_to(store_db, "0002")
    with open_store(store_db) as s:
        assert s._rows("SELECT version_num FROM alembic_version") == [(HEAD,)]
        assert s.count("rollouts") == 0
        s.create_rollout(_rollout_row(), [("d1", 0)])
        assert s.count("rollout_devices") == 1
