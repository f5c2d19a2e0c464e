"""One MQTT identity the bridge publishes as: its outbox on disk, its broker connection, its presence.

The bridge makes one `Uplink` per identity it speaks for:

- a device-signed device: username = the device's name, password = the one its firmware derived
  from its key (the bridge never has the key), will and join = the envelopes the device signed in
  its latest hello; readings are the device's own envelopes, published unchanged on dev/<device>/data;
- the bridge's own identity (bridge-attested sensors): its key and certificate from the cluster
  directory; it signs its join, will and every attested reading, on dev/<bridge>/data.

Ordering rules (the same as the device SDK's, tomq.sensors.device):
- A record is in the outbox (fsync'd) before it is handed to MQTT, and leaves it only when the
  broker's PUBACK arrives; after a reconnect everything pending goes out again, oldest first, at
  most `max_in_flight` at a time, before anything newer.
- A stored record goes out only once the bridge has `release`d it, which it does once the device's
  high-water mark covering it is durable too: a record that was published (and so may leave the
  outbox) is never the only trace of a device reading having been taken. What a previous run left
  in the outbox is released from the start (the bridge recovered and persisted its marks first).
- Each connection needs a join and will nobody has used before (`Presence.next_pair`): the broker may
  have published the old will, and a join the nodes have already seen would not bring the device back.
  A pair is used once CONNECT may have reached the broker; one whose TCP connection failed is kept.
  A device-signed uplink that has none waits (its readings stay on disk) until the device says hello
  again; the bridge asks it to.
- The join goes out (retained, QoS 1) before any reading on a connection.

Threads: one network thread per uplink owns its paho client (tomq.mqtt_session.SessionLoop, as for
tomq.sensors.device); `store`, `stop` and `vanish` may be called from any thread
and touch only the outbox and counters, under a lock. A fresh paho client is made per connection,
so paho never resends on its own.

What this module must never do: publish a record that is not on disk, drop a record the broker has
not acknowledged, or reuse a join/will pair.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import paho.mqtt.client as paho

from tomq import canonical
from tomq.identity import SigningKey
from tomq.mqtt_session import KEEPALIVE_SECONDS, HangUp, SessionLoop
from tomq.sensors.outbox import Outbox
from tomq.topics import Topics
from tomq.wire import SequenceCounter, seal

log = logging.getLogger("tomq.bridge.uplink")

MAX_IN_FLIGHT = 100
RECONNECT_MIN_DELAY, RECONNECT_MAX_DELAY = 0.25, 4.0


class Presence(Protocol):
    def next_pair(self) -> tuple[bytes, bytes] | None:
        """A join and a will never used before, or None if there is none now."""


class SelfPresence:
    """Joins and wills the bridge signs itself, numbered from its own counter."""

    def __init__(self, key: SigningKey, certificate: bytes, counter: SequenceCounter,
                 clock: Callable[[], float] = time.time) -> None:
        self.key, self.certificate, self.counter, self.clock = key, certificate, counter, clock
        self.lock = threading.Lock()  # the counter is shared with the sealing of readings

    def next_pair(self) -> tuple[bytes, bytes]:
        now_ms = int(self.clock() * 1000)
        with self.lock:
            join_seq, will_seq = self.counter.next(), self.counter.next()
        return (seal(self.key, seq=join_seq, time_ms=now_ms, type="join", body={"certificate": self.certificate}),
                seal(self.key, seq=will_seq, time_ms=now_ms, type="leave", body={"reason": "vanished"}))


class DevicePresence:
    """Joins and wills a device-signed device made in its hellos; each pair is used once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pair: tuple[int, bytes, bytes] | None = None
        self._used: int = 0  # the hello seq of the last pair handed out
        self.wanted = False  # an uplink asked for a pair and there was none: ask the device to say hello

    def offer(self, hello_seq: int, join: bytes, will: bytes) -> None:
        with self._lock:
            if hello_seq > self._used and (self._pair is None or hello_seq > self._pair[0]):
                self._pair = (hello_seq, join, will)

    def next_pair(self) -> tuple[bytes, bytes] | None:
        with self._lock:
            if self._pair is None:
                self.wanted = True
                return None
            seq, join, will = self._pair
            self._pair = None
            self._used = seq
            return join, will


