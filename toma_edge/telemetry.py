"""Telemetry schema shared by the device agent and the fleet collector, and MQTT settings.

    from toma_edge.telemetry import TelemetryMessage, decode, topic, mqtt_settings, make_client
    t = topic("plant-7", "pi-0042", "telemetry")   # 'toma-edge/v1/plant-7/pi-0042/telemetry'
    msg = decode("telemetry", TelemetryMessage(seq=1, ts=1.7e9, window_s=10.0).encode())
    settings = mqtt_settings("mqtts://pi-0042@broker.lan", ca_file="ca.pem")  # password: env/file
    client = make_client(settings, client_id="pi-0042")

Topics are ``toma-edge/v1/<fleet>/<device_id>/{status,telemetry,events}`` (docs/architecture.md,
"Telemetry (MQTT)"). Messages are frozen, strict pydantic models: a payload without its
schema version ``"v"``, with an unknown version or key, a value of the wrong JSON type
(``"3"``, ``4.0`` or ``true`` for an integer, ``"yes"`` for a boolean), an integer outside
int64, a non-finite number, an over-long string, invalid UTF-8, nesting deeper than
:data:`MAX_DEPTH` or more than ``max_bytes`` is refused with one line naming the problem.
The fleet and the device id travel in the topic only (the broker's ACL vouches for them),
never in the payload. Passwords come from ``TOMA_EDGE_MQTT_PASSWORD`` or a file, never
from a URL or the command line. No torch here.
"""

from __future__ import annotations

import math
import os
import re
import ssl
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
)

from .errors import ConfigError, InputError, TelemetryError
from .jsonio import json_type, loads

__all__ = [
    "SCHEMA_VERSION",
    "TOPIC_ROOT",
    "KINDS",
    "MAX_PAYLOAD_BYTES",
    "INT64_MAX",
    "MAX_DEPTH",
    "MAX_EVENT_FIELDS",
    "MAX_EVENT_TEXT",
    "PASSWORD_ENV",
    "Kind",
    "StatusMessage",
    "TelemetryMessage",
    "EventMessage",
    "Message",
    "validate_id",
    "topic",
    "parse_topic",
    "subscription",
    "decode",
    "MqttUrl",
    "MqttSettings",
    "parse_mqtt_url",
    "mqtt_settings",
    "make_client",
    "tolerate_bom_in_mqtt_strings",
    "connect_properties",
]

SCHEMA_VERSION = 1
TOPIC_ROOT = "toma-edge/v1"
Kind = Literal["status", "telemetry", "events"]
KINDS: tuple[Kind, ...] = ("status", "telemetry", "events")
MAX_PAYLOAD_BYTES = 64 * 1024
"""Largest telemetry payload a collector accepts, in bytes; larger ones are dropped."""
PASSWORD_ENV = "TOMA_EDGE_MQTT_PASSWORD"

# letters, digits, '-', '_', '.'; no MQTT wildcards (+ #), no '/', no '$' prefix, no spaces
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_EVENT_KIND_RE = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")


def validate_id(value: str, *, what: str = "device id") -> str:
    """Return ``value`` if it can be one topic level (fleet or device id), else ConfigError.

    Allowed: 1-64 characters of letters, digits, ``-``, ``_``, ``.``, starting with a
    letter or digit; no ``/``, ``+``, ``#``, ``$`` or spaces (they would change the topic).
    """
    if not isinstance(value, str) or not _ID_RE.match(value):
        raise ConfigError(
            f"{what} {value!r} is not valid; use 1-64 letters, digits, '-', '_' or '.', "
            "starting with a letter or digit (no '/', '+', '#', '$' or spaces)"
        )
    return value


def topic(fleet: str, device_id: str, kind: Kind) -> str:
    """The topic of one device's ``status``, ``telemetry`` or ``events`` messages."""
    if kind not in KINDS:
        raise ConfigError(f"telemetry kind {kind!r} is unknown; use one of {', '.join(KINDS)}")
    return (
        f"{TOPIC_ROOT}/{validate_id(fleet, what='fleet')}/{validate_id(device_id)}/{kind}"
    )


