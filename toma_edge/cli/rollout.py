"""``toma-edge fleet deploy``, ``fleet rollouts`` and ``fleet rollout``: staged rollouts.

    export TOMA_EDGE_MQTT_PASSWORD=...    # the deployer's password (or --password-file)
    toma-edge fleet deploy dist/rpi4.tar.gz --mqtt mqtts://deployer@broker.lan --ca-file ca.pem \\
        --fleet plant-7 --db fleet.db --canary 1 --rate exponential:2,2 --health-window 60s \\
        --abort-failed 10% --abort-min 2 --timeout 2h
    toma-edge fleet rollouts --db fleet.db                      # newest first
    toma-edge fleet rollout r-20261202-0001 --db fleet.db       # per device states
    toma-edge fleet rollout r-20261202-0001 --resume --mqtt ... # after a controller crash
    toma-edge fleet rollout r-20261202-0001 --abort --mqtt ...  # roll back what took it

``fleet deploy`` prints the rollout id on stdout at once, a line per device change on
stderr, and waits: exit 0 when every targeted device is healthy on the new release; exit 1
with one line saying why when the rollout aborted or failed; exit 2 for bad input.
``--no-wait`` records the rollout, sends nothing and returns at once: run it with
``fleet rollout ID --resume``. Progress comes from the devices' events, which a running
``toma-edge fleet collect`` stores.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import click

from .errors import handle_errors, raise_on_sigterm
from .fleet import db_option, duration_s, fleet, open_db

__all__ = ["deploy", "rollouts", "rollout"]


def _mqtt_options(fn: Any) -> Any:
    for opt in reversed([
        click.option("--mqtt", "url", metavar="URL",
                     help="Broker as the deployer: mqtt://deployer@host[:port] or mqtts://... "
                          "The password comes from TOMA_EDGE_MQTT_PASSWORD or --password-file."),
        click.option("--password-file", type=click.Path(dir_okay=False, path_type=Path),
                     help="File whose first line is the MQTT password."),
        click.option("--ca-file", type=click.Path(dir_okay=False, path_type=Path),
                     help="CA certificate (PEM) that signed the broker's certificate."),
        click.option("--cert-file", type=click.Path(dir_okay=False, path_type=Path),
                     help="Client certificate (PEM), where the broker asks for one."),
        click.option("--key-file", type=click.Path(dir_okay=False, path_type=Path),
                     help="Private key (PEM) of --cert-file."),
    ]):
        fn = opt(fn)
    return fn


def _settings(url: str | None, password_file: Path | None, ca_file: Path | None,
              cert_file: Path | None, key_file: Path | None) -> Any:
    from ..errors import ConfigError
    from ..telemetry import mqtt_settings

    if not url:
        raise ConfigError("--mqtt URL is needed to run a rollout (the deployer's broker URL)")
    return mqtt_settings(url, password_file=password_file, ca_file=ca_file,
                         cert_file=cert_file, key_file=key_file)


def _progress(dev: str, state: str, reason: str) -> None:
    click.echo(f"{time.strftime('%H:%M:%S')} {dev}: {state}" + (f" ({reason})" if reason
                                                               else ""), err=True)
    sys.stderr.flush()


def _drive(store: Any, settings: Any, rid: str) -> None:
    from ..host.fleet.rollout import Controller, summary_line

    raise_on_sigterm()
    outcome = Controller(store, settings, rid, on_change=_progress).run()
    line = summary_line(outcome)
    if outcome.ok:
        click.echo(line)
        return
    click.echo(f"error: {line}", err=True)
    sys.exit(1)


@fleet.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@_mqtt_options
@db_option
@click.option("--fleet", "fleet_name", required=True, help="The fleet to deploy to.")
@click.option("--devices", default=None, metavar="A,B,C",
              help="Deploy to these devices (default: every device of the fleet the store "
                   "knows), in this order.")
@click.option("--canary", type=int, default=1, show_default=True,
              help="Devices in the first wave; the rest wait until they are healthy.")
@click.option("--rate", default="constant:10", show_default=True,
              metavar="constant:N|exponential:BASE,FACTOR",
              help="Sizes of the waves after the canary.")
@click.option("--health-window", default="60s", show_default=True, metavar="DURATION",
              help="How long each device watches itself after the swap before it reports "
                   "healthy (error rate, p99 against the previous model's, memory, crashes).")
@click.option("--abort-failed", default="10%", show_default=True, metavar="PERCENT",
              help="Abort (and roll back every device that took it) when this share of the "
                   "targeted devices refused, failed or rolled back...")
@click.option("--abort-min", type=int, default=1, show_default=True,
              help="...and at least this many did.")
@click.option("--timeout", default="1h", show_default=True, metavar="DURATION",
              help="The rollout's deadline: an offline device gets its job when it "
                   "reconnects until then; later, it counts as timed out.")
@click.option("--url", "bundle_url", default=None, metavar="URL",
              help="Devices fetch the bundle from this HTTP(S) URL instead of MQTT chunks.")
@click.option("--allow-contract-change", is_flag=True,
              help="Let the new bundle change the model's input/output specs.")
@click.option("--max-error-rate", type=float, default=0.05, show_default=True,
              help="Health: most errors per request in the health window.")
@click.option("--max-p99-ratio", type=float, default=3.0, show_default=True,
              help="Health: most p99 latency as a multiple of the previous model's.")
@click.option("--chunk-bytes", type=click.IntRange(1024, 128 * 1024), default=128 * 1024,
              show_default=True, help="Bytes per MQTT chunk of the bundle archive.")
@click.option("--no-wait", is_flag=True,
              help="Record the rollout and print its id; run it with `fleet rollout ID "
                   "--resume`.")
@handle_errors
def deploy(bundle: Path, url: str | None, password_file: Path | None, ca_file: Path | None,
           cert_file: Path | None, key_file: Path | None, db: str, fleet_name: str,
           devices: str | None, canary: int, rate: str, health_window: str,
           abort_failed: str, abort_min: int, timeout: str, bundle_url: str | None,
           allow_contract_change: bool, max_error_rate: float, max_p99_ratio: float,
           chunk_bytes: int, no_wait: bool) -> None:
    """Deploy BUNDLE (a signed bundle folder or .tar.gz) to a fleet over MQTT in waves,
    gated by each device's fit check and health window, with automatic rollback."""
    from ..host.fleet.rollout import RolloutParams, parse_percent, start_rollout

    settings = _settings(url, password_file, ca_file, cert_file, key_file)
    params = RolloutParams(
        canary=canary, rate=rate,
        health_window_s=duration_s(health_window, option="--health-window"),
        abort_failed=parse_percent(abort_failed), abort_min=abort_min,
        timeout_s=duration_s(timeout, option="--timeout"), url=bundle_url,
        max_error_rate=max_error_rate, max_p99_ratio=max_p99_ratio,
        allow_contract_change=allow_contract_change, chunk_bytes=chunk_bytes).check()
    names = None if devices is None else [d.strip() for d in devices.split(",") if d.strip()]
    store = open_db(db)
    try:
        rid = start_rollout(store, bundle, fleet=fleet_name, devices=names, params=params)
        click.echo(rid)
        sys.stdout.flush()
        if not no_wait:
            _drive(store, settings, rid)
    finally:
        store.close()


