"""`toma-edge run` and the streaming loaders: real files, real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from toma_edge.device.loaders import NpyReader, open_reader, prefetch
from toma_edge.device.predictor import Predictor
from toma_edge.device.runner import run
from toma_edge.device.writers import open_writer
from toma_edge.errors import InputError


def _csv(path: Path, X: np.ndarray, *, header: bool = True, bad: dict[int, str] | None = None) -> None:
    lines = [",".join(f"x{i}" for i in range(X.shape[1]))] if header else []
    for i, r in enumerate(X):
        lines.append((bad or {}).get(i, ",".join(f"{v:.9g}" for v in r)))
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def pred(example_bundle: Path) -> Predictor:
    return Predictor(example_bundle, threads=1, budget="8GiB")


@pytest.fixture(scope="module")
def X() -> np.ndarray:
    return np.random.default_rng(3).random((3000, 10), dtype=np.float32)


def _cli(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "toma_edge.cli", "run", *args], input=stdin,
                          capture_output=True, env=env, timeout=120)


def test_cli_csv_equals_predictor(example_bundle: Path, pred: Predictor, X: np.ndarray, tmp_path: Path) -> None:
    _csv(tmp_path / "in.csv", X)
    p = _cli(str(example_bundle), "--input", str(tmp_path / "in.csv"), "--output",
             str(tmp_path / "out.csv"), "--threads", "1", "--budget", "1GiB")
    assert p.returncode == 0, p.stderr.decode()
    err = p.stderr.decode()
    assert "rows 3,000" in err and "of the 1.0 GiB budget" in err
    lines = (tmp_path / "out.csv").read_text().splitlines()
    assert lines[0] == "y0" and len(lines) == 3001
    got = np.array([float(v) for v in lines[1:]], dtype=np.float32)
    np.testing.assert_array_equal(got, pred.predict(X).outputs[:, 0])


def test_cli_bad_row_stops_with_line_number(example_bundle: Path, X: np.ndarray, tmp_path: Path) -> None:
    _csv(tmp_path / "in.csv", X, bad={1234: "1,2,3"})
    out = tmp_path / "out.csv"
    p = _cli(str(example_bundle), "--input", str(tmp_path / "in.csv"), "--output", str(out),
             "--threads", "1")
    assert p.returncode == 2
    err = p.stderr.decode().strip()
    assert err.splitlines() == [f"error: {tmp_path / 'in.csv'}: line 1236: has 3 values, "
                                "expected 10; fix it or pass --skip-bad"]
    # a failed run leaves no output (and no temporary file) behind ...
    assert sorted(q.name for q in tmp_path.iterdir()) == ["in.csv"]
    # ... and an output from an earlier run stays as it was
    out.write_text("earlier\n")
    p = _cli(str(example_bundle), "--input", str(tmp_path / "in.csv"), "--output", str(out),
             "--threads", "1")
    assert p.returncode == 2 and out.read_text() == "earlier\n"
    assert sorted(q.name for q in tmp_path.iterdir()) == ["in.csv", "out.csv"]


def test_skip_bad_counts(example_bundle: Path, pred: Predictor, X: np.ndarray, tmp_path: Path) -> None:
    bad = {5: "1,2,x,4,5,6,7,8,9,10", 6: "", 700: ",".join(["nan"] * 10), 2999: "1,2"}
    _csv(tmp_path / "in.csv", X, header=False, bad=bad)
    s = run(example_bundle, str(tmp_path / "in.csv"), str(tmp_path / "out.csv"), threads=1, budget="8GiB",
            skip_bad=True)
    assert s.skipped == 3 and s.rows == 2996  # the empty line is not a row
    assert [b.line for b in s.bad_rows] == [6, 701, 3000]
    assert "value 'x' in column 3 is not a number" in s.bad_rows[0].reason
    lines = (tmp_path / "out.csv").read_text().splitlines()
    assert len(lines) == 2996 and not lines[0].startswith("y")  # no header in, none out
    keep = np.ones(len(X), bool)
    keep[[5, 6, 700, 2999]] = False
    np.testing.assert_array_equal(np.array(lines, dtype=np.float32), pred.predict(X[keep]).outputs[:, 0])
    assert any("skipped 3 bad row(s)" in line for line in s.lines())


def test_npy_round_trip(example_bundle: Path, pred: Predictor, X: np.ndarray, tmp_path: Path) -> None:
    np.save(tmp_path / "in.npy", X.astype(np.float64))
    s = run(example_bundle, str(tmp_path / "in.npy"), str(tmp_path / "out.npy"), threads=1, budget="8GiB")
    got = np.load(tmp_path / "out.npy")
    assert got.dtype == np.float32 and got.shape == (3000, 1) and s.rows == 3000
    np.testing.assert_array_equal(got, pred.predict(X).outputs)
    bad = X.copy()
    bad[2000, 4] = np.inf
    np.save(tmp_path / "bad.npy", bad)
    with pytest.raises(InputError, match="row 2000: holds a value that is not finite"):
        run(example_bundle, str(tmp_path / "bad.npy"), str(tmp_path / "out2.npy"), threads=1, budget="8GiB")
    assert not (tmp_path / "out2.npy").exists()  # no half file where none was
    assert not [q for q in tmp_path.iterdir() if q.name.startswith(".")]  # nor a temporary one


def test_jsonl_stdin_stdout(example_bundle: Path, pred: Predictor, X: np.ndarray) -> None:
    body = "".join(json.dumps({"inputs": r}) + "\n" for r in X[:50].astype(np.float64).tolist())
    p = _cli(str(example_bundle), "--input", "-", "--output", "-", "--format", "jsonl",
             "--threads", "1", stdin=body.encode())
    assert p.returncode == 0, p.stderr.decode()
    outs = [json.loads(line) for line in p.stdout.decode().splitlines()]
    got = np.array([o["outputs"] for o in outs], dtype=np.float32)
    np.testing.assert_array_equal(got, pred.predict(X[:50]).outputs)
    p = _cli(str(example_bundle), "--input", "-", "--output", "-", "--format", "jsonl",
             stdin=b'{"inputs": [1, 2]}\n')
    assert p.returncode == 2 and b'line 1: "inputs" has 2 values, expected 10' in p.stderr


def test_classification_csv_has_class_column(digits_bundle: Path, tmp_path: Path) -> None:
    p = Predictor(digits_bundle, threads=1, budget="8GiB")
    X = np.random.default_rng(4).random((40, p.input_spec.width), dtype=np.float32) * 16
    _csv(tmp_path / "in.csv", X)
    run(digits_bundle, str(tmp_path / "in.csv"), str(tmp_path / "out.csv"), threads=1, budget="8GiB")
    lines = (tmp_path / "out.csv").read_text().splitlines()
    assert lines[0] == ",".join(f"y{i}" for i in range(10)) + ",class"
    want = p.predict(X)
    assert [line.rsplit(",", 1)[1] for line in lines[1:]] == want.classes
    run(digits_bundle, str(tmp_path / "in.csv"), str(tmp_path / "out.jsonl"), threads=1, budget="8GiB")
    first = json.loads((tmp_path / "out.jsonl").read_text().splitlines()[0])
    assert first["class"] == want.classes[0] if want.classes else False


def test_prefetch_is_bounded_and_ordered() -> None:
    made: list[int] = []

    def source():  # type: ignore[no-untyped-def]
        for i in range(100):
            made.append(i)
            yield i
        raise InputError("line 101: boom")

    it = prefetch(source(), depth=3)
    assert next(it) == 0
    import time

    time.sleep(0.2)
    assert len(made) <= 1 + 3 + 1  # the one taken, the queue, the one waiting to be put
    got = [0]
    with pytest.raises(InputError, match="line 101"):
        for v in it:
            got.append(v)
    assert got == list(range(100))


def test_csv_reader_blocks_and_header(tmp_path: Path, X: np.ndarray) -> None:
    _csv(tmp_path / "in.csv", X)
    r = open_reader(str(tmp_path / "in.csv"), row_shape=(10,), block_bytes=64 << 10)
    chunks = list(r)
    assert r.had_header and len(chunks) > 3 and max(len(c.rows) for c in chunks) < 1000
    np.testing.assert_array_equal(np.concatenate([c.rows for c in chunks]), X)
    with open_writer(str(tmp_path / "o.npy"), n_outputs=2) as w:
        for c in chunks:
            w.write(c.rows[:, :2])
    np.testing.assert_array_equal(np.load(tmp_path / "o.npy"), X[:, :2])


def test_predict_into_given_out_and_zero_copy_npy(example_bundle: Path, pred: Predictor, X: np.ndarray,
                                                  tmp_path: Path) -> None:
    """predict(out=...) fills the caller's buffer; a float32 .npy is read as views of the
    mapping and gives the same outputs as predict() on the rows in memory."""
    x = np.ascontiguousarray(X[:1000], dtype=np.float32)
    out = np.empty((len(x), pred.n_outputs), np.float32)
    got = pred.predict(x, out=out)
    assert got.outputs is out
    np.testing.assert_array_equal(out, pred.predict(x).outputs)
    with pytest.raises(InputError, match="out must be"):
        pred.predict(x, out=np.empty((3, pred.n_outputs), np.float32))
    np.save(tmp_path / "f32.npy", x)
    reader = open_reader(str(tmp_path / "f32.npy"), row_shape=(10,), block_bytes=8192)
    assert isinstance(reader, NpyReader) and reader.zero_copy
    run(example_bundle, str(tmp_path / "f32.npy"), str(tmp_path / "o.npy"), threads=1, budget="8GiB")
    np.testing.assert_array_equal(np.load(tmp_path / "o.npy"), out)
