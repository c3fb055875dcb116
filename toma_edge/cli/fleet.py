"""``toma-edge fleet``: collect telemetry, show the fleet, write reports.

    export TOMA_EDGE_MQTT_PASSWORD=...          # or --password-file; never on the command line
    toma-edge fleet collect --mqtt mqtts://collector@broker.lan --ca-file ca.pem --db fleet.db
    toma-edge fleet status --db fleet.db
    toma-edge fleet report --db fleet.db --out fleet-report
    ls fleet-report                             # README.md, <fleet>__<device>__latency.png ...
    toma-edge fleet collect --mqtt ... --db postgresql://fleet@db:5432/fleet --metrics 0.0.0.0:9464
    toma-edge fleet dashboard --db fleet.db --http 127.0.0.1:8090   # a live page per fleet
    toma-edge fleet prune --db fleet.db --older-than 30d           # retention
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import click

from .errors import handle_errors

__all__ = ["fleet", "db_option", "open_db", "duration_s"]

F = TypeVar("F", bound=Callable[..., Any])


_DB_HELP = ("The fleet store: a SQLite file (shared by collectors on this host) or "
            "postgresql://user@host:port/db (password from PGPASSWORD or ~/.pgpass).")


def db_option(fn: F) -> F:
    """The ``--db PATH|URL`` option (default fleet.db) of every command that reads the store."""
    return click.option("--db", default="fleet.db", show_default=True, metavar="PATH|URL",
                        help=_DB_HELP)(fn)


def open_db(db: str, *, create: bool = False) -> Any:
    """The store behind ``--db`` (a path or a postgresql:// URL)."""
    from ..host.fleet.store import open_store

    return open_store(db, create=create)


def _say(line: str) -> None:
    """One line to stderr, flushed (tests and supervisors wait for it)."""
    click.echo(line, err=True)
    sys.stderr.flush()


def duration_s(value: str, *, option: str) -> float:
    """``30d``, ``12h``, ``45m``, ``90s`` or plain seconds into seconds; ConfigError otherwise."""
    from ..errors import ConfigError

    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
    text = value.strip().lower()
    mult = units.get(text[-1:], None)
    number = text[:-1] if mult else text
    try:
        n = float(number)
    except ValueError:
        n = -1.0
    if not n >= 0 or n == float("inf"):
        raise ConfigError(f"{option} {value!r} must be a duration like 30d, 12h, 45m or 90s")
    return n * (mult or 1)


fleet: click.Group = click.Group(
    name="fleet",
    help="Watch the device fleet: collect MQTT telemetry, show status, write reports.",
)


@fleet.command()
@click.option("--mqtt", "url", required=True, metavar="URL",
              help="Broker: mqtt://[user@]host[:port] or mqtts://... for TLS. The password "
                   "comes from TOMA_EDGE_MQTT_PASSWORD or --password-file.")
@db_option
@click.option("--password-file", type=click.Path(dir_okay=False, path_type=Path),
              help="File whose first line is the MQTT password.")
@click.option("--ca-file", type=click.Path(dir_okay=False, path_type=Path),
              help="CA certificate (PEM) that signed the broker's certificate (mqtts://).")
@click.option("--cert-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Client certificate (PEM), where the broker asks for one.")
@click.option("--key-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Private key (PEM) of --cert-file.")
@click.option("--client-id", help="MQTT client id; give each collector process its own "
                                  "stable one so it resumes its session after a restart.")
@click.option("--fleet", "fleet_name", default="+", show_default=True,
              help="Collect this fleet only ('+': every fleet).")
@click.option("--batch-size", type=click.IntRange(1, 10_000), default=500, show_default=True,
              help="Messages committed per database transaction.")
@click.option("--share-group", default=None, metavar="NAME",
              help="Split telemetry and events with the other collectors of this MQTT v5 "
                   "shared-subscription group (e.g. toma-edge-collectors). Needs a broker that "
                   "keeps shared subscriptions across restarts; mosquitto 2.0.11 does not.")
@click.option("--metrics", default=None, metavar="HOST:PORT",
              help="Also serve Prometheus metrics of the fleet and of this collector at "
                   "http://HOST:PORT/metrics (per device: online, memory, headroom, p99, "
                   "errors, last seen, model info).")
@click.option("--metrics-max-devices", type=click.IntRange(0, 1_000_000), default=5000,
              show_default=True,
              help="Devices with per-device series on one scrape (the rest are counted).")
@handle_errors
def collect(url: str, db: str, password_file: Path | None, ca_file: Path | None,
            cert_file: Path | None, key_file: Path | None, client_id: str | None,
            fleet_name: str, batch_size: int, share_group: str | None,
            metrics: str | None, metrics_max_devices: int) -> None:
    """Store the fleet's status, telemetry and events (SQLite or PostgreSQL), each message
    once, until Ctrl-C or SIGTERM. Several collectors with different --client-id split the
    load."""
    import logging

    from ..host.fleet.collector import Collector
    from ..host.fleet.metrics_exporter import FleetMetrics, parse_host_port, serve_metrics
    from ..telemetry import mqtt_settings, validate_id

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if fleet_name != "+":
        validate_id(fleet_name, what="fleet")
    if client_id is not None:
        validate_id(client_id, what="client id")
    settings = mqtt_settings(url, password_file=password_file, ca_file=ca_file,
                             cert_file=cert_file, key_file=key_file)
    if share_group is not None:
        validate_id(share_group, what="share group")
    address = parse_host_port(metrics, option="--metrics") if metrics is not None else None
    collector = Collector(settings, db=db, client_id=client_id, fleet=fleet_name,
                          batch_size=batch_size, share_group=share_group)
    exporter = None
    if address is not None:
        # a connection of its own: the collector's writer holds a transaction at times
        reader = open_db(db)
        try:
            exporter = serve_metrics(
                FleetMetrics(reader, collector=collector, max_devices=metrics_max_devices),
                *address)
        except BaseException:
            reader.close()
            collector.store.close()
            raise
    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        collector.start()
    except BaseException:
        if exporter is not None:
            exporter.close()
            reader.close()
        raise
    if exporter is not None:
        click.echo(f"metrics on http://{metrics}/metrics", err=True)
    click.echo(f"collecting from {settings.url} into {collector.store.path_or_url} "
               f"(client id {collector.client_id})", err=True)
    sys.stderr.flush()
    while not stop.wait(1.0):
        pass
    collector.stop()
    if exporter is not None:
        exporter.close()
        reader.close()
    s = collector.stats
    click.echo(f"stopped: {s.received} received, {s.stored} stored, {s.duplicates} "
               f"duplicates, {s.rejected} rejected, {s.dead_lettered} dead-lettered, "
               f"{s.retries} retries", err=True)


@fleet.command()
@db_option
@handle_errors
def status(db: str) -> None:
    """One row per device: online or offline, model and version, last seen, p99 latency,
    memory headroom against the budget, error rate."""
    from rich.console import Console

    from ..host.fleet.report import fleet_status_table, rollouts_table

    store = open_db(db)
    try:
        Console(width=200).print(fleet_status_table(store.devices()))
        if recent := store.rollouts(limit=3):  # the model column is each device's release
            Console(width=200).print(rollouts_table(store, recent))
    finally:
        store.close()


@fleet.command()
@db_option
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              default=Path("fleet-report"), show_default=True,
              help="Folder for the PNG plots and the README.md summary.")
