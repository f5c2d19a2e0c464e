"""MqttLink without paho's thread (`threaded=False`), as the node daemon drives it, on real brokers.

The owner's loop calls `pump(timeout)`: callbacks run inside it on the owner's thread, `publish`
writes on the caller's thread, `wake()` from another thread (or a signal handler) makes a waiting
pump return, and a lost broker is reconnected from inside pump without holding the loop up: every
call returns within its timeout plus a little, while the broker is down and after it comes back.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import require
from procs import BROKERS, Mosquitto, free_port, which
from tomq import cluster
from tomq.mqtt import BrokerUnavailable, MqttLink, wait_until

SLACK = 0.25  # seconds a pump may overrun its timeout on a busy 2-core machine


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    directory = tmp_path / "cluster"
    cluster.init(directory, ["n1", "n2"])
    return directory


def start_broker(kind: str, directory: Path, workdir: Path, port: int | None = None) -> Mosquitto:
    if kind == "mosquitto":
        require("mosquitto", which("mosquitto") is not None, "install the Debian package mosquitto")
    broker = BROKERS[kind](directory, workdir, port)
    broker.start()
    return broker


@pytest.fixture(params=["mosquitto", "amqtt"])
def broker(request: pytest.FixtureRequest, directory: Path, tmp_path: Path) -> Iterator[Mosquitto]:
    running = start_broker(request.param, directory, tmp_path / "broker")
    yield running
    running.close()


def make_link(directory: Path, port: int, name: str, *, threaded: bool, on_message=None) -> MqttLink:
    loaded = cluster.load(directory)
    return MqttLink(host="127.0.0.1", port=port, username=name, threaded=threaded, on_message=on_message,
                    password=cluster.broker_password(loaded.signing_key(name)))


class Echo:
    """n2 on paho's thread: sends back to n1 whatever n1 sends it."""

    def __init__(self, directory: Path, port: int) -> None:
        self.topics = cluster.load(directory).topics
        self.link = make_link(directory, port, "n2", threaded=True, on_message=self._echo)
        self.link.subscribe(self.topics.raft_inbox("n2"))
        self.link.start()

    def _echo(self, _topic: str, payload: bytes, _retained: bool) -> None:
        self.link.publish(self.topics.raft("n1", "n2"), payload)


