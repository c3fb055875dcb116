"""The HTTP front end of the inference service (Starlette, served by uvicorn).

    from toma_edge.device.service import Service, ServiceConfig
    from toma_edge.device.service.http_app import make_app
    app = make_app(Service(ServiceConfig(bundle="dist/rpi4")))     # an ASGI app
    # uvicorn.run(app, host="127.0.0.1", port=8080, loop="uvloop", http="httptools")

Routes:

- ``POST /v1/predict``: JSON ``{"inputs": [[...], ...]}`` or a ``.npy`` body
  (``Content-Type: application/x-npy``) -> ``{"outputs": [[...], ...]}`` (+ ``"classes"``);
  with ``Accept: application/x-npy`` the outputs come back as a float32 ``.npy``.
  Errors are ``{"error": "..."}`` (one line): 400 malformed (invalid JSON or UTF-8,
  NaN, nesting deeper than 32, integers outside int64, a broken .npy header), 408 a
  body not sent within ``request_timeout_s`` (plus 1 s per 64 KiB), 413 too many bytes
  or rows (a .npy's declared shape counts), 415 an unsupported content type, 422 rows
  that do not fit the model (strings, booleans, a non-numeric .npy dtype, shape,
  non-finite values), 503 with ``Retry-After`` when the queue or the bytes of bodies in
  flight (a quarter of the free working budget) are full, or the service is stopping.
  No client input gets a 5xx.
- ``GET /healthz``: the serving model's name, version and manifest sha256, queue, links.
- ``GET /readyz``: 200 while requests are taken, 503 while stopping.
- ``GET /metrics``: Prometheus text format.
- ``POST /v1/model``: a bundle ``.tar.gz`` with ``Authorization: Bearer <token>`` (the
  token of ``--admin-token-file``, compared in constant time), streamed to a file on
  disk (never held in memory; 413 over the upload cap), unpacked within the budget's
  caps, verified, warmed up and swapped in. 409 when its contract (input/output row
  shapes and dtypes, task, classes) differs from the serving model's, unless the query
  says ``?allow_contract_change=true``; 409 too while another update loads; 422 with
  the reason when refused otherwise. The old model keeps serving on any refusal.
"""

from __future__ import annotations

import asyncio
import hmac
import io
import logging
import os
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from ...errors import BudgetError, TomaEdgeError
from ...jsonio import dumps
from ..predictor import Prediction
from .app import Service
from .batcher import Overloaded, ShuttingDown
from .models import ContractChanged, SwapInProgress
from .protocol import NPY_TYPE, RequestError, decode_json, decode_npy, encode_answer, encode_error

__all__ = ["make_app", "make_bare_app", "BodyPool"]

log = logging.getLogger("toma_edge.service")
JSON = "application/json"
_SLOW_RATE = 64 << 10  # bytes/s: the slowest body upload a timeout allows for


def _error(status: int, msg: str, headers: dict[str, str] | None = None) -> Response:
    return Response(encode_error(msg), status_code=status, media_type=JSON, headers=headers)


class BodyPool:
    """Bytes of request bodies held at once, all connections together (on the loop's
    thread only): a body that would pass ``limit`` is refused with 503, so many clients
    sending large bodies at once cannot take the memory budget."""

    def __init__(self, limit: int) -> None:
        self.limit = int(limit)
        self.held = 0

    def take(self, n: int) -> None:
        if self.held + n > self.limit:
            raise Overloaded(f"busy: {self.held} bytes of request bodies are being received, "
                             f"the most this device holds is {self.limit}; retry in 1 s")
        self.held += n

    def give(self, n: int) -> None:
        self.held -= n


def _content_length(request: Request, limit: int, what: str) -> int | None:
    cl = request.headers.get("content-length")
    if cl is None:
        return None
    cl = cl.strip()
    if not (cl.isascii() and cl.isdigit()) or len(cl) > 18:
        raise RequestError(f"Content-Length {cl[:20]!r} is not a number of bytes")
    n = int(cl)
    if n > limit:
        raise RequestError(f"the body is {n} bytes, more than the {limit} this device takes "
                           f"for {what}", 413)
    return n