@handle_errors
def report(db: str, out: Path) -> None:
    """Write PNG plots per device (latency, memory against budget, over time) and a
    Markdown summary."""
    from ..host.fleet.report import write_report

    store = open_db(db)
    try:
        paths = write_report(store, out)
    finally:
        store.close()
    click.echo(f"wrote {len(paths)} files to {out} (summary: {out / 'README.md'})")


@fleet.command()
@db_option
@click.option("--http", "http", default="127.0.0.1:8090", show_default=True,
              metavar="HOST:PORT", help="Where to serve the dashboard (read-only, no login: "
                                        "keep it on a trusted network or behind a proxy).")
@click.option("--refresh", type=click.FloatRange(0.2, 3600), default=1.0, show_default=True,
              help="Seconds between looks at the store for live updates.")
@click.option("--max-devices", type=click.IntRange(1, 1_000_000), default=2000,
              show_default=True, help="Devices listed on the main page (the counts cover all).")
@handle_errors
def dashboard(db: str, http: str, refresh: float, max_devices: int) -> None:
    """Serve a live web page of the fleet: every device (online, model, memory against
    budget, p99, errors, last seen) and a page per device with charts, updated without
    reloading; until Ctrl-C or SIGTERM."""
    from ..host.fleet.dashboard import serve_dashboard
    from ..host.fleet.metrics_exporter import parse_host_port

    host, port = parse_host_port(http, option="--http")
    store = open_db(db)
    try:
        serve_dashboard(store, host, port, refresh_s=refresh, max_devices=max_devices,
                        on_listening=lambda url: _say(
                            f"dashboard of {store.path_or_url} on {url}"))
    finally:
        store.close()


@fleet.command()
@db_option
@click.option("--older-than", "older_than", required=True, metavar="DURATION",
              help="Delete telemetry, events and dead letters received before this long "
                   "ago: 30d, 12h, 45m, 90s (device status and reject counts stay).")
@handle_errors
def prune(db: str, older_than: str) -> None:
    """Retention: delete old telemetry, events and dead letters from the store."""
    seconds = duration_s(older_than, option="--older-than")
    store = open_db(db)
    try:
        deleted = store.prune(seconds)
    finally:
        store.close()
    click.echo(", ".join(f"{n} {table}" for table, n in deleted.items()) + " rows deleted")


