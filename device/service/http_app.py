"""The HTTP front end of the inference service (Starlette, served by uvicorn).

    from toma_edge.device.service import Service, ServiceConfig
    from toma_edge.device.service.http_app import make_app
    app = make_app(Service(ServiceConfig(bundle="dist/rpi4")))     # an ASGI app
    # uvicorn.run(app, host="127.0.0.1", port=8080, loop="uvloop", http="httptools")

Routes:

- ``POST /v1/predict``: JSON ``{"inputs": [[...], ...]}`` or a ``.npy`` body
  (``Content-Type: application/x-npy``) -> ``{"outputs": [[...], ...]}`` (+ ``"classes"``);
  with ``Accept: application/x-npy`` the outputs come back as a float32 ``.npy``.
  Errors are ``{"error": "..."}``: 400/413/415/422 for the request, 503 with
  ``Retry-After`` when the queue is full or the service is stopping.
- ``GET /healthz``: the serving model's name, version and manifest sha256, queue, links.
- ``GET /readyz``: 200 while requests are taken, 503 while stopping.
- ``GET /metrics``: Prometheus text format.
- ``POST /v1/model``: a bundle ``.tar.gz`` with ``Authorization: Bearer <token>`` (the
  token of ``--admin-token-file``, compared in constant time); verified, warmed up and
  swapped in; 422 with the reason when refused (the old model keeps serving).
"""

from __future__ import annotations

import asyncio
import hmac
import io
import json
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
from ..predictor import Prediction
from .app import Service
from .batcher import Overloaded, ShuttingDown
from .models import SwapInProgress
from .protocol import NPY_TYPE, RequestError, decode_json, decode_npy, encode_answer, encode_error

__all__ = ["make_app", "make_bare_app"]

log = logging.getLogger("toma_edge.service")
JSON = "application/json"


def _error(status: int, msg: str, headers: dict[str, str] | None = None) -> Response:
    return Response(encode_error(msg), status_code=status, media_type=JSON, headers=headers)


async def _body(request: Request, limit: int) -> bytes:
    """The request body, refusing more than ``limit`` bytes before reading them all."""
    cl = request.headers.get("content-length")
    if cl is not None:
        if not cl.isdigit():
            raise RequestError("Content-Length is not a number")
        if int(cl) > limit:
            raise RequestError(f"the body is {int(cl)} bytes, more than the {limit} this device "
                               "takes; send fewer rows per request", 413)
        return await request.body()
    chunks, n = [], 0
    async for c in request.stream():
        n += len(c)
        if n > limit:
            raise RequestError(f"the body is more than the {limit} bytes this device takes; send "
                               "fewer rows per request", 413)
        chunks.append(c)
    return b"".join(chunks)


def _resolver(fut: asyncio.Future[Prediction]) -> Callable[[Prediction | None, BaseException | None], None]:
    """The batcher's callback for one request: runs on the loop's thread."""

    def done(pred: Prediction | None, err: BaseException | None) -> None:
        if fut.done():  # the client went away
            return
        if err is not None:
            fut.set_exception(err)
        else:
            fut.set_result(pred)  # type: ignore[arg-type]

    return done


def make_app(svc: Service, *, on_startup: Callable[[asyncio.AbstractEventLoop], None] | None = None,
             on_shutdown: Callable[[], None] | None = None) -> Starlette:
    """The service's ASGI app. ``on_startup``/``on_shutdown`` run in the lifespan (the
    runner starts and stops the service there, after uvicorn drained its connections)."""
    max_body = svc.config.max_body_bytes

    async def predict(request: Request) -> Response:
        t0 = time.perf_counter()
        n = 0
        status = 200
        try:
            if svc.draining:
                raise ShuttingDown("the service is shutting down; retry on another device")
            body = await _body(request, max_body)
            p = svc.model.predictor
            ctype = request.headers.get("content-type", JSON).split(";")[0].strip().lower()
            if ctype == NPY_TYPE:
                rows = decode_npy(body, p, max_rows=svc.max_request_rows)
            elif ctype in (JSON, "text/json", "") or ctype.endswith("+json"):
                rows = decode_json(body, p, max_rows=svc.max_request_rows)[1]
            else:
                raise RequestError(f"unsupported Content-Type {ctype!r}; send application/json "
                                   f"or {NPY_TYPE}", 415)
            n = int(rows.shape[0])
            if n == 0:
                pred = p.predict(rows)
            else:
                fut: asyncio.Future[Prediction] = asyncio.get_running_loop().create_future()
                svc.submit(rows, _resolver(fut))
                pred = await fut
            if NPY_TYPE in request.headers.get("accept", ""):
                buf = io.BytesIO()
                np.save(buf, pred.outputs, allow_pickle=False)
                resp = Response(buf.getvalue(), media_type=NPY_TYPE)
            else:
                resp = Response(encode_answer(pred), media_type=JSON)
        except RequestError as e:
            status = e.status
            resp = _error(status, str(e))
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
        svc.record("http", status, time.perf_counter() - t0, n)
        return resp

    async def healthz(request: Request) -> Response:
        return Response(json.dumps(svc.health()), media_type=JSON)

    async def readyz(request: Request) -> Response:
        if svc.draining:
            return _error(503, "shutting down")
        return Response(b'{"ready":true}', media_type=JSON)

    async def metrics(request: Request) -> Response:
        return Response(svc.prometheus(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def model(request: Request) -> Response:
        if svc.admin_token is None:
            return _error(403, "model updates over HTTP are off; start the service with "
                               "--admin-token-file")
        auth = request.headers.get("authorization", "")
        scheme, _, given = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                given.strip().encode(), svc.admin_token.encode()):
            return _error(401, "a valid 'Authorization: Bearer <token>' header is needed",
                          {"WWW-Authenticate": "Bearer"})
        try:
            body = await _body(request, svc.config.max_upload_bytes)
        except RequestError as e:
            return _error(e.status, str(e))
        if not body:
            return _error(400, "the body must be a bundle .tar.gz (toma-edge build --archive)")
        fd, path = tempfile.mkstemp(prefix="toma-edge-upload-", suffix=".tar.gz")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(body)
            del body
            try:
                new = await asyncio.to_thread(svc.update, path)
            except SwapInProgress as e:
                return _error(409, str(e))
            except TomaEdgeError as e:
                return _error(422, f"bundle refused, still serving {svc.model.name} "
                                   f"{svc.model.version}: {e}")
            try:  # serving already: keeping it for restarts must not undo the swap
                kept = await asyncio.to_thread(svc.persist_upload, path, new)
            except (OSError, TomaEdgeError) as e:
                log.error("uploaded bundle serves but was not kept for restarts: %s", e)
                kept = None
        finally:
            os.unlink(path)
        return Response(json.dumps({"model": new.describe(), "persisted": kept}), media_type=JSON)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if on_startup is not None:
            on_startup(asyncio.get_running_loop())
        yield
        if on_shutdown is not None:
            await asyncio.to_thread(on_shutdown)

    return Starlette(routes=[
        Route("/v1/predict", predict, methods=["POST"]),
        Route("/v1/model", model, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ], lifespan=lifespan)


def make_bare_app(predictor: Any) -> Starlette:
    """The bench's baseline on the same stack: parse JSON, call the model, answer. No
    validation, limits, batching, metrics or telemetry."""

    async def predict(request: Request) -> Response:
        x = np.asarray(json.loads(await request.body())["inputs"], dtype=np.float32)
        pred = predictor.predict(x)
        return Response(encode_answer(pred), media_type=JSON)

    return Starlette(routes=[Route("/v1/predict", predict, methods=["POST"])])
