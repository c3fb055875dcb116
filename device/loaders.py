"""Streaming readers and writers for ``toma-edge run``: CSV, .npy (memory-mapped), JSON
lines and stdin, in bounded chunks, with a bounded background prefetch.

    from toma_edge.device.loaders import open_reader, open_writer, prefetch
    reader = open_reader("rows.csv", row_shape=(10,), block_bytes=1 << 20)
    with open_writer("out.csv", n_outputs=1, header=reader.had_header) as w:
        for chunk in prefetch(reader, depth=4):          # chunk.rows: float32 (k, 10)
            w.write(chunk.rows.sum(axis=1, keepdims=True))

Memory stays bounded whatever the input size: a reader holds one block of text (or one
slice of the mapped .npy, whose pages it hands back to the kernel once read), the
prefetch queue at most ``depth`` parsed chunks, and writers stream to the file.

A bad row (wrong number of values, not a number, NaN or infinite) stops the reader with
an :class:`~toma_edge.errors.InputError` naming its line (1-based; for .npy its 0-based
row), after every good row before it has been yielded; with ``skip_bad=True`` it is
skipped and counted (``reader.skipped``, the first few in ``reader.bad_rows``).

CSV is parsed by pandas' C parser where pandas is installed (the host install), one block
of whole lines at a time (about 1.5x numpy.loadtxt here, see bench/results/runtime.md),
else by numpy's C ``loadtxt`` (the lean device install); a block it refuses is parsed again
line by line in Python to find the bad line. Header lines (any non-numeric field in the
first line) are detected and reported (``had_header``) so the output can mirror them.
"""

from __future__ import annotations

import abc
import io
import json
import math
import mmap
import os
import queue
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np

from ..errors import ConfigError, InputError

__all__ = [
    "Format",
    "Chunk",
    "BadRow",
    "Reader",
    "Writer",
    "detect_format",
    "open_reader",
    "open_writer",
    "prefetch",
    "block_bytes_for",
]

Format = Literal["csv", "npy", "jsonl"]
_EXT: dict[str, Format] = {".csv": "csv", ".txt": "csv", ".npy": "npy", ".jsonl": "jsonl",
                           ".ndjson": "jsonl"}
_MAX_BAD_KEPT = 10


def detect_format(path: str, fmt: str | None = None) -> Format:
    """The format of ``path``: from its extension; ``-`` (or an unknown extension) means
    ``fmt`` if given, else CSV."""
    if fmt is not None and fmt not in ("csv", "npy", "jsonl"):
        raise ConfigError(f"unknown format '{fmt}'; use csv, npy or jsonl")
    if path != "-":
        ext = Path(path).suffix.lower()
        if ext in _EXT:
            return _EXT[ext]
    return fmt or "csv"  # type: ignore[return-value]


def block_bytes_for(free_bytes: int, *, depth: int = 4) -> int:
    """Size of one input block (bytes) for ``free_bytes`` of working budget left once a
    batch is paid: a block costs about 4x its size while parsed (text, tokens, floats)
    and ``depth`` parsed chunks wait in the queue. Between 64 KiB and 4 MiB."""
    b = free_bytes // (8 * (depth + 2))
    return int(max(64 << 10, min(4 << 20, b)))


@dataclass(frozen=True)
class BadRow:
    """A skipped row: its 1-based line (0-based row for .npy) and what was wrong."""

    line: int
    reason: str


@dataclass
class Chunk:
    """Parsed rows (float32 ``(k, *row_shape)``) and where the first came from."""

    rows: np.ndarray
    first_line: int
    #: every value was checked finite by the reader (the Predictor need not look again)
    finite_checked: bool = True


