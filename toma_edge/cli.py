"""The ``toma-edge`` command line: thin, it parses, calls one library function, formats.

Every TomaEdgeError (and click usage error) becomes one line on stderr and exit code 2;
``--debug`` shows the traceback. Host and device modules are imported inside commands,
so ``toma-edge run`` never loads the training stack.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from . import __version__
from .errors import TomaEdgeError

F = TypeVar("F", bound=Callable[..., Any])


def _fail(msg: str) -> None:
    click.echo(f"error: {msg}", err=True)
    sys.exit(2)


def handle_errors(fn: F) -> F:
    """Turn our errors into one line and exit 2 (traceback only with --debug)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ctx = click.get_current_context()
        debug = bool(ctx.find_root().params.get("debug"))
        try:
            return fn(*args, **kwargs)
        except TomaEdgeError as e:
            if debug:
                raise
            _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


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

    from .budget import format_size
    from .profiles import list_profiles

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
    Console(width=200).print(t)


from .cli_fleet import fleet  # noqa: E402  (after main and handle_errors, which it uses)

main.add_command(fleet)


if __name__ == "__main__":  # pragma: no cover
    main()
