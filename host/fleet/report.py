"""``fleet status`` (a table) and ``fleet report`` (PNG plots and a Markdown summary).

    from toma_edge.host.fleet.store import open_store
    from toma_edge.host.fleet.report import fleet_status_table, write_report
    store = open_store("fleet.db", create=False)        # or "postgresql://fleet@db/fleet"
    rich.print(fleet_status_table(store.devices()))
    paths = write_report(store, "fleet-report")   # PNGs per device + fleet-report/README.md
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...budget import format_size
from ...errors import TelemetryError
from .store import DeviceRow, FleetStore

if TYPE_CHECKING:
    from .store_pg import PgFleetStore

__all__ = ["fleet_status_table", "write_report", "format_age", "rollouts_table",
           "rollout_devices_table", "write_rollout_timeline"]


def format_age(seconds: float | None) -> str:
    """``format_age(75) == '1 min 15 s ago'``; '-' for None."""
    if seconds is None:
        return "-"
    s = max(0, int(seconds))
    if s < 60:
        return f"{s} s ago"
    if s < 3600:
        return f"{s // 60} min {s % 60} s ago"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} min ago"
    return f"{s // 86400} d ago"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.1f} ms"


def _state(d: DeviceRow) -> str:
    if d.online is None:
        return "[yellow]unknown[/]"
    return "[green]online[/]" if d.online else "[red]offline[/]"


def fleet_status_table(devices: Sequence[DeviceRow], *, now: float | None = None) -> Any:
    """A ``rich.table.Table`` with one row per device: state, model and version, last seen,
    p99 latency of the last window, peak RSS against the budget (headroom), error rate
    over the last hour, and how many of its messages the collector rejected."""
    from rich.table import Table

    now = time.time() if now is None else now
    t = Table(title=f"toma-edge fleet ({len(devices)} devices)")
    for col in ("fleet", "device", "state", "model", "last seen", "p99 latency",
                "peak RSS / budget", "headroom", "error rate", "rejected"):
        t.add_column(col)
    for d in devices:
        model = f"{d.model} {d.model_version or ''}".strip() if d.model else "-"
        mem = "-"
        if d.peak_rss_bytes is not None:
            mem = format_size(d.peak_rss_bytes) + (
                f" / {format_size(d.budget_bytes)}" if d.budget_bytes else "")
        head = d.headroom_bytes
        head_s = "-" if head is None else (
            format_size(head) if head >= 0 else f"[red]{format_size(head)} over[/]")
        rate = d.error_rate
        t.add_row(
            d.fleet, d.device_id, _state(d), model,
            format_age(None if d.last_seen is None else now - d.last_seen),
            _ms(d.latency_p99_s), mem, head_s,
            "-" if rate is None else f"{rate:.2%}", str(d.rejected),
        )
    return t


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def write_report(store: FleetStore | PgFleetStore, out_dir: str | Path) -> list[Path]:
    """Write per device ``<fleet>__<device>__latency.png`` and ``...__memory.png``
    (over time, memory against the budget) and a ``README.md`` summary into ``out_dir``;
    returns the paths written. TelemetryError if the store holds no device."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TelemetryError(f"report folder {str(out)!r} cannot be created: {e}") from e
    devices = store.devices()
    if not devices:
        raise TelemetryError(
            f"fleet database {store.path_or_url!r} holds no device yet; run `toma-edge fleet "
            "collect` while devices publish")
    now = time.time()
    written: list[Path] = []
    lines = [
        "# toma-edge fleet report", "",
        f"Generated {dt.datetime.fromtimestamp(now).isoformat(timespec='seconds')} from "
        f"`{store.path_or_url}`: {len(devices)} devices.", "",
        "| fleet | device | state | model | last seen | p99 latency | peak RSS | budget "
        "| headroom | error rate | windows | rejected |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for d in devices:
        state = "unknown" if d.online is None else ("online" if d.online else "offline")
        head = d.headroom_bytes
        lines.append(
            f"| {d.fleet} | {d.device_id} | {state} | {d.model or '-'} {d.model_version or ''} "
            f"| {format_age(None if d.last_seen is None else now - d.last_seen)} "
            f"| {_ms(d.latency_p99_s)} "
            f"| {format_size(d.peak_rss_bytes) if d.peak_rss_bytes is not None else '-'} "
            f"| {format_size(d.budget_bytes) if d.budget_bytes else '-'} "
            f"| {format_size(head) if head is not None else '-'} "
            f"| {'-' if d.error_rate is None else f'{d.error_rate:.2%}'} "
            f"| {d.telemetry_count} | {d.rejected} |")
    lines.append("")
    for d in devices:
        rows = store.telemetry(d.fleet, d.device_id)
        if not rows:
            continue
        base = _safe(f"{d.fleet}__{d.device_id}")
        when: Any = [dt.datetime.fromtimestamp(r["ts"]) for r in rows]

        fig, ax = plt.subplots(figsize=(8, 3.5))
        for key, label in (("latency_p50_s", "p50"), ("latency_p95_s", "p95"),
                           ("latency_p99_s", "p99"), ("latency_max_s", "max")):
            ms: Any = [float("nan") if r[key] is None else r[key] * 1000 for r in rows]
            ax.plot(when, ms, label=label, lw=1)
        ax.set_title(f"{d.fleet}/{d.device_id}: request latency per window")
        ax.set_ylabel("latency (ms)")
        ax.legend(loc="upper left", fontsize="small")
        fig.autofmt_xdate()
        lat_path = out / f"{base}__latency.png"
        fig.savefig(lat_path, dpi=90, bbox_inches="tight")
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(8, 3.5))
        mib = float(1 << 20)
        for key, label in (("rss_bytes", "RSS"), ("peak_rss_bytes", "peak RSS"),
                           ("budget_bytes", "budget")):
            ys: Any = [float("nan") if r[key] is None else r[key] / mib for r in rows]
            ax.plot(when, ys, label=label, lw=1, ls="--" if key == "budget_bytes" else "-",
                    color="red" if key == "budget_bytes" else None)
        ax.set_title(f"{d.fleet}/{d.device_id}: memory against budget")
        ax.set_ylabel("MiB")
        ax.set_ylim(bottom=0)
        ax.legend(loc="lower left", fontsize="small")
        fig.autofmt_xdate()
        mem_path = out / f"{base}__memory.png"
        fig.savefig(mem_path, dpi=90, bbox_inches="tight")
        plt.close(fig)
        written += [lat_path, mem_path]
        lines += [f"## {d.fleet}/{d.device_id}", "",
                  f"![latency]({lat_path.name})", "", f"![memory]({mem_path.name})", ""]
        evs = store.events(d.fleet, d.device_id)[-10:]
        if evs:
            lines += ["Last events:", ""]
            lines += [f"- {dt.datetime.fromtimestamp(e['ts']).isoformat(timespec='seconds')} "
                      f"`{e['kind']}` {e['fields']}" for e in evs]
            lines.append("")
    for r in store.rollouts(limit=10):
        png = write_rollout_timeline(store, r["id"], out / f"rollout__{_safe(r['id'])}.png")
        written.append(png)
        lines += [f"## rollout {r['id']}: {r['release_name']} {r['release_version']} to "
                  f"{r['fleet']}, {r['state']}", "", r["reason"] or "", "",
                  f"![rollout timeline]({png.name})", ""]
    summary = out / "README.md"
    summary.write_text("\n".join(lines))
    written.append(summary)
    return written