class Reader(abc.ABC):
    """Base of the readers: iterate for :class:`Chunk` objects.

    ``had_header`` (CSV), ``total_rows`` (when known before reading: .npy),
    ``skipped`` and ``bad_rows`` (with ``skip_bad``), ``rows_read``.
    """

    name: str
    had_header: bool = False
    total_rows: int | None = None

    def __init__(self, name: str, row_shape: tuple[int, ...], *, skip_bad: bool) -> None:
        self.name = name
        self.row_shape = tuple(row_shape)
        self.width = int(np.prod(row_shape)) if row_shape else 1
        self.skip_bad = skip_bad
        self.skipped = 0
        self.bad_rows: list[BadRow] = []
        self.rows_read = 0

    def _bad(self, line: int, reason: str) -> None:
        if not self.skip_bad:
            raise InputError(f"{self.name}: line {line}: {reason}; fix it or pass --skip-bad")
        self.skipped += 1
        if len(self.bad_rows) < _MAX_BAD_KEPT:
            self.bad_rows.append(BadRow(line, reason))

    @abc.abstractmethod
    def __iter__(self) -> Iterator[Chunk]:
        """Yield the input as bounded chunks of validated rows."""

    def close(self) -> None:  # noqa: B027  (readers holding nothing need not close)
        """Release the input (not stdin)."""


def _open_binary(path: str) -> tuple[IO[bytes], bool]:
    if path == "-":
        return sys.stdin.buffer, False
    try:
        return open(path, "rb"), True
    except OSError as e:
        raise InputError(f"{path}: cannot read input: {e.strerror}") from e


# -- CSV ------------------------------------------------------------------------------


def _csv_block_parser() -> Callable[[bytes], np.ndarray]:
    """The fastest well-kept CSV parser installed: pandas' C parser where pandas is
    installed (the host), else numpy's C ``loadtxt`` (the lean device install; about
    0.6x pandas' speed here, no extra dependency)."""
    try:
        import pandas as pd
    except ImportError:
        def parse_np(block: bytes) -> np.ndarray:
            return np.loadtxt(io.BytesIO(block), delimiter=",", dtype=np.float32, ndmin=2,
                              comments=None)

        return parse_np

    def parse_pd(block: bytes) -> np.ndarray:
        # float64 columns, then one cast of the whole block to float32 C order: ~10%
        # faster than dtype=float32 per column, the same values (pandas parses float32
        # columns as float64 and casts too). na_filter=False: no NA-string matching, ~15%
        # faster; "nan" or "inf" still come out non-finite and go to the line-by-line path
        df = pd.read_csv(io.BytesIO(block), header=None, engine="c", skip_blank_lines=True,
                         na_filter=False)
        return df.to_numpy(dtype=np.float32)

    return parse_pd


