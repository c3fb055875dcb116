"""The public surface, pinned: a rename or a new export is a visible decision."""

from __future__ import annotations

import importlib

import pytest

import toma_edge

CORE = [
    "__version__", "TomaEdgeError", "ConfigError", "BundleError", "BudgetError", "InputError",
    "TelemetryError", "MemoryBudget", "parse_size", "format_size", "TargetProfile",
    "load_profile", "list_profiles", "plan_checkpointing", "CheckpointPlan",
]
DEVICE = [
    "load_bundle", "LoadedBundle", "Predictor", "Prediction", "run", "RunSummary",
    "TelemetryAgent", "Spool", "serve", "ServiceConfig", "load_program",
]
HOST = [
    "build", "BuildResult", "compress", "CompressResult", "prune_structured", "train_model",
    "TrainSpec", "MemoryPolicy", "export_program", "Collector", "FleetStore",
]


@pytest.mark.parametrize(
    ("module", "names"),
    [("toma_edge", CORE), ("toma_edge.device", DEVICE), ("toma_edge.host", HOST)],
)
def test_all_is_pinned_and_resolves(module: str, names: list[str]) -> None:
    mod = importlib.import_module(module)
    assert sorted(mod.__all__) == sorted(names)
    for n in names:
        assert getattr(mod, n) is not None, n


def test_errors_share_one_root() -> None:
    for name in ("ConfigError", "BundleError", "BudgetError", "InputError", "TelemetryError"):
        assert issubclass(getattr(toma_edge, name), toma_edge.TomaEdgeError)
