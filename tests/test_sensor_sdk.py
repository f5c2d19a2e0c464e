"""The device SDK (sensors/device.py, sensors/outbox.py) against real brokers, and its outbox on disk.

Outbox tests need no network: FIFO order, reopening, a torn tail cut off, compaction, and a
hypothesis run against a naive in-memory model. Device tests run a real broker (mosquitto 2 from
the files `tomq broker --mosquitto-conf` writes, and the embedded amqtt broker as its own process)
and watch the device's topics as node n1, which may read everything below the cluster root; every
envelope seen is opened with tomq.wire against the cluster's trust store, so a test passes only on
validly signed envelopes. The will test runs the device as `tomq sensor` in a subprocess and
SIGKILLs it. The outage test stops mosquitto for OUTAGE_SECONDS while the device publishes.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import queue
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

from conftest import require
from procs import PYTHON, AmqttBroker, Mosquitto, free_port, kill_process, which
from tomq import certificate as certificates
from tomq import cluster as clusters
from tomq.errors import ConfigError, UsageError
from tomq.identity import SigningKey
from tomq.mqtt import BrokerUnavailable
from tomq.node.services.readings import open_reading
from tomq.sensors.device import Device
from tomq.sensors.outbox import Outbox
from tomq.wire import Envelope, EnvelopeOpener

CLUSTER = "sdk"
WAIT = 10.0  # seconds any single step may take
OUTAGE_SECONDS = 20.0  # how long the broker is down in the outage test: the issue asks for 20 s
OUTAGE_RATE = 20.0  # readings per second during the outage test
SENSORS = ("s-join", "s-will", "s-leave", "s-restart", "s-window", "s-resend", "s-outage", "s-cli")
ACTUATORS = ("a-cmd",)


# --- the outbox, on disk only ------------------------------------------------------------------


def test_outbox_is_a_fifo_that_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "outbox.log"
    box = Outbox(path)
    for key in (3, 5, 8, 9):
        box.append(key, f"record {key}".encode())
    assert box.mark_done(5)
    assert not box.mark_done(5)  # already done
    assert not box.mark_done(4)  # never there
    assert [k for k, _ in box.pending()] == [3, 8, 9]
    assert [k for k, _ in box.pending(after=3, limit=1)] == [8]
    box.close()
    again = Outbox(path)
    assert list(again.pending()) == [(3, b"record 3"), (8, b"record 8"), (9, b"record 9")]
    assert len(again) == 3 and again.last_key == 9 and again.truncated_bytes == 0
    with pytest.raises(UsageError, match="not above the last key 9"):
        again.append(9, b"again")
    again.close()


def test_outbox_cuts_off_a_torn_tail_with_one_log_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "outbox.log"
    box = Outbox(path)
    for key in (1, 2, 3):
        box.append(key, bytes([key]) * 100)
    box.close()
    whole = path.stat().st_size
    os.truncate(path, whole - 40)  # a crash in the middle of writing record 3
    with caplog.at_level(logging.WARNING, logger="tomq.sensors.outbox"):
        torn = Outbox(path)
    assert [k for k, _ in torn.pending()] == [1, 2]
    assert torn.truncated_bytes == 100 + 17 - 40  # record 3's frame (17-byte header) minus what was cut
    assert path.stat().st_size == torn.size < whole - 40
    assert len([r for r in caplog.records if "torn" in r.getMessage()]) == 1
    torn.append(4, b"after the crash")  # appends continue on a clean frame boundary
    torn.close()
    assert [k for k, _ in Outbox(path).pending()] == [1, 2, 4]


def test_outbox_cuts_off_a_record_whose_checksum_fails(tmp_path: Path) -> None:
    path = tmp_path / "outbox.log"
    box = Outbox(path)
    box.append(1, b"a" * 50)
    box.append(2, b"b" * 50)
    box.close()
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # a bit flipped inside record 2
    path.write_bytes(bytes(data))
    reopened = Outbox(path)
    assert [k for k, _ in reopened.pending()] == [1]
    assert reopened.truncated_bytes == 17 + 50


def test_outbox_compacts_to_nothing_when_everything_is_done(tmp_path: Path) -> None:
    path = tmp_path / "outbox.log"
    box = Outbox(path)
    for key in range(1, 21):
        box.append(key, b"x" * 100)
    for key in range(1, 21):
        box.mark_done(key)
        assert box.size > 0 or key == 20
    assert box.size == 0 and path.stat().st_size == 0 and len(box) == 0
    box.append(21, b"after")
    box.close()
    assert [k for k, _ in Outbox(path).pending()] == [21]


def test_outbox_rewrites_a_large_file_that_holds_little(tmp_path: Path) -> None:
    path = tmp_path / "outbox.log"
    box = Outbox(path, compact_bytes=2000)
    for key in range(1, 31):
        box.append(key, b"y" * 100)
    for key in range(1, 29):
        box.mark_done(key)  # 29 and 30 stay pending
    assert path.stat().st_size < 2000
    assert [k for k, _ in box.pending()] == [29, 30]
    box.append(31, b"z")
    box.close()
    assert [k for k, _ in Outbox(path).pending()] == [29, 30, 31]


_ops = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.binary(max_size=40)),
        st.tuples(st.just("done"), st.integers(min_value=0, max_value=30)),
        st.tuples(st.just("reopen"), st.just(0)),
    ),
    max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(ops=_ops, tear=st.integers(min_value=0, max_value=200))
def test_outbox_matches_a_naive_model(tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, Any]],
                                      tear: int) -> None:
    """After any appends, done marks, compactions and clean reopenings the outbox holds what a list
    would hold; after tearing any number of bytes off the end it still opens, in key order, with
    every record intact and only records that were appended."""
    path = tmp_path_factory.mktemp("model") / "outbox.log"
    box = Outbox(path, compact_bytes=300)
    model: list[tuple[int, bytes]] = []
    appended: dict[int, bytes] = {}
    for op, arg in ops:
        if op == "append":
            key = box.last_key + 1
            box.append(key, arg)
            model.append((key, arg))
            appended[key] = arg
        elif op == "done" and model:
            key = model[arg % len(model)][0]
            assert box.mark_done(key)
            model = [(k, d) for k, d in model if k != key]
        elif op == "reopen":
            box.close()
            box = Outbox(path, compact_bytes=300)
        assert list(box.pending()) == model
    box.close()
    os.truncate(path, max(0, path.stat().st_size - tear))
    torn = Outbox(path)
    keys = [key for key, _ in torn.pending()]
    assert keys == sorted(set(keys))
    assert all(appended[key] == data for key, data in torn.pending())
    torn.append(max(appended, default=0) + 1, b"next")
    torn.close()
    assert [k for k, _ in Outbox(path).pending()][-1] == max(appended, default=0) + 1


# --- a cluster, its brokers and an observer -----------------------------------------------------


@pytest.fixture(scope="module")
def cluster_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("sdk") / "cluster"
    clusters.init(directory, ["n1"], cluster_name=CLUSTER)
    for name in SENSORS:
        clusters.add_member(directory, name, "sensor")
    for name in ACTUATORS:
        clusters.add_member(directory, name, "actuator")
    return directory


@pytest.fixture(scope="module", params=["mosquitto", "amqtt"])
def broker(request: pytest.FixtureRequest, cluster_dir: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    workdir = tmp_path_factory.mktemp(f"broker-{request.param}")
    server: Mosquitto
    if request.param == "mosquitto":
        require("mosquitto", which("mosquitto") is not None, "install the Debian package mosquitto")
        server = Mosquitto(cluster_dir, workdir)
    else:
        server = AmqttBroker(cluster_dir, workdir)
    server.start()
    try:
        yield server
    finally:
        server.close()


@dataclass(frozen=True)
class Seen:
    topic: str
    payload: bytes
    retained: bool


class Observer:
    """Node n1 watching topics below the cluster root with a paho client on its own thread."""

    def __init__(self, cluster_dir: Path, port: int, *topics: str, client_id: str | None = None,
                 persistent: bool = False) -> None:
        loaded = clusters.load(cluster_dir)
        self.root = f"tomq/{loaded.name}"
        self.topics = [f"{self.root}/{t}" for t in topics]
        self.messages: queue.Queue[Seen] = queue.Queue()
        self.seen: list[Seen] = []
        self.subscribed = threading.Event()
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311,
                                  client_id=client_id or f"observer-{os.urandom(4).hex()}",
                                  clean_session=not persistent)
        self.client.username_pw_set("n1", clusters.broker_password(loaded.signing_key("n1")))
        self.client.reconnect_delay_set(1, 2)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *_args: self.subscribed.set()
        self.client.on_message = lambda _c, _u, m: self.messages.put(Seen(m.topic, bytes(m.payload), bool(m.retain)))
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()
        assert self.subscribed.wait(WAIT), "the observer's subscription was not acknowledged"

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if not reason.is_failure:
            client.subscribe([(topic, 1) for topic in self.topics])

    def collect(self, until: Callable[[list[Seen]], bool], timeout: float = WAIT) -> list[Seen]:
        """Take messages until `until(everything seen so far)` holds; fail after `timeout`."""
        deadline = time.monotonic() + timeout
        while not until(self.seen):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"gave up after {timeout} s; saw {[(s.topic, len(s.payload)) for s in self.seen]}")
            with contextlib.suppress(queue.Empty):
                self.seen.append(self.messages.get(timeout=min(remaining, 0.2)))
        return self.seen

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@contextlib.contextmanager
def observing(cluster_dir: Path, port: int, *topics: str, **options: Any) -> Iterator[Observer]:
    observer = Observer(cluster_dir, port, *topics, **options)
    try:
        yield observer
    finally:
        observer.close()


def opener(cluster_dir: Path) -> EnvelopeOpener:
    return EnvelopeOpener(clusters.load(cluster_dir).trust_store())


def state_envelopes(cluster_dir: Path, seen: list[Seen]) -> list[Envelope]:
    """Every state message, opened (signature, certificate, rising seq) by one opener, in order."""
    state = opener(cluster_dir)
    return [state.open(s.payload, time.time()) for s in seen if s.topic.endswith("/state")]


class ReadingTally:
    """One device's readings among the messages seen, each message opened once, in arrival order.

    `update(seen)` opens only what came after the last call, so a `collect` predicate built on it
    costs O(new messages) per call. Re-opening everything on every message is quadratic: with the
    ~430 readings of the outage test that was ~0.1 s per message, and the observer fell 20 s behind
    readings that had all arrived (and timed out as if they were lost).
    """

    def __init__(self, cluster_dir: Path, device: str) -> None:
        self.device = device
        self.opener = opener(cluster_dir)
        self.accepted: list[int] = []  # seqs of the readings accepted, in arrival order
        self.replays = 0  # readings refused as replays (redelivered duplicates)
        self.taken = 0  # how many of `seen` were looked at

    def update(self, seen: list[Seen]) -> list[int]:
        for message in seen[self.taken:]:
            if message.topic.endswith(f"/dev/{self.device}/data"):
                try:
                    self.accepted.append(open_reading(self.opener, message.payload, device=self.device,
                                                      now=time.time()).seq)
                except Exception as exc:  # only a redelivered duplicate may be refused
                    assert type(exc).__name__ == "ReplayedEnvelope", exc
                    self.replays += 1
        self.taken = len(seen)
        return self.accepted


def reading_seqs(cluster_dir: Path, device: str, seen: list[Seen]) -> tuple[list[int], int]:
    """(seqs of the readings accepted, in arrival order; how many were refused as replays)."""
    tally = ReadingTally(cluster_dir, device)
    return tally.update(seen), tally.replays


def device(cluster_dir: Path, name: str, port: int, data_dir: Path, **options: Any) -> Device:
    return Device.from_cluster_dir(cluster_dir, name, data_dir, host="127.0.0.1", port=port, **options)


# --- devices without a broker -------------------------------------------------------------------


def test_payload_goes_off_chain_and_the_reading_carries_its_hash(cluster_dir: Path, tmp_path: Path) -> None:
    payload = os.urandom(5000)
    with device(cluster_dir, "s-join", free_port(), tmp_path) as sensor:  # never started: publish only queues
        seq = sensor.publish({"frame": 7}, payload=payload)
        digest = hashlib.sha256(payload).digest()
        assert (tmp_path / "blobs" / digest.hex()).read_bytes() == payload
        [(key, wire)] = list(sensor._outbox.pending())
    reading = open_reading(opener(cluster_dir), wire, device="s-join", now=time.time())
    assert (key, reading.seq, reading.payload_hash, reading.value) == (seq, seq, digest, {"frame": 7})


def test_one_data_dir_serves_one_process_and_only_devices_have_one(cluster_dir: Path, tmp_path: Path) -> None:
    first = device(cluster_dir, "s-join", free_port(), tmp_path)
    try:
        with pytest.raises(ConfigError, match="in use by another process"):
            device(cluster_dir, "s-join", free_port(), tmp_path)
    finally:
        first.stop()
    device(cluster_dir, "s-join", free_port(), tmp_path).stop()  # the lock went with the first one
    with pytest.raises(ConfigError, match="n1 is a node, not a device"):
        device(cluster_dir, "n1", free_port(), tmp_path / "n1")
    with pytest.raises(UsageError, match="value must be"):
        device(cluster_dir, "s-join", free_port(), tmp_path / "bad").publish([1, 2])


# --- devices on real brokers ---------------------------------------------------------------------


def test_join_is_retained_signed_and_carries_the_certificate(cluster_dir: Path, broker: Mosquitto,
                                                             tmp_path: Path) -> None:
    sensor = device(cluster_dir, "s-join", broker.port, tmp_path)
    sensor.start()
    try:
        seq = sensor.publish(21.5, "degC")
        assert sensor.wait_drained(WAIT)
        # A subscriber that comes later gets the join as a retained message.
        with observing(cluster_dir, broker.port, "dev/s-join/state") as late:
            [seen] = late.collect(lambda s: len(s) >= 1)
    finally:
        sensor.stop()
    assert seen.retained
    [join] = state_envelopes(cluster_dir, [seen])
    operator = clusters.load(cluster_dir).operator
    certificate = certificates.decode(join.body["certificate"], operator)
    assert (join.type, certificate.name, certificate.role) == ("join", "s-join", "sensor")
    assert join.sender == certificate.subject.id == sensor.key.id
    assert join.seq < seq  # reserved before any reading: the pair S, S+1 comes first
    assert sensor.counters().acked == 1


def test_a_device_the_broker_refuses_says_so(cluster_dir: Path, broker: Mosquitto, tmp_path: Path) -> None:
    impostor = Device(cluster=CLUSTER, host="127.0.0.1", port=broker.port, name="s-join",
                      key=SigningKey.generate(), certificate=b"not the certificate", data_dir=tmp_path)
    with pytest.raises(BrokerUnavailable, match=r"did not accept device s-join within 1 s \(.*[Aa]uthori"):
        impostor.start(wait=1.0)
    with pytest.raises(UsageError, match="stopped"):
        impostor.publish(1)


def test_killed_device_leaves_a_signed_vanished_will(cluster_dir: Path, broker: Mosquitto, tmp_path: Path) -> None:
    with observing(cluster_dir, broker.port, "dev/s-will/state", "dev/s-will/data") as watch:
        child = subprocess.Popen(
            [PYTHON, "-m", "tomq", "sensor", str(cluster_dir), "--name", "s-will", "--sim", "temperature",
             "--rate", "20", "--host", "127.0.0.1", "--port", str(broker.port), "--data-dir", str(tmp_path)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        try:
            watch.collect(lambda s: sum(m.topic.endswith("/data") for m in s) >= 3)
            kill_process(child)  # SIGKILL: no leave, no DISCONNECT; the kernel closes the socket
            seen = watch.collect(lambda s: sum(m.topic.endswith("/state") for m in s) >= 2)
        finally:
            kill_process(child)
            assert child.stdout is not None
            output = child.stdout.read().decode(errors="replace")
    assert child.returncode == -signal.SIGKILL, output
    join, will = state_envelopes(cluster_dir, seen)[:2]
    assert (join.type, will.type, will.body) == ("join", "leave", {"reason": "vanished"})
    assert will.seq == join.seq + 1 and will.sender == join.sender
    with observing(cluster_dir, broker.port, "dev/s-will/state") as late:
        [retained] = late.collect(lambda s: len(s) >= 1)
    assert retained.retained and retained.payload == next(s.payload for s in seen[::-1] if s.topic.endswith("/state"))


def test_graceful_leave_replaces_the_join_and_no_will_follows(cluster_dir: Path, broker: Mosquitto,
                                                              tmp_path: Path) -> None:
    with observing(cluster_dir, broker.port, "dev/s-leave/state") as watch:
        sensor = device(cluster_dir, "s-leave", broker.port, tmp_path)
        sensor.start()
        for value in range(3):
            sensor.publish(value, "cars")
        assert sensor.leave(timeout=WAIT)
        watch.collect(lambda s: len(s) >= 2)
        time.sleep(1.0)  # a will, if the broker sent one, would arrive at once after the disconnect
        seen = watch.collect(lambda s: True)
    assert [s.retained for s in seen] == [False, False], seen
    join, leave = state_envelopes(cluster_dir, seen)
    assert (join.type, leave.type, leave.body) == ("join", "leave", {"reason": "graceful"})
    assert leave.seq == join.seq + 1  # the number reserved for the will, which the broker discarded
    counters = sensor.counters()
    assert (counters.published, counters.acked, counters.outbox) == (3, 3, 0)
    with observing(cluster_dir, broker.port, "dev/s-leave/state") as late:
        [retained] = late.collect(lambda s: len(s) >= 1)
    assert retained.retained and retained.payload == seen[1].payload


def test_restarted_device_sends_what_its_outbox_still_holds(cluster_dir: Path, broker: Mosquitto,
                                                            tmp_path: Path) -> None:
    # First process: the broker address is wrong (nothing listens), so readings stay in the outbox.
    offline = device(cluster_dir, "s-restart", free_port(), tmp_path)
    offline.start(wait=None)
    queued = [offline.publish(float(i), "degC") for i in range(5)]
    time.sleep(0.3)
    offline.stop()
    assert offline.counters().outbox == 5
    with observing(cluster_dir, broker.port, "dev/s-restart/data", "dev/s-restart/state") as watch:
        online = device(cluster_dir, "s-restart", broker.port, tmp_path)  # same data dir
        online.start()
        fresh = [online.publish(float(i), "degC") for i in range(5, 7)]
        assert online.wait_drained(WAIT)
        seen = watch.collect(lambda s: sum(m.topic.endswith("/data") for m in s) >= 7)
        online.stop()
    accepted, _ = reading_seqs(cluster_dir, "s-restart", seen)
    assert accepted == queued + fresh  # the old ones first, in order, then the new
    [join] = state_envelopes(cluster_dir, seen)
    assert join.seq > max(queued)  # numbers rise across restarts
    counters = online.counters()
    assert (counters.resent, counters.published, counters.acked, counters.outbox) == (5, 2, 7, 0)


def test_a_backlog_is_sent_in_order_with_bounded_in_flight(cluster_dir: Path, broker: Mosquitto,
                                                           tmp_path: Path) -> None:
    sensor = device(cluster_dir, "s-window", broker.port, tmp_path, max_in_flight=10)
    published = [sensor.publish(i, "cars") for i in range(300)]  # before start: all wait in the outbox
    most_in_flight = 0
    with observing(cluster_dir, broker.port, "dev/s-window/data") as watch:
        sensor.start()
        deadline = time.monotonic() + WAIT
        while sensor.counters().outbox and time.monotonic() < deadline:
            most_in_flight = max(most_in_flight, len(sensor._in_flight))
            time.sleep(0.001)
        seen = watch.collect(lambda s: len(s) >= 300)
    sensor.stop()
    accepted, replays = reading_seqs(cluster_dir, "s-window", seen)
    assert accepted == published and replays == 0
    assert 0 < most_in_flight <= 10


def test_commands_reach_an_actuator_on_its_cmd_topic(cluster_dir: Path, broker: Mosquitto, tmp_path: Path) -> None:
    got: queue.Queue[bytes] = queue.Queue()
    actuator = device(cluster_dir, "a-cmd", broker.port, tmp_path)
    actuator.on_command = got.put
    actuator.start()
    try:
        with observing(cluster_dir, broker.port, "dev/a-cmd/state") as node:
            command = b"signed-command-" + os.urandom(4).hex().encode()
            deadline = time.monotonic() + WAIT
            while got.empty() and time.monotonic() < deadline:  # until the device's SUBSCRIBE has landed
                node.client.publish(f"tomq/{CLUSTER}/dev/a-cmd/cmd", command, qos=1)
                with contextlib.suppress(queue.Empty):
                    got.put(got.get(timeout=0.5))
        assert got.get(timeout=1) == command
        assert command in actuator.commands
    finally:
        actuator.stop()


class CuttableLink:
    """A TCP relay between a device and the broker that can hold back the broker's answers (PUBACKs)
    and cut every connection, as a flaky radio link would. Threads and sockets end with `close`."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.holding = threading.Event()
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            with self.lock:
                self.pairs.append((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream, None), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, self.holding), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, target: socket.socket, hold: threading.Event | None) -> None:
        try:
            while data := source.recv(65536):
                if hold is None or not hold.is_set():
                    target.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, target):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        with self.lock:
            pairs, self.pairs = self.pairs, []
        for pair in pairs:
            for end in pair:
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)
                end.close()

    def close(self) -> None:
        self.listener.close()
        self.cut()


