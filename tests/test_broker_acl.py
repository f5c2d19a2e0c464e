"""tomq's broker access policy: unit tests of broker/policy.py, then ONE ACL matrix run on both brokers.

The matrix runs against the embedded amqtt broker (broker/embedded.py) and a real mosquitto 2
started from the files broker/mosquitto.py writes, with paho-mqtt 2 clients (MQTT 3.1.1) logging
in as cluster members. A publish is "allowed" when a privileged observer (n3, subscribed to
`tomq/acl/#`) receives it within 3 s, "denied" when it has not arrived 0.5 s after a later,
allowed message from the same client did. A subscription is "allowed" when a probe published
into it arrives; denied filters must deliver nothing (amqtt also answers SUBACK 0x80; mosquitto
2.0.11 grants the filter and filters each delivery, which the matrix records but cannot require).
Every broker and client is on 127.0.0.1 on a free port and is stopped by the test that started it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pwd
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from conftest import require
from procs import free_port, wait_for_port, which
from tomq import cluster as clusters
from tomq.broker import cli as broker_cli
from tomq.broker.embedded import EmbeddedBroker
from tomq.broker.mosquitto import render_acl, write_mosquitto_config
from tomq.broker.policy import (
    EVERYONE_SUBSCRIBES,
    RULES,
    Policy,
    filter_contains,
    filter_intersection,
    is_valid_filter,
    load_policy,
    parse_passwd,
)
from tomq.cluster import broker_password

CLUSTER = "acl"
ROOT = f"tomq/{CLUSTER}"
POSITIVE = 3.0  # seconds an allowed message may take to arrive
NEGATIVE = 0.5  # seconds a denied message is given to show up anyway
STEP = 5.0  # seconds for any connect, subscribe or process start


def t(below_root: str) -> str:
    return f"{ROOT}/{below_root}"


def _payload(label: str) -> bytes:
    return f"{label}-{os.urandom(6).hex()}".encode()


# --- the cluster --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("acl") / "cluster"
    clusters.init(directory, ["n1", "n2", "n3"], cluster_name=CLUSTER)
    clusters.add_member(directory, "s1", "sensor")
    clusters.add_member(directory, "s2", "sensor")
    clusters.add_member(directory, "tl1", "actuator")
    clusters.add_member(directory, "web", "service")
    return directory


@pytest.fixture(scope="module")
def passwords(cluster_dir: Path) -> dict[str, str]:
    loaded = clusters.load(cluster_dir)
    return {m.name: broker_password(loaded.signing_key(m.name)) for m in loaded.members}


# --- policy unit tests (no broker) --------------------------------------------------------------


@pytest.fixture(scope="module")
def policy(cluster_dir: Path) -> Policy:
    return load_policy(cluster_dir)


@pytest.mark.parametrize(
    ("who", "topic", "allowed"),
    [
        ("s1", "dev/s1/data", True),
        ("s1", "dev/s1/state", True),
        ("s1", "dev/s2/data", False),
        ("s1", "dev/s1/cmd", False),
        ("s1", "ledger/block/5", False),
        ("s1", "node/n1/raft/s1", False),
        ("tl1", "dev/tl1/data", True),
        ("tl1", "dev/tl1/cmd", False),
        ("n1", "node/n2/raft/n1", True),
        ("n1", "node/n2/raft/n3", False),
        ("n1", "node/n1/load", True),
        ("n1", "node/n2/load", False),
        ("n1", "ledger/block/5", True),
        ("n1", "ledger/head", True),
        ("n1", "ledger/propose/n1", True),
        ("n1", "ledger/propose/n2", False),  # a proposal's topic names its sender
        ("n1", "ledger/propose", False),
        ("n1", "ledger/other", False),
        ("n1", "orch/request", True),
        ("n1", "orch/placement/web", True),
        ("n1", "dev/tl1/cmd", True),
        ("n1", "dev/s1/data", False),
        ("n1", "audit/PROV-DATA", True),
        ("n1", "svc/web/in", True),
        ("n1", "svc/web/out", False),
        ("web", "svc/web/out", True),
        ("web", "svc/other/out", False),  # an output topic proves which service wrote it
        ("web", "ledger/propose/web", True),
        ("web", "ledger/propose/n1", False),
        ("web", "ledger/block/5", False),
        ("web", "dev/s1/data", False),
    ],
)
def test_policy_publish(policy: Policy, who: str, topic: str, allowed: bool) -> None:
    assert policy.may_publish(who, t(topic)) is allowed


@pytest.mark.parametrize(
    "topic",
    ["tomq/other/dev/s1/data", "dev/s1/data", f"{ROOT}/dev/+/data", f"{ROOT}/dev/s1/#", "", f"{ROOT}"],
)
def test_policy_never_grants_outside_the_root_or_a_wildcard(policy: Policy, topic: str) -> None:
    assert not any(policy.may_publish(who, topic) for who in ("n1", "s1", "tl1"))


@pytest.mark.parametrize(
    ("who", "topic_filter", "allowed"),
    [
        ("s1", t("audit/#"), True),
        ("s1", t("audit/PROV-DATA"), True),
        ("s1", t("ledger/block/+"), True),
        ("s1", t("ledger/block/7"), True),
        ("s1", t("ledger/head"), True),
        ("s1", t("orch/placement/+"), True),
        ("s1", t("ledger/+"), False),  # could match ledger/propose
        ("s1", t("dev/s2/data"), False),
        ("s1", t("dev/s1/cmd"), True),  # the cluster's acknowledgement of its join
        ("s1", t("dev/s2/cmd"), False),
        ("s1", t("dev/+/cmd"), False),
        ("s1", "tomq/#", False),
        ("s1", "#", False),
        ("tl1", t("dev/tl1/cmd"), True),
        ("tl1", t("dev/tl2/cmd"), False),
        ("tl1", t("dev/+/cmd"), False),
        ("n1", t("#"), True),
        ("n1", t("node/n1/raft/+"), True),
        ("n1", "tomq/#", False),
        ("n1", "#", False),
        ("n1", "tomq/+/audit/#", True),  # DESIGN.md §3: mosquitto_sub -t "tomq/+/audit/#" (read as this cluster)
        ("s1", "tomq/+/audit/#", True),
        ("s1", "tomq/+/ledger/#", False),  # the cluster wildcard widens nothing else
        ("n1", "$SYS/#", False),
        ("n1", t("dev/a+/data"), False),  # not a valid filter
        ("n1", t("#/x"), False),
    ],
)
def test_policy_subscribe(policy: Policy, who: str, topic_filter: str, allowed: bool) -> None:
    assert policy.may_subscribe(who, topic_filter) is allowed


def test_policy_connect_needs_the_members_own_password(policy: Policy, passwords: dict[str, str]) -> None:
    assert policy.may_connect("s1", passwords["s1"])
    assert not policy.may_connect("s1", passwords["s1"] + "x")
    assert not policy.may_connect("s1", passwords["s2"])
    assert not policy.may_connect("ghost", passwords["s1"])
    assert not policy.may_connect(None, passwords["s1"])
    assert not policy.may_connect("s1", None)


def test_policy_follows_the_certificate_validity_window(cluster_dir: Path, passwords: dict[str, str]) -> None:
    cert = clusters.load(cluster_dir).certificate("s1")
    inside = load_policy(cluster_dir, clock=lambda: cert.not_before + 1)
    after = load_policy(cluster_dir, clock=lambda: float(cert.not_after))
    assert inside.may_connect("s1", passwords["s1"]) and inside.may_publish("s1", t("dev/s1/data"))
    assert not after.may_connect("s1", passwords["s1"])
    assert not after.may_publish("s1", t("dev/s1/data"))
    assert not after.may_receive("s1", t("audit/x"))


def test_policy_refuses_a_member_whose_certificate_disagrees_with_cluster_toml(cluster_dir: Path) -> None:
    loaded = clusters.load(cluster_dir)
    certs = {m.name: loaded.certificate(m.name) for m in loaded.members}
    certs["s1"] = certs["n1"]  # s1 presenting a node's certificate
    del certs["s2"]
    policy = Policy(loaded, certs)
    assert set(policy.rejected) == {"s1", "s2"}
    assert not policy.may_publish("s1", t("ledger/head"))
    assert not policy.may_publish("s1", t("dev/s1/data"))
    assert policy.may_publish("n1", t("ledger/head"))


def test_policy_narrows_a_role_to_its_certificate(cluster_dir: Path) -> None:
    """The table is a ceiling: a node whose certificate lists only its load topic gets only that."""
    from tomq.certificate import issue
    from tomq.identity import SigningKey

    loaded = clusters.load(cluster_dir)
    operator = SigningKey.load(cluster_dir / "operator" / "operator.key")
    certs = {m.name: loaded.certificate(m.name) for m in loaded.members}
    old = certs["n2"]
    certs["n2"] = issue(operator, cluster=CLUSTER, subject=old.subject, name="n2", role="node",
                        not_before=old.not_before, not_after=old.not_after, publish=("node/n2/load", "svc/#"))
    policy = Policy(loaded, certs)
    assert policy.may_publish("n2", t("node/n2/load"))
    assert policy.may_publish("n2", t("svc/x/in"))  # the table's svc/+/in, inside the certificate's svc/#
    assert not policy.may_publish("n2", t("svc/x/out"))  # inside the certificate, outside the table
    assert not policy.may_publish("n2", t("ledger/head"))
    assert policy.may_publish("n2", t("orch/request"))  # a relay right, not the certificate's


@pytest.mark.parametrize(
    ("outer", "inner", "contains"),
    [
        ("a/#", "a", True),
        ("a/#", "a/#", True),
        ("a/#", "a/+/c", True),
        ("a/+", "a/#", False),
        ("a/+", "a/b", True),
        ("a/b", "a/+", False),
        ("a/+/c", "a/b/c", True),
        ("a/+/c", "a/b/d", False),
        ("#", "x/y", True),
        ("a/b", "a/b/c", False),
    ],
)
def test_filter_contains(outer: str, inner: str, contains: bool) -> None:
    assert filter_contains(outer, inner) is contains


@pytest.mark.parametrize(
    ("a", "b", "both"),
    [
        ("ledger/#", "ledger/propose", "ledger/propose"),
        ("node/+/raft/n1", "node/+/raft/n1", "node/+/raft/n1"),
        ("node/+/raft/n1", "node/n2/+/+", "node/n2/raft/n1"),
        ("a/#", "a", "a"),
        ("a/+", "b/+", None),
        ("a/b", "a/b/c", None),
        ("#", "x/+", "x/+"),
    ],
)
def test_filter_intersection(a: str, b: str, both: str | None) -> None:
    assert filter_intersection(a, b) == both
    assert filter_intersection(b, a) == both


def test_filter_validity() -> None:
    assert is_valid_filter("a/+/#") and is_valid_filter("#")
    assert not any(is_valid_filter(f) for f in ("", "a/#/b", "a/b#", "a/+b", "a\x00"))


def test_rules_cover_every_role_and_stay_inside_their_own_names() -> None:
    from tomq.topics import ROLES

    assert set(RULES) == set(ROLES)
    for role, rule in RULES.items():
        for pattern in (*rule.publish, *rule.relay, *rule.subscribe, *EVERYONE_SUBSCRIBES):
            assert is_valid_filter(pattern.replace("{name}", "x")), (role, pattern)
        # no device may publish anywhere but under its own name
        if role in ("sensor", "actuator"):
            assert all(p.startswith("dev/{name}/") for p in rule.publish), role


def test_parse_passwd_skips_comments_and_blank_lines() -> None:
    assert parse_passwd("# c\n\na:$7$1$x$y\nbad line\nb:$7$2$z$w\n") == {"a": "$7$1$x$y", "b": "$7$2$z$w"}


def test_mosquitto_acl_is_generated_from_the_policy(policy: Policy) -> None:
    acl = render_acl(policy)
    blocks = {block.splitlines()[1]: block for block in acl.split("\n\n")[1:]}
    s1 = blocks["user s1"].splitlines()
    assert f"topic write {t('dev/s1/data')}" in s1
    assert not any(line.startswith("topic write") and "s1" not in line for line in s1)
    assert f"topic write {t('node/+/raft/n1')}" in blocks["user n1"]
    assert f"topic read {t('#')}" in blocks["user n1"]
    # a role-specific rule must never become a `pattern`, which mosquitto applies to every user
    assert not any(line.startswith("pattern") and "write" in line for line in acl.splitlines())
    for grant in policy.grants():
        for topic in grant.publish:
            assert f"topic write {topic}" in blocks[f"user {grant.name}"]


def test_mosquitto_files_leave_out_members_with_expired_certificates(cluster_dir: Path, tmp_path: Path) -> None:
    loaded = clusters.load(cluster_dir)
    late = max(loaded.certificate(m.name).not_after for m in loaded.members) + 1.0
    conf = write_mosquitto_config(cluster_dir, tmp_path / "now", port=18830)
    expired = write_mosquitto_config(cluster_dir, tmp_path / "late", port=18830, clock=lambda: late)
    assert "s1" in parse_passwd((conf.parent / "passwd").read_text())
    assert parse_passwd((expired.parent / "passwd").read_text()) == {}
    text = conf.read_text()
    assert "listener 18830 127.0.0.1" in text and "allow_anonymous false" in text
    assert f"user {pwd.getpwuid(os.geteuid()).pw_name}" in text
    assert oct((conf.parent / "passwd").stat().st_mode & 0o777) == "0o600"


def test_cli_writes_mosquitto_files_and_starts_nothing(cluster_dir: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="tomq")
    broker_cli.register(parser.add_subparsers(dest="command"))
    out = tmp_path / "mosq"
    args = parser.parse_args(["broker", str(cluster_dir), "--mosquitto-conf", str(out), "--port", "18999"])
    before = threading.active_count()
    assert args.run(args) == 0
    assert threading.active_count() == before
    assert {p.name for p in out.iterdir()} == {"mosquitto.conf", "passwd", "acl"}
    assert "listener 18999 127.0.0.1" in (out / "mosquitto.conf").read_text()
    assert f"mosquitto -c {out / 'mosquitto.conf'}" in capsys.readouterr().out


# --- MQTT clients -------------------------------------------------------------------------------


class Client:
    """A paho-mqtt 2 client (MQTT 3.1.1) that records every message and waits for one by payload."""

    def __init__(self, port: int, username: str | None, password: str | None, client_id: str | None = None,
                 clean_session: bool = True, tls_ca: Path | None = None) -> None:
        self.port = port
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311,
                                  client_id=client_id or f"{username}-{os.urandom(4).hex()}",
                                  clean_session=clean_session)
        if username is not None:
            self.client.username_pw_set(username, password)
        if tls_ca is not None:
            self.client.tls_set(ca_certs=str(tls_ca))
        self._cond = threading.Condition()
        self.received: list[tuple[str, bytes]] = []
        self.connacks: list[Any] = []
        self.subacks: list[list[Any]] = []
        self.disconnects: list[Any] = []
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.on_disconnect = self._on_disconnect
        self._started = False

    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        with self._cond:
            self.connacks.append(reason)
            self._cond.notify_all()

    def _on_subscribe(self, _c: Any, _u: Any, _mid: Any, reasons: list[Any], _p: Any) -> None:
        with self._cond:
            self.subacks.append(reasons)
            self._cond.notify_all()

    def _on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.received.append((message.topic, bytes(message.payload)))
            self._cond.notify_all()

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        with self._cond:
            self.disconnects.append(reason)
            self._cond.notify_all()

    def connect(self) -> Any:
        """Connect and return the CONNACK reason; a refused client is not retried."""
        self.client.connect("127.0.0.1", self.port, keepalive=30)
        deadline = time.monotonic() + STEP
        while not self.connacks:  # drive the loop by hand: loop_start() would retry a refusal
            if time.monotonic() > deadline:
                raise TimeoutError(f"no CONNACK from 127.0.0.1:{self.port} within {STEP} s")
            self.client.loop(timeout=0.05)
        reason = self.connacks[0]
        if not reason.is_failure:
            self.client.loop_start()
            self._started = True
        return reason

    def subscribe(self, topic_filter: str) -> list[Any]:
        """Subscribe at QoS 1 and return the SUBACK reason codes."""
        count = len(self.subacks)
        result, _mid = self.client.subscribe(topic_filter, qos=1)
        assert result == mqtt.MQTT_ERR_SUCCESS
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.subacks) > count, STEP), f"no SUBACK for {topic_filter}"
            return self.subacks[count]

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        # QoS 1: both brokers acknowledge a PUBLISH they drop, so this waits only for the broker.
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(timeout=STEP)

    def wait_for(self, payload: bytes, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: any(p == payload for _t, p in self.received), timeout)

    def close(self) -> None:
        self.client.disconnect()  # after a refused CONNECT this only closes the socket
        if self._started:
            self.client.loop_stop()


@dataclass
class BrokerUnderTest:
    kind: str
    port: int
    passwords: dict[str, str]
    refuses_subscribe: bool  # answers a denied filter with SUBACK 0x80 (amqtt) or grants and filters (mosquitto)
    refuses_forbidden_will: bool  # refuses the CONNECT (amqtt) or accepts it and drops the will (mosquitto)
    clients: list[Client]

    def client(self, who: str | None, password: str | None = None, **kwargs: Any) -> Client:
        if password is None and who is not None:
            password = self.passwords.get(who, "")
        client = Client(self.port, who, password, **kwargs)
        self.clients.append(client)
        return client

    def connected(self, who: str, **kwargs: Any) -> Client:
        client = self.client(who, **kwargs)
        reason = client.connect()
        assert not reason.is_failure, f"{who} could not connect to {self.kind}: {reason}"
        return client


@contextlib.contextmanager
def _amqtt(cluster_dir: Path, passwords: dict[str, str]) -> Iterator[BrokerUnderTest]:
    broker = EmbeddedBroker(cluster_dir, port=free_port())
    broker.start()
    try:
        yield BrokerUnderTest("amqtt", broker.port, passwords, True, True, [])
    finally:
        broker.stop()


@contextlib.contextmanager
def _mosquitto(cluster_dir: Path, passwords: dict[str, str], workdir: Path) -> Iterator[BrokerUnderTest]:
    binary = which("mosquitto")
    require("mosquitto", binary is not None, "install the Debian package mosquitto")
    assert binary is not None
    conf = write_mosquitto_config(cluster_dir, workdir, port=free_port())
    port = int(conf.read_text().split("listener ", 1)[1].split()[0])
    log = workdir / "mosquitto.log"
    with open(log, "wb") as handle:
        process = subprocess.Popen([binary, "-c", str(conf)], stdout=handle, stderr=subprocess.STDOUT)
    try:
        try:
            wait_for_port(port, process, timeout=STEP)
        except (RuntimeError, TimeoutError) as exc:
            pytest.fail(f"mosquitto did not start: {exc}\n{log.read_text(errors='replace')}")
        yield BrokerUnderTest("mosquitto", port, passwords, False, False, [])
    finally:
        process.terminate()
        try:
            process.wait(timeout=STEP)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STEP)


@pytest.fixture(scope="module", params=["amqtt", "mosquitto"])
def broker(request: pytest.FixtureRequest, cluster_dir: Path, passwords: dict[str, str],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerUnderTest]:
    if request.param == "amqtt":
        manager = _amqtt(cluster_dir, passwords)
    else:
        manager = _mosquitto(cluster_dir, passwords, tmp_path_factory.mktemp("mosquitto"))
    with manager as running:
        yield running
        for client in running.clients:
            with contextlib.suppress(Exception):
                client.close()


@pytest.fixture
def fresh(broker: BrokerUnderTest) -> Iterator[BrokerUnderTest]:
    """The broker, with every client a test made closed when it ends."""
    first = len(broker.clients)
    yield broker
    for client in broker.clients[first:]:
        with contextlib.suppress(Exception):
            client.close()
    del broker.clients[first:]


@pytest.fixture(scope="module")
def observer(broker: BrokerUnderTest) -> Iterator[Client]:
    """n3, a node, sees everything published below the cluster root."""
    client = Client(broker.port, "n3", broker.passwords["n3"])
    assert not client.connect().is_failure
    try:
        reasons = client.subscribe(t("#"))
        assert not any(r.is_failure for r in reasons), reasons
        yield client
    finally:
        client.close()


# Each member's own always-allowed topic: published after a denied message to prove the
# connection still works and the denied one had its chance to arrive first.
SENTINEL = {"s1": "dev/s1/data", "s2": "dev/s2/data", "tl1": "dev/tl1/data", "n1": "node/n1/load"}


# --- the matrix -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("who", "password_of", "allowed"),
    [
        ("s1", "s1", True),
        ("n1", "n1", True),
        ("s1", "wrong", False),
        ("ghost", "s1", False),  # unknown user
        ("n1", "s1", False),  # someone else's password
        (None, None, False),  # anonymous
    ],
)
def test_connect(fresh: BrokerUnderTest, who: str | None, password_of: str | None, allowed: bool) -> None:
    password = fresh.passwords["s1"] + "x" if password_of == "wrong" else fresh.passwords.get(password_of or "")
    reason = fresh.client(who, password).connect()
    assert reason.is_failure is not allowed, f"{fresh.kind}: {who} connect -> {reason}"


@pytest.mark.parametrize(
    ("who", "topic", "allowed"),
    [
        ("s1", "dev/s1/data", True),
        ("s1", "dev/s1/state", True),
        ("s1", "dev/s2/data", False),  # another device's data
        ("s1", "ledger/block/5", False),
        ("s1", "node/n2/raft/s1", False),  # a sensor is no Raft peer, even under its own name
        ("tl1", "dev/tl1/data", True),
        ("tl1", "dev/tl1/cmd", False),  # commands come from the cluster
        ("n1", "node/n2/raft/n1", True),
        ("n1", "node/n2/raft/n3", False),  # spoofing n3
        ("n1", "node/n2/load", False),
        ("n1", "ledger/block/5", True),
        ("n1", "dev/tl1/cmd", True),
        ("n1", "orch/request", True),
        ("n1", "audit/PROV-DATA", True),
        ("n1", "dev/s1/data", False),  # a node cannot forge a sensor reading
    ],
)
def test_publish(fresh: BrokerUnderTest, observer: Client, who: str, topic: str, allowed: bool) -> None:
    publisher = fresh.connected(who)
    payload = _payload(f"pub-{who}")
    publisher.publish(t(topic), payload)
    if allowed:
        assert observer.wait_for(payload, POSITIVE), f"{fresh.kind}: {who} -> {topic} was not delivered"
        return
    sentinel = _payload(f"sentinel-{who}")
    publisher.publish(t(SENTINEL[who]), sentinel)
    assert observer.wait_for(sentinel, POSITIVE), f"{fresh.kind}: {who}'s allowed sentinel did not arrive"
    assert not observer.wait_for(payload, NEGATIVE), f"{fresh.kind}: {who} -> {topic} was delivered"


@pytest.mark.parametrize(
    ("who", "topic_filter", "probe_by", "probe", "allowed"),
    [
        ("tl1", t("dev/tl1/cmd"), "n1", "dev/tl1/cmd", True),
        ("tl1", t("dev/tl2/cmd"), "n1", "dev/tl2/cmd", False),
        ("tl1", t("dev/+/cmd"), "n1", "dev/tl2/cmd", False),  # a wildcard reaching other devices
        ("s1", t("audit/#"), "n1", "audit/PROV-DATA", True),
        ("s1", t("ledger/block/+"), "n1", "ledger/block/7", True),
        ("s1", "tomq/#", "n1", "node/n1/load", False),
        ("s1", t("dev/s2/data"), "s2", "dev/s2/data", False),  # sensors do not read each other
        ("s1", t("dev/tl1/cmd"), "n1", "dev/tl1/cmd", False),
        ("s1", t("dev/s1/cmd"), "n1", "dev/s1/cmd", True),
        ("n2", t("#"), "n1", "node/n1/load", True),
        ("n2", t("node/n2/raft/+"), "n1", "node/n2/raft/n1", True),
    ],
)
def test_subscribe(fresh: BrokerUnderTest, observer: Client, who: str, topic_filter: str, probe_by: str,
                   probe: str, allowed: bool) -> None:
    subscriber = fresh.connected(who)
    reasons = subscriber.subscribe(topic_filter)
    refused = any(r.is_failure for r in reasons)
    if allowed:
        assert not refused, f"{fresh.kind}: {who} subscribing {topic_filter} got {reasons}"
    elif fresh.refuses_subscribe:
        assert refused, f"{fresh.kind}: {who} subscribing {topic_filter} got {reasons}"
    payload = _payload(f"probe-{who}")
    fresh.connected(probe_by).publish(t(probe), payload)
    assert observer.wait_for(payload, POSITIVE), f"{fresh.kind}: the probe on {probe} was not published"
    if allowed:
        assert subscriber.wait_for(payload, POSITIVE), f"{fresh.kind}: {who} did not get {probe}"
    else:
        assert not subscriber.wait_for(payload, NEGATIVE), f"{fresh.kind}: {who} got {probe} via {topic_filter}"


def _raw_connect_with_will(port: int, username: str, password: str, will_topic: str, will: bytes) -> socket.socket:
    """A hand-made MQTT 3.1.1 CONNECT with a will; paho would send DISCONNECT, which cancels the will."""

    def text(value: str | bytes) -> bytes:
        data = value.encode() if isinstance(value, str) else value
        return struct.pack("!H", len(data)) + data

    flags = 0x80 | 0x40 | 0x08 | 0x04 | 0x02  # username, password, will QoS 1, will, clean session
    body = text("MQTT") + bytes([4, flags]) + struct.pack("!H", 30)
    body += text(f"will-{os.urandom(4).hex()}") + text(will_topic) + text(will) + text(username) + text(password)
    assert len(body) < 128
    sock = socket.create_connection(("127.0.0.1", port), timeout=STEP)
    sock.sendall(bytes([0x10, len(body)]) + body)
    return sock


@pytest.mark.parametrize(
    ("topic", "allowed"),
    [("dev/s1/state", True), ("dev/s2/state", False), ("ledger/head", False)],
)
def test_last_will_only_on_a_topic_the_member_may_publish(fresh: BrokerUnderTest, observer: Client,
                                                         topic: str, allowed: bool) -> None:
    will = _payload("will")
    sock = _raw_connect_with_will(fresh.port, "s1", fresh.passwords["s1"], t(topic), will)
    try:
        connack = sock.recv(4)
    finally:
        sock.close()  # no DISCONNECT: an abnormal end, which fires the will
    assert len(connack) == 4 and connack[0] == 0x20, connack
    if allowed or not fresh.refuses_forbidden_will:
        assert connack[3] == 0, f"{fresh.kind}: CONNECT with a will on {topic} refused ({connack[3]})"
    else:
        assert connack[3] == 5, f"{fresh.kind}: CONNECT with a will on {topic} not refused ({connack[3]})"
    assert observer.wait_for(will, POSITIVE if allowed else NEGATIVE * 2) is allowed, \
        f"{fresh.kind}: will on {topic} {'not ' if allowed else ''}delivered"


def test_retained_message_reaches_only_members_who_may_read_it(fresh: BrokerUnderTest) -> None:
    """amqtt 0.12 alone hands every new client the retained messages of everyone's subscriptions."""
    payload = _payload("retained-load")
    n1 = fresh.connected("n1")
    n1.publish(t("node/n1/load"), payload, retain=True)
    try:
        reader = fresh.connected("n2")
        assert not any(r.is_failure for r in reader.subscribe(t("node/+/load")))
        assert reader.wait_for(payload, POSITIVE), f"{fresh.kind}: a node did not get the retained load"
        sensor = fresh.connected("s1")
        sensor.subscribe("tomq/#")  # refused by amqtt, granted and filtered by mosquitto
        sensor.subscribe(t("audit/#"))
        assert not sensor.wait_for(payload, NEGATIVE), f"{fresh.kind}: a sensor got a node's retained load"
    finally:
        n1.publish(t("node/n1/load"), b"", retain=True)  # an empty retained message clears it


