"""Fleet rollouts end to end (issue 15): `toma-edge fleet deploy` as a process (user
`deployer`) against a real mosquitto with the shipped ACL, a real `toma-edge fleet collect`
process filling a SQLite store, and 10 real `toma-edge serve --mqtt` processes (dev-0 ...
dev-9 of fleet "rf", each holding a trust key; dev-8 and dev-9 with a smaller --budget),
with clients sending requests to three of them throughout.

    python -m pytest -q tests/test_rollout_fleet.py

The fleet is started once for the module and the scenarios run in order on it (each
leaves every device healthy on some release): a good signed bundle reaches every device in
waves with no failed request, including one offline at the start; a bundle too big for the
small devices is refused there with the figures; an unsigned one is refused by the canary
and nothing else receives it; a 20x slower one fails the canary's health window and is
rolled back by the device itself; a device and the controller SIGKILLed mid-rollout both
resume, nothing done twice, nothing half-installed. Plus the wave planning and the CLI's
one-line errors, without processes.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from bundle_tools import with_version
from mqtt_fixtures import Broker, start_collector, wait_until
from test_service_http import ServiceProc

from toma_edge.bundle import SIGNATURE_NAME, make_archive, sign_manifest
from toma_edge.host.fleet.rollout import parse_percent, parse_rate, plan_waves
from toma_edge.host.fleet.store import open_store

pytest_plugins = ["pg_fixtures"]  # pg_url: the controller's state on PostgreSQL too

FLEET = "rf"
DEVICES = [f"dev-{i}" for i in range(10)]
SMALL = ("dev-8", "dev-9")          # --budget 1GiB: the fat bundle does not fit them
LOADED = ("dev-0", "dev-3", "dev-9")  # clients send requests to these all along
BIG_BUDGET = "3GiB"
WINDOW = "2s"


# -- without processes -------------------------------------------------------------------------

def test_waves_are_planned_from_canary_and_rate() -> None:
    devs = [f"d{i}" for i in range(10)]
    assert [len(w) for w in plan_waves(devs, 1, "exponential:2,2")] == [1, 2, 4, 3]
    assert [len(w) for w in plan_waves(devs, 2, "constant:3")] == [2, 3, 3, 2]
    assert [len(w) for w in plan_waves(devs, 0, "exponential:1,1.5")] == [1, 2, 3, 4]
    assert sum(plan_waves(devs, 1, "constant:4"), []) == devs  # every device once, in order
    assert plan_waves(devs, 20, "constant:1") == [devs]
    assert parse_rate("constant:5") == ("constant", 5.0, 1.0)
    assert parse_percent("10%") == pytest.approx(0.1) and parse_percent("1") == 1.0
    for bad in ("constant:0", "linear:2", "exponential:2", "exponential:0,2", "constant:x"):
        with pytest.raises(Exception, match="--rate"):
            parse_rate(bad)
    for bad in ("0%", "101%", "x", "-5%"):
        with pytest.raises(Exception, match="--abort-failed"):
            parse_percent(bad)


def _cli(*args: str, env: dict[str, str] | None = None,
         timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "toma_edge.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, example_bundle: Path) -> None:
    db = tmp_path / "fleet.db"
    open_store(db).close()
    base = ["fleet", "deploy", str(example_bundle), "--mqtt", "mqtt://deployer@127.0.0.1:1",
            "--fleet", FLEET, "--db", str(db)]
    for extra, word in [
        ([], "has no devices in the store"),
        (["--rate", "fast"], "--rate"),
        (["--abort-failed", "200%"], "--abort-failed"),
        (["--health-window", "soon"], "--health-window"),
        (["--devices", "a/b"], "device id"),
        (["--url", "ftp://x/b.tar.gz"], "--url"),
    ]:
        r = _cli(*base, *extra)
        assert r.returncode == 2, (extra, r.stdout, r.stderr)
        assert word in r.stderr and len(r.stderr.strip().splitlines()) == 1, (extra, r.stderr)
    r = _cli("fleet", "deploy", str(tmp_path / "nope.tar.gz"), "--fleet", FLEET, "--db", str(db),
             "--mqtt", "mqtt://deployer@127.0.0.1:1")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = _cli("fleet", "rollout", "r-none", "--db", str(db))
    assert r.returncode == 2 and "not in the store" in r.stderr, r.stderr


# -- the fleet -------------------------------------------------------------------------------

class Device:
    """One `toma-edge serve --mqtt` process serving ``state/current`` (a symlink into
    ``state/releases``, as the device side of rollouts keeps them)."""

    def __init__(self, broker: Broker, tmp: Path, device_id: str, first: Path,
                 extra: list[str]) -> None:
        self.tmp = tmp / device_id
        self.state = self.tmp / "state"
        (self.state / "releases").mkdir(parents=True)
        shutil.copytree(first, self.state / "releases" / "v1")
        (self.state / "current").symlink_to("releases/v1")
        self.broker, self.device_id, self.extra = broker, device_id, extra
        self.proc: ServiceProc | None = None
        self._starting: threading.Thread | None = None

    def start(self) -> Device:
        env = self.broker.env(self.device_id)
        env["OMP_NUM_THREADS"] = "1"
        self.proc = ServiceProc(self.tmp / "serve.log", env=env, args=[
            str(self.state / "current"), "--mqtt", self.broker.url(self.device_id),
            "--fleet", FLEET, "--device-id", self.device_id, "--telemetry-interval", "1",
            "--spool", str(self.tmp / "spool.db"), "--threads", "1", *self.extra])
        return self

    def start_later(self, delay_s: float) -> None:
        def run() -> None:
            time.sleep(delay_s)
            self.start()

        self._starting = threading.Thread(target=run, daemon=True)
        self._starting.start()

    def join(self) -> None:
        if self._starting is not None:
            self._starting.join(120)
            self._starting = None

    def serving(self) -> str:
        assert self.proc is not None
        return str(self.proc.health()["model"]["version"])

    def releases(self) -> list[str]:
        return sorted(p.name for p in (self.state / "releases").iterdir())

    def stop(self, sig: int = signal.SIGTERM) -> None:
        self.join()
        if self.proc is not None:
            self.proc.stop(sig)
            self.proc = None


class Load:
    """HTTP requests to some devices all along; every answer that is not 200 is kept."""

    def __init__(self, devs: list[Device], rows: dict[str, int]) -> None:
        self.devs = devs
        self.rows = rows  # rows per request, by device id (default 4)
        self.ok = 0
        self.failed: list[Any] = []
        self._stop = threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for d in self.devs:
                if d.proc is None:
                    continue
                try:
                    s, body = d.proc.predict([[0.1] * 10] * self.rows.get(d.device_id, 4))
                except OSError as e:
                    self.failed.append((d.device_id, repr(e)))
                    continue
                if s == 200:
                    self.ok += 1
                else:
                    self.failed.append((d.device_id, s, body))
            time.sleep(0.02)

    def take(self) -> tuple[int, list[Any]]:
        """Requests answered and failed since the last take."""
        ok, failed = self.ok, list(self.failed)
        self.ok = 0
        del self.failed[: len(failed)]
        return ok, failed

    def stop(self) -> None:
        self._stop.set()
        self.t.join(30)


class Fleet:
    def __init__(self, broker: Broker, tmp: Path, devices: dict[str, Device], db: Path,
                 collector: subprocess.Popen[bytes], key: Path, load: Load) -> None:
        self.broker, self.tmp, self.devices, self.db = broker, tmp, devices, db
        self.collector, self.key, self.load = collector, key, load
        self.n = 0

    def bundle(self, src: Path, version: str, *, sign: bool | None = True,
               **manifest: Any) -> Path:
        d = with_version(src, self.tmp / f"b-{version}", version)
        if manifest:
            p = d / "manifest.json"
            m = json.loads(p.read_text())
            m.update(manifest)
            p.write_text(json.dumps(m, indent=2) + "\n")
        if sign:
            sign_manifest(d, self.key)
        elif sign is False:
            (d / SIGNATURE_NAME).unlink()
        # sign=None: the signature of the bundle copied, stale for the new manifest
        return make_archive(d, self.tmp / f"b-{version}.tar.gz")

    def deploy_args(self, bundle: Path, *extra: str) -> list[str]:
        return ["fleet", "deploy", str(bundle), "--mqtt", self.broker.url("deployer"),
                "--fleet", FLEET, "--db", str(self.db), "--devices", ",".join(DEVICES),
                "--health-window", WINDOW, "--timeout", "5m",
                # p99 against the previous model's: a 2 ms p99 turns 14 ms on one scheduling
                # hiccup of this loaded 2-core VM (seen: a good bundle rolled back at 7.2x);
                # the slow-bundle test sets 3 again (its bundle is 6-20x slower)
                "--max-p99-ratio", "10", *extra]

    def deploy(self, bundle: Path, *extra: str, timeout: float = 180
               ) -> subprocess.CompletedProcess[str]:
        return _cli(*self.deploy_args(bundle, *extra), env=self.broker.env("deployer"),
                    timeout=timeout)

    def store(self) -> Any:
        return open_store(self.db)

    def events(self, rid: str) -> dict[str, list[str]]:
        """Each device's rollout.* event kinds of rollout ``rid``, in order."""
        out: dict[str, list[str]] = {d: [] for d in DEVICES}
        with self.store() as s:
            for e in s.rollout_events(FLEET):
                if json.loads(e["fields"]).get("rollout_id") == rid:
                    out[e["device_id"]].append(e["kind"].removeprefix("rollout."))
        return out

    def states(self, rid: str) -> dict[str, str]:
        with self.store() as s:
            return {d["device_id"]: d["state"] for d in s.rollout_devices(rid)}

    def serving(self) -> dict[str, str]:
        return {k: d.serving() for k, d in self.devices.items()}

    def check_clean(self) -> None:
        """Nothing half-installed: each release folder is whole, no download left over."""
        for d in self.devices.values():
            for rel in (d.state / "releases").iterdir():
                assert (rel / "manifest.json").is_file() and (rel / "model.pte").is_file(), rel
            assert not list(d.state.glob("releases/*.tmp*")), d.device_id


