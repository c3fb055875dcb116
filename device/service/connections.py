"""Bounded HTTP connections for uvicorn: slow heads, idle sockets and floods time out.

    from toma_edge.device.service.connections import guarded_protocol
    proto = guarded_protocol("httptools", head_timeout_s=10, max_connections=1024)
    uvicorn.Config(app, http=proto, timeout_keep_alive=5, ...)

uvicorn times out a keep-alive connection only after a response; a connection that never
sends a request, or sends its head a byte at a time, stays open for ever, and with
``limit_concurrency`` a few thousand of them make every request a 503. The protocol made
here closes any connection that has no request running and has not completed a request
head within ``head_timeout_s`` seconds of connecting (or of its last answer), refuses a
head over ``max_head_bytes`` with 431, and keeps at most ``max_connections`` open: a new
connection beyond that closes the one idle longest (a 503 when every one is busy), so a
fresh client is answered while an attacker holds idle sockets. Bodies are the app's to
time out (:mod:`.http_app`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

__all__ = ["guarded_protocol", "raise_open_files_limit"]

log = logging.getLogger("toma_edge.service")


def _base(http: str | type) -> type:
    if not isinstance(http, str):
        return http
    if http == "httptools":
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        return HttpToolsProtocol
    from uvicorn.protocols.http.h11_impl import H11Protocol

    return H11Protocol


def _reply(transport: Any, status: str, msg: str, retry: bool = False) -> None:
    from .protocol import encode_error

    body = encode_error(msg)
    head = (f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\nconnection: close\r\n"
            + ("retry-after: 1\r\n" if retry else "") + f"content-length: {len(body)}\r\n\r\n")
    try:
        transport.write(head.encode() + body)
    finally:
        transport.close()


def guarded_protocol(http: str | type = "httptools", *, head_timeout_s: float = 10.0,
                     max_connections: int = 1024, max_head_bytes: int = 64 << 10) -> type:
    """A subclass of uvicorn's ``http`` protocol (``"httptools"``, ``"h11"`` or a class)
    with the bounds of the module docstring; pass it as ``uvicorn.Config(http=...)``.
    Each call makes a class with its own connection table (one per server)."""
    base = _base(http)
    idle: dict[Any, float] = {}  # connection -> monotonic time it became idle; oldest first
    sweeping: list[asyncio.TimerHandle | None] = [None]
    counts = {"timed_out": 0, "evicted": 0, "refused": 0, "head_too_large": 0}

    def sweep(loop: asyncio.AbstractEventLoop) -> None:
        now = time.monotonic()
        for conn, since in list(idle.items()):
            if now - since <= head_timeout_s:
                break  # ordered by `since`
            idle.pop(conn, None)
            if not conn._busy() and not conn.transport.is_closing():
                counts["timed_out"] += 1
                conn.transport.close()
        try:
            sweeping[0] = loop.call_later(1.0, sweep, loop) if idle else None
        except RuntimeError:  # loop closed
            sweeping[0] = None

    class Guarded(base):  # type: ignore[valid-type, misc]
        #: connections closed: idle past the head timeout, evicted for a new one,
        #: refused (all busy), heads too large
        stats = counts

        def _busy(self) -> bool:
            cycle = self.cycle
            return cycle is not None and not cycle.response_complete

        def _mark_idle(self) -> None:
            idle.pop(self, None)
            idle[self] = time.monotonic()
            if sweeping[0] is None:
                sweeping[0] = self.loop.call_later(1.0, sweep, self.loop)

        def connection_made(self, transport: Any) -> None:
            self._in_head = False
            self._head_bytes = 0
            super().connection_made(transport)
            self._mark_idle()
            if len(self.connections) > max_connections and not self._evict_one():
                counts["refused"] += 1
                idle.pop(self, None)
                _reply(transport, "503 Service Unavailable",
                       "too many connections are busy; retry in 1 s", retry=True)

        def _evict_one(self) -> bool:
            """Close the connection idle longest (not this one); False if all are busy."""
            for conn in list(idle):
                if conn is self:
                    continue
                idle.pop(conn, None)
                if not conn._busy() and not conn.transport.is_closing():
                    conn.transport.close()
                    counts["evicted"] += 1
                    return True
            return False

        def connection_lost(self, exc: Exception | None) -> None:
            idle.pop(self, None)
            super().connection_lost(exc)

        # httptools' parser calls these; h11 has its own head limit (Config's
        # h11_max_incomplete_event_size)
        def on_message_begin(self) -> None:
            self._in_head = True
            self._head_bytes = 0
            super().on_message_begin()

        def on_headers_complete(self) -> None:
            self._in_head = False
            super().on_headers_complete()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.transport.is_closing():
                idle.pop(self, None)
                return
            if self._busy():
                idle.pop(self, None)
            if getattr(self, "_in_head", False):
                self._head_bytes += len(data)
                if self._head_bytes > max_head_bytes:
                    counts["head_too_large"] += 1
                    idle.pop(self, None)
                    _reply(self.transport, "431 Request Header Fields Too Large",
                           f"the request head is over {max_head_bytes} bytes")

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._mark_idle()

    Guarded.__name__ = f"Guarded{base.__name__}"
    return Guarded


def raise_open_files_limit(want: int) -> int:
    """Raise this process's soft open-files limit towards ``want`` (never past the hard
    limit); returns the soft limit now."""
    try:
        import resource
    except ImportError:  # not POSIX
        return want
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as e:
            log.warning("cannot raise the open-files limit to %d: %s", target, e)
    return int(soft) if soft != resource.RLIM_INFINITY else want