def test_failed_login_cannot_take_over_a_members_session(fresh: BrokerUnderTest) -> None:
    victim = fresh.connected("n2", client_id="acl-n2-session")
    assert not any(r.is_failure for r in victim.subscribe(t("node/+/load")))
    attacker = fresh.client("n2", fresh.passwords["n2"] + "x", client_id="acl-n2-session")
    assert attacker.connect().is_failure
    payload = _payload("after-attack")
    fresh.connected("n1").publish(t("node/n1/load"), payload)
    assert victim.wait_for(payload, POSITIVE), f"{fresh.kind}: a refused login cut the victim's session"
    assert victim.disconnects == []


def test_taking_over_another_members_client_id(fresh: BrokerUnderTest) -> None:
    """Records a difference: tomq's amqtt refuses it; mosquitto lets any member kick another off."""
    victim = fresh.connected("n2", client_id="acl-n2-id")
    intruder = fresh.client("s1", client_id="acl-n2-id")
    reason = intruder.connect()
    if fresh.kind == "amqtt":
        assert reason.is_failure
        payload = _payload("still-here")
        assert not any(r.is_failure for r in victim.subscribe(t("node/+/load")))
        fresh.connected("n1").publish(t("node/n1/load"), payload)
        assert victim.wait_for(payload, POSITIVE)
    else:
        assert not reason.is_failure
        with victim._cond:
            assert victim._cond.wait_for(lambda: bool(victim.disconnects), POSITIVE), "mosquitto kept both"


