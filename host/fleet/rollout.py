"""The fleet rollout controller (issue 15): a staged, health-gated deployment over MQTT.

    from toma_edge.host.fleet.rollout import RolloutParams, start_rollout, Controller
    from toma_edge.host.fleet.store import open_store
    from toma_edge.telemetry import mqtt_settings
    store = open_store("fleet.db")
    rid = start_rollout(store, "dist/rpi4.tar.gz", fleet="plant-7", devices=None,
                        params=RolloutParams(canary=1, rate="exponential:2,2"))
    outcome = Controller(store, mqtt_settings("mqtts://deployer@broker.lan"), rid).run()
    print(outcome.state, outcome.reason)          # succeeded / failed / aborted, one line

The rollout's whole state is in the fleet store (``rollouts``, ``rollout_devices``), so a
controller killed at any point resumes with :class:`Controller` on the same id: what it
published is recorded after the broker acknowledged it, and what it would publish again
(a retained job document, its chunks, a rollback) is the same message on the same topic,
which a device treats as the job it already knows (toma_edge.rollout_protocol).

Transport (user ``deployer``): per device the retained chunks of the bundle archive, then
the retained job document, under ``toma-edge/v1/<fleet>/<device>/jobs/<rollout_id>``.
Progress: the devices' ``rollout.*`` events, which ``toma-edge fleet collect`` stores in the
``events`` table. Waves: the canary (``canary`` devices), then waves sized by ``rate``
(``constant:N`` or ``exponential:BASE,FACTOR``); a wave is sent only when every device of
the earlier waves is final (healthy, refused, rolled back) or offline (its retained job
waits for it until the deadline). Past the failure threshold (``abort_failed`` of the
targeted devices and at least ``abort_min`` of them: refused, failed or rolled back) the
rollout aborts: pending devices never get the job, every device that may have taken the
new release gets a ``rollback`` job. A device's retained messages are cleared once it is
final. The rollout ends ``succeeded`` (every device healthy on the new release),
``failed`` (it ran to the end but some device refused, failed or timed out) or
``aborted``.
"""

from __future__ import annotations

import math
import os
import socket
import tarfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ...errors import BundleError, ConfigError, InputError, TelemetryError
from ...jsonio import dumps, loads
from ...rollout_protocol import (
    DEFAULT_CHUNK_BYTES,
    ArchiveChunks,
    BundleRef,
    JobDocument,
    ReleaseRef,
    chunk_archive,
    clear_job,
    publish_job,
)
from ...telemetry import MqttSettings, connect_properties, make_client, validate_id

__all__ = ["RolloutParams", "Outcome", "parse_rate", "parse_percent", "plan_waves",
           "start_rollout", "Controller", "request_abort", "summary_line", "FINAL",
           "TAKEN", "owner_alive"]

FINAL = frozenset({"healthy", "refused", "rolled_back", "timed_out", "skipped"})
"""Device states after which the controller does nothing more for it (but a rollback)."""
TAKEN = frozenset({"sent", "received", "downloaded", "verified", "live", "healthy", "failed"})
"""Device states in which the new release may be (or may become) live on it."""
_FAILURES = frozenset({"refused", "failed", "rolled_back", "timed_out"})
_STATES = ("received", "downloaded", "verified", "refused", "live", "healthy", "failed",
           "rolled_back")
_ONLINE_WINDOW_S = 300.0  # a device reported within this: "recent" for deploy's check


@dataclass(frozen=True)
class RolloutParams:
    """How a rollout proceeds (durations in seconds; ``abort_failed`` a fraction 0..1)."""

    canary: int = 1
    rate: str = "constant:10"
    health_window_s: float = 60.0
    abort_failed: float = 0.10
    abort_min: int = 1
    timeout_s: float = 3600.0
    url: str | None = None
    max_error_rate: float = 0.05
    max_p99_ratio: float = 3.0
    crash_limit: int = 2
    allow_contract_change: bool = False
    chunk_bytes: int = DEFAULT_CHUNK_BYTES

    def check(self) -> RolloutParams:
        """ConfigError (one line) for a value out of range."""
        if self.canary < 0:
            raise ConfigError(f"--canary {self.canary} must be >= 0")
        parse_rate(self.rate)
        if not (0 <= self.health_window_s <= 7 * 86400):
            raise ConfigError(f"--health-window {self.health_window_s} s must be 0..7 days")
        if not (0 < self.abort_failed <= 1):
            raise ConfigError(f"--abort-failed {self.abort_failed:.0%} must be > 0% and <= 100%")
        if self.abort_min < 1:
            raise ConfigError(f"--abort-min {self.abort_min} must be >= 1")
        if not (self.timeout_s > 0 and math.isfinite(self.timeout_s)):
            raise ConfigError(f"--timeout {self.timeout_s} s must be > 0")
        if self.url is not None and not self.url.lower().startswith(("http://", "https://")):
            raise ConfigError(f"--url {self.url[:200]!r} must be an http:// or https:// URL")
        return self


