"""Alembic environment of the fleet store: runs on the connection that
:func:`toma_edge.host.fleet.schema.migrate` hands over (already in a transaction that
holds the migration lock), never on a URL of its own."""

from __future__ import annotations

from alembic import context

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=None, transactional_ddl=True)
with context.begin_transaction():
    context.run_migrations()
