"""Memory sizes and budgets.

    from toma_edge.budget import parse_size, format_size, MemoryBudget
    parse_size("1.5GiB")                     # 1610612736
    parse_size("25%", total_bytes=4 << 30)   # a quarter of 4 GiB
    MemoryBudget.parse("256MiB").working(baseline_bytes=200 << 20).bytes
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import BudgetError, ConfigError

__all__ = ["parse_size", "format_size", "MemoryBudget", "total_ram_bytes"]

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1 << 10,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1 << 20,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1 << 30,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1 << 40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")
_PCT_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*%\s*(?:of\s+ram|ram)?\s*$", re.IGNORECASE)


def total_ram_bytes() -> int:
    """Physical memory of this machine, in bytes."""
    import psutil

    return int(psutil.virtual_memory().total)


def parse_size(value: str | int | float, *, total_bytes: int | None = None) -> int:
    """Parse ``"512MiB"``, ``"1.5GiB"``, ``"300MB"``, ``1048576`` or ``"25%"`` into bytes.

    A percentage is a fraction of ``total_bytes`` (the target's RAM), or of this machine's
    RAM when ``total_bytes`` is None. Raises :class:`ConfigError` naming the bad value.
    """
    if isinstance(value, bool):
        raise ConfigError(f"size {value!r} is not a size; write it like 256MiB or 1.5GiB")
    if isinstance(value, int):
        n = value
    elif isinstance(value, float):
        n = int(value)
    else:
        text = str(value)
        m = _PCT_RE.match(text)
        if m:
            total = total_bytes if total_bytes is not None else total_ram_bytes()
            n = int(total * float(m.group(1)) / 100.0)
        else:
            m = _SIZE_RE.match(text)
            if not m or m.group(2).lower() not in _UNITS:
                raise ConfigError(
                    f"size {text!r} is not a size; write it like 256MiB, 1.5GiB, 300MB or 25%"
                )
            n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n <= 0:
        raise ConfigError(f"size {value!r} must be positive")
    return n


def format_size(n: int | float) -> str:
    """Format bytes for people: ``format_size(268435456) == '256.0 MiB'``."""
    sign = "-" if n < 0 else ""
    x = float(abs(n))
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if x < 1024 or unit == "TiB":
            return f"{sign}{x:.0f} {unit}" if unit == "B" else f"{sign}{x:.1f} {unit}"
        x /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class MemoryBudget:
    """A memory budget in bytes, with where it came from (for messages)."""

    bytes: int
    source: str = "given"

    def __post_init__(self) -> None:
        if self.bytes <= 0:
            raise ConfigError(f"memory budget must be positive, got {self.bytes} bytes")

    @classmethod
    def parse(
        cls, value: str | int, *, source: str = "given", total_bytes: int | None = None
    ) -> MemoryBudget:
        return cls(parse_size(value, total_bytes=total_bytes), source)

    def working(self, *, baseline_bytes: int) -> MemoryBudget:
        """What is left for work once the process baseline is paid; BudgetError if nothing."""
        left = self.bytes - baseline_bytes
        if left <= 0:
            raise BudgetError(
                f"baseline RSS {format_size(baseline_bytes)} already exceeds the "
                f"{format_size(self.bytes)} budget ({self.source}); raise the budget "
                f"to at least {format_size(baseline_bytes + (16 << 20))}"
            )
        return MemoryBudget(left, f"{self.source} less baseline")

    def __str__(self) -> str:
        return format_size(self.bytes)
