"""How every ``toma-edge`` command fails: one line on stderr and exit code 2.

    @main.command()
    @handle_errors
    def inspect(bundle: str) -> None:
        raise BundleError(f"{bundle}: no manifest.json")   # -> "error: ...", exit 2

A TomaEdgeError (and a missing host-only module in a lean install) becomes one line and exit
code 2; ``--debug`` on the root command shows the traceback instead. Ctrl-C exits 130,
SIGTERM (after :func:`raise_on_sigterm`) 143, with ``finally`` blocks run on the way out.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import click

from ..errors import TomaEdgeError

__all__ = ["handle_errors", "fail", "Terminated", "raise_on_sigterm"]

F = TypeVar("F", bound=Callable[..., Any])


def fail(msg: str) -> NoReturn:
    """``error: msg`` on stderr, exit code 2."""
    click.echo(f"error: {msg}", err=True)
    sys.exit(2)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that ``finally`` blocks clean up (a run's
    temporary output file goes) before the exit."""


def raise_on_sigterm() -> None:
    """Make SIGTERM raise :class:`Terminated` in the main thread (no-op in other threads)."""
    import signal
    import threading

    def on_term(signum: int, frame: object) -> None:
        raise Terminated()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_term)


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
            fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
        except ModuleNotFoundError as e:
            from ..extras import HOST_ONLY

            if debug or (e.name or "").split(".")[0] not in HOST_ONLY:
                raise
            fail(f"this command needs the host install (training, compression, export): "
                 f"pip install 'toma-edge[host]' (missing module '{e.name}')")
        except Terminated:
            click.echo("terminated", err=True)
            sys.exit(143)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]
