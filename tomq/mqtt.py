"""A small, blocking-friendly adapter around paho-mqtt 2 for tomq's processes.

It connects with a member's identity (username = member name, password derived from its key),
reconnects with back-off when the broker goes away, re-subscribes after every reconnect, and hands
incoming messages to a callback on paho's network thread. Everything here speaks MQTT 3.1.1, so it
works the same against the embedded amqtt broker and mosquitto (DESIGN.md §5, §8).

It never interprets payloads; paho exceptions are translated into `BrokerUnavailable`.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from tomq.errors import TomqError

log = logging.getLogger("tomq.mqtt")

MessageHandler = Callable[[str, bytes, bool], None]  # topic, payload, retained


class BrokerUnavailable(TomqError):
    """The broker could not be reached or refused us within the time allowed."""


class MqttLink:
    def __init__(
        self,
        *,
        host: str,
        port: int,
        username: str,
        password: str,
        client_id: str | None = None,
        on_message: MessageHandler | None = None,
        will: tuple[str, bytes, bool] | None = None,  # topic, payload, retain
    ) -> None:
        self.host, self.port, self.username = host, port, username
        self._subscriptions: dict[str, int] = {}
        self._connected = threading.Event()
        self._lock = threading.Lock()
        self.on_message = on_message
        self.connects = 0
        self.refusal: str | None = None
        self.client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id or f"{username}-{os.getpid()}-{os.urandom(3).hex()}",
            protocol=paho.MQTTv311,
            clean_session=True,
        )
        self.client.username_pw_set(username, password)
        # Raft traffic is many small messages: lift paho's default caps so bursts are not queued in Python.
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        self.client.reconnect_delay_set(min_delay=1, max_delay=4)
        if will is not None:
            self.client.will_set(will[0], will[1], qos=1, retain=will[2])
        self.client.on_socket_open = _no_delay
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message

    def start(self, timeout: float = 10.0) -> None:
        """Connect (retrying while the broker is not up yet) and start paho's network thread."""
        try:
            self.client.connect_async(self.host, self.port, keepalive=10)
        except (OSError, ValueError) as exc:
            raise BrokerUnavailable(f"cannot reach broker {self.host}:{self.port}: {exc}") from None
        self.client.loop_start()
        if not self._connected.wait(timeout):
            reason = self.refusal or "no answer"
            self.stop()
            raise BrokerUnavailable(f"broker {self.host}:{self.port} did not accept {self.username} "
                                    f"within {timeout:.0f} s ({reason})")

    def stop(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def subscribe(self, topic_filter: str, qos: int = 0) -> None:
        with self._lock:
            self._subscriptions[topic_filter] = qos
        if self._connected.is_set():
            self.client.subscribe(topic_filter, qos)

    def publish(self, topic: str, payload: bytes, *, qos: int = 0, retain: bool = False) -> bool:
        """Publish; returns False (never raises) when the client is not connected right now."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        return info.rc == paho.MQTT_ERR_SUCCESS

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    # paho callbacks run on paho's network thread.

    def _on_connect(self, client: paho.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if reason.is_failure:
            self.refusal = str(reason)
            log.warning("broker %s:%s refused %s: %s", self.host, self.port, self.username, reason)
            return
        self.connects += 1
        with self._lock:
            subscriptions = list(self._subscriptions.items())
        for topic_filter, qos in subscriptions:
            client.subscribe(topic_filter, qos)
        self._connected.set()
        if self.connects > 1:
            log.info("%s reconnected to %s:%s", self.username, self.host, self.port)

    def _on_disconnect(self, _client: paho.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        self._connected.clear()
        if reason is not None and getattr(reason, "is_failure", False):
            log.warning("%s lost the broker (%s); reconnecting with back-off", self.username, reason)

    def _on_message(self, _client: paho.Client, _userdata: Any, message: paho.MQTTMessage) -> None:
        if self.on_message is not None:
            try:
                self.on_message(message.topic, bytes(message.payload), bool(message.retain))
            except Exception:  # a handler bug must not kill paho's thread and with it the node's network
                log.exception("handler failed for a message on %s", message.topic)


def _no_delay(_client: paho.Client, _userdata: Any, sock: Any) -> None:
    # paho leaves Nagle on. tomq sends many small messages (Raft, acknowledgements, audit lines), and
    # Nagle holds each small write until the previous one is acknowledged, which the peer's delayed
    # ACK can postpone by up to 40 ms: the QoS 1 stalls of 44-88 ms the issue measured.
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        pass  # not a TCP socket (a unix socket or a websocket wrapper): nothing to turn off


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
