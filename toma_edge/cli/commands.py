"""The root ``toma-edge`` group and the model commands: targets, build, wheels, inspect,
serve, compress, run (``toma-edge fleet ...`` lives in :mod:`toma_edge.cli.fleet`).

    toma-edge build --target rpi --out dist/rpi4 --archive
    toma-edge inspect dist/rpi4 --json
    toma-edge run dist/rpi4 -i rows.npy -o out.npy --budget 512MiB

Every TomaEdgeError (and click usage error) becomes one line on stderr and exit code 2
(:mod:`toma_edge.cli.errors`); ``--debug`` shows the traceback. Host and device modules are
imported inside commands, so ``toma-edge run`` never loads the training stack.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .. import __version__
from . import rollout  # noqa: F401  (its commands register on the fleet group)
from .errors import handle_errors, raise_on_sigterm
from .fleet import fleet
from .progress import RichReporter


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="toma-edge")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
def main(debug: bool) -> None:
    """toma-edge: build memory-budgeted PyTorch models for edge devices, run and serve
    them, and watch the fleet."""


@main.command()
@handle_errors
def targets() -> None:
    """List the target device profiles."""
    from rich.console import Console
    from rich.table import Table

    from ..budget import format_size
    from ..profiles import list_profiles

    t = Table(title="toma-edge targets")
    for col in ("name", "aliases", "arch", "cpu", "cores", "RAM", "inference budget",
                "baseline", "storage", "train budget", "threads", "OS floor"):
        t.add_column(col)
    for p in list_profiles():
        t.add_row(
            p.name, ", ".join(p.aliases), p.arch, p.cpu, str(p.cores), format_size(p.ram_bytes),
            format_size(p.memory_budget_bytes),
            ", ".join(f"{k} {format_size(v)}" for k, v in p.baseline_rss_bytes.items()),
            format_size(p.storage_budget_bytes),
            format_size(p.train_budget_bytes) if p.train_budget_bytes else "-",
            str(p.threads), f"{p.os.distro}; glibc {p.os.glibc}; Python {p.os.python}",
        )
    console = Console()
    if not console.is_terminal:  # piped: don't squeeze the table into 80 columns
        console = Console(width=200)
    console.print(t)


main.add_command(fleet)


@main.command()
@click.option("--target", "-t", default="rpi", show_default=True,
              help="Target profile name or alias (see `toma-edge targets`).")
@click.option("--project", "-p", type=click.Path(dir_okay=False), default=None,
              help="Project file (toma-edge.yaml) of your own model; default: the built-in "
                   "example.")
@click.option("--out", "-o", type=click.Path(file_okay=False), default=None,
              help="Bundle folder [default: dist/<canonical target>/].")
@click.option("--storage-budget", default=None,
              help="Model storage budget, e.g. 8MiB [default: the target's].")
@click.option("--latency-budget", type=float, default=None,
              help="Batch-1 latency budget in milliseconds, measured on this host.")
@click.option("--train-budget", default=None,
              help="Training memory budget, e.g. 1GiB [default: the target's].")
@click.option("--memory-log", type=click.Path(dir_okay=False), default=None,
              help="Write RSS over time as JSONL here (and a PNG beside it).")
@click.option("--sign-key", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Ed25519 private key (PEM, PKCS#8): also write manifest.sig.")
@click.option("--archive", is_flag=True, help="Also write <out>.tar.gz of the bundle.")
@click.option("--wheels", "wheels_dir", type=click.Path(file_okay=False), default=None,
              help="Also write the device's wheels for the target (see `toma-edge wheels`) into "
                   "this folder.")
@handle_errors
def build(target: str, project: str | None, out: str | None, storage_budget: str | None,
          latency_budget: float | None, train_budget: str | None, memory_log: str | None,
          sign_key: str | None, archive: bool, wheels_dir: str | None) -> None:
    """Train, compress, export and verify a model; write its bundle."""
    from ..host.pipeline import build as run_build

    rep = RichReporter()
    try:
        res = run_build(target=target, project=project, out=out, storage_budget=storage_budget,
                        latency_budget_ms=latency_budget, train_budget=train_budget,
                        memory_log=memory_log, sign_key=sign_key, archive=archive,
                        progress=rep)
    except BaseException:
        rep.stop()  # the phase that failed is not marked done
        raise
    rep.done()
    for line in res.summary:
        click.echo(line)
    click.echo(f"bundle: {res.out}" + (f" (archive {res.archive})" if res.archive else ""))
    if wheels_dir:
        _write_wheels(target, wheels_dir)


def _write_wheels(target: str, out: str) -> None:
    from rich.console import Console

    from ..host.wheels import write_wheels

    console = Console(stderr=True)
    with console.status("device wheels") as status:
        ws = write_wheels(target, out, progress=lambda m: status.update(f"device wheels: {m}"))
    for line in ws.summary():
        click.echo(line)


@main.command()
@click.option("--target", "-t", default="rpi", show_default=True,
              help="Target profile name or alias.")
@click.option("--out", "-o", type=click.Path(file_okay=False), required=True,
              help="Folder for the wheels.")
@handle_errors
def wheels(target: str, out: str) -> None:
    """Write the wheels a device of TARGET installs from, with no build tools and no index:
    `pip install --no-index --find-links DIR toma-edge` (no torch, no executorch)."""
    _write_wheels(target, out)


@main.command()
@click.argument("bundle", type=click.Path())
@click.option("--trust-key", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Ed25519 public key (PEM): require a valid signature.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@handle_errors
def inspect(bundle: str, trust_key: str | None, as_json: bool) -> None:
    """Show a bundle's manifest and verify its files (and signature)."""
    from ..device.bundle import describe

    text = describe(Path(bundle), trust_key=trust_key, as_json=as_json)
    click.echo(text)


