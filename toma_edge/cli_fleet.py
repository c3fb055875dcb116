"""``toma-edge fleet``: collect telemetry, show the fleet, write reports.

    export TOMA_EDGE_MQTT_PASSWORD=...          # or --password-file; never on the command line
    toma-edge fleet collect --mqtt mqtts://collector@broker.lan --ca-file ca.pem --db fleet.db
    toma-edge fleet status --db fleet.db
    toma-edge fleet report --db fleet.db --out fleet-report
    ls fleet-report                             # README.md, <fleet>__<device>__latency.png ...
"""

from __future__ import annotations

import functools
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import click

__all__ = ["fleet"]

F = TypeVar("F", bound=Callable[..., Any])


def handle_errors(fn: F) -> F:
    """toma_edge.cli.handle_errors, looked up at call time: cli.py imports this module, and
    ``python -m toma_edge.cli`` would otherwise import it half-initialised."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from .cli import handle_errors as handle

        return handle(fn)(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


_DB_HELP = "The fleet's SQLite database (one file, shared by collectors on this host)."


fleet: click.Group = click.Group(
    name="fleet",
    help="Watch the device fleet: collect MQTT telemetry, show status, write reports.",
)


@fleet.command()
@click.option("--mqtt", "url", required=True, metavar="URL",
              help="Broker: mqtt://[user@]host[:port] or mqtts://... for TLS. The password "
                   "comes from TOMA_EDGE_MQTT_PASSWORD or --password-file.")
@click.option("--db", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("fleet.db"), show_default=True, help=_DB_HELP)
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
@handle_errors
def collect(url: str, db: Path, password_file: Path | None, ca_file: Path | None,
            cert_file: Path | None, key_file: Path | None, client_id: str | None,
            fleet_name: str, batch_size: int, share_group: str | None) -> None:
    """Store the fleet's status, telemetry and events in SQLite, each message once,
    until Ctrl-C or SIGTERM. Several collectors with different --client-id split the load."""
    import logging

    from .host.fleet.collector import Collector
    from .telemetry import mqtt_settings, validate_id

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if fleet_name != "+":
        validate_id(fleet_name, what="fleet")
    if client_id is not None:
        validate_id(client_id, what="client id")
    settings = mqtt_settings(url, password_file=password_file, ca_file=ca_file,
                             cert_file=cert_file, key_file=key_file)
    if share_group is not None:
        validate_id(share_group, what="share group")
    collector = Collector(settings, db=db, client_id=client_id, fleet=fleet_name,
                          batch_size=batch_size, share_group=share_group)
    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    collector.start()
    click.echo(f"collecting from {settings.url} into {db} (client id {collector.client_id})",
               err=True)
    sys.stderr.flush()
    while not stop.wait(1.0):
        pass
    collector.stop()
    s = collector.stats
    click.echo(f"stopped: {s.received} received, {s.stored} stored, {s.duplicates} "
               f"duplicates, {s.rejected} rejected", err=True)


@fleet.command()
@click.option("--db", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("fleet.db"), show_default=True, help=_DB_HELP)
@handle_errors
def status(db: Path) -> None:
    """One row per device: online or offline, model and version, last seen, p99 latency,
    memory headroom against the budget, error rate."""
    from rich.console import Console

    from .host.fleet.report import fleet_status_table
    from .host.fleet.store import FleetStore

    store = FleetStore(db, create=False)
    try:
        Console(width=200).print(fleet_status_table(store.devices()))
    finally:
        store.close()


@fleet.command()
@click.option("--db", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("fleet.db"), show_default=True, help=_DB_HELP)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              default=Path("fleet-report"), show_default=True,
              help="Folder for the PNG plots and the README.md summary.")
@handle_errors
def report(db: Path, out: Path) -> None:
    """Write PNG plots per device (latency, memory against budget, over time) and a
    Markdown summary."""
    from .host.fleet.report import write_report
    from .host.fleet.store import FleetStore

    store = FleetStore(db, create=False)
    try:
        paths = write_report(store, out)
    finally:
        store.close()
    click.echo(f"wrote {len(paths)} files to {out} (summary: {out / 'README.md'})")
