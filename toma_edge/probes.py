"""Memory probes: the peak memory of a piece of work, and RSS over time.

    from toma_edge.probes import measure_peak, peak_probe, MemoryMonitor
    with measure_peak() as m:
        work()
    print(m.rise_bytes, m.peak_bytes)          # bytes above the start, absolute peak
    print(peak_probe().running_peak_bytes())   # process-wide maximum, never reset

One process-wide :class:`PeakProbe` owns every reset of the kernel's high-water mark.
Before it resets (Linux: ``5`` to ``/proc/self/clear_refs``; CUDA:
``torch.cuda.reset_peak_memory_stats``) it folds the mark it is about to erase into
every open measurement, every :class:`PeakReader` (telemetry keeps one) and the
process-wide running maximum. So a reset for one measurement never hides a peak from
another reader. Where the kernel mark cannot be reset (not Linux, or clear_refs not
writable) a psutil sampling thread stands in, at ``sample_interval_s``.

glibc keeps freed memory in its arenas and reuses it, so the RSS rise of a step can
read lower than what the step allocated; call :func:`enable_exact_peaks` first (or
set ``MALLOC_MMAP_THRESHOLD_=65536``) when a high-water mark must be exact.

:class:`MemoryMonitor` samples RSS in a thread for progress displays, telemetry and the
``--memory-log`` JSONL file; :func:`read_memory_log` reads such a file back (and
``toma_edge.host.plots.plot_memory_log`` draws it against a budget: the core carries no
matplotlib).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

__all__ = [
    "PeakProbe",
    "PeakMeasurement",
    "PeakReader",
    "MemorySample",
    "MemoryMonitor",
    "SampleCallback",
    "peak_probe",
    "measure_peak",
    "peak_rss_of",
    "process_start_time",
    "rss_bytes",
    "enable_exact_peaks",
    "read_memory_log",
]

Method = Literal["auto", "vmhwm", "sampling"]

_CLEAR_REFS = "/proc/self/clear_refs"
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """Resident set size of this process now, in bytes."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        import psutil

        return int(psutil.Process().memory_info().rss)


