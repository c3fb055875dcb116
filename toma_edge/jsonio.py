"""Strict JSON for every untrusted body: requests, MQTT payloads, .jsonl rows, manifests.

    from toma_edge.jsonio import loads, dumps, numeric_rows
    obj = loads(b'{"inputs": [[0.1, 0.2]]}', what="request")   # InputError on bad input
    rows = numeric_rows(obj["inputs"], what="'inputs'")          # nested lists of numbers only
    dumps({"outputs": [[0.5]]})                                  # b'{"outputs":[[0.5]]}'

One parser (orjson) stands at each entry, so every surface refuses the same things with
one line: bytes that are not UTF-8 (lone surrogates included), NaN/Infinity, numbers that
overflow a double (a 400-digit integer), and nesting deeper than ``max_depth`` (checked
without recursion, so 10,000 levels cost a loop, not a ``RecursionError``). The numbers
a model takes are JSON numbers: :func:`numeric_rows` refuses strings ("0.1") and
booleans (``true``) instead of converting them. Errors are :class:`~toma_edge.errors.InputError`
(a subclass of ``TomaEdgeError``); callers add the HTTP status or exit code.
"""

from __future__ import annotations

from typing import Any

import orjson

from .errors import InputError

__all__ = ["MAX_DEPTH", "loads", "dumps", "depth_exceeds", "numeric_rows", "json_type"]

MAX_DEPTH = 32
"""Deepest nesting of arrays and objects accepted by default (a 4-D input in a request
object needs 6 levels)."""

_INT_LIMIT = 2**63  # larger JSON integers are refused: no database column or int64 holds them


def loads(data: bytes | bytearray | memoryview | str, *, max_depth: int = MAX_DEPTH,
          what: str = "the JSON") -> Any:
    """Parse ``data`` strictly; InputError naming ``what`` and the problem otherwise."""
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise InputError(f"{what}: invalid JSON ({_first_line(e)})") from e
    except RecursionError as e:  # an orjson build without its own depth limit
        raise InputError(f"{what} nests arrays/objects too deeply (> {max_depth})") from e
    if depth_exceeds(obj, max_depth):
        raise InputError(f"{what} nests arrays/objects too deeply (more than {max_depth} levels)")
    big = _big_int(obj)
    if big is not None:
        raise InputError(f"{what} holds the integer {str(big)[:24]}..., outside the 64-bit range")
    return obj


def dumps(obj: Any) -> bytes:
    """Compact JSON bytes (numpy arrays and scalars serialize natively)."""
    return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)


def depth_exceeds(obj: Any, max_depth: int) -> bool:
    """Whether ``obj`` nests lists/dicts deeper than ``max_depth`` (iterative, no recursion)."""
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, list):
            if d > max_depth:
                return True
            stack.extend((v, d + 1) for v in o if isinstance(v, (list, dict)))
        elif isinstance(o, dict):
            if d > max_depth:
                return True
            stack.extend((v, d + 1) for v in o.values() if isinstance(v, (list, dict)))
    return False


def _big_int(obj: Any) -> int | None:
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, int) and not isinstance(o, bool):
            if not -_INT_LIMIT <= o < _INT_LIMIT:
                return o
        elif isinstance(o, list):
            stack.extend(o)
        elif isinstance(o, dict):
            stack.extend(o.values())
    return None


def numeric_rows(value: Any, *, what: str = "'inputs'") -> Any:
    """Return ``value`` if it is nested lists whose leaves are all JSON numbers.

    Strings and booleans are refused (never converted), as are objects, nulls and empty
    nesting; the shape itself (ragged rows, width) is the model's check, not this one.
    """
    if not isinstance(value, list):
        raise InputError(f"{what} must be a list of rows, got {json_type(value)}")
    stack: list[Any] = [value]
    while stack:
        o = stack.pop()
        if isinstance(o, list):
            stack.extend(o)
        elif isinstance(o, bool) or not isinstance(o, (int, float)):
            raise InputError(f"{what} must hold JSON numbers only, found {json_type(o)} "
                             f"{_short(o)}")
    return value


def json_type(o: Any) -> str:
    """What a parsed JSON value is, for messages: "null", "a boolean", "a string",
    "an object", "an array" or "a number"."""
    if o is None:
        return "null"
    if isinstance(o, bool):
        return "a boolean"
    if isinstance(o, str):
        return "a string"
    if isinstance(o, dict):
        return "an object"
    if isinstance(o, list):
        return "an array"
    if isinstance(o, (int, float)):
        return "a number"
    return type(o).__name__


def _short(o: Any) -> str:
    try:
        text = orjson.dumps(o).decode()
    except TypeError:
        text = repr(o)
    return text if len(text) <= 40 else text[:37] + "..."


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__