class PumpedN1:
    """n1 without paho's thread, recording what arrives and on which thread its callback ran."""

    def __init__(self, directory: Path, port: int) -> None:
        self.topics = cluster.load(directory).topics
        self.received: list[bytes] = []
        self.threads: set[int] = set()
        self.link = make_link(directory, port, "n1", threaded=False, on_message=self._on_message)
        self.link.subscribe(self.topics.raft_inbox("n1"))

    def _on_message(self, _topic: str, payload: bytes, _retained: bool) -> None:
        self.threads.add(threading.get_ident())
        self.received.append(payload)

    def send(self, payload: bytes) -> bool:
        return self.link.publish(self.topics.raft("n2", "n1"), payload)

    def pump_until(self, predicate, timeout: float, step: float = 0.05) -> bool:
        """Pump until `predicate()`; every pump must return within its timeout plus SLACK."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                return False
            timed_pump(self.link, step)
        return True


def timed_pump(link: MqttLink, timeout: float) -> float:
    started = time.monotonic()
    link.pump(timeout)
    took = time.monotonic() - started
    assert took <= timeout + SLACK, f"pump({timeout}) blocked for {took:.3f} s"
    return took


def test_a_round_trip_runs_on_the_pumping_thread(directory: Path, broker: Mosquitto) -> None:
    n1 = PumpedN1(directory, broker.port)
    echo = Echo(directory, broker.port)
    try:
        n1.link.start(timeout=10)
        assert n1.link.connected
        sent = [f"m{i}".encode() for i in range(200)]
        # The subscription is made in on_connect; resend until the first echo proves it is in place.
        assert n1.pump_until(lambda: n1.send(sent[0]) and bool(n1.received), 10)
        n1.received.clear()
        for payload in sent:
            assert n1.send(payload)
            assert not n1.link.client.want_write()  # written on this thread, nothing left for a pump
        assert n1.pump_until(lambda: set(sent) <= set(n1.received), 10), len(n1.received)
        assert n1.threads == {threading.get_ident()}
    finally:
        n1.link.stop()
        echo.link.stop()


def test_an_idle_pump_returns_on_time_and_a_wake_up_returns_it_at_once(directory: Path, tmp_path: Path) -> None:
    broker = start_broker("mosquitto", directory, tmp_path / "broker")
    n1 = PumpedN1(directory, broker.port)
    try:
        n1.link.start(timeout=10)
        # Once the subscription's acknowledgement is in, nothing arrives: a pump waits its timeout out.
        assert any(timed_pump(n1.link, 0.3) >= 0.25 for _ in range(5))

        timer = threading.Timer(0.2, n1.link.wake)
        timer.start()
        took = timed_pump(n1.link, 5.0)
        timer.join()
        assert 0.15 <= took < 0.2 + SLACK, took

        # A signal handler runs on this thread while pump waits: its wake-up must end the wait too.
        previous = signal.signal(signal.SIGALRM, lambda *_: n1.link.wake())
        try:
            signal.setitimer(signal.ITIMER_REAL, 0.2)
            took = timed_pump(n1.link, 5.0)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        assert 0.15 <= took < 0.2 + SLACK, took

        n1.link.wake()  # a wake-up before the pump is not lost either
        assert timed_pump(n1.link, 5.0) < SLACK
    finally:
        n1.link.stop()
        broker.close()
    n1.link.wake()  # after stop: ignored, never raises


@pytest.mark.parametrize("kind", ["mosquitto", "amqtt"])
def test_the_pump_rides_out_a_broker_restart(directory: Path, tmp_path: Path, kind: str) -> None:
    broker = start_broker(kind, directory, tmp_path / "broker")
    n1 = PumpedN1(directory, broker.port)
    echo = Echo(directory, broker.port)
    try:
        n1.link.start(timeout=10)
        assert n1.pump_until(lambda: n1.send(b"before") and b"before" in n1.received, 10)

        broker.stop()
        assert n1.pump_until(lambda: not n1.link.connected, 5)
        down_since = time.monotonic()
        # Broker gone: publishing fails at once, and the loop keeps its rhythm while pump retries.
        while time.monotonic() - down_since < 1.5:
            started = time.monotonic()
            assert not n1.send(b"while-down")
            assert time.monotonic() - started < 0.05
            timed_pump(n1.link, 0.05)

        broker.start()  # same port; n1 comes back by itself, from inside pump, and subscribes again
        assert n1.pump_until(lambda: n1.link.connected, 15), n1.link.refusal
        assert n1.link.connects == 2
        assert wait_until(lambda: echo.link.connected, 15)
        assert n1.pump_until(lambda: n1.send(b"after") and b"after" in n1.received, 10)
        assert b"while-down" not in n1.received
        assert n1.threads == {threading.get_ident()}
    finally:
        n1.link.stop()
        echo.link.stop()
        broker.close()


def test_start_waits_for_a_late_broker_and_gives_up_with_broker_unavailable(directory: Path,
                                                                           tmp_path: Path) -> None:
    require("mosquitto", which("mosquitto") is not None, "install the Debian package mosquitto")
    port = free_port()
    nobody = make_link(directory, port, "n1", threaded=False)
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable, match=f"127.0.0.1:{port} did not accept n1 within 2 s"):
        nobody.start(timeout=2)
    assert 1.9 <= time.monotonic() - started < 2 + SLACK
    assert not nobody.publish("tomq/x", b"nobody listens")  # stopped: False, never an exception

    late = Mosquitto(directory, tmp_path / "broker", port)
    starter = threading.Timer(0.5, late.start)
    starter.start()
    n1 = make_link(directory, port, "n1", threaded=False)
    try:
        n1.start(timeout=15)  # retries with back-off while nothing listens
        assert n1.connected
    finally:
        starter.join()
        n1.stop()
        late.close()


def test_pump_is_refused_on_a_threaded_link(directory: Path) -> None:
    from tomq.errors import UsageError

    link = make_link(directory, free_port(), "n1", threaded=True)
    with pytest.raises(UsageError, match="threaded=False"):
        link.pump(0)
