"""`toma-edge serve` over HTTP, as a real process on a free loopback port: answers equal
the Predictor offline whatever shared their micro-batch, bad input gets a clear 4xx and
never stops the service, model updates (POST /v1/model, SIGHUP on a `current` symlink)
swap atomically or are refused while the old model serves, overload is an explicit 503,
SIGTERM answers what is in flight and exits 0."""

from __future__ import annotations

import functools
import hashlib
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bundle_tools import corrupt, with_version
from mqtt_fixtures import free_port

from toma_edge.bundle import make_archive

TOKEN = "s3cret-admin-token-0123456789abcdef"
REPO = Path(__file__).resolve().parents[1]


class ServiceProc:
    """One service process; ``args`` after ``toma-edge serve`` (or a ServiceConfig dict
    run through the Python API for knobs the CLI does not expose)."""

    def __init__(self, log: Path, *, args: list[str] | None = None,
                 config: dict[str, Any] | None = None, env: dict[str, str] | None = None,
                 port: int | None = None, python: str = sys.executable) -> None:
        self.port = port or free_port()
        self.log = log
        if config is not None:
            cfg = {"http": f"127.0.0.1:{self.port}", **config}
            code = ("import json, sys; from toma_edge.device.service import ServiceConfig, serve; "
                    "sys.exit(serve(ServiceConfig(**json.loads(sys.argv[1]))))")
            cmd = [python, "-c", code, json.dumps(cfg)]
        else:
            cmd = [python, "-m", "toma_edge.cli", "serve", *(args or []),
                   "--http", f"127.0.0.1:{self.port}"]
        self._out = open(log, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=self._out,
                                     env=env or dict(os.environ, OMP_NUM_THREADS="1"))
        deadline = time.monotonic() + 90
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited {self.proc.returncode}: {self.tail()}")
            try:
                if self.get("/readyz")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop(signal.SIGKILL)
                raise RuntimeError(f"service not ready in 90 s: {self.tail()}")
            time.sleep(0.1)

    def burst(self, bodies: list[bytes]) -> list[tuple[int, dict[str, str], bytes]]:
        """POST every body on its own connection, all connected first and written in one
        quick loop before any answer is read, so that they reach the server together (a
        pool of Python client threads no longer outpaces the service)."""
        socks = [socket.create_connection(("127.0.0.1", self.port), timeout=60) for _ in bodies]
        msgs = [(f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                 f"application/json\r\nContent-Length: {len(b)}\r\n\r\n").encode() + b
                for b in bodies]
        for so, m in zip(socks, msgs, strict=True):
            so.sendall(m)
        out = []
        for so in socks:
            r = http.client.HTTPResponse(so)
            r.begin()
            out.append((r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()))
            so.close()
        return out

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None, timeout: float = 30) -> tuple[int, dict[str, str], bytes]:
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            c.request(method, path, body=body, headers=headers or {})
            r = c.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            c.close()

    def get(self, path: str) -> tuple[int, bytes]:
        s, _, b = self.request("GET", path, timeout=5)
        return s, b

    def predict(self, rows: Any) -> tuple[int, dict[str, Any]]:
        s, _, b = self.request("POST", "/v1/predict", json.dumps({"inputs": rows}).encode(),
                               {"Content-Type": "application/json"})
        return s, json.loads(b)

    def health(self) -> dict[str, Any]:
        return json.loads(self.get("/healthz")[1])  # type: ignore[no-any-return]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()
        return int(self.proc.returncode)


@functools.lru_cache(maxsize=4)
def _predictor(bundle: Path) -> Any:
    from toma_edge.device.predictor import Predictor

    # this test process holds the build stack: its baseline is not the device's
    return Predictor(bundle, threads=1, budget="16GiB")