class CsvReader(Reader):
    """Comma-separated rows of ``width`` numbers, an optional header line."""

    def __init__(self, path: str, row_shape: tuple[int, ...], *, block_bytes: int,
                 skip_bad: bool) -> None:
        super().__init__("<stdin>" if path == "-" else path, row_shape, skip_bad=skip_bad)
        self._f, self._owned = _open_binary(path)
        self.block_bytes = int(block_bytes)

    def close(self) -> None:
        if self._owned:
            self._f.close()

    def _blocks(self) -> Iterator[tuple[bytes, int]]:
        """Blocks of whole lines and the 1-based number of each block's first line."""
        rest = b""
        line = 1
        while True:
            data = self._f.read(self.block_bytes)
            if not data:
                if rest:
                    yield rest, line
                return
            buf = rest + data if rest else data
            cut = buf.rfind(b"\n")
            if cut < 0:  # a line longer than the block: keep reading
                rest = buf
                continue
            block, rest = buf[: cut + 1], buf[cut + 1 :]
            yield block, line
            line += block.count(b"\n")

    def _header(self, block: bytes) -> tuple[bytes, int]:
        """Drop a header line (any field not a number) from the first block."""
        end = block.find(b"\n")
        first = block if end < 0 else block[:end]
        fields = first.strip().split(b",")
        if not first.strip():
            return block, 0
        try:
            for f in fields:
                float(f)
        except ValueError:
            self.had_header = True
            return (b"" if end < 0 else block[end + 1 :]), 1
        return block, 0

    def __iter__(self) -> Iterator[Chunk]:
        parse = _csv_block_parser()
        first = True
        for block, line in self._blocks():
            if first:
                first = False
                block, dropped = self._header(block)
                line += dropped
            if not block or block.isspace():  # isspace stops at the first character, strip copies
                continue
            rows: np.ndarray | None = None
            try:
                arr = parse(block)
                if (arr.ndim == 2 and arr.shape[1] == self.width and np.isfinite(arr.min())
                        and np.isfinite(arr.max())):
                    rows = np.ascontiguousarray(arr)
            except ValueError:  # pandas' ParserError and EmptyDataError are ValueErrors
                rows = None
            if rows is None:  # something is wrong in this block: find it, line by line
                yield from self._slow(block, line)
                continue
            self.rows_read += len(rows)
            yield Chunk(rows.reshape(len(rows), *self.row_shape), line)

    def _slow(self, block: bytes, line: int) -> Iterator[Chunk]:
        good: list[list[float]] = []
        start = line
        for i, raw in enumerate(block.split(b"\n")):
            text = raw.strip()
            if not text:
                continue
            fields = text.split(b",")
            reason = None
            if len(fields) != self.width:
                reason = f"has {len(fields)} values, expected {self.width}"
            else:
                vals: list[float] = []
                for c, f in enumerate(fields):
                    try:
                        v = float(f)
                    except ValueError:
                        shown = f.decode("utf-8", "replace").strip()
                        reason = f"value '{shown}' in column {c + 1} is not a number"
                        break
                    if not math.isfinite(v) or abs(v) > 3.4028234e38:
                        reason = f"value '{f.decode('utf-8', 'replace').strip()}' in column {c + 1} is not finite"
                        break
                    vals.append(v)
            if reason is not None:
                if not self.skip_bad and good:  # rows before the bad one go out first
                    rows = np.asarray(good, dtype=np.float32)
                    self.rows_read += len(rows)
                    yield Chunk(rows.reshape(len(rows), *self.row_shape), start)
                    good = []
                self._bad(line + i, reason)
                continue
            good.append(vals)
        if good:
            rows = np.asarray(good, dtype=np.float32)
            self.rows_read += len(rows)
            yield Chunk(rows.reshape(len(rows), *self.row_shape), start)


# -- JSON lines -------------------------------------------------------------------------


class JsonlReader(CsvReader):
    """One ``{"inputs": [...]}`` object per line (the row's values, flat or shaped)."""

    def __iter__(self) -> Iterator[Chunk]:
        for block, line in self._blocks():
            good: list[Any] = []
            start = line
            for i, raw in enumerate(block.split(b"\n")):
                if not raw.strip():
                    continue
                reason = None
                try:
                    obj = json.loads(raw)
                    vals = obj["inputs"] if isinstance(obj, dict) else None
                    if not isinstance(vals, list):
                        raise KeyError("inputs")
                    a = np.asarray(vals, dtype=np.float32)
                    if a.size != self.width:
                        reason = f"\"inputs\" has {a.size} values, expected {self.width}"
                    elif not np.isfinite(a).all():
                        reason = "\"inputs\" holds a value that is not finite"
                except json.JSONDecodeError as e:
                    reason = f"not valid JSON ({e.msg})"
                except (KeyError, TypeError):
                    reason = 'expected an object {"inputs": [...]}'
                except ValueError:
                    reason = "\"inputs\" holds a value that is not a number"
                if reason is not None:
                    if not self.skip_bad and good:
                        yield self._chunk(good, start)
                        good = []
                    self._bad(line + i, reason)
                    continue
                good.append(a.reshape(-1))
            if good:
                yield self._chunk(good, start)

    def _chunk(self, good: list[Any], start: int) -> Chunk:
        rows = np.stack(good).astype(np.float32, copy=False)
        self.rows_read += len(rows)
        return Chunk(rows.reshape(len(rows), *self.row_shape), start)


# -- .npy -------------------------------------------------------------------------------


