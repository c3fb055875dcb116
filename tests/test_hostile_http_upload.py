"""POST /v1/model under hostile uploads, against one real `toma-edge serve` on a
`current` symlink (issue 12, classes 7 and 8): a bundle with another contract is a 409
that switches nothing unless the request says ?allow_contract_change=true; a 250 MB
upload is streamed to disk (the service's peak RSS barely moves); an archive of many
members is refused at once and leaves nothing behind."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from bundle_tools import with_version
from test_service_http import TOKEN, ServiceProc, offline

from toma_edge.bundle import make_archive

AUTH = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/gzip"}
ROW = [0.1, -0.2, 0.3, 0.4, -0.5, 0.6, 0.7, -0.8, 0.9, 1.0]


@pytest.fixture(scope="module")
def layout(example_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("upload-releases")
    (root / "releases").mkdir()
    with_version(example_bundle, root / "releases" / "v1", "v1")
    (root / "current").symlink_to(root / "releases" / "v1")
    (root / "token").write_text(TOKEN + "\n")
    (root / "token").chmod(0o600)
    return root


@pytest.fixture(scope="module")
def svc(layout: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProc]:
    log = tmp_path_factory.mktemp("upload-log") / "serve.log"
    s = ServiceProc(log, args=[str(layout / "current"), "--admin-token-file",
                               str(layout / "token"), "--threads", "1"])
    yield s
    assert s.stop() == 0, s.tail()
    assert "Traceback" not in s.tail(), s.tail()


def _peak_rss(svc: ServiceProc) -> int:
    """The service process's peak RSS so far (VmHWM, bytes)."""
    for line in Path(f"/proc/{svc.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def _error(body: bytes) -> str:
    obj = json.loads(body)
    assert set(obj) == {"error"} and "\n" not in obj["error"], obj
    return str(obj["error"])


def test_a_model_with_another_contract_is_a_409_and_nothing_switches(
        svc: ServiceProc, layout: Path, digits_bundle: Path, tmp_path: Path) -> None:
    before = svc.health()["model"]
    link_before = (layout / "current").resolve()
    digits = make_archive(with_version(digits_bundle, tmp_path / "d", "digits-v9"),
                          tmp_path / "digits.tar.gz")
    s, _, b = svc.request("POST", "/v1/model", digits.read_bytes(), AUTH)
    assert s == 409, b
    err = _error(b)
    assert "shape [64] instead of [10]" in err and "allow_contract_change=true" in err, err
    assert svc.health()["model"]["sha256"] == before["sha256"]
    assert (layout / "current").resolve() == link_before
    assert not (layout / "releases" / "digits-v9").exists()
    assert not [p.name for p in (layout / "releases").iterdir() if p.name.startswith(".")]
    assert svc.predict([ROW])[0] == 200

    # another version of the same contract (a renamed output) still goes through
    same = with_version(layout / "releases" / "v1", tmp_path / "v2", "v2-same")
    m = json.loads((same / "manifest.json").read_text())
    m["outputs"][0]["name"] = "renamed"
    (same / "manifest.json").write_text(json.dumps(m))
    s, _, b = svc.request("POST", "/v1/model",
                          make_archive(same, tmp_path / "v2.tar.gz").read_bytes(), AUTH)
    assert s == 200, b
    assert svc.health()["model"]["version"] == "v2-same"

    # a bad flag value is a 400; the explicit flag switches
    s, _, b = svc.request("POST", "/v1/model?allow_contract_change=maybe",
                          digits.read_bytes(), AUTH)
    assert s == 400 and "allow_contract_change" in _error(b)
    s, _, b = svc.request("POST", "/v1/model?allow_contract_change=true",
                          digits.read_bytes(), AUTH)
    assert s == 200, b
    assert json.loads(b)["model"]["input_shape"] == [-1, 64]
    assert (layout / "current").resolve() == layout / "releases" / "digits-v9"
    s, answer = svc.predict([[0.0] * 64])
    assert s == 200 and len(answer["classes"]) == 1
    # back to the 10-feature model for the module's other tests (explicitly, again)
    back = make_archive(with_version(layout / "releases" / "v1", tmp_path / "v3", "v3"),
                        tmp_path / "v3.tar.gz")
    s, _, b = svc.request("POST", "/v1/model", back.read_bytes(), AUTH)
    assert s == 409, b
    s, _, b = svc.request("POST", "/v1/model?allow_contract_change=1", back.read_bytes(), AUTH)
    assert s == 200, b


def test_a_250_mb_upload_is_streamed_to_disk_not_held_in_memory(
        svc: ServiceProc, example_bundle: Path) -> None:
    total = 250 * 1000 * 1000
    block = np.random.default_rng(0).bytes(1 << 20)

    def body() -> Iterator[bytes]:
        sent = 0
        while sent < total:
            chunk = block[:min(len(block), total - sent)]
            sent += len(chunk)
            yield chunk

    peak0 = _peak_rss(svc)
    t0 = time.monotonic()
    s, _, b = svc.request("POST", "/v1/model", body(),  # type: ignore[arg-type]
                          dict(AUTH, **{"Content-Length": str(total)}), timeout=120)
    took = time.monotonic() - t0
    peak1 = _peak_rss(svc)
    assert s == 422 and "archive" in _error(b), (s, b[:300])
    rise = peak1 - peak0
    print(f"250 MB upload: peak RSS {peak0 / 2**20:.1f} -> {peak1 / 2**20:.1f} MiB "
          f"(+{rise / 2**20:.1f} MiB) in {took:.1f} s")
    assert rise < 32 << 20, f"peak RSS rose {rise / 2**20:.1f} MiB for a 250 MB upload"
    assert peak1 < 512 << 20
    # over the cap: refused from Content-Length, before anything is read
    s, _, b = svc.request("POST", "/v1/model", b"x" * 10,
                          dict(AUTH, **{"Content-Length": str(10**12)}))
    assert s == 413 and "bytes" in _error(b)
    s, answer = svc.predict([ROW])
    assert s == 200
    np.testing.assert_allclose(answer["outputs"], offline(example_bundle, np.array([ROW])),
                               atol=1e-5, rtol=0)


def _many_empty_members(n: int) -> bytes:
    """A .tar.gz of ``n`` empty files, written from one ustar header template (tarfile
    takes ~20 s for 300,000 members)."""
    tmpl = bytearray(tarfile.TarInfo("x").tobuf(format=tarfile.USTAR_FORMAT))
    tmpl[0:100] = b"\0" * 100
    tmpl[148:156] = b" " * 8  # the checksum counts its own field as spaces
    base = sum(tmpl)
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=1) as gz:
        for start in range(0, n, 4096):
            parts = []
            for k in range(start, min(n, start + 4096)):
                name = b"f%d" % k
                h = bytearray(tmpl)
                h[0:len(name)] = name
                h[148:156] = b"%06o\0 " % (base + sum(name))
                parts.append(bytes(h))
            gz.write(b"".join(parts))
        gz.write(b"\0" * 1024)
    return out.getvalue()


def test_an_archive_of_many_members_is_refused_at_once_and_leaves_nothing(
        svc: ServiceProc, layout: Path) -> None:
    archive = _many_empty_members(300_000)  # 2.9 MB of .tar.gz
    before_tmp = set(Path(tempfile.gettempdir()).glob("toma-edge-upload-*"))
    sha = svc.health()["model"]["sha256"]
    t0 = time.monotonic()
    s, _, b = svc.request("POST", "/v1/model", archive, AUTH, timeout=300)
    took = time.monotonic() - t0
    assert s == 422, b
    assert "member" in _error(b).lower(), b
    assert took < 5, f"{took:.1f} s to refuse 300,000 members"
    assert svc.health()["model"]["sha256"] == sha
    assert set(Path(tempfile.gettempdir()).glob("toma-edge-upload-*")) <= before_tmp
    assert not [p.name for p in (layout / "releases").iterdir() if p.name.startswith(".")]
