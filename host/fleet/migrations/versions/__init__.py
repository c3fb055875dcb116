"""Alembic revisions of the fleet store (one file per schema change, oldest first)."""
