"""Requests and answers of the inference service, shared by HTTP and MQTT.

    from toma_edge.device.service.protocol import decode_json, encode_answer
    obj, rows = decode_json(b'{"inputs": [[0.1, 0.2]]}', predictor)   # rows: float32 (1, 2)
    encode_answer(prediction)          # b'{"outputs": [[0.53]]}' (+ "classes")

A request is ``{"inputs": [[...], ...]}`` (one list per row) or, over HTTP, a ``.npy``
body (``Content-Type: application/x-npy``). Every problem is a :class:`RequestError`
with the HTTP status it gets: 400 malformed JSON or wrong structure, 413 too many bytes
or rows, 415 an unsupported content type, 422 rows that do not fit the model (shape,
non-numbers, non-finite values). Answers are ``{"outputs": [[...], ...]}`` plus
``"classes"`` for classification; errors are ``{"error": "..."}``.
"""

from __future__ import annotations

import io
import json
from collections.abc import Collection
from typing import Any

import numpy as np

from ...errors import InputError
from ..predictor import Prediction, Predictor

__all__ = ["RequestError", "decode_json", "decode_npy", "encode_answer", "encode_error",
           "NPY_TYPE"]

NPY_TYPE = "application/x-npy"


class RequestError(InputError):
    """A request the service cannot answer; ``status`` is its HTTP status code."""

    def __init__(self, msg: str, status: int = 400) -> None:
        super().__init__(msg)
        self.status = status


def _rows(value: Any, p: Predictor, max_rows: int) -> np.ndarray:
    try:
        x = p.validate(value)
    except InputError as e:
        raise RequestError(str(e), 422) from e
    if x.shape[0] > max_rows:
        raise RequestError(
            f"{x.shape[0]} rows in one request is more than this device takes ({max_rows}); "
            "split it into smaller requests", 413)
    return x


def decode_json(body: bytes | str, p: Predictor, *, max_rows: int,
                extra_keys: Collection[str] = ()) -> tuple[dict[str, Any], np.ndarray]:
    """Parse a JSON request; returns the object and its rows as validated float32."""
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(f'malformed JSON: {e}; send {{"inputs": [[...], ...]}}') from e
    if not isinstance(obj, dict) or "inputs" not in obj:
        raise RequestError('the request must be a JSON object {"inputs": [[...], ...]}, '
                           f'got {type(obj).__name__}' + (" without 'inputs'" if isinstance(obj, dict) else ""))
    unknown = set(obj) - {"inputs", *extra_keys}
    if unknown:
        raise RequestError(f"unknown key(s) {sorted(unknown)} in the request; send only 'inputs'")
    inputs = obj["inputs"]
    if not isinstance(inputs, list):
        raise RequestError(f"'inputs' must be a list of rows, got {type(inputs).__name__}", 422)
    return obj, _rows(inputs, p, max_rows)


def decode_npy(body: bytes, p: Predictor, *, max_rows: int) -> np.ndarray:
    """Parse a ``.npy`` body (no pickles) into validated float32 rows."""
    try:
        arr = np.load(io.BytesIO(body), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise RequestError(f"the body is not a readable .npy array: {e}") from e
    if not isinstance(arr, np.ndarray):
        raise RequestError("the body is not a .npy array (an .npz?); send one array")
    return _rows(arr, p, max_rows)


def encode_answer(pred: Prediction, **extra: Any) -> bytes:
    """The JSON answer for one request's prediction (``extra`` keys added, e.g. ``id``)."""
    obj: dict[str, Any] = {"outputs": pred.outputs.tolist()}
    if pred.classes is not None:
        obj["classes"] = pred.classes
    obj.update(extra)
    return json.dumps(obj, separators=(",", ":")).encode()


def encode_error(msg: str, **extra: Any) -> bytes:
    """``{"error": msg}`` as JSON bytes (``extra`` keys added)."""
    return json.dumps({"error": msg, **extra}, separators=(",", ":")).encode()
