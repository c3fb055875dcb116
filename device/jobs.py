"""The device's side of a fleet rollout: take the job, download, verify, check the
contract and the fit, swap, watch the health window, roll back on its own.

    runner = RolloutRunner(svc, Releases.for_service(...))
    path = runner.prepare(config.bundle)      # at start: a crash loop after a swap -> previous
    svc.holder.replace(path); runner.start()  # subscribes .../jobs/+ on the agent's connection
    runner.record(latency_s, error=False)     # each answered request (the health window)

Jobs (:class:`~toma_edge.rollout_protocol.JobDocument`) arrive retained on
``toma-edge/v1/<fleet>/<device>/jobs/<rollout_id>``; paho's thread only queues messages,
one worker thread does everything else, so no exception and no slow work reaches paho.
An install job: ``rollout.received``; the bundle from the job's chunk topics (subscribed
while downloading, so the broker replays every retained chunk; each kept as a file once
its sha256 matches the job's, so a restarted device keeps what it has) or from its URL;
``rollout.downloaded``; the archive's sha256, unpacked beside the releases, the bundle's
own hashes and signature (``--trust-key``: unsigned refused); ``rollout.verified``; the
contract (:func:`~.service.models.contract_difference`, unless the job allows a change)
and the fit (the bundle's measured peak at its max batch plus this process's measured
baseline within the budget); warm-up beside the live model and the swap
(:meth:`~.service.models.ModelHolder.replace`: no request fails); ``current`` switched,
``previous`` kept; ``rollout.live``. Then for ``health_window_s`` seconds: the error rate
(answers >= 500), p99 latency against the previous model's (``max_p99_ratio``) and the
RSS against the budget; a failed check: ``rollout.failed``, the previous release back,
``rollout.rolled_back``; else ``rollout.healthy``. Any refusal: ``rollout.refused`` with a
one-line reason (and the figures of a misfit). A ``rollback`` job goes back to the release
the rollout replaced. A service that starts ``crash_limit`` times while a swap is on
probation (pending marker) starts the previous release instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import queue
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import rollout_protocol as rp
from ..bundle import archive_limits, extract_archive, verify_bundle
from ..errors import BudgetError, TomaEdgeError
from ..probes import rss_bytes
from .agent import ThrottledLog
from .bundle import runtime_executorch_version
from .releases import Releases, release_name

if TYPE_CHECKING:
    from .service.app import Service

__all__ = ["RolloutRunner", "Refused"]

log = logging.getLogger("toma_edge.rollout")

_MIN_REQUESTS = 20
"""Requests a health check needs before it judges an error rate or a p99."""
_TICK_S = 0.25


class Refused(TomaEdgeError):
    """A job this device will not carry out (the message is the event's reason)."""

    def __init__(self, reason: str, **figures: int) -> None:
        super().__init__(reason)
        self.figures = figures


def _p99(values: list[float]) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, math.ceil(0.99 * len(s)) - 1)]


def _valid_marker(m: dict[str, Any]) -> bool:
    """Whether a pending marker holds what a restart and a health watch need."""
    kinds: dict[str, tuple[type, ...]] = {
        "rollout_id": (str,), "from": (str,), "to": (str,), "crashes": (int,),
        "crash_limit": (int,), "health_window_s": (int, float), "max_error_rate": (int, float),
        "max_p99_ratio": (int, float), "budget_bytes": (int,)}
    return all(isinstance(m.get(k), t) and not isinstance(m.get(k), bool)
               for k, t in kinds.items())


class _Download:
    """One install job's download in progress."""

    def __init__(self, job: rp.JobDocument, folder: Path) -> None:
        self.job = job
        self.folder = folder
        self.started = time.monotonic()
        self.have: set[int] = set()
        assert job.bundle is not None
        for n in range(job.bundle.chunks):  # what a previous run kept, verified again
            f = folder / f"chunk-{n}"
            if f.is_file():
                if hashlib.sha256(f.read_bytes()).hexdigest() == job.bundle.chunk_sha256[n]:
                    self.have.add(n)
                else:
                    f.unlink()
        self.resumed = len(self.have)


