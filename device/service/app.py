"""The inference service's parts wired together: model, micro-batcher, metrics, telemetry, MQTT.

    from toma_edge.device.service import Service, ServiceConfig
    svc = Service(ServiceConfig(bundle="dist/rpi4", mqtt="mqtt://pi-0042@broker.lan",
                                device_id="pi-0042", fleet="plant-7"))
    svc.start(loop)                           # batches on that asyncio loop; telemetry, MQTT
    svc.submit(rows, done)                    # what the HTTP and MQTT front ends call
    svc.stop()                                # drain, flush telemetry, disconnect

Transports (:mod:`.http_app`, :mod:`.mqtt`) only decode requests, call :meth:`Service.submit`
and encode answers; everything they share (limits, counters, telemetry hooks, model
updates) lives here. Telemetry runs only with an MQTT URL (``--mqtt``): without a broker
there is nobody to send it to. With telemetry on, the device also takes fleet rollout
jobs on its jobs topic (:mod:`toma_edge.device.jobs`; releases on disk:
:mod:`toma_edge.device.releases`): the bundle it serves is then ``current`` of its state
folder once a rollout installed a release, or the previous release after a crash loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...budget import parse_size
from ...errors import ConfigError, TomaEdgeError
from ...probes import peak_probe, rss_bytes
from ...telemetry import mqtt_settings, validate_id
from .batcher import Done, MicroBatcher
from .metrics import ServiceMetrics
from .models import ModelHolder, ServedModel

__all__ = ["ServiceConfig", "Service", "default_spool", "read_token"]

log = logging.getLogger("toma_edge.service")


@dataclass(frozen=True)
class ServiceConfig:
    """Everything ``toma-edge serve`` takes (docs/architecture.md, "The command line"),
    plus tuning knobs.

    ``http``: ``HOST:PORT`` to listen on, or None for MQTT only. ``budget``: the whole
    process's peak RSS (bytes or ``"512MiB"``; default the bundle target's).
    ``telemetry_interval_s``: seconds per telemetry window. ``window_s``: the longest a
    request waits to share a model call (seconds). ``max_queue_rows``: the queue's bound
    (None: from the working budget, at most 8 x max_batch). ``max_body_bytes``: largest
    request body (bytes; lowered to a 16th of the working budget a batch leaves free).
    ``max_batch_rows``: rows per model call at most (None: what fits the budget; 1 turns
    micro-batching off). ``max_upload_bytes``: largest bundle archive POST /v1/model
    takes (bytes, streamed to disk; lowered to what the working budget can load beside
    the serving model). ``request_timeout_s``: the longest a client may take to send a
    request's head, or its body (seconds). ``idle_timeout_s``: a connection idle between
    requests is closed after this (seconds). ``max_connections``: open HTTP connections
    at most; a new one beyond it closes the longest idle one (lowered to fit the
    open-files limit). ``drain_timeout_s``: how long SIGTERM waits for requests in
    flight. ``mqtt_password_file``, ``mqtt_ca_file``, ``mqtt_cert_file``,
    ``mqtt_key_file``: the broker password (else $TOMA_EDGE_MQTT_PASSWORD), the CA of an
    ``mqtts://`` broker and an optional client certificate and key (PEM).
    """

    bundle: str
    http: str | None = "127.0.0.1:8080"
    mqtt: str | None = None
    device_id: str | None = None
    fleet: str = "default"
    budget: str | int | None = None
    threads: int | None = None
    telemetry_interval_s: float = 10.0
    spool: str | None = None
    admin_token_file: str | None = None
    trust_key: str | None = None
    mqtt_password_file: str | None = None
    mqtt_ca_file: str | None = None
    mqtt_cert_file: str | None = None
    mqtt_key_file: str | None = None
    window_s: float = 0.0
    max_queue_rows: int | None = None
    max_body_bytes: int = 4 << 20
    max_batch_rows: int | None = None
    max_upload_bytes: int = 256 << 20
    request_timeout_s: float = 10.0
    idle_timeout_s: float = 5.0
    max_connections: int = 1024
    drain_timeout_s: float = 30.0
    telemetry: bool = True


def read_token(path: str | Path) -> str:
    """The admin bearer token: the first line of ``path``; ConfigError if missing or short."""
    p = Path(path)
    try:
        lines = p.read_text().splitlines()
    except OSError as e:
        raise ConfigError(f"admin token file {str(p)!r} cannot be read: {e.strerror}") from e
    token = lines[0].strip() if lines else ""
    if len(token) < 16:
        raise ConfigError(
            f"admin token file {str(p)!r} must hold a token of at least 16 characters on its "
            "first line; make one with: openssl rand -hex 32 > FILE"
        )
    if p.stat().st_mode & 0o077:
        log.warning("admin token file %s is readable by other users; chmod 600 it", p)
    return token


def default_spool(fleet: str, device_id: str) -> Path:
    """Where the telemetry spool lives without ``--spool``: the XDG state folder."""
    base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    return base / "toma-edge" / f"{fleet}-{device_id}.spool.db"


def parse_http(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8080`` for IPv6) into a host and a port; ConfigError otherwise."""
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            f"--http {value!r} must be HOST:PORT, like 127.0.0.1:8080 or 0.0.0.0:8080")
    return host, int(port)


