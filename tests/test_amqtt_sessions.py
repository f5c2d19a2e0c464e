"""The embedded broker hands a resumed session its queued messages without waiting for each PUBACK.

A service instance acknowledges a QoS 1 input only once its record has committed (node/services/link).
When a moved collector resumed its predecessor's persistent session, amqtt replayed the queued
messages inside CONNECT, waiting for each PUBACK; the wait timed out after a few seconds and the
broker dropped the client, again and again (seen in `tomq demo --chaos`). Here a reader that holds
its acknowledgements for longer than that must stay connected and get every queued message once.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from procs import AmqttBroker
from tomq import cluster
from tomq.mqtt import wait_until

HOLD_SECONDS = 8.0  # longer than amqtt's wait for a PUBACK (5 s)
QUEUED = 20


def client(directory: Path, name: str, port: int, client_id: str, clean: bool, manual_ack: bool = False) -> paho.Client:
    loaded = cluster.load(directory)
    made = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean,
                       manual_ack=manual_ack)
    made.username_pw_set(name, cluster.broker_password(loaded.signing_key(name)))
    made.connect("127.0.0.1", port, keepalive=10)
    made.loop_start()
    return made


@pytest.mark.slow
def test_a_resumed_session_that_acknowledges_late_is_not_dropped(tmp_path: Path):
    directory = tmp_path / "cluster"
    cluster.init(directory, ["n1"])
    cluster.add_member(directory, "reader", "service")
    broker = AmqttBroker(directory, tmp_path / "broker")
    broker.start()
    topic = f"{cluster.load(directory).topics.root}/svc/reader/in"
    try:
        first = client(directory, "reader", broker.port, "reader-session", clean=False)
        subscribed = threading.Event()
        first.on_subscribe = lambda *_: subscribed.set()
        first.subscribe(topic, qos=1)
        assert subscribed.wait(5)
        first.loop_stop()
        first.disconnect()
        time.sleep(0.5)

        sender = client(directory, "n1", broker.port, "sender", clean=True)
        for i in range(QUEUED):
            sender.publish(topic, str(i).encode(), qos=1).wait_for_publish(5)

        received: list[paho.MQTTMessage] = []
        disconnects: list[object] = []
        resumed = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="reader-session", clean_session=False,
                              manual_ack=True)
        resumed.username_pw_set("reader", cluster.broker_password(cluster.load(directory).signing_key("reader")))
        resumed.on_message = lambda _c, _u, message: received.append(message)
        resumed.on_disconnect = lambda *args: disconnects.append(args[3])
        resumed.connect("127.0.0.1", broker.port, keepalive=10)
        resumed.loop_start()
        try:
            assert wait_until(lambda: len(received) >= QUEUED, 10, 0.05), len(received)
            time.sleep(HOLD_SECONDS)  # the collector's case: nothing acknowledged until committed
            assert disconnects == [], f"the broker dropped the reader: {disconnects}"
            for message in received:
                resumed.ack(message.mid, message.qos)
            time.sleep(0.5)
            assert sorted({int(m.payload) for m in received}) == list(range(QUEUED))
            assert disconnects == []
        finally:
            resumed.loop_stop()
            resumed.disconnect()
            sender.loop_stop()
            sender.disconnect()
    finally:
        broker.close()
