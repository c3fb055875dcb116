"""Schema migrations of the fleet store (alembic), applied when a store is opened.

    from toma_edge.host.fleet.schema import migrate, HEAD
    migrate("fleet.db")                          # SQLite: a path
    migrate("postgresql://fleet@db:5432/fleet")  # PostgreSQL (password: PGPASSWORD/.pgpass)

The revisions live in ``migrations/versions`` and carry SQL for both dialects. A store
at :data:`HEAD` is checked with one query (no alembic import: ``fleet status`` stays
fast); an older one, including a fleet.db written before migrations existed (no
``alembic_version`` table), is upgraded in place inside one transaction that holds the
migration lock (SQLite: ``BEGIN IMMEDIATE``; PostgreSQL: an advisory lock), so several
collectors starting at once migrate it once.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from ...errors import TelemetryError

__all__ = ["HEAD", "migrate", "migrate_sqlite", "migrate_postgres", "revision_of"]

HEAD = "0003"
"""The newest revision in ``migrations/versions`` (a test checks it against alembic)."""

_PG_LOCK_KEY = 0x746F6D61  # "toma": pg_advisory_xact_lock key of the migration


def _alembic_config(connection: Any) -> Any:
    try:
        from alembic.config import Config
    except ImportError as e:
        raise TelemetryError(
            f"migrating the fleet database needs alembic ({e}); install the host extra: "
            "pip install 'toma-edge[host]'") from e

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    cfg.attributes["connection"] = connection
    return cfg


def _check_not_newer(rev: str | None, where: str) -> None:
    if rev is not None and rev.isdigit() and int(rev) > int(HEAD):
        raise TelemetryError(
            f"fleet database {where} has schema revision {rev}, newer than this toma-edge "
            f"knows ({HEAD}); upgrade toma-edge")


def revision_of(conn: sqlite3.Connection | Any) -> str | None:
    """The alembic revision a store's open connection is at (None: never migrated)."""
    if isinstance(conn, sqlite3.Connection):
        if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' "
                        "AND name = 'alembic_version'").fetchone() is None:
            return None
        row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
        return str(row[0]) if row else None
    row = conn.execute("SELECT to_regclass('alembic_version') IS NOT NULL").fetchone()
    if not row[0]:
        return None
    row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
    return str(row[0]) if row else None


def migrate_sqlite(path: str | Path, *, busy_timeout_s: float = 30.0) -> str | None:
    """Upgrade the SQLite store at ``path`` to :data:`HEAD`; returns the revision it was at
    (None: a landed fleet.db or a new file). sqlite3.Error on failure."""
    with sqlite3.connect(str(path), timeout=busy_timeout_s) as probe:
        before = revision_of(probe)
    probe.close()
    _check_not_newer(before, repr(str(path)))
    if before == HEAD:
        return before
    _alembic_config(None)  # a clear error without alembic
    from alembic import command
    from sqlalchemy import create_engine, event

    engine = create_engine(f"sqlite:///{path}", connect_args={"timeout": busy_timeout_s})

    @event.listens_for(engine, "connect")
    def _no_implicit_tx(dbapi_conn: Any, _rec: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves

    @event.listens_for(engine, "begin")
    def _begin_immediate(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")  # the write lock: one migrator at a time

    try:
        with engine.begin() as conn:
            command.upgrade(_alembic_config(conn), "head")
    finally:
        engine.dispose()
    return before


def migrate_postgres(conninfo: str) -> str | None:
    """Upgrade the PostgreSQL store to :data:`HEAD`; returns the revision it was at.
    psycopg.Error on failure."""
    import psycopg

    with psycopg.connect(conninfo, autocommit=True) as probe:
        before = revision_of(probe)
    _check_not_newer(before, "(PostgreSQL)")
    if before == HEAD:
        return before
    _alembic_config(None)  # a clear error without alembic
    from alembic import command
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    engine = create_engine("postgresql+psycopg://", poolclass=NullPool,
                           creator=lambda: psycopg.connect(conninfo))
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_LOCK_KEY})")
            command.upgrade(_alembic_config(conn), "head")
    finally:
        engine.dispose()
    return before


def migrate(db: str | Path) -> str | None:
    """Upgrade the store named like :func:`~toma_edge.host.fleet.store.open_store` takes it."""
    from .sql import split_db

    kind, target = split_db(db)
    return migrate_postgres(target) if kind == "postgresql" else migrate_sqlite(target)
