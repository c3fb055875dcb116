"""The on-device inference service (``toma-edge serve``): HTTP and MQTT, micro-batching
within the memory budget, safe model updates, telemetry.

    from toma_edge.device.service import ServiceConfig, serve
    serve(ServiceConfig(bundle="/var/lib/toma-edge/current", http="0.0.0.0:8080",
                        mqtt="mqtts://pi-0042@broker.lan", device_id="pi-0042",
                        fleet="plant-7", admin_token_file="/etc/toma-edge/admin-token"))
    # blocks; SIGTERM: drain and exit 0; SIGHUP: reload the bundle path

:func:`serve` loads and warms up the bundle (errors raise before anything listens), then
runs uvicorn (uvloop, httptools) with the app of :mod:`.http_app` and, with an MQTT URL,
the request handler of :mod:`.mqtt` and the telemetry agent. SIGTERM (and SIGINT) stop
the listener, answer every request already accepted, flush telemetry and return 0.
SIGHUP verifies, warms up and swaps in the bundle at the path given at start again
(a ``current`` symlink switched to a new release folder); a bad bundle is refused and
the old model keeps serving. With ``--mqtt`` the device carries out fleet rollout jobs
(:mod:`toma_edge.device.jobs`): download, verify, contract and fit checks, swap, a health
window, and a rollback of its own when the new release fails or crash-loops.

Connections are bounded (:mod:`.connections`): a request head must arrive within
``request_timeout_s``, idle keep-alive connections close after ``idle_timeout_s``, and
at most ``max_connections`` stay open (the longest idle one is closed for a new one).
Once stopped, the model is released before the interpreter exits, so the native
runtime has nothing left to report as leaked.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
import threading
from types import FrameType
from typing import Any

from .app import Service, ServiceConfig

__all__ = ["Service", "ServiceConfig", "serve", "listen"]

log = logging.getLogger("toma_edge.service")


def _reload_in_background(svc: Service) -> None:
    def run() -> None:
        try:
            new = svc.reload()
            log.info("SIGHUP: serving %s %s (%s)", new.name, new.version, new.sha256[:12])
        except Exception as e:  # noqa: BLE001 - refused: the old model keeps serving
            log.error("SIGHUP: kept %s %s: %s", svc.model.name, svc.model.version, e)

    threading.Thread(target=run, name="toma-edge-reload", daemon=True).start()


def freeze_heap() -> None:
    """Move every object alive now (torch, ExecuTorch, the loaded model, the server) out
    of the cyclic garbage collector's reach (:func:`gc.freeze`), after one full collection.

    Without it, a full (generation 2) collection walks the ~180,000 objects that importing
    torch leaves behind: 80-220 ms with the loop stopped, several times a second under load,
    because the objects of the requests in flight keep being promoted; that was the full
    service's p99 of 200-300 ms at 64 clients. Frozen objects are still freed by reference
    counting; only cycles among them stay, and these are import-time objects that live as
    long as the process anyway.
    """
    gc.collect()
    gc.freeze()


def serve(config: ServiceConfig) -> int:
    """Run the service until SIGTERM/SIGINT; returns 0 once everything accepted was
    answered (1 if the drain timed out). Raises TomaEdgeError if it cannot start."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    svc = Service(config)
    m = svc.model
    log.info("serving %s %s (manifest sha256 %s, batch %d rows, budget %d bytes, "
             "queue %d rows)", m.name, m.version, m.sha256[:12], m.predictor.batch_size,
             m.predictor.budget.bytes, svc.batcher.max_queue_rows)
    result = {"ok": True}

    def stop() -> None:
        result["ok"] = svc.stop()

    def hup(signum: int, frame: FrameType | None) -> None:
        _reload_in_background(svc)

    signal.signal(signal.SIGHUP, hup)
    # uvicorn re-raises the stopping signal once it is done: this keeps the exit code 0
    stopped = threading.Event()

    def quiet(signum: int, frame: FrameType | None) -> None:
        svc.begin_drain()
        stopped.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, quiet)

    if svc.http_address is None:  # MQTT only: batches on a loop of our own
        loop = asyncio.new_event_loop()
        t = threading.Thread(target=loop.run_forever, name="toma-edge-loop", daemon=True)
        t.start()
        svc.start(loop)
        freeze_heap()
        stopped.wait()
        stop()
        loop.call_soon_threadsafe(loop.stop)
        t.join(5)
        _release(svc)
        return 0 if result["ok"] else 1

    import uvicorn

    from .http_app import make_app

    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            svc.begin_drain()  # /readyz says 503 at once
            super().handle_exit(sig, frame)

    def startup(loop: asyncio.AbstractEventLoop) -> None:
        svc.start(loop)
        freeze_heap()  # the server's modules are imported by now

    from .connections import guarded_protocol, raise_open_files_limit

    host, port = svc.http_address
    sock = listen(host, port)
    # every connection is a file descriptor; keep 64 for the model, spool, broker, logs
    files = raise_open_files_limit(config.max_connections + 256)
    max_conn = max(16, min(config.max_connections, files - 64))
    head_bytes = 64 << 10
    ucfg = uvicorn.Config(
        make_app(svc, on_startup=startup, on_shutdown=stop), host=host, port=port,
        loop=_loop(), lifespan="on", access_log=False, log_level="warning",
        http=guarded_protocol(_http(), head_timeout_s=config.request_timeout_s,
                              max_connections=max_conn, max_head_bytes=head_bytes),
        timeout_graceful_shutdown=int(config.drain_timeout_s), limit_concurrency=None,
        backlog=2048, timeout_keep_alive=max(1, round(config.idle_timeout_s)),
        h11_max_incomplete_event_size=head_bytes,
    )
    server = _Server(ucfg)
    log.info("listening on http://%s:%d (at most %d connections)", host, port, max_conn)
    try:
        server.run(sockets=[sock])
    finally:
        _release(svc)
    return 0 if result["ok"] else 1


def _release(svc: Service) -> None:
    """Drop the model and everything that holds it before the interpreter exits: the
    heap was frozen (:func:`freeze_heap`), so its cycles would never be collected and the
    native runtime would report its objects as leaked at exit."""
    try:
        svc.close()
        from ..adapter import release_native_programs

        release_native_programs()  # any other program still alive (a swapped-out model)
    except Exception as e:  # noqa: BLE001 - best effort at exit
        log.debug("releasing the model failed: %s", e)
    gc.unfreeze()
    gc.collect()


def listen(host: str, port: int, *, backlog: int = 2048) -> socket.socket:
    """A listening TCP socket (inheritable, SO_REUSEADDR), so that a taken port is one
    clear error (ConfigError naming --http) before anything runs."""
    from ...errors import ConfigError

    try:
        family, kind, proto, _, addr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(backlog)
    except OSError as e:
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}; pick another "
                          "--http HOST:PORT") from e
    sock.set_inheritable(True)
    return sock


def _loop() -> Any:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def _http() -> Any:
    try:
        import httptools  # noqa: F401
    except ImportError:
        return "h11"
    return "httptools"