async def _body(request: Request, limit: int, pool: BodyPool, held: list[int],
                timeout_s: float) -> bytes:
    """The request body (at most ``limit`` bytes, refused before they are read when
    Content-Length says so), its bytes taken from ``pool`` (added to ``held[0]``: the
    caller gives them back), within ``timeout_s`` plus 1 s per 64 KiB (408 otherwise)."""
    n = _content_length(request, limit, "one request; send fewer rows per request")
    if n is not None:
        pool.take(n)
        held[0] += n
    budget = timeout_s + (n if n is not None else limit) / _SLOW_RATE

    async def read() -> bytes:
        chunks, got = [], 0
        async for c in request.stream():
            got += len(c)
            if got > limit:
                raise RequestError(f"the body is more than the {limit} bytes this device "
                                   "takes; send fewer rows per request", 413)
            if n is None:
                pool.take(len(c))
                held[0] += len(c)
            chunks.append(c)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    try:
        return await asyncio.wait_for(read(), budget)
    except asyncio.TimeoutError:
        raise RequestError(f"the body did not arrive within {budget:.0f} s", 408) from None


def _resolver(
    fut: asyncio.Future[Prediction],
) -> Callable[[Prediction | None, BaseException | None], None]:
    """The batcher's callback for one request: runs on the loop's thread."""

    def done(pred: Prediction | None, err: BaseException | None) -> None:
        if fut.done():  # the client went away
            return
        if err is not None:
            fut.set_exception(err)
        else:
            fut.set_result(pred)  # type: ignore[arg-type]

    return done


def _flag(request: Request, name: str) -> bool:
    value = request.query_params.get(name)
    if value is None:
        return False
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no", ""):
        return False
    raise RequestError(f"?{name}= takes true or false, got {value[:20]!r}")


