"""The schema as it landed (status, telemetry, events, rejected), before migrations.

Revision ID: 0001
Revises:
Create Date: 2025-12-02

On SQLite every statement is ``CREATE ... IF NOT EXISTS``: a fleet.db written by the
landed code (no ``alembic_version`` table) is adopted in place, its rows kept.
"""

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_SQLITE = [
    """CREATE TABLE IF NOT EXISTS status (
    fleet TEXT NOT NULL, device_id TEXT NOT NULL,
    online INTEGER, ts, model, model_version, model_sha256, target, budget_bytes, interval_s,
    agent,
    received_at REAL NOT NULL,
    PRIMARY KEY (fleet, device_id))""",
    """CREATE TABLE IF NOT EXISTS telemetry (
    fleet TEXT NOT NULL, device_id TEXT NOT NULL,
    seq, ts, window_s, requests, errors, rows, latency_p50_s, latency_p95_s, latency_p99_s,
    latency_max_s, throughput_rps, rows_per_s, batch_size, rss_bytes, peak_rss_bytes,
    budget_bytes, cpu_temp_c, model, model_version, model_sha256, spool_dropped,
    received_at REAL NOT NULL,
    PRIMARY KEY (fleet, device_id, seq)) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS events (
    fleet TEXT NOT NULL, device_id TEXT NOT NULL,
    seq INTEGER NOT NULL, ts REAL NOT NULL, kind TEXT NOT NULL, fields TEXT NOT NULL,
    received_at REAL NOT NULL,
    PRIMARY KEY (fleet, device_id, seq)) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS rejected (
    fleet TEXT NOT NULL, device_id TEXT NOT NULL,
    count INTEGER NOT NULL, last_error TEXT NOT NULL, last_at REAL NOT NULL,
    PRIMARY KEY (fleet, device_id))""",
]

_PG = [
    """CREATE TABLE status (
    fleet TEXT NOT NULL, device_id TEXT NOT NULL,
    online BOOLEAN, ts DOUBLE PRECISION, model TEXT, model_version TEXT, model_sha256 TEXT,
    target TEXT, budget_bytes BIGINT, interval_s DOUBLE PRECISION, agent TEXT,
    received_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (fleet, device_id))""",
    """CREATE TABLE telemetry (
    fleet TEXT NOT NULL, device_id TEXT NOT NULL,
    seq BIGINT NOT NULL, ts DOUBLE PRECISION NOT NULL, window_s DOUBLE PRECISION,
    requests BIGINT, errors BIGINT, rows BIGINT,
    latency_p50_s DOUBLE PRECISION, latency_p95_s DOUBLE PRECISION,
    latency_p99_s DOUBLE PRECISION, latency_max_s DOUBLE PRECISION,
    throughput_rps DOUBLE PRECISION, rows_per_s DOUBLE PRECISION, batch_size BIGINT,
    rss_bytes BIGINT, peak_rss_bytes BIGINT, budget_bytes BIGINT, cpu_temp_c DOUBLE PRECISION,
    model TEXT, model_version TEXT, model_sha256 TEXT, spool_dropped BIGINT,
    received_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (fleet, device_id, seq))""",
    """CREATE TABLE events (
    fleet TEXT NOT NULL, device_id TEXT NOT NULL,
    seq BIGINT NOT NULL, ts DOUBLE PRECISION NOT NULL, kind TEXT NOT NULL, fields TEXT NOT NULL,
    received_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (fleet, device_id, seq))""",
    """CREATE TABLE rejected (
    fleet TEXT NOT NULL, device_id TEXT NOT NULL,
    count BIGINT NOT NULL, last_error TEXT NOT NULL, last_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (fleet, device_id))""",
]


def upgrade() -> None:
    for stmt in _SQLITE if op.get_bind().dialect.name == "sqlite" else _PG:
        op.execute(stmt)


def downgrade() -> None:
    for table in ("rejected", "events", "telemetry", "status"):
        op.execute(f"DROP TABLE {table}")
