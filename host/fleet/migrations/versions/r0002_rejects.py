"""Dead letters (``rejects``: raw payload and the reason, per message) and the indexes
of the status, report and retention queries.

Revision ID: 0002
Revises: 0001
Create Date: 2025-12-02
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_INDEXES = [
    # per device by time (fleet status' error window, report plots since a time)
    "CREATE INDEX telemetry_device_ts ON telemetry (fleet, device_id, ts)",
    # retention: prune(older_than_s) deletes by the collector's clock
    "CREATE INDEX telemetry_received_at ON telemetry (received_at)",
    "CREATE INDEX events_received_at ON events (received_at)",
    "CREATE INDEX rejects_received_at ON rejects (received_at)",
]


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute("""CREATE TABLE rejects (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            fleet TEXT NOT NULL, device_id TEXT NOT NULL, topic TEXT NOT NULL,
            payload BLOB NOT NULL, reason TEXT NOT NULL, received_at REAL NOT NULL)""")
    else:
        op.execute("""CREATE TABLE rejects (
            id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            fleet TEXT NOT NULL, device_id TEXT NOT NULL, topic TEXT NOT NULL,
            payload BYTEA NOT NULL, reason TEXT NOT NULL,
            received_at DOUBLE PRECISION NOT NULL)""")
    for stmt in _INDEXES:
        op.execute(stmt)


def downgrade() -> None:
    for name in ("rejects_received_at", "events_received_at", "telemetry_received_at",
                 "telemetry_device_ts"):
        op.execute(f"DROP INDEX {name}")
    op.execute("DROP TABLE rejects")
