"""Budgeted host data loading: train from .npy or CSV files larger than the budget.

    from toma_edge.data_loading import BudgetedLoader
    loader = BudgetedLoader.from_files("X.npy", "y.npy", batch_size=32, budget_bytes=64 << 20)
    for epoch in range(3):
        for xb, yb in loader:            # numpy float32 batches, reshuffled every epoch
            ...

Rows are read a chunk at a time: a .npy through a memory-mapped window over the chunk
(unmapped again, so file pages do not pile up in RSS), a CSV by seeking to the byte
offsets of its rows (indexed once, 8 bytes per row). A background thread reads up to
``prefetch`` chunks ahead. Chunk size and prefetch depth come from ``budget_bytes``:
the chunks in flight (being read, queued, being served) plus their shuffled copies
fit in it. Each epoch visits the chunks in a new random order and shuffles rows within
each chunk (a block shuffle: every row once per epoch, never all rows in memory).
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .budget import format_size, parse_size
from .errors import BudgetError, InputError

__all__ = ["BudgetedLoader", "NpySource", "CsvSource", "open_source", "LoaderPlan", "plan_loader"]


class NpySource:
    """Rows of a 2-D (or N-D, first axis = rows) C-order .npy file, read by window."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            arr = np.load(self.path, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise InputError(f"{self.path}: not a readable .npy file ({e})") from e
        if not isinstance(arr, np.memmap) or arr.ndim < 1:
            raise InputError(f"{self.path}: needs an array with a first (row) axis")
        if not arr.flags.c_contiguous:
            raise InputError(f"{self.path}: Fortran-order .npy; save it with np.ascontiguousarray")
        self.dtype = arr.dtype
        self.row_shape = tuple(arr.shape[1:])
        self.rows = int(arr.shape[0])
        self.offset = int(arr.offset)
        self.row_bytes = int(arr.itemsize * int(np.prod(self.row_shape, dtype=np.int64)))
        del arr

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` as a new in-memory array."""
        if stop <= start:
            return np.empty((0, *self.row_shape), self.dtype)
        window = np.memmap(self.path, dtype=self.dtype, mode="r",
                           offset=self.offset + start * self.row_bytes,
                           shape=(stop - start, *self.row_shape))
        out = np.array(window)  # copy, then drop the mapping: its pages leave RSS
        window._mmap.close()  # type: ignore[attr-defined]
        del window
        return out

    def read_rows(self, idx: np.ndarray, *, window_rows: int) -> np.ndarray:
        """Rows at the sorted indices ``idx``, mapping at most ``window_rows`` rows at once."""
        out = np.empty((len(idx), *self.row_shape), self.dtype)
        for _k, a, b in _windows(idx, window_rows):
            window = np.memmap(self.path, dtype=self.dtype, mode="r",
                               offset=self.offset + int(idx[a]) * self.row_bytes,
                               shape=(int(idx[b - 1] - idx[a]) + 1, *self.row_shape))
            out[a:b] = window[idx[a:b] - idx[a]]
            window._mmap.close()  # type: ignore[attr-defined]
            del window
        return out


class CsvSource:
    """Rows of a numeric CSV file; the row index (byte offsets) is built once."""

    def __init__(self, path: str | os.PathLike[str], *, header: bool | None = None,
                 delimiter: str = ",") -> None:
        self.path = Path(path)
        self.delimiter = delimiter
        offsets: list[int] = []
        with open(self.path, "rb") as f:
            first = f.readline()
            if header is None:  # a first line that does not parse as numbers is a header
                try:
                    [float(v) for v in first.decode().strip().split(delimiter)]
                    header = False
                except ValueError:
                    header = True
            pos = len(first)
            if not header and first.strip():
                offsets.append(0)
            for line in f:
                if line.strip():
                    offsets.append(pos)
                pos += len(line)
        self.header = header
        self.offsets = np.array(offsets + [pos], dtype=np.int64)
        self.rows = len(offsets)
        ncols = len(first.decode().strip().split(delimiter)) if first.strip() else 0
        self.row_shape: tuple[int, ...] = (ncols,)
        self.dtype = np.dtype(np.float32)
        # the parsed float32 row plus its text, alive together while a chunk is parsed
        text = int(self.offsets[-1] - self.offsets[0]) // max(1, self.rows)
        self.row_bytes = 4 * ncols + text

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` as float32 (a bad field raises InputError with its line)."""
        if stop <= start:
            return np.empty((0, *self.row_shape), np.float32)
        with open(self.path, "rb") as f:
            f.seek(int(self.offsets[start]))
            blob = f.read(int(self.offsets[stop] - self.offsets[start]))
        return self._parse(blob, start, stop, stop - start)

    def _parse(self, blob: bytes, start: int, stop: int, n: int) -> np.ndarray:
        lines = [ln for ln in blob.decode().splitlines() if ln.strip()]
        try:
            out = np.loadtxt(lines, delimiter=self.delimiter, dtype=np.float32, ndmin=2)
        except ValueError as e:
            raise InputError(f"{self.path}: rows {start + 1}-{stop}: {e}") from e
        if out.shape != (n, *self.row_shape):
            raise InputError(f"{self.path}: rows {start + 1}-{stop} do not all have "
                             f"{self.row_shape[0]} columns")
        return out

    def read_rows(self, idx: np.ndarray, *, window_rows: int) -> np.ndarray:
        """Rows at the sorted indices ``idx``, reading at most ``window_rows`` rows at once."""
        out = np.empty((len(idx), *self.row_shape), np.float32)
        with open(self.path, "rb") as f:
            for _k, a, b in _windows(idx, window_rows):
                lo, hi = int(idx[a]), int(idx[b - 1]) + 1
                f.seek(int(self.offsets[lo]))
                blob = f.read(int(self.offsets[hi] - self.offsets[lo]))
                starts = self.offsets[idx[a:b]] - self.offsets[lo]
                ends = self.offsets[idx[a:b] + 1] - self.offsets[lo]
                picked = b"".join(blob[int(s0):int(e0)] for s0, e0 in zip(starts, ends))
                del blob
                out[a:b] = self._parse(picked, lo, hi, b - a)
        return out


def _windows(idx: np.ndarray, window_rows: int) -> Iterator[tuple[int, int, int]]:
    """Split sorted ``idx`` into runs whose row span is at most ``window_rows``: (k, a, b)."""
    a, k, n = 0, 0, len(idx)
    while a < n:
        b = int(np.searchsorted(idx, idx[a] + max(1, window_rows), side="left"))
        b = max(b, a + 1)
        yield k, a, b
        a, k = b, k + 1


Source = NpySource | CsvSource


def open_source(path: str | os.PathLike[str]) -> Source:
    """A row source for a ``.npy`` or ``.csv`` path."""
    p = Path(path)
    if p.suffix.lower() == ".npy":
        return NpySource(p)
    if p.suffix.lower() in (".csv", ".txt"):
        return CsvSource(p)
    raise InputError(f"{p}: unknown data file kind; use .npy or .csv")


@dataclass(frozen=True)
class LoaderPlan:
    """How a budget is spent: ``chunk_rows`` rows per chunk, ``prefetch`` chunks ahead."""

    chunk_rows: int
    prefetch: int
    row_bytes: int
    budget_bytes: int

    @property
    def in_flight_bytes(self) -> int:
        """Bytes the loader may hold at once (chunks and their shuffled copies)."""
        return _in_flight(self.chunk_rows, self.prefetch, self.row_bytes)


def _in_flight(chunk_rows: int, prefetch: int, row_bytes: int) -> int:
    # queued chunks + one being read (raw copy and shuffled copy) + one being served
    return chunk_rows * row_bytes * (prefetch + 3)


def plan_loader(row_bytes: int, budget_bytes: int, *, batch_size: int,
                max_prefetch: int = 4) -> LoaderPlan:
    """Largest chunks that fit ``budget_bytes``, with the deepest useful prefetch.

    Chunks of at least ``4 * batch_size`` rows come first; prefetch deepens only when
    chunks that large still fit. BudgetError when not even one batch-sized chunk does.
    """
    best: LoaderPlan | None = None
    for prefetch in range(max_prefetch, -1, -1):
        rows = budget_bytes // (row_bytes * (prefetch + 3))
        if rows >= 4 * batch_size or (prefetch == 0 and rows >= batch_size):
            best = LoaderPlan(int(rows), prefetch, row_bytes, budget_bytes)
            break
    if best is None:
        need = _in_flight(batch_size, 0, row_bytes)
        raise BudgetError(f"loader budget {format_size(budget_bytes)} is too small for "
                          f"batch {batch_size} of {row_bytes} bytes per row; it needs at "
                          f"least {format_size(need)}")
    return best


class BudgetedLoader:
    """Batches ``(x, y)`` (or ``x`` alone) from row sources, within ``budget_bytes``.

    ``x``/``y``: row sources (:func:`open_source`) of equal length, or ``target_columns``
    to split one source (e.g. a CSV whose last column is the target). ``budget_bytes``:
    bytes the loader may hold. ``shuffle``: a new chunk order and row order every epoch
    from ``seed`` + epoch. ``drop_last``: drop a short last batch. ``indices``: serve only
    these rows (e.g. a cross-validation fold; sorted and de-duplicated here), read in
    windows of at most one chunk's row span, so a sparse subset never maps more.
    """

    def __init__(
        self,
        x: Source,
        y: Source | None = None,
        *,
        batch_size: int,
        budget_bytes: int | str,
        shuffle: bool = True,
        seed: int = 0,
        target_columns: Sequence[int] | None = None,
        drop_last: bool = False,
        max_prefetch: int = 4,
        indices: Sequence[int] | np.ndarray | None = None,
    ) -> None:
        if y is not None and y.rows != x.rows:
            raise InputError(f"x has {x.rows} rows but y has {y.rows}")
        self.indices: np.ndarray | None = None
        if indices is not None:
            idx = np.unique(np.asarray(indices, dtype=np.int64))
            if len(idx) and (idx[0] < 0 or idx[-1] >= x.rows):
                raise InputError(f"indices must lie in [0, {x.rows}), got {idx[0]}..{idx[-1]}")
            self.indices = idx
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.budget_bytes = parse_size(budget_bytes)
        self.shuffle = shuffle
        self.seed = seed
        self.target_columns = list(target_columns) if target_columns is not None else None
        self.drop_last = drop_last
        self.epoch = 0
        row_bytes = x.row_bytes + (y.row_bytes if y is not None else 0)
        self.plan = plan_loader(row_bytes, self.budget_bytes, batch_size=batch_size,
                                max_prefetch=max_prefetch)

    @classmethod
    def from_files(cls, x_path: str | os.PathLike[str], y_path: str | os.PathLike[str] | None
                   = None, **kw: Any) -> BudgetedLoader:
        """``BudgetedLoader(open_source(x_path), open_source(y_path), **kw)``."""
        return cls(open_source(x_path), open_source(y_path) if y_path else None, **kw)

    @property
    def rows(self) -> int:
        """Rows per epoch."""
        return self.x.rows if self.indices is None else len(self.indices)

    def __len__(self) -> int:
        """Batches per epoch."""
        n, b = self.rows, self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def _chunks(self, rng: np.random.Generator | None) -> list[tuple[int, int]]:
        step = self.plan.chunk_rows
        chunks = [(a, min(a + step, self.rows)) for a in range(0, self.rows, step)]
        if rng is not None:
            rng.shuffle(chunks)  # type: ignore[arg-type]
        return chunks

    def _read(self, a: int, b: int, rng: np.random.Generator | None
              ) -> tuple[np.ndarray, np.ndarray | None]:
        if self.indices is None:
            xs = self.x.read(a, b)
            ys = self.y.read(a, b) if self.y is not None else None
        else:  # positions [a, b) of the subset
            w = self.plan.chunk_rows
            xs = self.x.read_rows(self.indices[a:b], window_rows=w)
            ys = self.y.read_rows(self.indices[a:b], window_rows=w) if self.y is not None else None
        if self.target_columns is not None:
            cols = np.zeros(xs.shape[1], dtype=bool)
            cols[self.target_columns] = True
            xs, ys = xs[:, ~cols], xs[:, cols]
        if rng is not None:
            perm = rng.permutation(len(xs))
            xs = xs[perm]  # the unshuffled copy is freed here
            ys = ys[perm] if ys is not None else None
        return xs, ys

    def __iter__(self) -> Iterator[Any]:
        """One epoch of batches; the next ``iter()`` is the next epoch."""
        rng = np.random.default_rng(self.seed + self.epoch) if self.shuffle else None
        self.epoch += 1
        chunks = self._chunks(rng)
        q: queue.Queue[Any] = queue.Queue(maxsize=max(1, self.plan.prefetch))
        stop = threading.Event()
        done = object()

        def produce() -> None:
            try:
                for a, b in chunks:
                    item = self._read(a, b, rng)
                    while not stop.is_set():
                        try:
                            q.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    del item  # else it stays alive while the next chunk is read
                    if stop.is_set():
                        return
                q.put(done)
            except BaseException as e:  # hand the error to the consumer
                q.put(e)

        t = threading.Thread(target=produce, name="toma-loader", daemon=True)
        t.start()
        carry_x: np.ndarray | None = None  # under one batch of rows left from a chunk
        carry_y: np.ndarray | None = None
        bs = self.batch_size
        try:
            while True:
                item = q.get()
                if item is done:
                    break
                if isinstance(item, BaseException):
                    raise item
                xs, ys = item
                del item  # hold each chunk once, not twice
                i = 0
                if carry_x is not None:  # complete the short batch without copying the chunk
                    i = min(bs - len(carry_x), len(xs))
                    carry_x = np.concatenate([carry_x, xs[:i]])
                    if ys is not None and carry_y is not None:
                        carry_y = np.concatenate([carry_y, ys[:i]])
                    if len(carry_x) == bs:
                        yield (carry_x, carry_y) if ys is not None else carry_x
                        carry_x = carry_y = None
                while i + bs <= len(xs):
                    yield (xs[i:i + bs], ys[i:i + bs]) if ys is not None else xs[i:i + bs]
                    i += bs
                if i < len(xs):
                    carry_x = xs[i:].copy()
                    carry_y = ys[i:].copy() if ys is not None else None
                del xs, ys
            if carry_x is not None and not self.drop_last:
                yield (carry_x, carry_y) if carry_y is not None else carry_x
        finally:
            stop.set()
            t.join(timeout=5)
