"""toma-edge: put a PyTorch model on small Linux devices within their memory budget.

    import toma_edge
    profile = toma_edge.load_profile("rpi")          # the Raspberry Pi 4 profile
    toma_edge.parse_size("1.5GiB")                   # 1610612736
    toma_edge.MemoryBudget.parse("256MiB")

The host SDK lives in ``toma_edge.host`` (training, compression, export, fleet
collector), the device runtime in ``toma_edge.device``, the command line in
``toma_edge.cli``. This core imports neither host nor device, and no torch at import time:
docs/architecture.md has the layers and the import rule (``scripts/import_graph.py``
checks it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_getattr
from .budget import MemoryBudget, format_size, parse_size
from .errors import (
    BudgetError,
    BundleError,
    ConfigError,
    InputError,
    TelemetryError,
    TomaEdgeError,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "TomaEdgeError",
    "ConfigError",
    "BundleError",
    "BudgetError",
    "InputError",
    "TelemetryError",
    "MemoryBudget",
    "parse_size",
    "format_size",
    "TargetProfile",
    "load_profile",
    "list_profiles",
    "plan_checkpointing",
    "CheckpointPlan",
]

if TYPE_CHECKING:
    from .checkpoint_plan import CheckpointPlan, plan_checkpointing
    from .profiles import TargetProfile, list_profiles, load_profile

# public names loaded on first attribute access: those whose modules import torch, and
# the profiles (pydantic and YAML), which a device's `toma-edge run` never needs
_LAZY = {
    "plan_checkpointing": "checkpoint_plan",
    "CheckpointPlan": "checkpoint_plan",
    "TargetProfile": "profiles",
    "load_profile": "profiles",
    "list_profiles": "profiles",
}


__getattr__ = lazy_getattr(__name__, _LAZY)