@dataclass(frozen=True)
class Outcome:
    """How a rollout ended (or stands, for ``running``/``aborting``)."""

    rollout_id: str
    state: str
    reason: str
    devices: dict[str, str] = field(default_factory=dict)  # device id -> state

    @property
    def ok(self) -> bool:
        return self.state == "succeeded"


def parse_rate(text: str) -> tuple[str, float, float]:
    """``constant:N`` -> ("constant", N, 1); ``exponential:BASE,FACTOR`` -> (..., BASE,
    FACTOR): wave sizes after the canary. ConfigError otherwise."""
    kind, _, rest = text.strip().partition(":")
    try:
        if kind == "constant":
            n = int(rest)
            if n >= 1:
                return "constant", float(n), 1.0
        elif kind == "exponential":
            b, f = rest.split(",")
            base, factor = int(b), float(f)
            if base >= 1 and 1.0 <= factor <= 100 and math.isfinite(factor):
                return "exponential", float(base), factor
    except ValueError:
        pass
    raise ConfigError(f"--rate {text[:100]!r} must be constant:N (N >= 1) or "
                      "exponential:BASE,FACTOR (BASE >= 1, FACTOR 1..100)")


def parse_percent(text: str, *, option: str = "--abort-failed") -> float:
    """``10%`` or ``0.1`` -> 0.1; ConfigError unless in (0, 1]."""
    t = text.strip()
    try:
        v = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        v = -1.0
    if not (0 < v <= 1):
        raise ConfigError(f"{option} {text[:50]!r} must be a percentage like 10% (0-100%]")
    return v


def plan_waves(devices: Sequence[str], canary: int, rate: str) -> list[list[str]]:
    """Cut ``devices`` (in order) into waves: the first ``canary`` of them, then waves of
    the sizes ``rate`` gives (constant N: N each; exponential BASE,FACTOR: BASE, then times
    FACTOR each wave, rounded up)."""
    kind, base, factor = parse_rate(rate)
    devs = list(devices)
    waves: list[list[str]] = []
    if canary > 0 and devs:
        waves.append(devs[:canary])
        devs = devs[canary:]
    size = base
    while devs:
        n = max(1, math.ceil(size - 1e-9))
        waves.append(devs[:n])
        devs = devs[n:]
        if kind == "exponential":
            size *= factor
    return waves


# --------------------------------------------------------------------------- the bundle


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "toma-edge" / "rollouts"


def _manifest_of_archive(path: Path) -> Any:
    from ...bundle import parse_manifest

    try:
        with tarfile.open(path, "r:*") as tar:
            for m in tar:
                if m.name.lstrip("./") == "manifest.json" and m.isfile() and m.size < 1 << 20:
                    f = tar.extractfile(m)
                    if f is not None:
                        return parse_manifest(f.read(), where=f"{path.name}/manifest.json")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise BundleError(f"bundle archive {str(path)!r} cannot be read: {e}") from e
    raise BundleError(f"bundle archive {str(path)!r} has no manifest.json; is it a bundle?")


def prepare_bundle(bundle: str | Path) -> tuple[Path, Any]:
    """The archive to send for ``bundle`` (a ``.tar.gz`` as it is; a folder archived once
    into the user's cache, by content) and its manifest. BundleError when it is neither."""
    p = Path(bundle)
    if p.is_dir():
        from ...bundle import make_archive, read_manifest

        manifest = read_manifest(p / "manifest.json")
        cache = _cache_dir()
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / f".{os.getpid()}.{time.monotonic_ns()}.tar.gz"
        make_archive(p, tmp)
        import hashlib

        sha = hashlib.sha256(tmp.read_bytes()).hexdigest()
        out = cache / f"{sha}.tar.gz"
        os.replace(tmp, out)
        return out, manifest
    if not p.is_file():
        raise BundleError(f"bundle {str(p)!r} does not exist (give a bundle folder or its "
                          ".tar.gz archive)")
    return p.resolve(), _manifest_of_archive(p)


