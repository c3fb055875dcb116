"""Training rows for the host trainer: arrays in memory, or files read within a budget.

    from toma_edge.host.training_data import ArrayData, FileData
    data = ArrayData(X, y, task="regression")                   # what the built-in example uses
    data = FileData.open("X.npy", "y.npy", task="regression")    # never loads the whole file
    fold = data.subset(train_idx)                                # a cross-validation fold
    for xb, yb in fold.loader(32, budget_bytes=64 << 20, seed=0):  # block-shuffled batches
        ...

``train_model`` and cross-validation take either kind. An :class:`ArrayData` behaves
exactly as the arrays did before (same shuffling, same figures); a :class:`FileData`
reads its rows through :class:`toma_edge.data_loading.BudgetedLoader` (a .npy by
memory-mapped windows, a CSV by row offsets), so the training file may be larger than
the training budget.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..data_loading import BudgetedLoader, CsvSource, NpySource, open_source
from ..errors import InputError

__all__ = ["TrainingData", "ArrayData", "FileData", "ArraySource", "SAMPLE_ROWS", "SAMPLE_BYTES"]

#: a bounded in-memory sample of file-backed rows (compression search, calibration,
#: export example) holds at most this many rows and at most SAMPLE_BYTES of them
SAMPLE_ROWS = 8192
SAMPLE_BYTES = 64 << 20


class TrainingData(ABC):
    """Rows ``(x, y)`` to train on: row count, row shape, subsets, loaders, samples."""

    task: str
    file_backed: bool = False

    @property
    @abstractmethod
    def rows(self) -> int: ...

    @property
    @abstractmethod
    def row_shape(self) -> tuple[int, ...]: ...

    @abstractmethod
    def subset(self, idx: np.ndarray) -> TrainingData:
        """The rows at ``idx`` (a fold); a file-backed subset still reads lazily."""

    @abstractmethod
    def head(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The first ``n`` rows, in memory (the trainer measures its first step on them)."""

    @abstractmethod
    def sample(self, n: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """At most ``n`` rows drawn uniformly without replacement, in file order."""

    @abstractmethod
    def labels(self) -> np.ndarray:
        """All targets (for stratified folds); small next to the features."""

    @abstractmethod
    def loader(self, batch_size: int, *, budget_bytes: int, seed: int = 0,
               shuffle: bool = True) -> BudgetedLoader | _ArrayLoader:
        """An iterable of ``(x, y)`` numpy batches; each ``iter()`` is a new epoch."""

    def calibration_rows(self, n: int) -> np.ndarray:
        """Rows to calibrate quantization with: all of them in memory, else a sample of ``n``."""
        return self.sample(n)[0]


class ArrayData(TrainingData):
    """Rows held as numpy arrays (the built-in example and array-returning projects)."""

    def __init__(self, X: np.ndarray, y: np.ndarray, *, task: str = "regression") -> None:
        self.X, self.y, self.task = X, y, task

    @property
    def rows(self) -> int:
        return len(self.X)

    @property
    def row_shape(self) -> tuple[int, ...]:
        return tuple(self.X.shape[1:])

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return self.X, self.y

    def subset(self, idx: np.ndarray) -> ArrayData:
        return ArrayData(self.X[idx], self.y[idx], task=self.task)

    def head(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        return self.X[:n], self.y[:n]

    def sample(self, n: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        if n >= self.rows:
            return self.X, self.y
        idx = np.sort(np.random.default_rng(seed).choice(self.rows, size=n, replace=False))
        return self.X[idx], self.y[idx]

    def calibration_rows(self, n: int) -> np.ndarray:
        return self.X  # as before: the build draws its calibration batches from all rows

    def labels(self) -> np.ndarray:
        return self.y

    def loader(self, batch_size: int, *, budget_bytes: int, seed: int = 0,
               shuffle: bool = True) -> _ArrayLoader:
        return _ArrayLoader(self.X, self.y, batch_size, seed=seed, shuffle=shuffle)


class _ArrayLoader:
    """Batches of in-memory arrays, with the loader interface (used for evaluation)."""

    def __init__(self, X: np.ndarray, y: np.ndarray, batch_size: int, *, seed: int,
                 shuffle: bool) -> None:
        self.X, self.y, self.batch_size, self.seed, self.shuffle = X, y, batch_size, seed, shuffle
        self.epoch = 0

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        n = len(self.X)
        order = (np.random.default_rng(self.seed + self.epoch).permutation(n) if self.shuffle
                 else np.arange(n))
        self.epoch += 1
        for i in range(0, n, self.batch_size):
            sel = order[i:i + self.batch_size]
            yield self.X[sel], self.y[sel]


class ArraySource:
    """An in-memory array with the row-source interface (a y returned as an array)."""

    def __init__(self, a: np.ndarray) -> None:
        self.a = np.ascontiguousarray(a)
        self.rows = len(self.a)
        self.row_shape = tuple(self.a.shape[1:])
        self.dtype = self.a.dtype
        self.row_bytes = int(self.a.itemsize * int(np.prod(self.row_shape, dtype=np.int64)))

    def read(self, start: int, stop: int) -> np.ndarray:
        return self.a[start:stop].copy()

    def read_rows(self, idx: np.ndarray, *, window_rows: int) -> np.ndarray:
        return self.a[idx]


Source = NpySource | CsvSource | ArraySource


class FileData(TrainingData):
    """Rows read from a .npy or CSV file (features) and a file or array (targets).

    Nothing is loaded at construction beyond the file headers (and a CSV's row offsets,
    8 bytes per row); ``indices`` restricts it to a subset (a fold).
    """

    file_backed = True

    def __init__(self, x: Source, y: Source, *, task: str = "regression",
                 indices: np.ndarray | None = None) -> None:
        if x.rows != y.rows:
            raise InputError(f"data: X_train has {x.rows} rows but y_train has {y.rows}")
        self.x, self.y, self.task = x, y, task
        self.indices = indices

    @classmethod
    def open(cls, x: str | os.PathLike[str], y: str | os.PathLike[str] | np.ndarray, *,
             task: str = "regression") -> FileData:
        """Open ``x`` (.npy or .csv path) and ``y`` (a path or an array)."""
        ys: Source = ArraySource(np.asarray(y)) if isinstance(y, np.ndarray) else open_source(y)
        return cls(open_source(x), ys, task=task)

    @property
    def rows(self) -> int:
        return self.x.rows if self.indices is None else len(self.indices)

    @property
    def row_shape(self) -> tuple[int, ...]:
        return tuple(self.x.row_shape)

    @property
    def row_bytes(self) -> int:
        """Bytes of one row in memory (features and targets; a CSV's text included)."""
        return int(self.x.row_bytes + self.y.row_bytes)

    @property
    def path(self) -> Path | None:
        return getattr(self.x, "path", None)

    def _positions(self) -> np.ndarray:
        return np.arange(self.x.rows) if self.indices is None else self.indices

    def subset(self, idx: np.ndarray) -> FileData:
        pos = self._positions()[np.sort(np.asarray(idx, dtype=np.int64))]
        return FileData(self.x, self.y, task=self.task, indices=pos)

    def _read(self, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        w = max(1, SAMPLE_BYTES // max(1, self.x.row_bytes))
        return self.x.read_rows(pos, window_rows=w), self.y.read_rows(pos, window_rows=w)

    def head(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        return self._read(self._positions()[:n])

    def sample(self, n: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        n = min(n, self.rows)
        pick = np.sort(np.random.default_rng(seed).choice(self.rows, size=n, replace=False))
        return self._read(self._positions()[pick])

    def bounded_sample(self, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """At most SAMPLE_ROWS rows and SAMPLE_BYTES bytes of them (what build keeps in memory)."""
        n = min(SAMPLE_ROWS, max(1, SAMPLE_BYTES // max(1, self.x.row_bytes)))
        return self.sample(n, seed=seed)

    def labels(self) -> np.ndarray:
        pos = self._positions()
        return self.y.read_rows(pos, window_rows=max(1, len(pos)))

    def loader(self, batch_size: int, *, budget_bytes: int, seed: int = 0,
               shuffle: bool = True) -> BudgetedLoader:
        return BudgetedLoader(self.x, self.y, batch_size=batch_size,  # type: ignore[arg-type]
                              budget_bytes=budget_bytes, seed=seed, shuffle=shuffle,
                              indices=self.indices)

    def scan(self, chunk_bytes: int = 32 << 20) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """All rows in file order, one bounded chunk at a time (validation)."""
        step = max(1, chunk_bytes // max(1, self.x.row_bytes + self.y.row_bytes))
        pos = self._positions()
        for a in range(0, len(pos), step):
            yield self._read(pos[a:a + step])


def describe(data: Any) -> str:
    """One line for logs: rows, row shape, where they come from."""
    where = f" from {data.path}" if getattr(data, "path", None) else " in memory"
    return f"{data.rows} rows of shape {data.row_shape}{where}"
