"""A real PostgreSQL 15 server for tests and the telemetry bench (no mocks).

    from pg_fixtures import PgServer, pg_server, pg_url   # noqa: F401 (fixtures)
    def test_x(pg_url):                  # a fresh database on the session's server
        store = open_store(pg_url)
    srv = PgServer.start_new(fsync=True); url = srv.create_db("bench"); srv.stop()

``initdb`` and ``pg_ctl`` from /usr/lib/postgresql/15/bin (Debian's postgresql-15) run as
an unprivileged user: as root (the test machines) through ``runuser -u postgres``, with
the data folder in a temporary folder that user owns; otherwise as the current user. The
server listens on a free 127.0.0.1 port and its own socket folder, trusts local
connections except the role ``fleet_pw`` (scram-sha-256, password
:data:`PW_ROLE_PASSWORD`), and is stopped after the session.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

PG_BIN = Path(os.environ.get("TOMA_EDGE_PG_BIN", "/usr/lib/postgresql/15/bin"))
PW_ROLE = "fleet_pw"
PW_ROLE_PASSWORD = "pw-fleet-Zq8"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_pg_user(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


class PgServer:
    """One PostgreSQL server in its own temporary folder (``fsync=False`` for fast tests;
    the bench keeps fsync on, as SQLite's synchronous=FULL)."""

    role_password = PW_ROLE_PASSWORD

    def __init__(self, *, fsync: bool = False) -> None:
        if not (PG_BIN / "initdb").exists():
            # scripts/test.sh installs it: a missing server is a broken setup, not a pass
            raise RuntimeError(f"PostgreSQL binaries not found in {PG_BIN}; run "
                               "scripts/test.sh (apt-get install postgresql)")
        self.folder = Path(tempfile.mkdtemp(prefix="toma-edge-pg-"))
        self.data = self.folder / "data"
        self.log = self.folder / "server.log"
        self.port = _free_port()
        self.fsync = fsync
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres", "postgres")
        self._run([str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres",
                   "-E", "UTF8", "--locale=C", "--no-sync", "--auth-local=trust",
                   "--auth-host=trust"])
        hba = self.data / "pg_hba.conf"
        text = hba.read_text()
        # the password role first: pg_hba.conf is read top down
        hba.write_text(f"host all {PW_ROLE} 127.0.0.1/32 scram-sha-256\n" + text)

    def _run(self, cmd: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(_as_pg_user(cmd), capture_output=True, text=True, check=check,
                              cwd=self.folder, timeout=120)

    def start(self) -> None:
        """Start (or restart) the server; returns once it accepts connections."""
        opts = (f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 "
                f"-c max_connections=200 -c fsync={'on' if self.fsync else 'off'} "
                f"-c synchronous_commit={'on' if self.fsync else 'off'} "
                "-c full_page_writes=" + ("on" if self.fsync else "off"))
        r = self._run([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log),
                       "-o", opts, "-w", "-t", "60", "start"], check=False)
        if r.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed: {r.stderr}\n{self.log_tail()}")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``mode``: smart, fast, immediate)."""
        self._run([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w",
                   "stop"], check=False)

    def log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def url(self, db: str = "postgres", user: str = "postgres") -> str:
        """``postgresql://user@127.0.0.1:port/db``."""
        return f"postgresql://{user}@127.0.0.1:{self.port}/{db}"

    def create_db(self, name: str | None = None) -> str:
        """A new empty database; returns its URL."""
        import psycopg

        name = name or f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def create_password_role(self, db: str) -> str:
        """The role ``fleet_pw`` (password :data:`PW_ROLE_PASSWORD`) owning database ``db``;
        returns the URL without password (give it through PGPASSWORD)."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as c:
            exists = c.execute("SELECT 1 FROM pg_roles WHERE rolname = %s",
                               (PW_ROLE,)).fetchone()
            if not exists:
                c.execute(f"CREATE ROLE {PW_ROLE} LOGIN PASSWORD '{PW_ROLE_PASSWORD}'")
            c.execute(f'ALTER DATABASE "{db}" OWNER TO {PW_ROLE}')
        return self.url(db, PW_ROLE)

    def cleanup(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.folder, ignore_errors=True)

    @classmethod
    def start_new(cls, *, fsync: bool = False) -> PgServer:
        srv = cls(fsync=fsync)
        srv.start()
        return srv


def wait_accepting(url: str, timeout_s: float = 30.0) -> None:
    """Poll until ``url`` accepts a connection."""
    import psycopg

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            psycopg.connect(url, connect_timeout=2).close()
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """PostgreSQL 15 on a free 127.0.0.1 port for the session (fsync off: tests only)."""
    srv = PgServer.start_new(fsync=False)
    yield srv
    srv.cleanup()


@pytest.fixture
def pg_url(pg_server: PgServer) -> str:
    """A fresh, empty database on the session's server."""
    return pg_server.create_db()


@pytest.fixture
def pg_factory() -> Iterator[type[PgServer]]:
    """Servers of one test's own (stop and start them at will), cleaned up after."""
    made: list[PgServer] = []

    class _Made(PgServer):
        def __init__(self, *, fsync: bool = False) -> None:
            super().__init__(fsync=fsync)
            made.append(self)

    yield _Made
    for s in made:
        s.cleanup()