def offline(bundle: Path, rows: np.ndarray) -> np.ndarray:
    """What the Predictor answers for these rows alone, in this process."""
    return _predictor(bundle).predict(rows).outputs  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def releases(example_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """/var/lib/toma-edge-like layout: releases/<version> and a `current` symlink."""
    root = tmp_path_factory.mktemp("svc-releases")
    (root / "releases").mkdir()
    with_version(example_bundle, root / "releases" / "v1", "v1")
    (root / "current").symlink_to(root / "releases" / "v1")
    (root / "token").write_text(TOKEN + "\n")
    (root / "token").chmod(0o600)
    return root


@pytest.fixture(scope="module")
def svc(releases: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProc]:
    log = tmp_path_factory.mktemp("svc-log") / "serve.log"
    s = ServiceProc(log, args=[str(releases / "current"), "--admin-token-file",
                               str(releases / "token"), "--threads", "1"])
    yield s
    assert s.stop() == 0, s.tail()


def test_answers_equal_offline_whatever_shared_the_batch(svc: ServiceProc, releases: Path) -> None:
    rng = np.random.default_rng(0)
    reqs = [rng.normal(size=(int(rng.integers(1, 6)), 10)).astype(np.float32) for _ in range(240)]
    want = [offline(releases / "releases" / "v1", r) for r in reqs]

    before = _metric(svc, "toma_edge_batches_total")
    got = []
    for k in range(0, len(reqs), 32):  # waves of 32 concurrent requests
        got += [(code, json.loads(body)) for code, _, body in svc.burst(
            [json.dumps({"inputs": r.tolist()}).encode() for r in reqs[k:k + 32]])]
    batches = _metric(svc, "toma_edge_batches_total") - before
    for (status, body), w in zip(got, want, strict=True):
        assert status == 200, body
        np.testing.assert_allclose(np.array(body["outputs"]), w, atol=1e-5, rtol=0)
    # concurrent requests really shared model calls
    assert batches < len(reqs), f"{batches} model calls for {len(reqs)} requests: no batching"


def _metric(svc: ServiceProc, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``, parsed with
    prometheus_client's own parser (label order is not ours to pin)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = svc.get("/metrics")[1].decode()
    return sum(sample.value for fam in text_string_to_metric_families(text)
               for sample in fam.samples
               if sample.name == name and labels.items() <= sample.labels.items())


def test_bad_requests_get_a_clear_4xx_and_serving_goes_on(svc: ServiceProc) -> None:
    row = [0.5] * 10
    cases = [
        (b'{"inputs": [[1, 2', "application/json", 400, "malformed JSON"),
        (b'[1, 2]', "application/json", 400, '{"inputs"'),
        (json.dumps({"inputs": [[1.0, 2.0]]}).encode(), "application/json", 422, "shape [10]"),
        (b'{"inputs": [[1,2,3,4,5,6,7,8,9,NaN]]}', "application/json", 400, "invalid JSON"),
        (b'{"inputs": [[1,2,3,4,5,6,7,8,9,1e39]]}', "application/json", 422, "non-finite"),
        (json.dumps({"inputs": [["x"] * 10]}).encode(), "application/json", 422, "numbers"),
        (json.dumps({"inputs": [row], "extra": 1}).encode(), "application/json", 400, "unknown key"),
        (b"a,b\n1,2\n", "text/csv", 415, "Content-Type"),
        (b"\x93NUMPY garbage", "application/x-npy", 400, ".npy"),
        (b'{"inputs": [' + b"[0,0,0,0,0,0,0,0,0,0]," * 300_000 + b"[0,0,0,0,0,0,0,0,0,0]]}",
         "application/json", 413, "bytes"),
    ]
    for body, ctype, status, text in cases:
        s, _, b = svc.request("POST", "/v1/predict", body, {"Content-Type": ctype})
        assert s == status, (ctype, body[:40], s, b[:200])
        err = json.loads(b)["error"]
        assert text in err and "\n" not in err
    # still serving, and .npy in and out works
    buf = io.BytesIO()
    np.save(buf, np.full((3, 10), 0.5, np.float32))
    s, h, b = svc.request("POST", "/v1/predict", buf.getvalue(),
                          {"Content-Type": "application/x-npy", "Accept": "application/x-npy"})
    assert s == 200 and h["content-type"] == "application/x-npy"
    out = np.load(io.BytesIO(b))
    s2, answer = svc.predict([row])
    assert s2 == 200 and out.shape == (3, 1)
    np.testing.assert_allclose(out[0], answer["outputs"][0], atol=1e-6)
    assert _metric(svc, "toma_edge_requests_total", transport="http", code="422") >= 3


def test_healthz_names_the_model_readyz_and_metrics(svc: ServiceProc, releases: Path) -> None:
    h = svc.health()
    cur = releases / "current"
    assert h["status"] == "ok"
    assert h["model"]["name"] == "seed-regression"
    assert h["model"]["version"] == json.loads((cur / "manifest.json").read_text())["version"]
    assert h["model"]["sha256"] == hashlib.sha256((cur / "manifest.json").read_bytes()).hexdigest()
    assert svc.get("/readyz")[0] == 200
    text = svc.get("/metrics")[1].decode()
    for name in ("toma_edge_requests_total", "toma_edge_request_latency_seconds_bucket",
                 "toma_edge_peak_rss_bytes", "toma_edge_budget_bytes", "toma_edge_model_info"):
        assert f"\n{name}" in text, name
    assert f'sha256="{h["model"]["sha256"]}"' in text


def _load(svc: ServiceProc, stop: threading.Event, statuses: list[int]) -> None:
    row = [[0.25] * 10]
    while not stop.is_set():
        statuses.append(svc.predict(row)[0])


def test_model_update_over_http_swaps_without_a_failed_request(
        svc: ServiceProc, releases: Path, tmp_path: Path) -> None:
    v2 = with_version(releases / "releases" / "v1", tmp_path / "v2", "v2-http")
    good = make_archive(v2, tmp_path / "v2.tar.gz")
    bad = make_archive(corrupt(v2, tmp_path / "bad"), tmp_path / "bad.tar.gz")
    before = svc.health()["model"]

    # no token, wrong token: 401 and nothing changes
    assert svc.request("POST", "/v1/model", good.read_bytes())[0] == 401
    s, h, _ = svc.request("POST", "/v1/model", good.read_bytes(),
                          {"Authorization": "Bearer wrong-token-wrong-token"})
    assert s == 401 and h["www-authenticate"] == "Bearer"

    stop = threading.Event()
    statuses: list[int] = []
    workers = [threading.Thread(target=_load, args=(svc, stop, statuses)) for _ in range(4)]
    for w in workers:
        w.start()
    try:
        time.sleep(0.3)
        auth = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/gzip"}
        s, _, b = svc.request("POST", "/v1/model", bad.read_bytes(), auth)
        assert s == 422 and "sha256" in json.loads(b)["error"], b
        assert svc.health()["model"]["sha256"] == before["sha256"]
        s, _, b = svc.request("POST", "/v1/model", b"not a tarball at all", auth)
        assert s == 422 and "archive" in json.loads(b)["error"]
        s, _, b = svc.request("POST", "/v1/model", good.read_bytes(), auth)
        assert s == 200, b
        assert json.loads(b)["model"]["version"] == "v2-http"
        # served from `current`: the upload became a release and `current` points at it,
        # so a restart serves the same model
        kept = Path(json.loads(b)["persisted"])
        assert kept.parent == releases / "releases" and kept.name == "v2-http"
        assert (releases / "current").resolve() == kept.resolve()
        assert (kept / "manifest.json").read_bytes() == (v2 / "manifest.json").read_bytes()
        time.sleep(0.3)
    finally:
        stop.set()
        for w in workers:
            w.join()
    assert len(statuses) > 20 and set(statuses) == {200}, sorted(set(statuses))
    h = svc.health()["model"]
    assert h["version"] == "v2-http"
    assert h["sha256"] == hashlib.sha256((v2 / "manifest.json").read_bytes()).hexdigest()
    assert _metric(svc, "toma_edge_model_updates_total", result="refused") == 2


def test_sighup_reloads_the_current_symlink_and_refuses_a_bad_release(
        svc: ServiceProc, releases: Path) -> None:
    rel = releases / "releases"
    with_version(rel / "v1", rel / "v3", "v3")
    corrupt(rel / "v1", rel / "v4-bad")
    tmp = releases / "current.new"
    tmp.symlink_to(rel / "v3")
    tmp.replace(releases / "current")  # atomic switch
    svc.proc.send_signal(signal.SIGHUP)
    _wait(lambda: svc.health()["model"]["version"] == "v3", "v3 to serve after SIGHUP")
    tmp.symlink_to(rel / "v4-bad")
    tmp.replace(releases / "current")
    svc.proc.send_signal(signal.SIGHUP)
    _wait(lambda: "SIGHUP: kept seed-regression v3" in svc.tail(), "the bad release refused")
    assert svc.health()["model"]["version"] == "v3"
    assert svc.predict([[0.1] * 10])[0] == 200
    # leave `current` good for the fixture's other users
    tmp.symlink_to(rel / "v3")
    tmp.replace(releases / "current")


def _wait(pred: Any, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_overload_is_an_explicit_503_and_sigterm_answers_in_flight(
        example_bundle: Path, tmp_path: Path) -> None:
    s = ServiceProc(tmp_path / "serve.log", config={
        "bundle": str(example_bundle), "threads": 1, "max_queue_rows": 8, "window_s": 0.02,
        "max_batch_rows": 4})
    try:
        # 8-row requests against an 8-row queue: one request fills it, so requests decoded
        # in the same loop iteration as a queued one are refused (batches now run one per
        # loop iteration and drain a backlog quickly; 2-row requests rarely filled it)
        rows = [[0.1] * 10] * 8

        def one(_: int) -> tuple[int, dict[str, str], bytes]:
            return s.request("POST", "/v1/predict", json.dumps({"inputs": rows}).encode(),
                             {"Content-Type": "application/json"})

        got = [g for _ in range(4) for g in s.burst([json.dumps({"inputs": rows}).encode()] * 48)]
        codes = [g[0] for g in got]
        # whether a burst overflows the queue depends on the loop's timing (on an idle
        # machine each request is often served within its own loop iteration); the refusal
        # itself is pinned in test_a_full_queue_refuses_at_once below
        assert set(codes) <= {200, 503} and 200 in codes, set(codes)
        for code, headers, body in got:
            if code == 503:
                assert headers["retry-after"] == "1" and "overloaded" in json.loads(body)["error"]
            else:
                assert len(json.loads(body)["outputs"]) == 8

        # SIGTERM while requests are in flight: each gets an answer, exit code 0
        results: list[int] = []

        def client() -> None:
            for _ in range(200):
                try:
                    results.append(one(0)[0])
                except OSError:
                    return  # listener closed: refused before it was accepted

        ts = [threading.Thread(target=client) for _ in range(8)]
        for t in ts:
            t.start()
        time.sleep(0.5)
        s.proc.send_signal(signal.SIGTERM)
        for t in ts:
            t.join(60)
        rc = s.stop()
    finally:
        s.stop(signal.SIGKILL)
    assert rc == 0, s.tail()
    assert results and set(results) <= {200, 503}, set(results)
    assert "stopped (every request answered)" in s.tail()


def test_a_full_queue_refuses_at_once(example_bundle: Path) -> None:
    """Requests decoded while the queue holds its bound are refused (Overloaded: 503 with
    Retry-After over HTTP), those queued are answered, and the queue empties."""
    import asyncio

    import numpy as np

    from toma_edge.device.service.batcher import MicroBatcher, Overloaded
    from toma_edge.device.service.models import ModelHolder

    # this pytest process carries torch and the export stack: a budget above its baseline
    # threads=1 like every in-process predictor of the suite: resizing XNNPACK's shared
    # pool while another program holds it can hang that program's next run
    holder = ModelHolder.open(example_bundle, budget="16GiB", threads=1)
    b = MicroBatcher(holder, max_queue_rows=8, max_batch_rows=4)
    rows = np.full((8, 10), 0.1, dtype=np.float32)
    answers: list[Any] = []

    async def scenario() -> int:
        b.start(asyncio.get_running_loop())
        b.submit(rows, lambda pred, err: answers.append(err or pred))  # fills the queue
        refused = 0
        for _ in range(3):  # decoded in the same loop iteration: no room
            try:
                b.submit(rows, lambda pred, err: answers.append(err or pred))
            except Overloaded as e:
                assert e.retry_after_s == 1 and "overloaded" in str(e)
                refused += 1
        for _ in range(100):
            if answers:
                break
            await asyncio.sleep(0.01)
        return refused

    assert asyncio.run(scenario()) == 3
    assert b.overloaded == 3 and b.queued_rows == 0
    assert len(answers) == 1 and answers[0].outputs.shape == (8, 1)
    want = holder.current.predictor.predict(rows).outputs
    assert np.allclose(answers[0].outputs, want, atol=1e-6)


def test_serve_refuses_bad_starts_in_one_line(example_bundle: Path, copy_bundle: Any,
                                             tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    pub = tmp_path / "k.pub"
    pub.write_bytes(Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    short = tmp_path / "short-token"
    short.write_text("abc\n")
    cases = [
        (["/nonexistent/bundle"], "no such bundle"),
        ([str(example_bundle), "--trust-key", str(pub)], "unsigned"),
        ([str(example_bundle), "--http", "localhost"], "HOST:PORT"),
        ([str(example_bundle), "--admin-token-file", str(short)], "at least 16"),
        ([str(example_bundle), "--fleet", "a/b"], "fleet"),
        ([str(example_bundle), "--budget", "16MiB"], "budget"),  # under any adapter's baseline
    ]
    for args, text in cases:
        p = subprocess.run([sys.executable, "-m", "toma_edge.cli", "serve", *args],
                           capture_output=True, text=True, timeout=120)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2, (args, p.stderr[-2000:])
        assert len(lines) >= 1 and text in lines[-1] and "Traceback" not in p.stderr, (args, p.stderr)
