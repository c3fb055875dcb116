"""The ``toma-edge`` command line: thin, each command parses, calls one library function,
formats.

    toma-edge targets                                # the device profiles
    toma-edge build --target rpi --out dist/rpi4     # train, compress, export, verify
    toma-edge run dist/rpi4 -i rows.csv -o out.csv   # streamed batch inference
    python -m toma_edge.cli serve dist/rpi4          # the same entry point

``commands`` holds the root group and the model commands, ``fleet`` the ``toma-edge fleet``
group, ``errors`` how every command fails (one line, exit 2), ``progress`` the rich
reporter that build, compress and run draw their progress with. Host and device modules are
imported inside commands, so ``toma-edge run`` never loads the training stack.
"""

from __future__ import annotations

from .commands import main

__all__ = ["main"]
