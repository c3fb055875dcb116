"""Streaming writers for ``toma-edge run``: CSV, .npy and JSON lines, to a file moved into
place only when the run finished, or to stdout as the rows come.

    from toma_edge.device.writers import open_writer, same_file
    with open_writer("out.csv", n_outputs=1, header=True) as w:   # out.csv appears on close
        w.write(np.zeros((4, 1), np.float32))
    same_file("rows.csv", "./rows.csv")                            # True: refuse to overwrite

The formats are :mod:`toma_edge.device.loaders`' (:func:`~.loaders.detect_format`).
"""

from __future__ import annotations

import abc
import json
import os
import stat
import sys
import tempfile
from typing import IO

import numpy as np

from ..errors import InputError
from .loaders import detect_format

__all__ = ["Writer", "CsvWriter", "JsonlWriter", "NpyWriter", "open_writer", "same_file"]


def _output_target(path: str) -> str | None:
    """Where a finished output goes: ``path`` with symlinks resolved, or None when it is
    not a regular file (a FIFO, /dev/null, a terminal: written to directly)."""
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except FileNotFoundError:
        return real
    except OSError as e:
        raise InputError(f"{path}: cannot write output: {e.strerror}") from e
    if stat.S_ISDIR(st.st_mode):
        raise InputError(f"{path}: cannot write output: it is a folder")
    return real if stat.S_ISREG(st.st_mode) else None


def _new_file_mode(target: str) -> int:
    """The mode ``open()`` would give ``target``: an existing file's own, else 0666 less
    the umask."""
    try:
        return stat.S_IMODE(os.stat(target).st_mode)
    except OSError:
        mask = os.umask(0)
        os.umask(mask)
        return 0o666 & ~mask


class Writer(abc.ABC):
    """Streams outputs to a file (or stdout). Use as a context manager, or ``close()``
    (finish) / ``abort()`` (after a failure).

    A file is written to a temporary file in its folder (``.NAME.XXXX.part``) and moved
    into place (fsync, then ``os.replace``) only by ``close()``: until then, and after
    ``abort()``, the path holds what it held before (or nothing), never a half file.
    Stdout (``-``) and non-regular files (a FIFO, /dev/null) are written as the rows
    come. ``write(outputs, classes=None)``: float32 ``(k, n_outputs)`` and, for
    classification, the ``k`` class labels. ``rows_written`` counts complete rows.
    """

    def __init__(self, path: str, *, n_outputs: int) -> None:
        self.path = path
        self.n_outputs = int(n_outputs)
        self.rows_written = 0
        self._done = False
        self._tmp: str | None = None
        self._target: str | None = None
        if path == "-":
            self._f: IO[bytes] = sys.stdout.buffer
            self._owned = False
            return
        self._owned = True
        try:
            self._target = _output_target(path)
            if self._target is None:
                self._f = open(path, "wb")  # noqa: SIM115  (closed by close/abort)
                return
            folder, name = os.path.split(self._target)
            fd, self._tmp = tempfile.mkstemp(dir=folder or ".", prefix=f".{name}.",
                                             suffix=".part")
        except OSError as e:
            raise InputError(f"{path}: cannot write output: {e.strerror}") from e
        self._f = os.fdopen(fd, "w+b")

    def _put(self, data: bytes | memoryview) -> None:
        try:
            self._f.write(data)
        except OSError as e:
            raise InputError(f"{self.path}: cannot write output: {e.strerror}") from e

    @abc.abstractmethod
    def write(self, outputs: np.ndarray, classes: list[str] | None = None) -> None:
        """Append complete rows: ``outputs`` float32 ``(k, n_outputs)``, ``classes`` labels."""

    def _finish(self) -> None:  # noqa: B027  (formats with a trailer override it)
        """Complete the content before it is moved into place."""

    def close(self) -> None:
        """Finish: the path now holds every row written, complete (atomically)."""
        if self._done:
            return
        self._done = True
        try:
            self._finish()
            self._f.flush()
            if self._tmp is not None and self._target is not None:
                os.fsync(self._f.fileno())
                os.fchmod(self._f.fileno(), _new_file_mode(self._target))
                self._f.close()
                os.replace(self._tmp, self._target)
                self._tmp = None
                _fsync_dir(os.path.dirname(self._target) or ".")
            elif self._owned:
                self._f.close()
        except OSError as e:
            self.abort()
            raise InputError(f"{self.path}: cannot write output: {e.strerror}") from e

    def abort(self) -> None:
        """Drop what was written (a file keeps what it held before); idempotent."""
        self._done = True
        if self._owned and not self._f.closed:
            try:
                self._f.close()
            except OSError:
                pass
        elif not self._owned:
            try:
                self._f.flush()  # stdout: the rows already streamed stay streamed
            except OSError:
                pass
        if self._tmp is not None:
            try:
                os.unlink(self._tmp)
            except OSError:
                pass
            self._tmp = None

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class CsvWriter(Writer):
    """``y0,y1,...[,class]`` per row; the header line only when ``header``."""

    def __init__(self, path: str, *, n_outputs: int, header: bool, classes: bool) -> None:
        super().__init__(path, n_outputs=n_outputs)
        self.classes = classes
        if header:
            cols = [f"y{i}" for i in range(n_outputs)] + (["class"] if classes else [])
            self._put((",".join(cols) + "\n").encode())
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
        self._put(text.encode())
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
        self._put(text.encode())
        self.rows_written += len(rows)


