"""Streaming readers for ``toma-edge run``: CSV, .npy (memory-mapped), JSON lines and stdin,
in bounded chunks, with a bounded background prefetch (the writers are in
:mod:`toma_edge.device.writers`).

    from toma_edge.device.loaders import open_reader, prefetch
    from toma_edge.device.writers import open_writer
    reader = open_reader("rows.csv", row_shape=(10,), block_bytes=1 << 20)
    with open_writer("out.csv", n_outputs=1, header=reader.had_header) as w:
        for chunk in prefetch(reader, depth=4):          # chunk.rows: float32 (k, 10)
            w.write(chunk.rows.sum(axis=1, keepdims=True))

Memory stays bounded whatever the input size: a reader holds one block of text (or one
slice of the mapped .npy, whose pages it hands back to the kernel once read), a text line
at most ``max_line_bytes`` (:func:`line_bytes_for` the row width and budget), the
prefetch queue at most ``depth`` parsed chunks, and writers stream to a temporary file
moved into place only when the run finished (:class:`Writer`).

A bad row (wrong number of values, not a number, NaN, infinite or beyond float32, a line
too long, a JSON line that is not strict JSON) stops the reader with an
:class:`~toma_edge.errors.InputError` naming its line (1-based; for .npy its 0-based
row), after every good row before it has been yielded; with ``skip_bad=True`` it is
skipped and counted (``reader.skipped``, the first few in ``reader.bad_rows``). No row is
ever dropped otherwise. A .npy header is checked (numeric dtype, no pickle, row shape,
file size) before anything is mapped.

CSV is parsed by pandas' C parser where pandas is installed (the host install), one block
of whole lines at a time (about 1.5x numpy.loadtxt here, see bench/results/runtime.md),
else by numpy's C ``loadtxt`` (the lean device install); a block that is not plainly one
row of ``width`` finite numbers per line is read again line by line in Python, which
decides (so both parsers accept the same files). The CSV rules are :class:`CsvReader`'s.
"""

from __future__ import annotations

import abc
import io
import math
import mmap
import os
import queue
import re
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np

from .. import jsonio
from ..budget import format_size as _size
from ..errors import ConfigError, InputError