# --------------------------------------------------------------------------- starting


def start_rollout(store: Any, bundle: str | Path, *, fleet: str,
                  devices: Sequence[str] | None, params: RolloutParams,
                  now: float | None = None) -> str:
    """Check the input, plan the waves and record a new rollout (state ``running``, no
    owner yet); returns its id. ConfigError/BundleError (one line) on bad input: an
    unknown fleet or device, no device that reported recently, an unreadable bundle."""
    params.check()
    validate_id(fleet, what="fleet")
    known = store.fleet_device_ids(fleet)
    if devices is None:
        if not known:
            raise ConfigError(f"fleet {fleet!r} has no devices in the store; is `toma-edge "
                              "fleet collect` running for it? (or name them with --devices)")
        targets = known
    else:
        targets = []
        for d in devices:
            validate_id(d)
            if d not in targets:
                targets.append(d)
        if not targets:
            raise ConfigError("--devices names no device")
        unknown = [d for d in targets if d not in known]
        if unknown:
            raise ConfigError(f"device {unknown[0]!r} of fleet {fleet!r} is not in the store "
                              f"({len(unknown)} unknown); has `toma-edge fleet collect` seen it?")
    t = time.time() if now is None else now
    rows = {r.device_id: r for r in store.devices() if r.fleet == fleet}
    recent = [d for d in targets if rows.get(d) and rows[d].last_seen
              and t - float(rows[d].last_seen) <= _ONLINE_WINDOW_S]
    if not recent:
        raise ConfigError(f"no targeted device of fleet {fleet!r} reported in the last "
                          f"{_ONLINE_WINDOW_S:.0f} s; is `toma-edge fleet collect` running?")
    archive, manifest = prepare_bundle(bundle)
    if params.url is not None:
        import hashlib

        data = archive.read_bytes()
        ref = BundleRef(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data), chunks=0,
                        chunk_bytes=params.chunk_bytes, url=params.url)
    else:
        ref = chunk_archive(archive, params.chunk_bytes).bundle
    job = JobDocument(
        rollout_id="r-pending", action="install", bundle=ref,
        release=ReleaseRef(name=manifest.name, version=manifest.version),
        allow_contract_change=params.allow_contract_change,
        health_window_s=params.health_window_s, max_error_rate=params.max_error_rate,
        max_p99_ratio=params.max_p99_ratio, crash_limit=params.crash_limit,
        deadline=t + params.timeout_s)
    waves = plan_waves(targets, params.canary, params.rate)
    row = dict(fleet=fleet, state="running", reason="", release_name=manifest.name,
               release_version=manifest.version, bundle_sha256=ref.sha256,
               bundle_bytes=ref.bytes, bundle_path=str(archive),
               params=dumps(asdict(params)).decode(), job=job.model_dump_json(), wave=0,
               created_at=t, updated_at=t, deadline=t + params.timeout_s, finished_at=None,
               owner="", heartbeat=None)
    return str(store.create_rollout(row, [(d, w) for w, ws in enumerate(waves) for d in ws]))


def request_abort(store: Any, rollout_id: str, reason: str = "aborted by the operator") -> None:
    """Ask for an abort: the controller that runs the rollout (or the next one resumed)
    rolls back every device that took the release. ConfigError for an unknown or ended
    rollout."""
    r = store.rollout(rollout_id)
    if r is None:
        raise ConfigError(f"rollout {rollout_id!r} is not in the store")
    if r["state"] not in ("running", "aborting"):
        raise ConfigError(f"rollout {rollout_id} already ended: {r['state']}")
    store.update_rollout(rollout_id, state="aborting", reason=reason)


def summary_line(outcome: Outcome) -> str:
    """One line: the rollout, its state and why."""
    return f"rollout {outcome.rollout_id} {outcome.state}: {outcome.reason}"


# --------------------------------------------------------------------------- controlling


