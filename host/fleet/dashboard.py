"""The live fleet dashboard: a Starlette app over the fleet store, with charts in the page.

    from toma_edge.host.fleet.dashboard import make_app, serve_dashboard
    from toma_edge.host.fleet.store import FleetStore
    app = make_app(FleetStore("fleet.db", create=False))   # an ASGI app
    serve_dashboard(FleetStore("fleet.db", create=False), "127.0.0.1", 8090)  # blocks

``toma-edge fleet dashboard --db fleet.db --http 127.0.0.1:8090`` runs it. Routes:

- ``GET /``: the devices (online, model and version, memory against budget as a bar,
  p99 latency, error ratio, last seen); ``GET /device/{fleet}/{device_id}``: one device,
  with latency and memory-against-budget charts over time and its events.
- ``GET /api/devices`` and ``GET /api/device/{fleet}/{device_id}[?after_seq=N]``: the
  same as JSON (404 for an unknown device, 400 for a bad ``after_seq``).
- ``GET /api/devices/stream`` and ``GET /api/device/{fleet}/{device_id}/stream``:
  server-sent events that push what changed (every ``refresh_s`` seconds at most), so
  the pages update without reloading.
- ``GET /static/...``: the page's CSS and JavaScript, and uPlot (MIT, vendored under
  ``dashboard_static/vendor/uplot``): no CDN, a fleet may run offline; no build step.

Everything devices send is put into the page as text (``textContent``), never as HTML,
and a Content-Security-Policy allows scripts from this server only: a hostile model name
or device id is shown, not run. The dashboard only reads the store. At most
``max_devices`` devices (default 2000) are listed on the main page (the counts cover all)
and at most ``history`` telemetry windows (default 2000) per device are charted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from pathlib import Path
from types import FrameType
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ...errors import ConfigError
from ...jsonio import dumps

__all__ = ["make_app", "serve_dashboard", "STATIC", "DEFAULT_MAX_DEVICES", "DEFAULT_HISTORY"]

STATIC = Path(__file__).resolve().parent / "dashboard_static"
DEFAULT_MAX_DEVICES = 2000
DEFAULT_HISTORY = 2000

_TELEMETRY_KEYS = ("seq", "ts", "window_s", "requests", "errors", "latency_p50_s",
                   "latency_p95_s", "latency_p99_s", "latency_max_s", "throughput_rps",
                   "rss_bytes", "peak_rss_bytes", "budget_bytes", "model", "model_version")

_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_SECURITY_HEADERS = [
    (b"content-security-policy", _CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class _SecurityHeaders:
    """ASGI middleware: the CSP and friends on every HTTP response."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *_SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, send_with_headers)


class _Reader:
    """The store, read under one lock (one connection serves every request thread), with
    the device list cached for ``refresh_s`` seconds so that many open pages cost one query."""

    def __init__(self, store: Any, *, refresh_s: float, max_devices: int, history: int) -> None:
        self.store = store
        self.refresh_s = refresh_s
        self.max_devices = max_devices
        self.history = history
        self._lock = threading.Lock()
        self._rows_cache: list[Any] = []
        self._rows_at: float | None = None
        self._body: bytes | None = None

    def _rows(self) -> list[Any]:
        """Every device's row, read at most once per ``refresh_s`` (call under the lock)."""
        now = time.monotonic()
        if self._rows_at is None or now - self._rows_at >= self.refresh_s:
            self._rows_cache = self.store.devices()
            self._rows_at = now
            self._body = None
        return self._rows_cache

    def devices_json(self) -> bytes:
        with self._lock:
            rows = self._rows()
            if self._body is None:
                shown = rows[: self.max_devices]
                self._body = dumps({  # no clock in it: a stream sends only what changed
                    "total": len(rows),
                    "online": sum(1 for r in rows if r.online),
                    "over_budget": sum(1 for r in rows if (r.headroom_bytes or 0) < 0),
                    "shown": len(shown),
                    "devices": [_device_dict(r) for r in shown],
                })
            return self._body

    def device(self, fleet: str, device_id: str, after_seq: int) -> dict[str, Any] | None:
        with self._lock:
            row = next((r for r in self._rows()
                        if r.fleet == fleet and r.device_id == device_id), None)
            if row is None:
                return None
            tel = self.store.telemetry(fleet, device_id, limit=self.history)
            events = self.store.events(fleet, device_id)
        tel = [t for t in tel if t["seq"] > after_seq]
        return {
            "now": time.time(),
            "device": _device_dict(row),
            "telemetry": {k: [t.get(k) for t in tel] for k in _TELEMETRY_KEYS},
            "events": [{"seq": e["seq"], "ts": e["ts"], "kind": e["kind"],
                        "fields": e["fields"]} for e in events[-50:]],
        }


def _device_dict(r: Any) -> dict[str, Any]:
    d = dataclasses.asdict(r)
    d["headroom_bytes"] = r.headroom_bytes
    d["error_rate"] = r.error_rate
    return d


def _json(obj: Any, status: int = 200) -> Response:
    return Response(dumps(obj), status_code=status, media_type="application/json")


