"""`toma-edge run` as an input surface: hostile CSV, JSON lines and .npy files, the output
never the input, never a half output file; real files and real processes.

Each class of issue 12 that `run` had (deep/huge JSON, loose JSON types, the output
overwriting the input, CSV rows dropped silently, a .npy header claiming 10**9 rows,
library warnings as noise) has a test through the real CLI here, and Hypothesis
generates hostile inputs for the readers (both CSV parsers), the library `run()` and
the CLI: a run either exits 0 with one output row per input row, equal to predicting
those rows, or exits 2 with one stderr line and no traceback; the input never changes,
and a failed run leaves the output path as it was.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from toma_edge.device.loaders import open_reader
from toma_edge.device.predictor import Predictor
from toma_edge.device.runner import run
from toma_edge.errors import InputError, TomaEdgeError

WIDTH = 10  # the built-in example's input width
F32_MAX = float(np.finfo(np.float32).max)
_SLOW = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
         HealthCheck.data_too_large, HealthCheck.filter_too_much]
# the profile decides, scaled down where an example costs a model load (run(): ~0.1-0.2 s)
# or a process (the CLI: ~0.5-1 s): default 20 and 10, long 1000 and 500
_RUN_EXAMPLES = max(1, settings().max_examples // 2)
_CLI_EXAMPLES = max(1, settings().max_examples // 4)

NO_PANDAS = ("import sys; sys.modules['pandas'] = None; sys.argv[0] = 'toma-edge'; "
             "from toma_edge.cli import main; main()")


def _cli(*args: str, stdin: bytes | None = None, numpy_csv: bool = False,
         timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    """`toma-edge run ARGS` in a real process (``numpy_csv``: as on a device without
    pandas, so CSV goes through numpy.loadtxt)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    head = [sys.executable, "-c", NO_PANDAS] if numpy_csv else [sys.executable, "-m", "toma_edge.cli"]
    return subprocess.run([*head, "run", *args, "--threads", "1"], input=stdin,
                          capture_output=True, env=env, timeout=timeout)