def peak_rss_of(pid: int | None = None) -> int:
    """Peak RSS (VmHWM) of process ``pid`` (default: this one) since it started or since
    its high-water mark was last reset, in bytes. Linux only (OSError elsewhere)."""
    path = f"/proc/{'self' if pid is None else int(pid)}/status"
    with open(path, "rb") as f:
        for line in f:
            if line.startswith(b"VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError(f"VmHWM missing from {path}")


def _read_vmhwm() -> int:
    return peak_rss_of()


def process_start_time() -> float:
    """This process's start, in ``time.time()`` seconds (to ~10 ms on Linux).

    From /proc: the process's start in clock ticks after boot against the system's uptime
    (psutil's create_time() adds the boot time, which Linux gives in whole seconds, so it
    can be up to a second off).
    """
    try:
        with open("/proc/self/stat", "rb") as f:
            stat = f.read()
        ticks = int(stat[stat.rindex(b")") + 2 :].split()[19])  # field 22: starttime
        with open("/proc/uptime", "rb") as f:
            uptime = float(f.read().split()[0])
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        import psutil

        return float(psutil.Process().create_time())


def _vmhwm_resettable() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        _read_vmhwm()
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def enable_exact_peaks(mmap_threshold_bytes: int = 64 << 10) -> bool:
    """Make glibc return large freed blocks to the kernel, so RSS peaks are exact.

    Fixes glibc's mmap threshold (which also stops its dynamic growth), like
    ``MALLOC_MMAP_THRESHOLD_``. Costs some speed (fresh pages per large tensor). Returns
    False where the C library is not glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_mmap_threshold = -3
        return bool(libc.mallopt(m_mmap_threshold, int(mmap_threshold_bytes)))
    except (OSError, AttributeError):
        return False


def _cuda_ready() -> bool:
    torch = sys.modules.get("torch")  # never import torch just to probe
    if torch is None:
        return False
    try:
        return bool(torch.cuda.is_available() and torch.cuda.is_initialized())
    except Exception:
        return False


class _Window:
    """A span that wants the maximum of every reading that fell inside it."""

    __slots__ = ("cpu", "cuda")

    def __init__(self) -> None:
        self.cpu = 0
        self.cuda = 0

    def fold(self, cpu: int, cuda: int) -> None:
        if cpu > self.cpu:
            self.cpu = cpu
        if cuda > self.cuda:
            self.cuda = cuda


@dataclass
class PeakMeasurement:
    """What :meth:`PeakProbe.measure` found. Bytes; CUDA figures are 0 without CUDA.

    ``peak_bytes`` is the absolute peak RSS during the block, ``start_bytes`` the RSS
    when it began, ``rise_bytes`` their difference (what the work itself needed).
    """

    start_bytes: int = 0
    peak_bytes: int = 0
    cuda_start_bytes: int = 0
    cuda_peak_bytes: int = 0
    seconds: float = 0.0
    method: str = ""

    @property
    def rise_bytes(self) -> int:
        """Peak above the start, in bytes (0 if memory only fell)."""
        return max(0, self.peak_bytes - self.start_bytes)

    @property
    def cuda_rise_bytes(self) -> int:
        """CUDA allocated peak above the start, in bytes."""
        return max(0, self.cuda_peak_bytes - self.cuda_start_bytes)

    @property
    def device_rise_bytes(self) -> int:
        """The CUDA rise when CUDA was measured, else the RSS rise (bytes)."""
        return self.cuda_rise_bytes if self.method.endswith("+cuda") else self.rise_bytes


class PeakReader:
    """A reader's own view of the peak: ``take()`` returns the peak since its last take.

    Resets done for other measurements are folded in, so no peak is missed.
    """

    def __init__(self, probe: PeakProbe) -> None:
        self._probe = probe
        self._window = _Window()
        probe._register(self._window)

    def take(self) -> tuple[int, int]:
        """(peak RSS bytes, peak CUDA allocated bytes) since the previous take."""
        return self._probe._take(self._window)

    def close(self) -> None:
        """Stop following the probe."""
        self._probe._unregister(self._window)


class PeakProbe:
    """The process-wide peak probe (use :func:`peak_probe`, not this constructor).

    ``method``: ``"vmhwm"`` (Linux high-water mark, exact), ``"sampling"`` (psutil
    thread every ``sample_interval_s`` seconds; misses spikes shorter than that) or
    ``"auto"`` (vmhwm where it can be reset).
    """

    def __init__(self, *, method: Method = "auto", sample_interval_s: float = 0.002) -> None:
        if method == "auto":
            method = "vmhwm" if _vmhwm_resettable() else "sampling"
        self.method: str = method
        self.sample_interval_s = sample_interval_s
        self._lock = threading.RLock()
        self._windows: list[_Window] = []
        self._running = _Window()  # process-wide running maximum, never reset
        self._sampler: threading.Thread | None = None
        self._sampler_stop = threading.Event()
        self._sampled = 0  # sampling method's own high-water mark since the last reset

    # -- raw marks ------------------------------------------------------------------
    def _cpu_mark(self) -> int:
        if self.method == "vmhwm":
            return _read_vmhwm()
        return max(self._sampled, rss_bytes())

    def _cuda_mark(self) -> int:
        if not _cuda_ready():
            return 0
        import torch

        return int(torch.cuda.max_memory_allocated())

    def _fold_all(self, cpu: int, cuda: int) -> None:
        self._running.fold(cpu, cuda)
        for w in self._windows:
            w.fold(cpu, cuda)

    def _reset_marks(self) -> None:
        """Fold the marks into every window, then reset them. Caller holds the lock."""
        self._fold_all(self._cpu_mark(), self._cuda_mark())
        if self.method == "vmhwm":
            try:
                with open(_CLEAR_REFS, "w") as f:
                    f.write("5")
            except OSError:
                self.method = "sampling"
        self._sampled = rss_bytes()
        if _cuda_ready():
            import torch

            torch.cuda.reset_peak_memory_stats()

    def _register(self, w: _Window) -> None:
        with self._lock:
            w.fold(self._cpu_mark(), self._cuda_mark())
            self._windows.append(w)

    def _unregister(self, w: _Window) -> None:
        with self._lock:
            with contextlib.suppress(ValueError):
                self._windows.remove(w)

    def _take(self, w: _Window) -> tuple[int, int]:
        with self._lock:
            self._reset_marks()  # folds the marks into every window, w included
            out = (w.cpu, w.cuda)
            # the next window starts at what is resident now, not at the old peak
            w.cpu, w.cuda = rss_bytes(), self._cuda_mark()
            return out

    # -- sampling fallback ------------------------------------------------------------
    def _sample_loop(self) -> None:
        while not self._sampler_stop.wait(self.sample_interval_s):
            r = rss_bytes()
            if r > self._sampled:
                self._sampled = r

    def _start_sampler(self) -> None:
        if self.method != "sampling" or self._sampler is not None:
            return
        self._sampler_stop.clear()
        self._sampler = threading.Thread(target=self._sample_loop, name="toma-peak", daemon=True)
        self._sampler.start()

    def _stop_sampler_if_idle(self) -> None:
        if self._sampler is not None and not self._windows:
            self._sampler_stop.set()
            self._sampler.join()
            self._sampler = None

    # -- public ---------------------------------------------------------------------
    @contextlib.contextmanager
    def measure(self) -> Iterator[PeakMeasurement]:
        """Measure the peak of the ``with`` block; the result fills in on exit.

        Nested and concurrent measurements each see their own full peak.
        """
        m = PeakMeasurement(method=self.method + ("+cuda" if _cuda_ready() else ""))
        w = _Window()
        with self._lock:
            self._reset_marks()
            m.start_bytes = rss_bytes()
            m.cuda_start_bytes = self._cuda_mark()
            w.fold(m.start_bytes, m.cuda_start_bytes)
            self._windows.append(w)
            self._start_sampler()
        t0 = time.perf_counter()
        try:
            yield m
        finally:
            m.seconds = time.perf_counter() - t0
            with self._lock:
                cpu, cuda = self._cpu_mark(), self._cuda_mark()
                self._fold_all(cpu, cuda)
                with contextlib.suppress(ValueError):
                    self._windows.remove(w)
                self._stop_sampler_if_idle()
            m.peak_bytes = w.cpu
            m.cuda_peak_bytes = w.cuda

    def reader(self) -> PeakReader:
        """A :class:`PeakReader` that sees every peak from now on (for telemetry)."""
        return PeakReader(self)

    def running_peak_bytes(self) -> int:
        """The highest RSS this probe has seen in this process, in bytes; never reset."""
        with self._lock:
            self._running.fold(self._cpu_mark(), self._cuda_mark())
            return self._running.cpu

    def running_cuda_peak_bytes(self) -> int:
        """The highest CUDA allocated bytes this probe has seen; 0 without CUDA."""
        with self._lock:
            self._running.fold(self._cpu_mark(), self._cuda_mark())
            return self._running.cuda

    def note(self, rss: int) -> None:
        """Fold an RSS reading taken elsewhere (a monitor thread) into every window."""
        with self._lock:
            if rss > self._sampled:
                self._sampled = rss
            self._fold_all(rss, 0)


_PROBE: PeakProbe | None = None
_PROBE_LOCK = threading.Lock()


def peak_probe() -> PeakProbe:
    """The process-wide :class:`PeakProbe` (created on first use)."""
    global _PROBE
    with _PROBE_LOCK:
        if _PROBE is None:
            _PROBE = PeakProbe()
        return _PROBE


def measure_peak() -> contextlib.AbstractContextManager[PeakMeasurement]:
    """``with measure_peak() as m:`` through the process-wide probe."""
    return peak_probe().measure()


# -- live monitor -----------------------------------------------------------------------


@dataclass(frozen=True)
class MemorySample:
    """One monitor reading: ``t_s`` seconds since the monitor started, RSS in bytes."""

    t_s: float
    rss_bytes: int
    peak_bytes: int
    label: str = ""

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"t_s": round(self.t_s, 4), "rss_bytes": self.rss_bytes,
                             "peak_bytes": self.peak_bytes}
        if self.label:
            d["label"] = self.label
        return d


SampleCallback = Callable[[MemorySample], None]
"""Called from the monitor thread with every sample; keep it quick."""


class MemoryMonitor:
    """Sample RSS every ``interval_s`` seconds in a thread; optional JSONL log.

        with MemoryMonitor(interval_s=0.05, log_path="mem.jsonl", budget_bytes=B) as mon:
            mon.mark("train")
            train()
        header, rows = read_memory_log("mem.jsonl")   # plot: toma_edge.host.plots

    The log's first line is a header ``{"budget_bytes": B, "interval_s": ..., "pid": ...}``;
    each further line is a :class:`MemorySample`. ``mark(label)`` starts a phase: later
    samples carry that label and the plot shades it. ``samples`` keeps the last
    ``keep`` readings in memory; ``peak_bytes`` is the highest RSS seen.
    """

    def __init__(
        self,
        *,
        interval_s: float = 0.05,
        log_path: str | os.PathLike[str] | None = None,
        budget_bytes: int | None = None,
        on_sample: SampleCallback | None = None,
        keep: int = 10_000,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        self.interval_s = interval_s
        self.log_path = Path(log_path) if log_path is not None else None
        self.budget_bytes = budget_bytes
        self.on_sample = on_sample
        self.samples: deque[MemorySample] = deque(maxlen=keep)
        self.peak_bytes = 0
        self._label = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._file: IO[str] | None = None
        self._t0 = 0.0
        self._lock = threading.Lock()

    def mark(self, label: str) -> None:
        """Start a phase named ``label`` (also records a sample at once)."""
        self._label = label
        self._sample()

    def _sample(self) -> MemorySample:
        rss = rss_bytes()
        peak_probe().note(rss)
        with self._lock:
            self.peak_bytes = max(self.peak_bytes, rss)
            s = MemorySample(time.perf_counter() - self._t0, rss, self.peak_bytes, self._label)
            self.samples.append(s)
            if self._file is not None:
                self._file.write(json.dumps(s.to_json()) + "\n")
        if self.on_sample is not None:
            self.on_sample(s)
        return s

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def start(self) -> MemoryMonitor:
        """Start sampling (the context manager calls this)."""
        if self._thread is not None:
            return self
        self._t0 = time.perf_counter()
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.log_path, "w", buffering=1)  # noqa: SIM115 - closed in stop()
            header = {"budget_bytes": self.budget_bytes, "interval_s": self.interval_s,
                      "pid": os.getpid()}
            self._file.write(json.dumps(header) + "\n")
        self._stop.clear()
        self._sample()
        self._thread = threading.Thread(target=self._loop, name="toma-monitor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Take a last sample, stop the thread and close the log."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        self._sample()
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def __enter__(self) -> MemoryMonitor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def read_memory_log(path: str | os.PathLike[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A :class:`MemoryMonitor` log: its header and its samples (dicts of
    :meth:`MemorySample.to_json`, ``t_s`` seconds, ``rss_bytes`` bytes), in order.
    InputError naming the line for a line that is not JSON."""
    from .jsonio import loads

    header: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            d = loads(line, what=f"{path}:{n}")
            if "rss_bytes" in d:
                rows.append(d)
            else:
                header.update(d)
    return header, rows
