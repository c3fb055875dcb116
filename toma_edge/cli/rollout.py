"""``toma-edge fleet deploy`` and the other rollout commands (issue 15; helper R2 fills this).

    from .fleet import db_option, fleet, open_db   # the group, --db and the store
    from .errors import handle_errors

    @fleet.command()
    @db_option
    @handle_errors
    def deploy(db: str) -> None: ...

Commands register themselves on the ``fleet`` group with ``@fleet.command()``;
:mod:`toma_edge.cli.commands` imports this module so that they do.
"""

from __future__ import annotations

__all__: list[str] = []
