"""Hostile input against one real `toma-edge serve` over HTTP (issue 12, classes 1, 2, 8,
9 and 11): deep nesting, huge integers, lone surrogates, strings and booleans among the
numbers, .npy headers that lie about their shape or dtype, idle and slow connections,
and a quiet SIGTERM. Every answer to bad input is a 4xx with a one-line JSON error, never
a 5xx, and a valid request is answered correctly afterwards. The property-based tests
(Hypothesis) generate the next hostile body; `--hypothesis-profile=long` runs 2000 each."""

from __future__ import annotations

import io
import json
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_service_http import ServiceProc, offline

JSON = "application/json"
NPY = "application/x-npy"
ROW = [0.1, -0.2, 0.3, 0.4, -0.5, 0.6, 0.7, -0.8, 0.9, 1.0]


@pytest.fixture(scope="module")
def svc(example_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProc]:
    log = tmp_path_factory.mktemp("hostile-log") / "serve.log"
    s = ServiceProc(log, args=[str(example_bundle), "--threads", "1"])
    yield s
    assert s.stop() == 0, s.tail()
    assert "Traceback" not in s.tail(), s.tail()


def _post(svc: ServiceProc, body: bytes, ctype: str = JSON) -> tuple[int, bytes]:
    s, _, b = svc.request("POST", "/v1/predict", body, {"Content-Type": ctype})
    return s, b


def _assert_refused(status: int, body: bytes, *statuses: int) -> str:
    """A 4xx (one of ``statuses`` if given) whose body is {"error": one line}."""
    assert 400 <= status < 500 and (not statuses or status in statuses), (status, body[:300])
    obj = json.loads(body)
    assert set(obj) == {"error"} and isinstance(obj["error"], str), obj
    assert obj["error"] and "\n" not in obj["error"], obj
    return str(obj["error"])


def _still_serving(svc: ServiceProc, example_bundle: Path) -> None:
    rows = np.array([ROW, ROW[::-1]], dtype=np.float32)
    s, answer = svc.predict(rows.tolist())
    assert s == 200, answer
    np.testing.assert_allclose(np.array(answer["outputs"]), offline(example_bundle, rows),
                               atol=1e-5, rtol=0)


def _npy(header: bytes, data: bytes = b"", version: bytes = b"\x01\x00") -> bytes:
    pad = b" " * (63 - (10 + len(header)) % 64) + b"\n"
    return b"\x93NUMPY" + version + struct.pack("<H", len(header + pad)) + header + pad + data


# -- classes 1 and 2: strict JSON -------------------------------------------------------

def test_deep_nesting_huge_ints_and_bad_unicode_are_400_in_one_line(
        svc: ServiceProc, example_bundle: Path) -> None:
    deep = b'{"inputs": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"
    huge = b'{"inputs": [[' + b"9" * 400 + b',0,0,0,0,0,0,0,0,0]]}'
    big63 = b'{"inputs": [[9223372036854775808,0,0,0,0,0,0,0,0,0]]}'
    deep40 = b'{"inputs": ' + b"[" * 40 + b"]" * 40 + b"}"
    cases = [
        (deep, "depth"), (deep40, "too deeply"), (huge, "invalid JSON"), (big63, "64-bit"),
        (b'{"inputs": [[1,0,0,0,0,0,0,0,0,"\\ud800"]]}', "surrogate"),
        (b'{"inputs": [[1,0,0,0,0,0,0,0,0,0]], "x": "\xed\xa0\x80"}', "UTF-8"),
        (b'{"inputs": [[1,0,0,0,0,0,0,0,0,\xff]]}', "invalid JSON"),
        (b'{"inputs": [[1,0,0,0,0,0,0,0,0,Infinity]]}', "invalid JSON"),
        (b'{"inputs": [[1,0,0,0,0,0,0,0,0,NaN]]}', "invalid JSON"),
    ]
    for body, text in cases:
        status, answer = _post(svc, body)
        err = _assert_refused(status, answer, 400)
        assert text in err, (body[:60], err)
    _still_serving(svc, example_bundle)


def test_strings_and_booleans_among_numbers_are_refused_not_converted(
        svc: ServiceProc, example_bundle: Path) -> None:
    for bad, kind in (("0.1", "string"), (True, "boolean"), (None, "null"), ({}, "object")):
        row: list[Any] = list(ROW)
        row[3] = bad
        status, answer = _post(svc, json.dumps({"inputs": [row]}).encode())
        err = _assert_refused(status, answer, 422)
        assert kind in err and "numbers" in err, err
    status, answer = _post(svc, json.dumps({"inputs": [["0.1"] * 10]}).encode())
    _assert_refused(status, answer, 422)
    _still_serving(svc, example_bundle)


