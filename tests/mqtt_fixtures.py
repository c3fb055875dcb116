"""A real mosquitto broker for tests, configured with the fleet config host/ ships.

    def test_x(mqtt_broker):                      # session-scoped, TLS and plain listeners
        settings = mqtt_broker.settings("collector")
    def test_y(broker_factory):                   # a fresh broker of its own (kill it at will)
        b = broker_factory(); b.stop(); b.start()

The config is host/fleet/mosquitto/mosquitto.conf and its acl, with paths and ports moved
into a temporary folder; users get passwords from :func:`password_for`; the TLS listener's
certificate is signed by a CA made with openssl here. The shipped config makes every
client's id its username, so each user holds one connection at a time: collectors are
``collector``, ``collector-2``, ``collector-3`` (:data:`COLLECTORS`), clients
``client-app`` and ``client-app-2``, devices ``dev-0`` ... ``dev-11``, and ``deployer``.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from toma_edge.telemetry import PASSWORD_ENV, MqttSettings, mqtt_settings

MOSQUITTO = "/usr/sbin/mosquitto"
REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "host" / "fleet" / "mosquitto"
COLLECTORS = ["collector", "collector-2", "collector-3"]
USERS = [*COLLECTORS, "client-app", "client-app-2", "deployer",
         *(f"dev-{i}" for i in range(12))]


def password_for(user: str) -> str:
    """The test password of ``user``."""
    return f"pw-{user}-7Hq"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(pred: Callable[[], bool], timeout_s: float, what: str = "condition") -> None:
    """Poll ``pred`` every 50 ms; AssertionError naming ``what`` after ``timeout_s`` seconds."""
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


def make_pki(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate (openssl)."""
    folder.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
        "/CN=toma-edge test CA", "-keyout", "ca.key", "-out", "ca.crt")
    (folder / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name, cn in (("server", "localhost"), ("client", "dev-1")):
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}",
            "-keyout", f"{name}.key", "-out", f"{name}.csr")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-out", f"{name}.crt",
            *(["-extfile", "san.ext"] if name == "server" else []))
    # a second CA that signed nothing of ours
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
        "/CN=other CA", "-keyout", "other-ca.key", "-out", "other-ca.crt")
    return {n: folder / f"{n}" for n in (
        "ca.crt", "server.crt", "server.key", "client.crt", "client.key", "other-ca.crt")}


class Broker:
    """One mosquitto process with the shipped fleet config; survives stop/start (same
    ports, same persistence folder)."""

    def __init__(self, folder: Path, pki: dict[str, Path], users: list[str] = USERS) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "data").mkdir(exist_ok=True)
        self.port = free_port()
        self.tls_port = free_port()
        for name in ("ca.crt", "server.crt", "server.key"):
            shutil.copy(pki[name], folder / name)
        self.ca_file = pki["ca.crt"]
        self.pki = pki
        (folder / "passwd").write_text("".join(f"{u}:{password_for(u)}\n" for u in users))
        subprocess.run(["mosquitto_passwd", "-U", str(folder / "passwd")], check=True)
        shutil.copy(SHIPPED / "acl", folder / "acl")
        conf = (SHIPPED / "mosquitto.conf").read_text()
        for old, new in (
            ("/etc/mosquitto/toma-edge/", f"{folder}/"),
            ("/var/lib/mosquitto/toma-edge/", f"{folder}/data/"),
            ("listener 1883 127.0.0.1", f"listener {self.port} 127.0.0.1"),
            ("listener 8883\n", f"listener {self.tls_port} 127.0.0.1\n"),
        ):
            if old not in conf:
                raise AssertionError(f"shipped mosquitto.conf lost {old!r}; update the fixture")
            conf = conf.replace(old, new)
        # mosquitto started as root drops to user "mosquitto", which can't read our files
        conf += (f"\nuser {getpass.getuser()}\nlog_dest file {folder}/mosquitto.log\n"
                 "log_type all\n")
        self.conf = folder / "mosquitto.conf"
        self.conf.write_text(conf)
        self.proc: subprocess.Popen[bytes] | None = None
        self._collector_users: dict[str, str] = {}

    def collector_user(self, client_id: str) -> str:
        """The collector identity (username, so the broker's client id) that stands for
        ``client_id`` on this broker: the same one each time, a new one of
        :data:`COLLECTORS` for each new id (round robin)."""
        if client_id not in self._collector_users:
            used = len(self._collector_users)
            self._collector_users[client_id] = COLLECTORS[used % len(COLLECTORS)]
        return self._collector_users[client_id]

    def start(self, timeout_s: float = 10.0) -> None:
        """Start mosquitto and wait until both listeners accept connections."""
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        for port in (self.port, self.tls_port):
            while True:
                if self.proc.poll() is not None:
                    logf = self.folder / "mosquitto.log"
                    log = logf.read_text()[-2000:] if logf.exists() else "(no log)"
                    raise RuntimeError(f"mosquitto exited with {self.proc.returncode}: {log}")
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Send ``sig`` to the broker's PID and wait for it to exit (SIGTERM saves state)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=15)
        self.proc = None

    def url(self, user: str | None, *, tls: bool = False) -> str:
        """The MQTT URL for ``user`` (None: anonymous)."""
        at = f"{user}@" if user else ""
        if tls:
            return f"mqtts://{at}localhost:{self.tls_port}"
        return f"mqtt://{at}127.0.0.1:{self.port}"

    def settings(self, user: str | None, *, tls: bool = False, **kw: object) -> MqttSettings:
        """Settings for ``user`` with its password (and the CA for TLS)."""
        env = os.environ.pop(PASSWORD_ENV, None)
        try:
            if user:
                os.environ[PASSWORD_ENV] = password_for(user)
            if tls:
                kw.setdefault("ca_file", self.ca_file)
            return mqtt_settings(self.url(user, tls=tls), **kw)  # type: ignore[arg-type]
        finally:
            os.environ.pop(PASSWORD_ENV, None)
            if env is not None:
                os.environ[PASSWORD_ENV] = env

    def env(self, user: str) -> dict[str, str]:
        """An environment for a subprocess connecting as ``user``."""
        env = dict(os.environ)
        env[PASSWORD_ENV] = password_for(user)
        env["PYTHONPATH"] = str(REPO / "tests") + os.pathsep + env.get("PYTHONPATH", "")
        return env