# --- embedded broker specifics ------------------------------------------------------------------


@pytest.fixture
def private_cluster(tmp_path: Path) -> Path:
    directory = tmp_path / "cluster"
    clusters.init(directory, ["n1"], cluster_name=CLUSTER)
    return directory


def test_embedded_broker_picks_up_a_member_added_while_it_runs(private_cluster: Path) -> None:
    with EmbeddedBroker(private_cluster, port=free_port()) as broker:
        clusters.add_member(private_cluster, "s9", "sensor")
        password = broker_password(clusters.load(private_cluster).signing_key("s9"))
        client = Client(broker.port, "s9", password)
        try:
            assert not client.connect().is_failure
        finally:
            client.close()


def _deliveries_stop(cluster_dir: Path, member: str, cut_off: Callable[[], None], because: str) -> None:
    """`member` (a sensor) receives on an audit subscription; after `cut_off()` it receives nothing more
    on the subscription it still holds, while a node does. The first delivery caches the broker's
    decision for (member, topic), so this also shows the cache does not outlive the change."""
    loaded = clusters.load(cluster_dir)
    with EmbeddedBroker(cluster_dir, port=free_port()) as broker:
        sensor = Client(broker.port, member, broker_password(loaded.signing_key(member)))
        node = Client(broker.port, "n1", broker_password(loaded.signing_key("n1")))
        try:
            assert not sensor.connect().is_failure and not node.connect().is_failure
            audit = f"{ROOT}/audit/PROV-DATA"
            assert not any(r.is_failure for r in sensor.subscribe(f"{ROOT}/audit/#"))
            node.subscribe(f"{ROOT}/audit/#")
            node.publish(audit, b"before")
            assert sensor.wait_for(b"before", STEP)
            cut_off()
            node.publish(audit, b"after")
            assert node.wait_for(b"after", STEP)
            assert not sensor.wait_for(b"after", 1.0), f"a member {because} still receives"
        finally:
            sensor.close()
            node.close()