def _release_of(d: DeviceRow) -> str:
    return f"{d.model} {d.model_version or ''}".strip() if d.model else "-"


def rollouts_table(store: Any, rows: Sequence[dict[str, Any]], *,
                   now: float | None = None) -> Any:
    """A ``rich.table.Table`` of rollouts: id, fleet, release, state, devices healthy of
    targeted, wave, started, and the reason it ended."""
    from rich.table import Table

    now = time.time() if now is None else now
    t = Table(title=f"toma-edge rollouts ({len(rows)})")
    for col in ("rollout", "fleet", "release", "state", "healthy", "wave", "started",
                "reason"):
        t.add_column(col)
    for r in rows:
        devs = store.rollout_devices(r["id"])
        ok = sum(1 for d in devs if d["state"] == "healthy")
        t.add_row(r["id"], r["fleet"], f"{r['release_name']} {r['release_version']}",
                  _rollout_state(r["state"]), f"{ok}/{len(devs)}", str(r["wave"]),
                  format_age(now - float(r["created_at"])), (r["reason"] or "")[:120])
    return t


def _rollout_state(state: str) -> str:
    color = {"succeeded": "green", "failed": "red", "aborted": "red", "aborting": "yellow",
             "running": "cyan"}.get(state, "white")
    return f"[{color}]{state}[/]"


