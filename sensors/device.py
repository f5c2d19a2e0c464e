"""The device SDK: `Device`, a sensor (or an actuator, for its reports) that signs and publishes readings.

    device = Device.from_cluster_dir("site", "temp1")
    device.start()                       # join: retained signed "join" on dev/temp1/state
    seq = device.publish(21.5, "degC")   # signed reading on dev/temp1/data, QoS 1
    device.leave()                       # retained signed "leave" (graceful), clean disconnect

What goes on the wire (DESIGN.md §3; topics below tomq/<cluster>/):

    dev/<name>/state   retained, QoS 1   join  {"certificate": <the device's certificate bytes>}
                                          leave {"reason": "graceful"}   (leave())
                                          leave {"reason": "vanished"}   (the MQTT last will)
    dev/<name>/data    QoS 1              readings (tomq.node.services.readings.seal_reading)
    dev/<name>/cmd     subscribed, QoS 1  whatever the cluster sends; kept raw in `commands`

Ordering rules:
- A reading is appended to the on-disk outbox (fsync'd) BEFORE it is handed to MQTT, and leaves the
  outbox only when the broker's PUBACK for it arrives. So a reading `publish` returned a seq for is
  sent at least once, across lost connections and process restarts; receivers drop duplicates by
  sequence number.
- Readings go out oldest first. After a reconnect (or a restart) everything still in the outbox is
  sent again, in order, before anything newer; at most `max_in_flight` readings are unacknowledged
  at once, so a long backlog does not overrun the broker's per-client queue.
- Every connection reserves two sequence numbers S, S+1 from the device's persistent counter
  before it connects: S+1 goes into the last will ("leave"/"vanished"), S into the join published
  once the broker accepts the connection, and `leave()` uses S+1 too, so the broker either
  publishes the will or forgets it (clean DISCONNECT), never both under different numbers. A
  device that reconnects joins again with a new pair: a will may have been published for the old
  connection, and the retained join must outrank it. One counter numbers all of the device's
  envelopes, so its numbers rise across restarts.
- Payloads too large for a reading (an image, a trace) stay off-chain: `publish(payload=...)` writes
  them to `<data dir>/blobs/<sha256 hex>` and the reading carries only the hash.

Threads: one network thread per device owns the paho client (tomq.mqtt_session.SessionLoop: paho
driven through loop_read / loop_write / loop_misc on that thread, woken through a socket pair); `publish`, `leave` and
`stop` may be called from any thread and only touch the outbox and counters under a lock. A fresh
paho client is made for every connection, so paho never resends messages on its own: this class
alone decides what is resent, and in what order. on_command runs on the network thread.

What this module must never do: publish a reading that is not yet on disk, acknowledge (drop from
the outbox) a reading the broker has not acknowledged, reuse a sequence number, or disconnect
cleanly after a leave that was not acknowledged (the will must then speak for the device).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho

from tomq import cluster as clusters
from tomq.cluster import DEVICE_ROLES, broker_password
from tomq.durable import lock_directory, replace_file
from tomq.errors import ConfigError, InvalidTopic, UsageError
from tomq.identity import SigningKey
from tomq.mqtt import BrokerUnavailable
from tomq.mqtt_session import CONNECT_TIMEOUT, DISCONNECT_GRACE, KEEPALIVE_SECONDS, HangUp, SessionLoop
from tomq.node.services.readings import seal_reading
from tomq.sensors.outbox import Outbox
from tomq.topics import Topics, check_segment
from tomq.wire import SequenceCounter, seal

log = logging.getLogger("tomq.sensors.device")

MAX_IN_FLIGHT = 100  # unacknowledged readings at once; mosquitto queues 1000 per client by default
RECONNECT_MIN_DELAY, RECONNECT_MAX_DELAY = 0.5, 4.0  # seconds, doubling; reset once a broker accepts us
MAX_KEPT_COMMANDS = 1000  # `commands` keeps the latest this many; on_command sees every one


@dataclass(frozen=True, slots=True)
class DeviceCounters:
    published: int  # readings sealed and put in the outbox by this process
    acked: int  # readings the broker acknowledged (PUBACK) to this process
    resent: int  # readings sent again on a new connection or after a restart (no PUBACK had come)
    outbox: int  # readings waiting for a PUBACK now (in flight or not yet sent)
    connects: int  # connections the broker accepted


class Device(SessionLoop):
    """One device's identity, outbox and broker connection. See the module docstring."""

    def __init__(
        self,
        *,
        cluster: str,
        host: str,
        port: int,
        name: str,
        key: SigningKey,
        certificate: bytes,
        data_dir: str | os.PathLike[str],
        keepalive: int = KEEPALIVE_SECONDS,
        max_in_flight: int = MAX_IN_FLIGHT,
        clock: Callable[[], float] = time.time,
    ) -> None:
        try:
            check_segment(name, "device name")
            self.topics = Topics(cluster)
        except InvalidTopic as exc:
            raise ConfigError(str(exc)) from None
        if max_in_flight < 1:
            raise ConfigError("max_in_flight must be at least 1")
        super().__init__(label=f"device {name}", host=host, port=port, keepalive=keepalive)
        self.cluster, self.name = cluster, name
        self.key = key
        self.certificate = bytes(certificate)
        self.max_in_flight = max_in_flight
        self.clock = clock
        self.client_id = f"tomq-{cluster}-dev-{name}"  # stable: the broker keeps the session (cmd queue)
        self.data_topic = self.topics.device_data(name)
        self.state_topic = self.topics.device_state(name)
        self.cmd_topic = self.topics.device_cmd(name)
        self._password = broker_password(key)

        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.blob_dir = self.data_dir / "blobs"
        lock_fd = lock_directory(self.data_dir)
        if lock_fd is None:
            raise ConfigError(f"{self.data_dir} is in use by another process running device {name}")
        self._lock_fd = lock_fd
        try:
            self._sequence = SequenceCounter(self.data_dir / "seq")
            self._outbox = Outbox(self.data_dir / "outbox.log")
        except BaseException:
            os.close(self._lock_fd)
            raise

        # Shared between the caller's threads and the network thread: guarded by _lock.
        self._lock = threading.Lock()
        self._drained = threading.Condition(self._lock)
        self._published = self._acked = self._resent = self._connects = 0
        self._maybe_sent: set[int] = {seq for seq, _ in self._outbox.pending()}  # sent by an earlier process?
        self.commands: list[bytes] = []
        self.on_command: Callable[[bytes], object] | None = None  # its return value is ignored
        self._stop_requested = False
        self._leave_requested = False
        self._abort = False  # leave the broker without DISCONNECT: it publishes the will
        self._closed = False

        self.connected = threading.Event()
        self.left = threading.Event()  # the graceful leave was acknowledged by the broker
        self._accepted_once = threading.Event()
        self.refusal: str | None = None  # the broker's last refusal of CONNECT, for messages
        self._thread: threading.Thread | None = None

        # Owned by the network thread only.
        self._in_flight: dict[int, int] = {}  # paho mid -> reading seq, on the current connection
        self._handed_upto = 0  # highest seq handed to the current connection
        self._will_seq = 0
        self._join_wire = b""
        self._leave_mid: int | None = None

    @classmethod
    def from_cluster_dir(
        cls,
        directory: str | os.PathLike[str],
        name: str,
        data_dir: str | os.PathLike[str] | None = None,
        *,
        host: str | None = None,
        port: int | None = None,
        **options: Any,
    ) -> Device:
        """The device `name` of the cluster in `directory`: its key, certificate and the broker address.

        `data_dir` (outbox, sequence counter, blobs) defaults to DIR/members/<name>/device; `host`
        and `port` override cluster.toml's broker address.
        """
        loaded = clusters.load(directory)
        member = loaded.member(name)
        if member.role not in DEVICE_ROLES:
            raise ConfigError(f"{name} is a {member.role}, not a device ({' or '.join(DEVICE_ROLES)})")
        key = loaded.signing_key(member.name)
        certificate = loaded.certificate(member.name)  # checked against the operator key
        if certificate.subject.raw != key.public_key.raw:
            raise ConfigError(f"the certificate of {name} in {directory} does not certify its key")
        return cls(
            cluster=loaded.name,
            host=host if host is not None else loaded.broker_host,
            port=port if port is not None else loaded.broker_port,
            name=member.name,
            key=key,
            certificate=certificate.encoded,
            data_dir=data_dir if data_dir is not None else loaded.member_dir(member.name) / "device",
            **options,
        )

    # ------------------------------------------------------------------------ the caller's API

    def start(self, wait: float | None = 10.0) -> None:
        """Start the network thread; with `wait`, raise BrokerUnavailable unless accepted in time.

        With `wait=None` this returns at once and the device keeps trying the broker in the
        background; readings published meanwhile wait in the outbox.
        """
        if self._thread is not None or self._closed:
            raise UsageError(f"device {self.name} was already started; make a new Device to start again")
        self._thread = threading.Thread(target=self._run, name=f"tomq-device-{self.name}", daemon=True)
        self._thread.start()
        if wait is not None and not self._accepted_once.wait(wait):
            reason = self.refusal or "no answer"
            self.stop()
            raise BrokerUnavailable(f"broker {self.host}:{self.port} did not accept device {self.name} "
                                    f"within {wait:.0f} s ({reason})")

    def publish(self, value: Any, unit: str | None = None, payload: bytes | None = None) -> int:
        """Seal a reading, put it in the outbox (on disk when this returns), send it; return its seq.

        `payload`, if given, is stored off-chain under <data dir>/blobs/<sha256 hex> and the reading
        carries its SHA-256.
        """
        payload_hash = self.store_blob(payload) if payload is not None else None
        with self._lock:
            if self._closed:
                raise UsageError(f"device {self.name} is stopped; its outbox is closed")
            seq = self._sequence.next()
            try:
                wire = seal_reading(self.key, seq=seq, time_ms=self._now_ms(), value=value, unit=unit,
                                    payload_hash=payload_hash)
            except ValueError as exc:
                raise UsageError(f"device {self.name}: {exc}") from None
            self._outbox.append(seq, wire)
            self._published += 1
        self._wake()
        return seq

    def store_blob(self, payload: bytes) -> bytes:
        """Put `payload` in the content-addressed blob directory (durably); return its SHA-256."""
        digest = hashlib.sha256(payload).digest()
        path = self.blob_dir / digest.hex()
        if not path.exists():
            self.blob_dir.mkdir(parents=True, exist_ok=True)
            replace_file(path, payload)
        return digest

    def wait_drained(self, timeout: float) -> bool:
        """Wait until the outbox is empty (every reading acknowledged); False if it is not in time."""
        with self._drained:
            return self._drained.wait_for(lambda: len(self._outbox) == 0, timeout)

    def leave(self, timeout: float = 10.0, *, drain: bool = True) -> bool:
        """Leave the cluster: a retained signed "leave"/"graceful", acknowledged, then a clean disconnect.

        With `drain`, first wait (within the same `timeout`) for the outbox to empty; what is left
        stays on disk and is sent by the next process that starts with this data dir. Returns False
        if the broker did not acknowledge the leave in time: the device then drops the connection
        without DISCONNECT, so the broker publishes the will ("vanished") instead.
        """
        if self._thread is None:
            raise UsageError(f"device {self.name} was never started; there is nothing to leave")
        deadline = time.monotonic() + timeout
        if drain:
            self.wait_drained(max(0.0, deadline - time.monotonic()))
        with self._lock:
            self._leave_requested = True
        self._wake()
        left = self.left.wait(max(0.0, deadline - time.monotonic()))
        if not left:
            log.warning("device %s: the broker did not acknowledge the leave within %.1f s; "
                        "dropping the connection so that the will speaks for the device", self.name, timeout)
            with self._lock:
                self._abort = True
            self._wake()
        self._finish(max(1.0, deadline - time.monotonic()))
        return left

    def stop(self, timeout: float = 5.0) -> None:
        """Disconnect cleanly without leaving (the will is discarded, the retained join stays)."""
        with self._lock:
            self._stop_requested = True
        self._wake()
        self._finish(timeout)

    def counters(self) -> DeviceCounters:
        with self._lock:
            return DeviceCounters(self._published, self._acked, self._resent, len(self._outbox), self._connects)

    def __enter__(self) -> Device:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------------ shutting down

    def _finish(self, timeout: float) -> None:
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                with self._lock:
                    self._abort = True
                self._wake()
                thread.join(DISCONNECT_GRACE + CONNECT_TIMEOUT)
                if thread.is_alive():
                    log.error("device %s: the network thread did not stop", self.name)
                    return  # leave the outbox open: the thread may still mark readings done
        self._close()

    def _close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._outbox.close()
        self._wakeup.close()
        os.close(self._lock_fd)

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    # ------------------------------------------------------------------------ the network thread

    def _run(self) -> None:
        delay: float | None = None
        try:
            while not self._finished():
                client = self._new_client()
                if self._connect(client):
                    self._session(client)
                    self._connection_lost()
                    if self._accepted:
                        delay = None
                if self._finished():
                    break
                delay = RECONNECT_MIN_DELAY if delay is None else min(delay * 2, RECONNECT_MAX_DELAY)
                self._idle(delay)
        except Exception:  # a bug here must be loud; the outbox keeps every reading for the next start
            log.exception("device %s: the network thread failed", self.name)
        finally:
            self.connected.clear()

    def _finished(self) -> bool:
        with self._lock:
            return self._abort or self._stop_requested or self.left.is_set()

    def _new_client(self) -> paho.Client:
        """A paho client for one connection, with a fresh join and will (see the module docstring)."""
        with self._lock:
            join_seq = self._sequence.next()
            self._will_seq = self._sequence.next()
        now_ms = self._now_ms()
        self._join_wire = seal(self.key, seq=join_seq, time_ms=now_ms, type="join",
                               body={"certificate": self.certificate})
        will = seal(self.key, seq=self._will_seq, time_ms=now_ms, type="leave", body={"reason": "vanished"})
        # Not a clean session: the broker keeps the device's cmd subscription and queue while it is away.
        client = self._paho_client(client_id=self.client_id, username=self.name, password=self._password,
                                   will_topic=self.state_topic, will=will, clean_session=False,
                                   on_connect=self._on_connect, on_disconnect=self._on_disconnect,
                                   on_publish=self._on_publish)
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        return client

    def _hang_up(self) -> HangUp | None:
        with self._lock:
            abort, stop = self._abort, self._stop_requested
        if abort:
            return HangUp.CLOSE  # no DISCONNECT: the broker publishes the will
        if stop or self.left.is_set():
            return HangUp.DISCONNECT  # the broker discards the will
        return None

    def _serve(self, client: paho.Client) -> None:
        """Hand the next readings to the connection (oldest first, bounded), or send the leave."""
        with self._lock:
            leave = self._leave_requested
        if leave:
            if self._leave_mid is None:
                wire = seal(self.key, seq=self._will_seq, time_ms=self._now_ms(), type="leave",
                            body={"reason": "graceful"})
                self._leave_mid = client.publish(self.state_topic, wire, qos=1, retain=True).mid
            return  # nothing new after the leave: what is left stays in the outbox for the next start
        room = self.max_in_flight - len(self._in_flight)
        if room <= 0:
            return
        with self._lock:
            batch = list(self._outbox.pending(after=self._handed_upto, limit=room))
            again = [seq for seq, _ in batch if seq in self._maybe_sent]
            self._maybe_sent.difference_update(again)
            self._resent += len(again)
        for seq, wire in batch:
            info = client.publish(self.data_topic, wire, qos=1)
            self._in_flight[info.mid] = seq
            self._handed_upto = seq

    def _connection_lost(self) -> None:
        self.connected.clear()
        with self._lock:
            self._maybe_sent.update(self._in_flight.values())
        self._in_flight.clear()
        self._handed_upto = 0  # the next connection starts again from the oldest pending reading
        self._leave_mid = None  # a leave without PUBACK is sent again, with the next connection's number

    # paho callbacks: all run on the network thread, inside loop_read / loop_write / loop_misc.

    def _on_connect(self, client: paho.Client, _userdata: Any, flags: Any, reason: Any, _props: Any) -> None:
        if reason.is_failure:
            if self.refusal != str(reason):
                log.warning("broker %s:%s refused device %s: %s (retrying)", self.host, self.port, self.name, reason)
            self.refusal = str(reason)
            return
        self._accepted = True
        self.refusal = None
        with self._lock:
            self._connects += 1
            connects = self._connects
        client.publish(self.state_topic, self._join_wire, qos=1, retain=True)
        client.subscribe(self.cmd_topic, qos=1)
        self.connected.set()
        self._accepted_once.set()
        log.info("device %s %s to %s:%s (session %s)", self.name, "connected" if connects == 1 else "reconnected",
                 self.host, self.port, "resumed" if getattr(flags, "session_present", False) else "new")

    def _on_disconnect(self, _client: paho.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        self.connected.clear()
        if self._accepted and getattr(reason, "is_failure", False):
            log.warning("device %s lost the broker (%s); readings wait in the outbox", self.name, reason)

    def _on_publish(self, _client: paho.Client, _userdata: Any, mid: int, _reason: Any, _props: Any) -> None:
        if mid == self._leave_mid:
            self.left.set()
            return
        seq = self._in_flight.pop(mid, None)
        if seq is None:
            return  # the join's acknowledgement
        with self._lock:
            if self._outbox.mark_done(seq):
                self._acked += 1
            if len(self._outbox) == 0:
                self._drained.notify_all()

    def _on_subscribe(self, _client: paho.Client, _userdata: Any, _mid: int, reasons: Any, _props: Any) -> None:
        if any(getattr(code, "is_failure", False) for code in reasons):
            # The broker's ACL may not let this role read its cmd topic; the device works without it.
            log.info("broker refused device %s the subscription %s (%s)", self.name, self.cmd_topic, reasons)

    def _on_message(self, _client: paho.Client, _userdata: Any, message: paho.MQTTMessage) -> None:
        if message.topic != self.cmd_topic:
            return
        payload = bytes(message.payload)
        with self._lock:
            self.commands.append(payload)
            if len(self.commands) > MAX_KEPT_COMMANDS:
                del self.commands[0]
            handler = self.on_command
        if handler is not None:
            try:
                handler(payload)
            except Exception:  # the application's bug must not take the device off the network
                log.exception("device %s: on_command failed", self.name)





