"""The device's side of a fleet rollout (issue 15) on a real mosquitto with the shipped ACL
and real `toma-edge serve` processes: jobs published by the `deployer` identity (retained
job + chunks, toma_edge.rollout_protocol.publish_job), events read from the device's events
topic. A good bundle swaps with requests flowing and none failing; a misfit, a contract
change, an unsigned bundle under --trust-key and a tampered chunk are refused with one
line (and the figures); a 20x slower bundle is rolled back by the device itself within the
health window; a device SIGKILLed mid-download resumes; a crash loop after a swap returns
to the previous release; a job seen again is never run twice."""

from __future__ import annotations

import hashlib
import json
import os
import queue
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from bundle_tools import with_version
from hypothesis import given
from hypothesis import strategies as st
from mqtt_fixtures import Broker, wait_until
from test_service_http import ServiceProc

from toma_edge import rollout_protocol as rp
from toma_edge.bundle import make_archive, sign_manifest
from toma_edge.errors import InputError, TelemetryError
from toma_edge.telemetry import make_client

FLEET = "test"


class Events:
    """The rollout events of one device, read as the `collector` user."""

    def __init__(self, broker: Broker, device_id: str) -> None:
        self.got: queue.Queue[dict[str, Any]] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        self.c = make_client(broker.settings("collector"), client_id="collector")
        self.c.on_message = lambda cl, ud, msg: (
            self.got.put(json.loads(msg.payload)) if msg.topic.endswith("/events") else None)
        self.c.connect(broker.settings("collector").url.host, broker.port)
        # telemetry too, like a collector: the agent holds messages nobody subscribed to
        for kind in ("events", "telemetry"):
            self.c.subscribe(f"toma-edge/v1/{FLEET}/{device_id}/{kind}", qos=1)
        self.c.loop_start()

    def wait(self, kind: str, timeout_s: float = 60.0, rollout_id: str | None = None
             ) -> dict[str, Any]:
        """The fields of the first ``kind`` event (rollout.* ones are kept in ``seen``)."""
        for e in self.seen:
            if e["kind"] == kind and (rollout_id is None
                                      or e["fields"].get("rollout_id") == rollout_id):
                return dict(e["fields"])
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {kind} event in {timeout_s} s; saw "
                                     f"{[(e['kind'], e['fields']) for e in self.seen]}")
            try:
                e = self.got.get(timeout=left)
            except queue.Empty:
                continue
            if e["kind"].startswith("rollout."):
                self.seen.append(e)
                if e["kind"] == kind and (rollout_id is None
                                          or e["fields"].get("rollout_id") == rollout_id):
                    return dict(e["fields"])

    def kinds(self) -> list[str]:
        while True:
            try:
                e = self.got.get_nowait()
            except queue.Empty:
                break
            if e["kind"].startswith("rollout."):
                self.seen.append(e)
        return [e["kind"] for e in self.seen]

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


class Deployer:
    """The `deployer` identity's connection (the only one allowed to write jobs)."""

    def __init__(self, broker: Broker) -> None:
        s = broker.settings("deployer")
        self.c = make_client(s, client_id="deployer")
        self.c.connect(s.url.host, broker.port)
        self.c.loop_start()
        wait_until(self.c.is_connected, 10, "the deployer to connect")

    def install(self, device_id: str, rollout_id: str, archive: Path, *, version: str,
                publish_chunks: bool = True, **job: Any) -> rp.ArchiveChunks:
        parts = rp.chunk_archive(archive, 4096)
        doc = rp.JobDocument(rollout_id=rollout_id, action="install", bundle=parts.bundle,
                             release={"name": "m", "version": version},
                             deadline=time.time() + 600, **job)
        rp.publish_job(self.c, FLEET, device_id, doc, parts if publish_chunks else None)
        return parts

    def install_url(self, device_id: str, rollout_id: str, archive: Path, url: str, *,
                    version: str, **job: Any) -> None:
        data = archive.read_bytes()
        ref = rp.BundleRef(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data), chunks=0,
                           url=url)
        doc = rp.JobDocument(rollout_id=rollout_id, action="install", bundle=ref,
                             release={"name": "m", "version": version},
                             deadline=time.time() + 600, **job)
        rp.publish_job(self.c, FLEET, device_id, doc)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def http_folder(folder: Path) -> tuple[str, Any]:
    """Serve ``folder`` over HTTP on a free loopback port: (base URL, server)."""
    import functools
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *a: Any) -> None:
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0),
                              functools.partial(Quiet, directory=str(folder)))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{srv.server_address[1]}", srv