@dataclass(frozen=True, slots=True)
class UplinkCounters:
    stored: int  # records put in the outbox by this process
    published: int  # records the broker acknowledged
    resent: int  # records sent again on a new connection
    outbox: int  # records waiting for a PUBACK
    connects: int  # connections the broker accepted


class Uplink(SessionLoop):
    wake_ends_idle = True  # a wake-up may bring the join/will pair we wait for, or end a vanish

    def __init__(self, *, name: str, cluster: str, host: str, port: int, password: str, directory: Path,
                 presence: Presence, client_id: str, max_in_flight: int = MAX_IN_FLIGHT,
                 keepalive: int = KEEPALIVE_SECONDS) -> None:
        super().__init__(label=f"uplink {name}", host=host, port=port, keepalive=keepalive)
        self.name = name
        topics = Topics(cluster)
        self.data_topic = topics.device_data(name)
        self.state_topic = topics.device_state(name)
        self.password, self.client_id = password, client_id
        self.presence = presence
        self.max_in_flight = max_in_flight
        directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._drained = threading.Condition(self._lock)
        self._outbox = Outbox(directory / "outbox.log")
        self._stored = self._published = self._resent = self._connects = 0
        self._maybe_sent: set[int] = {key for key, _ in self._outbox.pending()}
        self._released = self._outbox.last_key
        self._stop = False
        self._vanish = False  # drop the connection without DISCONNECT: the broker publishes the will
        self.connected = threading.Event()
        self.refusal: str | None = None
        self._thread: threading.Thread | None = None
        # Owned by the network thread.
        self._in_flight: dict[int, int] = {}
        self._handed_upto = 0
        self._join: bytes = b""

    # ------------------------------------------------------------------ the bridge's side

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"tomq-bridge-uplink-{self.name}", daemon=True)
        self._thread.start()

    def store(self, key: int, record: bytes) -> None:
        """Put one record (see `pack`) in the outbox: on disk when this returns. Keys must rise.
        It is not published before `release`."""
        with self._lock:
            self._outbox.append(key, record)
            self._stored += 1

    def release(self, upto: int) -> None:
        """Records stored under keys up to `upto` may be published now."""
        with self._lock:
            self._released = max(self._released, upto)
        self.wake()

    def pending_records(self) -> list[tuple[int, bytes]]:
        with self._lock:
            return list(self._outbox.pending())

    @property
    def last_key(self) -> int:
        with self._lock:
            return self._outbox.last_key

    def vanish(self) -> None:
        """Leave the broker without DISCONNECT (the will speaks: "vanished"), and stay off until a new pair."""
        with self._lock:
            self._vanish = True
        self.wake()

    def resume(self) -> None:
        with self._lock:
            self._vanish = False
        self.wake()

    def wait_drained(self, timeout: float) -> bool:
        with self._drained:
            return self._drained.wait_for(lambda: len(self._outbox) == 0, timeout)

    def stop(self, timeout: float = 5.0) -> None:
        with self._lock:
            self._stop = True
        self.wake()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("uplink %s: the network thread did not stop", self.name)
                return
        with self._lock:
            self._outbox.close()
        self._wakeup.close()

    def counters(self) -> UplinkCounters:
        with self._lock:
            return UplinkCounters(self._stored, self._published, self._resent, len(self._outbox), self._connects)

    def wake(self) -> None:
        self._wake()

    # ------------------------------------------------------------------ the network thread

    def _run(self) -> None:
        delay: float | None = None
        spare: tuple[bytes, bytes] | None = None
        try:
            while not self._stopping():
                if self._vanishing():
                    self._idle(1.0)
                    continue
                pair = spare or self.presence.next_pair()
                spare = None
                if pair is None:
                    self._idle(0.2)  # the bridge asks the device for a new hello meanwhile
                    continue
                client = self._new_client(*pair)
                if self._connect(client):
                    self._session(client)
                    self._connection_lost()
                    if self._accepted:
                        delay = None
                else:
                    spare = pair  # no TCP connection, so no CONNECT: the broker never saw this will
                if self._stopping():
                    break
                delay = RECONNECT_MIN_DELAY if delay is None else min(delay * 2, RECONNECT_MAX_DELAY)
                self._idle(delay)
        except Exception:  # loud; the outbox keeps every record for the next start
            log.exception("uplink %s: the network thread failed", self.name)
        finally:
            self.connected.clear()

    def _stopping(self) -> bool:
        with self._lock:
            return self._stop

    def _vanishing(self) -> bool:
        with self._lock:
            return self._vanish

    def _finished(self) -> bool:
        return self._stopping()

    def _new_client(self, join: bytes, will: bytes) -> paho.Client:
        self._join = join
        return self._paho_client(client_id=self.client_id, username=self.name, password=self.password,
                                 will_topic=self.state_topic, will=will, clean_session=True,
                                 on_connect=self._on_connect, on_disconnect=self._on_disconnect,
                                 on_publish=self._on_publish)

    def _hang_up(self) -> HangUp | None:
        with self._lock:
            stop, vanish = self._stop, self._vanish
        if vanish:
            return HangUp.CLOSE  # the broker publishes the will
        if stop:
            return HangUp.DISCONNECT  # clean: the broker discards the will
        return None

    def _serve(self, client: paho.Client) -> None:
        room = self.max_in_flight - len(self._in_flight)
        if room <= 0:
            return
        with self._lock:
            batch = [(key, record) for key, record in self._outbox.pending(after=self._handed_upto, limit=room)
                     if key <= self._released]
            again = [key for key, _ in batch if key in self._maybe_sent]
            self._maybe_sent.difference_update(again)
            self._resent += len(again)
        for key, record in batch:
            info = client.publish(self.data_topic, unpack(record)[2], qos=1)
            self._in_flight[info.mid] = key
            self._handed_upto = key

    def _connection_lost(self) -> None:
        self.connected.clear()
        with self._lock:
            self._maybe_sent.update(self._in_flight.values())
        self._in_flight.clear()
        self._handed_upto = 0

    def _on_connect(self, client: paho.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if reason.is_failure:
            if self.refusal != str(reason):
                log.warning("broker %s:%s refused %s: %s (retrying)", self.host, self.port, self.name, reason)
            self.refusal = str(reason)
            return
        self._accepted = True
        self.refusal = None
        with self._lock:
            self._connects += 1
        client.publish(self.state_topic, self._join, qos=1, retain=True)  # before any reading
        self.connected.set()
        log.info("uplink %s connected to %s:%s", self.name, self.host, self.port)

    def _on_disconnect(self, _client: paho.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        self.connected.clear()
        if self._accepted and getattr(reason, "is_failure", False):
            log.warning("uplink %s lost the broker (%s); records wait in the outbox", self.name, reason)

    def _on_publish(self, _client: paho.Client, _userdata: Any, mid: int, _reason: Any, _props: Any) -> None:
        key = self._in_flight.pop(mid, None)
        if key is None:
            return  # the join's acknowledgement
        with self._lock:
            if self._outbox.mark_done(key):
                self._published += 1
            if len(self._outbox) == 0:
                self._drained.notify_all()


def pack(device: str, device_seq: int, wire: bytes) -> bytes:
    """An outbox record: which device reading it carries (to recover high-water marks), and the bytes."""
    return canonical.encode([device, device_seq, wire])


def unpack(record: bytes) -> tuple[str, int, bytes]:
    device, device_seq, wire = canonical.decode(record)
    return str(device), int(device_seq), bytes(wire)