def parse_topic(name: str) -> tuple[str, str, Kind]:
    """Split ``toma-edge/v1/<fleet>/<device_id>/<kind>`` into its parts; TelemetryError if not."""
    parts = name.split("/")
    if (
        len(parts) != 5
        or "/".join(parts[:2]) != TOPIC_ROOT
        or parts[4] not in KINDS
        or not _ID_RE.match(parts[2])
        or not _ID_RE.match(parts[3])
    ):
        raise TelemetryError(
            f"topic {name!r} is not toma-edge/v1/<fleet>/<device_id>/(status|telemetry|events)"
        )
    return parts[2], parts[3], parts[4]  # type: ignore[return-value]


def subscription(kind: Kind, *, fleet: str = "+", share_group: str | None = None) -> str:
    """The topic filter for ``kind`` of every device of ``fleet`` (``+``: every fleet).

    With ``share_group``, an MQTT v5 shared subscription (``$share/<group>/...``) so several
    collectors split the messages.
    """
    if fleet != "+":
        validate_id(fleet, what="fleet")
    base = f"{TOPIC_ROOT}/{fleet}/+/{kind}"
    if share_group is None:
        return base
    return f"$share/{validate_id(share_group, what='share group')}/{base}"


# --------------------------------------------------------------------------- messages

_Frozen = ConfigDict(frozen=True, extra="forbid", strict=True)
INT64_MAX = 2**63 - 1
"""Largest integer a message may hold (every database column and int64 holds it)."""
MAX_DEPTH = 4
"""Deepest nesting of objects in a payload (an event's ``fields`` is level 2)."""
MAX_EVENT_FIELDS = 64
"""Most keys an event's ``fields`` may hold."""

# counts and sizes: JSON integers (not 4.0, not true, not "3") in 0..2**63-1
_Count = Annotated[int, Field(ge=0, le=INT64_MAX)]
# names (model, version, target, agent): bounded, printable (no control characters, no NUL)
_Name = Annotated[str, StringConstraints(max_length=256, pattern=r"^[^\x00-\x1f\x7f]*$")]
MAX_EVENT_TEXT = 4096
"""Longest string an event field may hold (characters); never a NUL (no database stores it)."""
_FieldKey = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")]
_NonNeg = Field(default=0, ge=0, le=INT64_MAX)


def _finite(v: float | None) -> float | None:
    if v is not None and not math.isfinite(v):
        raise ValueError("must be a finite number")
    return v


class _Base(BaseModel):
    """Strict in both directions: numbers are JSON numbers, integers are integers (``4.0``
    and ``true`` are not), booleans are booleans, strings are strings; unknown keys are
    refused. ``v`` defaults to 1 when a message is built here, and is REQUIRED in a payload
    (:func:`decode`)."""

    model_config = _Frozen
    v: Literal[1] = 1

    @field_validator("v", mode="before")
    @classmethod
    def _version_is_int(cls, v: Any) -> Any:
        if type(v) is not int:  # Literal[1] alone lets true and 1.0 pass
            raise ValueError(f"schema version must be the integer {SCHEMA_VERSION}")
        return v

    def encode(self) -> bytes:
        """UTF-8 JSON bytes of this message (compact; the schema version as ``v``)."""
        return self.model_dump_json().encode()


class StatusMessage(_Base):
    """Retained birth (``online=True``) or Last Will / goodbye (``online=False``) of a device."""

    online: bool
    ts: float = Field(ge=0, description="unix time, seconds")
    model: _Name | None = None
    model_version: _Name | None = None
    model_sha256: _Name | None = None
    target: _Name | None = None
    budget_bytes: _Count | None = None
    interval_s: float | None = Field(default=None, gt=0)
    agent: _Name | None = None

    _chk = field_validator("ts", "interval_s")(_finite)


