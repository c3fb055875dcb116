"""A device's releases on disk: release folders, ``current``/``previous`` symlinks, the
pending marker of a swap still on probation, and what each rollout reached.

    from toma_edge.device.releases import Releases
    rel = Releases.for_service("/var/lib/toma-edge/current", spool="/var/lib/toma-edge/spool.db",
                               fleet="plant-7", device_id="pi-0042")
    rel.current()                      # the release folder serving now (or None)
    rel.switch(new_folder)             # previous -> what current named, current -> new (atomic)
    rel.write_pending({"rollout_id": "r-1", "crashes": 0, ...})
    rel.remember("r-1", "install", "rollout.healthy")

Layout. When the service's bundle path is a symlink (``/var/lib/toma-edge/current``, as
``device/systemd/install.sh`` makes it), its folder is the *state folder* and release
folders go where the symlink points (``releases/``). Otherwise the state folder is
``<spool folder>/<fleet>-<device>.releases`` with ``releases/`` inside, and once a rollout
installed something there, ``current`` in it is what the service serves at its next start.

- ``releases/<version>-<sha8>/``: one unpacked, verified bundle each, renamed into place
  whole (unpacked beside it in a ``.tmp-*`` folder first), never modified afterwards;
- ``current``, ``previous``: symlinks, switched with ``os.replace`` (atomic);
- ``rollouts/pending.json``: written at a swap, removed once its health window passed or it
  was rolled back; each start of the service while it exists counts one crash;
- ``rollouts/state.json``: per rollout id and action, the final state reached (a job seen
  again after a restart is never run twice);
- ``rollouts/<rollout_id>/``: its download (chunk files, the archive), removed at the end.

Every write is a temp file + fsync + rename. No torch here.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from ..errors import ConfigError, InputError
from ..jsonio import dumps, loads

__all__ = ["Releases", "release_name"]

_MAX_STATE_BYTES = 4 << 20


def release_name(version: str, sha256: str) -> str:
    """The folder name of a release: its version (unsafe characters replaced) and the
    first 8 hex digits of its archive's sha256."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", version)[:100].lstrip(".") or "release"
    return f"{safe}-{sha256[:8]}"


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Releases:
    """The state folder ``state`` and release folder ``releases`` of one device."""

    def __init__(self, state: str | Path, releases: str | Path, *,
                 current_name: str = "current") -> None:
        self.state = Path(state)
        self.releases = Path(releases)
        self.current_name = current_name
        self.rollouts = self.state / "rollouts"
        for d in (self.state, self.releases, self.rollouts):
            try:
                d.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ConfigError(f"cannot create the rollout folder {str(d)!r}: "
                                  f"{e.strerror or e}") from e

    @classmethod
    def for_service(cls, bundle: str | Path, *, spool: str | Path, fleet: str,
                    device_id: str) -> Releases:
        """The layout for a service started on ``bundle`` (see the module docstring)."""
        link = Path(bundle)
        if link.is_symlink():
            return cls(link.absolute().parent, link.resolve().parent, current_name=link.name)
        state = Path(spool).absolute().parent / f"{fleet}-{device_id}.releases"
        return cls(state, state / "releases")

    # -- symlinks ---------------------------------------------------------------------------
    @property
    def current_link(self) -> Path:
        return self.state / self.current_name

    @property
    def previous_link(self) -> Path:
        return self.state / ("previous" if self.current_name == "current"
                             else f"{self.current_name}.previous")

    def _target(self, link: Path) -> Path | None:
        if not link.is_symlink():
            return None
        return link.resolve()

    def current(self) -> Path | None:
        """The folder ``current`` names (None without one)."""
        return self._target(self.current_link)

    def previous(self) -> Path | None:
        """The folder ``previous`` names, if it still exists."""
        p = self._target(self.previous_link)
        return p if p is not None and p.is_dir() else None

    def _point(self, link: Path, folder: Path) -> None:
        folder = Path(folder).absolute()
        try:
            target = os.path.relpath(folder, link.parent)
        except ValueError:
            target = str(folder)
        new = link.with_name(f".{link.name}.new-{os.getpid()}")
        new.unlink(missing_ok=True)
        new.symlink_to(target)
        os.replace(new, link)  # atomic: the link always names a whole release

    def switch(self, new: Path, *, serving: Path) -> None:
        """Make ``new`` current and ``serving`` (what served until now) previous."""
        self._point(self.previous_link, serving)
        self._point(self.current_link, new)

    def back(self, to: Path) -> None:
        """Make ``to`` current again (a rollback) and drop ``previous``."""
        self._point(self.current_link, to)
        self.previous_link.unlink(missing_ok=True)

    # -- release folders ------------------------------------------------------------------
    def temp_folder(self, rollout_id: str) -> Path:
        """A fresh folder beside the releases to unpack into (same file system: renamed)."""
        tmp = self.releases / f".tmp-{rollout_id}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        return tmp

    def keep(self, tmp: Path, name: str) -> Path:
        """Rename the verified folder ``tmp`` to ``releases/<name>`` (an existing release
        of that name, complete by construction, is kept and ``tmp`` dropped)."""
        dest = self.releases / name
        if dest.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
            return dest
        os.replace(tmp, dest)
        return dest

    def prune(self, keep: int = 3) -> list[Path]:
        """Remove release folders beyond the newest ``keep`` (by mtime), never ``current``
        or ``previous``; returns what was removed."""
        used = {p for p in (self.current(), self.previous()) if p is not None}
        folders = sorted((p for p in self.releases.iterdir()
                          if p.is_dir() and not p.name.startswith(".")),
                         key=lambda p: p.stat().st_mtime, reverse=True)
        gone = [p for p in folders[keep:] if p.resolve() not in used]
        for p in gone:
            shutil.rmtree(p, ignore_errors=True)
        return gone

    def clean_temp(self) -> None:
        """Remove half-unpacked folders a killed process left behind."""
        for p in self.releases.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)

    # -- pending marker --------------------------------------------------------------------
    @property
    def pending_path(self) -> Path:
        return self.rollouts / "pending.json"

    def read_pending(self) -> dict[str, Any] | None:
        """The pending marker, or None (an unreadable one is dropped: None)."""
        try:
            raw = self.pending_path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            data = loads(raw, what="pending.json")
        except InputError:
            self.pending_path.unlink(missing_ok=True)
            return None
        return data if isinstance(data, dict) else None

    def write_pending(self, marker: dict[str, Any]) -> None:
        _write_atomic(self.pending_path, dumps(marker))

    def clear_pending(self) -> None:
        self.pending_path.unlink(missing_ok=True)

    # -- rollout outcomes ------------------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return self.rollouts / "state.json"

    def _state(self) -> dict[str, Any]:
        try:
            raw = self.state_path.read_bytes()[:_MAX_STATE_BYTES]
            data = loads(raw, what="state.json")
        except (FileNotFoundError, InputError):
            return {}
        return data if isinstance(data, dict) else {}

    def outcome(self, rollout_id: str, action: str) -> dict[str, Any] | None:
        """What ``action`` of ``rollout_id`` reached here (``{"state": kind, ...}``) or None."""
        got = self._state().get(rollout_id, {}).get(action)
        return got if isinstance(got, dict) else None

    def remember(self, rollout_id: str, action: str, state: str, **extra: Any) -> None:
        """Record that ``action`` of ``rollout_id`` reached ``state``."""
        data = self._state()
        data.setdefault(rollout_id, {})[action] = {"state": state, "ts": time.time(), **extra}
        if len(data) > 1000:  # keep the newest 1000 rollouts
            for rid in sorted(data, key=lambda r: max(
                    (v.get("ts", 0) for v in data[r].values()), default=0))[:len(data) - 1000]:
                del data[rid]
        _write_atomic(self.state_path, dumps(data))

    def download_folder(self, rollout_id: str) -> Path:
        d = self.rollouts / rollout_id
        d.mkdir(parents=True, exist_ok=True)
        return d

    def drop_download(self, rollout_id: str) -> None:
        with contextlib.suppress(OSError):
            shutil.rmtree(self.rollouts / rollout_id)