def make_app(store: Any, *, refresh_s: float = 1.0, max_devices: int = DEFAULT_MAX_DEVICES,
             history: int = DEFAULT_HISTORY, heartbeat_s: float = 15.0) -> Starlette:
    """The dashboard's ASGI app over ``store`` (FleetStore or the PostgreSQL store; only
    read). ``refresh_s``: seconds between looks at the store for the live streams."""
    if refresh_s <= 0:
        raise ConfigError(f"refresh must be > 0 seconds, got {refresh_s}")
    reader = _Reader(store, refresh_s=refresh_s, max_devices=max_devices, history=history)

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html")

    async def device_page(request: Request) -> Response:
        return FileResponse(STATIC / "device.html")

    async def api_devices(request: Request) -> Response:
        body = await run_in_threadpool(reader.devices_json)
        return Response(body, media_type="application/json")

    def _after_seq(request: Request) -> int | None:
        raw = request.query_params.get("after_seq", "0")
        if not raw.isdigit() or len(raw) > 18:
            return None
        return int(raw)

    async def api_device(request: Request) -> Response:
        after = _after_seq(request)
        if after is None:
            return _json({"error": "after_seq must be a whole number >= 0"}, 400)
        fleet = request.path_params["fleet"]
        dev = request.path_params["device_id"]
        data = await run_in_threadpool(reader.device, fleet, dev, after)
        if data is None:
            return _json({"error": f"no device {dev!r} in fleet {fleet!r}"}, 404)
        return _json(data)

    async def _events(next_event: Callable[[], Awaitable[bytes | None]]) -> AsyncIterator[bytes]:
        last_beat = time.monotonic()
        yield b"retry: 2000\n\n"
        while True:
            data = await next_event()
            if data is not None:
                yield b"data: " + data + b"\n\n"
                last_beat = time.monotonic()
            elif time.monotonic() - last_beat > heartbeat_s:
                yield b": keep-alive\n\n"
                last_beat = time.monotonic()
            # a client that went away ends this at the next write (Starlette's
            # StreamingResponse), so a heartbeat also bounds how long a dead one lingers
            await asyncio.sleep(refresh_s)

    def _stream(gen: AsyncIterator[bytes]) -> Response:
        return StreamingResponse(gen, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no"})

    async def devices_stream(request: Request) -> Response:
        last: list[bytes] = [b""]

        async def next_event() -> bytes | None:
            body = await run_in_threadpool(reader.devices_json)
            if body == last[0]:
                return None
            last[0] = body
            return body

        return _stream(_events(next_event))

    async def device_stream(request: Request) -> Response:
        after = _after_seq(request)
        if after is None:
            return _json({"error": "after_seq must be a whole number >= 0"}, 400)
        fleet = request.path_params["fleet"]
        dev = request.path_params["device_id"]
        state: dict[str, Any] = {"after": after, "device": b""}

        async def next_event() -> bytes | None:
            data = await run_in_threadpool(reader.device, fleet, dev, state["after"])
            if data is None:
                return None
            seqs = data["telemetry"]["seq"]
            row = dumps(data["device"])
            if not seqs and row == state["device"]:
                return None
            state["device"] = row
            if seqs:
                state["after"] = seqs[-1]
            return dumps(data)

        if await run_in_threadpool(reader.device, fleet, dev, 2**62) is None:
            return _json({"error": f"no device {dev!r} in fleet {fleet!r}"}, 404)
        return _stream(_events(next_event))

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    routes = [
        Route("/", index),
        Route("/device/{fleet}/{device_id}", device_page),
        Route("/api/devices", api_devices),
        Route("/api/devices/stream", devices_stream),
        Route("/api/device/{fleet}/{device_id}", api_device),
        Route("/api/device/{fleet}/{device_id}/stream", device_stream),
        Route("/healthz", healthz),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(routes=routes)
    app.add_middleware(_SecurityHeaders)
    return app


def serve_dashboard(store: Any, host: str, port: int, *, refresh_s: float = 1.0,
                    max_devices: int = DEFAULT_MAX_DEVICES, history: int = DEFAULT_HISTORY,
                    on_listening: Callable[[str], None] | None = None) -> None:
    """Serve the dashboard on http://HOST:PORT until SIGINT/SIGTERM (blocks; returns
    normally after either, so the command exits 0 as the collector does)."""
    import uvicorn

    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            # uvicorn re-raises a captured signal after shutting down; a stop asked for
            # is a clean exit here
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True

    from ...device.service import listen

    sock = listen(host, port, backlog=128)
    app = make_app(store, refresh_s=refresh_s, max_devices=max_devices, history=history)
    config = uvicorn.Config(app, host=host, port=port, lifespan="off", access_log=False,
                            log_level="warning", timeout_graceful_shutdown=1)
    if on_listening is not None:
        shown = f"[{host}]" if ":" in host else host
        on_listening(f"http://{shown}:{sock.getsockname()[1]}/")
    _Server(config).run(sockets=[sock])
