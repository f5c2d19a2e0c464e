"""One paho connection at a time, served on its owner's network thread until it is gone.

The device SDK (tomq.sensors.device) and the serial bridge's uplinks (tomq.bridge.uplink) both publish
from an outbox on disk and decide themselves what is resent after a reconnect, so both need the same
loop around paho: a fresh client per connection (paho then never resends on its own), paho driven
through loop_read / loop_write / loop_misc on one thread that a socket pair wakes, a CONNACK timeout,
a clean DISCONNECT with a grace period for it to be written, an abrupt close (no DISCONNECT) when the
broker must publish the last will instead, and reads bounded per wake-up. `SessionLoop` is that loop;
a subclass says who it is (`_paho_client`), when to hang up (`_hang_up`), and what to send while the
connection is up (`_serve`), and it sets `_accepted` from its on_connect callback.

What it must never do: send DISCONNECT when the owner asked for the will to speak, or keep serving a
connection the owner asked to leave (either way, a receiver would be told something false about
whether the device went away on purpose).
"""

from __future__ import annotations

import enum
import logging
import select
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from tomq.mqtt import close_without_disconnect, disable_nagle, poll_sockets
from tomq.wakeup import Wakeup

log = logging.getLogger("tomq.mqtt")

KEEPALIVE_SECONDS = 10
CONNECT_TIMEOUT = 3.0  # TCP connect to a black-holed host
CONNACK_TIMEOUT = 10.0  # a broker that took the TCP connection but does not answer CONNECT
DISCONNECT_GRACE = 2.0  # seconds for a DISCONNECT to be written before the socket is dropped
READS_PER_WAKE = 1000


class HangUp(enum.Enum):
    CLOSE = "close"  # drop the socket now, no DISCONNECT: the broker publishes the will
    DISCONNECT = "disconnect"  # clean DISCONNECT: the broker discards the will


class SessionLoop:
    """The network loop of one MQTT identity with a hand-made outbox (see the module docstring)."""

    #: What `_idle` does when woken: return (the uplink: a new join/will pair may be there), or go on
    #: waiting out the back-off (the device: every publish wakes it, and must not end a back-off).
    wake_ends_idle = False

    def __init__(self, *, label: str, host: str, port: int, keepalive: int) -> None:
        self.label = label  # "device temp1", "uplink s1": how log lines name us
        self.host, self.port, self.keepalive = host, port, keepalive
        self._accepted = False  # set by the subclass's on_connect once the broker accepted us
        self._wakeup = Wakeup()  # closed by the subclass once its network thread has ended

    # ------------------------------------------------------------------ for subclasses

    def _hang_up(self) -> HangUp | None:
        """Whether to end the connection now, and how (called on every turn of the loop)."""
        raise NotImplementedError

    def _serve(self, client: paho.Client) -> None:
        """Hand what is due to the connection (called while accepted and not hanging up)."""
        raise NotImplementedError

    def _finished(self) -> bool:
        """Whether the network thread is done (ends `_idle`)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the loop

    def _paho_client(self, *, client_id: str, username: str, password: str, will_topic: str, will: bytes,
                     clean_session: bool, on_connect: Callable[..., None], on_disconnect: Callable[..., None],
                     on_publish: Callable[..., None]) -> paho.Client:
        """A paho client for one connection: retained QoS 1 will, no paho-side queueing or in-flight cap
        (the owner bounds what it hands over), TCP_NODELAY, the connect timeout."""
        client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=paho.MQTTv311, clean_session=clean_session)
        client.username_pw_set(username, password)
        client.will_set(will_topic, will, qos=1, retain=True)
        client.max_inflight_messages_set(0)
        client.max_queued_messages_set(0)
        client.connect_timeout = CONNECT_TIMEOUT
        client.on_socket_open = disable_nagle
        client.on_connect = on_connect
        client.on_disconnect = on_disconnect
        client.on_publish = on_publish
        return client

    def _connect(self, client: paho.Client) -> bool:
        """TCP connect and write CONNECT; False if the broker cannot be reached (no CONNECT went out)."""
        self._accepted = False
        try:
            client.connect(self.host, self.port, keepalive=self.keepalive)
        except (OSError, ValueError) as exc:
            log.debug("%s cannot reach %s:%s: %s", self.label, self.host, self.port, exc)
            return False
        return True

    def _session(self, client: paho.Client) -> None:
        """Serve one connection until it is gone (or we hang up)."""
        started = time.monotonic()
        disconnect_sent: float | None = None
        while (sock := client.socket()) is not None:
            hang_up = self._hang_up()
            if hang_up is HangUp.CLOSE or (
                    disconnect_sent is not None and time.monotonic() - disconnect_sent > DISCONNECT_GRACE):
                close_without_disconnect(sock)
                return
            if not self._accepted and time.monotonic() - started > CONNACK_TIMEOUT:
                log.warning("%s: no CONNACK from %s:%s within %.0f s", self.label, self.host, self.port,
                            CONNACK_TIMEOUT)
                close_without_disconnect(sock)
                return
            if hang_up is HangUp.DISCONNECT and disconnect_sent is None:
                client.disconnect()
                disconnect_sent = time.monotonic()
            elif self._accepted and disconnect_sent is None:
                self._serve(client)
            mask = select.POLLIN | (select.POLLOUT if client.want_write() else 0)
            try:
                events = poll_sockets([(self._wakeup, select.POLLIN), (sock, mask)], self.keepalive / 2)
            except (OSError, ValueError):
                events = {}
            if self._wakeup.fileno() in events:
                self._wakeup.drain()
            if events.get(sock.fileno(), 0) & ~select.POLLOUT:
                self._read(client, sock)
            if client.socket() is sock and client.want_write():
                client.loop_write()
            if client.socket() is sock:
                client.loop_misc()  # keepalive pings; drops a connection that stopped answering

    def _read(self, client: paho.Client, sock: Any) -> None:
        for _ in range(READS_PER_WAKE):
            if client.loop_read() != paho.MQTT_ERR_SUCCESS or client.socket() is not sock:
                return
            if not poll_sockets([(sock, select.POLLIN)], 0):
                return

    def _idle(self, seconds: float) -> None:
        """Wait `seconds` (a back-off), or less once finished (or woken, if `wake_ends_idle`)."""
        deadline = time.monotonic() + seconds
        while not self._finished():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            if self._wakeup.wait(remaining) and self.wake_ends_idle:
                return

    def _wake(self) -> None:
        self._wakeup.set()