def test_unacknowledged_readings_are_resent_in_order_on_the_next_connection(
        cluster_dir: Path, broker: Mosquitto, tmp_path: Path) -> None:
    link = CuttableLink(broker.port)
    sensor = device(cluster_dir, "s-resend", link.port, tmp_path, max_in_flight=10)
    try:
        with observing(cluster_dir, broker.port, "dev/s-resend/data") as watch:
            sensor.start()
            published = [sensor.publish(i, "cars") for i in range(5)]
            assert sensor.wait_drained(WAIT)
            link.holding.set()  # the broker gets the readings, the device never hears PUBACK
            published += [sensor.publish(i, "cars") for i in range(5, 35)]
            watch.collect(lambda s: len(s) >= 15)  # 5 acknowledged + a full window of 10
            assert sensor.counters().outbox == 30
            link.holding.clear()
            link.cut()
            assert sensor.wait_drained(WAIT), sensor.counters()
            seen = watch.collect(lambda s: len(s) >= 45)
    finally:
        sensor.stop()
        link.close()
    accepted, replays = reading_seqs(cluster_dir, "s-resend", seen)
    assert accepted == published  # each reading once, in order, after the duplicates are refused
    assert replays == 10  # the window that had reached the broker before the cut went again
    counters = sensor.counters()
    assert (counters.resent, counters.acked, counters.connects) == (10, 35, 2)


