"""One progress type for build, compress and run: phases with an optional count, steps,
and one-line messages.

    from toma_edge.progress import NullProgress, Progress

    class Lines(NullProgress):                       # print phases and messages, nothing else
        def phase(self, name: str, total: int | None = None) -> None:
            print(f"{name}...")

        def info(self, msg: str) -> None:
            print(msg)

    p: Progress = Lines()
    p.phase("inference", total=1000)                 # a phase of 1000 steps (None: unknown)
    p.advance(250)                                   # 250 steps done
    p.advance(250, total=2000)                       # the total became known or changed
    p.done()                                         # the phase finished
    p.info("bundle: dist/rpi4")

``toma_edge.host`` builds and compresses report through it, ``toma_edge.device.runner``
streams rows through it (one phase, ``inference``, advanced by rows), and the CLI's rich
reporter (``toma_edge.cli.progress.RichReporter``) implements it. A phase ends at the next
:meth:`Progress.phase` or at :meth:`Progress.done`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

__all__ = ["Progress", "NullProgress", "as_progress"]


@runtime_checkable
class Progress(Protocol):
    """What a long operation tells the person waiting for it."""

    def phase(self, name: str, total: int | None = None) -> None:
        """A new phase ``name`` starts (the previous one is done); ``total``: its steps."""

    def advance(self, n: int = 1, total: int | None = None) -> None:
        """``n`` more steps of the current phase are done; ``total`` updates its steps."""

    def done(self) -> None:
        """The current phase finished."""

    def info(self, msg: str) -> None:
        """A one-line message (a chosen variant, a table row)."""


class NullProgress:
    """A :class:`Progress` that shows nothing; subclass it and override what you show."""

    def phase(self, name: str, total: int | None = None) -> None:
        return None

    def advance(self, n: int = 1, total: int | None = None) -> None:
        return None

    def done(self) -> None:
        return None

    def info(self, msg: str) -> None:
        return None


def as_progress(progress: Progress | None) -> Progress:
    """``progress``, or a :class:`NullProgress` for None."""
    return NullProgress() if progress is None else progress