class Device:
    """A `toma-edge serve --mqtt` process on a `current` symlink into releases/."""

    def __init__(self, broker: Broker, tmp: Path, device_id: str, first: Path,
                 extra: list[str] | None = None) -> None:
        self.state = tmp / "state"
        rel = self.state / "releases"
        if not rel.exists():
            rel.mkdir(parents=True)
            if (first / "manifest.sig").exists():  # signed as v1 already
                shutil.copytree(first, rel / "v1")
            else:
                with_version(first, rel / "v1", "v1")
            (self.state / "current").symlink_to("releases/v1")
        self.broker, self.tmp, self.device_id = broker, tmp, device_id
        self.extra = extra or []
        self.proc: ServiceProc | None = None

    def start(self) -> Device:
        env = self.broker.env(self.device_id)
        env["OMP_NUM_THREADS"] = "1"
        self.proc = ServiceProc(self.tmp / "serve.log", env=env, args=[
            str(self.state / "current"), "--mqtt", self.broker.url(self.device_id),
            "--fleet", FLEET, "--device-id", self.device_id, "--telemetry-interval", "1",
            "--spool", str(self.tmp / "spool.db"), "--threads", "1", *self.extra])
        wait_until(lambda: "taking inference requests" in self.proc.tail(), 30,  # type: ignore
                   "the device to subscribe")
        return self

    def serving(self) -> str:
        return str(self.proc.health()["model"]["version"])  # type: ignore[union-attr]

    def current(self) -> str:
        return os.readlink(self.state / "current")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None:
            self.proc.stop(sig)
            self.proc = None


class Load:
    """Requests sent over HTTP all along; every answer that is not 200 is counted."""

    def __init__(self, dev: Device) -> None:
        self.dev = dev
        self.ok = 0
        self.failed: list[Any] = []
        self._stop = threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                s, body = self.dev.proc.predict([[0.1] * 10] * 8)  # type: ignore[union-attr]
            except OSError as e:
                self.failed.append(repr(e))
                continue
            if s == 200:
                self.ok += 1
            else:
                self.failed.append((s, body))

    def stop(self) -> None:
        self._stop.set()
        self.t.join(30)


@pytest.fixture
def net(mqtt_broker: Broker) -> Any:
    made: list[Any] = []

    def make(device_id: str) -> tuple[Deployer, Events]:
        ev = Events(mqtt_broker, device_id)
        dep = Deployer(mqtt_broker)
        made.extend([ev, dep])
        return dep, ev

    yield make
    for m in made:
        m.close()


def _archive(src: Path, tmp: Path, version: str, **manifest: Any) -> Path:
    d = with_version(src, tmp / f"b-{version}", version)
    if manifest:
        p = d / "manifest.json"
        m = json.loads(p.read_text())
        m.update(manifest)
        p.write_text(json.dumps(m, indent=2) + "\n")
    return make_archive(d, tmp / f"b-{version}.tar.gz")


