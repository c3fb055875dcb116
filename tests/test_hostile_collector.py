"""No message blocks the collector (issue 12, classes 2 and 3), on a real mosquitto.

    pytest -q tests/test_hostile_collector.py                          # bounded examples
    pytest -q tests/test_hostile_collector.py --hypothesis-profile=long  # a deeper search

A payload that fails the strict schema and a record the database refuses are dead
letters: kept raw with their reason in ``rejects``, counted, acknowledged (a collector
restarted on its persistent session does not get them again), never retried; every
valid message around them is stored exactly once. Only an unavailable store is retried,
with backoff, logged once per outage, and ``stop`` interrupts the backoff.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from mqtt_fixtures import Broker, wait_until
from pg_fixtures import pg_server, pg_url  # noqa: F401 (fixtures)

from toma_edge.errors import TelemetryError
from toma_edge.host.fleet.collector import Collector
from toma_edge.host.fleet.store import FleetStore, open_store
from toma_edge.telemetry import (
    EventMessage,
    Kind,
    StatusMessage,
    TelemetryMessage,
    decode,
    make_client,
    topic,
)

pytestmark = pytest.mark.slow

SESSION_S = 600  # persistent sessions: the broker keeps our queue while we restart


def _publisher(broker: Broker, user: str) -> Any:
    c = make_client(broker.settings(user), client_id=user)
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    return c


def _publish(client: Any, t: str, payload: bytes) -> None:
    info = client.publish(t, payload, qos=1)
    info.wait_for_publish(10)
    assert info.is_published(), f"broker did not take a message on {t}"


def _tel(seq: int) -> bytes:
    return TelemetryMessage(seq=seq, ts=time.time(), window_s=1.0, requests=1).encode()


def _refuse_in_database(db: str, device: str, seq: int) -> None:
    """Make the database itself refuse one telemetry record (a rule a DBA could add): a
    trigger in SQLite, a CHECK constraint in PostgreSQL. Nothing in the collector knows."""
    open_store(db).close()  # create the tables first
    if db.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(db, autocommit=True) as c:
            c.execute(f"ALTER TABLE telemetry ADD CONSTRAINT poison CHECK "
                      f"(NOT (device_id = '{device}' AND seq = {seq}))")
        return
    con = sqlite3.connect(db)
    con.execute(f"CREATE TRIGGER poison BEFORE INSERT ON telemetry WHEN NEW.device_id = "
                f"'{device}' AND NEW.seq = {seq} BEGIN SELECT RAISE(ABORT, "
                f"'seq {seq} of {device} refused by policy'); END")
    con.commit()
    con.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_poison_messages_dead_lettered_acked_and_not_redelivered(
        backend: str, broker_factory: Callable[[], Broker], tmp_path: Path,
        request: pytest.FixtureRequest) -> None:
    """The issue's poison (seq 2**63) and a record the database refuses, then valid
    messages of other devices: all valid ones stored once, both poisons in ``rejects``
    and acknowledged; a collector restarted on the same session is not stuck and does
    not get them again."""
    db = str(tmp_path / "f.db") if backend == "sqlite" else request.getfixturevalue("pg_url")
    _refuse_in_database(db, "dev-9", 13)
    broker = broker_factory()
    col = Collector(broker.settings("collector"), db=db, client_id="collector",
                    session_expiry_s=SESSION_S).start()
    try:
        dev9 = _publisher(broker, "dev-9")
        poison = (b'{"v":1,"seq":9223372036854775808,"ts":1700000000.0,"window_s":1.0}')
        _publish(dev9, topic("p", "dev-9", "telemetry"), poison)       # refused by decoding
        refused = _tel(13)
        _publish(dev9, topic("p", "dev-9", "telemetry"), refused)      # refused by the database
        _publish(dev9, topic("p", "dev-9", "telemetry"), _tel(14))
        others = {f"dev-{i}": _publisher(broker, f"dev-{i}") for i in (1, 2)}
        for dev, c in others.items():
            for s in (1, 2, 3):
                _publish(c, topic("p", dev, "telemetry"), _tel(s))
        wait_until(lambda: col.stats.stored >= 7, 20, "the seven valid messages")
        wait_until(lambda: col.stats.queued == 0, 10, "every message committed")
        assert col.store.seqs("p", "dev-1") == [1, 2, 3] == col.store.seqs("p", "dev-2")
        assert col.store.seqs("p", "dev-9") == [14]
        cs = col.stats
        assert (cs.received, cs.stored, cs.rejected, cs.dead_lettered, cs.retries) == (
            9, 7, 1, 1, 0)
        assert cs.last_commit_at is not None and abs(cs.last_commit_at - time.time()) < 60
        letters = {bytes(r["payload"]): r for r in col.store.rejects()}
        assert set(letters) == {poison, refused}
        assert "64-bit" in letters[poison]["reason"]
        assert "refused" in letters[refused]["reason"] or "poison" in letters[refused]["reason"]
        for r in letters.values():
            assert (r["fleet"], r["device_id"], r["topic"]) == (
                "p", "dev-9", "toma-edge/v1/p/dev-9/telemetry")
            assert "\n" not in r["reason"]
        row = [d for d in col.store.devices() if d.device_id == "dev-9"][0]
        assert row.rejected == 2
    finally:
        col.stop()
    # while no collector runs, the session queues one more message
    _publish(others["dev-1"], topic("p", "dev-1", "telemetry"), _tel(4))
    col = Collector(broker.settings("collector"), db=db, client_id="collector",
                    session_expiry_s=SESSION_S).start()
    try:
        wait_until(lambda: col.store.seqs("p", "dev-1") == [1, 2, 3, 4], 15, "the queued one")
        _publish(others["dev-2"], topic("p", "dev-2", "telemetry"), _tel(4))
        wait_until(lambda: col.store.seqs("p", "dev-2") == [1, 2, 3, 4], 15, "a new one")
        time.sleep(0.5)
        # only the two new messages came: neither poison was redelivered
        assert (col.stats.received, col.stats.rejected, col.stats.dead_lettered) == (2, 0, 0)
        assert col.store.count("rejects") == 2
    finally:
        col.stop()
        for c in (dev9, *others.values()):
            c.disconnect()
            c.loop_stop()


def test_loose_types_and_a_missing_version_never_displace_the_real_message(
        broker_factory: Callable[[], Broker], tmp_path: Path) -> None:
    """Issue 12, class 2 over the wire: "seq": "5", 5.0 or true and a message without "v"
    are dead letters; the device's real seq 5 that follows is the one stored."""
    mqtt_broker = broker_factory()  # no retained status of other tests' devices
    pub = _publisher(mqtt_broker, "dev-8")
    t = topic("loose", "dev-8", "telemetry")
    real = json.loads(_tel(5))
    real["rss_bytes"] = 123
    fakes = [json.dumps({**real, "seq": "5", "rss_bytes": 1}).encode(),
             json.dumps({**real, "seq": 5.0, "rss_bytes": 2}).encode(),
             json.dumps({**real, "seq": True, "rss_bytes": 3}).encode(),
             json.dumps({k: v for k, v in real.items() if k != "v"} | {"rss_bytes": 4}).encode()]
    st_fake = json.dumps({**json.loads(StatusMessage(online=True, ts=1.0).encode()),
                          "online": "yes"}).encode()
    with Collector(mqtt_broker.settings("collector"), db=tmp_path / "f.db",
                   session_expiry_s=0) as col:
        for f in fakes:
            _publish(pub, t, f)
        _publish(pub, topic("loose", "dev-8", "status"), st_fake)
        _publish(pub, t, json.dumps(real).encode())
        # the real one comes last: once stored, everything before it is committed too
        wait_until(lambda: col.stats.received == 6 and col.store.seqs("loose", "dev-8") == [5],
                   10, "all six")
        rows = col.store.telemetry("loose", "dev-8")
        assert [(r["seq"], r["rss_bytes"]) for r in rows] == [(5, 123)]
        assert (col.stats.stored, col.stats.duplicates, col.stats.rejected) == (1, 0, 5)
        assert col.store.count("status") == 0 or all(
            d.online is None for d in col.store.devices() if d.device_id == "dev-8")
        assert {bytes(r["payload"]) for r in col.store.rejects()} == {*fakes, st_fake}
    pub.disconnect()
    pub.loop_stop()