def _one_error_line(p: subprocess.CompletedProcess[bytes]) -> str:
    """Exit 2 and exactly one stderr line, ``error: ...``, no traceback or warning."""
    err = p.stderr.decode("utf-8", "replace")
    assert p.returncode == 2, (p.returncode, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and "Warning" not in err
    return lines[0]


def _no_temp_files(folder: Path) -> None:
    left = [q.name for q in folder.iterdir() if q.name.endswith(".part")]
    assert not left, left


@pytest.fixture(scope="module")
def pred(example_bundle: Path) -> Predictor:
    return Predictor(example_bundle, threads=1, budget="8GiB")


@pytest.fixture(scope="module")
def X() -> np.ndarray:
    return np.random.default_rng(12).random((7, WIDTH), dtype=np.float32) * 4 - 2


def _read_csv_out(path: Path) -> np.ndarray:
    lines = [ln for ln in path.read_text().splitlines() if not ln.startswith("y")]
    return np.array([float(v) for v in lines], dtype=np.float32).reshape(-1, 1)


# -- class 1+2: strict JSON lines ------------------------------------------------------

_GOOD = json.dumps({"inputs": [0.5] * WIDTH})


@pytest.mark.parametrize(("line", "expect"), [
    ('{"inputs": ' + "[" * 1000 + "]" * 1000 + "}", "nests arrays/objects too deeply"),
    ('{"inputs": [' + "9" * 400 + ", 1, 1, 1, 1, 1, 1, 1, 1, 1]}", "invalid JSON"),
    ('{"inputs": [' + str(2**63) + ", 1, 1, 1, 1, 1, 1, 1, 1, 1]}", "outside the 64-bit range"),
    ('{"inputs": ["0.1", 1, 1, 1, 1, 1, 1, 1, 1, 1]}', 'found a string "0.1"'),
    ('{"inputs": [true, 1, 1, 1, 1, 1, 1, 1, 1, 1]}', "found a boolean true"),
    ('{"inputs": [null, 1, 1, 1, 1, 1, 1, 1, 1, 1]}', "found null"),
    ('{"inputs": [1e39, 1, 1, 1, 1, 1, 1, 1, 1, 1]}', "beyond float32's range"),
    ('{"inputs": [NaN, 1, 1, 1, 1, 1, 1, 1, 1, 1]}', "invalid JSON"),
    ('{"inputs": [1, 1, 1, 1, 1, 1, 1, 1, 1, 1], "x": "\\ud800"}', "invalid JSON"),
    ('[1, 1, 1, 1, 1, 1, 1, 1, 1, 1]', 'expected an object {"inputs": [...]}'),
    ('{"inputs": [[1, 2], [3]]}', "ragged"),
], ids=["deep", "400-digits", "2**63", "string", "bool", "null", "1e39", "NaN", "surrogate",
        "array", "ragged"])
def test_jsonl_strict_one_line_exit_2(example_bundle: Path, tmp_path: Path, line: str,
                                      expect: str) -> None:
    """Issue 12 classes 1+2: the old reader (json.loads, np.asarray) gave a RecursionError
    or OverflowError traceback (exit 1) and converted "0.1" and true to numbers (exit 0)."""
    src = tmp_path / "in.jsonl"
    src.write_text(f"{_GOOD}\n{line}\n{_GOOD}\n")
    before = src.read_bytes()
    p = _cli(str(example_bundle), "-i", str(src), "-o", str(tmp_path / "out.jsonl"))
    msg = _one_error_line(p)
    assert "line 2: " in msg and expect in msg, msg
    assert src.read_bytes() == before and not (tmp_path / "out.jsonl").exists()
    _no_temp_files(tmp_path)


def test_jsonl_invalid_utf8_and_skip_bad_counts(example_bundle: Path, pred: Predictor,
                                                 X: np.ndarray, tmp_path: Path) -> None:
    good = [json.dumps({"inputs": r}) for r in X.astype(np.float64).tolist()]
    bad = [b'{"inputs": [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, "\xff"]}',
           b'{"inputs": ["1", 1, 1, 1, 1, 1, 1, 1, 1, 1]}', b'{"inputs": ' + b"[" * 40 + b"]" * 40 + b"}"]
    body = b"\xef\xbb\xbf" + b"\r\n".join([good[0].encode(), bad[0], *[g.encode() for g in good[1:4]],
                                            bad[1], bad[2], *[g.encode() for g in good[4:]]]) + b"\r\n"
    src = tmp_path / "in.jsonl"
    src.write_bytes(body)
    p = _cli(str(example_bundle), "-i", str(src), "-o", str(tmp_path / "o.jsonl"))
    assert "line 2: invalid JSON (str is not valid UTF-8" in _one_error_line(p)
    p = _cli(str(example_bundle), "-i", str(src), "-o", str(tmp_path / "o.jsonl"), "--skip-bad")
    assert p.returncode == 0, p.stderr.decode()
    assert "skipped 3 bad row(s) (line 2: " in p.stderr.decode()
    got = np.array([json.loads(ln)["outputs"] for ln in (tmp_path / "o.jsonl").read_text().splitlines()],
                   dtype=np.float32)
    np.testing.assert_array_equal(got, pred.predict(X).outputs)


# -- class 5: the output is never the input, never half a file ---------------------------


@pytest.mark.parametrize("kind", ["csv", "npy", "jsonl"])
def test_output_that_is_the_input_is_refused(example_bundle: Path, X: np.ndarray,
                                             tmp_path: Path, kind: str) -> None:
    """Issue 12 class 5: the old run truncated the input it was reading (and died of
    SIGBUS on .npy, leaving 0 bytes)."""
    src = tmp_path / f"in.{kind}"
    if kind == "npy":
        np.save(src, X)
    elif kind == "csv":
        src.write_text("\n".join(",".join(map(repr, r)) for r in X.tolist()) + "\n")
    else:
        src.write_text("".join(json.dumps({"inputs": r}) + "\n" for r in X.tolist()))
    before = src.read_bytes()
    (tmp_path / "sub").mkdir()
    os.symlink(src, tmp_path / f"link.{kind}")
    os.link(src, tmp_path / "sub" / f"hard.{kind}")
    for out in (str(src), f"{tmp_path}/sub/../in.{kind}", str(tmp_path / f"link.{kind}"),
                str(tmp_path / "sub" / f"hard.{kind}")):
        msg = _one_error_line(_cli(str(example_bundle), "-i", str(src), "-o", out))
        assert "the output is the input file" in msg
        assert src.read_bytes() == before
    # stdin redirected from the very file the output names
    with open(src, "rb") as f:
        p = subprocess.run([sys.executable, "-m", "toma_edge.cli", "run", str(example_bundle),
                            "-i", "-", "--format", kind, "-o", str(tmp_path / "sub" / f"hard.{kind}")],
                           stdin=f, capture_output=True, timeout=120)
    assert "the output is the input file" in _one_error_line(p)
    assert src.read_bytes() == before
    _no_temp_files(tmp_path)


@pytest.mark.parametrize("kind", ["csv", "npy", "jsonl"])
def test_failed_run_keeps_the_old_output(example_bundle: Path, X: np.ndarray, tmp_path: Path,
                                         kind: str) -> None:
    """A bad row late in the input: the old run left a half file where the good one was."""
    bad = X.copy()
    bad[5, 3] = np.nan
    src = tmp_path / ("in.npy" if kind == "npy" else "in.csv")
    if kind == "npy":
        np.save(src, bad)
    else:
        src.write_text("\n".join(",".join(map(repr, r)) for r in bad.tolist()) + "\n")
    out = tmp_path / f"out.{kind}"
    out.write_bytes(b"the good output of yesterday\n")
    os.chmod(out, 0o640)
    _one_error_line(_cli(str(example_bundle), "-i", str(src), "-o", str(out)))
    assert out.read_bytes() == b"the good output of yesterday\n"
    _no_temp_files(tmp_path)
    # a good run replaces it whole, keeping its permissions
    ok = tmp_path / ("ok.npy" if kind == "npy" else "ok.csv")
    if kind == "npy":
        np.save(ok, X)
    else:
        ok.write_text("\n".join(",".join(map(repr, r)) for r in X.tolist()) + "\n")
    p = _cli(str(example_bundle), "-i", str(ok), "-o", str(out))
    assert p.returncode == 0, p.stderr.decode()
    assert out.stat().st_mode & 0o777 == 0o640 and b"yesterday" not in out.read_bytes()
    _no_temp_files(tmp_path)


@pytest.mark.parametrize(("sig", "code", "word"), [(signal.SIGINT, 130, "interrupted"),
                                                   (signal.SIGTERM, 143, "terminated")])
def test_interrupted_run_leaves_no_half_file(example_bundle: Path, tmp_path: Path,
                                             sig: int, code: int, word: str) -> None:
    out = tmp_path / "out.csv"
    out.write_text("old\n")
    p = subprocess.Popen([sys.executable, "-m", "toma_edge.cli", "run", str(example_bundle),
                          "-i", "-", "-o", str(out), "--threads", "1"], stdin=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.stdin is not None
    row = (",".join(["0.25"] * WIDTH) + "\n").encode()
    p.stdin.write(row * 200_000)  # several blocks: the writer is open, rows are written
    p.stdin.flush()
    deadline = time.monotonic() + 60
    while not [q for q in tmp_path.iterdir() if q.name.endswith(".part")]:
        assert time.monotonic() < deadline and p.poll() is None
        time.sleep(0.05)
    p.send_signal(sig)  # stdin stays open: the run is mid-way
    _, err = p.communicate(timeout=60)
    assert p.returncode == code, err
    assert err.decode().strip().splitlines() == [word]
    assert out.read_text() == "old\n"
    _no_temp_files(tmp_path)


# -- class 6: CSV edge cases, both parsers ----------------------------------------------


def _rows_text(X: np.ndarray, sep: str = ",", quote: bool = False, end: str = "\n",
               trailing: bool = False) -> str:
    q = '"' if quote else ""
    return "".join(sep.join(f"{q}{v!r}{q}" for v in r) + (sep if trailing else "") + end
                   for r in X.astype(np.float64).tolist())


@pytest.mark.parametrize("numpy_csv", [False, True], ids=["pandas", "numpy"])
@pytest.mark.parametrize(("name", "make"), [
    ("bom-no-header", lambda X: b"\xef\xbb\xbf" + _rows_text(X).encode()),
    ("bom-header", lambda X: ("\ufeff" + ",".join(f"x{i}" for i in range(WIDTH)) + "\n"
                              + _rows_text(X)).encode()),
    ("quoted", lambda X: _rows_text(X, quote=True).encode()),
    ("quoted-header", lambda X: (",".join(f'"x{i}"' for i in range(WIDTH)) + "\n"
                                 + _rows_text(X, quote=True)).encode()),
    ("cr-only", lambda X: _rows_text(X, end="\r").encode()),
    ("crlf", lambda X: _rows_text(X, end="\r\n").encode()),
    ("trailing-comma", lambda X: _rows_text(X, trailing=True).encode()),
    ("semicolon", lambda X: _rows_text(X, sep=";").encode()),
    ("tab", lambda X: ("\t".join(f"x{i}" for i in range(WIDTH)) + "\n" + _rows_text(X, sep="\t")).encode()),
    ("no-final-newline", lambda X: _rows_text(X).rstrip("\n").encode()),
])
def test_csv_edge_cases_read_every_row(example_bundle: Path, pred: Predictor, X: np.ndarray,
                                       tmp_path: Path, name: str, make: Any,
                                       numpy_csv: bool) -> None:
    """Issue 12 class 6: a BOM or quotes made row 1 a "header" (dropped, exit 0), CR-only
    gave 0 rows, a trailing comma or ';' failed on line 2."""
    src = tmp_path / "in.csv"
    src.write_bytes(make(X))
    out = tmp_path / "out.csv"
    p = _cli(str(example_bundle), "-i", str(src), "-o", str(out), numpy_csv=numpy_csv)
    assert p.returncode == 0, p.stderr.decode()
    assert f"rows {len(X)} in" in p.stderr.decode()
    np.testing.assert_array_equal(_read_csv_out(out), pred.predict(X).outputs)
    assert out.read_text().startswith("y0\n") == (name in ("bom-header", "quoted-header", "tab"))


@pytest.mark.parametrize("numpy_csv", [False, True], ids=["pandas", "numpy"])
def test_csv_first_row_with_a_typo_is_not_a_header(example_bundle: Path, X: np.ndarray,
                                                   tmp_path: Path, numpy_csv: bool) -> None:
    src = tmp_path / "in.csv"
    src.write_text("1,2,x,4,5,6,7,8,9,10\n" + _rows_text(X))
    msg = _one_error_line(_cli(str(example_bundle), "-i", str(src), "-o", str(tmp_path / "o.csv"),
                               numpy_csv=numpy_csv))
    assert "line 1: value 'x' in column 3 is not a number" in msg
    p = _cli(str(example_bundle), "-i", str(src), "-o", str(tmp_path / "o.csv"), "--skip-bad",
             numpy_csv=numpy_csv)
    assert p.returncode == 0 and "skipped 1 bad row(s) (line 1: " in p.stderr.decode()
    assert len(_read_csv_out(tmp_path / "o.csv")) == len(X)


@pytest.mark.parametrize("numpy_csv", [False, True], ids=["pandas", "numpy"])
def test_1e39_is_one_line_without_a_warning(example_bundle: Path, X: np.ndarray, tmp_path: Path,
                                            numpy_csv: bool) -> None:
    """Issue 12 class 11: pandas printed a 2-line RuntimeWarning (overflow in cast)."""
    src = tmp_path / "in.csv"
    src.write_text(_rows_text(X) + "1e39" + ",1" * (WIDTH - 1) + "\n")
    msg = _one_error_line(_cli(str(example_bundle), "-i", str(src), "-o", str(tmp_path / "o.csv"),
                               numpy_csv=numpy_csv))
    assert f"line {len(X) + 1}: value '1e39' in column 1 is beyond float32's range" in msg
    np.save(tmp_path / "in.npy", np.full((3, WIDTH), 1e39))
    msg = _one_error_line(_cli(str(example_bundle), "-i", str(tmp_path / "in.npy"), "-o",
                               str(tmp_path / "o.npy")))
    assert "row 0: holds a value that is not finite" in msg


_PEAK = """
import resource, subprocess, sys, time
t = time.perf_counter()
p = subprocess.run(sys.argv[1:], capture_output=True)
dt = time.perf_counter() - t
kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
sys.stdout.write(f"{p.returncode} {dt:.2f} {kb}\\n" + p.stderr.decode())
"""


@pytest.mark.parametrize("numpy_csv", [False, True], ids=["pandas", "numpy"])
def test_a_line_of_500000_fields_is_refused_fast(example_bundle: Path, X: np.ndarray,
                                                 tmp_path: Path, numpy_csv: bool) -> None:
    """Issue 12 class 6: one line of 500,000 fields took 27 s and 772 MB."""
    src = tmp_path / "wide.csv"
    src.write_text(_rows_text(X[:2]) + ",".join(["1"] * 500_000) + "\n" + _rows_text(X[2:]))
    head = [sys.executable, "-c", NO_PANDAS] if numpy_csv else [sys.executable, "-m", "toma_edge.cli"]
    r = subprocess.run([sys.executable, "-c", _PEAK, *head, "run", str(example_bundle), "-i",
                        str(src), "-o", str(tmp_path / "o.csv"), "--threads", "1"],
                       capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    first, *err = r.stdout.splitlines()
    rc, seconds, kb = first.split()
    assert rc == "2" and len(err) == 1, r.stdout
    assert "line 3: the line is longer than 4,736 bytes" in err[0]
    assert float(seconds) < 10 and int(kb) < 400 * 1024, first  # start-up included
    p = _cli(str(example_bundle), "-i", str(src), "-o", str(tmp_path / "o.csv"), "--skip-bad",
             numpy_csv=numpy_csv)
    assert p.returncode == 0 and "skipped 1 bad row(s) (line 3: the line is longer" in p.stderr.decode()
    assert len(_read_csv_out(tmp_path / "o.csv")) == len(X)


# -- class 8: .npy headers checked before mapping -------------------------------------


def _npy_with_header(path: Path, header: dict[str, Any], data: bytes) -> None:
    import io

    b = io.BytesIO()
    np.lib.format.write_array_header_1_0(b, header)
    path.write_bytes(b.getvalue() + data)


@pytest.mark.parametrize(("name", "expect"), [
    ("huge", "declares shape (1000000000, 10) of float64 (74.5 GiB) but the file holds 240 B"),
    ("truncated", "but the file holds 236 B of data"),
    ("pickle", "holds Python objects (a pickle)"),
    ("strings", "dtype <U1 is not numeric"),
    ("complex", "dtype complex64 is not numeric"),
    ("bool", "dtype bool is not numeric"),
    ("structured", "is not numeric"),
    ("scalar", "array of shape (), expected (rows, 10)"),
    ("width", "array of shape (3, 9), expected (rows, 10)"),
    ("garbage", "not a readable .npy file"),
])
def test_npy_header_refused_before_mapping(example_bundle: Path, tmp_path: Path, name: str,
                                           expect: str) -> None:
    src = tmp_path / "in.npy"
    ones = np.ones((3, WIDTH))
    if name == "huge":
        _npy_with_header(src, {"descr": "<f8", "fortran_order": False, "shape": (10**9, WIDTH)},
                         ones.tobytes())
    elif name == "truncated":
        np.save(src, ones)
        src.write_bytes(src.read_bytes()[:-4])
    elif name == "pickle":
        np.save(src, np.array([[{}] * WIDTH], dtype=object), allow_pickle=True)
    elif name == "strings":
        np.save(src, np.array([["a"] * WIDTH]))
    elif name == "complex":
        np.save(src, np.ones((3, WIDTH), np.complex64))
    elif name == "bool":
        np.save(src, np.ones((3, WIDTH), bool))
    elif name == "structured":
        np.save(src, np.zeros(3, dtype=[("a", "<f4", (WIDTH,))]))
    elif name == "scalar":
        np.save(src, np.float64(3))
    elif name == "width":
        np.save(src, np.ones((3, WIDTH - 1)))
    else:
        src.write_bytes(b"\x93NUMPY\x01\x00\xff\xff{'descr': " + b"x" * 100)
    before = src.read_bytes()
    for args in (["-i", str(src), "-o", str(tmp_path / "o.npy")],):
        assert expect in _one_error_line(_cli(str(example_bundle), *args))
    if name not in ("huge", "truncated"):  # the same header on stdin (it was a traceback)
        assert _one_error_line(_cli(str(example_bundle), "-i", "-", "--format", "npy", "-o",
                                    str(tmp_path / "o.npy"), stdin=before))
    assert src.read_bytes() == before and not (tmp_path / "o.npy").exists()


def test_npy_on_stdin(example_bundle: Path, pred: Predictor, X: np.ndarray, tmp_path: Path) -> None:
    """A .npy on stdin: the old reader called a numpy function that numpy 2 no longer has."""
    import io

    b = io.BytesIO()
    np.save(b, X.astype(np.float64))
    p = _cli(str(example_bundle), "-i", "-", "--format", "npy", "-o", "-", stdin=b.getvalue())
    assert p.returncode == 0, p.stderr.decode()
    np.testing.assert_array_equal(np.load(io.BytesIO(p.stdout)), pred.predict(X).outputs)
    p = _cli(str(example_bundle), "-i", "-", "--format", "npy", "-o", "-",
             stdin=b.getvalue()[:-8])  # truncated: stdout gets no half .npy
    assert "the .npy stream ends after row 6" in _one_error_line(p) and p.stdout == b""


# -- property-based: generated hostile inputs ------------------------------------------

_GOOD_NUM = st.one_of(
    st.integers(-1000, 1000).map(str),
    st.floats(-1e6, 1e6, allow_nan=False).map(repr),
    st.floats(-100, 100, allow_nan=False).map(lambda v: f"{v:.6g}"),
    st.floats(-100, 100, allow_nan=False).map(lambda v: f"{v:.3e}"),
    st.sampled_from(["0", "-0", "+1", ".5", "5.", "1e-3", "-2.5E+2", "1e-50", "3.4e38"]),
)
_BAD_TOKEN = st.sampled_from(["x", "", " ", "1_0", "0x1", "1d5", "--1", "1..2", "1e", "nan",
                              "-inf", "Infinity", "1e39", "-1e39", "\u0661", "1\x002", "#",
                              "'1'", "\xff", "NA", "true"])
_SEP = st.sampled_from([",", ";", "\t"])
_END = st.sampled_from(["\n", "\r\n", "\r"])


def _is_num(tok: str) -> bool:
    t = tok.strip()
    return bool(re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", t, re.ASCII)
                or re.fullmatch(r"[+-]?(nan|inf|infinity)", t, re.IGNORECASE))


def _unq(f: str) -> str:
    f = f.strip()
    return f[1:-1].strip() if len(f) >= 2 and f[0] == f[-1] == '"' else f


def _fields(text: str, sep: str) -> list[str]:
    fields = text.split(sep)
    if len(fields) > 1 and not fields[-1].strip():
        fields.pop()  # an empty last field is a trailing separator
    return fields


def _spec(lines: list[str]) -> tuple[list[tuple[int, list[float] | None]], bool, str]:
    """The documented CSV rules, applied to the lines as written: (line number, values
    or None for a bad row) per row, whether line 1 is a header, the separator."""
    nonblank = [(i + 1, ln) for i, ln in enumerate(lines) if ln.strip()]
    if not nonblank:
        return [], False, ","
    first = nonblank[0][1].strip()
    counts = {s: len(_fields(first, s)) for s in (",", ";", "\t")}
    sep = next((s for s in counts if counts[s] == WIDTH), None)
    if sep is None:
        best = max(counts, key=lambda s: counts[s])
        sep = best if counts[best] > 1 else ","
    ff = [_unq(f) for f in _fields(first, sep)]
    header = any(ff) and not any(_is_num(f) for f in ff)
    rows: list[tuple[int, list[float] | None]] = []
    for n, ln in nonblank[1:] if header else nonblank:
        text = ln.strip(" \r\n\x0b\x0c") if sep == "\t" else ln.strip()
        fields = [_unq(f) for f in _fields(text, sep)]
        ok = len(fields) == WIDTH and all(
            _is_num(f) and not re.fullmatch(r"[+-]?(nan|inf|infinity)", f, re.I)
            and abs(float(f)) < 3.4028235677973366e38 for f in fields)
        rows.append((n, [float(f) for f in fields] if ok else None))
    return rows, header, sep


@st.composite
def csv_files(draw: st.DrawFn) -> tuple[bytes, list[list[float] | None], bool, list[int]]:
    """A CSV file; per row its values (None for a row that must be refused); whether it
    starts with a header; the rows' line numbers."""
    sep, end = draw(_SEP), draw(_END)
    quote = draw(st.sampled_from(["none", "all", "some"]))
    lines: list[str] = []
    made: list[tuple[int, list[str]]] = []
    if draw(st.booleans()):
        lines.append(sep.join((f'"x{i}"' if quote != "none" else f"x{i}") for i in range(WIDTH)))
    for _ in range(draw(st.integers(0, 12))):
        width = draw(st.sampled_from([WIDTH] * 6 + [WIDTH - 1, WIDTH + 1, 1]))
        toks = [draw(_GOOD_NUM) for _ in range(width)]
        if draw(st.integers(0, 5)) == 0:
            toks[draw(st.integers(0, width - 1))] = draw(_BAD_TOKEN)
        shown = [f'"{t}"' if quote == "all" or (quote == "some" and draw(st.booleans())) else t
                 for t in toks]
        lines.append(sep.join(shown) + (sep if draw(st.integers(0, 4)) == 0 else ""))
        made.append((len(lines), toks))
        if draw(st.integers(0, 8)) == 0:
            lines.append(draw(st.sampled_from(["", "  "])))  # blank lines are not rows
    body = end.join(lines) + (end if draw(st.booleans()) else "")
    data = (b"\xef\xbb\xbf" if draw(st.booleans()) else b"") + body.encode()
    rows, header, found = _spec(lines)
    if found == sep:  # the rules read what was generated as generated
        gen = {n: toks for n, toks in made}
        for n, vals in rows:
            if vals is not None and n in gen:
                assert vals == [float(t.strip().strip('"')) for t in _fields(sep.join(gen[n]), sep)]
    return data, [v for _, v in rows], header, [n for n, _ in rows]


def _read_all(path: str, engine: str, skip_bad: bool) -> tuple[np.ndarray, Any]:
    r = open_reader(path, row_shape=(WIDTH,), block_bytes=64, skip_bad=skip_bad,
                    csv_engine=engine)
    try:
        chunks = [c.rows for c in r]
    finally:
        r.close()
    rows = np.concatenate(chunks) if chunks else np.empty((0, WIDTH), np.float32)
    return rows, r


@settings(suppress_health_check=_SLOW)
@given(f=csv_files(), engine=st.sampled_from(["pandas", "numpy"]), skip_bad=st.booleans(),
       block=st.sampled_from([64, 300, 1 << 16]))
# found in CI: pandas' C parser reads true/false as 1/0 whatever its options say
@example(f=(b"true,0,0,0,0,0,0,0,0,0,", [None], False, [1]), engine="pandas",
         skip_bad=False, block=64)
@example(f=(b"0,0,0,0,0,0,0,0,0,0\nFALSE,0,0,0,0,0,0,0,0,0\n", [[0.0] * 10, None], False,
            [1, 2]), engine="pandas", skip_bad=True, block=1 << 16)
def test_csv_reader_property(tmp_path: Path, f: tuple[bytes, list[Any], bool, list[int]], engine: str,
                             skip_bad: bool, block: int) -> None:
    """Both parsers, any block size: every valid row read exactly, in order, with the
    right header; the first bad row stops the reader naming its line (or, with
    skip_bad, exactly the bad rows are skipped and counted)."""
    data, expect, header, lines = f
    path = tmp_path / "gen.csv"
    path.write_bytes(data)
    good = np.array([e for e in expect if e is not None], dtype=np.float32).reshape(-1, WIDTH)
    bad = [n for n, e in zip(lines, expect, strict=False) if e is None]
    r = open_reader(str(path), row_shape=(WIDTH,), block_bytes=block, skip_bad=skip_bad,
                    csv_engine=engine)
    got: list[np.ndarray] = []
    try:
        for c in r:
            got.append(c.rows)
    except InputError as e:
        assert bad and not skip_bad, (str(e), expect)
        assert f": line {bad[0]}: " in str(e) and len(str(e).splitlines()) == 1, (str(e), bad)
        first_bad = expect.index(None)
        rows = np.concatenate(got) if got else np.empty((0, WIDTH), np.float32)
        np.testing.assert_array_equal(rows, good[:first_bad])
        return
    finally:
        r.close()
    assert not bad or skip_bad, (expect, data)
    rows = np.concatenate(got) if got else np.empty((0, WIDTH), np.float32)
    np.testing.assert_array_equal(rows, good)
    assert r.skipped == len(bad) and [b.line for b in r.bad_rows] == bad[:10]
    assert r.had_header == header
    assert path.read_bytes() == data


@st.composite
def jsonl_files(draw: st.DrawFn) -> tuple[bytes, list[list[float] | None]]:
    lines: list[bytes] = []
    expect: list[list[float] | None] = []
    for _ in range(draw(st.integers(0, 8))):
        vals = [draw(st.floats(-1e9, 1e9, allow_nan=False, width=32).map(float)) for _ in range(WIDTH)]
        kind = draw(st.sampled_from(["good"] * 6 + ["string", "bool", "null", "deep", "bigint",
                                                     "f32over", "width", "notobj", "utf8",
                                                     "nokey", "nested", "trunc", "nan"]))
        row: Any = list(vals)
        raw = None
        if kind == "string":
            row[draw(st.integers(0, WIDTH - 1))] = repr(vals[0])
        elif kind == "bool":
            row[draw(st.integers(0, WIDTH - 1))] = draw(st.booleans())
        elif kind == "null":
            row[0] = None
        elif kind == "deep":
            raw = b'{"inputs": ' + b"[" * draw(st.integers(6, 2000)) + b"]" * 2000 + b"}"
        elif kind == "bigint":
            digits = draw(st.integers(19, 400))
            raw = b'{"inputs": [' + b"9" * digits + b", 1, 1, 1, 1, 1, 1, 1, 1, 1]}"
            if 20 <= digits <= 38:  # beyond 64 bits, JSON parses it as a double: in float32's range
                vals, kind = [float("9" * digits)] + [1.0] * (WIDTH - 1), "good"
            # 19 nines: an integer outside int64 (refused); 39 or more: beyond float32
        elif kind == "f32over":
            row[0] = 1e39
        elif kind == "width":
            row = row[: draw(st.integers(0, WIDTH - 1))]
        elif kind == "utf8":
            raw = b'{"inputs": [1, 1, 1, 1, 1, 1, 1, 1, 1, 1], "n": "\xc3\x28"}'
        elif kind == "nan":
            raw = b'{"inputs": [NaN, 1, 1, 1, 1, 1, 1, 1, 1, 1]}'
        elif kind == "trunc":
            raw = json.dumps({"inputs": row}).encode()[:-2]
        obj: Any = {"inputs": row}
        if kind == "notobj":
            obj = row
        elif kind == "nokey":
            obj = {"input": row}
        elif kind == "nested":
            obj = {"inputs": [row[:5], row[5:]]}
        lines.append(raw if raw is not None else json.dumps(obj).encode())
        expect.append(vals if kind in ("good", "nested") else None)
    end: bytes = draw(st.sampled_from([b"\n", b"\r\n"]))
    bom = b"\xef\xbb\xbf" if draw(st.booleans()) else b""
    final = end if bool(lines) and draw(st.booleans()) else b""
    data = bom + end.join(lines) + final
    return data, expect


@st.composite
def npy_files(draw: st.DrawFn) -> tuple[bytes, np.ndarray | None]:
    import io

    n = draw(st.integers(0, 20))
    dtype = draw(st.sampled_from(["<f4", "<f8", ">f4", "<f2", "<i4", "|u1", "<i8", "<c8", "|b1",
                                  "<U2", "O"]))
    shape = draw(st.sampled_from([(n, WIDTH)] * 5 + [(n, WIDTH - 1), (n, 2, 5), (n,), ()]))
    with np.errstate(all="ignore"):
        a = np.asarray(np.random.default_rng(draw(st.integers(0, 99))).random(shape) * 200 - 100)
        if dtype == "O":
            a = a.astype(object)
        else:
            a = a.astype(np.dtype(dtype))
    special = draw(st.sampled_from([None] * 4 + ["nan", "inf", "big"]))
    if special and a.size and np.dtype(dtype).kind == "f":
        a.reshape(-1)[draw(st.integers(0, a.size - 1))] = {"nan": np.nan, "inf": np.inf,
                                                           "big": 1e39}[special]
    b = io.BytesIO()
    np.save(b, a, allow_pickle=True)
    data = b.getvalue()
    cut = draw(st.sampled_from([0] * 5 + [1, 7, 100]))
    if cut:
        data = data[: max(0, len(data) - cut)]
    ok = (shape == (n, WIDTH) and np.dtype(dtype).kind in "fiu" and not cut)
    with np.errstate(all="ignore"):
        ok = ok and bool(np.isfinite(a.astype(np.float32)).all())
    return data, (a.astype(np.float32) if ok else None)


def _check_run(example_bundle: Path, pred: Predictor, tmp_path: Path, data: bytes, ext: str,
               good: np.ndarray | None, out_ext: str) -> None:
    """run() in-process: the right outputs, or one InputError line; the input unchanged,
    an earlier output kept whole on failure, no temporary file."""
    for old in tmp_path.iterdir():
        old.unlink()
    src = tmp_path / f"in.{ext}"
    src.write_bytes(data)
    out = tmp_path / f"out.{out_ext}"
    out.write_bytes(b"earlier\n")
    try:
        s = run(example_bundle, str(src), str(out), threads=1, budget="1GiB", exact_peaks=False)
    except TomaEdgeError as e:
        assert isinstance(e, InputError) and len(str(e).splitlines()) == 1, repr(e)
        assert good is None, (str(e), data[:200])
        assert out.read_bytes() == b"earlier\n"
    else:
        assert good is not None, data[:300]
        assert s.rows == len(good)
        if out_ext == "npy":
            got = np.load(out)
        elif out_ext == "jsonl":
            got = np.array([json.loads(ln)["outputs"] for ln in out.read_text().splitlines()],
                           dtype=np.float32).reshape(-1, 1)
        else:
            got = _read_csv_out(out)
        np.testing.assert_array_equal(got, pred.predict(good).outputs)
    assert src.read_bytes() == data
    _no_temp_files(tmp_path)


@settings(max_examples=_RUN_EXAMPLES, suppress_health_check=_SLOW)
@given(f=csv_files(), out_ext=st.sampled_from(["csv", "npy", "jsonl"]))
def test_run_csv_property(example_bundle: Path, pred: Predictor, tmp_path: Path,
                          f: tuple[bytes, list[Any], bool, list[int]], out_ext: str) -> None:
    data, expect, _, _ = f
    good = None if None in expect else np.array(expect, np.float32).reshape(-1, WIDTH)
    _check_run(example_bundle, pred, tmp_path, data, "csv", good, out_ext)


@settings(max_examples=_RUN_EXAMPLES, suppress_health_check=_SLOW)
@given(f=jsonl_files(), out_ext=st.sampled_from(["csv", "npy", "jsonl"]))
def test_run_jsonl_property(example_bundle: Path, pred: Predictor, tmp_path: Path,
                            f: tuple[bytes, list[Any]], out_ext: str) -> None:
    data, expect = f
    good = None if None in expect else np.array(expect, np.float32).reshape(-1, WIDTH)
    _check_run(example_bundle, pred, tmp_path, data, "jsonl", good, out_ext)


@settings(max_examples=_RUN_EXAMPLES, suppress_health_check=_SLOW)
@given(f=npy_files(), out_ext=st.sampled_from(["csv", "npy"]))
def test_run_npy_property(example_bundle: Path, pred: Predictor, tmp_path: Path,
                          f: tuple[bytes, np.ndarray | None], out_ext: str) -> None:
    data, good = f
    _check_run(example_bundle, pred, tmp_path, data, "npy", good, out_ext)


@settings(max_examples=_CLI_EXAMPLES, suppress_health_check=_SLOW)
@given(data=st.data())
def test_cli_property(example_bundle: Path, pred: Predictor, tmp_path: Path,
                      data: st.DataObject) -> None:
    """The real `toma-edge run`: exit 0 with the right outputs, or exit 2 with exactly
    one stderr line; the input's bytes never change; a failed run keeps the old output."""
    kind = data.draw(st.sampled_from(["csv", "jsonl", "npy"]))
    good: np.ndarray | None
    if kind == "csv":
        body, expect, _, _ = data.draw(csv_files())
        good = None if None in expect else np.array(expect, np.float32).reshape(-1, WIDTH)
    elif kind == "jsonl":
        body, expect = data.draw(jsonl_files())
        good = None if None in expect else np.array(expect, np.float32).reshape(-1, WIDTH)
    else:
        body, good = data.draw(npy_files())
    numpy_csv = data.draw(st.booleans())
    for old in tmp_path.iterdir():
        old.unlink()
    src = tmp_path / f"in.{kind}"
    src.write_bytes(body)
    out = tmp_path / "out.csv"
    out.write_bytes(b"earlier\n")
    p = _cli(str(example_bundle), "-i", str(src), "-o", str(out), numpy_csv=numpy_csv)
    if good is None:
        _one_error_line(p)
        assert out.read_bytes() == b"earlier\n"
    else:
        assert p.returncode == 0, p.stderr.decode()
        assert "Traceback" not in p.stderr.decode() and "Warning" not in p.stderr.decode()
        np.testing.assert_array_equal(_read_csv_out(out), pred.predict(good).outputs)
    assert src.read_bytes() == body
    _no_temp_files(tmp_path)