class RolloutRunner:
    """Carries out the rollout jobs of one service (see the module docstring)."""

    def __init__(self, svc: Service, releases: Releases) -> None:
        self.svc = svc
        self.rel = releases
        self._q: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client: Any = None
        self._root = ""
        self._dl: _Download | None = None
        self._throttled = ThrottledLog(log)
        self._startup_events: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()
        #: latencies (s) of the model serving now, newest last; errors counted apart
        self._lat: deque[float] = deque(maxlen=5000)
        self._errors = 0
        self._requests = 0
        self._watch: dict[str, Any] | None = None
        self.callback_errors = 0

    # -- start -----------------------------------------------------------------------------
    def prepare(self, bundle: str) -> str:
        """The bundle path the service should load: ``current`` of the state folder once a
        rollout installed one, the previous release when a swap on probation crashed
        ``crash_limit`` times (reported as failed + rolled back once connected)."""
        self.rel.clean_temp()
        serve = bundle
        if not Path(bundle).is_symlink() and self.rel.current() is not None:
            serve = str(self.rel.current_link)
            log.info("serving %s (installed by a rollout) instead of %s", serve, bundle)
        pending = self.rel.read_pending()
        if pending is None:
            return serve
        if not _valid_marker(pending):
            log.error("rollout pending marker %s is damaged; dropped", self.rel.pending_path)
            self.rel.clear_pending()
            return serve
        if pending.get("clean_stop"):
            pending["clean_stop"] = False
        else:
            pending["crashes"] = int(pending.get("crashes", 0)) + 1
        self.rel.write_pending(pending)
        limit = int(pending.get("crash_limit", 2))
        if pending["crashes"] >= limit:
            return self._crash_rollback(pending, f"the service stopped {pending['crashes']} "
                                        f"times within the health window (crash limit {limit})")
        log.warning("rollout %s: service restarted during the health window (%d of %d crashes)",
                    pending.get("rollout_id"), pending["crashes"], limit)
        return serve

    def load_failed(self, error: Exception) -> str | None:
        """The release to serve when the one on probation cannot even load; None if none."""
        pending = self.rel.read_pending()
        if pending is None or not _valid_marker(pending):
            return None
        return self._crash_rollback(pending, f"the new release cannot start: {error}"[:500])

    def _crash_rollback(self, pending: dict[str, Any], reason: str) -> str:
        back = Path(str(pending.get("from", "")))
        fields = {"rollout_id": pending.get("rollout_id"), "version": pending.get("version"),
                  "sha256": pending.get("sha256")}
        if not back.is_dir():
            log.error("rollout %s: %s, but the previous release %s is gone; keeping the new "
                      "one", fields["rollout_id"], reason, back)
            self.rel.clear_pending()
            self._startup_events.append((rp.FAILED, {
                **fields, "reason": f"{reason}; the previous release is gone"[:500]}))
            return str(self.rel.current_link)
        log.error("rollout %s: %s; starting the previous release %s", fields["rollout_id"],
                  reason, back)
        self.rel.back(back)
        self.rel.clear_pending()
        rid = str(pending.get("rollout_id"))
        self.rel.remember(rid, "install", rp.ROLLED_BACK, reason=reason)
        self._startup_events += [(rp.FAILED, {**fields, "reason": reason}),
                                 (rp.ROLLED_BACK, {**fields, "reason": reason})]
        return str(self.rel.current_link)

    def start(self) -> None:
        """Report what happened at start, subscribe to the jobs on the agent's connection
        and start the worker (a health window left on probation starts again)."""
        agent = self.svc.agent
        for kind, fields in self._startup_events:
            self._event(kind, fields)
        self._startup_events.clear()
        pending = self.rel.read_pending()
        if pending is not None:
            self._begin_watch(pending)
        self._thread = threading.Thread(target=self._work, name="toma-edge-rollout",
                                        daemon=True)
        self._thread.start()
        if agent is None or agent.client is None:
            log.warning("rollout jobs need --mqtt with telemetry; none are taken")
            return
        self._root = rp.jobs_subscription(self.svc.fleet, self.svc.device_id)[:-2]
        self._client = agent.client
        self._client.message_callback_add(f"{self._root}/+", self._on_message)
        self._client.message_callback_add(f"{self._root}/+/chunk/+", self._on_message)
        agent.share_connection(on_connect=self._connected, on_disconnect=lambda: None)

    def close(self) -> None:
        """Stop the worker; a swap on probation stays pending (a clean stop is no crash)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        pending = self.rel.read_pending()
        if pending is not None:
            pending["clean_stop"] = True
            self.rel.write_pending(pending)

    # -- paho's thread: queue only ---------------------------------------------------------
    def _connected(self, properties: Any) -> None:
        self._client.subscribe(f"{self._root}/+", qos=1)
        if self._dl is not None:
            self._client.subscribe(
                rp.chunks_subscription(self.svc.fleet, self.svc.device_id,
                                       self._dl.job.rollout_id), qos=1)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        try:
            self._q.put((str(msg.topic), bytes(msg.payload)))
        except Exception:  # noqa: BLE001 - never into paho's thread
            self.callback_errors += 1

    # -- the worker ------------------------------------------------------------------------
    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                topic, payload = self._q.get(timeout=_TICK_S)
            except queue.Empty:
                topic, payload = "", b""
            try:
                if topic:
                    self._handle(topic, payload)
                self._tick()
            except Exception as e:  # noqa: BLE001 - the worker must survive anything
                self.callback_errors += 1
                self._throttled(logging.ERROR, "worker", "rollout worker: %s", e,
                                exc_info=True)

    def _handle(self, topic: str, payload: bytes) -> None:
        try:
            _, _, rid, chunk = rp.parse_job_topic(topic)
        except TomaEdgeError as e:
            self._throttled(logging.WARNING, "topic", "rollout: %s", e)
            return
        if not payload:
            return  # a cleared retained message
        if chunk is not None:
            self._chunk(rid, chunk, payload)
            return
        try:
            job = rp.decode_job(payload)
            if job.rollout_id != rid:
                raise Refused(f"job names rollout {job.rollout_id!r} on the topic of {rid!r}")
        except TomaEdgeError as e:
            if self.rel.outcome(rid, "invalid") is None:
                self.rel.remember(rid, "invalid", rp.REFUSED)
                self._event(rp.REFUSED, {"rollout_id": rid, "version": None, "sha256": None,
                                         "reason": str(e)[:500]})
            return
        if self.rel.outcome(job.rollout_id, job.action) is not None:
            return  # done before (retained job seen again): never twice
        if job.action == "install" and job.expired():
            log.info("rollout %s: past its deadline; ignored", rid)
            return
        if job.action == "rollback":
            self._rollback_job(job)
        else:
            self._install_job(job)

    # -- install ---------------------------------------------------------------------------
    def _install_job(self, job: rp.JobDocument) -> None:
        pending = self.rel.read_pending()
        if pending is not None and pending.get("rollout_id") == job.rollout_id:
            return  # swapped already, on probation: the watch runs
        if self._dl is not None:
            if self._dl.job.rollout_id == job.rollout_id:
                return
            self._refuse(self._dl.job, "a newer rollout job replaced this one")
        assert job.bundle is not None
        if self.rel.outcome(job.rollout_id, "received") is None:
            self.rel.remember(job.rollout_id, "received", rp.RECEIVED)
            self._event(rp.RECEIVED, rp.event_fields(job, bytes=job.bundle.bytes,
                                                      chunks=job.bundle.chunks))
        folder = self.rel.download_folder(job.rollout_id)
        archive = folder / "bundle.tar.gz"
        if job.bundle.url is not None:
            t0 = time.monotonic()
            try:
                self._fetch(job, archive)
            except Refused as e:
                self._refuse(job, str(e))
                return
            self._downloaded(job, archive, time.monotonic() - t0, 0)
            return
        self._dl = _Download(job, folder)
        if self._dl.resumed:
            log.info("rollout %s: resuming the download with %d of %d chunks kept",
                     job.rollout_id, self._dl.resumed, job.bundle.chunks)
        if not self._maybe_complete() and self._client is not None:
            self._client.subscribe(rp.chunks_subscription(self.svc.fleet, self.svc.device_id,
                                                          job.rollout_id), qos=1)

    def _chunk(self, rid: str, n: int, payload: bytes) -> None:
        dl = self._dl
        if dl is None or dl.job.rollout_id != rid or n in dl.have:
            return
        b = dl.job.bundle
        assert b is not None
        if n >= b.chunks or len(payload) != b.chunk_size(n) \
                or hashlib.sha256(payload).hexdigest() != b.chunk_sha256[n]:
            self._refuse(dl.job, f"chunk {n} of the bundle does not match the job's sha256 "
                         "(tampered or corrupt)")
            return
        f = dl.folder / f"chunk-{n}"
        tmp = f.with_name(f"{f.name}.part")
        tmp.write_bytes(payload)
        tmp.replace(f)
        dl.have.add(n)
        self._maybe_complete()

    def _maybe_complete(self) -> bool:
        dl = self._dl
        if dl is None:
            return False
        b = dl.job.bundle
        assert b is not None
        if len(dl.have) < b.chunks:
            return False
        self._dl = None
        if self._client is not None:
            self._client.unsubscribe(rp.chunks_subscription(self.svc.fleet, self.svc.device_id,
                                                            dl.job.rollout_id))
        archive = dl.folder / "bundle.tar.gz"
        with open(archive, "wb") as out:
            for n in range(b.chunks):
                out.write((dl.folder / f"chunk-{n}").read_bytes())
        self._downloaded(dl.job, archive, time.monotonic() - dl.started, dl.resumed)
        return True

    def _fetch(self, job: rp.JobDocument, archive: Path) -> None:
        b = job.bundle
        assert b is not None and b.url is not None
        try:
            with urllib.request.urlopen(b.url, timeout=30) as r, open(archive, "wb") as out:
                left = b.bytes + 1
                while left > 0:
                    data = r.read(min(1 << 16, left))
                    if not data:
                        break
                    out.write(data)
                    left -= len(data)
        except urllib.error.HTTPError as e:
            raise Refused(f"cannot fetch the bundle from {b.url[:200]}: HTTP {e.code} "
                          f"{e.reason}") from e
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise Refused(f"cannot fetch the bundle from {b.url[:200]}: "
                          f"{getattr(e, 'reason', None) or e}") from e
        if archive.stat().st_size > b.bytes:
            raise Refused(f"the bundle at its url is larger than the job's {b.bytes} bytes")

    def _downloaded(self, job: rp.JobDocument, archive: Path, seconds: float,
                    resumed: int) -> None:
        b = job.bundle
        assert b is not None
        self._event(rp.DOWNLOADED, rp.event_fields(job, bytes=archive.stat().st_size,
                                                    seconds=round(seconds, 3),
                                                    resumed_chunks=resumed))
        tmp = dest = None
        try:
            tmp, version = self._verify_and_unpack(job, archive)
            self._check(job, tmp)
            dest = self.rel.keep(tmp, release_name(version, b.sha256))
            self._swap(job, dest)
        except TomaEdgeError as e:
            for d in (tmp, dest):  # nothing half-installed, nothing refused kept
                if d is not None and d.is_dir() and d not in self._in_use():
                    shutil.rmtree(d, ignore_errors=True)
            self._refuse(job, str(e), **(e.figures if isinstance(e, Refused) else {}))
        finally:
            self.rel.drop_download(job.rollout_id)

    def _in_use(self) -> set[Path]:
        return {p for p in (self.rel.current(), self.rel.previous(),
                            Path(self.svc.model.source).resolve()) if p is not None}

    def _verify_and_unpack(self, job: rp.JobDocument, archive: Path) -> tuple[Path, str]:
        b = job.bundle
        assert b is not None
        h = hashlib.sha256()
        with open(archive, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        if archive.stat().st_size != b.bytes or h.hexdigest() != b.sha256:
            raise Refused(f"the bundle archive's sha256 {h.hexdigest()[:16]}... or size "
                          f"{archive.stat().st_size} differs from the job's (tampered or corrupt)")
        tmp = self.rel.temp_folder(job.rollout_id)
        budget = self.svc.model.predictor.budget.bytes
        try:
            extract_archive(archive, tmp, **archive_limits(budget))
            vb = verify_bundle(tmp, trust_key=self.svc.holder.trust_key,
                               runtime_executorch=runtime_executorch_version())
        except TomaEdgeError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise Refused(str(e).replace(str(tmp), "bundle")[:500]) from e
        self._event(rp.VERIFIED, rp.event_fields(job, signed=vb.signed,
                                                  name=vb.manifest.name,
                                                  bundle_version=vb.manifest.version))
        return tmp, vb.manifest.version

    def _check(self, job: rp.JobDocument, folder: Path) -> None:
        from ..bundle import MANIFEST_NAME, read_manifest
        from .service.models import contract_difference

        new = read_manifest(folder / MANIFEST_NAME)
        cur = self.svc.model.predictor
        if not job.allow_contract_change:
            diff = contract_difference(cur.manifest, new)
            if diff is not None:
                raise Refused(f"{new.name} {new.version} changes the contract clients rely on: "
                              f"{diff} (serving {cur.manifest.name} {cur.manifest.version}; "
                              "the job does not allow a contract change)")
        peak = new.memory.peak_for_batch(new.max_batch)
        baseline = cur.baseline_bytes
        budget = cur.budget.bytes
        if peak + baseline > budget:
            mib = 1 << 20
            raise Refused(
                f"{new.name} {new.version} does not fit: its measured peak at batch "
                f"{new.max_batch} ({peak / mib:.1f} MiB) plus this device's baseline "
                f"({baseline / mib:.1f} MiB) needs {(peak + baseline) / mib:.1f} MiB, over the "
                f"{budget / mib:.1f} MiB budget", need_bytes=peak + baseline,
                budget_bytes=budget, peak_bytes=peak, baseline_bytes=baseline)

    def _swap(self, job: rp.JobDocument, folder: Path) -> None:
        holder = self.svc.holder
        old = self.svc.model
        serving = Path(old.source if not self.rel.current() else self.rel.current_link).resolve()
        t0 = time.perf_counter()
        try:
            self.svc.update(folder, allow_contract_change=job.allow_contract_change,
                            label=str(folder))
        except BudgetError as e:
            raise Refused(f"the new release does not fit beside the serving one: {e}") from e
        swap_s = time.perf_counter() - t0
        with self._lock:
            prev_p99 = _p99(list(self._lat))
            prev_n = len(self._lat)
            self._lat.clear()
            self._errors = self._requests = 0
        b = job.bundle
        assert b is not None and job.release is not None
        pending = {"rollout_id": job.rollout_id, "version": job.release.version,
                   "sha256": b.sha256, "from": str(serving), "to": str(folder),
                   "crashes": 0, "crash_limit": job.crash_limit, "clean_stop": False,
                   "health_window_s": job.health_window_s,
                   "max_error_rate": job.max_error_rate, "max_p99_ratio": job.max_p99_ratio,
                   "prev_p99_s": prev_p99 if prev_n >= _MIN_REQUESTS else None,
                   "budget_bytes": holder.current.predictor.budget.bytes}
        self.rel.write_pending(pending)
        self.rel.switch(folder, serving=serving)
        self.rel.remember(job.rollout_id, "live", rp.LIVE)
        self._event(rp.LIVE, rp.event_fields(job, swap_s=round(swap_s, 3),
                                             previous=serving.name, release=folder.name))
        self._begin_watch(pending)

    # -- health window ---------------------------------------------------------------------
    def record(self, latency_s: float, *, error: bool) -> None:
        """Count one answered request of the model serving now (any thread)."""
        with self._lock:
            self._requests += 1
            if error:
                self._errors += 1
            else:
                self._lat.append(latency_s)

    def _begin_watch(self, pending: dict[str, Any]) -> None:
        with self._lock:
            self._lat.clear()
            self._errors = self._requests = 0
        self._watch = {**pending, "until": time.monotonic() + float(pending["health_window_s"]),
                       "peak_rss": 0}

    def _tick(self) -> None:
        w = self._watch
        if w is None:
            return
        rss = rss_bytes()
        w["peak_rss"] = max(w["peak_rss"], rss)
        with self._lock:
            n, errors, lat = self._requests, self._errors, list(self._lat)
        rate = errors / n if n else 0.0
        reason = None
        budget = int(w["budget_bytes"])
        if rss > budget:
            reason = f"RSS {rss} bytes is over the {budget} bytes budget"
        elif n >= _MIN_REQUESTS and rate > float(w["max_error_rate"]):
            reason = (f"error rate {rate:.3f} ({errors} of {n} requests) is over "
                      f"{float(w['max_error_rate']):.3f}")
        done = time.monotonic() >= w["until"]
        p99 = _p99(lat)
        prev = w.get("prev_p99_s")
        if reason is None and (done or len(lat) >= 10 * _MIN_REQUESTS) and prev \
                and len(lat) >= _MIN_REQUESTS and p99 is not None \
                and p99 > float(w["max_p99_ratio"]) * float(prev):
            reason = (f"p99 latency {p99 * 1000:.1f} ms is {p99 / prev:.1f}x the previous "
                      f"model's {prev * 1000:.1f} ms (at most {float(w['max_p99_ratio'])}x)")
        figures = {"requests": n, "errors": errors, "peak_rss_bytes": w["peak_rss"],
                   "p99_s": p99, "prev_p99_s": prev}
        fields = {"rollout_id": w["rollout_id"], "version": w["version"], "sha256": w["sha256"]}
        if reason is not None:
            self._watch = None
            self._event(rp.FAILED, {**fields, "reason": reason, **figures})
            self._go_back(w, reason)
        elif done:
            self._watch = None
            self.rel.clear_pending()
            self.rel.remember(str(w["rollout_id"]), "install", rp.HEALTHY, **{
                "from": str(w["from"]), "to": str(w["to"])})
            for gone in self.rel.prune():
                log.info("removed the old release %s", gone.name)
            self._event(rp.HEALTHY, {**fields, **figures})

    def _go_back(self, w: dict[str, Any], reason: str) -> None:
        back = Path(str(w["from"]))
        fields = {"rollout_id": w["rollout_id"], "version": w["version"], "sha256": w["sha256"]}
        try:
            self.svc.update(back, allow_contract_change=True, label=str(back))
        except TomaEdgeError as e:
            self._event(rp.FAILED, {**fields, "reason": f"cannot go back to {back.name}: {e}"
                                    [:500]})
            return
        self.rel.back(back)
        self.rel.clear_pending()
        self.rel.remember(str(w["rollout_id"]), "install", rp.ROLLED_BACK, reason=reason)
        self._event(rp.ROLLED_BACK, {**fields, "reason": reason[:500], "release": back.name})

    # -- rollback job ----------------------------------------------------------------------
    def _rollback_job(self, job: rp.JobDocument) -> None:
        """Go back to the release this rollout replaced, if its release serves here (on
        probation or healthy); else say there is nothing to undo. Runs past the deadline."""
        fields = rp.event_fields(job)
        rid = job.rollout_id
        if self._dl is not None and self._dl.job.rollout_id == rid:
            self._dl = None
            if self._client is not None:
                self._client.unsubscribe(rp.chunks_subscription(
                    self.svc.fleet, self.svc.device_id, rid))
        self.rel.drop_download(rid)
        pending = self.rel.read_pending()
        done = self.rel.outcome(rid, "install")
        to = None
        if pending is not None and pending.get("rollout_id") == rid:
            if self._watch is not None and self._watch.get("rollout_id") == rid:
                self._watch = None
            to = Path(str(pending["from"]))
        elif done is not None and done.get("state") == rp.HEALTHY and done.get("from") \
                and self.rel.current() == Path(str(done.get("to"))).resolve():
            to = Path(str(done["from"]))
        if done is None:  # never installed twice once rolled back
            self.rel.remember(rid, "install", rp.ROLLED_BACK, reason="rollback job")
        if to is None or not to.is_dir():
            self.rel.remember(rid, "rollback", rp.ROLLED_BACK)
            self._event(rp.ROLLED_BACK, {**fields, "reason": "rollback job: this rollout's "
                                         "release is not serving here; nothing to undo"})
            return
        try:
            self.svc.update(to, allow_contract_change=True, label=str(to))
        except TomaEdgeError as e:
            self._event(rp.FAILED, {**fields, "reason": f"rollback job: cannot go back to "
                                    f"{to.name}: {e}"[:500]})
            return
        self.rel.back(to)
        self.rel.clear_pending()
        self.rel.remember(rid, "rollback", rp.ROLLED_BACK)
        self._event(rp.ROLLED_BACK, {**fields, "reason": "rollback job", "release": to.name})

    # -- events ----------------------------------------------------------------------------
    def _refuse(self, job: rp.JobDocument, reason: str, **figures: int) -> None:
        if self._dl is not None and self._dl.job.rollout_id == job.rollout_id:
            self._dl = None
            if self._client is not None:
                self._client.unsubscribe(rp.chunks_subscription(
                    self.svc.fleet, self.svc.device_id, job.rollout_id))
        self.rel.drop_download(job.rollout_id)
        self.rel.remember(job.rollout_id, job.action, rp.REFUSED, reason=reason[:500])
        log.error("rollout %s refused: %s", job.rollout_id, reason)
        self._event(rp.REFUSED, rp.event_fields(job, reason=reason[:500], **figures))

    def _event(self, kind: str, fields: dict[str, Any]) -> None:
        log.info("%s %s", kind, " ".join(f"{k}={v}" for k, v in fields.items()))
        agent = self.svc.agent
        if agent is None:
            return
        with contextlib.suppress(TomaEdgeError):
            agent.event(kind, **fields)
