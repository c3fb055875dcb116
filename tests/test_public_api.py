"""The public surface, pinned: a rename or a new export is a visible decision.

Each exported name is pinned with what it is (a function, a class, an exception, a str),
and it stays that after every submodule of its package was imported: a submodule that
shares its name with an exported function would replace the function on the package
(``import toma_edge.host.build`` sets ``toma_edge.host.build`` to the module).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from types import ModuleType

import pytest

import toma_edge

CORE = {
    "__version__": "str",
    "TomaEdgeError": "exception", "ConfigError": "exception", "BundleError": "exception",
    "BudgetError": "exception", "InputError": "exception", "TelemetryError": "exception",
    "MemoryBudget": "class", "parse_size": "function", "format_size": "function",
    "TargetProfile": "class", "load_profile": "function", "list_profiles": "function",
    "plan_checkpointing": "function", "CheckpointPlan": "class",
}
DEVICE = {
    "load_bundle": "function", "LoadedBundle": "class", "Predictor": "class",
    "Prediction": "class", "run": "function", "RunSummary": "class",
    "TelemetryAgent": "class", "Spool": "class", "serve": "function",
    "ServiceConfig": "class", "load_program": "function",
}
HOST = {
    "build": "function", "BuildResult": "class", "compress": "function",
    "CompressResult": "class", "compress_saved": "function", "package": "function", "prune_structured": "function",
    "train_model": "function",
    "TrainSpec": "class", "MemoryPolicy": "class", "export_program": "function",
    "Collector": "class", "FleetStore": "class",
}
CLI = {"main": "command"}
PACKAGES = [("toma_edge", CORE), ("toma_edge.device", DEVICE), ("toma_edge.host", HOST),
            ("toma_edge.cli", CLI)]


def kind(obj: object) -> str:
    """What a public name is, in the words of the tables above."""
    import click

    if isinstance(obj, click.Command):
        return "command"
    if isinstance(obj, ModuleType):
        return "module"
    if inspect.isclass(obj):
        return "exception" if issubclass(obj, BaseException) else "class"
    if inspect.isfunction(obj) or inspect.isbuiltin(obj):
        return "function"
    return type(obj).__name__


def _check(mod: ModuleType, names: dict[str, str]) -> None:
    for n, want in names.items():
        obj = getattr(mod, n)
        assert kind(obj) == want, f"{mod.__name__}.{n} is a {kind(obj)}, not a {want}"
        if want in ("function", "class", "exception"):
            assert obj.__name__ == n, f"{mod.__name__}.{n} is {obj!r}"
        if want == "command":
            assert obj.name == n, f"{mod.__name__}.{n} is {obj!r}"


@pytest.mark.parametrize(("module", "names"), PACKAGES)
def test_all_is_pinned_and_each_name_is_what_it_claims(module: str,
                                                        names: dict[str, str]) -> None:
    mod = importlib.import_module(module)
    assert sorted(mod.__all__) == sorted(names)
    _check(mod, names)


@pytest.mark.parametrize(("module", "names"), PACKAGES)
def test_no_submodule_shares_a_name_with_an_export(module: str, names: dict[str, str]) -> None:
    mod = importlib.import_module(module)
    subs = {m.name for m in pkgutil.iter_modules(mod.__path__)}
    clash = sorted(subs & {n for n, k in names.items() if k != "module"})
    assert not clash, f"{module}: submodules named like exported names: {clash}"
    for sub in sorted(subs - {"__main__"}):  # importing them all changes nothing
        importlib.import_module(f"{module}.{sub}")
    _check(mod, names)


def test_errors_share_one_root() -> None:
    for name in ("ConfigError", "BundleError", "BudgetError", "InputError", "TelemetryError"):
        assert issubclass(getattr(toma_edge, name), toma_edge.TomaEdgeError)