def start_device(broker: Broker, *, device_id: str, spool: Path, count: int, rate_hz: float,
                 fleet: str = "test", log: Path | None = None) -> subprocess.Popen[bytes]:
    """Run tests/telemetry_device.py: a device process that spools telemetry until its
    seq reaches ``count`` (``rate_hz`` per second), delivers everything and exits 0."""
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
    return subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "telemetry_device.py"), "--mqtt",
         broker.url(device_id), "--fleet", fleet, "--device", device_id, "--spool", str(spool),
         "--count", str(count), "--rate", str(rate_hz)],
        env=broker.env(device_id), stdout=out, stderr=out)


def start_collector(broker: Broker, *, db: Path, client_id: str,
                    log: Path | None = None, share_group: str | None = None,
                    user: str | None = None) -> subprocess.Popen[bytes]:
    """Run ``toma-edge fleet collect`` as a process; returns once it is subscribed.

    The broker makes the username the client id, so each collector process needs an
    identity of its own: ``user`` (default :meth:`Broker.collector_user` of
    ``client_id``, the same for a restart with the same ``client_id``)."""
    out = open(log, "ab") if log else subprocess.PIPE  # noqa: SIM115
    group = ["--share-group", share_group] if share_group else []
    user = user or broker.collector_user(client_id)
    proc = subprocess.Popen(
        [sys.executable, "-m", "toma_edge.cli", "fleet", "collect", "--mqtt",
         broker.url(user), "--db", str(db), "--client-id", client_id, *group],
        env=broker.env(user), stdout=out, stderr=out)
    if log is not None:
        wait_until(lambda: "collecting from" in log.read_text(errors="replace")
                   or proc.poll() is not None, 20, "the collector to subscribe")
        if proc.poll() is not None:
            raise RuntimeError(f"collector exited: {log.read_text()[-2000:]}")
    return proc


@pytest.fixture(scope="session")
def mqtt_pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """CA, server and client certificates made by openssl for this test session."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def mqtt_broker(tmp_path_factory: pytest.TempPathFactory,
                mqtt_pki: dict[str, Path]) -> Iterator[Broker]:
    """mosquitto with the shipped fleet config on free 127.0.0.1 ports, for the session."""
    b = Broker(tmp_path_factory.mktemp("mosquitto"), mqtt_pki)
    b.start()
    yield b
    b.stop()


@pytest.fixture
def broker_factory(tmp_path: Path, mqtt_pki: dict[str, Path]) -> Iterator[Callable[[], Broker]]:
    """Fresh brokers of one test's own (stopped after it), for tests that stop brokers."""
    made: list[Broker] = []

    def make() -> Broker:
        b = Broker(tmp_path / f"broker{len(made)}", mqtt_pki)
        b.start()
        made.append(b)
        return b

    yield make
    for b in made:
        b.stop()
