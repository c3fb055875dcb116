"""Alembic migrations of the fleet store, for SQLite and PostgreSQL alike.

    from toma_edge.host.fleet.schema import migrate
    migrate("fleet.db")                                   # or "postgresql://u@h:5432/fleet"

Run by :func:`toma_edge.host.fleet.store.open_store` on every open (a no-op at head).
Each revision in ``versions/`` writes its SQL for both dialects; add one with
``alembic -c /dev/null -x ... revision`` or by copying the newest file and bumping
``revision``/``down_revision`` (and ``schema.HEAD``).
"""