def owner_alive(owner: str) -> bool:
    """Whether ``host:pid`` names a live process on this host (a remote one: assume so)."""
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fields(text: str) -> dict[str, Any]:
    try:
        v = loads(text, what="event fields")
    except InputError:
        return {}
    return v if isinstance(v, dict) else {}


def _figures(fields: dict[str, Any]) -> str:
    """The misfit figures of a refusal, in MB (empty when there are none)."""
    keys = ("need_bytes", "budget_bytes", "peak_bytes", "baseline_bytes")
    if not all(isinstance(fields.get(k), int) for k in keys[:2]):
        return ""
    parts = [f"{k.removesuffix('_bytes')} {fields[k] / 1e6:.1f} MB" for k in keys
             if isinstance(fields.get(k), int)]
    return " (" + ", ".join(parts) + ")"


class Controller:
    """Drives one rollout to its end from the store's state (see the module docstring).

    ``settings``: the deployer's MQTT settings; ``poll_s``: seconds between looks at the
    store; ``on_change(device, state, reason)``: called for each device's new state."""

    def __init__(self, store: Any, settings: MqttSettings, rollout_id: str, *,
                 poll_s: float = 0.5, stale_s: float = 30.0,
                 on_change: Callable[[str, str, str], None] | None = None) -> None:
        row = store.rollout(rollout_id)
        if row is None:
            raise ConfigError(f"rollout {rollout_id!r} is not in the store")
        self.store = store
        self.settings = settings
        self.rid = rollout_id
        self.poll_s = poll_s
        self.stale_s = stale_s
        self.on_change = on_change
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self.fleet = str(row["fleet"])
        job = JobDocument.model_validate_json(str(row["job"]))
        self.job = job.model_copy(update={"rollout_id": rollout_id})
        self._parts: ArchiveChunks | None = None
        self._client: Any = None
        self.params = RolloutParams(**_fields(str(row["params"])))
        self.bytes_published = 0

    # -- MQTT -------------------------------------------------------------------------------
    def _connect(self) -> Any:
        if self._client is not None:
            return self._client
        import threading

        user = self.settings.url.username or "deployer"
        client = make_client(self.settings, client_id=user)
        ready = threading.Event()
        result: list[Any] = []

        def on_connect(c: Any, _u: Any, _f: Any, rc: Any, _p: Any = None) -> None:
            result.append(rc)
            ready.set()

        client.on_connect = on_connect
        try:
            client.connect(self.settings.url.host, self.settings.url.port, keepalive=30,
                           clean_start=True, properties=connect_properties())
        except OSError as e:
            raise TelemetryError(f"cannot reach the broker at {self.settings.url.host}:"
                                 f"{self.settings.url.port}: {e}") from e
        client.loop_start()
        if not ready.wait(15) or getattr(result[0], "is_failure", False):
            client.loop_stop()
            why = str(result[0]) if result else "no answer within 15 s"
            raise TelemetryError(f"the broker refused the deployer's connection: {why}")
        self._client = client
        return client

    def close(self) -> None:
        """Disconnect from the broker."""
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
            self._client = None

    def _archive(self) -> ArchiveChunks:
        if self._parts is None:
            row = self.store.rollout(self.rid)
            path = Path(str(row["bundle_path"]))
            bundle = self.job.bundle
            assert bundle is not None
            try:
                parts = chunk_archive(path, bundle.chunk_bytes)
            except (BundleError, ConfigError) as e:
                raise BundleError(f"rollout {self.rid}: its bundle archive is gone: {e}") from e
            if parts.bundle.sha256 != bundle.sha256:
                raise BundleError(f"rollout {self.rid}: {path} changed since the rollout "
                                  "started (sha256 differs); abort it")
            self._parts = parts
        return self._parts

    def _send_install(self, dev: str) -> None:
        assert self.job.bundle is not None
        parts = None if self.job.bundle.url else self._archive()
        publish_job(self._connect(), self.fleet, dev, self.job, parts)
        self.bytes_published += (parts.bundle.bytes if parts else 0) + len(self.job.encode())

    def _send_rollback(self, dev: str) -> None:
        job = JobDocument(rollout_id=self.rid, action="rollback",
                          release=self.job.release, deadline=self.job.deadline)
        client = self._connect()
        chunks = self.job.bundle.chunks if self.job.bundle else 0
        clear_job(client, self.fleet, dev, self.rid, chunks)  # chunks first, then the job
        publish_job(client, self.fleet, dev, job)

    def _clear(self, dev: str) -> None:
        chunks = self.job.bundle.chunks if self.job.bundle else 0
        clear_job(self._connect(), self.fleet, dev, self.rid, chunks)

    # -- the loop ---------------------------------------------------------------------------
    def claim(self) -> None:
        """Become the rollout's controller; ConfigError when another live one holds it."""
        row = self.store.rollout(self.rid)
        prev = str(row["owner"] or "")
        dead = prev if prev and not owner_alive(prev) else None
        if not self.store.claim_rollout(self.rid, self.owner, now=time.time(),
                                        take_from=dead, stale_s=self.stale_s):
            raise ConfigError(f"rollout {self.rid} is being run by {prev} (heartbeat within "
                              f"{self.stale_s:.0f} s); abort it with `fleet rollout "
                              f"{self.rid} --abort`")

    def run(self, *, until: float | None = None) -> Outcome:
        """Claim the rollout and drive it until it ends (or ``until``, unix s); returns how
        it stands. Safe to call again after any crash (from any process)."""
        row = self.store.rollout(self.rid)
        if row["state"] in ("succeeded", "failed", "aborted"):
            return self.outcome()
        self.claim()
        try:
            while True:
                done = self.step()
                if done is not None:
                    return done
                if until is not None and time.time() >= until:
                    return self.outcome()
                time.sleep(self.poll_s)
        finally:
            self.close()

    def _device_views(self) -> tuple[dict[str, dict[str, Any]], dict[str, tuple[str, str,
                                                                                  dict[str, Any]]]]:
        devs = {d["device_id"]: d for d in self.store.rollout_devices(self.rid)}
        row = self.store.rollout(self.rid)
        reported: dict[str, tuple[str, str, dict[str, Any]]] = {}
        for ev in self.store.rollout_events(self.fleet,
                                            since=float(row["created_at"]) - 120.0):
            dev = str(ev["device_id"])
            if dev not in devs:
                continue
            f = _fields(str(ev["fields"]))
            if f.get("rollout_id") != self.rid:
                continue
            state = str(ev["kind"]).removeprefix("rollout.")
            if state in _STATES:  # by seq: the last one wins
                reason = str(f.get("reason") if isinstance(f.get("reason"), str) else "")
                if state == "rolled_back" and dev in reported and reported[dev][0] == "failed":
                    reason = f"{reported[dev][1]}; rolled back" if reported[dev][1] else reason
                reported[dev] = (state, reason[:300], f)
        return devs, reported

    def _online(self) -> dict[str, bool]:
        out: dict[str, bool] = {}
        for r in self.store.devices():
            if r.fleet == self.fleet:
                out[r.device_id] = bool(r.online) if r.online is not None else True
        return out

    def step(self) -> Outcome | None:
        """One look at the store and one round of publishing; an Outcome once it ended."""
        now = time.time()
        if not self.store.update_rollout(self.rid, where_owner=self.owner, heartbeat=now):
            row = self.store.rollout(self.rid)
            raise ConfigError(f"rollout {self.rid} was taken over by {row['owner']}")
        row = self.store.rollout(self.rid)
        state = str(row["state"])
        devs, reported = self._device_views()
        # 1. what the devices reported
        for dev, d in devs.items():
            if dev in reported and d["state"] not in ("timed_out", "skipped"):
                new, reason, f = reported[dev]
                if new == "refused":
                    reason = (reason or "refused") + _figures(f)
                if new != d["state"] or reason != d["reason"]:
                    self.store.update_rollout_device(self.rid, dev, state=new, reason=reason,
                                                     detail=dumps(f).decode())
                    d.update(state=new, reason=reason)
                    if self.on_change:
                        self.on_change(dev, new, reason)
        # 2. clear the retained messages of devices that are final
        for dev, d in devs.items():
            if d["state"] in FINAL and d["sent_at"] is not None and not d["cleared"]:
                self._clear(dev)
                self.store.update_rollout_device(self.rid, dev, cleared=1)
                d["cleared"] = 1
        n = len(devs)
        bad = [d for d in devs.values() if d["state"] in _FAILURES]
        if state == "running":
            p = self.params
            if bad and len(bad) >= p.abort_min and len(bad) / n >= p.abort_failed:
                state = "aborting"
                why = "; ".join(f"{d['device_id']}: {d['state']} {d['reason']}".strip()
                                for d in bad[:3])
                self.store.update_rollout(self.rid, state=state, reason=(
                    f"{len(bad)} of {n} devices failed (threshold {p.abort_failed:.0%}, "
                    f"at least {p.abort_min}): {why}")[:1000])
        if state == "aborting":
            return self._abort_step(devs, now)
        if state != "running":
            return self.outcome()
        # 3. the deadline
        if now > float(row["deadline"]):
            for dev, d in devs.items():
                if d["state"] not in FINAL:
                    if d["sent_at"] is not None:
                        self._clear(dev)
                    self.store.update_rollout_device(self.rid, dev, state="timed_out",
                                                     reason="no final state before the "
                                                     "rollout's timeout", cleared=1)
            return self._finish()
        # 4. the next wave, when the earlier ones are final or offline
        online = self._online()
        waves = sorted({int(d["wave"]) for d in devs.values()})
        for w in waves:
            pending = [dev for dev, d in devs.items() if d["wave"] == w and d["state"] == "pending"]
            if pending:
                for dev in pending:
                    self._send_install(dev)
                    self.store.update_rollout_device(self.rid, dev, state="sent", sent_at=now)
                    if self.on_change:
                        self.on_change(dev, "sent", f"wave {w}")
                self.store.update_rollout(self.rid, wave=w)
                break
            waiting = [dev for dev, d in devs.items() if d["wave"] == w
                       and d["state"] not in FINAL and online.get(dev, True)]
            if waiting:
                break
        if all(d["state"] in FINAL for d in devs.values()):
            return self._finish()
        return None

    def _abort_step(self, devs: dict[str, dict[str, Any]], now: float) -> Outcome | None:
        waiting = False
        online = self._online()
        for dev, d in devs.items():
            st = d["state"]
            if st == "pending":
                self.store.update_rollout_device(self.rid, dev, state="skipped",
                                                 reason="rollout aborted before its wave")
            elif st == "failed":  # it rolls back by itself (rollout.rolled_back follows)
                waiting = waiting or (online.get(dev, True) and now <= float(self.job.deadline))
            elif st in TAKEN and d["rollback_sent_at"] is None:
                self._send_rollback(dev)
                self.store.update_rollout_device(self.rid, dev, rollback_sent_at=now,
                                                 cleared=0)
                waiting = True
            elif st in TAKEN:  # an offline device finds the retained rollback job later
                waiting = waiting or (online.get(dev, True) and now <= float(self.job.deadline))
            elif st == "rolled_back" and d["rollback_sent_at"] is not None and not d["cleared"]:
                self._clear(dev)
                self.store.update_rollout_device(self.rid, dev, cleared=1)
        if waiting:
            return None
        row = self.store.rollout(self.rid)
        self.store.update_rollout(self.rid, state="aborted", finished_at=now,
                                  reason=str(row["reason"]) or "aborted")
        return self.outcome()

    def _finish(self) -> Outcome:
        devs = self.store.rollout_devices(self.rid)
        healthy = [d for d in devs if d["state"] == "healthy"]
        row = self.store.rollout(self.rid)
        release = f"{row['release_name']} {row['release_version']}"
        if len(healthy) == len(devs):
            state, reason = "succeeded", f"{len(devs)} of {len(devs)} devices healthy on {release}"
        else:
            others = [d for d in devs if d["state"] != "healthy"]
            why = "; ".join(f"{d['device_id']} {d['state']}"
                            + (f": {d['reason']}" if d["reason"] else "") for d in others[:4])
            more = f" (+{len(others) - 4} more)" if len(others) > 4 else ""
            state = "failed"
            reason = (f"{len(healthy)} of {len(devs)} devices healthy on {release}; "
                      f"{why}{more}")
        self.store.update_rollout(self.rid, state=state, reason=reason[:1000],
                                  finished_at=time.time())
        return self.outcome()

    def outcome(self) -> Outcome:
        """How the rollout stands in the store now."""
        row = self.store.rollout(self.rid)
        devs = {d["device_id"]: d["state"] for d in self.store.rollout_devices(self.rid)}
        return Outcome(self.rid, str(row["state"]), str(row["reason"]), devs)
