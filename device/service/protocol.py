"""Requests and answers of the inference service, shared by HTTP and MQTT.

    from toma_edge.device.service.protocol import decode_json, encode_answer
    obj, rows = decode_json(b'{"inputs": [[0.1, 0.2]]}', predictor, max_rows=256)  # float32 (1, 2)
    encode_answer(prediction)          # b'{"outputs":[[0.53]]}' (+ "classes")

A request is ``{"inputs": [[...], ...]}`` (one list per row) or, over HTTP, a ``.npy``
body (``Content-Type: application/x-npy``). JSON is parsed strictly by
:mod:`toma_edge.jsonio` (orjson): invalid UTF-8, lone surrogates, ``NaN``/``Infinity``,
nesting deeper than :data:`~toma_edge.jsonio.MAX_DEPTH` and integers outside int64 are
400; strings (``"0.1"``) and booleans among the numbers are 422, never converted. A
``.npy`` body's header is read first: only real numeric dtypes (float, int, uint), and
its declared shape is checked against the row limit and the bytes actually sent before
anything is allocated. Every problem is a :class:`RequestError` with the HTTP status it
gets: 400 malformed JSON / .npy or wrong structure, 413 too many bytes or rows, 415 an
unsupported content type, 422 rows that do not fit the model (shape, non-numbers,
non-finite values). Answers are ``{"outputs": [[...], ...]}`` plus ``"classes"`` for
classification; errors are ``{"error": "..."}`` (one line).
"""

from __future__ import annotations

import ast
import json
import struct
from collections.abc import Collection
from typing import Any

import numpy as np
import orjson

from ...errors import InputError
from ...jsonio import dumps, loads, numeric_rows
from ..predictor import Prediction, Predictor

__all__ = ["RequestError", "decode_json", "decode_npy", "encode_answer", "encode_error",
           "NPY_TYPE"]

NPY_TYPE = "application/x-npy"
_SEND = 'send {"inputs": [[...], ...]}'
_NPY_MAGIC = b"\x93NUMPY"
_NPY_MAX_HEADER = 4096  # bytes of a .npy header dict; numpy's own writer needs < 200


class RequestError(InputError):
    """A request the service cannot answer; ``status`` is its HTTP status code."""

    def __init__(self, msg: str, status: int = 400) -> None:
        super().__init__(_one_line(msg))
        self.status = status


def _one_line(msg: str, limit: int = 400) -> str:
    text = " ".join(str(msg).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _too_many(n: int, max_rows: int) -> RequestError:
    return RequestError(
        f"{n} rows in one request is more than this device takes ({max_rows}); "
        "split it into smaller requests", 413)


def _rows(value: Any, p: Predictor, max_rows: int) -> np.ndarray:
    if isinstance(value, np.ndarray):
        n = int(value.shape[0]) if value.ndim else 0
    else:
        n = len(value) if isinstance(value, list) else 0
    if n > max_rows:  # before any conversion: the count is all it takes
        raise _too_many(n, max_rows)
    try:
        x = p.validate(value)
    except InputError as e:
        raise RequestError(str(e), 422) from e
    if x.shape[0] > max_rows:
        raise _too_many(int(x.shape[0]), max_rows)
    return x


def decode_json(body: bytes | str, p: Predictor, *, max_rows: int,
                extra_keys: Collection[str] = ()) -> tuple[dict[str, Any], np.ndarray]:
    """Parse a JSON request strictly; returns the object and its rows as validated float32.
    RequestError (400/413/422) for anything else."""
    try:
        obj = loads(body, what="the request")
    except InputError as e:
        raise RequestError(f"malformed JSON: {e}; {_SEND}") from e
    if not isinstance(obj, dict) or "inputs" not in obj:
        kind = "an object without 'inputs'" if isinstance(obj, dict) else _json_kind(obj)
        raise RequestError(f'the request must be a JSON object {{"inputs": [[...], ...]}}, '
                           f"got {kind}")
    unknown = set(obj) - {"inputs", *extra_keys}
    if unknown:
        names = sorted(str(k)[:40] for k in unknown)[:5]
        raise RequestError(f"unknown key(s) {names} in the request; send only 'inputs'")
    try:
        inputs = numeric_rows(obj["inputs"], what="'inputs'")
    except InputError as e:
        raise RequestError(str(e), 422) from e
    return obj, _rows(inputs, p, max_rows)


def _json_kind(obj: Any) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(obj), type(obj).__name__)


