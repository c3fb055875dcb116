"""Fleet rollouts (issue 15): ``rollouts`` (one row per ``fleet deploy``: its parameters,
state and the controller that owns it) and ``rollout_devices`` (one row per targeted
device: its wave, state and what it reported), so a controller killed mid-rollout resumes
with ``fleet rollout ID --resume`` and does nothing twice.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    real = "REAL" if op.get_bind().dialect.name == "sqlite" else "DOUBLE PRECISION"
    big = "INTEGER" if op.get_bind().dialect.name == "sqlite" else "BIGINT"
    op.execute(f"""CREATE TABLE rollouts (
        id TEXT PRIMARY KEY,
        fleet TEXT NOT NULL,
        state TEXT NOT NULL,
        reason TEXT NOT NULL DEFAULT '',
        release_name TEXT NOT NULL, release_version TEXT NOT NULL,
        bundle_sha256 TEXT NOT NULL, bundle_bytes {big} NOT NULL,
        bundle_path TEXT NOT NULL,
        params TEXT NOT NULL,
        job TEXT NOT NULL,
        wave INTEGER NOT NULL DEFAULT 0,
        created_at {real} NOT NULL, updated_at {real} NOT NULL, deadline {real} NOT NULL,
        finished_at {real},
        owner TEXT NOT NULL DEFAULT '', heartbeat {real})""")
    op.execute(f"""CREATE TABLE rollout_devices (
        rollout_id TEXT NOT NULL REFERENCES rollouts (id) ON DELETE CASCADE,
        device_id TEXT NOT NULL,
        wave INTEGER NOT NULL,
        state TEXT NOT NULL,
        reason TEXT NOT NULL DEFAULT '',
        detail TEXT NOT NULL DEFAULT '{{}}',
        sent_at {real}, updated_at {real} NOT NULL,
        rollback_sent_at {real},
        cleared INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (rollout_id, device_id))""")
    op.execute("CREATE INDEX rollouts_fleet_created ON rollouts (fleet, created_at)")
    # the controller's poll: this fleet's rollout.* events received since its last look
    op.execute("CREATE INDEX events_kind_received ON events (fleet, kind, received_at)")


def downgrade() -> None:
    op.execute("DROP INDEX events_kind_received")
    op.execute("DROP INDEX rollouts_fleet_created")
    op.execute("DROP TABLE rollout_devices")
    op.execute("DROP TABLE rollouts")
