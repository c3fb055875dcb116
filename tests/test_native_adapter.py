"""The native adapter (toma_edge_native, no torch) against the torch-based pybindings one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from toma_edge.device.adapter import available_adapters, load_program
from toma_edge.errors import BundleError, InputError

pytestmark = pytest.mark.skipif("native" not in available_adapters(),
                                reason="toma-edge-native is not installed")


def _rows(prog, n: int, seed: int = 0) -> np.ndarray:  # type: ignore[no-untyped-def]
    shape = prog.inputs[0].shape[1:]
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)


@pytest.mark.parametrize("which", ["example_bundle", "digits_bundle"])
def test_native_equals_pybind(which: str, request: pytest.FixtureRequest) -> None:
    bundle: Path = request.getfixturevalue(which)
    native = load_program(bundle / "model.pte", adapter="native")
    pyb = load_program(bundle / "model.pte", adapter="pybind")
    assert native.adapter == "native" and pyb.adapter == "pybind"
    assert native.inputs == pyb.inputs and native.outputs == pyb.outputs
    for n in (1, 7, native.inputs[0].shape[0]):
        x = _rows(native, n, seed=n)
        (a,) = native.run([x])
        (b,) = pyb.run([x])
        assert a.shape == b.shape == (n, *native.outputs[0].shape[1:]) and a.dtype == np.float32
        np.testing.assert_array_equal(a, b)  # same kernels, same program: bit-equal
    # the Predictor's hot loop: batches into one output, equal to one call per batch
    x = _rows(native, 70, seed=3)
    out = np.empty((70, *native.outputs[0].shape[1:]), np.float32)
    native.run_batches_into(x, out, 16)
    want = np.concatenate([pyb.run([x[i:i + 16]])[0] for i in range(0, 70, 16)])
    np.testing.assert_array_equal(out, want)


def test_native_loads_bytes_and_outlives_them(example_bundle: Path) -> None:
    data = bytearray((example_bundle / "model.pte").read_bytes())
    prog = load_program(bytes(data), adapter="native")
    x = _rows(prog, 5)
    (want,) = prog.run([x])
    data[:] = b"\0" * len(data)  # the caller's buffer may go: the program keeps its own
    (got,) = prog.run([x])
    np.testing.assert_array_equal(got, want)


def test_native_errors_name_the_executorch_error(example_bundle: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.pte"
    bad.write_bytes(b"not a program at all" * 10)
    with pytest.raises(BundleError, match=r"ExecuTorch cannot load the program: .*: (InvalidProgram|InvalidArgument|NotSupported)"):
        load_program(bad, adapter="native")
    with pytest.raises(BundleError, match="cannot open"):
        load_program(tmp_path / "missing.pte", adapter="native")
    prog = load_program(example_bundle / "model.pte", adapter="native")
    width = prog.inputs[0].shape[1]
    with pytest.raises(InputError, match="float32"):
        prog.run([np.zeros((2, width), np.float64)])
    with pytest.raises(InputError, match="2 dimensions"):
        prog.run([np.zeros((width,), np.float32)])
    with pytest.raises(InputError, match="takes 1 inputs"):
        prog.run([np.zeros((2, width), np.float32)] * 2)
    too_many = prog.inputs[0].shape[0] + 1  # past the exported upper bound of the batch
    with pytest.raises(InputError, match=r"ExecuTorch method failed: .*: \w+"):
        prog.run([np.zeros((too_many, width), np.float32)])
    # the program still works after refused calls
    (y,) = prog.run([np.zeros((3, width), np.float32)])
    assert y.shape[0] == 3


def test_native_error_type_carries_code_and_name(tmp_path: Path) -> None:
    import toma_edge_native

    bad = tmp_path / "bad.pte"
    bad.write_bytes(b"x" * 64)
    with pytest.raises(toma_edge_native.ExecuTorchError) as ei:
        toma_edge_native.Program(str(bad))
    assert ei.value.code != 0 and ei.value.name and ei.value.name in str(ei.value)


def test_adapter_choice_is_shown_and_can_be_forced(example_bundle: Path) -> None:
    assert available_adapters()[0] == "native"  # native first where it is installed
    code = ("import json, sys\nfrom toma_edge.device.bundle import load_bundle\n"
            "b = load_bundle(sys.argv[1])\n"
            "print(json.dumps([b.adapter, 'torch' in sys.modules]))")
    for forced, want, torch_loaded in (("", "native", False), ("pybind", "pybind", True)):
        r = subprocess.run([sys.executable, "-c", code, str(example_bundle)], capture_output=True,
                           text=True, timeout=120, env={**_env(), "TOMA_EDGE_ADAPTER": forced})
        assert r.returncode == 0, r.stderr[-2000:]
        assert json.loads(r.stdout.strip().splitlines()[-1]) == [want, torch_loaded]
    r = subprocess.run([sys.executable, "-m", "toma_edge.cli", "inspect", str(example_bundle)],
                       capture_output=True, text=True, timeout=120, env=_env())
    assert r.returncode == 0, r.stderr
    assert "runtime     native adapter (executorch 1.5" in r.stdout


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)


_HELD_AT_EXIT = """
import gc, sys, threading
import numpy as np
from toma_edge.device.bundle import load_bundle

b = load_bundle(sys.argv[1], threads=1, adapter="native")
(y,) = b.program.run([np.zeros((2, 10), np.float32)])
print(b.adapter, y.shape)
# what a server leaves at exit: a daemon thread and a frozen reference cycle still hold it
hold = threading.Event()
threading.Thread(target=lambda p=b: hold.wait(), daemon=True).start()
cycle: list = [b]
cycle.append(cycle)
del b
gc.freeze()
"""


def test_native_program_held_at_exit_is_released_without_leak_report(example_bundle: Path) -> None:
    """nanobind checks for live instances when the module is torn down: a program still
    held at exit printed ~20 lines of 'nanobind: leaked ...' after every serve."""
    r = subprocess.run([sys.executable, "-c", _HELD_AT_EXIT, str(example_bundle)],
                       capture_output=True, text=True, timeout=120, env=_env())
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["native", "(2,", "1)"]
    assert "leaked" not in r.stderr and r.stderr == "", r.stderr


def test_native_close(example_bundle: Path) -> None:
    a = load_program(example_bundle / "model.pte", adapter="native")
    b = load_program(example_bundle / "model.pte", adapter="native")
    x = _rows(a, 3)
    (want,) = a.run([x])
    a.close()
    a.close()  # idempotent
    assert a.closed and not b.closed
    with pytest.raises(BundleError, match="the model was released"):
        a.run([x])
    with pytest.raises(BundleError, match="the model was released"):
        a.run_batches_into(x, np.empty_like(want), 2)
    np.testing.assert_array_equal(b.run([x])[0], want)  # the other one is untouched


_RELEASE_ALL = """
import sys
import numpy as np
from toma_edge.device.adapter import load_program, release_native_programs
progs = [load_program(sys.argv[1], adapter="native") for _ in range(3)]
progs[0].close()
n = release_native_programs()
try:
    progs[1].run([np.zeros((1, 10), np.float32)])
except Exception as e:
    print(n, release_native_programs(), all(p.closed for p in progs), type(e).__name__)
"""


def test_release_native_programs_closes_every_live_one(example_bundle: Path) -> None:
    # in a process of its own: it closes every program of the process it runs in
    r = subprocess.run([sys.executable, "-c", _RELEASE_ALL, str(example_bundle / "model.pte")],
                       capture_output=True, text=True, timeout=120, env=_env())
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert r.stdout.split() == ["2", "0", "True", "BundleError"]