# -- class 8 (requests): .npy headers checked before allocating --------------------------

def test_npy_headers_are_checked_before_anything_is_allocated(
        svc: ServiceProc, example_bundle: Path) -> None:
    f4 = b"'descr': '<f4', 'fortran_order': False"
    cases = [
        # a header claiming 10**9 rows (37 GiB) with 40 bytes behind it: no MemoryError/500
        (_npy(b"{" + f4 + b", 'shape': (1000000000, 10), }", b"\0" * 40), 413, "rows"),
        (_npy(b"{" + f4 + b", 'shape': (3, 10000000000), }", b"\0" * 40), 400, "declares"),
        (_npy(b"{" + f4 + b", 'shape': (2, 10), }", b"\0" * 40), 400, "declares"),
        (_npy(b"{'descr': '|b1', 'fortran_order': False, 'shape': (1, 10), }", b"\1" * 10),
         422, "booleans"),
        (_npy(b"{'descr': '<U1', 'fortran_order': False, 'shape': (1, 10), }", b"\0" * 40),
         422, "strings"),
        (_npy(b"{'descr': '|O', 'fortran_order': False, 'shape': (1, 10), }", b"\0" * 80),
         422, "objects"),
        (_npy(b"{'descr': '<c8', 'fortran_order': False, 'shape': (1, 10), }", b"\0" * 80),
         422, "complex"),
        (_npy(b"{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (1,), }",
              b"\0" * 4), 400, "structured"),
        (_npy(b"{'descr': '<f4', 'fortran_order': False, 'shape': (1, 10), 'x': 1}",
              b"\0" * 40), 400, "header"),
        (_npy(b"__import__('os').system('true')", b""), 400, "literal"),
        (_npy(b"{" + f4 + b", 'shape': (-1, 10), }"), 400, "shape"),
        (b"\x93NUMPY\x01\x00\xff\xff{", 400, "header"),
        (b"\x93NUMPY\x09\x00" + b"\0" * 20, 400, "version"),
    ]
    for body, status, text in cases:
        got, answer = _post(svc, body, NPY)
        err = _assert_refused(got, answer, status)
        assert text in err, (body[:80], err)
    # a pickled object array (np.save with allow_pickle) is refused the same way
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}] * 10, dtype=object).reshape(1, 10), allow_pickle=True)
    _assert_refused(*_post(svc, buf.getvalue(), NPY), 422)
    # what np.save writes still works: big-endian doubles, Fortran order, ints
    rows = np.array([ROW, ROW[::-1]], dtype=np.float32)
    for arr in (rows.astype(">f8"), np.asfortranarray(rows), (rows * 10).astype(np.int16)):
        buf = io.BytesIO()
        np.save(buf, arr)
        got, answer = _post(svc, buf.getvalue(), NPY)
        assert got == 200, answer
        np.testing.assert_allclose(np.array(json.loads(answer)["outputs"]),
                                   offline(example_bundle, np.asarray(arr, np.float32)),
                                   atol=1e-5, rtol=0)
    _still_serving(svc, example_bundle)


# -- property-based: hostile JSON and .npy bodies ----------------------------------------

_scalars = (st.none() | st.booleans() | st.integers() | st.text(max_size=8)
            | st.floats(allow_nan=False, allow_infinity=False))
_json_values = st.recursive(
    _scalars, lambda c: st.lists(c, max_size=12) | st.dictionaries(st.text(max_size=6), c,
                                                                     max_size=4),
    max_leaves=60)
_rowish = st.lists(st.lists(st.floats(allow_nan=False, allow_infinity=False) | st.integers(
    -2**70, 2**70) | _scalars, min_size=8, max_size=12), max_size=6)