@fleet.command()
@db_option
@click.option("--fleet", "fleet_name", default=None, help="Only this fleet's rollouts.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=20, show_default=True)
@handle_errors
def rollouts(db: str, fleet_name: str | None, limit: int) -> None:
    """The rollouts, newest first: id, fleet, release, state, devices healthy, started."""
    from rich.console import Console

    from ..host.fleet.report import rollouts_table

    store = open_db(db)
    try:
        rows = store.rollouts(fleet=fleet_name, limit=limit)
        Console(width=200).print(rollouts_table(store, rows))
    finally:
        store.close()


@fleet.command("rollout")
@click.argument("rollout_id")
@db_option
@_mqtt_options
@click.option("--abort", is_flag=True,
              help="Abort: devices not yet reached never get it, those that took it roll back.")
@click.option("--resume", is_flag=True,
              help="Run the rollout on from where it is (after its controller stopped).")
@handle_errors
def rollout(rollout_id: str, db: str, url: str | None, password_file: Path | None,
            ca_file: Path | None, cert_file: Path | None, key_file: Path | None,
            abort: bool, resume: bool) -> None:
    """One rollout: its state and each device's; --abort or --resume it."""
    from rich.console import Console

    from ..errors import ConfigError
    from ..host.fleet.report import rollout_devices_table
    from ..host.fleet.rollout import owner_alive, request_abort

    store = open_db(db)
    try:
        row = store.rollout(rollout_id)
        if row is None:
            raise ConfigError(f"rollout {rollout_id!r} is not in the store")
        if abort or resume:
            settings = _settings(url, password_file, ca_file, cert_file, key_file)
            if abort:
                request_abort(store, rollout_id)
                owner = str(row["owner"] or "")
                live = owner and owner_alive(owner) and row["heartbeat"] is not None \
                    and time.time() - float(row["heartbeat"]) < 30
                if live:  # its controller rolls back; don't take its connection
                    click.echo(f"rollout {rollout_id}: abort requested from {owner}")
                    return
            _drive(store, settings, rollout_id)
            return
        Console(width=200).print(rollout_devices_table(store, row))
    finally:
        store.close()
