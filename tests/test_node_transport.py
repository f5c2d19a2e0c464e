"""Raft over MQTT with real processes: three node daemons on a real mosquitto (issue 4, first slice).

The state machine here is trivial (tests/node_child.py); the ledger has its own tests. What this shows
is the transport and the daemon loop: election over MQTT, replication, a leader SIGKILLed while
proposals stream, a follower paused and resumed, and identical applied sequences everywhere.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from conftest import require
from procs import PYTHON, Mosquitto, NodeProcess, leader_from_logs, which
from tomq import cluster
from tomq.mqtt import MqttLink, wait_until

CHILD = str(Path(__file__).with_name("node_child.py"))


@pytest.fixture
def three_nodes(tmp_path):
    require("mosquitto", which("mosquitto") is not None, "install the Debian package mosquitto")
    directory = tmp_path / "cluster"
    cluster.init(directory, ["n1", "n2", "n3"])
    broker = Mosquitto(directory, tmp_path / "broker")
    broker.start()
    nodes = {name: NodeProcess([PYTHON, CHILD, str(directory), name, str(broker.port), "stable"],
                               tmp_path / f"{name}.log") for name in ("n1", "n2", "n3")}
    for node in nodes.values():
        node.start()
    yield directory, broker, nodes
    for node in nodes.values():
        node.stop()
    broker.close()


def applied(directory: Path, name: str) -> list[str]:
    path = directory / "members" / name / "applied.txt"
    return path.read_text().split() if path.exists() else []


def proposer(directory: Path, port: int) -> MqttLink:
    loaded = cluster.load(directory)
    link = MqttLink(host="127.0.0.1", port=port, username="n1",
                    password=cluster.broker_password(loaded.signing_key("n1")), client_id=f"test-{os.getpid()}")
    link.start()
    return link




def test_three_nodes_replicate_and_survive_a_leader_kill(three_nodes):
    directory, broker, nodes = three_nodes
    topic = cluster.load(directory).topics.ledger_propose("n1")
    link = proposer(directory, broker.port)
    try:
        # Propose until something commits: that needs an elected leader.
        assert wait_until(lambda: link.publish(topic, b"hello") and bool(applied(directory, "n2")), 15, 0.3), \
            nodes["n2"].tail()
        sent = [f"r{i}".encode() for i in range(200)]
        for payload in sent[:100]:
            link.publish(topic, payload)
        assert wait_until(lambda: all(len(set(applied(directory, n))) >= 101 for n in nodes), 15), \
            {n: len(applied(directory, n)) for n in nodes}
        # Kill whoever leads; the others must elect a new leader and go on committing.
        first = {n: applied(directory, n) for n in nodes}
        victim = leader_from_logs(nodes)
        assert victim is not None
        nodes[victim].kill()
        survivors = [n for n in nodes if n != victim]
        started = time.monotonic()
        assert wait_until(lambda: link.publish(topic, b"after-kill") and all(
            b"after-kill".hex() in applied(directory, n) for n in survivors), 15, 0.2)
        failover = time.monotonic() - started
        for payload in sent[100:]:
            link.publish(topic, payload)
        assert wait_until(lambda: all(set(p.hex() for p in sent) <= set(applied(directory, n)) for n in survivors), 15)
        # The killed node restarts and catches up.
        nodes[victim].start()
        assert wait_until(lambda: set(p.hex() for p in sent) <= set(applied(directory, victim)), 20), nodes[victim].tail()
        # Same order everywhere: applied sequences are prefixes of one another.
        logs = {n: applied(directory, n) for n in nodes}
        longest = max(logs.values(), key=len)
        for name, sequence in logs.items():
            assert sequence == longest[: len(sequence)], name
        assert all(first[n] == logs[n][: len(first[n])] for n in nodes)  # nothing applied was undone
        assert failover < 5, f"failover took {failover:.1f} s"
    finally:
        link.stop()


def test_a_paused_follower_catches_up(three_nodes):
    directory, broker, nodes = three_nodes
    topic = cluster.load(directory).topics.ledger_propose("n1")
    link = proposer(directory, broker.port)
    try:
        assert wait_until(lambda: link.publish(topic, b"start") and bool(applied(directory, "n3")), 15, 0.3)
        nodes["n3"].signal(signal.SIGSTOP)
        wanted = {f"while-paused-{i}".encode().hex() for i in range(50)}

        def republish_missing() -> bool:
            # If n3 led, proposals made during the new election are dropped: a client retries.
            missing = wanted - set(applied(directory, "n1"))
            for payload in sorted(missing):
                link.publish(topic, bytes.fromhex(payload))
            return not missing and wanted <= set(applied(directory, "n2"))

        assert wait_until(republish_missing, 15, 0.5)
        time.sleep(2)
        nodes["n3"].signal(signal.SIGCONT)
        assert wait_until(lambda: applied(directory, "n3")[-1:] == applied(directory, "n1")[-1:]
                          and len(applied(directory, "n3")) == len(applied(directory, "n1")), 15), nodes["n3"].tail()
    finally:
        link.stop()


def test_nodes_ride_out_a_broker_restart(three_nodes):
    directory, broker, nodes = three_nodes
    topic = cluster.load(directory).topics.ledger_propose("n1")
    link = proposer(directory, broker.port)
    try:
        assert wait_until(lambda: link.publish(topic, b"before") and bool(applied(directory, "n2")), 15, 0.3)
        committed_before = {n: applied(directory, n) for n in nodes}
        broker.stop()
        time.sleep(1.0)
        broker.start()  # same port: clients reconnect with back-off and re-subscribe
        assert wait_until(lambda: link.publish(topic, b"after-restart") and all(
            b"after-restart".hex() in applied(directory, n) for n in nodes), 30, 0.3), nodes["n1"].tail()
        for name in nodes:
            now = applied(directory, name)
            assert now[: len(committed_before[name])] == committed_before[name]  # nothing committed was lost
    finally:
        link.stop()