class NpyReader(Reader):
    """A .npy of shape ``(rows, *row_shape)``, memory-mapped (a file) or streamed (stdin).

    Mapped pages already read are handed back (``MADV_DONTNEED``) so the process RSS
    does not grow with the file. Rows are numbered from 0 in messages.
    """

    def __init__(self, path: str, row_shape: tuple[int, ...], *, block_bytes: int,
                 skip_bad: bool) -> None:
        super().__init__("<stdin>" if path == "-" else path, row_shape, skip_bad=skip_bad)
        self._stream: IO[bytes] | None = None
        self._arr: np.ndarray | None = None
        if path == "-":
            self._stream = sys.stdin.buffer
            try:
                version = np.lib.format.read_magic(self._stream)
                shape, fortran, dtype = np.lib.format._read_array_header(self._stream, version)  # type: ignore[attr-defined]
            except ValueError as e:
                raise InputError(f"{self.name}: not a .npy stream: {e}") from e
            if fortran:
                raise InputError(f"{self.name}: Fortran-ordered .npy; save it in C order")
        else:
            try:
                # copy-on-write ("c"): a private mapping whose slices torch accepts as
                # they are (it warns on read-only arrays); nothing ever writes to it
                self._arr = np.load(path, mmap_mode="c", allow_pickle=False)
            except (OSError, ValueError) as e:
                raise InputError(f"{path}: not a readable .npy file: {e}") from e
            shape, dtype = self._arr.shape, self._arr.dtype
        self.dtype = np.dtype(dtype)
        if self.dtype.kind not in "fiu":
            raise InputError(f"{self.name}: dtype {self.dtype} is not numeric; save float32 rows")
        if tuple(shape[1:]) != self.row_shape:
            raise InputError(f"{self.name}: array of shape {tuple(shape)}, expected (rows, "
                             f"{', '.join(map(str, self.row_shape))})")
        self.total_rows = int(shape[0])
        row_nbytes = self.dtype.itemsize * self.width
        self.chunk_rows = max(1, int(block_bytes) // 2 // row_nbytes)
        # float32 in C order is handed out as views of the mapping (no copy); pages are
        # returned to the kernel ``release_lag`` chunks behind the one being read, so the
        # chunks waiting in the prefetch queue and the one being run stay resident. A
        # page released early would only be read again: the mapping is private and
        # never written, so the data a view shows never changes.
        self.zero_copy = self._arr is not None and self.dtype == np.float32 \
            and bool(self._arr.flags.c_contiguous)
        self.release_lag = 6
        if self._arr is not None:
            mm = getattr(self._arr, "_mmap", None)
            if isinstance(mm, mmap.mmap) and hasattr(mmap, "MADV_SEQUENTIAL"):
                try:  # read-ahead: the kernel fetches pages before the reader faults on them
                    mm.madvise(mmap.MADV_SEQUENTIAL)
                except (OSError, ValueError):
                    pass

    def _release(self, upto_row: int) -> None:
        arr = self._arr
        mm = getattr(arr, "_mmap", None)
        if not isinstance(mm, mmap.mmap) or arr is None:
            return
        # the array starts at offset % ALLOCATIONGRANULARITY inside the mapping
        off = int(getattr(arr, "offset", 0)) % mmap.ALLOCATIONGRANULARITY
        end = off + upto_row * arr.dtype.itemsize * self.width
        end -= end % mmap.PAGESIZE
        if end > 0 and hasattr(mm, "madvise"):
            try:
                mm.madvise(mmap.MADV_DONTNEED, 0, end)
            except (OSError, ValueError):
                pass

    def __iter__(self) -> Iterator[Chunk]:
        n = self.total_rows or 0
        step = self.chunk_rows
        row_nbytes = self.dtype.itemsize * self.width
        for i in range(0, n, step):
            j = min(n, i + step)
            if self._arr is not None and self.zero_copy:
                block = self._arr[i:j].view(np.ndarray)
                self._release(max(0, i - self.release_lag * step))
            elif self._arr is not None:
                block = np.array(self._arr[i:j], dtype=np.float32, order="C")
                self._release(j)
            else:
                assert self._stream is not None
                raw = self._stream.read((j - i) * row_nbytes)
                if len(raw) != (j - i) * row_nbytes:
                    raise InputError(f"{self.name}: the .npy stream ends after row "
                                     f"{i + len(raw) // row_nbytes}, its header says {n} rows")
                block = np.frombuffer(raw, dtype=self.dtype).astype(np.float32)
                block = block.reshape(j - i, *self.row_shape)
            if len(block) and np.isfinite(block.min()) and np.isfinite(block.max()):
                ok = None  # NaN propagates through min/max: all finite, no temporary
            else:
                ok = np.isfinite(block.reshape(len(block), -1)).all(axis=1)
            if ok is not None and not ok.all():
                bad = np.flatnonzero(~ok)
                if not self.skip_bad:
                    first = int(bad[0])
                    if first:
                        self.rows_read += first
                        yield Chunk(block[:first], i)
                    raise InputError(f"{self.name}: row {i + first}: holds a value that is not "
                                     "finite (NaN or infinite); fix it or pass --skip-bad")
                for b in bad.tolist():
                    self._bad(i + b, "holds a value that is not finite")
                block = block[ok]
            self.rows_read += len(block)
            yield Chunk(block, i)

    def close(self) -> None:
        if self._arr is not None:
            self._release(self.total_rows or 0)
        self._arr = None


def open_reader(
    path: str,
    *,
    row_shape: tuple[int, ...],
    fmt: str | None = None,
    block_bytes: int = 1 << 20,
    skip_bad: bool = False,
) -> Reader:
    """A reader for ``path`` (``-`` for stdin) yielding float32 chunks of ``row_shape``
    rows; ``block_bytes`` bounds the text (or array bytes) read at once."""
    kind = detect_format(path, fmt)
    if path != "-" and not os.path.exists(path):
        raise InputError(f"{path}: no such input file")
    if kind == "npy":
        return NpyReader(path, row_shape, block_bytes=block_bytes, skip_bad=skip_bad)
    if kind == "jsonl":
        return JsonlReader(path, row_shape, block_bytes=block_bytes, skip_bad=skip_bad)
    return CsvReader(path, row_shape, block_bytes=block_bytes, skip_bad=skip_bad)


# -- prefetch ---------------------------------------------------------------------------

_END = object()


@dataclass
class _Failed:
    exc: BaseException


class _Prefetch:
    """Run an iterator in a thread, at most ``depth`` items ahead (backpressure)."""

    def __init__(self, source: Iterable[Any], depth: int) -> None:
        self._q: queue.Queue[Any] = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._source = source
        self._t = threading.Thread(target=self._run, name="toma-prefetch", daemon=True)
        self._t.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for item in self._source:
                if not self._put(item):
                    return
            self._put(_END)
        except BaseException as e:  # handed to the consumer, in order
            self._put(_Failed(e))

    def __iter__(self) -> Iterator[Any]:
        try:
            while True:
                item = self._q.get()
                if item is _END:
                    return
                if isinstance(item, _Failed):
                    raise item.exc
                yield item
        finally:
            self.close()

    def close(self) -> None:
        self._stop.set()
        while True:
            try:
                self._q.get_nowait()
            except queue.Empty:
                break
        self._t.join(timeout=5)


def prefetch(source: Iterable[Any], *, depth: int = 4) -> Iterator[Any]:
    """Iterate ``source`` in a background thread, at most ``depth`` items ahead; its
    errors are raised here after the items it yielded before them."""
    return iter(_Prefetch(source, depth))


# -- writers ----------------------------------------------------------------------------


class Writer(abc.ABC):
    """Streams outputs to a file (or stdout). Use as a context manager or ``close()``.

    ``write(outputs, classes=None)``: float32 ``(k, n_outputs)`` and, for classification,
    the ``k`` class labels. ``rows_written`` counts complete rows on disk.
    """

    def __init__(self, path: str, *, n_outputs: int) -> None:
        self.path = path
        self.n_outputs = int(n_outputs)
        self.rows_written = 0
        if path == "-":
            self._f: IO[bytes] = sys.stdout.buffer
            self._owned = False
        else:
            try:
                self._f = open(path, "wb")
            except OSError as e:
                raise InputError(f"{path}: cannot write output: {e.strerror}") from e
            self._owned = True

    @abc.abstractmethod
    def write(self, outputs: np.ndarray, classes: list[str] | None = None) -> None:
        """Append complete rows: ``outputs`` float32 ``(k, n_outputs)``, ``classes`` labels."""

    def close(self) -> None:
        """Flush; the file holds every row written so far, complete."""
        self._f.flush()
        if self._owned:
            self._f.close()

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CsvWriter(Writer):
    """``y0,y1,...[,class]`` per row; the header line only when ``header``."""

    def __init__(self, path: str, *, n_outputs: int, header: bool, classes: bool) -> None:
        super().__init__(path, n_outputs=n_outputs)
        self.classes = classes
        if header:
            cols = [f"y{i}" for i in range(n_outputs)] + (["class"] if classes else [])
            self._f.write((",".join(cols) + "\n").encode())
        self._fmt = ",".join(["%.9g"] * n_outputs)  # 9 digits: float32 round-trips

    def write(self, outputs: np.ndarray, classes: list[str] | None = None) -> None:
        k = len(outputs)
        if not k:
            return
        if self.classes and classes is not None:
            line = self._fmt + ",%s\n"
            rows = outputs.reshape(k, -1).tolist()
            text = "".join([line % (*r, c) for r, c in zip(rows, classes, strict=True)])
        else:  # one %-format over the flat values: C speed, no per-row Python
            text = ((self._fmt + "\n") * k) % tuple(outputs.reshape(-1).tolist())
        self._f.write(text.encode())
        self.rows_written += k


class JsonlWriter(Writer):
    """``{"outputs": [...]}`` per row, plus ``"class"`` for classification."""

    def write(self, outputs: np.ndarray, classes: list[str] | None = None) -> None:
        rows = outputs.reshape(len(outputs), -1).astype(np.float64).tolist()
        if classes is not None:
            text = "".join(json.dumps({"outputs": r, "class": c}) + "\n"
                           for r, c in zip(rows, classes, strict=True))
        else:
            text = "".join(json.dumps({"outputs": r}) + "\n" for r in rows)
        self._f.write(text.encode())
        self.rows_written += len(rows)


_NPY_HEADER_BYTES = 128  # fixed, so the final row count can be written over it


def _npy_header(rows: int, n_outputs: int) -> bytes:
    d = f"{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {n_outputs}), }}"
    body = d.ljust(_NPY_HEADER_BYTES - 10 - 1) + "\n"
    return b"\x93NUMPY\x01\x00" + len(body).to_bytes(2, "little") + body.encode("latin1")


class NpyWriter(Writer):
    """float32 ``(rows, n_outputs)``, streamed: the header is written again with the
    final row count on close (stdout gets the finished file from a temporary one)."""

    def __init__(self, path: str, *, n_outputs: int) -> None:
        self._final: IO[bytes] | None = None
        super().__init__(path, n_outputs=n_outputs)
        if path == "-":  # stdout cannot seek back to the header
            self._final, self._f = self._f, tempfile.TemporaryFile()
            self._owned = True
        self._f.write(_npy_header(0, n_outputs))

    def write(self, outputs: np.ndarray, classes: list[str] | None = None) -> None:
        a = np.ascontiguousarray(outputs.reshape(len(outputs), -1), dtype="<f4")
        self._f.write(a.data)  # the array's own buffer, no tobytes() copy
        self.rows_written += len(a)

    def close(self) -> None:
        if self._f.closed:
            return
        self._f.flush()
        self._f.seek(0)
        self._f.write(_npy_header(self.rows_written, self.n_outputs))
        self._f.flush()
        if self._final is not None:
            self._f.seek(0)
            while True:
                b = self._f.read(1 << 20)
                if not b:
                    break
                self._final.write(b)
            self._final.flush()
        self._f.close()


def open_writer(
    path: str,
    *,
    n_outputs: int,
    fmt: str | None = None,
    header: bool = False,
    classes: bool = False,
) -> Writer:
    """A streaming writer for ``path`` (``-`` for stdout). ``header``: CSV header line
    (when the input had one); ``classes``: add the class label (classification)."""
    kind = detect_format(path, fmt)
    if kind == "npy":
        return NpyWriter(path, n_outputs=n_outputs)
    if kind == "jsonl":
        return JsonlWriter(path, n_outputs=n_outputs)
    return CsvWriter(path, n_outputs=n_outputs, header=header, classes=classes)

