"""Shared pytest fixtures: bundles built once per session, a real mosquitto broker."""

from __future__ import annotations

import os

# keep the suite's torch/XNNPACK work on this 2-core machine predictable
os.environ.setdefault("OMP_NUM_THREADS", "1")

# the real-mosquitto fixtures (mqtt_broker, broker_factory, mqtt_pki) of the telemetry tests
pytest_plugins = ["mqtt_fixtures"]


import shutil  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# property-based tests of hostile input: a bounded, reproducible run in the normal suite
# (derandomized: the same 40 examples per test on every machine, so a green suite stays
# green and a red one is red for a reason anyone can replay); `pytest
# --hypothesis-profile=long` is the random, deeper search that finds the next bug, whose
# example is then pinned with @example
_SLOW_OK = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
            HealthCheck.data_too_large]
settings.register_profile("default", max_examples=40, deadline=None,
                          suppress_health_check=_SLOW_OK, derandomize=True)
settings.register_profile("long", max_examples=2000, deadline=None,
                          suppress_health_check=_SLOW_OK)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

REPO = Path(__file__).resolve().parent.parent
DIGITS_PROJECT = REPO / "examples" / "digits" / "toma-edge.yaml"


# Developers running single test files over and over may set TOMA_EDGE_TEST_BUNDLE_CACHE to
# a folder: the session bundles are then built there once and reused by later runs. CI
# never sets it, so every CI run builds (and so tests) them afresh.
_CACHE = os.environ.get("TOMA_EDGE_TEST_BUNDLE_CACHE")


def _cached_build(tmp_path_factory: pytest.TempPathFactory, name: str, **kw):  # type: ignore[no-untyped-def]
    import pickle

    from toma_edge.host import build

    if not _CACHE:
        return build(out=tmp_path_factory.mktemp("bundles") / name, **kw)
    out = Path(_CACHE) / name
    done = Path(_CACHE) / f"{name}.result.pickle"
    if not done.is_file():
        result = build(out=out, **kw)
        try:
            done.write_bytes(pickle.dumps(result))
        except Exception:  # a result that can't be pickled: keep the folder only
            done.write_bytes(b"")
    data = done.read_bytes()
    if data:
        return pickle.loads(data)
    return None  # the folder is there; a test that needs the result object builds afresh


@pytest.fixture(scope="session")
def example_build(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """BuildResult of the built-in example built for rpi once per session (int8)."""
    from toma_edge.host import build

    result = _cached_build(tmp_path_factory, "rpi4", target="rpi")
    return result or build(target="rpi", out=tmp_path_factory.mktemp("bundles") / "rpi4")


@pytest.fixture(scope="session")
def example_bundle(request: pytest.FixtureRequest,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The built-in example's bundle folder. Don't modify it: copy it (``copy_bundle``)
    to tamper with."""
    if _CACHE:
        _cached_build(tmp_path_factory, "rpi4", target="rpi")
        yield Path(_CACHE) / "rpi4"
        return
    yield request.getfixturevalue("example_build").out


@pytest.fixture(scope="session")
def digits_bundle(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The README's digits classifier project built for rpi once per session."""
    if _CACHE:
        _cached_build(tmp_path_factory, "digits", target="rpi", project=DIGITS_PROJECT)
        yield Path(_CACHE) / "digits"
        return
    out = tmp_path_factory.mktemp("bundles") / "digits"
    from toma_edge.host import build

    build(target="rpi", project=DIGITS_PROJECT, out=out)
    yield out


@pytest.fixture
def copy_bundle(tmp_path: Path):  # type: ignore[no-untyped-def]
    """copy_bundle(src) -> a private copy of a bundle folder to modify."""

    def _copy(src: Path) -> Path:
        dst = tmp_path / f"copy-{src.name}"
        shutil.copytree(src, dst)
        return dst

    return _copy
