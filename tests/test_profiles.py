"""Target profiles: the shipped ones, aliases, validation errors, `toma-edge targets`."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from toma_edge import ConfigError, list_profiles, load_profile
from toma_edge.cli import main
from toma_edge.profiles import _all_profiles, profiles_dir

REQUIRED = {"rpi-zero-2w", "rpi3", "rpi4", "rpi5", "jetson-orin-nano", "generic-x86_64"}


def test_required_profiles_present_and_sane() -> None:
    profiles = {p.name: p for p in list_profiles()}
    assert REQUIRED <= set(profiles)
    assert profiles["rpi-zero-2w"].ram_bytes == 512 << 20
    for p in profiles.values():
        # the inference budget is the whole process's peak RSS: it must hold the baseline
        assert p.baseline_bytes() < p.memory_budget_bytes < p.ram_bytes
        assert p.storage_budget_bytes > 0 and p.threads <= p.cores
        if p.train_budget_bytes is not None:
            assert p.train_budget_bytes < p.ram_bytes
    assert profiles["jetson-orin-nano"].os.glibc >= "2.35"


def test_alias_resolves_to_canonical_name() -> None:
    assert load_profile("rpi").name == "rpi4"
    assert load_profile("rpi4").name == "rpi4"


def test_unknown_target_lists_known_ones() -> None:
    with pytest.raises(ConfigError) as e:
        load_profile("rpi9")
    msg = str(e.value)
    assert "unknown target 'rpi9'" in msg
    for name in REQUIRED:
        assert name in msg


@pytest.fixture
def profiles_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    d = tmp_path / "profiles"
    shutil.copytree(profiles_dir(), d)
    monkeypatch.setenv("TOMA_EDGE_PROFILES", str(d))
    _all_profiles.cache_clear()
    yield d
    _all_profiles.cache_clear()


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (("memory_budget_bytes: 512MiB", "memory_budget_bytes: lots"), "memory_budget_bytes"),
        (("cores: 4", "cores: -1"), "cores"),
        (("arch: aarch64", "arch: sparc"), "arch"),
        (("threads: 4\n", "threads: 4\ncolour: red\n"), "colour"),
    ],
)
def test_malformed_profile_names_file_and_field(profiles_copy: Path, edit: tuple[str, str], field: str) -> None:
    f = profiles_copy / "rpi4.yaml"
    f.write_text(f.read_text().replace(*edit))
    with pytest.raises(ConfigError) as e:
        load_profile("rpi4")
    assert "rpi4.yaml" in str(e.value) and field in str(e.value)


def test_broken_yaml_is_one_line_cli_error(profiles_copy: Path) -> None:
    (profiles_copy / "rpi4.yaml").write_text("name: [unclosed\n")
    r = CliRunner().invoke(main, ["targets"])
    assert r.exit_code == 2
    assert "rpi4.yaml" in r.output and "Traceback" not in r.output


def test_targets_command_prints_table() -> None:
    r = CliRunner().invoke(main, ["targets"])
    assert r.exit_code == 0, r.output
    for name in REQUIRED:
        assert name in r.output
    assert "512.0 MiB" in r.output  # rpi4's inference budget
