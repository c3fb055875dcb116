"""Peak probe, running maximum across resets, live monitor and its plot."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from toma_edge.host.plots import plot_memory_log
from toma_edge.probes import (
    MemoryMonitor,
    MemorySample,
    PeakProbe,
    measure_peak,
    peak_probe,
    rss_bytes,
)

MiB = 1 << 20


def _touch(n: int) -> bytearray:
    b = bytearray(n)
    b[::4096] = b"\x01" * len(range(0, n, 4096))  # make every page resident
    return b


def test_measure_sees_a_freed_spike() -> None:
    with measure_peak() as m:
        b = _touch(64 * MiB)
        del b
    assert m.rise_bytes >= 60 * MiB
    assert m.peak_bytes >= m.start_bytes + 60 * MiB
    assert m.seconds >= 0


def test_small_work_reads_small() -> None:
    with measure_peak() as m:
        x = [0] * 10
        del x
    assert m.rise_bytes < 8 * MiB


def test_inner_reset_never_hides_outer_or_reader_peak() -> None:
    probe = peak_probe()
    reader = probe.reader()
    reader.take()
    try:
        with probe.measure() as outer:
            b = _touch(80 * MiB)
            del b
            # the inner measurement resets the kernel mark; outer must still see 80 MiB
            with probe.measure() as inner:
                pass
        assert inner.rise_bytes < 16 * MiB
        assert outer.rise_bytes >= 75 * MiB
        cpu, _ = reader.take()
        assert cpu >= outer.peak_bytes
        # a fresh window: the old spike is gone from the reader's next take
        cpu2, _ = reader.take()
        assert cpu2 < outer.peak_bytes
        assert probe.running_peak_bytes() >= outer.peak_bytes
    finally:
        reader.close()


def test_running_peak_never_falls() -> None:
    probe = peak_probe()
    before = probe.running_peak_bytes()
    with probe.measure():
        pass
    assert probe.running_peak_bytes() >= before


def test_sampling_fallback_sees_a_held_allocation() -> None:
    probe = PeakProbe(method="sampling", sample_interval_s=0.001)
    with probe.measure() as m:
        b = _touch(48 * MiB)
        time.sleep(0.05)
        del b
    assert m.method.startswith("sampling")
    assert m.rise_bytes >= 40 * MiB


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux only")
def test_linux_uses_vmhwm() -> None:
    assert peak_probe().method == "vmhwm"


def test_monitor_log_and_plot(tmp_path: Path) -> None:
    log = tmp_path / "mem.jsonl"
    seen: list[MemorySample] = []
    budget = rss_bytes() + 256 * MiB
    with MemoryMonitor(interval_s=0.01, log_path=log, budget_bytes=budget,
                       on_sample=seen.append) as mon:
        mon.mark("alloc")
        b = _touch(32 * MiB)
        time.sleep(0.05)
        mon.mark("free")
        del b
        time.sleep(0.03)
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert lines[0]["budget_bytes"] == budget
    rows = lines[1:]
    assert len(rows) >= 5 and len(seen) == len(rows)
    assert {r.get("label") for r in rows} >= {"alloc", "free"}
    ts = [r["t_s"] for r in rows]
    assert ts == sorted(ts)
    assert max(r["rss_bytes"] for r in rows if r.get("label") == "alloc") >= \
        rows[0]["rss_bytes"] + 24 * MiB
    assert mon.peak_bytes == max(s.rss_bytes for s in mon.samples)
    png = plot_memory_log(log, tmp_path / "mem.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 5000