def test_unavailable_store_retried_with_backoff_logged_once_stop_interrupts(
        broker_factory: Callable[[], Broker], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """A locked database is retried (exponential backoff, one log line per outage,
    nothing acknowledged), then stored once it frees; stop() during the backoff returns
    at once and the unacknowledged message comes again after a restart."""
    caplog.set_level(logging.INFO, logger="toma_edge.fleet")
    db = tmp_path / "f.db"
    broker = broker_factory()
    pub = _publisher(broker, "dev-3")
    t = topic("lock", "dev-3", "telemetry")

    def collector() -> Collector:
        return Collector(broker.settings("collector"), client_id="collector",
                         session_expiry_s=SESSION_S, retry_min_s=0.05, retry_max_s=0.4,
                         store=FleetStore(db, busy_timeout_s=0.01)).start()

    col = collector()
    lock = sqlite3.connect(str(db), isolation_level=None)
    try:
        lock.execute("BEGIN EXCLUSIVE")
        _publish(pub, t, _tel(1))
        _publish(pub, t, _tel(2))
        wait_until(lambda: col.stats.retries >= 1, 10, "a first retry")
        r0, t0 = col.stats.retries, time.monotonic()
        time.sleep(1.6)
        grown = col.stats.retries - r0
        # doubling 0.05 -> 0.4 s gives about 5 retries in 1.6 s; a fixed 0.05 s about 30
        assert 2 <= grown <= 10, (grown, time.monotonic() - t0)
        assert col.stats.stored == 0 and col.stats.queued == 2
        lock.execute("ROLLBACK")
        wait_until(lambda: col.stats.stored == 2, 10, "both stored after the outage")
        assert col.stats.queued == 0
        outage = [r for r in caplog.records if "retrying with backoff" in r.getMessage()]
        assert len(outage) == 1 and "\n" not in outage[0].getMessage()
        assert any("takes writes again" in r.getMessage() for r in caplog.records)
        # a second outage: stop() in the middle of the backoff
        lock.execute("BEGIN EXCLUSIVE")
        _publish(pub, t, _tel(3))
        wait_until(lambda: col.stats.retries >= r0 + grown + 2, 10, "the second outage")
        started = time.monotonic()
        col.stop()
        assert time.monotonic() - started < 2.0
    finally:
        if lock.in_transaction:
            lock.execute("ROLLBACK")
        lock.close()
    col = collector()  # the broker redelivers seq 3: it was never acknowledged
    try:
        wait_until(lambda: col.store.seqs("lock", "dev-3") == [1, 2, 3], 15, "seq 3")
        assert col.stats.rejected == col.stats.dead_lettered == 0
    finally:
        col.stop()
        pub.disconnect()
        pub.loop_stop()


# --------------------------------------------------------------------------- hostile payloads

_MAX_PAYLOAD = 2048  # the collector's limit in the property test (oversized stays cheap)

_json_scalar = (st.none() | st.booleans() | st.integers()
                | st.integers(min_value=2**63 - 2, max_value=2**80)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12))