def rollout_devices_table(store: Any, row: dict[str, Any]) -> Any:
    """A ``rich.table.Table`` of one rollout's devices: wave, state, reason (refusals with
    their figures), the release the device runs now, whether its job was cleared."""
    from rich.table import Table

    live = {d.device_id: d for d in store.devices() if d.fleet == row["fleet"]}
    t = Table(title=(f"rollout {row['id']}: {row['release_name']} {row['release_version']} "
                     f"to {row['fleet']}: {row['state']}"),
              caption=row["reason"] or None)
    for col in ("device", "wave", "state", "running now", "reason"):
        t.add_column(col)
    for d in store.rollout_devices(row["id"]):
        dev = live.get(d["device_id"])
        t.add_row(d["device_id"], str(d["wave"]), d["state"],
                  _release_of(dev) if dev else "-", (d["reason"] or "")[:160])
    return t


_COLORS = {"sent": "#bbbbbb", "received": "#9ecae1", "downloaded": "#6baed6",
           "verified": "#4292c6", "live": "#fdae6b", "healthy": "#31a354",
           "refused": "#756bb1", "failed": "#de2d26", "rolled_back": "#a50f15"}


def write_rollout_timeline(store: Any, rollout_id: str, out: str | Path) -> Path:
    """A PNG timeline of one rollout: a row per device (by wave), a bar per state from
    the time the device reported it (``sent`` from the controller) to its next state.
    TelemetryError for an unknown rollout."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from ...jsonio import loads

    row = store.rollout(rollout_id)
    if row is None:
        raise TelemetryError(f"rollout {rollout_id!r} is not in the store")
    t0 = float(row["created_at"])
    devs = store.rollout_devices(rollout_id)
    marks: dict[str, list[tuple[float, str]]] = {
        d["device_id"]: ([(float(d["sent_at"]) - t0, "sent")] if d["sent_at"] else [])
        for d in devs}
    for ev in store.rollout_events(row["fleet"], since=t0 - 120):
        dev = ev["device_id"]
        if dev not in marks:
            continue
        try:
            f = loads(ev["fields"], what="event fields")
        except Exception:
            continue
        if isinstance(f, dict) and f.get("rollout_id") == rollout_id:
            marks[dev].append((float(ev["received_at"]) - t0, ev["kind"].removeprefix(
                "rollout.")))
    end_t = max([float(row["finished_at"] or time.time()) - t0]
                + [m[0] for ms in marks.values() for m in ms] + [1.0])
    fig, ax = plt.subplots(figsize=(9, 0.8 + 0.32 * max(1, len(devs))))
    for i, d in enumerate(devs):
        ms = sorted(marks[d["device_id"]])
        for j, (t, state) in enumerate(ms):
            t_next = ms[j + 1][0] if j + 1 < len(ms) else end_t
            ax.barh(i, max(t_next - t, end_t * 0.004), left=t, height=0.7,
                    color=_COLORS.get(state, "#888888"))
    ax.set_yticks(range(len(devs)),
                  [f"{d['device_id']} (w{d['wave']})" for d in devs], fontsize="small")
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the rollout started")
    ax.set_title(f"rollout {rollout_id}: {row['release_name']} {row['release_version']} "
                 f"to {row['fleet']} ({row['state']})")
    ax.legend(handles=[Patch(color=c, label=s) for s, c in _COLORS.items()],
              loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
    path = Path(out)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path