def test_good_bundle_swaps_with_no_failed_request_and_is_not_installed_twice(
        mqtt_broker: Broker, example_bundle: Path, tmp_path: Path, net: Any) -> None:
    dev = Device(mqtt_broker, tmp_path, "dev-0", example_bundle).start()
    dep, ev = net("dev-0")
    load = Load(dev)
    try:
        time.sleep(1.0)  # the previous model's p99 needs requests
        t0 = time.monotonic()
        parts = dep.install("dev-0", "r-good-1", _archive(example_bundle, tmp_path, "v2"),
                            version="v2", health_window_s=3.0)
        ev.wait(rp.RECEIVED)
        down = ev.wait(rp.DOWNLOADED)
        ev.wait(rp.VERIFIED)
        live = ev.wait(rp.LIVE)
        t_live = time.monotonic() - t0
        healthy = ev.wait(rp.HEALTHY, 30)
        load.stop()
        assert load.failed == [] and load.ok > 50, (load.ok, load.failed[:3])
        assert dev.serving() == "v2"
        assert dev.current().startswith("releases/v2-") and \
            os.readlink(dev.state / "previous") == "releases/v1"
        assert not (dev.state / "rollouts" / "pending.json").exists()
        assert healthy["requests"] > 0 and healthy["sha256"] == parts.bundle.sha256
        print(f"\nswap: {parts.bundle.bytes} bytes in {parts.bundle.chunks} chunks, download "
              f"{down['seconds']} s, swap {live['swap_s']} s, deploy->live {t_live:.2f} s, "
              f"{load.ok} requests during the rollout, 0 failed")
        # a restart sees the retained job again: nothing is done twice
        dev.stop()
        n = len(ev.kinds())
        dev.start()
        assert dev.serving() == "v2"
        time.sleep(3)
        assert len(ev.kinds()) == n, ev.kinds()[n:]
    finally:
        load.stop()
        dev.stop()


def test_misfit_contract_change_and_tampered_chunk_are_refused(
        mqtt_broker: Broker, example_bundle: Path, digits_bundle: Path, tmp_path: Path,
        net: Any) -> None:
    dev = Device(mqtt_broker, tmp_path, "dev-1", example_bundle).start()
    dep, ev = net("dev-1")
    try:
        m = json.loads((example_bundle / "manifest.json").read_text())
        mem = dict(m["memory"], measured_peak_bytes={
            k: 2 << 30 for k in m["memory"]["measured_peak_bytes"]})
        dep.install("dev-1", "r-fat-1", _archive(example_bundle, tmp_path, "fat", memory=mem),
                    version="fat")
        r = ev.wait(rp.REFUSED, rollout_id="r-fat-1")
        assert "does not fit" in r["reason"] and "\n" not in r["reason"]
        assert r["need_bytes"] == r["peak_bytes"] + r["baseline_bytes"] > r["budget_bytes"]
        assert r["peak_bytes"] == 2 << 30 and r["baseline_bytes"] > 0

        digits = make_archive(digits_bundle, tmp_path / "digits.tar.gz")
        dep.install("dev-1", "r-contract-1", digits, version="d")
        r = ev.wait(rp.REFUSED, rollout_id="r-contract-1")
        assert "changes the contract" in r["reason"], r

        good = _archive(example_bundle, tmp_path, "v3")
        parts = rp.chunk_archive(good, 4096)
        doc = rp.JobDocument(rollout_id="r-tamper-1", action="install", bundle=parts.bundle,
                             release={"name": "m", "version": "v3"}, deadline=time.time() + 600)
        bad = list(parts.chunks)
        bad[2] = bytes([bad[2][0] ^ 0xFF]) + bad[2][1:]
        rp.publish_job(dep.c, FLEET, "dev-1", doc,
                       rp.ArchiveChunks(bundle=parts.bundle, chunks=bad))
        r = ev.wait(rp.REFUSED, rollout_id="r-tamper-1")
        assert "chunk 2" in r["reason"] and "tampered" in r["reason"], r
        assert dev.serving() == "v1" and dev.current() == "releases/v1"
        assert [p.name for p in (dev.state / "releases").iterdir()] == ["v1"], \
            "nothing half-installed"
        assert ev.kinds().count(rp.LIVE) == 0
        rp.clear_job(dep.c, FLEET, "dev-1", "r-tamper-1", parts.bundle.chunks)
    finally:
        dev.stop()


