"""The Debian packages and Python dependencies tomq installs, working together for real on loopback.

A real mosquitto 2 accepts the `$7$` password hashes tomq writes, paho-mqtt 2 and the Debian
mosquitto clients talk to it, the embedded amqtt 0.12 broker round-trips a message, and the
container, storage and network tools the node uses are present. Every wait has a timeout of a few seconds.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import queue
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from conftest import require
from procs import free_port, wait_for_port, which
from tomq.cluster import mosquitto_password_hash

WAIT = 5.0  # seconds: the longest any single step may take
USER = "smoke"


class Mqtt:
    """A paho-mqtt 2 client (MQTT 3.1.1) with blocking, time-limited connect and receive."""

    def __init__(self, port: int, username: str | None = None, password: str | None = None) -> None:
        self.port = port
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311,
                                  client_id=f"smoke-{os.urandom(4).hex()}")
        if username is not None:
            self.client.username_pw_set(username, password)
        self.connack: queue.Queue[Any] = queue.Queue()
        self.subacks: queue.Queue[Any] = queue.Queue()
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.client.on_connect = lambda _c, _u, _f, reason, _p: self.connack.put(reason)
        self.client.on_subscribe = lambda _c, _u, _mid, reasons, _p: self.subacks.put(reasons)
        self.client.on_message = lambda _c, _u, message: self.messages.put(message)

    def connect(self) -> Any:
        """Connect and return the broker's CONNACK reason code (success or refusal)."""
        self.client.connect("127.0.0.1", self.port, keepalive=10)
        # Drive the network loop by hand until CONNACK: the background loop would retry a refused connect.
        deadline = time.monotonic() + WAIT
        while self.connack.empty():
            if time.monotonic() > deadline:
                raise TimeoutError(f"no CONNACK from 127.0.0.1:{self.port} within {WAIT} s")
            self.client.loop(timeout=0.05)
        reason = self.connack.get_nowait()
        if not reason.is_failure:
            self.client.loop_start()
        return reason

    def subscribe(self, topic: str) -> None:
        result, _mid = self.client.subscribe(topic, qos=1)
        assert result == mqtt.MQTT_ERR_SUCCESS
        reasons = self.subacks.get(timeout=WAIT)
        assert not any(reason.is_failure for reason in reasons), reasons

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(timeout=WAIT)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _round_trip(port: int, username: str | None = None, password: str | None = None) -> None:
    client = Mqtt(port, username, password)
    try:
        reason = client.connect()
        assert not reason.is_failure, f"connect refused: {reason}"
        client.subscribe("tomq/smoke/#")
        payload = os.urandom(48) + b"\x00\xff"  # binary, like a sealed envelope
        client.publish("tomq/smoke/data", payload)
        message = client.messages.get(timeout=WAIT)
        assert (message.topic, message.payload) == ("tomq/smoke/data", payload)
    finally:
        client.close()


# --- mosquitto ----------------------------------------------------------------------------------


class Mosquitto:
    def __init__(self, port: int, password: str, process: subprocess.Popen[bytes]) -> None:
        self.port = port
        self.password = password
        self.process = process


@pytest.fixture(scope="module")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    binary = which("mosquitto")
    require("mosquitto", binary is not None, "install the Debian package mosquitto")
    assert binary is not None
    directory = tmp_path_factory.mktemp("mosquitto")
    password = os.urandom(12).hex()
    passwd = directory / "passwd"
    passwd.write_text(f"{USER}:{mosquitto_password_hash(password, os.urandom(12))}\n")
    passwd.chmod(0o600)
    port = free_port()
    config = directory / "mosquitto.conf"
    config.write_text(
        f"listener {port} 127.0.0.1\n"
        "allow_anonymous false\n"
        f"password_file {passwd}\n"
        "persistence false\n"
        "log_dest stderr\n"
        # Started as root, mosquitto drops to user `mosquitto`, which could not read the pytest tmp dir.
        f"user {pwd.getpwuid(os.geteuid()).pw_name}\n"
    )
    log = directory / "mosquitto.log"
    with open(log, "wb") as log_handle:
        process = subprocess.Popen([binary, "-c", str(config)], stdout=log_handle, stderr=subprocess.STDOUT)
    try:
        try:
            wait_for_port(port, process, timeout=WAIT)
        except (RuntimeError, TimeoutError) as exc:
            pytest.fail(f"mosquitto did not start: {exc}\n{log.read_text(errors='replace')}")
        yield Mosquitto(port, password, process)
    finally:
        process.terminate()
        try:
            process.wait(timeout=WAIT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=WAIT)


def test_mosquitto_accepts_tomq_password_hash_and_round_trips(mosquitto: Mosquitto) -> None:
    _round_trip(mosquitto.port, USER, mosquitto.password)


