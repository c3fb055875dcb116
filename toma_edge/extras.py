"""What the ``[host]`` extra adds to the plain (device) install: one list for the CLI's
"needs the host install" message and for the device wheel folder's check."""

from __future__ import annotations

import re

__all__ = ["HOST_ONLY", "is_host_only_distribution"]

#: import name -> distribution name, for each package only the host install carries
HOST_ONLY = {
    "torch": "torch",
    "torchao": "torchao",
    "executorch": "executorch",
    "matplotlib": "matplotlib",
    "sklearn": "scikit-learn",
    "pandas": "pandas",
}


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503


_HOST_DISTS = {_normalize(d) for d in HOST_ONLY.values()}


def is_host_only_distribution(name: str) -> bool:
    """Whether distribution ``name`` (as in a wheel's file name) is host-only."""
    return _normalize(name) in _HOST_DISTS