@main.command()
@click.argument("bundle", type=click.Path())
@click.option("--http", "http", default="127.0.0.1:8080", show_default=True,
              help="HOST:PORT to serve HTTP on; 'off' for MQTT only.")
@click.option("--mqtt", default=None,
              help="Broker URL (mqtt://USER@host[:port], mqtts:// for TLS): inference requests and"
                   " telemetry; password from TOMA_EDGE_MQTT_PASSWORD.")
@click.option("--device-id", default=None,
              help="This device's id in topics [default: the hostname].")
@click.option("--fleet", default="default", show_default=True, help="Fleet name in topics.")
@click.option("--budget", default=None,
              help="Peak RSS of the whole process, e.g. 512MiB [default: the bundle target's].")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="XNNPACK threads [default: the target's, at most this machine's CPUs].")
@click.option("--telemetry-interval", type=click.FloatRange(min=0, min_open=True), default=10.0,
              show_default=True,
              help="Seconds per telemetry message.")
@click.option("--spool", type=click.Path(dir_okay=False), default=None,
              help="Telemetry spool file [default: "
                   "~/.local/state/toma-edge/<fleet>-<device>.spool.db].")
@click.option("--admin-token-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="File with the bearer token that POST /v1/model needs (off without it).")
@click.option("--trust-key", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Ed25519 public key (PEM): serve only bundles it signed.")
@click.option("--password-file", type=click.Path(dir_okay=False), default=None,
              help="File with the MQTT password [default: $TOMA_EDGE_MQTT_PASSWORD]; never on the "
                   "command line.")
@click.option("--ca-file", type=click.Path(dir_okay=False), default=None,
              help="CA certificate (PEM) of an mqtts:// broker [default: the system's CAs].")
@click.option("--cert-file", type=click.Path(dir_okay=False), default=None,
              help="Client certificate (PEM), where the broker asks for one.")
@click.option("--key-file", type=click.Path(dir_okay=False), default=None,
              help="Private key (PEM) of --cert-file.")
@click.option("--request-timeout", type=click.FloatRange(min=0.1), default=10.0, show_default=True,
              help="Seconds a client may take to send a request's head (and, scaled by size, its "
                   "body).")
@click.option("--idle-timeout", type=click.FloatRange(min=0.1), default=5.0, show_default=True,
              help="Seconds an idle keep-alive HTTP connection stays open.")
@click.option("--max-connections", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Open HTTP connections at most; beyond it the longest-idle one is closed.")
@handle_errors
def serve(bundle: str, http: str, mqtt: str | None, device_id: str | None, fleet: str,
          budget: str | None, threads: int | None, telemetry_interval: float, spool: str | None,
          admin_token_file: str | None, trust_key: str | None, password_file: str | None,
          ca_file: str | None, cert_file: str | None, key_file: str | None,
          request_timeout: float, idle_timeout: float, max_connections: int) -> None:
    """Serve a bundle over HTTP (and MQTT) until SIGTERM; SIGHUP reloads BUNDLE."""
    from ..device.service import ServiceConfig
    from ..device.service import serve as run_service

    cfg = ServiceConfig(
        bundle=bundle, http=None if http.lower() in ("off", "none", "") else http, mqtt=mqtt,
        device_id=device_id, fleet=fleet, budget=budget, threads=threads,
        telemetry_interval_s=telemetry_interval, spool=spool,
        admin_token_file=admin_token_file, trust_key=trust_key, mqtt_password_file=password_file,
        mqtt_ca_file=ca_file, mqtt_cert_file=cert_file, mqtt_key_file=key_file,
        request_timeout_s=request_timeout, idle_timeout_s=idle_timeout,
        max_connections=max_connections,
    )
    sys.exit(run_service(cfg))


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--target", "-t", default="rpi", show_default=True,
              help="Target profile name or alias (see `toma-edge targets`).")
@click.option("--project", "-p", type=click.Path(dir_okay=False), default=None,
              help="Project file giving the data, the model factory (for a state_dict) and "
                   "compress: settings; default: the built-in example.")
@click.option("--out", "-o", type=click.Path(file_okay=False), default=None,
              help="Bundle folder [default: dist/<canonical target>/].")
@click.option("--storage-budget", default=None,
              help="Model storage budget, e.g. 8MiB [default: the target's].")
@click.option("--latency-budget", type=float, default=None,
              help="Batch-1 latency budget in milliseconds, measured on this host.")
@handle_errors
def compress(model: str, target: str, project: str | None, out: str | None,
             storage_budget: str | None, latency_budget: float | None) -> None:
    """Search compression variants of a saved model (torch.save of the module or a
    state_dict) and write the bundle of the smallest that fits the target."""
    from ..host.pipeline import compress_saved

    rep = RichReporter()
    try:
        res = compress_saved(model, target=target, project=project, out=out,
                             storage_budget=storage_budget, latency_budget_ms=latency_budget,
                             progress=rep)
    except BaseException:
        rep.stop()
        raise
    rep.done()
    for line in res.summary:
        click.echo(line)
    click.echo(f"bundle: {res.out}")


@main.command("run")
@click.argument("bundle", type=click.Path())
@click.option("--input", "-i", "input_", required=True,
              help="Rows to run: a .csv, .npy or .jsonl file, or - for stdin.")
@click.option("--output", "-o", required=True,
              help="Where outputs go: .csv, .npy or .jsonl, or - for stdout.")
@click.option("--format", "fmt", type=click.Choice(["csv", "npy", "jsonl"]), default=None,
              help="Format of - (stdin/stdout) and of files without a known extension [default: "
                   "csv].")
@click.option("--budget", default=None,
              help="Peak RSS budget of the whole process, e.g. 512MiB [default: the target's].")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="XNNPACK threads [default: the target's, at most this machine's CPUs].")
@click.option("--skip-bad", is_flag=True,
              help="Skip and count bad rows instead of stopping at the first.")
@click.option("--trust-key", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Ed25519 public key (PEM): require a valid signature.")
@handle_errors
def run_rows(bundle: str, input_: str, output: str, fmt: str | None, budget: str | None,
             threads: int | None, skip_bad: bool, trust_key: str | None) -> None:
    """Streamed batch inference over a file or stdin, within the memory budget.

    An output file appears only when the run finished (a failed or interrupted run
    leaves it as it was); an output that is the input file is refused. Bad rows stop
    the run (exit 2, one line naming the line); --skip-bad skips and counts them."""
    from ..device.runner import run as run_stream

    raise_on_sigterm()
    bar = RichReporter(plain_lines=False, rate_unit="rows", transient=True)
    try:
        s = run_stream(bundle, input_, output, fmt=fmt, budget=budget, threads=threads,
                       skip_bad=skip_bad, trust_key=trust_key, progress=bar)
    finally:
        bar.stop()
    for line in s.lines():
        click.echo(line, err=True)
