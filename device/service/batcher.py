"""Micro-batching: gather concurrent requests into one model call, split the answers back.

    from toma_edge.device.service.batcher import MicroBatcher
    from toma_edge.device.service.models import ModelHolder
    holder = ModelHolder.open("dist/rpi4", budget="512MiB")
    b = MicroBatcher(holder, max_queue_rows=2048); b.start(asyncio.get_running_loop())
    b.submit(np.zeros((3, 10), np.float32), lambda pred, err: print(pred.outputs.shape, err))
    b.submit_threadsafe(rows, done)             # from another thread (MQTT)

Batches run on the server's asyncio loop, one at a time (an ExecuTorch method is not
reentrant, and one batch at a time keeps the memory of one batch): the requests decoded in
one loop iteration (plus those of ``window_s`` seconds more while concurrent traffic is
seen) are run together, as many whole requests as fit the Predictor's batch size (rows
that fit the working memory budget); one model call per loop iteration, so that each batch's
answers go out before the next batch runs. No thread hop per request: on a small device the
hand-over between threads costs more than a small model's call. While a batch runs, new
requests wait in the sockets and form the next batch. Every request gets exactly its own rows'
answers; rows of a batch never influence each other unless the manifest says
``batch_dependent``, and then requests are never mixed. The queue is bounded in rows and
requests: :meth:`MicroBatcher.submit` raises :class:`Overloaded` at once when it is full,
so memory never grows with the backlog.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ...errors import InputError, TomaEdgeError
from ..predictor import Prediction
from .models import ModelHolder, ServedModel

__all__ = ["Overloaded", "ShuttingDown", "Done", "BatchHook", "MicroBatcher"]

log = logging.getLogger("toma_edge.service")

Done = Callable[[Prediction | None, BaseException | None], None]
"""Called once per request from the worker thread: ``(prediction, None)`` or ``(None, error)``."""
BatchHook = Callable[[int, int, float], None]
"""Called after each model call with ``(rows, requests, seconds)``."""


class Overloaded(TomaEdgeError):
    """The request queue is full; the client should retry after ``retry_after_s`` seconds."""

    def __init__(self, msg: str, *, retry_after_s: int = 1) -> None:
        super().__init__(msg)
        self.retry_after_s = retry_after_s


class ShuttingDown(TomaEdgeError):
    """The service is stopping and takes no new requests."""


@dataclass
class _Job:
    rows: np.ndarray
    done: Done
    enqueued: float


def _slice(pred: Prediction, a: int, b: int) -> Prediction:
    return Prediction(
        pred.outputs[a:b],
        None if pred.class_index is None else pred.class_index[a:b],
        None if pred.classes is None else pred.classes[a:b],
    )


class MicroBatcher:
    """Bounded request queue whose batches run on one asyncio loop. See the module docstring.

    ``window_s``: the longest a request waits for others to share its model call
    (seconds; 0: only those that arrived in the same loop iteration). ``max_queue_rows``
    / ``max_queue_requests``: the bound of the queue. ``max_batch_rows``: rows per model
    call at most (None: the Predictor's batch size, which fits the working memory budget;
    1 disables micro-batching).
    """

    def __init__(
        self,
        holder: ModelHolder,
        *,
        window_s: float = 0.0,
        max_queue_rows: int = 2048,
        max_queue_requests: int | None = None,
        max_batch_rows: int | None = None,
        on_batch: BatchHook | None = None,
    ) -> None:
        if window_s < 0:
            raise ValueError(f"window_s must be >= 0 seconds, got {window_s}")
        if max_queue_rows < 1:
            raise ValueError(f"max_queue_rows must be >= 1, got {max_queue_rows}")
        self.holder = holder
        self.window_s = float(window_s)
        self.max_queue_rows = int(max_queue_rows)
        self.max_queue_requests = int(max_queue_requests or max_queue_rows)
        self.max_batch_rows = max_batch_rows
        self.on_batch = on_batch
        self._q: deque[_Job] = deque()
        self._rows = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._scheduled = False
        self._closing = False
        self._last_requests = 1
        #: requests refused because the queue was full
        self.overloaded = 0

    # -- queue ----------------------------------------------------------------------------
    @property
    def queued_rows(self) -> int:
        """Rows waiting for the model now."""
        return self._rows

    @property
    def queued_requests(self) -> int:
        """Requests waiting for the model now."""
        return len(self._q)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Run batches on ``loop`` (the server's loop: no thread hop per request)."""
        self._loop = loop

    def submit(self, rows: np.ndarray, done: Done) -> None:
        """Queue validated float32 ``rows`` (``(n, *row_shape)``); ``done`` gets the answer.
        Call it on the loop's thread.

        Raises :class:`Overloaded` when the queue is full and :class:`ShuttingDown` once
        :meth:`close` began; ``done`` is then never called.
        """
        n = int(rows.shape[0])
        if self._closing or self._loop is None:
            raise ShuttingDown("the service is shutting down; send the request to another device")
        if self._q and (self._rows + n > self.max_queue_rows
                        or len(self._q) >= self.max_queue_requests):
            self.overloaded += 1
            raise Overloaded(
                f"overloaded: {len(self._q)} requests ({self._rows} rows) are queued, the most "
                f"this device holds is {self.max_queue_rows} rows; retry in 1 s"
            )
        self._q.append(_Job(rows, done, time.perf_counter()))
        self._rows += n
        if not self._scheduled:
            self._scheduled = True
            if self.window_s > 0 and self._last_requests > 1:
                self._loop.call_later(self.window_s, self._flush)
            else:
                self._loop.call_soon(self._flush)

    def submit_threadsafe(self, rows: np.ndarray, done: Done) -> None:
        """:meth:`submit` from another thread (MQTT); a refusal goes to ``done``."""
        def go() -> None:
            try:
                self.submit(rows, done)
            except (Overloaded, ShuttingDown) as e:
                _finish(_Job(rows, done, 0.0), None, e)

        if self._loop is None or self._loop.is_closed():
            raise ShuttingDown("the service is shutting down; send the request to another device")
        self._loop.call_soon_threadsafe(go)

    def close(self, timeout_s: float = 30.0) -> bool:
        """Take no new requests, answer the queued ones (up to ``timeout_s`` seconds).
        Call it from another thread than the loop's. True if everything was answered."""
        self._closing = True
        deadline = time.monotonic() + timeout_s
        while (self._q or self._scheduled) and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self._q

    # -- batches --------------------------------------------------------------------------
    def _take(self, model: ServedModel) -> list[_Job]:
        """The jobs of the next model call (the queue is not empty)."""
        cap = self.max_batch_rows or model.predictor.batch_size
        jobs = [self._q.popleft()]
        rows = int(jobs[0].rows.shape[0])
        if not model.batch_dependent and cap > 1:
            while self._q and rows + int(self._q[0].rows.shape[0]) <= cap:
                j = self._q.popleft()
                rows += int(j.rows.shape[0])
                jobs.append(j)
        self._rows -= rows
        return jobs

    def _flush(self) -> None:
        # One model call per loop iteration: the answers of this batch are written (their
        # tasks resume) before the next batch runs. Draining the whole queue in one go
        # held every answer back until the last batch was done: with one request per call
        # (max_batch_rows=1, batch_dependent models) or a backlog of several batches, p99
        # grew to the whole queue's model time.
        if self._q:
            model = self.holder.current
            jobs = self._take(model)
            self._last_requests = len(jobs)
            self._call(model, jobs)
        if self._q and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon(self._flush)
        else:
            self._scheduled = False

    def _call(self, model: ServedModel, jobs: list[_Job]) -> None:
        shape = model.row_shape
        ok = [j for j in jobs if j.rows.shape[1:] == shape]
        for j in jobs:
            if j.rows.shape[1:] != shape:  # validated against the model swapped out meanwhile
                _finish(j, None, InputError(
                    f"the model was replaced while this request waited; rows must now have shape "
                    f"{list(shape)}, got {list(j.rows.shape[1:])}"))
        if not ok:
            return
        t0 = time.perf_counter()
        x = ok[0].rows if len(ok) == 1 else np.concatenate([j.rows for j in ok])
        try:
            pred = model.predictor.predict(x)
        except Exception as e:  # noqa: BLE001 - the service answers every request
            if len(ok) > 1 and isinstance(e, InputError):
                for j in ok:  # find the one request at fault; the others still get answers
                    self._call(model, [j])
                return
            log.error("model call failed for %d requests: %s", len(ok), e)
            for j in ok:
                _finish(j, None, e)
            return
        dt = time.perf_counter() - t0
        a = 0
        for j in ok:
            b = a + int(j.rows.shape[0])
            _finish(j, pred if len(ok) == 1 else _slice(pred, a, b), None)
            a = b
        if self.on_batch is not None:
            self.on_batch(len(x), len(ok), dt)


def _finish(job: _Job, pred: Prediction | None, err: BaseException | None) -> None:
    try:
        job.done(pred, err)
    except Exception as e:  # noqa: BLE001 - a broken callback must not stop the worker
        log.error("answer callback failed: %s", e)