class TelemetryMessage(_Base):
    """One telemetry window of a device; ``seq`` runs 1, 2, 3... per device, across restarts.

    Latencies in seconds (None when the window had no request), memory in bytes, the
    window length ``window_s`` in seconds ending at ``ts`` (unix time, seconds).
    """

    seq: int = Field(ge=1, le=INT64_MAX)
    ts: float = Field(ge=0)
    window_s: float = Field(ge=0)
    requests: int = _NonNeg
    errors: int = _NonNeg
    rows: int = _NonNeg
    latency_p50_s: float | None = Field(default=None, ge=0)
    latency_p95_s: float | None = Field(default=None, ge=0)
    latency_p99_s: float | None = Field(default=None, ge=0)
    latency_max_s: float | None = Field(default=None, ge=0)
    throughput_rps: float = Field(default=0.0, ge=0, description="requests per second")
    rows_per_s: float = Field(default=0.0, ge=0)
    batch_size: int | None = Field(default=None, ge=1, le=INT64_MAX)
    rss_bytes: _Count | None = None
    peak_rss_bytes: _Count | None = None
    budget_bytes: _Count | None = None
    cpu_temp_c: float | None = None
    model: _Name | None = None
    model_version: _Name | None = None
    model_sha256: _Name | None = None
    spool_dropped: int = Field(default=0, ge=0, le=INT64_MAX,
                               description="telemetry dropped by a full spool")

    _chk = field_validator(
        "ts", "window_s", "latency_p50_s", "latency_p95_s", "latency_p99_s", "latency_max_s",
        "throughput_rps", "rows_per_s", "cpu_temp_c",
    )(_finite)


class EventMessage(_Base):
    """Something that happened once: ``model_loaded``, ``model_swapped``, ``budget_adapted``,
    ``error``...; ``seq`` is the device's own events counter (apart from telemetry's)."""

    seq: int = Field(ge=1, le=INT64_MAX)
    ts: float = Field(ge=0)
    kind: str
    fields: dict[_FieldKey, Any] = Field(default_factory=dict, max_length=MAX_EVENT_FIELDS)
    """JSON scalars only: integers within int64, finite floats, booleans, null, strings of
    at most 4096 characters without NUL."""

    _chk = field_validator("ts")(_finite)

    @field_validator("kind")
    @classmethod
    def _kind(cls, v: str) -> str:
        if not _EVENT_KIND_RE.match(v):
            raise ValueError("event kind must be lowercase letters, digits, '_', '.', '-'")
        return v

    @field_validator("fields")
    @classmethod
    def _fields(cls, v: dict[str, Any]) -> dict[str, Any]:
        for key, val in v.items():
            if val is None or isinstance(val, bool):
                continue
            if isinstance(val, int):
                if not -INT64_MAX - 1 <= val <= INT64_MAX:
                    raise ValueError(f"{key!r} is an integer outside the 64-bit range")
            elif isinstance(val, float):
                if not math.isfinite(val):
                    raise ValueError(f"{key!r} must be a finite number")
            elif isinstance(val, str):
                if len(val) > MAX_EVENT_TEXT or "\x00" in val:
                    raise ValueError(f"{key!r} must be a string of at most {MAX_EVENT_TEXT} "
                                     "characters without NUL")
            else:
                raise ValueError(f"{key!r} must be a JSON string, number, boolean or null, "
                                 f"got {json_type(val)}")
        return v


Message = StatusMessage | TelemetryMessage | EventMessage
_TYPES: dict[str, type[_Base]] = {
    "status": StatusMessage,
    "telemetry": TelemetryMessage,
    "events": EventMessage,
}