class PersistentMosquitto(Mosquitto):
    """mosquitto that keeps sessions, queued messages and retained messages across a restart."""

    def __init__(self, cluster_dir: Path, workdir: Path) -> None:
        super().__init__(cluster_dir, workdir)
        text = self.config.read_text()
        assert "persistence false" in text
        self.config.write_text(text.replace(
            "persistence false", f"persistence true\npersistence_location {workdir}/\nautosave_interval 0"))


@pytest.mark.slow
def test_readings_survive_a_broker_outage(cluster_dir: Path, tmp_path: Path) -> None:
    require("mosquitto", which("mosquitto") is not None, "install the Debian package mosquitto")
    server = PersistentMosquitto(cluster_dir, tmp_path / "broker")
    server.start()
    sensor = device(cluster_dir, "s-outage", server.port, tmp_path / "device")
    stop = threading.Event()
    published: list[int] = []
    deepest = 0

    def publish_steadily() -> None:
        while not stop.wait(1 / OUTAGE_RATE):
            published.append(sensor.publish(len(published) % 50, "cars"))

    try:
        # A persistent session: mosquitto queues what arrives for it while it is away, and keeps the
        # queue (and the subscription) across its own restart.
        with observing(cluster_dir, server.port, "dev/s-outage/data", client_id="outage-observer",
                       persistent=True) as watch:
            sensor.start()
            publisher = threading.Thread(target=publish_steadily)
            publisher.start()
            time.sleep(1.0)
            server.stop()  # SIGTERM: mosquitto writes its state to disk as it exits
            outage_ends = time.monotonic() + OUTAGE_SECONDS
            while time.monotonic() < outage_ends:
                deepest = max(deepest, sensor.counters().outbox)
                time.sleep(0.05)
            server.start()  # same port, same configuration, state from disk
            time.sleep(1.0)
            stop.set()
            publisher.join()
            assert sensor.wait_drained(3 * WAIT), sensor.counters()
            arrived = ReadingTally(cluster_dir, "s-outage")  # incremental: see ReadingTally
            seen = watch.collect(lambda s: len(arrived.update(s)) >= len(published), timeout=2 * WAIT)
    finally:
        stop.set()
        sensor.stop()
        server.close()
    accepted, replays = reading_seqs(cluster_dir, "s-outage", seen)
    assert accepted == published  # every reading, once, in order (duplicates are refused as replays)
    assert deepest >= OUTAGE_RATE * OUTAGE_SECONDS / 2  # they waited in the outbox meanwhile
    counters = sensor.counters()
    assert counters.connects == 2 and counters.outbox == 0 and counters.acked == len(published)
    print(f"outage: {len(published)} readings, outbox peaked at {deepest}, {counters.resent} resent, "
          f"{replays} duplicates refused")


def test_sensor_command_runs_counts_and_leaves(cluster_dir: Path, broker: Mosquitto, tmp_path: Path) -> None:
    """`tomq sensor --count N` publishes N readings, leaves gracefully and prints its counters."""
    with observing(cluster_dir, broker.port, "dev/s-cli/data") as watch:
        result = subprocess.run(
            [PYTHON, "-m", "tomq", "sensor", str(cluster_dir), "--name", "s-cli", "--sim", "car", "--rate", "50",
             "--count", "10", "--port", str(broker.port), "--data-dir", str(tmp_path)],
            capture_output=True, timeout=30, check=False)
        seen = watch.collect(lambda s: len(s) >= 10)
    output = result.stdout.decode()
    assert result.returncode == 0, output + result.stderr.decode()
    assert "left: published 10, acked 10, resent 0, outbox 0" in output
    accepted, _ = reading_seqs(cluster_dir, "s-cli", seen)
    assert len(accepted) == 10 and accepted == sorted(accepted)
