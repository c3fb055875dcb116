"""The MQTT front end of the inference service: requests in, answers on the client's topic.

    # a client (MQTT v5), user "client-app":
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = "toma-edge/v1/plant-7/pi-0042/infer/response/client-app"
    props.CorrelationData = b"req-1"
    client.publish("toma-edge/v1/plant-7/pi-0042/infer/request",
                   b'{"inputs": [[0.1, 0.2]]}', qos=1, properties=props)
    # -> {"outputs": [[...]]} on that response topic, with CorrelationData b"req-1"

The device subscribes to ``toma-edge/v1/<fleet>/<device_id>/infer/request`` (QoS 1) on a
connection of its own (client id ``toma-edge-<fleet>-<device_id>-infer``, the agent's
credentials). It answers on the request's Response Topic with its Correlation Data; a
v3.1.1 client puts ``"reply_to"`` (a topic) and ``"id"`` in the JSON instead, and gets
``"id"`` back in the answer. Response topics must lie under
``toma-edge/v1/<fleet>/<device_id>/infer/response/`` (the device may publish only under
its own tree, and nothing else of its tree may be written by a client's say-so); a
request with none, or with another, cannot be answered and is counted and logged.
Errors are answered as ``{"error": "...", "status": <HTTP-like code>}``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from ...errors import TomaEdgeError
from ...telemetry import MqttSettings, make_client
from ..predictor import Prediction
from .batcher import Overloaded, ShuttingDown
from .protocol import RequestError, decode_json, encode_answer, encode_error

if TYPE_CHECKING:
    from .app import Service

__all__ = ["MqttFrontEnd", "request_topic", "response_prefix"]

log = logging.getLogger("toma_edge.service")


def request_topic(fleet: str, device_id: str) -> str:
    """Where clients send inference requests for one device."""
    return f"toma-edge/v1/{fleet}/{device_id}/infer/request"


def response_prefix(fleet: str, device_id: str) -> str:
    """Response topics must start with this (then ``<client>[/...]``)."""
    return f"toma-edge/v1/{fleet}/{device_id}/infer/response/"


class MqttFrontEnd:
    """Takes inference requests over MQTT for a :class:`~.app.Service`."""

    def __init__(self, svc: Service, settings: MqttSettings) -> None:
        self.svc = svc
        self.settings = settings
        self.topic = request_topic(svc.fleet, svc.device_id)
        self.prefix = response_prefix(svc.fleet, svc.device_id)
        self.max_bytes = svc.config.max_body_bytes
        self.client = make_client(settings, client_id=f"toma-edge-{svc.fleet}-{svc.device_id}-infer")
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self._connected = threading.Event()
        self._taking = True
        self._lock = threading.Lock()
        self._outstanding = 0
        self._idle = threading.Condition(self._lock)
        #: requests that named no usable response topic (cannot be answered)
        self.unanswerable = 0

    @property
    def connected(self) -> bool:
        """Whether the broker connection is up and subscribed."""
        return self._connected.is_set()

    def start(self) -> None:
        """Connect in the background (retrying) and subscribe on every connect."""
        from ...telemetry import connect_properties

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
        """Wait for the answers of accepted requests (``timeout_s`` seconds), disconnect."""
        deadline = time.monotonic() + timeout_s
        with self._idle:
            while self._outstanding and time.monotonic() < deadline:
                self._idle.wait(0.05)
            ok = self._outstanding == 0
        time.sleep(0.05)  # let paho's thread hand over the last QoS 1 answers
        self.client.disconnect()
        self.client.loop_stop()
        return ok

    # -- paho callbacks (paho's network thread) --------------------------------------------
    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:
        if reason.is_failure:
            log.warning("MQTT broker %s refused the inference connection: %s",
                        self.settings.url, reason)
            return
        if self._taking:
            client.subscribe(self.topic, qos=1)
        self._connected.set()
        log.info("taking inference requests on %s", self.topic)

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any,
                       properties: Any) -> None:
        self._connected.clear()

    def _reply_to(self, msg: Any, obj: dict[str, Any] | None) -> tuple[str | None, Any, Any]:
        """(topic, correlation data, v3 id) of a request; topic None if unusable."""
        props = getattr(msg, "properties", None)
        topic = getattr(props, "ResponseTopic", None) if props is not None else None
        corr = getattr(props, "CorrelationData", None) if props is not None else None
        rid = None
        if obj is not None:
            rid = obj.get("id")
            if topic is None and isinstance(obj.get("reply_to"), str):
                topic = obj["reply_to"]
        if (not isinstance(topic, str) or not topic.startswith(self.prefix)
                or len(topic) == len(self.prefix) or "+" in topic or "#" in topic):
            return None, corr, rid
        return topic, corr, rid

    def _publish(self, topic: str, corr: Any, payload: bytes) -> None:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = None
        if corr is not None:
            props = Properties(PacketTypes.PUBLISH)
            props.CorrelationData = corr
        self.client.publish(topic, payload, qos=1, properties=props)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        t0 = time.perf_counter()
        obj: dict[str, Any] | None = None
        try:
            raw = json.loads(msg.payload) if len(msg.payload) <= self.max_bytes else None
            obj = raw if isinstance(raw, dict) else None
        except (ValueError, UnicodeDecodeError):
            obj = None
        topic, corr, rid = self._reply_to(msg, obj)
        if topic is None:
            self.unanswerable += 1
            self.svc.record("mqtt", 400, time.perf_counter() - t0, 0)
            log.warning("MQTT request on %s names no response topic under %s; dropped",
                        msg.topic, self.prefix)
            return
        extra = {"id": rid} if rid is not None else {}

        def fail(status: int, text: str) -> None:
            more = {"retry_after_s": 1} if status == 503 else {}
            self._publish(topic, corr, encode_error(text, status=status, **extra, **more))
            self.svc.record("mqtt", status, time.perf_counter() - t0, 0)

        try:
            if len(msg.payload) > self.max_bytes:
                raise RequestError(f"the request is {len(msg.payload)} bytes, more than the "
                                   f"{self.max_bytes} this device takes", 413)
            if not self._taking or self.svc.draining:
                raise ShuttingDown("the service is shutting down; retry on another device")
            _, rows = decode_json(msg.payload, self.svc.model.predictor,
                                  max_rows=self.svc.max_request_rows,
                                  extra_keys=("id", "reply_to"))
            n = int(rows.shape[0])

            def done(pred: Prediction | None, err: BaseException | None) -> None:
                try:
                    if isinstance(err, (Overloaded, ShuttingDown)):
                        fail(503, str(err))
                    elif err is not None:
                        fail(422 if isinstance(err, TomaEdgeError) else 500, str(err))
                    else:
                        assert pred is not None
                        self._publish(topic, corr, encode_answer(pred, **extra))
                        self.svc.record("mqtt", 200, time.perf_counter() - t0, n)
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
        except Exception as e:  # noqa: BLE001 - never stop paho's thread
            log.exception("MQTT request failed")
            fail(500, f"internal error: {type(e).__name__}: {e}")
