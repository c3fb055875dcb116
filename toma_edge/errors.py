"""One exception tree for everything toma-edge raises.

Every error derives from :class:`TomaEdgeError`; the CLI catches that root once, prints
its one-line message and exits with code 2 (the traceback goes to ``--debug`` only).

    try:
        profile = load_profile("rpi9")
    except TomaEdgeError as e:
        print(e)          # unknown target 'rpi9'; known targets: generic-x86_64, ...
"""

from __future__ import annotations

__all__ = [
    "TomaEdgeError",
    "ConfigError",
    "BundleError",
    "BudgetError",
    "InputError",
    "TelemetryError",
]


class TomaEdgeError(Exception):
    """Root of every error toma-edge raises on purpose; its message is one line."""


class ConfigError(TomaEdgeError):
    """A target profile, project file, option or size string is wrong."""


class BundleError(TomaEdgeError):
    """A bundle is missing, truncated, tampered, unsigned or of another version."""


class BudgetError(TomaEdgeError):
    """Work cannot fit the memory (or storage, latency) budget it was given."""


class InputError(TomaEdgeError):
    """Data given to a model or a loader is malformed (shape, dtype, non-finite, parse)."""


class TelemetryError(TomaEdgeError):
    """The telemetry agent or the fleet collector cannot do its job (broker, spool, store)."""
