"""The service instance's broker session: `ServiceLink`, a small paho-mqtt 2 client, and `Inbound`.

MQTT 3.1.1, TCP_NODELAY, reconnect with back-off, a PERSISTENT session under client id
`tomq-<cluster>-<service>-<replica>` (ServiceContext.client_id) and MANUAL acknowledgements. An
input is acknowledged only when its owner hands it to `ack`: when what it produced is committed, or
it was refused for good. Until then the broker keeps it for this client id, so a killed instance, or
the next instance of the same replica on another node, gets it again. No reading is lost; a
duplicate is harmless, because data ids are derived from the data and Table II refuses a second
PROV-DATA for a datum.

The callbacks given to a ServiceLink run on paho's network thread; they should only hand the
message over (ServiceRunner enqueues it for its own loop).

What this module must never do: acknowledge a message on its own initiative, or give up the
persistent session (a clean session would drop every input not yet acknowledged).
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

log = logging.getLogger("tomq.service")


@dataclass(frozen=True, slots=True)
class Inbound:
    """One message from the broker. QoS 1 inputs must be handed back to `ack` exactly when done."""

    topic: str
    payload: bytes
    qos: int
    mid: int
    retained: bool
    duplicate: bool


class ServiceLink:
    """paho-mqtt 2 with a persistent session and manual acknowledgements, on paho's own thread.

    Subscriptions are (re)made on every connect, so they hold whether or not the broker kept the
    session. `on_ready(session_present)` is called once the broker has granted them all.
    """

    def __init__(self, *, host: str, port: int, username: str, password: str, client_id: str,
                 on_message: Callable[[Inbound], None], on_ready: Callable[[bool], None],
                 persistent: bool = True, keepalive: int = 20) -> None:
        self.host, self.port, self.keepalive = host, port, keepalive
        self._on_message = on_message
        self._on_ready = on_ready
        self._subscriptions: dict[str, int] = {}
        self._subscribing: tuple[int, bool, list[str]] | None = None  # (mid, session present, filters)
        self.connected = threading.Event()
        self._client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=not persistent,
                                   protocol=paho.MQTTv311, manual_ack=True)
        self._client.username_pw_set(username, password)
        self._client.reconnect_delay_set(1, 8)
        self._client.max_inflight_messages_set(200)  # our own outgoing QoS 1: proposals and outputs
        self._client.on_socket_open = self._socket_open
        self._client.on_connect = self._connected
        self._client.on_subscribe = self._subscribed
        self._client.on_disconnect = self._disconnected
        self._client.on_message = self._message
        self.username = username

    def subscribe(self, topic_filter: str, qos: int) -> None:
        """Register a subscription; made at the next connect (call before `start`)."""
        self._subscriptions[topic_filter] = qos

    def start(self) -> None:
        self._client.connect_async(self.host, self.port, self.keepalive)
        self._client.loop_start()

    def stop(self) -> None:
        # DISCONNECT leaves a persistent session in place: whatever is unacknowledged stays queued
        # for the next instance of this replica.
        self._client.disconnect()
        self._client.loop_stop()

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> bool:
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        # Not connected: paho keeps a QoS 1 message and sends it after the reconnect.
        return info.rc in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN)

    def ack(self, message: Inbound) -> None:
        if message.qos > 0:
            self._client.ack(message.mid, message.qos)

    # paho's thread --------------------------------------------------------------------------

    def _socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        # Proposals, audit lines and acknowledgements are small: without this, Nagle's algorithm and
        # delayed ACKs add tens of milliseconds to every commit round trip.
        if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _connected(self, client: paho.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            log.error("broker %s:%s refused %s: %s (retrying)", self.host, self.port, self.username, reason_code)
            return
        session_present = bool(getattr(flags, "session_present", False))
        log.info("connected to %s:%s as %s (session %s)", self.host, self.port, self.username,
                 "resumed" if session_present else "new")
        self.connected.set()
        filters = list(self._subscriptions.items())
        if not filters:
            self._on_ready(session_present)
            return
        result, mid = client.subscribe(filters)
        if result != paho.MQTT_ERR_SUCCESS or mid is None:
            log.error("could not subscribe (%s); will subscribe again on the next connect", result)
            return
        self._subscribing = (mid, session_present, [f for f, _ in filters])

    def _subscribed(self, client: paho.Client, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        pending = self._subscribing
        if pending is None or pending[0] != mid:
            return
        self._subscribing = None
        for topic_filter, code in zip(pending[2], reason_codes, strict=False):
            if getattr(code, "is_failure", False):
                log.error("broker refused the subscription %s for %s: %s", topic_filter, self.username, code)
        self._on_ready(pending[1])

    def _disconnected(self, client: paho.Client, userdata: Any, flags: Any, reason_code: Any,
                      properties: Any) -> None:
        self.connected.clear()
        if reason_code != 0:
            log.warning("lost the broker connection (%s); reconnecting", reason_code)

    def _message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        self._on_message(Inbound(message.topic, bytes(message.payload), message.qos, message.mid,
                                 bool(message.retain), bool(message.dup)))
