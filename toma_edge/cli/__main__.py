"""``python -m toma_edge.cli ...``: the ``toma-edge`` command.

    python -m toma_edge.cli run dist/rpi4 -i rows.csv -o out.csv
"""

from __future__ import annotations

from .commands import main

if __name__ == "__main__":  # pragma: no cover
    main()