class Service:
    """The device's inference service; see the module docstring. Loading the bundle
    happens here (BundleError, BudgetError, ConfigError: nothing started)."""

    def __init__(self, config: ServiceConfig) -> None:
        self.config = config
        if config.http is not None:
            self.http_address: tuple[str, int] | None = parse_http(config.http)
        else:
            self.http_address = None
        self.fleet = validate_id(config.fleet, what="fleet")
        self.device_id = validate_id(config.device_id or socket.gethostname().split(".")[0],
                                     what="device id (pass --device-id)")
        self.admin_token = read_token(config.admin_token_file) if config.admin_token_file else None
        self.mqtt_settings = mqtt_settings(
            config.mqtt, password_file=config.mqtt_password_file, ca_file=config.mqtt_ca_file,
            cert_file=config.mqtt_cert_file, key_file=config.mqtt_key_file,
        ) if config.mqtt else None
        if config.max_body_bytes < 1024:
            raise ConfigError(f"max_body_bytes must be >= 1024, got {config.max_body_bytes}")
        self.metrics = ServiceMetrics()
        self.agent: Any = None
        self.mqtt: Any = None
        self.started_at = time.time()
        self.draining = False
        self._batch_size = 0
        self.holder = ModelHolder(
            budget=parse_size(config.budget) if isinstance(config.budget, str) else config.budget,
            threads=config.threads, trust_key=config.trust_key, on_swap=self._on_swap)
        #: the rollout jobs of this device (``--mqtt`` with telemetry), else None
        self.rollouts: Any = None
        #: the bundle path served (a rollout's ``current`` once one installed a release)
        self.bundle_path = config.bundle
        if self.mqtt_settings is not None and config.telemetry:
            from ..jobs import RolloutRunner
            from ..releases import Releases

            try:
                self.rollouts = RolloutRunner(self, Releases.for_service(
                    config.bundle, spool=self._spool_path(), fleet=self.fleet,
                    device_id=self.device_id))
                self.bundle_path = self.rollouts.prepare(config.bundle)
            except (ConfigError, OSError) as e:  # e.g. a read-only state folder
                log.error("fleet rollouts are off on this device: %s", e)
                self.rollouts = None
        try:
            self.holder.replace(self.bundle_path)
        except TomaEdgeError as e:
            back = self.rollouts.load_failed(e) if self.rollouts is not None else None
            if back is None:
                raise
            self.bundle_path = back
            self.holder.replace(back)
        p = self.holder.current.predictor
        if config.max_queue_rows is not None:
            rows = int(config.max_queue_rows)
        else:  # queued inputs may take a quarter of what the batches leave free
            rows = min(8 * p.manifest.max_batch, max(p.manifest.max_batch,
                                                      p.free_bytes // 4 // max(1, p.row_bytes)))
        self.max_request_rows = rows
        free = max(1, p.free_bytes)
        #: largest /v1/predict body (bytes): its parse may take ~16x its size for a moment
        self.max_body_bytes = max(1024, min(config.max_body_bytes, free // 16))
        #: bytes of request bodies held at once, all connections together (more: 503)
        self.body_pool_bytes = max(self.max_body_bytes, free // 4)
        #: largest upload (bytes): its model is read into memory beside the serving one
        self.max_upload_bytes = max(1 << 20, min(config.max_upload_bytes, free + (1 << 20)))
        self.batcher = MicroBatcher(
            self.holder, window_s=config.window_s, max_queue_rows=rows,
            max_batch_rows=config.max_batch_rows, on_batch=self._on_batch)

    # -- lifecycle ------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Run batches on ``loop``, then start telemetry and MQTT requests (with ``--mqtt``)."""
        self.batcher.start(loop)
        m = self.holder.current
        if self.mqtt_settings is not None and self.config.telemetry:
            from ..agent import TelemetryAgent

            spool = self._spool_path()
            spool.parent.mkdir(parents=True, exist_ok=True)
            self.agent = TelemetryAgent(
                self.mqtt_settings, fleet=self.fleet, device_id=self.device_id, spool=spool,
                interval_s=self.config.telemetry_interval_s,
                budget_bytes=m.predictor.budget.bytes, target=m.predictor.manifest.target.name)
            self.agent.set_model(m.name, m.version, m.sha256)
            self.agent.set_batch_size(m.predictor.batch_size)
        if self.mqtt_settings is not None:
            from .mqtt import MqttFrontEnd

            self.mqtt = MqttFrontEnd(self, self.mqtt_settings)
            self.mqtt.start()
        if self.rollouts is not None:
            self.rollouts.start()

    def _spool_path(self) -> Path:
        return Path(self.config.spool) if self.config.spool else default_spool(
            self.fleet, self.device_id)

    def begin_drain(self) -> None:
        """Say not ready (/readyz 503): a stop is coming."""
        self.draining = True

    def stop(self) -> bool:
        """Stop taking requests, answer those queued, flush telemetry, disconnect. True if
        every accepted request was answered within ``drain_timeout_s``."""
        self.draining = True
        t = self.config.drain_timeout_s
        if self.mqtt is not None:
            self.mqtt.stop_taking()
        ok = self.batcher.close(timeout_s=t)
        if self.rollouts is not None:
            self.rollouts.close()
        if self.mqtt is not None:
            ok = self.mqtt.close(timeout_s=min(10.0, t)) and ok
        if self.agent is not None:
            self.agent.emit_telemetry()
            self.agent.close(timeout_s=min(10.0, t))
        log.info("stopped (%s)", "every request answered" if ok else "some requests unanswered")
        return ok

    # -- requests -------------------------------------------------------------------------
    @property
    def model(self) -> ServedModel:
        """The model serving now."""
        return self.holder.current

    def submit(self, rows: np.ndarray, done: Done) -> None:
        """Queue validated rows (on the loop's thread); Overloaded / ShuttingDown when the
        queue takes none."""
        self.batcher.submit(rows, done)

    def submit_threadsafe(self, rows: np.ndarray, done: Done) -> None:
        """Queue validated rows from another thread; refusals are passed to ``done``."""
        self.batcher.submit_threadsafe(rows, done)

    def record(self, transport: str, code: int, latency_s: float, rows: int) -> None:
        """Count one answered request in the metrics and the telemetry window."""
        self.metrics.request(transport, code, latency_s=latency_s, rows=rows)
        if self.rollouts is not None:
            self.rollouts.record(latency_s, error=code >= 500)
        if self.agent is not None:
            self.agent.record_request(latency_s, rows, error=code >= 400)

    # -- model updates --------------------------------------------------------------------
    def update(self, source: str | Path, *, allow_contract_change: bool = True,
               label: str | None = None) -> ServedModel:
        """Verify, warm up and swap in the bundle at ``source``; the old model keeps serving
        on any error (raised; :class:`~.models.ContractChanged` when
        ``allow_contract_change`` is False and rows or answers would change)."""
        try:
            return self.holder.replace(source, allow_contract_change=allow_contract_change,
                                       label=label)
        except TomaEdgeError as e:
            self.metrics.swap(False)
            log.error("model update refused: %s", e)
            if self.agent is not None:
                self.agent.event("model_refused", source=str(source), error=str(e)[:500])
            raise

    def upload_dir(self) -> Path | None:
        """Where uploads are unpacked: beside the releases when the service was started on
        a ``current`` symlink (same file system: kept with a rename), else None (temp)."""
        link = Path(self.config.bundle)
        return link.resolve().parent if link.is_symlink() else None

    def unpack_limits(self) -> dict[str, int]:
        """Caps for unpacking an uploaded archive (:func:`toma_edge.bundle.extract_archive`):
        unpacked bytes at most what the working budget leaves beside the serving model's
        batch (model.pte is read into memory whole), 64 members, 100 x the archive's size."""
        free = max(1 << 20, self.model.predictor.free_bytes)
        return {"max_bytes": free, "max_members": 64, "max_ratio": 100}

    def update_from_upload(self, archive: str | Path, *,
                           allow_contract_change: bool = False) -> tuple[ServedModel, str | None]:
        """Unpack an uploaded bundle archive once (within :meth:`unpack_limits`), verify,
        warm up and swap it in, then keep it across restarts.

        When the service was started on a ``current`` symlink (the install layout:
        ``releases/<version>`` and ``current``), the unpacked folder becomes a new release
        beside the one ``current`` points at, and ``current`` is switched to it
        atomically, so a restart or SIGHUP serves the same model. Returns the model and
        the release folder (None when the bundle path is not a symlink, or keeping it
        failed: the model serves anyway). Raises like :meth:`update`; nothing switches then.
        """
        import re
        import shutil
        import tempfile
        import uuid

        from ...bundle import MANIFEST_NAME, extract_archive, read_manifest

        releases = self.upload_dir()
        if releases is not None:
            tmp = releases / f".upload-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        else:
            tmp = Path(tempfile.mkdtemp(prefix="toma-edge-upload-"))
        caps = self.unpack_limits()
        try:
            try:
                extract_archive(archive, tmp, **caps)
                version = read_manifest(tmp / MANIFEST_NAME).version
            except TomaEdgeError as e:
                self.metrics.swap(False)
                self.holder.refused += 1
                log.error("model upload refused: %s", e)
                raise
            dest = None
            if releases is not None:
                name = re.sub(r"[^A-Za-z0-9._-]", "_", version)[:100] or "upload"
                dest = releases / name
            new = self.update(tmp, allow_contract_change=allow_contract_change,
                              label=str(dest) if dest is not None else "upload")
            if dest is None:
                return new, None
            try:  # serving already: keeping it for restarts must not undo the swap
                kept = self._keep_release(tmp, dest, new)
            except (OSError, TomaEdgeError) as e:
                log.error("uploaded bundle serves but was not kept for restarts: %s", e)
                kept = None
            return new, kept
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _keep_release(self, folder: Path, dest: Path, model: ServedModel) -> str:
        if dest.exists():
            dest = dest.with_name(f"{dest.name}-{model.sha256[:12]}")
        if not dest.exists():
            folder.rename(dest)
        link = Path(self.config.bundle)
        target = (os.path.relpath(dest, link.parent) if not os.path.isabs(os.readlink(link))
                  else str(dest))
        new_link = link.with_name(f".{link.name}.new-{os.getpid()}")
        new_link.unlink(missing_ok=True)
        new_link.symlink_to(target)
        os.replace(new_link, link)  # atomic: `current` always names a whole release
        log.info("uploaded bundle kept as %s; %s -> %s", dest, link, dest.name)
        return str(dest)

    def close(self) -> None:
        """Release the model (its native program) once the service stopped."""
        self.holder.close()

    def reload(self) -> ServedModel:
        """Read the bundle path given at start again (SIGHUP; suits a ``current`` symlink)."""
        return self.update(self.bundle_path)

    def _on_swap(self, new: ServedModel, old: ServedModel | None) -> None:
        if old is None:
            return
        self.metrics.swap(True)
        if self.agent is not None:
            self.agent.set_model(new.name, new.version, new.sha256)

    def _on_batch(self, rows: int, requests: int, seconds: float) -> None:
        self.metrics.batch(rows=rows, requests=requests, seconds=seconds)
        if self.agent is not None:
            bs = self.holder.current.predictor.batch_size
            if bs != self._batch_size:
                self._batch_size = bs
                self.agent.set_batch_size(bs)

    # -- views ----------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        """What /healthz answers. ``status``: "draining" while stopping, "degraded" while
        the MQTT front end (with ``--mqtt``) takes no requests (broker lost, subscription
        refused, network thread gone), else "ok"."""
        mqtt = None if self.mqtt is None else self.mqtt.health()
        status = "ok"
        if self.draining:
            status = "draining"
        elif self.config.mqtt and (mqtt is None or not mqtt["taking_requests"]):
            status = "degraded"
        return {
            "status": status,
            "model": self.model.describe(),
            "device_id": self.device_id, "fleet": self.fleet,
            "uptime_s": round(time.time() - self.started_at, 3),
            "queue_rows": self.batcher.queued_rows,
            "telemetry": None if self.agent is None else self.agent.health(),
            "mqtt": mqtt,
        }

    def prometheus(self) -> str:
        """The /metrics text."""
        m = self.model
        p = m.predictor
        gauges: dict[str, float] = {
            "toma_edge_queue_rows": self.batcher.queued_rows,
            "toma_edge_queue_requests": self.batcher.queued_requests,
            "toma_edge_queue_capacity_rows": self.batcher.max_queue_rows,
            "toma_edge_queue_full_refusals": self.batcher.overloaded,
            "toma_edge_batch_size_rows": p.batch_size,
            "toma_edge_rss_bytes": rss_bytes(),
            "toma_edge_peak_rss_bytes": peak_probe().running_peak_bytes(),
            "toma_edge_budget_bytes": p.budget.bytes,
            "toma_edge_working_budget_bytes": p.working_budget_bytes,
            "toma_edge_uptime_seconds": round(time.time() - self.started_at, 3),
        }
        if self.agent is not None:
            gauges["toma_edge_telemetry_spooled"] = self.agent.spool.pending()
        return self.metrics.render(gauges=gauges, info={
            "name": m.name, "version": m.version, "sha256": m.sha256})