def npy_header(body: bytes | memoryview) -> tuple[np.dtype[Any], tuple[int, ...], bool, int]:
    """The dtype, shape, Fortran order and data offset a ``.npy`` body declares, read
    without allocating anything; RequestError (400) for a header that is not one."""
    if len(body) < 10 or bytes(body[:6]) != _NPY_MAGIC:
        raise RequestError("the body is not a readable .npy array (no \\x93NUMPY magic); "
                           "send numpy.save output")
    major = body[6]
    if major == 1:
        hlen, start = struct.unpack("<H", bytes(body[8:10]))[0], 10
    elif major in (2, 3) and len(body) >= 12:
        hlen, start = struct.unpack("<I", bytes(body[8:12]))[0], 12
    else:
        raise RequestError(f"the body is not a readable .npy array (format version {major})")
    if hlen > _NPY_MAX_HEADER or start + hlen > len(body):
        raise RequestError(f"the .npy header is {hlen} bytes, larger than the body or the "
                           f"{_NPY_MAX_HEADER} this device reads")
    try:
        text = bytes(body[start:start + hlen]).decode("utf-8" if major == 3 else "latin-1")
        d = ast.literal_eval(text)  # a literal dict: no calls, no names
    except (ValueError, SyntaxError, MemoryError, RecursionError, UnicodeDecodeError) as e:
        raise RequestError(f"the .npy header is not a Python literal dict: "
                           f"{type(e).__name__}") from e
    if not isinstance(d, dict) or set(d) != {"descr", "fortran_order", "shape"}:
        raise RequestError("the .npy header must be a dict of 'descr', 'fortran_order' and "
                           "'shape' only")
    shape, fortran, descr = d["shape"], d["fortran_order"], d["descr"]
    if (not isinstance(shape, tuple) or len(shape) > 8
            or not all(type(s) is int and s >= 0 for s in shape)):
        raise RequestError(f"the .npy header's shape must be a tuple of at most 8 sizes >= 0, "
                           f"got {str(shape)[:40]}")
    if not isinstance(fortran, bool):
        raise RequestError("the .npy header's fortran_order must be True or False")
    if not isinstance(descr, str):
        raise RequestError("the .npy array must have a plain numeric dtype (float or int); "
                           "structured dtypes are not taken")
    try:
        dtype = np.dtype(descr)
    except (TypeError, ValueError) as e:
        raise RequestError(f"the .npy header's dtype {descr[:24]!r} is not a numpy dtype") from e
    if dtype.kind not in "fiu" or dtype.hasobject or dtype.subdtype is not None:
        raise RequestError(f"the .npy array has dtype {descr[:24]!r}; send real numbers "
                           "(float or int), not booleans, strings, objects or complex", 422)
    return dtype, shape, fortran, start + hlen


def decode_npy(body: bytes, p: Predictor, *, max_rows: int) -> np.ndarray:
    """Parse a ``.npy`` body (numeric dtypes only, never pickles) into validated float32
    rows. The declared shape is checked against ``max_rows`` and the bytes sent before
    any array is made; the data is read in place."""
    dtype, shape, fortran, offset = npy_header(body)
    if shape and shape[0] > max_rows:
        raise _too_many(shape[0], max_rows)
    count = 1
    for s in shape:
        count *= s
    need = count * dtype.itemsize
    have = len(body) - offset
    if need != have:
        raise RequestError(f"the .npy header declares {list(shape)} {dtype.str} "
                           f"({need} bytes of data) but the body holds {have}")
    flat = np.frombuffer(body, dtype=dtype, count=count, offset=offset)
    arr = flat.reshape(shape[::-1]).T if fortran else flat.reshape(shape)
    # the runtime writes into and reads from aligned, writable memory: copy a view of the body
    return np.require(_rows(arr, p, max_rows), requirements=["C", "A", "W"])


def _dumps(obj: dict[str, Any]) -> bytes:
    try:
        return dumps(obj)
    except orjson.JSONEncodeError:  # e.g. a lone surrogate in an echoed id: escape it
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=True,
                          default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)
                          ).encode()


def encode_answer(pred: Prediction, **extra: Any) -> bytes:
    """The JSON answer for one request's prediction (``extra`` keys added, e.g. ``id``)."""
    out = pred.outputs
    obj: dict[str, Any] = {"outputs": out if out.flags.c_contiguous else out.tolist()}
    if pred.classes is not None:
        obj["classes"] = pred.classes
    obj.update(extra)
    return _dumps(obj)


def encode_error(msg: str, **extra: Any) -> bytes:
    """``{"error": msg}`` as JSON bytes, ``msg`` on one line (``extra`` keys added)."""
    return _dumps({"error": _one_line(msg), **extra})
