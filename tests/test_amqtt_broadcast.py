"""The embedded broker's own broadcast loop (broker/amqtt_broadcast.py): every subscriber gets every
message of a burst once, in order, and only on the topics it holds; the broker stops at once with
its readers connected and a burst still in flight."""

from __future__ import annotations

import time
from pathlib import Path

import paho.mqtt.client as paho

from procs import free_port
from tomq import cluster
from tomq.broker.embedded import EmbeddedBroker
from tomq.mqtt import wait_until

BURST = 2000


def connect(directory: Path, name: str, port: int) -> paho.Client:
    loaded = cluster.load(directory)
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"{name}-broadcast-test")
    client.username_pw_set(name, cluster.broker_password(loaded.signing_key(name)))
    client.connect("127.0.0.1", port, keepalive=10)
    client.loop_start()
    return client


def subscribed(client: paho.Client, *topic_filters: str) -> dict[str, list[bytes]]:
    """What arrives, by topic, once the broker has granted every filter."""
    got: dict[str, list[bytes]] = {}
    granted: list[object] = []
    client.on_message = lambda _c, _u, message: got.setdefault(message.topic, []).append(bytes(message.payload))
    client.on_subscribe = lambda _c, _u, _mid, codes, _p: granted.extend(codes)
    client.subscribe([(f, 0) for f in topic_filters])
    assert wait_until(lambda: len(granted) == len(topic_filters), 5)
    assert all(not code.is_failure for code in granted), granted  # type: ignore[attr-defined]
    return got


def test_a_burst_reaches_every_reader_in_order(tmp_path: Path):
    directory = tmp_path / "cluster"
    cluster.init(directory, ["n1", "n2"])
    cluster.add_member(directory, "s1", "sensor")
    topics = cluster.load(directory).topics
    broker = EmbeddedBroker(directory, port=free_port())
    broker.start()
    clients: list[paho.Client] = []
    try:
        publisher, node_reader, sensor_reader = (connect(directory, name, broker.port) for name in ("n1", "n2", "s1"))
        clients += [publisher, node_reader, sensor_reader]
        audit, raft = topics.audit("PROV-DATA"), topics.raft("n2", "n1")
        at_node = subscribed(node_reader, topics.audit_all(), raft)
        at_sensor = subscribed(sensor_reader, "tomq/+/audit/#")  # DESIGN.md §3, as mosquitto_sub does
        wanted = [f"{i:05d}".encode() for i in range(BURST)]
        for payload in wanted:  # two topics interleaved: each reader's order per topic must hold
            publisher.publish(audit, payload, qos=0)
            publisher.publish(raft, b"raft " + payload, qos=0)

        def arrived() -> tuple[int, ...]:
            return tuple(len(got.get(topic, [])) for got, topic in ((at_node, audit), (at_node, raft), (at_sensor, audit)))

        assert wait_until(lambda: min(arrived()) >= BURST, 20), arrived()
        time.sleep(0.3)  # anything more would arrive now
        assert at_node[audit] == wanted and at_sensor[audit] == wanted
        assert at_node[raft] == [b"raft " + payload for payload in wanted]
        assert set(at_sensor) == {audit}  # the Raft messages went to n2 alone

        for payload in wanted:  # still on their way while the broker stops
            publisher.publish(audit, payload, qos=0)
        started = time.monotonic()
        broker.stop()  # raises if the broker's thread does not end within 10 s
        # amqtt 0.12.1 on Python 3.11 could hang here for good (TomqBroker._stop_handler)
        assert time.monotonic() - started < 3.0
    finally:
        for client in clients:
            client.loop_stop()
            client.disconnect()
        broker.stop()
