"""A small, blocking-friendly adapter around paho-mqtt 2 for tomq's processes.

It connects with a member's identity (username = member name, password derived from its key),
reconnects with back-off when the broker goes away, re-subscribes after every reconnect, and hands
incoming messages to a callback. Everything here speaks MQTT 3.1.1, so it works the same against the
embedded amqtt broker and mosquitto (DESIGN.md §5, §8).

Two ways to drive it:

* threaded (the default, for clients: the proposer, the bench client, `tomq status`): paho's network
  thread reads, writes and reconnects; callbacks run on that thread.
* `threaded=False` (the node daemon): no second thread. The owner's loop calls `pump(timeout)`,
  which polls paho's socket and a wake-up socket, reads, writes, sends keepalive pings and
  reconnects; callbacks run inside `pump`, and `publish` writes on the calling thread. Every call
  except `wake()` must then come from that one thread. This is the aiomqtt way of driving paho, with
  poll() instead of asyncio, and it saves two thread hand-offs per message each way.

It never interprets payloads; paho exceptions are translated into `BrokerUnavailable`.
"""

from __future__ import annotations

import logging
import math
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from tomq.errors import TomqError, UsageError
from tomq.wakeup import Wakeup

log = logging.getLogger("tomq.mqtt")

MessageHandler = Callable[[str, bytes, bool], None]  # topic, payload, retained

