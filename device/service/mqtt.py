"""The MQTT front end of the inference service: requests in, answers on the client's topic.

    # a client (MQTT v5), user "client-app":
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = "toma-edge/v1/plant-7/pi-0042/infer/response/client-app"
    props.CorrelationData = b"req-1"
    client.publish("toma-edge/v1/plant-7/pi-0042/infer/request",
                   b'{"inputs": [[0.1, 0.2]]}', qos=1, properties=props)
    # -> {"outputs": [[...]]} on that response topic, with CorrelationData b"req-1"

The device subscribes to ``toma-edge/v1/<fleet>/<device_id>/infer/request`` (QoS 1) on the
telemetry agent's connection (one connection per device: a broker that binds client ids
to usernames, as the shipped one does, allows one per identity); without telemetry it
opens its own. It answers on the request's Response Topic with its Correlation Data; a
v3.1.1 client puts ``"reply_to"`` (a topic) and ``"id"`` in the JSON instead, and gets
``"id"`` back in the answer. Errors are answered as ``{"error": "...", "status": <HTTP-like
code>}``.

Response topics must lie under ``toma-edge/v1/<fleet>/<device_id>/infer/response/`` (the
device may publish only under its own tree, and nothing else of its tree may be written by
a client's say-so) and be a topic MQTT allows (:func:`check_response_topic`: UTF-8 without
U+0000, control characters, non-characters or U+FEFF, no ``+`` ``#``, at most 65,535
bytes): publishing anything else would make the broker drop the device, and paho would
send it again after every reconnect. A request with no such topic cannot be answered: it
is counted (``unanswerable`` in :meth:`MqttFrontEnd.health`) and logged at most once a
minute. Correlation data is at most :data:`MAX_CORRELATION_BYTES` bytes and ``id`` a
number or a string of at most :data:`MAX_ID_CHARS` characters (else a 400 answer without
them); an answer larger than the broker's maximum packet size becomes a 413 error. No
exception of a request reaches paho's network thread: each is caught, counted
(``callback_errors``) and logged at most once a minute.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from typing import TYPE_CHECKING, Any

from ...errors import InputError, TomaEdgeError
from ...jsonio import loads
from ...telemetry import MqttSettings, make_client
from ..agent import ThrottledLog
from ..predictor import Prediction
from .batcher import Overloaded, ShuttingDown
from .protocol import RequestError, decode_json, encode_answer, encode_error

if TYPE_CHECKING:
    from .app import Service

__all__ = ["MqttFrontEnd", "request_topic", "response_prefix", "check_response_topic",
           "MAX_CORRELATION_BYTES", "MAX_ID_CHARS", "MAX_TOPIC_BYTES"]

log = logging.getLogger("toma_edge.service")

MAX_TOPIC_BYTES = 65_535
"""Longest topic MQTT allows, in UTF-8 bytes."""
MAX_CORRELATION_BYTES = 1024
"""Longest correlation data (bytes) a request may carry and have echoed."""
MAX_ID_CHARS = 256
"""Longest string ``id`` (characters) a v3.1.1 request may carry and have echoed."""
_MQTT_MAX_PACKET = 268_435_455 + 5  # the protocol's own bound, when the broker names none
_PACKET_OVERHEAD = 32  # fixed header, lengths, packet id, property headers (bytes, generous)

# characters MQTT (or mosquitto, which closes the connection on them) refuses in a
# topic, plus U+FEFF (paho clients drop the connection on it) and the wildcards
_BAD = ["\x00-\x1f", "\x7f-\x9f", "+#", "\ud800-\udfff", "\ufdd0-\ufdef", "\ufeff"]
_BAD += [chr(p * 0x10000 + 0xFFFE) + chr(p * 0x10000 + 0xFFFF) for p in range(17)]
_BAD_TOPIC_CHARS = re.compile("[" + "".join(_BAD) + "]")


def request_topic(fleet: str, device_id: str) -> str:
    """Where clients send inference requests for one device."""
    return f"toma-edge/v1/{fleet}/{device_id}/infer/request"


def response_prefix(fleet: str, device_id: str) -> str:
    """Response topics must start with this (then ``<client>[/...]``)."""
    return f"toma-edge/v1/{fleet}/{device_id}/infer/response/"


def check_response_topic(topic: object, prefix: str) -> str | None:
    """Why ``topic`` cannot be answered on (one line), or None if it can.

    It must be a string under ``prefix`` (and longer), at most :data:`MAX_TOPIC_BYTES`
    bytes of UTF-8 without U+0000, surrogates, control characters, non-characters,
    U+FEFF or the wildcards ``+`` and ``#``.
    """
    if not isinstance(topic, str):
        return f"the response topic must be a string, got {type(topic).__name__}"
    if len(topic) > MAX_TOPIC_BYTES:
        return f"the response topic is longer than {MAX_TOPIC_BYTES} bytes"
    bad = _BAD_TOPIC_CHARS.search(topic)
    if bad is not None:
        return (f"the response topic holds {bad.group()!r} at {bad.start()}, which an MQTT "
                "topic may not")
    if len(topic.encode("utf-8")) > MAX_TOPIC_BYTES:
        return f"the response topic is longer than {MAX_TOPIC_BYTES} bytes"
    if not topic.startswith(prefix) or len(topic) == len(prefix):
        return f"the response topic is not under {prefix}<client>"
    return None


def _check_id(rid: object) -> str | None:
    if isinstance(rid, bool) or not isinstance(rid, (str, int, float)):
        return f"'id' must be a string or a number, got {type(rid).__name__}"
    if isinstance(rid, str) and len(rid) > MAX_ID_CHARS:
        return f"'id' is {len(rid)} characters long, more than {MAX_ID_CHARS}"
    if isinstance(rid, float) and not math.isfinite(rid):
        return "'id' must be a finite number"
    return None


class MqttFrontEnd:
    """Takes inference requests over MQTT for a :class:`~.app.Service`."""

    def __init__(self, svc: Service, settings: MqttSettings) -> None:
        self.svc = svc
        self.settings = settings
        self.topic = request_topic(svc.fleet, svc.device_id)
        self.prefix = response_prefix(svc.fleet, svc.device_id)
        self.max_bytes = svc.config.max_body_bytes
        self._agent = svc.agent
        self._own = self._agent is None or self._agent.client is None
        self.client: Any = None
        if self._own:
            self.client = make_client(
                settings, client_id=f"toma-edge-{svc.fleet}-{svc.device_id}-infer")
            self.client.on_connect = self._on_connect
            self.client.on_disconnect = self._on_disconnect
            self.client.on_subscribe = self._on_subscribe
            self.client.message_callback_add(self.topic, self._on_message)
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._taking = True
        self._lock = threading.Lock()
        self._outstanding = 0
        self._idle = threading.Condition(self._lock)
        self._max_packet = _MQTT_MAX_PACKET
        self._throttled = ThrottledLog(log)
        #: requests that named no usable response topic (cannot be answered)
        self.unanswerable = 0
        #: exceptions caught in callbacks (each would have stopped paho's network thread)
        self.callback_errors = 0
        #: requests answered (outputs or an error)
        self.answered = 0

    @property
    def connected(self) -> bool:
        """Whether the broker connection is up and subscribed."""
        return self._connected.is_set() and self._subscribed.is_set() and self._network_alive()

    def _network_alive(self) -> bool:
        t = getattr(self.client, "_thread", None)
        return t is None or t.is_alive()

    def health(self) -> dict[str, object]:
        """The front end's part of /healthz; ``taking_requests`` False means requests
        sent now go unanswered (not connected or subscribed, stopped, or paho's network
        thread is gone)."""
        alive = self._network_alive()
        connected = self._connected.is_set() and alive
        subscribed = connected and self._subscribed.is_set()
        return {
            "connected": connected,
            "subscribed": subscribed,
            "network_thread_alive": alive,
            "taking_requests": subscribed and self._taking,
            "shared_connection": not self._own,
            "answered": self.answered,
            "unanswerable": self.unanswerable,
            "callback_errors": self.callback_errors,
        }

    def start(self) -> None:
        """Connect in the background (retrying) and subscribe on every connect; or attach
        to the telemetry agent's connection."""
        from ...telemetry import connect_properties

        if not self._own:
            assert self._agent is not None
            self.client = self._agent.client
            self.client.on_subscribe = self._on_subscribe
            self.client.message_callback_add(self.topic, self._on_message)
            self._agent.share_connection(on_connect=self._connected_now, on_disconnect=self._lost)
            return
        s = self.settings
        self.client.connect_async(s.url.host, s.url.port, keepalive=s.keepalive_s,
                                  clean_start=True, properties=connect_properties())
        self.client.loop_start()

    def stop_taking(self) -> None:
        """Unsubscribe: requests from now on go unanswered by this device."""
        self._taking = False
        if self._connected.is_set():
            self.client.unsubscribe(self.topic)

    def close(self, timeout_s: float = 10.0) -> bool:
        """Wait for the answers of accepted requests (``timeout_s`` seconds), disconnect
        (a shared connection is the telemetry agent's to close)."""
        deadline = time.monotonic() + timeout_s
        with self._idle:
            while self._outstanding and time.monotonic() < deadline:
                self._idle.wait(0.05)
            ok = self._outstanding == 0
        if self.client is not None:
            self.client.message_callback_remove(self.topic)
        if self._own:
            time.sleep(0.05)  # let paho's thread hand over the last QoS 1 answers
            self.client.disconnect()
            self.client.loop_stop()
        return ok

    # -- paho callbacks (paho's network thread): never raise -------------------------------
    def _guard(self, what: str, fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except Exception:  # noqa: BLE001 - an exception here would stop paho's thread
            self.callback_errors += 1
            self._throttled(logging.ERROR, what, "MQTT %s failed; carrying on", what,
                            exc_info=True)

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:
        if reason.is_failure:
            self._throttled(logging.WARNING, "refused",
                            "MQTT broker %s refused the inference connection: %s",
                            self.settings.url, reason)
            return
        self._guard("connect handler", self._connected_now, properties)

    def _connected_now(self, properties: Any) -> None:
        size = getattr(properties, "MaximumPacketSize", None) if properties is not None else None
        self._max_packet = int(size) if isinstance(size, int) and size > 0 else _MQTT_MAX_PACKET
        self._subscribed.clear()
        if self._taking:
            self.client.subscribe(self.topic, qos=1)
        self._connected.set()
        log.info("taking inference requests on %s", self.topic)

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any,
                       properties: Any) -> None:
        self._guard("disconnect handler", self._lost)

    def _lost(self) -> None:
        self._connected.clear()
        self._subscribed.clear()

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reasons: Any,
                      properties: Any) -> None:
        self._guard("subscribe handler", self._suback, reasons)

    def _suback(self, reasons: Any) -> None:
        if reasons and not any(getattr(r, "is_failure", False) for r in reasons):
            self._subscribed.set()
        else:
            self._throttled(logging.ERROR, "suback", "MQTT broker refused the subscription "
                            "to %s: %s; no inference requests are taken", self.topic, reasons)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        self._guard("request handler", self._handle, msg)

    # -- requests --------------------------------------------------------------------------
    def _unanswerable(self, msg: Any, why: str, t0: float) -> None:
        self.unanswerable += 1
        self.svc.record("mqtt", 400, time.perf_counter() - t0, 0)
        self._throttled(logging.WARNING, "unanswerable",
                        "MQTT request on %s names no response topic that can be answered "
                        "(under %s): %s; dropped", self.topic, self.prefix, why[:200])

    def _answer(self, topic: str, corr: bytes | None, payload: bytes) -> bool:
        """Publish one answer (QoS 1) unless the broker would refuse its size; a too large
        answer becomes a 413 error. False if nothing could be sent."""
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        head = _PACKET_OVERHEAD + len(topic.encode("utf-8")) + (len(corr) if corr else 0)
        if head + len(payload) > self._max_packet:
            payload = encode_error(
                f"the answer is {len(payload)} bytes, more than the broker takes in one "
                f"message ({self._max_packet - head}); send fewer rows per request",
                status=413)
            if head + len(payload) > self._max_packet:
                return False
        props = None
        if corr is not None:
            props = Properties(PacketTypes.PUBLISH)
            props.CorrelationData = corr
        self.client.publish(topic, payload, qos=1, properties=props)
        with self._lock:  # paho's thread (errors) and the service's loop (answers)
            self.answered += 1
        return True

    def _handle(self, msg: Any) -> None:
        t0 = time.perf_counter()
        payload = bytes(msg.payload)
        props = getattr(msg, "properties", None)
        v5_topic = getattr(props, "ResponseTopic", None) if props is not None else None
        corr = getattr(props, "CorrelationData", None) if props is not None else None
        obj: dict[str, Any] | None = None
        problem: RequestError | None = None
        if len(payload) > self.max_bytes:
            problem = RequestError(f"the request is {len(payload)} bytes, more than the "
                                   f"{self.max_bytes} this device takes", 413)
        else:
            try:
                parsed = loads(payload, what="the request")
            except InputError as e:
                problem = RequestError(f'{e}; send {{"inputs": [[...], ...]}}', 400)
            else:
                obj = parsed if isinstance(parsed, dict) else None
        if v5_topic is not None:
            topic: object = v5_topic
        elif obj is not None and "reply_to" in obj:
            topic = obj["reply_to"]
        else:
            self._unanswerable(msg, "no Response Topic property and no 'reply_to' key", t0)
            return
        why = check_response_topic(topic, self.prefix)
        if why is not None:
            self._unanswerable(msg, why, t0)
            return
        assert isinstance(topic, str)
        if corr is not None and (not isinstance(corr, (bytes, bytearray))
                                 or len(corr) > MAX_CORRELATION_BYTES):
            problem = problem or RequestError(
                f"the correlation data is {len(corr)} bytes, more than the "
                f"{MAX_CORRELATION_BYTES} this device echoes", 400)
            corr = None
        corr = bytes(corr) if corr is not None else None
        rid = obj.get("id") if obj is not None else None
        if rid is not None and (bad := _check_id(rid)) is not None:
            problem = problem or RequestError(bad, 400)
            rid = None
        extra = {"id": rid} if rid is not None else {}

        def fail(status: int, text: str) -> None:
            more = {"retry_after_s": 1} if status == 503 else {}
            self._answer(topic, corr, encode_error(text, status=status, **extra, **more))
            self.svc.record("mqtt", status, time.perf_counter() - t0, 0)

        try:
            if problem is not None:
                raise problem
            if not self._taking or self.svc.draining:
                raise ShuttingDown("the service is shutting down; retry on another device")
            _, rows = decode_json(payload, self.svc.model.predictor,
                                  max_rows=self.svc.max_request_rows,
                                  extra_keys=("id", "reply_to"))
            n = int(rows.shape[0])

            def done(pred: Prediction | None, err: BaseException | None) -> None:
                # runs on the service's loop: same rule, nothing escapes
                try:
                    if isinstance(err, (Overloaded, ShuttingDown)):
                        fail(503, str(err))
                    elif err is not None:
                        fail(422 if isinstance(err, TomaEdgeError) else 500, str(err))
                    else:
                        assert pred is not None
                        self._answer(topic, corr, encode_answer(pred, **extra))
                        self.svc.record("mqtt", 200, time.perf_counter() - t0, n)
                except Exception:  # noqa: BLE001
                    self.callback_errors += 1
                    self._throttled(logging.ERROR, "answer", "MQTT answer failed; carrying on",
                                    exc_info=True)
                finally:
                    with self._idle:
                        self._outstanding -= 1
                        self._idle.notify_all()

            with self._lock:
                self._outstanding += 1
            try:
                self.svc.submit_threadsafe(rows, done)
            except BaseException:
                with self._idle:
                    self._outstanding -= 1
                raise
        except RequestError as e:
            fail(e.status, str(e))
        except (Overloaded, ShuttingDown) as e:
            fail(503, str(e))
        except InputError as e:
            fail(400, str(e))
        except Exception as e:  # noqa: BLE001 - answered, counted by the guard's caller
            self._throttled(logging.ERROR, "request", "MQTT request failed", exc_info=True)
            fail(500, f"internal error: {type(e).__name__}")