_json = st.recursive(_json_scalar, lambda c: st.lists(c, max_size=3)
                     | st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=8)


def _valid(kind: str) -> dict[str, Any]:
    msg: Any
    if kind == "telemetry":
        msg = TelemetryMessage(seq=1, ts=1.7e9, window_s=10.0, requests=4, rows=8,
                               latency_p99_s=0.01, rss_bytes=1 << 20, model="m")
    elif kind == "events":
        msg = EventMessage(seq=1, ts=1.7e9, kind="model_loaded", fields={"model": "m", "n": 2})
    else:
        msg = StatusMessage(online=True, ts=1.7e9, model="m", budget_bytes=1 << 28)
    return dict(json.loads(msg.encode()))


@st.composite
def _mutated(draw: st.DrawFn, kind: str) -> bytes:
    """A valid message of ``kind`` with keys set to arbitrary JSON, removed or added."""
    d = _valid(kind)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["set", "del", "add", "big"]))
        key = draw(st.sampled_from(sorted(d) or ["v"]))
        if op == "set":
            d[key] = draw(_json)
        elif op == "del":
            d.pop(key, None)
        elif op == "add":
            d[draw(st.text(min_size=1, max_size=8))] = draw(_json)
        else:
            d[key] = draw(st.sampled_from([2**63, -(2**63) - 1, 2**64, 10**30, -1]))
    return json.dumps(d).encode()


@st.composite
def _raw(draw: st.DrawFn) -> bytes:
    """Bytes that are not a message: garbage, empty, invalid UTF-8, deep, oversized."""
    which = draw(st.sampled_from(["binary", "empty", "utf8", "deep", "big", "scalar"]))
    if which == "binary":
        return draw(st.binary(max_size=64))
    if which == "empty":
        return b""
    if which == "utf8":
        bad = draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80"]))
        return b'{"v":1,"seq":1,"ts":1.0,"window_s":1.0,"model":"' + bad + b'"}'
    if which == "deep":
        n = draw(st.integers(5, 20_000))
        return b'{"v":1,"fields":' + b"[" * n + b"]" * n + b"}"
    if which == "big":
        return b'{"v":1,"pad":"' + b"x" * draw(st.integers(_MAX_PAYLOAD, 60_000)) + b'"}'
    return json.dumps(draw(_json)).encode()


_hostile = st.tuples(st.sampled_from(["telemetry", "events", "status"]), st.data())


