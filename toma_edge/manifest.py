"""Moved to :mod:`toma_edge.bundle.manifest` (import from ``toma_edge.bundle``); this
name stays until every importer has moved.

    from toma_edge.bundle import Manifest, read_manifest
"""

from .bundle.manifest import *  # noqa: F403
from .bundle.manifest import __all__ as __all__