_NPY_HEADER_BYTES = 128  # fixed, so the final row count can be written over it


def _npy_header_bytes(rows: int, n_outputs: int) -> bytes:
    d = f"{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {n_outputs}), }}"
    body = d.ljust(_NPY_HEADER_BYTES - 10 - 1) + "\n"
    return b"\x93NUMPY\x01\x00" + len(body).to_bytes(2, "little") + body.encode("latin1")


class NpyWriter(Writer):
    """float32 ``(rows, n_outputs)``, streamed: the header is written again with the
    final row count when finished (stdout, or a FIFO, gets the finished file from a
    temporary one: nothing at all when the run fails)."""

    def __init__(self, path: str, *, n_outputs: int) -> None:
        self._final: IO[bytes] | None = None
        super().__init__(path, n_outputs=n_outputs)
        if self._tmp is None:  # stdout or a FIFO cannot seek back to the header
            self._final, self._f = self._f, tempfile.TemporaryFile()
        self._put(_npy_header_bytes(0, n_outputs))

    def write(self, outputs: np.ndarray, classes: list[str] | None = None) -> None:
        a = np.ascontiguousarray(outputs.reshape(len(outputs), -1), dtype="<f4")
        self._put(a.data)  # the array's own buffer, no tobytes() copy
        self.rows_written += len(a)

    def _finish(self) -> None:
        self._f.flush()
        self._f.seek(0)
        self._put(_npy_header_bytes(self.rows_written, self.n_outputs))
        self._f.flush()
        if self._final is not None:
            self._f.seek(0)
            try:
                while True:
                    b = self._f.read(1 << 20)
                    if not b:
                        break
                    self._final.write(b)
                self._final.flush()
            except OSError as e:
                raise InputError(f"{self.path}: cannot write output: {e.strerror}") from e
            self._f.close()
            self._f = self._final
            self._final = None

    def abort(self) -> None:
        if self._final is not None:  # the temporary copy goes; stdout/FIFO get nothing
            self._f.close()
            self._f, self._final = self._final, None
        super().abort()


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


def same_file(input: str, output: str) -> bool:
    """Whether ``output`` is the very file ``input`` is (the same inode: also through
    symlinks, hard links, or ``-`` redirected from/to it)."""
    def ident(path: str, fd: int) -> tuple[int, int] | None:
        try:
            st = os.fstat(fd) if path == "-" else os.stat(path)
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode):
            return None  # a terminal, pipe or /dev/null is never "the same data"
        return st.st_dev, st.st_ino

    a, b = ident(input, 0), ident(output, 1)
    return a is not None and a == b