def test_hostile_payloads_into_a_real_collector(broker_factory: Callable[[], Broker],
                                                tmp_path: Path) -> None:
    """Property: each hostile payload on a real topic is stored only if it decodes, else
    counted as a rejection with its raw bytes in ``rejects``; every one is acknowledged
    (nothing queued, no retry), the database refuses nothing that decoded, and a valid
    message sent right after is stored exactly once."""
    mqtt_broker = broker_factory()  # no retained status of other tests' devices
    pub = _publisher(mqtt_broker, "dev-7")
    col = Collector(mqtt_broker.settings("collector"), db=tmp_path / "f.db",
                    session_expiry_s=0, max_payload_bytes=_MAX_PAYLOAD).start()
    step = {"n": 0}
    try:
        @settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
        @given(case=_hostile)
        def check(case: tuple[Kind, Any]) -> None:
            kind, data = case
            payload = data.draw(_mutated(kind) | _raw(), label="payload")
            step["n"] += 1
            n = step["n"]
            before = (col.stats.received, col.stats.stored, col.stats.rejected,
                      col.store.count("status"))
            _publish(pub, topic(f"h{n}", "dev-7", kind), payload)
            _publish(pub, topic("sentinel", "dev-7", "telemetry"), _tel(n))
            wait_until(lambda: col.stats.received == before[0] + 2 and col.stats.queued == 0,
                       20, "both messages committed")
            try:
                decode(kind, payload, max_bytes=_MAX_PAYLOAD)
                valid = True
            except TelemetryError:
                valid = False
            ignored = kind == "status" and payload == b""  # clears a retained status
            stored = col.stats.stored - before[1]
            rejected = col.stats.rejected - before[2]
            if valid:
                assert rejected == 0
                assert stored == (2 if kind != "status" else 1)
                if kind == "status":
                    assert col.store.count("status") == before[3] + 1
            elif ignored:
                assert (stored, rejected) == (1, 0)
            else:
                assert (stored, rejected) == (1, 1)
                letter = col.store.rejects(limit=1)[0]
                assert letter["payload"] == payload[:_MAX_PAYLOAD]
                assert letter["fleet"] == f"h{n}" and letter["device_id"] == "dev-7"
                assert letter["reason"] and "\n" not in letter["reason"]
            assert col.stats.dead_lettered == 0 and col.stats.retries == 0
            assert col.store.seqs("sentinel", "dev-7")[-1:] == [n]

        check()
        seqs = col.store.seqs("sentinel", "dev-7")
        assert seqs == list(range(1, step["n"] + 1))  # each valid one exactly once
        assert col.connected and col.stats.queued == 0
    finally:
        col.stop()
        pub.disconnect()
        pub.loop_stop()


# --------------------------------------------------------------------------- decode() alone


@given(kind=st.sampled_from(["telemetry", "events", "status"]),
       payload=st.binary(max_size=300) | _raw() | st.builds(json.dumps, _json).map(str.encode))
def test_decode_answers_a_message_or_one_line(kind: str, payload: bytes) -> None:
    """decode() never raises anything but TelemetryError, and that in one line."""
    try:
        decode(kind, payload, max_bytes=_MAX_PAYLOAD)
    except TelemetryError as e:
        assert str(e) and "\n" not in str(e) and len(str(e)) < 600


@given(data=st.data(), kind=st.sampled_from(["telemetry", "events", "status"]))
def test_decode_refuses_mutations_unless_they_fit_the_schema(data: st.DataObject,
                                                             kind: str) -> None:
    """A mutated message decodes only to what its JSON says, value for value: nothing is
    converted (a "3", 4.0 or true never becomes an int, "yes" never a boolean)."""
    payload = data.draw(_mutated(kind))
    try:
        msg = decode(kind, payload)
    except TelemetryError:
        return
    sent = json.loads(payload)
    assert sent.get("v") == 1 and type(sent["v"]) is int
    got = msg.model_dump()
    for key, value in sent.items():
        have = got[key]
        if isinstance(value, bool) or value is None or isinstance(value, (str, dict)):
            assert have == value and type(have) is type(value), key
        elif type(have) is int:  # integers stay integers, within int64
            assert have == value and -(2**63) <= value < 2**63, key
        elif isinstance(value, int):  # a JSON number where a float is expected
            assert type(have) is float and have == float(value), key
        else:
            assert isinstance(value, float) and type(have) is float and have == value, key


@given(seq=st.integers(1, 2**63 - 1), n=st.integers(0, 2**63 - 1),
       ts=st.floats(0, 1e12, allow_nan=False), model=st.text(max_size=40))
def test_valid_messages_round_trip(seq: int, n: int, ts: float, model: str) -> None:
    """What the device agent builds decodes to the same message."""
    assume(all(c >= " " and c != "\x7f" for c in model))
    t = TelemetryMessage(seq=seq, ts=ts, window_s=1.0, requests=n, rss_bytes=n, model=model)
    assert decode("telemetry", t.encode()) == t
    e = EventMessage(seq=seq, ts=ts, kind="error", fields={"n": n, "m": model, "x": None})
    assert decode("events", e.encode()) == e
    for bad in (json.dumps({**json.loads(t.encode()), "seq": str(seq)}),
                json.dumps({**json.loads(t.encode()), "seq": float(seq)}),
                json.dumps({k: v for k, v in json.loads(t.encode()).items() if k != "v"})):
        with pytest.raises(TelemetryError):
            decode("telemetry", bad.encode())