def test_mosquitto_refuses_a_wrong_password(mosquitto: Mosquitto) -> None:
    for username, password in ((USER, mosquitto.password + "x"), ("nobody", mosquitto.password), (None, None)):
        client = Mqtt(mosquitto.port, username, password)
        try:
            reason = client.connect()
        finally:
            client.close()
        assert reason.is_failure, f"{username}/{'wrong password' if password else 'anonymous'} was accepted"


def test_debian_mosquitto_sub_receives_from_paho(mosquitto: Mosquitto) -> None:
    binary = which("mosquitto_sub")
    require("mosquitto_sub", binary is not None, "install the Debian package mosquitto-clients")
    assert binary is not None
    payload = f"reading-{os.urandom(8).hex()}"
    subscriber = subprocess.Popen(
        [binary, "-h", "127.0.0.1", "-p", str(mosquitto.port), "-u", USER, "-P", mosquitto.password,
         "-t", "t/#", "-C", "1", "-v", "-W", "10"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    publisher = Mqtt(mosquitto.port, USER, mosquitto.password)
    try:
        assert not publisher.connect().is_failure
        # mosquitto_sub cannot say when its subscription is active: publish until it has one message and exits.
        deadline = time.monotonic() + WAIT
        while subscriber.poll() is None and time.monotonic() < deadline:
            publisher.publish("t/smoke", payload.encode())
            time.sleep(0.1)
        stdout, stderr = subscriber.communicate(timeout=WAIT)
    finally:
        publisher.close()
        if subscriber.poll() is None:
            subscriber.kill()
            subscriber.wait(timeout=WAIT)
    assert subscriber.returncode == 0, f"mosquitto_sub exited {subscriber.returncode}: {stderr}"
    assert stdout.splitlines()[0] == f"t/smoke {payload}"


# --- embedded amqtt -----------------------------------------------------------------------------


class EmbeddedAmqtt:
    """An amqtt 0.12 broker on its own asyncio loop in a background thread, on a loopback port."""

    def __init__(self, port: int, config: dict[str, Any] | None = None) -> None:
        self.port = port
        self.config = config if config is not None else {
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
            # Only anonymous auth: the default config adds $SYS and packet-logging plugins.
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }
        self.loop = asyncio.new_event_loop()
        self.broker: Any = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"amqtt-{port}", daemon=True)

    def _run(self) -> None:
        from amqtt.broker import Broker  # imported here: it must be created inside the running loop

        asyncio.set_event_loop(self.loop)

        async def boot() -> None:
            self.broker = Broker(self.config)
            await self.broker.start()

        try:
            self.loop.run_until_complete(boot())
        except BaseException as exc:
            self._error = exc
            self._started.set()
            self.loop.close()
            return
        self._started.set()
        try:
            self.loop.run_forever()
        finally:
            pending = asyncio.all_tasks(self.loop)
            for task in pending:
                task.cancel()
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    def start(self) -> None:
        self._thread.start()
        if not self._started.wait(WAIT):
            raise TimeoutError(f"amqtt did not start within {WAIT} s")
        if self._error is not None:
            raise RuntimeError(f"amqtt did not start: {self._error!r}") from self._error
        wait_for_port(self.port, timeout=WAIT, alive=self._thread.is_alive)

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        try:
            asyncio.run_coroutine_threadsafe(self.broker.shutdown(), self.loop).result(timeout=WAIT)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=WAIT)
        assert not self._thread.is_alive(), "the amqtt thread did not stop"


@pytest.fixture
def amqtt_broker() -> Iterator[EmbeddedAmqtt]:
    broker = EmbeddedAmqtt(free_port())
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def test_embedded_amqtt_round_trips_with_paho(amqtt_broker: EmbeddedAmqtt) -> None:
    _round_trip(amqtt_broker.port)
    assert amqtt_broker.broker.transitions.state == "started"


# --- components the node drives ----------------------------------------------------------------


def _runs(*command: str) -> subprocess.CompletedProcess[str] | None:
    """Run a component's command; None if it is not installed."""
    binary = which(command[0])
    if binary is None:
        return None
    return subprocess.run([binary, *command[1:]], capture_output=True, text=True, timeout=10)


@pytest.mark.parametrize(
    ("component", "command", "expect"),
    [
        ("dockerd", ("dockerd", "--version"), "Docker version"),
        ("docker", ("docker", "--version"), "Docker version"),
        ("glusterd", ("glusterd", "--version"), "glusterfs"),
    ],
)
def test_component_is_installed(component: str, command: tuple[str, ...], expect: str) -> None:
    result = _runs(*command)
    require(component, result is not None, f"`{command[0]}` is not installed")
    assert result is not None
    assert result.returncode == 0, f"{' '.join(command)} exited {result.returncode}: {result.stderr}"
    assert expect in result.stdout + result.stderr


def test_ip_netns_list_runs_as_root() -> None:
    require("root", os.geteuid() == 0, "network namespaces need root")
    result = _runs("ip", "netns", "list")
    require("ip (iproute2)", result is not None, "`ip` is not installed")
    assert result is not None
    assert result.returncode == 0, f"ip netns list exited {result.returncode}: {result.stderr}"