KEEPALIVE_SECONDS = 10
RECONNECT_MIN_DELAY, RECONNECT_MAX_DELAY = 1, 4  # seconds, doubling; reset after a broker accepts us
# In non-threaded mode a TCP connect blocks the owner's loop. A refused connect (the broker is down,
# its host is up) returns at once; this bounds the black-holed case (host gone, SYNs dropped).
PUMP_CONNECT_TIMEOUT = 1.0
PUMP_MAX_PACKETS = 1000  # packets read per pump: the caller handles a batch, then comes back


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
        threaded: bool = True,
    ) -> None:
        self.host, self.port, self.username = host, port, username
        self.threaded = threaded
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
        # No cap on QoS 1 messages in flight either: past a cap, paho walks every message it holds on
        # each PUBACK to find the next one to send, which made a burst of 5,000 proposals quadratic
        # (a third of a publishing client's CPU in bench/cluster.py). The broker's TCP window and
        # our own flow (proposers wait for their records) bound what is outstanding instead.
        self.client.max_inflight_messages_set(0)
        self.client.max_queued_messages_set(0)
        self.client.reconnect_delay_set(min_delay=RECONNECT_MIN_DELAY, max_delay=RECONNECT_MAX_DELAY)
        if will is not None:
            self.client.will_set(will[0], will[1], qos=1, retain=will[2])
        self.client.on_socket_open = disable_nagle
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        # Non-threaded mode only: what cuts a pump short, and when to try the broker next.
        self._wakeup: Wakeup | None = None
        self._stopped = False
        self._next_attempt: float | None = None  # monotonic time of the next connect attempt
        self._reconnect_delay: float | None = None  # the wait before the attempt after that
        if not threaded:
            self._wakeup = Wakeup()
            self.client.connect_timeout = PUMP_CONNECT_TIMEOUT

    def start(self, timeout: float = 10.0) -> None:
        """Connect, retrying while the broker is not up yet; raise `BrokerUnavailable` after `timeout`.

        Threaded: then paho's network thread runs. Non-threaded: this pumps until the broker has
        accepted us (callbacks may already run), and the owner calls `pump` from then on.
        """
        try:
            self.client.connect_async(self.host, self.port, keepalive=KEEPALIVE_SECONDS)
        except (OSError, ValueError) as exc:
            raise BrokerUnavailable(f"cannot reach broker {self.host}:{self.port}: {exc}") from None
        if self.threaded:
            self.client.loop_start()
            accepted = self._connected.wait(timeout)
        else:
            self._next_attempt = time.monotonic()  # the first attempt at once, later ones with back-off
            accepted = self.wait_connected(timeout)
        if not accepted:
            reason = self.refusal or "no answer"
            self.stop()
            raise BrokerUnavailable(f"broker {self.host}:{self.port} did not accept {self.username} "
                                    f"within {timeout:.0f} s ({reason})")

    def stop(self) -> None:
        if self.threaded:
            try:
                self.client.disconnect()
            finally:
                self.client.loop_stop()
            return
        if self._stopped:
            return
        self._stopped = True
        client = self.client
        try:
            client.disconnect()  # writes DISCONNECT now (we are the only thread) and closes the socket
            # ...unless the socket's buffer is full: give what is queued a moment to go out.
            deadline = time.monotonic() + 1.0
            while (sock := client.socket()) is not None and client.want_write():
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not poll_sockets([(sock, select.POLLOUT)], remaining):
                    break
                client.loop_write()
        finally:
            if self._wakeup is not None:
                self._wakeup.close()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def subscribe(self, topic_filter: str, qos: int = 0) -> None:
        with self._lock:
            self._subscriptions[topic_filter] = qos
        if self._connected.is_set():
            self.client.subscribe(topic_filter, qos)

    def unsubscribe(self, topic_filter: str) -> None:
        with self._lock:
            self._subscriptions.pop(topic_filter, None)
        if self._connected.is_set():
            self.client.unsubscribe(topic_filter)

    def publish(self, topic: str, payload: bytes, *, qos: int = 0, retain: bool = False) -> bool:
        """Publish; returns False (never raises) when the client is not connected right now.

        Non-threaded, the packet is written on the calling thread before this returns (what the
        socket will not take now goes out from the next `pump`).
        """
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        return info.rc == paho.MQTT_ERR_SUCCESS

    def wait_connected(self, timeout: float) -> bool:
        if self.threaded:
            return self._connected.wait(timeout)
        deadline = time.monotonic() + timeout
        while not self._connected.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self.pump(min(remaining, 0.1))
        return True

    # ------------------------------------------------------------ non-threaded mode

    def wake(self) -> None:
        """Make a `pump` waiting in another thread (or interrupted by a signal handler) return now.

        Safe from any thread and from signal handlers: it never blocks and never raises.
        """
        if self._wakeup is None:
            raise UsageError("wake() is for a link made with threaded=False")
        self._wakeup.set()

    def pump(self, timeout: float) -> None:
        """Wait up to `timeout` seconds for the broker or a `wake()`, handle what came, and return.

        Reads up to PUMP_MAX_PACKETS packets (their callbacks run here), writes what is pending, sends
        keepalive pings, and while disconnected tries the broker again with back-off (1, 2, 4, 4 ... s).
        Returns early after a wake-up, when something was read, or after half the keepalive period;
        never blocks much longer than `timeout` (a connect attempt can take up to PUMP_CONNECT_TIMEOUT
        on a black-holed host).
        """
        wakeup = self._wakeup
        if wakeup is None:
            raise UsageError("pump() is for a link made with threaded=False; this one has paho's thread")
        if self._stopped:
            time.sleep(max(0.0, timeout))
            return
        client = self.client
        self._reconnect_if_due()
        sock = client.socket()
        wait = min(max(0.0, timeout), KEEPALIVE_SECONDS / 2)  # a long timeout must not starve the pings
        watched: list[tuple[Any, int]] = [(wakeup, select.POLLIN)]
        if sock is None:
            if self._next_attempt is not None:
                wait = min(wait, max(0.0, self._next_attempt - time.monotonic()))
        else:
            if _pending(sock):
                wait = 0.0
            watched.append((sock, select.POLLIN | (select.POLLOUT if client.want_write() else 0)))
        try:
            events = poll_sockets(watched, wait)
        except (OSError, ValueError):  # the socket was closed under us: handled as a lost connection
            events = {}
        if wakeup.fileno() in events:
            wakeup.drain()
        if sock is not None:
            ready = events.get(sock.fileno(), 0)
            if ready & ~select.POLLOUT or _pending(sock):  # data, or a hang-up/error loop_read will see
                self._read(sock)
            # Callbacks (on_connect's subscribes, QoS 1 acknowledgements) only queue their packets.
            if client.socket() is sock and (ready & select.POLLOUT or client.want_write()):
                client.loop_write()
            if client.socket() is sock:
                client.loop_misc()  # keepalive ping; drops a connection that stopped answering
        self._reconnect_if_due()

    def _read(self, sock: Any) -> None:
        client = self.client
        for _ in range(PUMP_MAX_PACKETS):
            # paho's loop_read reads one packet at a time here (no QoS>0 messages in flight).
            if client.loop_read() != paho.MQTT_ERR_SUCCESS or client.socket() is not sock:
                return
            if not _readable_now(sock):
                return

    def _reconnect_if_due(self) -> None:
        """While there is no socket: schedule the next attempt, or make it if it is due."""
        if self._stopped or self.client.socket() is not None:
            return
        now = time.monotonic()
        if self._next_attempt is None:  # the connection was just lost
            self._next_attempt = now + self._next_delay()
            return
        if now < self._next_attempt:
            return
        self._next_attempt = None
        try:
            self.client.reconnect()  # the TCP connect, then CONNECT is written; CONNACK comes via pump
        except (OSError, ValueError) as exc:
            log.debug("%s cannot reach %s:%s: %s", self.username, self.host, self.port, exc)
        if self.client.socket() is None:
            self._next_attempt = time.monotonic() + self._next_delay()

    def _next_delay(self) -> float:
        delay = RECONNECT_MIN_DELAY if self._reconnect_delay is None else min(self._reconnect_delay * 2,
                                                                             RECONNECT_MAX_DELAY)
        self._reconnect_delay = delay
        return delay

    # paho callbacks run on paho's network thread (threaded) or inside pump (non-threaded).

    def _on_connect(self, client: paho.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if reason.is_failure:
            self.refusal = str(reason)
            log.warning("broker %s:%s refused %s: %s", self.host, self.port, self.username, reason)
            return
        self.connects += 1
        self._reconnect_delay = None
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
            except Exception:  # a handler bug must not kill paho's thread (or the pump) and the node's network
                log.exception("handler failed for a message on %s", message.topic)


def poll_sockets(watched: list[tuple[Any, int]], timeout: float) -> dict[int, int]:
    """poll() the (socket, events) pairs for up to `timeout` s: {fd: events seen}. No FD_SETSIZE limit."""
    poller = select.poll()
    for sock, mask in watched:
        poller.register(sock, mask)
    return dict(poller.poll(math.ceil(max(0.0, timeout) * 1000)))


def close_without_disconnect(sock: Any) -> None:
    """Close an MQTT connection without DISCONNECT: the broker then publishes the client's will."""
    try:
        sock.close()
    except OSError:
        pass


def _readable_now(sock: Any) -> bool:
    return _pending(sock) or bool(poll_sockets([(sock, select.POLLIN)], 0))


def _pending(sock: Any) -> bool:
    """Bytes a TLS socket has decrypted but not handed out yet: select() cannot see them."""
    pending = getattr(sock, "pending", None)
    return bool(pending()) if pending is not None else False


def disable_nagle(_client: paho.Client, _userdata: Any, sock: Any) -> None:
    """paho's on_socket_open hook: TCP_NODELAY on the broker connection."""
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