def _one_line(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "message"
    more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
    return f"{loc}: {err['msg']}{more}".replace("\n", " ")[:300]


def decode(kind: str, payload: bytes | str, *, max_bytes: int = MAX_PAYLOAD_BYTES) -> Message:
    """Parse and validate one payload of ``kind``; TelemetryError (one line) when it is not one.

    Strict: the payload is UTF-8 JSON (toma_edge.jsonio: no NaN, integers within int64,
    at most :data:`MAX_DEPTH` levels), at most ``max_bytes`` bytes, one object holding the
    schema version ``"v": 1`` (required; a whole number, not ``1.0`` or ``true``), the
    message's required keys and no unknown one, each value of its JSON type (no ``"3"``
    for 3, no ``4.0`` or ``true`` for an integer, no ``"yes"`` for a boolean).
    """
    cls = _TYPES.get(kind)
    if cls is None:
        raise TelemetryError(f"telemetry kind {kind!r} is unknown; expected {', '.join(KINDS)}")
    if len(payload) > max_bytes:
        raise TelemetryError(f"{kind} payload of {len(payload)} bytes is over {max_bytes} bytes")
    if not payload:
        raise TelemetryError(f"{kind} payload is empty")
    try:
        data = loads(payload, max_depth=MAX_DEPTH, what=f"{kind} payload")
    except InputError as e:
        raise TelemetryError(str(e).replace("invalid JSON", "not JSON")) from e
    if not isinstance(data, dict):
        raise TelemetryError(f"{kind} payload must be a JSON object, got {json_type(data)}")
    if "v" not in data:
        raise TelemetryError(
            f"{kind} payload has no schema version 'v'; this collector reads v={SCHEMA_VERSION}")
    v = data["v"]
    if type(v) is not int or v != SCHEMA_VERSION:
        shown = repr(v)[:24]
        raise TelemetryError(
            f"{kind} payload has schema version {shown}; this collector reads "
            f"v={SCHEMA_VERSION} (upgrade toma-edge on the collector)"
        )
    try:
        return cls.model_validate(data, strict=True)  # type: ignore[return-value]
    except ValidationError as e:
        raise TelemetryError(f"{kind} payload is invalid: {_one_line(e)}") from e


# --------------------------------------------------------------------------- MQTT settings


class MqttUrl(BaseModel):
    """``mqtt://[user@]host[:port]`` (plain, port 1883) or ``mqtts://...`` (TLS, port 8883)."""

    model_config = ConfigDict(frozen=True)
    host: str
    port: int
    tls: bool
    username: str | None = None

    def __str__(self) -> str:
        user = f"{self.username}@" if self.username else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{self.host}:{self.port}"


def parse_mqtt_url(url: str) -> MqttUrl:
    """Parse an MQTT URL; ConfigError naming the problem (a password in it is refused)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise ConfigError(f"MQTT URL {url!r} is malformed: {e}") from e
    if parts.scheme not in ("mqtt", "mqtts"):
        raise ConfigError(
            f"MQTT URL {url!r} must start with mqtt:// or mqtts:// (TLS), like mqtt://host:1883"
        )
    if parts.password is not None:
        raise ConfigError(
            f"MQTT URL for host {parts.hostname!r} contains a password; remove it and set "
            f"{PASSWORD_ENV} or use a password file"
        )
    if not parts.hostname:
        raise ConfigError(f"MQTT URL {url!r} has no host; write it like mqtt://broker.lan:1883")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"MQTT URL {url!r} must not have a path or query")
    tls = parts.scheme == "mqtts"
    return MqttUrl(
        host=parts.hostname,
        port=port if port is not None else (8883 if tls else 1883),
        tls=tls,
        username=parts.username or None,
    )


class MqttSettings(BaseModel):
    """Everything needed to reach the broker; the password never shows in repr or logs."""

    model_config = ConfigDict(frozen=True)
    url: MqttUrl
    password: str | None = Field(default=None, repr=False)
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    keepalive_s: int = 30


def _check_file(path: str | Path | None, what: str) -> Path | None:
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {str(p)!r} does not exist or is not a file")
    return p


def mqtt_settings(
    url: str,
    *,
    password_file: str | Path | None = None,
    ca_file: str | Path | None = None,
    cert_file: str | Path | None = None,
    key_file: str | Path | None = None,
    keepalive_s: int = 30,
) -> MqttSettings:
    """Resolve a URL and options into :class:`MqttSettings`.

    The password is read from ``password_file`` (first line) if given, else from the
    environment variable ``TOMA_EDGE_MQTT_PASSWORD``; a password without a user in the
    URL is a ConfigError, as are TLS files on a plain ``mqtt://`` URL.
    """
    u = parse_mqtt_url(url)
    password: str | None = None
    pf = _check_file(password_file, "password file")
    if pf is not None:
        lines = pf.read_text().splitlines()
        password = lines[0] if lines else ""
        if not password:
            raise ConfigError(f"password file {str(pf)!r} is empty")
    elif os.environ.get(PASSWORD_ENV):
        password = os.environ[PASSWORD_ENV]
    if password is not None and not u.username:
        raise ConfigError(
            f"a password is set but the MQTT URL has no user; write mqtt://USER@{u.host}"
        )
    ca, cert, key = (
        _check_file(ca_file, "CA file"),
        _check_file(cert_file, "client certificate file"),
        _check_file(key_file, "client key file"),
    )
    if not u.tls and (ca or cert or key):
        raise ConfigError("CA and client certificate files need an mqtts:// URL (TLS)")
    if (cert is None) != (key is None):
        raise ConfigError("a client certificate needs both --cert-file and --key-file")
    return MqttSettings(
        url=u, password=password, ca_file=ca, cert_file=cert, key_file=key,
        keepalive_s=keepalive_s,
    )


def tolerate_bom_in_mqtt_strings() -> None:
    """Make paho-mqtt accept U+FEFF in MQTT v5 string properties, as MQTT requires.

    paho 2.x treats U+FEFF in a received string property (Response Topic, Content Type,
    User Property) as a malformed packet and drops the connection, although MQTT 5.0
    [MQTT-1.5.4-3] says it MUST be accepted and mosquitto forwards it: one request
    carrying it would disconnect the device (its Last Will says offline) every time.
    This replaces paho's ``properties.readUTF`` with the same check minus that rule;
    bytes that are not UTF-8 become a malformed packet (paho raised UnicodeDecodeError
    in its network thread). Idempotent; leaves a paho that accepts U+FEFF alone.
    """
    from paho.mqtt import properties
    from paho.mqtt.exception import MalformedPacket

    original = properties.readUTF
    if getattr(original, "_toma_edge", False):
        return
    try:
        original(b"\x00\x03\xef\xbb\xbf", 5)
        return  # this paho reads U+FEFF as it should
    except MalformedPacket:
        pass

    def read_utf(buffer: Any, maxlen: int) -> tuple[str, int]:
        if maxlen < 2:
            raise MalformedPacket("Not enough data to read string length")
        length = properties.readInt16(buffer)
        if length > maxlen - 2:
            raise MalformedPacket("Length delimited string too long")
        try:
            text = bytes(buffer[2:2 + length]).decode("utf-8")
        except UnicodeDecodeError as e:
            raise MalformedPacket(f"[MQTT-1.5.4-1] invalid UTF-8: {e}") from None
        if "\x00" in text:
            raise MalformedPacket("[MQTT-1.5.4-2] Null found in UTF-8 data")
        return text, length + 2  # surrogates cannot come out of a strict UTF-8 decode

    read_utf._toma_edge = True  # type: ignore[attr-defined]
    properties.readUTF = read_utf


def make_client(
    settings: MqttSettings,
    *,
    client_id: str,
    manual_ack: bool = False,
    max_inflight: int = 100,
) -> Any:
    """A configured paho-mqtt 2.x client (callback API v2, MQTT v5): credentials, TLS,
    reconnect back-off (1-10 s). Not connected yet: call ``client.connect(...)`` with
    :func:`connect_properties`. Returns ``paho.mqtt.client.Client``.
    """
    import paho.mqtt.client as mqtt

    tolerate_bom_in_mqtt_strings()  # one U+FEFF must not drop any of our connections
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5,
        manual_ack=manual_ack,
    )
    if settings.url.username:
        client.username_pw_set(settings.url.username, settings.password)
    if settings.url.tls:
        try:
            client.tls_set(
                ca_certs=str(settings.ca_file) if settings.ca_file else None,
                certfile=str(settings.cert_file) if settings.cert_file else None,
                keyfile=str(settings.key_file) if settings.key_file else None,
                cert_reqs=ssl.CERT_REQUIRED,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        except (ssl.SSLError, OSError) as e:
            raise ConfigError(f"TLS files cannot be loaded: {e}") from e
    client.max_inflight_messages_set(max_inflight)
    client.reconnect_delay_set(min_delay=1, max_delay=10)
    return client


def connect_properties(
    *, session_expiry_s: int | None = None, receive_maximum: int | None = None
) -> Any:
    """MQTT v5 CONNECT properties: a session expiry (seconds, for a persistent session)
    and the most unacknowledged QoS 1 messages the broker may send us at once."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    props = Properties(PacketTypes.CONNECT)
    if session_expiry_s is not None:
        props.SessionExpiryInterval = session_expiry_s
    if receive_maximum is not None:
        props.ReceiveMaximum = receive_maximum
    return props