@st.composite
def hostile_json(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["value", "inputs", "rows", "deep", "bigint", "text", "bytes",
                                 "truncated", "bad-utf8"]))
    if kind == "value":
        return json.dumps(draw(_json_values)).encode()
    if kind == "inputs":
        return json.dumps({"inputs": draw(_json_values)}).encode()
    if kind == "rows":
        obj: dict[str, Any] = {"inputs": draw(_rowish)}
        if draw(st.booleans()):
            obj[draw(st.text(max_size=5))] = draw(_scalars)
        return json.dumps(obj).encode()
    if kind == "deep":
        n = draw(st.integers(1, 20_000))
        return b'{"inputs": ' + b"[" * n + draw(st.sampled_from([b"1", b"", b'"x"'])) + \
            b"]" * draw(st.sampled_from([n, max(0, n - 1), n + 1])) + b"}"
    if kind == "bigint":
        digits = str(draw(st.integers(10, 10**6))) * draw(st.integers(1, 60))
        return f'{{"inputs": [[{digits},0,0,0,0,0,0,0,0,0]]}}'.encode()
    if kind == "text":
        word = draw(st.sampled_from(["NaN", "-Infinity", "Infinity", "nan", "1e999", "0x10",
                                     "01", "1.", ".5", "+1", "true", "null", "\"1\""]))
        return f'{{"inputs": [[{word},0,0,0,0,0,0,0,0,0]]}}'.encode()
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "truncated":
        body = json.dumps({"inputs": [ROW, ROW]}).encode()
        return body[:draw(st.integers(0, len(body) - 1))]
    raw = bytearray(json.dumps({"inputs": [ROW]}).encode())
    raw.insert(draw(st.integers(0, len(raw))), draw(st.sampled_from([0xff, 0xc0, 0xed, 0x80])))
    return bytes(raw)


_descrs = st.sampled_from(["<f4", ">f8", "<f2", "<i8", "|u1", "|b1", "<U3", "|S4", "|O", "<c8",
                           "|V8", "<M8[s]", "<m8[s]", "f4", "float32", "xyz", ""])
_shapes = st.lists(st.integers(0, 10**12) | st.integers(-3, 12), max_size=4).map(tuple)


@st.composite
def hostile_npy(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["header", "truncated", "raw", "literal"]))
    if kind == "raw":
        return b"\x93NUMPY" + draw(st.binary(max_size=120))
    if kind == "truncated":
        buf = io.BytesIO()
        np.save(buf, np.ones((draw(st.integers(1, 5)), 10), np.float32))
        data = buf.getvalue()
        return data[:draw(st.integers(0, len(data) - 1))]
    if kind == "literal":
        header = draw(st.text(max_size=80)).encode("utf-8", "surrogatepass")
    else:
        header = repr({"descr": draw(_descrs), "fortran_order": draw(st.booleans() | _scalars),
                       "shape": draw(_shapes | _scalars)}).encode()
    version = draw(st.sampled_from([b"\x01\x00", b"\x02\x00", b"\x03\x00", b"\x00\x00"]))
    if version != b"\x01\x00":
        return b"\x93NUMPY" + version + struct.pack("<I", len(header)) + header + \
            draw(st.binary(max_size=200))
    return _npy(header, draw(st.binary(max_size=200)))


def _property(svc: ServiceProc, example_bundle: Path, body: bytes, ctype: str) -> None:
    status, answer = _post(svc, body, ctype)
    if status == 200:  # a body that happened to be a valid request
        outputs = json.loads(answer)["outputs"]
        assert all(len(o) == 1 for o in outputs)
    else:
        _assert_refused(status, answer)
    _still_serving(svc, example_bundle)


@given(body=hostile_json())
def test_property_hostile_json_bodies_get_a_4xx_and_serving_goes_on(
        svc: ServiceProc, example_bundle: Path, body: bytes) -> None:
    _property(svc, example_bundle, body, JSON)


@given(body=hostile_npy())
def test_property_hostile_npy_bodies_get_a_4xx_and_serving_goes_on(
        svc: ServiceProc, example_bundle: Path, body: bytes) -> None:
    _property(svc, example_bundle, body, NPY)


def test_no_5xx_was_ever_answered(svc: ServiceProc) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    text = svc.get("/metrics")[1].decode()
    codes = {s.labels.get("code") for fam in text_string_to_metric_families(text)
             for s in fam.samples if s.name == "toma_edge_requests_total"}
    assert codes and not {c for c in codes if c and c.startswith("5")}, codes


# -- class 9: idle and slow connections --------------------------------------------------