@pytest.fixture(scope="module")
def fleet(mqtt_broker: Broker, example_bundle: Path,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    tmp = tmp_path_factory.mktemp("rollout-fleet")
    key = Ed25519PrivateKey.generate()
    priv, pub = tmp / "k.pem", tmp / "k.pub"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    v1 = with_version(example_bundle, tmp / "v1", "v1")
    sign_manifest(v1, priv)
    db = tmp / "fleet.db"
    collector = start_collector(mqtt_broker, db=db, client_id="rollout-collector",
                                log=tmp / "collector.log", user="collector-3")
    devices: dict[str, Device] = {}
    load: Load | None = None
    try:
        for dev in DEVICES:
            budget = "1GiB" if dev in SMALL else BIG_BUDGET
            devices[dev] = Device(mqtt_broker, tmp, dev, v1,
                                  ["--trust-key", str(pub), "--budget", budget]).start()
        with open_store(db) as s:
            wait_until(lambda: set(s.fleet_device_ids(FLEET)) >= set(DEVICES), 30,
                       "every device in the store")
        # the canary's requests are of 64 rows: the slow bundle's cost grows with them (the
        # example's hardly), so its p99 stands clear of a loaded machine's noise
        load = Load([devices[d] for d in LOADED], {"dev-0": 64})
        yield Fleet(mqtt_broker, tmp, devices, db, collector, priv, load)
    finally:
        if load is not None:
            load.stop()
        for d in devices.values():
            d.stop(signal.SIGKILL)
        collector.send_signal(signal.SIGTERM)
        collector.wait(30)


def _waves(f: Fleet, rid: str) -> dict[str, tuple[int, float, float]]:
    """Per device of rollout ``rid``: (wave, sent_at, received_at of its healthy event)."""
    with f.store() as s:
        healthy = {e["device_id"]: float(e["received_at"]) for e in s.rollout_events(FLEET)
                   if e["kind"] == "rollout.healthy"
                   and json.loads(e["fields"]).get("rollout_id") == rid}
        return {d["device_id"]: (int(d["wave"]), float(d["sent_at"]), healthy[d["device_id"]])
                for d in s.rollout_devices(rid)}


def test_good_bundle_reaches_every_device_in_waves(fleet: Fleet, tmp_path: Path) -> None:
    f = fleet
    late = f.devices["dev-6"]
    late.stop()  # offline at the start (its status says so); back during the rollout
    with f.store() as s:
        wait_until(lambda: not next(r for r in s.devices() if r.device_id == "dev-6"
                                    and r.fleet == FLEET).online, 15, "dev-6 offline")
    bundle = f.bundle(f.tmp / "v1", "v2")
    f.load.take()
    late.start_later(8.0)
    t0 = time.monotonic()
    r = f.deploy(bundle, "--canary", "1", "--rate", "exponential:2,2")
    took = time.monotonic() - t0
    late.join()
    ok, failed = f.load.take()
    assert r.returncode == 0, (r.stdout, r.stderr[-3000:])
    rid = r.stdout.splitlines()[0]
    assert "succeeded" in r.stdout and "10 of 10 devices healthy" in r.stdout, r.stdout
    assert failed == [] and ok > 50, (ok, failed[:3])
    assert set(f.serving().values()) == {"v2"}, f.serving()
    assert set(f.states(rid).values()) == {"healthy"}
    waves = _waves(f, rid)
    assert sorted({w for w, _s, _h in waves.values()}) == [0, 1, 2, 3]
    for dev, (w, sent, _h) in waves.items():  # a wave went only when the earlier were healthy
        earlier = [h for d, (w2, _s, h) in waves.items() if w2 < w and d != "dev-6"]
        assert not earlier or sent >= max(earlier) - 0.5, (dev, w, sent, earlier)
    assert all(kinds.count("received") == 1 for kinds in f.events(rid).values())
    f.check_clean()
    # the retained jobs are gone: a device that subscribes now finds nothing
    from toma_edge.telemetry import make_client

    got: list[str] = []
    c = make_client(f.broker.settings("collector"), client_id="collector")
    c.on_message = lambda cl, ud, m: got.append(m.topic) if m.payload else None
    c.connect("127.0.0.1", f.broker.port)
    c.subscribe(f"toma-edge/v1/{FLEET}/+/jobs/#", qos=1)
    c.loop_start()
    time.sleep(1.0)
    c.loop_stop()
    c.disconnect()
    assert got == [], got[:5]
    # status, rollouts, the rollout and its timeline
    st = _cli("fleet", "status", "--db", str(f.db))
    assert st.returncode == 0 and st.stdout.count("v2") >= 10, st.stdout
    rs = _cli("fleet", "rollouts", "--db", str(f.db))
    assert rid in rs.stdout and "succeeded" in rs.stdout and "10/10" in rs.stdout, rs.stdout
    one = _cli("fleet", "rollout", rid, "--db", str(f.db))
    assert one.returncode == 0 and one.stdout.count("healthy") >= 10, one.stdout
    rep = _cli("fleet", "report", "--db", str(f.db), "--out", str(tmp_path / "rep"))
    assert rep.returncode == 0, rep.stderr
    png = tmp_path / "rep" / f"rollout__{rid}.png"
    assert png.stat().st_size > 5000 and rid in (tmp_path / "rep" / "README.md").read_text()
    print(f"\nrollout {rid}: 10 devices in 4 waves (window {WINDOW}), {took:.1f} s "
          f"deploy->all healthy, {ok} requests during it, 0 failed")


def test_misfit_is_refused_on_small_devices_with_the_figures(fleet: Fleet) -> None:
    f = fleet
    m = json.loads((f.tmp / "v1" / "manifest.json").read_text())
    mem = dict(m["memory"], measured_peak_bytes={
        k: 1 << 30 for k in m["memory"]["measured_peak_bytes"]})
    fat = f.bundle(f.tmp / "v1", "fat", memory=mem)
    f.load.take()
    # the fat manifest makes the big devices size their batches from a 1 GiB peak (smaller
    # batches, re-measured): slower on the canary's 256-row requests, not what this checks
    r = f.deploy(fat, "--canary", "1", "--rate", "constant:5", "--abort-min", "3",
                 "--max-p99-ratio", "50")
    ok, failed = f.load.take()
    assert r.returncode == 1, (r.stdout, r.stderr[-2000:])
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: rollout") and "failed" in line, line
    assert "8 of 10 devices healthy" in line and "dev-8 refused" in line, line
    assert "does not fit" in line and "budget 1073.7 MB" in line, line
    rid = r.stdout.splitlines()[0]
    states = f.states(rid)
    assert {d: states[d] for d in SMALL} == {"dev-8": "refused", "dev-9": "refused"}
    serving = f.serving()
    assert serving["dev-8"] == serving["dev-9"] == "v2"
    assert all(serving[d] == "fat" for d in DEVICES if d not in SMALL), serving
    with f.store() as s:
        d8 = next(d for d in s.rollout_devices(rid) if d["device_id"] == "dev-8")
        fig = json.loads(d8["detail"])
        assert fig["peak_bytes"] == 1 << 30 and fig["budget_bytes"] == 1 << 30
        assert fig["need_bytes"] == fig["peak_bytes"] + fig["baseline_bytes"]
    assert failed == [], failed[:3]
    f.check_clean()


@pytest.mark.parametrize("sign, word", [(False, "unsigned"), (None, "signature check failed")])
def test_unsigned_or_tampered_bundle_is_refused_by_the_canary_and_goes_nowhere(
        fleet: Fleet, sign: bool | None, word: str) -> None:
    f = fleet
    before = f.serving()
    r = f.deploy(f.bundle(f.tmp / "v1", f"bad-{word[:8]}", sign=sign), "--canary", "1")
    assert r.returncode == 1, (r.stdout, r.stderr[-2000:])
    line = r.stderr.strip().splitlines()[-1]
    assert "aborted" in line and word in line, line
    rid = r.stdout.splitlines()[0]
    ev = f.events(rid)
    assert ev["dev-0"][0] == "received" and ev["dev-0"][-1] == "refused", ev["dev-0"]
    assert all(ev[d] == [] for d in DEVICES[1:]), ev
    assert set(f.states(rid)[d] for d in DEVICES[1:]) == {"skipped"}
    assert f.serving() == before


@pytest.fixture(scope="module")
def slow_bundle(example_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example with a deep fp32 MLP (same contract; one 1536x1536 weight applied 24
    times): far slower than the example on the canary's 64-row requests."""
    import hashlib

    import torch

    from toma_edge.host.export import export_program
    from toma_edge.host.measure import measure_peaks

    torch.manual_seed(0)
    w = 1536
    hidden = torch.nn.Linear(w, w)  # one weight used 24 times: 24x the work, 1x the bytes
    net = torch.nn.Sequential(torch.nn.Linear(10, w), torch.nn.ReLU(),
                              *[m for _ in range(24) for m in (hidden, torch.nn.ReLU())],
                              torch.nn.Linear(w, 1))
    m = json.loads((example_bundle / "manifest.json").read_text())
    m["max_batch"] = 256
    res = export_program(net, torch.zeros(2, 10), max_batch=256, quantize="fp32")
    d = tmp_path_factory.mktemp("slow")
    (d / "model.pte").write_bytes(res.pte)
    meas = measure_peaks(d / "model.pte", 256)
    m.update(version="slow", shipped="fp32", compression={"quantization": "fp32", "prune": 0.0})
    m["memory"].update(pte_bytes=len(res.pte), planned_bytes=res.planned_bytes,
                       measured_peak_bytes={k: int(v) for k, v in
                                            meas["measured_peak_bytes"].items()})
    m["files"] = {"model.pte": {"sha256": hashlib.sha256(res.pte).hexdigest(),
                                "bytes": len(res.pte)}}
    (d / "manifest.json").write_text(json.dumps(m, indent=2) + "\n")
    return d


def test_slow_bundle_fails_the_canary_window_and_rolls_back(
        fleet: Fleet, slow_bundle: Path) -> None:
    f = fleet
    before = f.serving()
    d = with_version(slow_bundle, f.tmp / "slow", "slow")
    sign_manifest(d, f.key)
    archive = make_archive(d, f.tmp / "slow.tar.gz")
    f.load.take()
    r = f.deploy(archive, "--canary", "1", "--health-window", "8s", "--max-p99-ratio", "3")
    ok, failed = f.load.take()
    assert r.returncode == 1, (r.stdout, r.stderr[-2000:])
    line = r.stderr.strip().splitlines()[-1]
    assert "aborted" in line and "dev-0" in line and "p99" in line, line
    rid = r.stdout.splitlines()[0]
    ev = f.events(rid)
    assert ev["dev-0"][-3:] == ["live", "failed", "rolled_back"], ev["dev-0"]
    assert all(ev[x] == [] for x in DEVICES[1:]), ev
    assert f.serving() == before
    assert failed == [], failed[:3]
    with f.store() as s:
        fail = next(json.loads(e["fields"]) for e in s.rollout_events(FLEET)
                    if e["kind"] == "rollout.failed" and rid in e["fields"])
    print(f"\nslow canary: p99 {fail['p99_s'] * 1000:.1f} ms vs {fail['prev_p99_s'] * 1000:.1f} ms "
          f"before; rollout aborted, 9 devices never received it; {ok} requests, 0 failed")


def test_device_and_controller_sigkilled_mid_rollout_both_resume(
        fleet: Fleet, slow_bundle: Path) -> None:
    """The 8.7 MB fp32 bundle (67 chunks) to the devices without request load (where it is
    healthy): one is SIGKILLed while it downloads, the controller right after."""
    f = fleet
    targets = [d for d in DEVICES if d not in LOADED]
    d = with_version(slow_bundle, f.tmp / "big", "big")
    sign_manifest(d, f.key)
    bundle = make_archive(d, f.tmp / "big.tar.gz")
    chunks = -(-bundle.stat().st_size // (128 * 1024))
    env = f.broker.env("deployer")
    log = f.tmp / "deploy-big.log"
    args = f.deploy_args(bundle, "--canary", "2", "--rate", "constant:5")
    args[args.index("--devices") + 1] = ",".join(targets)
    with open(log, "w") as out:
        ctl = subprocess.Popen([sys.executable, "-m", "toma_edge.cli", *args],
                               env=env, stdout=subprocess.PIPE, stderr=out, text=True)
    assert ctl.stdout is not None
    rid = ctl.stdout.readline().strip()
    victim = f.devices["dev-4"]  # wave 1: SIGKILLed while its chunk files arrive
    folder = victim.state / "rollouts" / rid
    deadline = time.monotonic() + 120
    while not 5 <= len(list(folder.glob("chunk-*"))) < chunks:
        assert time.monotonic() < deadline and ctl.poll() is None, log.read_text()[-2000:]
        time.sleep(0.005)
    victim.stop(signal.SIGKILL)
    ctl.send_signal(signal.SIGKILL)
    ctl.wait(10)
    with f.store() as s:
        killed_at = {d["device_id"]: d["state"] for d in s.rollout_devices(rid)}
        sent_before = {d["device_id"]: d["sent_at"] for d in s.rollout_devices(rid)}
        assert s.rollout(rid)["state"] == "running"
    victim.start()
    r = _cli("fleet", "rollout", rid, "--resume", "--db", str(f.db), "--mqtt",
             f.broker.url("deployer"), env=env, timeout=240)
    assert r.returncode == 0, (r.stdout, r.stderr[-3000:], log.read_text()[-2000:])
    assert f"{len(targets)} of {len(targets)} devices healthy" in r.stdout, r.stdout
    serving = f.serving()
    assert all(serving[x] == "big" for x in targets) and \
        all(serving[x] != "big" for x in LOADED), serving
    with f.store() as s:
        after = {d["device_id"]: d["sent_at"] for d in s.rollout_devices(rid)}
        downs = [json.loads(e["fields"]) for e in s.rollout_events(FLEET)
                 if e["device_id"] == "dev-4" and e["kind"] == "rollout.downloaded"
                 and rid in e["fields"]]
    assert len(downs) == 1 and downs[0]["resumed_chunks"] >= 5, downs  # killed mid-download
    # nothing sent twice: a device sent before the kill kept its send time
    assert all(after[x] == t for x, t in sent_before.items() if t is not None)
    ev = f.events(rid)
    assert all(ev[x].count("received") == 1 and ev[x].count("healthy") == 1
               for x in targets), ev
    f.check_clean()
    print(f"\nkilled dev-4 and the controller with the devices at {killed_at}; dev-4 "
          f"downloaded after its restart keeping {downs[0]['resumed_chunks']} of {chunks} chunks")
    # a rollout that ended cannot be aborted; one line, exit 2
    a = _cli("fleet", "rollout", rid, "--abort", "--db", str(f.db), "--mqtt",
             f.broker.url("deployer"), env=env)
    assert a.returncode == 2 and "already ended" in a.stderr, a.stderr


def test_bundle_by_url_instead_of_chunks(fleet: Fleet) -> None:
    """--url: the job carries an HTTP URL, no chunk is published, the devices fetch it."""
    import functools
    import http.server

    f = fleet
    bundle = f.bundle(f.tmp / "v1", "v7")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(f.tmp))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/{bundle.name}"
        args = f.deploy_args(bundle, "--canary", "1", "--url", url)
        args[args.index("--devices") + 1] = "dev-1,dev-2"
        r = _cli(*args, env=f.broker.env("deployer"), timeout=120)
        assert r.returncode == 0, (r.stdout, r.stderr[-2000:])
        assert "2 of 2 devices healthy" in r.stdout
        serving = f.serving()
        assert serving["dev-1"] == serving["dev-2"] == "v7"
        rid = r.stdout.splitlines()[0]
        with f.store() as s:
            job = json.loads(s.rollout(rid)["job"])
        assert job["bundle"]["url"] == url and job["bundle"]["chunks"] == 0
    finally:
        httpd.shutdown()


def test_operator_abort_rolls_back_every_device_that_took_it(fleet: Fleet) -> None:
    """--no-wait records the rollout; --resume runs it; --abort from another shell while the
    third wave is live: rollback jobs to every device that took it, the rest never get it."""
    f = fleet
    before = f.serving()
    env = f.broker.env("deployer")
    r = _cli(*f.deploy_args(f.bundle(f.tmp / "v1", "v6"), "--canary", "1", "--rate",
                            "exponential:2,2", "--health-window", "4s", "--no-wait"), env=env)
    assert r.returncode == 0, r.stderr
    rid = r.stdout.strip()
    assert f.states(rid) == {d: "pending" for d in DEVICES}  # nothing sent yet
    log = f.tmp / "resume-v6.log"
    with open(log, "w") as out:
        ctl = subprocess.Popen([sys.executable, "-m", "toma_edge.cli", "fleet", "rollout", rid,
                                "--resume", "--db", str(f.db), "--mqtt",
                                f.broker.url("deployer")], env=env, stdout=out, stderr=out)
    with f.store() as s:
        wait_until(lambda: s.rollout(rid)["wave"] == 2 and any(
            d["state"] == "live" for d in s.rollout_devices(rid) if d["wave"] == 2)
            or ctl.poll() is not None, 90, "the third wave live")
    a = _cli("fleet", "rollout", rid, "--abort", "--db", str(f.db), "--mqtt",
             f.broker.url("deployer"), env=env)
    assert a.returncode == 0 and "abort requested" in a.stdout, (a.stdout, a.stderr)
    assert ctl.wait(90) == 1, log.read_text()[-3000:]
    assert "aborted: aborted by the operator" in log.read_text(), log.read_text()[-2000:]
    states = f.states(rid)
    took = [d for d in DEVICES if states[d] == "rolled_back"]
    assert len(took) >= 4 and "dev-0" in took, states  # waves 0, 1 and (some of) 2
    assert all(states[d] in ("rolled_back", "skipped") for d in DEVICES), states
    ev = f.events(rid)
    assert all(ev[d] == [] for d in DEVICES if states[d] == "skipped"), ev
    assert f.serving() == before
    f.check_clean()


def test_acl_only_the_deployer_writes_jobs(mqtt_broker: Broker) -> None:
    """The shipped ACL: a device cannot write under jobs/ (its own or another's), nor any
    topic of its tree but status, telemetry, events and infer/response; the deployer can."""
    from toma_edge.telemetry import make_client

    def connect(user: str) -> Any:
        c = make_client(mqtt_broker.settings(user), client_id=user)
        c.connect("127.0.0.1", mqtt_broker.port)
        c.loop_start()
        wait_until(c.is_connected, 10, f"{user} to connect")
        return c

    got: list[tuple[str, bytes]] = []
    reader = connect("dev-11")  # reads its own jobs/#; reads nothing of dev-10's
    reader.on_message = lambda cl, ud, m: got.append((m.topic, m.payload))
    reader.subscribe("toma-edge/v1/acl/dev-11/jobs/#", qos=1)
    spy = connect("collector-2")
    spy.on_message = lambda cl, ud, m: got.append((m.topic, m.payload))
    spy.subscribe("toma-edge/v1/acl/dev-10/#", qos=1)
    dev, dep = connect("dev-10"), connect("deployer")
    try:
        time.sleep(0.5)
        for topic in ("toma-edge/v1/acl/dev-11/jobs/r-1", "toma-edge/v1/acl/dev-10/jobs/r-1",
                      "toma-edge/v1/acl/dev-10/jobs/r-1/chunk/0", "toma-edge/v1/acl/dev-10/x"):
            dev.publish(topic, b"forged", qos=1, retain=True).wait_for_publish(5)
        dev.publish("toma-edge/v1/acl/dev-10/events", b"{}", qos=1).wait_for_publish(5)
        dep.publish("toma-edge/v1/acl/dev-11/jobs/r-2", b"real", qos=1,
                    retain=True).wait_for_publish(5)
        wait_until(lambda: len(got) >= 2, 10, "the allowed messages")
        time.sleep(0.5)
        assert sorted(got) == [("toma-edge/v1/acl/dev-10/events", b"{}"),
                               ("toma-edge/v1/acl/dev-11/jobs/r-2", b"real")], got
    finally:
        dep.publish("toma-edge/v1/acl/dev-11/jobs/r-2", b"", qos=1,
                    retain=True).wait_for_publish(5)
        for c in (reader, spy, dev, dep):
            c.loop_stop()
            c.disconnect()


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_controller_state_on_both_stores(mqtt_broker: Broker, example_bundle: Path,
                                         tmp_path: Path, kind: str,
                                         request: pytest.FixtureRequest) -> None:
    """The controller on each store, step by step: the job and its chunk reach the device's
    own jobs topic (read as that device), the device's events (stored as `fleet collect`
    stores them) move it on, its retained messages are cleared once it is final, the
    second wave goes out only then; a second controller takes over a silent one without
    resending, aborts past the threshold and sends the rollback job."""
    from toma_edge.host.fleet.rollout import Controller, RolloutParams, start_rollout
    from toma_edge.host.fleet.store import Record
    from toma_edge.telemetry import EventMessage, StatusMessage, make_client

    db = str(tmp_path / "fleet.db") if kind == "sqlite" else request.getfixturevalue("pg_url")
    store = open_store(db)
    now = time.time()
    devs = ["dev-10", "dev-11"]
    store.write_batch([Record("st", d, StatusMessage(online=True, ts=now, model="m"), now)
                       for d in devs])
    rid = start_rollout(store, example_bundle, fleet="st", devices=devs,
                        params=RolloutParams(canary=1, rate="constant:1", health_window_s=1))
    got: list[tuple[str, int]] = []
    dev = make_client(mqtt_broker.settings("dev-10"), client_id="dev-10")
    dev.on_message = lambda cl, ud, m: got.append((m.topic, len(m.payload)))
    dev.connect("127.0.0.1", mqtt_broker.port)
    dev.subscribe("toma-edge/v1/st/dev-10/jobs/#", qos=1)
    dev.loop_start()
    seq = [0]

    def report(d: str, *kinds: str) -> None:
        recs = []
        for k in kinds:
            seq[0] += 1
            recs.append(Record("st", d, EventMessage(seq=seq[0], ts=time.time(),
                                                     kind=f"rollout.{k}",
                                                     fields={"rollout_id": rid}), time.time()))
        store.write_batch(recs)

    ctl = Controller(store, mqtt_broker.settings("deployer"), rid, poll_s=0.05)
    try:
        ctl.claim()
        assert ctl.step() is None
        assert [(d["device_id"], d["state"]) for d in store.rollout_devices(rid)] == [
            ("dev-10", "sent"), ("dev-11", "pending")]
        wait_until(lambda: len(got) >= 2, 10, "the job and its chunk at the device")
        assert sorted(t.rsplit("/", 2)[-1] for t, n in got if n) == ["0", rid], got
        assert ctl.step() is None and store.rollout_devices(rid)[1]["state"] == "pending"
        report("dev-10", "received", "downloaded", "verified", "live", "healthy")
        got.clear()
        assert ctl.step() is None  # dev-10 final: cleared; dev-11's wave goes out
        wait_until(lambda: len(got) >= 2, 10, "the clearing of dev-10's retained messages")
        assert all(n == 0 for _t, n in got), got
        assert [d["state"] for d in store.rollout_devices(rid)] == ["healthy", "sent"]
        sent_at = store.rollout_devices(rid)[1]["sent_at"]
        ctl.close()
        # a second controller (the first one is this live process: take it over by name)
        ctl2 = Controller(store, mqtt_broker.settings("deployer"), rid, poll_s=0.05)
        ctl2.owner = "elsewhere:1"
        with pytest.raises(Exception, match="is being run by"):
            ctl2.claim()
        store.update_rollout(rid, heartbeat=now - 3600)  # the first one went silent
        ctl2.claim()
        got.clear()
        report("dev-11", "received", "refused")  # 1 of 2 failed: past 10%, abort
        assert ctl2.step() is None
        assert (store.rollout(rid) or {}).get("state") == "aborting"
        assert store.rollout_devices(rid)[1]["sent_at"] == sent_at  # not sent again
        wait_until(lambda: any(n for _t, n in got), 10, "the rollback job at dev-10")
        job = [t for t, n in got if n]
        assert job == [f"toma-edge/v1/st/dev-10/jobs/{rid}"], got
        assert ctl2.step() is None  # waits for dev-10 to roll back
        report("dev-10", "rolled_back")
        out = ctl2.run()
        assert out.state == "aborted" and "dev-11: refused" in out.reason, out
        assert out.devices == {"dev-10": "rolled_back", "dev-11": "refused"}
    finally:
        ctl.close()
        dev.loop_stop()
        dev.disconnect()
        store.close()