class _Endpoints:
    """The routes of one service's app: Starlette endpoints over the :class:`Service`."""

    def __init__(self, svc: Service) -> None:
        self.svc = svc
        self.max_body = svc.max_body_bytes
        self.pool = BodyPool(svc.body_pool_bytes)
        self.timeout_s = svc.config.request_timeout_s

    async def predict(self, request: Request) -> Response:
        t0 = time.perf_counter()
        n = 0
        status = 200
        held = [0]
        try:
            if self.svc.draining:
                raise ShuttingDown("the service is shutting down; retry on another device")
            body = await _body(request, self.max_body, self.pool, held, self.timeout_s)
            p = self.svc.model.predictor
            ctype = request.headers.get("content-type", JSON).split(";")[0].strip().lower()
            if ctype == NPY_TYPE:
                rows = decode_npy(body, p, max_rows=self.svc.max_request_rows)
            elif ctype in (JSON, "text/json", "") or ctype.endswith("+json"):
                rows = decode_json(body, p, max_rows=self.svc.max_request_rows)[1]
            else:
                raise RequestError(f"unsupported Content-Type {ctype[:60]!r}; send "
                                   f"application/json or {NPY_TYPE}", 415)
            del body
            self.pool.give(held[0])
            held[0] = 0
            n = int(rows.shape[0])
            if n == 0:
                pred = p.predict(rows)
            else:
                fut: asyncio.Future[Prediction] = asyncio.get_running_loop().create_future()
                self.svc.submit(rows, _resolver(fut))
                pred = await fut
            if NPY_TYPE in request.headers.get("accept", ""):
                buf = io.BytesIO()
                np.save(buf, pred.outputs, allow_pickle=False)
                resp = Response(buf.getvalue(), media_type=NPY_TYPE)
            else:
                resp = Response(encode_answer(pred), media_type=JSON)
        except RequestError as e:
            status = e.status
            # a body not sent in time: close; one too large is drained by the server (within
            # the connection's head timeout) so the client can read the answer
            resp = _error(status, str(e), {"Connection": "close"} if status == 408 else None)
        except (Overloaded, ShuttingDown) as e:
            status = 503
            resp = _error(503, str(e), {"Retry-After": "1"})
        except ClientDisconnect:
            status = 499
            resp = Response(status_code=499)
        except TomaEdgeError as e:  # a request the model could not answer
            status = 422 if not isinstance(e, BudgetError) else 507
            resp = _error(status, str(e))
        except Exception as e:  # noqa: BLE001 - answer, log, keep serving
            log.exception("predict failed")
            status = 500
            resp = _error(500, f"internal error: {type(e).__name__}: {e}")
        finally:
            self.pool.give(held[0])
        self.svc.record("http", status, time.perf_counter() - t0, n)
        return resp

    async def healthz(self, request: Request) -> Response:
        return Response(dumps(self.svc.health()), media_type=JSON)

    async def readyz(self, request: Request) -> Response:
        if self.svc.draining:
            return _error(503, "shutting down")
        return Response(b'{"ready":true}', media_type=JSON)

    async def metrics(self, request: Request) -> Response:
        return Response(self.svc.prometheus(),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    async def receive_upload(self, request: Request, f: Any) -> int:
        """Stream the body into ``f`` (a file on disk), at most the upload cap."""
        limit = self.svc.max_upload_bytes
        n = _content_length(request, limit, "a bundle upload")
        budget = self.timeout_s + (n if n is not None else limit) / _SLOW_RATE
        got = 0

        async def copy() -> None:
            nonlocal got
            async for c in request.stream():
                got += len(c)
                if got > limit:
                    raise RequestError(f"the upload is more than the {limit} bytes this "
                                       "device takes for a bundle", 413)
                f.write(c)

        try:
            await asyncio.wait_for(copy(), budget)
        except asyncio.TimeoutError:
            raise RequestError(f"the upload did not arrive within {budget:.0f} s", 408) from None
        return got

    async def model(self, request: Request) -> Response:
        if self.svc.admin_token is None:
            return _error(403, "model updates over HTTP are off; start the service with "
                               "--admin-token-file")
        auth = request.headers.get("authorization", "")
        scheme, _, given = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                given.strip().encode(errors="replace"), self.svc.admin_token.encode()):
            return _error(401, "a valid 'Authorization: Bearer <token>' header is needed",
                          {"WWW-Authenticate": "Bearer"})
        try:
            allow = _flag(request, "allow_contract_change")
        except RequestError as e:
            return _error(e.status, str(e))
        folder = self.svc.upload_dir()
        try:
            fd, path = tempfile.mkstemp(prefix=".toma-edge-upload-", suffix=".tar.gz",
                                        dir=folder)
        except OSError as e:
            return _error(507, f"no room to receive the upload: {e.strerror}")
        try:
            with os.fdopen(fd, "wb") as f:
                try:
                    size = await self.receive_upload(request, f)
                except RequestError as e:
                    return _error(e.status, str(e),
                                  {"Connection": "close"} if e.status == 408 else None)
                except ClientDisconnect:
                    return Response(status_code=499)
                except OSError as e:
                    return _error(507, f"no room to receive the upload: {e.strerror}")
            if not size:
                return _error(400, "the body must be a bundle .tar.gz (toma-edge build --archive)")
            try:
                new, kept = await asyncio.to_thread(
                    self.svc.update_from_upload, path, allow_contract_change=allow)
            except (SwapInProgress, ContractChanged) as e:
                return _error(409, str(e))
            except TomaEdgeError as e:
                return _error(422, f"bundle refused, still serving {self.svc.model.name} "
                                   f"{self.svc.model.version}: {e}")
            except OSError as e:
                return _error(507, f"bundle refused, no room to unpack it: {e.strerror}")
        finally:
            os.unlink(path)
        return Response(dumps({"model": new.describe(), "persisted": kept}), media_type=JSON)


def make_app(svc: Service, *, on_startup: Callable[[asyncio.AbstractEventLoop], None] | None = None,
             on_shutdown: Callable[[], None] | None = None) -> Starlette:
    """The service's ASGI app. ``on_startup``/``on_shutdown`` run in the lifespan (the
    runner starts and stops the service there, after uvicorn drained its connections)."""
    ep = _Endpoints(svc)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if on_startup is not None:
            on_startup(asyncio.get_running_loop())
        yield
        if on_shutdown is not None:
            await asyncio.to_thread(on_shutdown)

    return Starlette(routes=[
        Route("/v1/predict", ep.predict, methods=["POST"]),
        Route("/v1/model", ep.model, methods=["POST"]),
        Route("/healthz", ep.healthz, methods=["GET"]),
        Route("/readyz", ep.readyz, methods=["GET"]),
        Route("/metrics", ep.metrics, methods=["GET"]),
    ], lifespan=lifespan)


def make_bare_app(predictor: Any) -> Starlette:
    """The bench's baseline on the same stack: parse JSON, call the model, answer. No
    validation, limits, batching, metrics or telemetry."""
    import orjson

    async def predict(request: Request) -> Response:
        x = np.asarray(orjson.loads(await request.body())["inputs"], dtype=np.float32)
        pred = predictor.predict(x)
        return Response(encode_answer(pred), media_type=JSON)

    return Starlette(routes=[Route("/v1/predict", predict, methods=["POST"])])