__all__ = [
    "Format",
    "Chunk",
    "BadRow",
    "Reader",
    "detect_format",
    "open_reader",
    "prefetch",
    "block_bytes_for",
    "line_bytes_for",
    "csv_block_parser",
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


# -- text input: BOM, line endings, bounded lines ------------------------------------------

_BOM = b"\xef\xbb\xbf"
_FIELD_BYTES = 64  # generous room for one number and its separator ("-1.23456789e-38, ")
#: a number as CSV holds it: ASCII digits, an optional sign, point and exponent (no "1_000",
#: "0x10", "١"), so what is read never depends on which parser read it
_NUM = re.compile(rb"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?\Z")
_NONFINITE = re.compile(rb"(?i)[+-]?(?:nan|inf|infinity)\Z")
_F32_INF_AT = 3.4028235677973366e38  # float64 values at least this large round to inf in float32
_SEPS = (b",", b";", b"\t")
_SEP_NAMES = {b",": "','", b";": "';'", b"\t": "tab"}


def line_bytes_for(width: int, free_bytes: int | None = None) -> int:
    """Longest input line (bytes) a reader accepts for rows of ``width`` values: room for
    ``width`` numbers of up to 64 characters plus 4 KiB, but no more than an eighth of
    ``free_bytes`` (the working budget left once a batch is paid; a line costs a few
    times its size while parsed) and never under 64 KiB of that bound."""
    want = int(width) * _FIELD_BYTES + 4096
    if free_bytes is None:
        return want
    return int(min(want, max(64 << 10, int(free_bytes) // 8)))


def _cr_only(data: bytes) -> bool:
    """Whether the first line of ``data`` ends in a lone CR (old Mac line endings)."""
    i = data.find(b"\r")
    if i < 0:
        return False
    j = data.find(b"\n")
    return (j < 0 or i < j) and data[i + 1 : i + 2] != b"\n"


class _TextReader(Reader):
    """Lines of a text file (or stdin) in blocks of whole lines: a UTF-8 BOM at the start
    is dropped, CR-only line endings are read as line ends, and a line longer than
    ``max_line_bytes`` is a bad row (read no further than that, so one 1 GB line costs
    a block, not a gigabyte)."""

    def __init__(self, path: str, row_shape: tuple[int, ...], *, block_bytes: int,
                 skip_bad: bool, max_line_bytes: int | None = None) -> None:
        super().__init__("<stdin>" if path == "-" else path, row_shape, skip_bad=skip_bad)
        self._f, self._owned = _open_binary(path)
        self.block_bytes = int(block_bytes)
        self.max_line_bytes = int(max_line_bytes or line_bytes_for(self.width))

    def close(self) -> None:
        if self._owned:
            self._f.close()

    def _too_long_reason(self) -> str:
        return (f"the line is longer than {self.max_line_bytes:,} bytes (far more than "
                f"{self.width} values need)")

    def _too_long(self, line: int) -> None:
        self._bad(line, self._too_long_reason())

    def _read(self, n: int) -> bytes:
        try:
            return self._f.read(n)
        except OSError as e:
            raise InputError(f"{self.name}: cannot read input: {e.strerror}") from e

    def _read_first(self) -> bytes:
        data = self._read(self.block_bytes)
        while data and len(data) < 4:  # a pipe may hand out a few bytes at a time
            more = self._read(self.block_bytes)
            if not more:
                break
            data += more
        return data[len(_BOM):] if data.startswith(_BOM) else data

    def _blocks(self) -> Iterator[tuple[bytes, int]]:
        """Blocks of whole lines (LF-terminated) and the 1-based number of each block's
        first line. The first line's end decides the line endings: a CR not followed by
        LF makes every CR a line end (CR-only files); else lines end in LF (or CR LF)."""
        rest = b""
        line = 1
        limit = self.max_line_bytes
        data = self._read_first()
        cr: bool | None = None  # undecided until the first line end is seen
        discarding = False  # inside a line too long to keep: drop bytes up to its end
        while True:
            if cr is None and data:
                probe = rest + data if rest else data
                i, j = probe.find(b"\r"), probe.find(b"\n")
                if j >= 0 and (i < 0 or j < i):
                    cr = False
                elif i >= 0 and i + 1 < len(probe):
                    cr = probe[i + 1] != 10
                elif i >= 0:  # a CR is the last byte so far: the next one tells
                    more = self._read(1)
                    data += more
                    if not more:
                        cr = True
                    continue
            if cr:
                data = data.replace(b"\r", b"\n")
            if not data:
                if rest:
                    yield rest, line
                return
            if discarding:
                nl = data.find(b"\n")
                if nl < 0:
                    data = self._read(self.block_bytes)
                    continue
                data, line, discarding = data[nl + 1 :], line + 1, False
                if not data:
                    data = self._read(self.block_bytes)
                    continue
            buf = rest + data if rest else data
            cut = buf.rfind(b"\n")
            if cut < 0:
                block, rest = b"", buf
            else:
                block, rest = buf[: cut + 1], buf[cut + 1 :]
            if block:
                yield block, line
                line += block.count(b"\n")
            if len(rest) > limit:  # rows before it went out first
                self._too_long(line)
                rest, discarding = b"", True
            data = self._read(self.block_bytes)


# -- CSV ------------------------------------------------------------------------------


_BOOL_WORD = re.compile(rb"(?i)true|false")


def csv_block_parser(engine: str | None = None) -> Callable[[bytes, bytes], np.ndarray]:
    """The fastest well-kept CSV parser installed: pandas' C parser where pandas is
    installed (the host), else numpy's C ``loadtxt`` (the lean device install; about
    0.6x pandas' speed here, no extra dependency). ``engine``: "pandas" or "numpy" to
    choose (tests). The parser takes a block and its separator; a block it refuses
    (ValueError) is read again line by line."""
    pd: Any = None
    if engine != "numpy":
        try:
            import pandas

            pd = pandas
        except ImportError:
            if engine == "pandas":
                raise
    if pd is None:
        def parse_np(block: bytes, sep: bytes) -> np.ndarray:
            return np.loadtxt(io.BytesIO(block), delimiter=sep.decode(), dtype=np.float32,
                              ndmin=2, comments=None, quotechar='"')

        return parse_np

    def parse_pd(block: bytes, sep: bytes) -> np.ndarray:
        # float64 columns, then one cast of the whole block to float32 C order: ~10%
        # faster than dtype=float32 per column, the same values (pandas parses float32
        # columns as float64 and casts too). na_filter=False: no NA-string matching, ~15%
        # faster; "nan" or "inf" still come out non-finite and go to the line-by-line path.
        # pandas' C parser always reads true/false (any of three spellings) as 1/0, with
        # no option to turn it off: a block holding either word goes to the strict path
        if _BOOL_WORD.search(block):
            raise ValueError("a boolean word in a numeric block")
        df = pd.read_csv(io.BytesIO(block), header=None, sep=sep.decode(), engine="c",
                         skip_blank_lines=True, na_filter=False, dtype=np.float64,
                         quotechar='"')
        return df.to_numpy(dtype=np.float32)

    return parse_pd


def _unquote(f: bytes) -> bytes:
    f = f.strip()
    if len(f) >= 2 and f[:1] == b'"' and f[-1:] == b'"':
        return f[1:-1].strip()
    return f


def _split(text: bytes, sep: bytes) -> list[bytes]:
    """Fields of a stripped line; an empty last field (a trailing separator) is dropped."""
    fields = text.split(sep)
    if len(fields) > 1 and not fields[-1].strip():
        fields.pop()
    return fields


def _is_number(f: bytes) -> bool:
    return bool(_NUM.match(f) or _NONFINITE.match(f))


class CsvReader(_TextReader):
    """Rows of ``width`` numbers separated by ``,`` (or ``;`` or a tab: whichever splits
    the first line into ``width`` fields), an optional header line.

    Rules: a UTF-8 BOM is dropped; LF, CR LF and CR-only line endings are read; numbers
    may be quoted (``"0.1"``); an empty last field (a trailing separator) is ignored; a
    number is ASCII (``[+-]digits[.digits][e[+-]digits]``); blank lines are not rows.
    The first non-blank line is a header only when none of its fields is a number
    (after stripping quotes): a line mixing numbers and text is a bad row, never a
    header, so no data row is dropped silently.
    """

    def __init__(self, path: str, row_shape: tuple[int, ...], *, block_bytes: int,
                 skip_bad: bool, max_line_bytes: int | None = None,
                 engine: str | None = None) -> None:
        super().__init__(path, row_shape, block_bytes=block_bytes, skip_bad=skip_bad,
                         max_line_bytes=max_line_bytes)
        self.engine = engine
        self.sep = b","
        self._started = False  # the first non-blank line (separator, header) was seen
        self._trailing = False  # the first line ended in a separator (an empty last field)

    def _detect_sep(self, first: bytes) -> bytes:
        counts = {s: len(_split(first, s)) for s in _SEPS}
        for s in _SEPS:
            if counts[s] == self.width:
                return s
        best = max(_SEPS, key=lambda s: counts[s])
        return best if counts[best] > 1 else b","

    def _header(self, block: bytes) -> tuple[bytes, int]:
        """Drop leading blank lines and a header line from the first block(s); returns
        what is left and how many lines were dropped. Sets ``sep`` and ``had_header``."""
        dropped = 0
        while block and not self._started:
            end = block.find(b"\n")
            first = block if end < 0 else block[:end]
            text = first.strip()
            if not text:
                block = b"" if end < 0 else block[end + 1 :]
                dropped += 1
                continue
            self._started = True
            if len(first) > self.max_line_bytes:
                return block, dropped  # the parser refuses it as too long
            self.sep = self._detect_sep(text)
            self._trailing = text.endswith(self.sep)
            fields = [_unquote(f) for f in _split(text, self.sep)]
            if any(fields) and not any(_is_number(f) for f in fields):
                self.had_header = True
                return (b"" if end < 0 else block[end + 1 :]), dropped + 1
        return block, dropped

    def __iter__(self) -> Iterator[Chunk]:
        parse = csv_block_parser(self.engine)
        for block, line in self._blocks():
            if not self._started:
                block, dropped = self._header(block)
                line += dropped
            if not block or block.isspace():  # isspace stops at the first character, strip copies
                continue
            rows = self._fast(block, parse)
            if rows is None:  # something is unusual in this block: read it line by line
                yield from self._slow(block, line)
                continue
            self.rows_read += len(rows)
            yield Chunk(rows.reshape(len(rows), *self.row_shape), line)

    def _fast(self, block: bytes, parse: Callable[[bytes, bytes], np.ndarray]) -> np.ndarray | None:
        """The block parsed in C, or None when it is not plainly one row per line of
        ``width`` finite numbers (then the line-by-line reader decides)."""
        sep = self.sep
        if self._trailing:  # every line ends in a separator (the first one did)
            block = block.replace(sep + b"\r\n", b"\r\n").replace(sep + b"\n", b"\n")
            if block.endswith(sep):
                block = block[: -len(sep)]
        if b"\r" in block and block.count(b"\r") != block.count(b"\r\n"):
            return None  # a CR inside a line: the C parsers would split it
        b = np.frombuffer(block, dtype=np.uint8)
        ends = np.flatnonzero(b == 10)  # one pass: the line count and the longest line
        lines = len(ends) + (0 if block.endswith(b"\n") else 1)
        if int(np.count_nonzero(b == sep[0])) != lines * (self.width - 1):
            return None  # blank lines, wrong widths, quoted separators: not for C
        if len(block) > self.max_line_bytes:
            last = len(block) - 1 - (int(ends[-1]) if len(ends) else -1)
            if last > self.max_line_bytes or (
                    len(ends) and int(np.diff(ends, prepend=-1).max()) - 1 > self.max_line_bytes):
                return None  # the line-by-line reader refuses the long line
        try:
            with np.errstate(all="ignore"):  # 1e39 -> inf, refused below; no warning
                arr = parse(block, sep)
        except Exception:  # noqa: BLE001  (any refusal: the line-by-line reader names the line)
            return None
        if (arr.ndim == 2 and arr.shape == (lines, self.width) and np.isfinite(arr.min())
                and np.isfinite(arr.max())):
            return np.ascontiguousarray(arr)
        return None

    def _reason(self, raw: bytes) -> tuple[list[float] | None, str | None]:
        """A line's values, or why it is bad; (None, None) for a blank line."""
        if len(raw) > self.max_line_bytes:
            return None, self._too_long_reason()
        if not raw.strip():
            return None, None  # a blank line is not a row
        text = raw.strip(b" \r\n\x0b\x0c") if self.sep == b"\t" else raw.strip()
        fields = _split(text, self.sep)
        if len(fields) != self.width:
            shown_sep = "" if self.sep == b"," else f" (separated by {_SEP_NAMES[self.sep]})"
            return None, f"has {len(fields)} values, expected {self.width}{shown_sep}"
        vals: list[float] = []
        for c, raw_f in enumerate(fields):
            f = _unquote(raw_f)
            shown = f.decode("utf-8", "replace")
            if len(shown) > 40:
                shown = shown[:37] + "..."
            if _NONFINITE.match(f):
                return None, f"value '{shown}' in column {c + 1} is not finite"
            if not _NUM.match(f):
                hint = ""
                if self.sep != b"," and _NUM.match(f.replace(b",", b".", 1)):
                    hint = " (write decimals with a point: 0.5, not 0,5)"
                return None, f"value '{shown}' in column {c + 1} is not a number{hint}"
            v = float(f)
            if abs(v) >= _F32_INF_AT:
                return None, (f"value '{shown}' in column {c + 1} is beyond float32's range "
                              "(about 3.4e38)")
            vals.append(v)
        return vals, None

    def _slow(self, block: bytes, line: int) -> Iterator[Chunk]:
        good: list[list[float]] = []
        start = line
        for i, raw in enumerate(block.split(b"\n")):
            vals, reason = self._reason(raw)
            if reason is not None:
                if not self.skip_bad and good:  # rows before the bad one go out first
                    yield self._chunk(good, start)
                    good = []
                self._bad(line + i, reason)
                continue
            if vals is None:
                continue
            if not good:
                start = line + i
            good.append(vals)
        if good:
            yield self._chunk(good, start)

    def _chunk(self, good: list[Any], start: int) -> Chunk:
        with np.errstate(all="ignore"):  # subnormals flush quietly; range was checked
            rows = np.asarray(good, dtype=np.float32)
        self.rows_read += len(rows)
        return Chunk(rows.reshape(len(rows), *self.row_shape), start)


# -- JSON lines -------------------------------------------------------------------------

_ORJSON_AT = re.compile(r": line 1 column (\d+) \(char \d+\)")


class JsonlReader(_TextReader):
    """One ``{"inputs": [...]}`` object per line (the row's values, flat or shaped),
    parsed strictly (:mod:`toma_edge.jsonio`): UTF-8 only, numbers are JSON numbers (no
    "0.1" strings, no booleans), nesting and integers bounded."""

    def __iter__(self) -> Iterator[Chunk]:
        depth = len(self.row_shape) + 3  # the object, a [row] wrapper, the row's arrays
        for block, line in self._blocks():
            good: list[Any] = []
            start = line
            for i, raw in enumerate(block.split(b"\n")):
                a: np.ndarray | None
                reason: str | None
                if len(raw) > self.max_line_bytes:
                    a, reason = None, self._too_long_reason()
                elif not raw.strip():
                    continue
                else:
                    a, reason = self._row(raw, depth)
                if reason is not None or a is None:
                    if not self.skip_bad and good:
                        yield self._chunk(good, start)
                        good = []
                    self._bad(line + i, reason or "not a row")
                    continue
                if not good:
                    start = line + i
                good.append(a)
            if good:
                yield self._chunk(good, start)

    def _row(self, raw: bytes, depth: int) -> tuple[np.ndarray | None, str | None]:
        try:
            obj = jsonio.loads(raw, max_depth=depth, what="the line")
            if not isinstance(obj, dict) or "inputs" not in obj:
                return None, 'expected an object {"inputs": [...]}'
            vals = jsonio.numeric_rows(obj["inputs"], what='"inputs"')
        except InputError as e:
            msg = str(e).splitlines()[0].removeprefix("the line: ")
            return None, _ORJSON_AT.sub(r" at column \1", msg)
        try:
            with np.errstate(all="ignore"):
                a = np.asarray(vals, dtype=np.float64)
        except ValueError:
            return None, '"inputs" is ragged (nested lists of different lengths)'
        if a.size != self.width:
            return None, f"\"inputs\" has {a.size} values, expected {self.width}"
        a = a.reshape(-1)
        if not (np.abs(a) < _F32_INF_AT).all():
            return None, "\"inputs\" holds a value beyond float32's range (about 3.4e38)"
        return a, None

    def _chunk(self, good: list[Any], start: int) -> Chunk:
        with np.errstate(all="ignore"):
            rows = np.stack(good).astype(np.float32)
        self.rows_read += len(rows)
        return Chunk(rows.reshape(len(rows), *self.row_shape), start)



# -- .npy -------------------------------------------------------------------------------


def _npy_header(f: IO[bytes], name: str) -> tuple[tuple[int, ...], bool, np.dtype[Any]]:
    """Shape, Fortran order and dtype from a .npy header at ``f``'s position (left just
    after it); InputError for anything not a plain numeric array (pickled objects,
    structured or string dtypes, other versions)."""
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise InputError(f"{name}: .npy format version {version[0]}.{version[1]} is not "
                             "read; save it with numpy.save (version 1.0 or 2.0)")
    except (ValueError, EOFError, OSError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"{name}: not a readable .npy file ({first})") from e
    dtype = np.dtype(dtype)
    if dtype.hasobject:
        raise InputError(f"{name}: the .npy holds Python objects (a pickle), which are never "
                         "loaded; save a numeric array")
    if dtype.fields is not None or dtype.subdtype is not None or dtype.kind not in "fiu":
        raise InputError(f"{name}: dtype {dtype} is not numeric; save float32 rows")
    return tuple(int(s) for s in shape), bool(fortran), dtype


class NpyReader(Reader):
    """A .npy of shape ``(rows, *row_shape)``, memory-mapped (a file) or streamed (stdin).

    The header is checked before anything is mapped or allocated: a numeric dtype (no
    pickles), rows of ``row_shape``, and (for a file) exactly the data bytes the shape
    declares. Mapped pages already read are handed back (``MADV_DONTNEED``) so the
    process RSS does not grow with the file. Rows are numbered from 0 in messages.
    """

    def __init__(self, path: str, row_shape: tuple[int, ...], *, block_bytes: int,
                 skip_bad: bool) -> None:
        super().__init__("<stdin>" if path == "-" else path, row_shape, skip_bad=skip_bad)
        self._stream: IO[bytes] | None = None
        self._arr: np.ndarray | None = None
        if path == "-":
            self._stream = sys.stdin.buffer
            shape, fortran, dtype = _npy_header(self._stream, self.name)
            if fortran and len(shape) > 1:
                raise InputError(f"{self.name}: Fortran-ordered .npy; save it in C order")
            self._check_shape(shape)
        else:
            f, _ = _open_binary(path)
            with f:
                shape, fortran, dtype = _npy_header(f, self.name)
                self._check_shape(shape)
                offset = f.tell()
                size = os.fstat(f.fileno()).st_size
            need = math.prod(shape) * dtype.itemsize
            if size - offset != need:
                raise InputError(
                    f"{path}: its header declares shape {shape} of {dtype} "
                    f"({_size(need)}) but the file holds {_size(max(0, size - offset))} of "
                    "data; it is truncated or not a .npy file")
            try:
                # copy-on-write ("c"): a private mapping whose slices torch accepts as
                # they are (it warns on read-only arrays); nothing ever writes to it
                self._arr = np.load(path, mmap_mode="c", allow_pickle=False)
            except (OSError, ValueError) as e:
                raise InputError(f"{path}: not a readable .npy file: {e}") from e
        self.dtype = np.dtype(dtype)
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

    def _check_shape(self, shape: tuple[int, ...]) -> None:
        if len(shape) < 1 or tuple(shape[1:]) != self.row_shape:
            raise InputError(f"{self.name}: array of shape {tuple(shape)}, expected (rows, "
                             f"{', '.join(map(str, self.row_shape))})")

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
                with np.errstate(all="ignore"):  # beyond float32 -> inf, refused below
                    block = np.array(self._arr[i:j], dtype=np.float32, order="C")
                self._release(j)
            else:
                assert self._stream is not None
                raw = self._stream.read((j - i) * row_nbytes)
                if len(raw) != (j - i) * row_nbytes:
                    raise InputError(f"{self.name}: the .npy stream ends after row "
                                     f"{i + len(raw) // row_nbytes}, its header says {n} rows")
                with np.errstate(all="ignore"):
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
                                     "finite (NaN, infinite or beyond float32's range); fix it "
                                     "or pass --skip-bad")
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
    max_line_bytes: int | None = None,
    csv_engine: str | None = None,
) -> Reader:
    """A reader for ``path`` (``-`` for stdin) yielding float32 chunks of ``row_shape``
    rows; ``block_bytes`` bounds the text (or array bytes) read at once,
    ``max_line_bytes`` a text line (default :func:`line_bytes_for` the row width);
    ``csv_engine``: "pandas" or "numpy" (default: pandas where installed)."""
    kind = detect_format(path, fmt)
    if path != "-" and not os.path.exists(path):
        raise InputError(f"{path}: no such input file")
    if path != "-" and os.path.isdir(path):
        raise InputError(f"{path}: is a folder, not an input file")
    if kind == "npy":
        return NpyReader(path, row_shape, block_bytes=block_bytes, skip_bad=skip_bad)
    if kind == "jsonl":
        return JsonlReader(path, row_shape, block_bytes=block_bytes, skip_bad=skip_bad,
                           max_line_bytes=max_line_bytes)
    return CsvReader(path, row_shape, block_bytes=block_bytes, skip_bad=skip_bad,
                     max_line_bytes=max_line_bytes, engine=csv_engine)


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