def test_unsigned_bundle_refused_with_trust_key(
        mqtt_broker: Broker, example_bundle: Path, tmp_path: Path, net: Any) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    priv, pub = tmp_path / "k.pem", tmp_path / "k.pub"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    signed = with_version(example_bundle, tmp_path / "signed", "v1")
    sign_manifest(signed, priv)
    dev = Device(mqtt_broker, tmp_path, "dev-2", signed, ["--trust-key", str(pub)]).start()
    dep, ev = net("dev-2")
    try:
        dep.install("dev-2", "r-unsigned-1", _archive(example_bundle, tmp_path, "v2"),
                    version="v2")
        r = ev.wait(rp.REFUSED, rollout_id="r-unsigned-1")
        assert "unsigned" in r["reason"], r
        v3 = with_version(example_bundle, tmp_path / "v3", "v3")
        sign_manifest(v3, priv)
        web = tmp_path / "web"
        web.mkdir()
        make_archive(v3, web / "v3.tar.gz")
        base, srv = http_folder(web)  # this one comes from a URL given in the job
        dep.install_url("dev-2", "r-signed-1", web / "v3.tar.gz", f"{base}/v3.tar.gz",
                        version="v3", health_window_s=1.0)
        assert ev.wait(rp.VERIFIED, rollout_id="r-signed-1")["signed"] is True
        ev.wait(rp.HEALTHY, 30, rollout_id="r-signed-1")
        assert dev.serving() == "v3"
        # a URL that answers 404: refused in one line, still serving v3
        dep.install_url("dev-2", "r-404-1", web / "v3.tar.gz", f"{base}/nothing.tar.gz",
                        version="v4")
        r = ev.wait(rp.REFUSED, 60, rollout_id="r-404-1")
        assert "cannot fetch the bundle" in r["reason"] and "404" in r["reason"], r
        srv.shutdown()
        assert dev.serving() == "v3"
    finally:
        dev.stop()


def test_sigkilled_mid_download_resumes_with_the_chunks_it_kept(
        mqtt_broker: Broker, example_bundle: Path, tmp_path: Path, net: Any) -> None:
    dev = Device(mqtt_broker, tmp_path, "dev-3", example_bundle).start()
    dep, ev = net("dev-3")
    try:
        archive = _archive(example_bundle, tmp_path, "v2")
        # the job and only the first half of the chunks: the device downloads what it can
        parts = dep.install("dev-3", "r-resume-1", archive, version="v2", publish_chunks=False,
                            health_window_s=1.0)
        half = parts.bundle.chunks // 2
        for n in range(half):
            dep.c.publish(rp.chunk_topic(FLEET, "dev-3", "r-resume-1", n), parts.chunks[n],
                          qos=1, retain=True).wait_for_publish(10)
        folder = dev.state / "rollouts" / "r-resume-1"
        wait_until(lambda: len(list(folder.glob("chunk-*"))) >= half, 30, "half the chunks")
        dev.stop(signal.SIGKILL)
        (folder / "chunk-0").write_bytes(b"rotten")  # a damaged file is fetched again
        for n in range(half, parts.bundle.chunks):
            dep.c.publish(rp.chunk_topic(FLEET, "dev-3", "r-resume-1", n), parts.chunks[n],
                          qos=1, retain=True).wait_for_publish(10)
        dev.start()
        d = ev.wait(rp.DOWNLOADED, 60, rollout_id="r-resume-1")
        assert d["resumed_chunks"] == half - 1, d
        ev.wait(rp.HEALTHY, 30, rollout_id="r-resume-1")
        assert dev.serving() == "v2"
        assert ev.kinds().count(rp.RECEIVED) == 1
    finally:
        dev.stop()


