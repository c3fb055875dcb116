"""Sizes and the manifest format: parse, validate, round-trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from toma_edge import BundleError, ConfigError, MemoryBudget, format_size, parse_size
from toma_edge.bundle import Manifest, read_manifest


@pytest.mark.parametrize(
    ("text", "n"),
    [("256MiB", 256 << 20), ("1.5GiB", 3 << 29), ("300MB", 300_000_000), ("4096", 4096),
     (1024, 1024), ("512 KiB", 512 << 10), ("25%", 1 << 30)],
)
def test_parse_size(text: str | int, n: int) -> None:
    assert parse_size(text, total_bytes=4 << 30) == n


@pytest.mark.parametrize("bad", ["lots", "12 parsecs", "-5MiB", "0", ""])
def test_parse_size_rejects(bad: str) -> None:
    with pytest.raises(ConfigError, match="size"):
        parse_size(bad)


def test_working_budget_refuses_baseline_over_budget() -> None:
    from toma_edge import BudgetError

    b = MemoryBudget.parse("256MiB")
    assert b.working(baseline_bytes=200 << 20).bytes == 56 << 20
    with pytest.raises(BudgetError, match="baseline"):
        b.working(baseline_bytes=300 << 20)
    assert format_size(256 << 20) == "256.0 MiB"


def test_manifest_round_trip(example_bundle: Path) -> None:
    m = read_manifest(example_bundle / "manifest.json")
    again = Manifest.from_dict(json.loads(m.to_json()))
    assert again == m
    assert m.memory.peak_for_batch(1) == m.memory.measured_peak_bytes["1"]


def test_manifest_unknown_key_and_version(example_bundle: Path, tmp_path: Path) -> None:
    data = json.loads((example_bundle / "manifest.json").read_text())
    bad = dict(data, colour="red")
    with pytest.raises(BundleError, match="unknown key 'colour'"):
        Manifest.from_dict(bad)
    with pytest.raises(BundleError, match="schema_version 2 is not supported"):
        Manifest.from_dict(dict(data, schema_version=2))
    p = tmp_path / "manifest.json"
    p.write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        read_manifest(p)


def test_bundle_writer_commits_atomically_and_refuses_a_bad_manifest(
    example_bundle: Path, tmp_path: Path
) -> None:
    """The one writer: files hashed into the typed manifest, renamed into place whole; a
    manifest that breaks the format (or an error in the block) leaves ``out`` untouched."""
    from toma_edge.bundle import BundleWriter, verify_bundle

    m = read_manifest(example_bundle / "manifest.json")
    out = tmp_path / "b"
    with BundleWriter(out) as w:
        (w.path / "model.pte").write_bytes((example_bundle / "model.pte").read_bytes())
        written = w.commit(m.model_copy(update={"files": {}}), archive=True)
    vb = verify_bundle(out)
    assert set(vb.manifest.files) == {"model.pte"} and written.archive is not None
    assert vb.manifest.metrics == m.metrics and vb.manifest.candidates == m.candidates
    before = (out / "manifest.json").read_bytes()
    bad = m.model_copy(update={"max_batch": 0})  # model_copy skips validation; commit checks
    with pytest.raises(BundleError, match="max_batch"), BundleWriter(out) as w:
        (w.path / "model.pte").write_bytes(b"x")
        w.commit(bad)
    with pytest.raises(RuntimeError), BundleWriter(out) as w:
        (w.path / "model.pte").write_bytes(b"y")
        raise RuntimeError("build failed")
    assert (out / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "b.tar.gz"]  # no temp folders


def test_manifest_candidates_and_build_info_are_typed(example_bundle: Path) -> None:
    data = json.loads((example_bundle / "manifest.json").read_text())
    m = Manifest.from_dict(data)
    assert m.candidates and m.candidates[0].quantization == m.shipped
    assert m.build is not None and m.build.data.test_rows > 0
    data["candidates"][0]["surprise"] = 1
    with pytest.raises(BundleError, match="surprise"):
        Manifest.from_dict(data)