def test_embedded_broker_stops_delivering_to_a_member_struck_from_the_cluster(private_cluster: Path) -> None:
    """Every delivery is checked against the current policy, not only the SUBSCRIBE: a member taken
    out of cluster.toml stops receiving on the subscription it already holds."""
    clusters.add_member(private_cluster, "s9", "sensor")
    toml = private_cluster / "cluster.toml"

    def strike() -> None:
        toml.write_text("".join(line for line in toml.read_text().splitlines(keepends=True)
                                if 'name = "s9"' not in line))
        time.sleep(1.0)  # the broker looks at its files at most twice a second on this path

    _deliveries_stop(private_cluster, "s9", strike, "struck from cluster.toml")


def test_embedded_broker_stops_delivering_to_a_member_whose_certificate_expired(private_cluster: Path) -> None:
    """Nothing in the policy files changes when a certificate expires, only the clock."""
    expires = int(time.time()) + 3
    clusters.add_member(private_cluster, "s8", "sensor", valid_days=1, now=expires - 86400)

    def expire() -> None:
        time.sleep(max(0.0, expires - time.time()) + 1.5)  # past the end, and past the cache's second

    _deliveries_stop(private_cluster, "s8", expire, "whose certificate expired")


def test_embedded_broker_tls_listener(private_cluster: Path) -> None:
    with EmbeddedBroker(private_cluster, port=free_port(), tls=True, tls_port=free_port()) as broker:
        assert broker.tls is not None and broker.tls_port is not None
        assert oct(broker.tls.key.stat().st_mode & 0o777) == "0o600"
        password = broker_password(clusters.load(private_cluster).signing_key("n1"))
        client = Client(broker.tls_port, "n1", password, tls_ca=broker.tls.ca)
        try:
            assert not client.connect().is_failure
            assert not any(r.is_failure for r in client.subscribe(t("node/n1/load")))
            client.publish(t("node/n1/load"), b"over-tls")
            assert client.wait_for(b"over-tls", POSITIVE)
        finally:
            client.close()
        # a client that does not trust the broker's CA is refused by TLS itself
        untrusting = ssl.create_default_context()
        with socket.create_connection(("127.0.0.1", broker.tls_port), timeout=STEP) as raw, \
                pytest.raises(ssl.SSLCertVerificationError):
            untrusting.wrap_socket(raw, server_hostname="127.0.0.1")


def test_embedded_broker_stops_its_thread_and_frees_its_port(private_cluster: Path) -> None:
    port = free_port()
    broker = EmbeddedBroker(private_cluster, port=port)
    broker.start()
    assert any(thread.name == f"tomq-broker-{port}" for thread in threading.enumerate())
    broker.stop()
    broker.stop()  # twice is harmless
    assert not any(thread.name == f"tomq-broker-{port}" for thread in threading.enumerate())
    with socket.socket() as again:
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", port))