@pytest.fixture(scope="module")
def slow_bundle(example_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example with a wide fp32 MLP (same contract), ~20x slower per request."""
    import hashlib

    import torch

    from toma_edge.host.export import export_program
    from toma_edge.host.measure import measure_peaks

    torch.manual_seed(0)
    w = 1536
    net = torch.nn.Sequential(torch.nn.Linear(10, w), torch.nn.ReLU(), torch.nn.Linear(w, w),
                              torch.nn.ReLU(), torch.nn.Linear(w, w), torch.nn.ReLU(),
                              torch.nn.Linear(w, 1))
    m = json.loads((example_bundle / "manifest.json").read_text())
    m["max_batch"] = 8
    res = export_program(net, torch.zeros(2, 10), max_batch=8, quantize="fp32")
    d = tmp_path_factory.mktemp("slow")
    (d / "model.pte").write_bytes(res.pte)
    meas = measure_peaks(d / "model.pte", 8)
    m.update(version="slow", shipped="fp32", compression={"quantization": "fp32", "prune": 0.0})
    m["memory"].update(pte_bytes=len(res.pte), planned_bytes=res.planned_bytes,
                       measured_peak_bytes={k: int(v) for k, v in
                                            meas["measured_peak_bytes"].items()})
    m["files"] = {"model.pte": {"sha256": hashlib.sha256(res.pte).hexdigest(),
                                "bytes": len(res.pte)}}
    (d / "manifest.json").write_text(json.dumps(m, indent=2) + "\n")
    return d


def test_slow_bundle_is_rolled_back_by_the_device_within_the_health_window(
        mqtt_broker: Broker, example_bundle: Path, slow_bundle: Path, tmp_path: Path,
        net: Any) -> None:
    dev = Device(mqtt_broker, tmp_path, "dev-4", example_bundle).start()
    dep, ev = net("dev-4")
    load = Load(dev)
    try:
        time.sleep(2.0)
        # 17 MB in 128 KiB chunks over the broker
        archive = make_archive(slow_bundle, tmp_path / "slow.tar.gz")
        parts = rp.chunk_archive(archive)
        rp.publish_job(dep.c, FLEET, "dev-4", rp.JobDocument(
            rollout_id="r-slow-1", action="install", bundle=parts.bundle,
            release={"name": "m", "version": "slow"}, health_window_s=8.0, max_p99_ratio=2.5,
            deadline=time.time() + 600), parts)
        down = ev.wait(rp.DOWNLOADED, 120, rollout_id="r-slow-1")
        ev.wait(rp.LIVE, 120, rollout_id="r-slow-1")
        t_live = time.monotonic()
        f = ev.wait(rp.FAILED, 30, rollout_id="r-slow-1")
        rb = ev.wait(rp.ROLLED_BACK, 30, rollout_id="r-slow-1")
        assert time.monotonic() - t_live < 8.0 + 5
        assert "p99 latency" in f["reason"] and f["p99_s"] > 2.5 * f["prev_p99_s"], f
        assert rb["release"] == "v1"
        load.stop()
        assert load.failed == [], load.failed[:3]
        assert dev.serving() == "v1" and dev.current() == "releases/v1"
        assert rp.HEALTHY not in ev.kinds()
        print(f"\nslow bundle {parts.bundle.bytes} bytes in {parts.bundle.chunks} chunks: "
              f"download {down['seconds']} s with requests flowing")
        print(f"slow bundle: p99 {f['p99_s'] * 1000:.1f} ms vs {f['prev_p99_s'] * 1000:.1f} ms"
              f" before; rolled back {time.monotonic() - t_live:.1f} s after going live")
    finally:
        load.stop()
        dev.stop()


def test_crash_loop_after_swap_returns_to_the_previous_release_and_rollback_job(
        mqtt_broker: Broker, example_bundle: Path, tmp_path: Path, net: Any) -> None:
    dev = Device(mqtt_broker, tmp_path, "dev-5", example_bundle).start()
    dep, ev = net("dev-5")
    try:
        dep.install("dev-5", "r-crash-1", _archive(example_bundle, tmp_path, "v2"),
                    version="v2", health_window_s=120.0, crash_limit=2)
        ev.wait(rp.LIVE, 60, rollout_id="r-crash-1")
        dev.stop(signal.SIGKILL)           # crash 1 during the health window
        dev.start()
        assert dev.serving() == "v2"
        dev.stop(signal.SIGKILL)           # crash 2: the limit
        dev.start()
        assert dev.serving() == "v1" and dev.current() == "releases/v1"
        ev.wait(rp.FAILED, 30, rollout_id="r-crash-1")
        rb = ev.wait(rp.ROLLED_BACK, 30, rollout_id="r-crash-1")
        assert "crash limit 2" in rb["reason"], rb
        assert not (dev.state / "rollouts" / "pending.json").exists()

        # an operator's rollback job after a healthy install goes back as well
        dep.install("dev-5", "r-ok-2", _archive(example_bundle, tmp_path, "v4"),
                    version="v4", health_window_s=1.0)
        ev.wait(rp.HEALTHY, 60, rollout_id="r-ok-2")
        assert dev.serving() == "v4"
        doc = rp.JobDocument(rollout_id="r-ok-2", action="rollback", deadline=time.time() + 60)
        rp.publish_job(dep.c, FLEET, "dev-5", doc)
        ev.wait(rp.ROLLED_BACK, 30, rollout_id="r-ok-2")
        assert dev.serving() == "v1" and dev.current() == "releases/v1"
    finally:
        dev.stop()


def test_job_documents_are_strict() -> None:
    good = {"v": 1, "rollout_id": "r-1", "action": "rollback", "deadline": 1.0}
    assert rp.decode_job(json.dumps(good)).action == "rollback"
    for bad, word in [
        ({**good, "v": True}, "version"), ({**good, "extra": 1}, "extra"),
        ({**good, "deadline": "1"}, "number"), ({**good, "action": "install"}, "bundle"),
        ({**good, "crash_limit": 2.0}, "crash_limit"), ({**good, "rollout_id": "a/b"}, "rollout_id"),
    ]:
        with pytest.raises(InputError) as e:
            rp.decode_job(json.dumps(bad))
        assert word in str(e.value) and "\n" not in str(e.value), (bad, e.value)
    with pytest.raises(InputError, match="invalid JSON"):
        rp.decode_job(b'{"v": 1, "deadline": NaN}')
    assert rp.parse_job_topic("toma-edge/v1/f/d/jobs/r-1/chunk/7") == ("f", "d", "r-1", 7)
    for t in ("toma-edge/v1/f/d/jobs/r-1/chunk/x", "toma-edge/v1/f/d/jobs", "a/b/c/d/jobs/r"):
        with pytest.raises(TelemetryError, match="is not toma-edge"):
            rp.parse_job_topic(t)


def test_rollback_job_in_the_health_window_invalid_and_expired_jobs(
        mqtt_broker: Broker, example_bundle: Path, tmp_path: Path, net: Any) -> None:
    dev = Device(mqtt_broker, tmp_path, "dev-6", example_bundle).start()
    dep, ev = net("dev-6")
    try:
        # not JSON of the protocol: refused with one line naming the problem, nothing runs
        dep.c.publish(rp.job_topic(FLEET, "dev-6", "r-junk-1"),
                      b'{"v": 1, "rollout_id": "r-junk-1", "action": "install", "deadline": 1e10}',
                      qos=1, retain=True).wait_for_publish(10)
        r = ev.wait(rp.REFUSED, rollout_id="r-junk-1")
        assert "needs 'bundle'" in r["reason"] and "\n" not in r["reason"], r
        # past its deadline: ignored
        parts = rp.chunk_archive(_archive(example_bundle, tmp_path, "old"), 4096)
        old = rp.JobDocument(rollout_id="r-late-1", action="install", bundle=parts.bundle,
                             release={"name": "m", "version": "old"}, deadline=time.time() - 1)
        rp.publish_job(dep.c, FLEET, "dev-6", old, parts)
        # on probation, then the controller says roll back (same rollout id, job replaced)
        dep.install("dev-6", "r-back-1", _archive(example_bundle, tmp_path, "v2"),
                    version="v2", health_window_s=300.0)
        ev.wait(rp.LIVE, 60, rollout_id="r-back-1")
        assert dev.serving() == "v2"
        rp.clear_job(dep.c, FLEET, "dev-6", "r-back-1", 0)
        rp.publish_job(dep.c, FLEET, "dev-6", rp.JobDocument(
            rollout_id="r-back-1", action="rollback", deadline=time.time() + 60))
        rb = ev.wait(rp.ROLLED_BACK, 30, rollout_id="r-back-1")
        assert rb["reason"] == "rollback job" and rb["release"] == "v1", rb
        assert dev.serving() == "v1" and dev.current() == "releases/v1"
        assert not (dev.state / "rollouts" / "pending.json").exists()
        assert not any(e["fields"].get("rollout_id") == "r-late-1" for e in ev.seen)
        # a restart: no pending swap, the retained rollback is not run twice
        dev.stop()
        n = len(ev.kinds())
        dev.start()
        time.sleep(2)
        assert dev.serving() == "v1" and len(ev.kinds()) == n
    finally:
        dev.stop()


def test_plain_bundle_folder_keeps_releases_beside_the_spool(
        mqtt_broker: Broker, example_bundle: Path, tmp_path: Path, net: Any) -> None:
    """Started on a plain folder (no `current` symlink): the releases live in
    <spool folder>/<fleet>-<device>.releases and a restart serves what was installed."""
    first = with_version(example_bundle, tmp_path / "plain-v1", "v1")
    env = mqtt_broker.env("dev-7")
    env["OMP_NUM_THREADS"] = "1"
    args = [str(first), "--mqtt", mqtt_broker.url("dev-7"), "--fleet", FLEET, "--device-id",
            "dev-7", "--telemetry-interval", "1", "--spool", str(tmp_path / "s" / "spool.db"),
            "--threads", "1"]
    svc = ServiceProc(tmp_path / "serve.log", env=env, args=args)
    dep, ev = net("dev-7")
    try:
        wait_until(lambda: "taking inference requests" in svc.tail(), 30, "subscribed")
        archive = _archive(example_bundle, tmp_path, "v2")
        parts = rp.chunk_archive(archive)  # the default 128 KiB chunks
        job = rp.JobDocument(rollout_id="r-plain-1", action="install", bundle=parts.bundle,
                             release={"name": "m", "version": "v2"}, health_window_s=1.0,
                             deadline=time.time() + 600)
        t0 = time.monotonic()
        rp.publish_job(dep.c, FLEET, "dev-7", job, parts)
        d = ev.wait(rp.DOWNLOADED, 30)
        live = ev.wait(rp.LIVE, 30)
        t_live = time.monotonic() - t0
        ev.wait(rp.HEALTHY, 30)
        state = tmp_path / "s" / f"{FLEET}-dev-7.releases"
        assert os.readlink(state / "current").startswith("releases/v2-")
        assert (state / "previous").resolve() == first.resolve()
        svc.stop()
        svc = ServiceProc(tmp_path / "serve.log", env=env, args=args)
        assert svc.health()["model"]["version"] == "v2"
        print(f"\nexample bundle {parts.bundle.bytes} bytes in {parts.bundle.chunks} chunk(s): "
              f"download {d['seconds']} s, swap {live['swap_s']} s, publish->live {t_live:.2f} s")
    finally:
        svc.stop()


def test_release_that_cannot_start_after_a_swap_falls_back_at_once(
        mqtt_broker: Broker, example_bundle: Path, tmp_path: Path, net: Any) -> None:
    dev = Device(mqtt_broker, tmp_path, "dev-8", example_bundle).start()
    dep, ev = net("dev-8")
    try:
        dep.install("dev-8", "r-broken-1", _archive(example_bundle, tmp_path, "v2"),
                    version="v2", health_window_s=300.0, crash_limit=5)
        ev.wait(rp.LIVE, 60, rollout_id="r-broken-1")
        dev.stop(signal.SIGKILL)
        new = (dev.state / "current").resolve()
        (new / "model.pte").write_bytes(b"not a program")  # the disk broke it meanwhile
        dev.start()  # the previous release starts instead of an exit
        assert dev.serving() == "v1" and dev.current() == "releases/v1"
        rb = ev.wait(rp.ROLLED_BACK, 30, rollout_id="r-broken-1")
        assert "cannot start" in rb["reason"] and "\n" not in rb["reason"], rb
    finally:
        dev.stop()


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=12), kids,
                                                              max_size=4), max_leaves=20)
_keys = st.sampled_from(["v", "rollout_id", "action", "bundle", "release", "deadline",
                         "crash_limit", "health_window_s", "max_p99_ratio", "extra"])


@given(st.dictionaries(_keys, _json, max_size=8) | st.binary(max_size=200))
def test_any_job_payload_is_a_job_or_one_line_input_error(payload: Any) -> None:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    try:
        job = rp.decode_job(data)
    except InputError as e:
        assert "\n" not in str(e) and len(str(e)) <= 300
    else:
        assert rp.decode_job(job.encode()) == job


@given(st.integers(1, 300_000), st.integers(1024, rp.MAX_CHUNK_BYTES))
def test_chunking_covers_the_archive_exactly(size: int, chunk: int) -> None:
    import tempfile

    with tempfile.NamedTemporaryFile() as f:
        data = os.urandom(size)
        f.write(data)
        f.flush()
        parts = rp.chunk_archive(f.name, chunk)
    assert b"".join(parts.chunks) == data
    assert [len(c) for c in parts.chunks] == [parts.bundle.chunk_size(n)
                                             for n in range(parts.bundle.chunks)]
    job = rp.JobDocument(rollout_id="r", action="install", bundle=parts.bundle,
                         release={"name": "m", "version": "1"}, deadline=1.0)
    assert rp.decode_job(job.encode()).bundle == parts.bundle


def test_releases_switch_atomically_and_prune_spares_current_and_previous(
        tmp_path: Path) -> None:
    from toma_edge.device.releases import Releases

    rel = Releases(tmp_path / "state", tmp_path / "state" / "releases")
    folders = []
    for i in range(5):
        d = rel.releases / f"r{i}"
        d.mkdir()
        os.utime(d, (1000 + i, 1000 + i))
        folders.append(d)
    rel.switch(folders[0], serving=folders[1])  # the two oldest are in use
    assert rel.current() == folders[0].resolve() and rel.previous() == folders[1].resolve()
    assert os.readlink(rel.current_link) == "releases/r0"
    gone = rel.prune(keep=2)
    assert sorted(p.name for p in gone) == ["r2"]
    assert sorted(p.name for p in rel.releases.iterdir()) == ["r0", "r1", "r3", "r4"]
    rel.back(folders[1])
    assert rel.current() == folders[1].resolve() and rel.previous() is None
    rel.remember("r-1", "install", rp.HEALTHY, to="x")
    assert rel.outcome("r-1", "install")["state"] == rp.HEALTHY  # type: ignore[index]
    (rel.rollouts / "state.json").write_bytes(b"{not json")
    assert rel.outcome("r-1", "install") is None  # damaged: forgotten, not a crash