def _closed_within(so: socket.socket, seconds: float) -> bool:
    """Whether the server closed ``so`` (EOF or reset) within ``seconds``."""
    so.settimeout(seconds)
    try:
        while so.recv(4096):
            pass  # a 503 or 431 answer before the close
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_idle_and_slow_connections_are_closed_and_a_fresh_client_is_answered(
        svc: ServiceProc, example_bundle: Path) -> None:
    """Defaults of `serve`: a request head must arrive within 10 s (request_timeout_s)."""
    held: list[socket.socket] = []
    try:
        t0 = time.monotonic()
        for _ in range(300):  # idle sockets that never send a byte
            held.append(socket.create_connection(("127.0.0.1", svc.port), timeout=10))
        slow = socket.create_connection(("127.0.0.1", svc.port), timeout=10)
        slow.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\n")  # a head that never ends
        held.append(slow)
        _still_serving(svc, example_bundle)
        # every one is closed within the head timeout (+ the 1 s sweep), none for ever
        open_ones = [so for so in held
                     if not _closed_within(so, max(0.1, t0 + 14 - time.monotonic()))]
        assert not open_ones, f"{len(open_ones)} of {len(held)} idle connections still open"
        # a head larger than 64 KiB: 431 (or closed) at once
        big = socket.create_connection(("127.0.0.1", svc.port), timeout=10)
        held.append(big)
        big.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        try:
            for _ in range(40):
                big.sendall(b"X-Pad: " + b"a" * 4000 + b"\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        big.settimeout(5)
        try:
            first = big.recv(200)
        except ConnectionResetError:
            first = b""
        assert first == b"" or first.startswith((b"HTTP/1.1 431", b"HTTP/1.1 400")), first
        _still_serving(svc, example_bundle)
    finally:
        for so in held:
            so.close()


def _answer(so: socket.socket, timeout: float) -> bytes:
    so.settimeout(timeout)
    data = b""
    try:
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            chunk = so.recv(4096)
            if not chunk:
                break
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return data


def test_connection_cap_slow_bodies_and_the_bytes_of_bodies_in_flight_are_bounded(
        example_bundle: Path, tmp_path: Path) -> None:
    s = ServiceProc(tmp_path / "serve.log", config={
        "bundle": str(example_bundle), "threads": 1, "request_timeout_s": 3.0,
        "max_connections": 50, "telemetry": False})
    held: list[socket.socket] = []
    try:
        # bodies declared large and sent slowly: their bytes are reserved up front and the
        # ones past a quarter of the free working budget get 503 at once
        head = (b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n[" % (4 << 20))
        slow = [socket.create_connection(("127.0.0.1", s.port), timeout=10) for _ in range(45)]
        for so in slow:
            so.sendall(head)
        time.sleep(1.0)
        answers = [_answer(so, 0.05) for so in slow]
        busy = [a for a in answers if a.startswith(b"HTTP/1.1 503") and b"busy" in a]
        assert 0 < len(busy) < len(slow), [a[:40] for a in answers]
        assert b"retry-after: 1" in busy[0].lower()
        assert all(a == b"" for a in answers if a not in busy)  # the others wait for bytes
        for so in slow:
            so.close()
        # a body that stops coming: 408 after request_timeout_s (+ 1 s per 64 KiB)
        t0 = time.monotonic()
        stuck = socket.create_connection(("127.0.0.1", s.port), timeout=10)
        stuck.sendall(head.replace(b"%d" % (4 << 20), b"100"))
        late = _answer(stuck, 10)
        stuck.close()
        assert late.startswith(b"HTTP/1.1 408") and b"did not arrive" in late, late
        assert time.monotonic() - t0 < 6
        assert s.predict([ROW])[0] == 200

        for _ in range(150):
            held.append(socket.create_connection(("127.0.0.1", s.port), timeout=10))
        status, answer = s.predict([ROW])  # the newest connection: answered
        assert status == 200, answer
        time.sleep(0.5)
        closed = [_closed_within(so, 0.05) for so in held]
        # the oldest ones were closed to make room (well before their 3 s head timeout)
        assert sum(closed) >= 100 and all(closed[:90]), sum(closed)
        assert not any(closed[-10:]), "the newest connections should still be open"
    finally:
        for so in held:
            so.close()
        assert s.stop() == 0, s.tail()
    assert "Traceback" not in s.tail(), s.tail()


# -- class 11: a quiet stop --------------------------------------------------------------

def test_sigterm_stops_serve_quietly_no_leaked_native_objects(
        example_bundle: Path, tmp_path: Path) -> None:
    from mqtt_fixtures import free_port

    port = free_port()
    p = subprocess.Popen([sys.executable, "-m", "toma_edge.cli", "serve", str(example_bundle),
                          "--threads", "1", "--http", f"127.0.0.1:{port}"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as so:
                    body = json.dumps({"inputs": [ROW]}).encode()
                    so.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: "
                               b"application/json\r\nContent-Length: %d\r\n\r\n%s"
                               % (len(body), body))
                    assert b"200 OK" in so.recv(4096)
                break
            except OSError:
                assert p.poll() is None and time.monotonic() < deadline, "serve did not start"
                time.sleep(0.2)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    text = err.decode(errors="replace")
    assert p.returncode == 0, text
    assert "leaked" not in text and "Traceback" not in text and "Warning" not in text, text
