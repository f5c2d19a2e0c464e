"""Devices join and leave the ledger by themselves; contracts fire commands that actuators can check.

A real 3-node cluster (mosquitto, process runtime). Devices speak raw MQTT here (paho), exactly the
messages the sensor SDK sends, so this test shows the node side alone:
- a signed join on dev/<d>/state becomes PROV-ID-create (its certificate the id-proof); a graceful
  leave and a broker-published last will (the device process SIGKILLed) become PROV-ID-delete with
  their reason; a join carrying another device's certificate is refused and records nothing;
- a committed analyser result that meets an executable contract's condition gives exactly one
  PROV-ORCH command record, and then a command envelope on the actuator's cmd topic that the
  actuator's own checker accepts (header, Merkle path, commit certificate of a majority);
- a passive contract acknowledges a car's join on its cmd topic.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from test_orchestration import OrchestratedCluster

from conftest import require
from procs import kill_process, which
from tomq import cluster
from tomq.mqtt import wait_until
from tomq.records import DATA, ID_CREATE, ID_DELETE, ORCH, Orchestrate, Provenance, Record
from tomq.sensors.command import CommandChecker, quorum_from_cluster
from tomq.wire import EnvelopeOpener, seal

pytestmark = pytest.mark.slow

# TOML 1.0 inline tables cannot span lines: one contract per line.
CONTRACTS = textwrap.dedent("""  # noqa: E501
    contracts = [
      { name = "car-connects", kind = "passive", on = "join", devices = "car-*", then = ["acknowledge"] },
      { name = "j1-busy", kind = "executable", on = "result", when = { field = "density.j1.cars_mean", above = 3.0 }, then = [ { command = "tl-j1", set = { colour = "green" } } ] },
    ]
""")

VANISHING_DEVICE = textwrap.dedent("""
    import sys, time
    import paho.mqtt.client as paho
    from tomq import cluster
    from tomq.wire import seal
    directory, name, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    loaded = cluster.load(directory)
    key = loaded.signing_key(name)
    topic = loaded.topics.device_state(name)
    now = int(time.time() * 1000)
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"vanishing-{name}")
    client.username_pw_set(name, cluster.broker_password(key))
    client.will_set(topic, seal(key, seq=2, time_ms=now, type="leave", body={"reason": "vanished"}), qos=1, retain=True)
    client.connect("127.0.0.1", port)
    client.loop_start()
    info = client.publish(topic, seal(key, seq=1, time_ms=now, type="join",
                                      body={"certificate": loaded.certificate(name).encoded}), qos=1, retain=True)
    info.wait_for_publish(10)
    print("joined", flush=True)
    time.sleep(600)
""")


@pytest.fixture
def site(tmp_path: Path):
    require("mosquitto", which("mosquitto") is not None)
    running = OrchestratedCluster(tmp_path, "process", None)
    for name, role in (("car-1", "sensor"), ("car-2", "sensor"), ("car-3", "sensor"), ("tl-j1", "actuator")):
        cluster.add_member(running.directory, name, role)
    running.broker.refresh()
    running.start()
    running.proposer().close()
    assert wait_until(lambda: running.status()["leader"] is not None, 30, 0.5), running.logs()
    try:
        yield running
    finally:
        running.stop()
        running.kill_instances()


class Device:
    """One device's MQTT session, speaking the SDK's state messages by hand."""

    def __init__(self, site: OrchestratedCluster, name: str) -> None:
        self.loaded = cluster.load(site.directory)
        self.name = name
        self.key = self.loaded.signing_key(name)
        self.received: list[bytes] = []
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"test-{name}")
        self.client.username_pw_set(name, cluster.broker_password(self.key))
        self.client.on_message = lambda _c, _u, message: self.received.append(message.payload)
        self.client.connect("127.0.0.1", site.broker.port)
        self.client.loop_start()
        self.client.subscribe(self.loaded.topics.device_cmd(name), qos=1)

    def say(self, seq: int, type_: str, body: dict, certificate_of: str | None = None) -> None:
        if type_ == "join":
            body = {"certificate": self.loaded.certificate(certificate_of or self.name).encoded}
        wire = seal(self.key, seq=seq, time_ms=int(time.time() * 1000), type=type_, body=body)
        self.client.publish(self.loaded.topics.device_state(self.name), wire, qos=1, retain=True).wait_for_publish(10)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def identity_records(site: OrchestratedCluster, name: str) -> list[tuple[str, dict]]:
    return [(record.state, record.attributes) for _, record, _ in site.ledger_records()
            if record.state in (ID_CREATE, ID_DELETE) and getattr(record.structure, "object", None) == name]


def test_devices_join_and_leave_by_their_own_signed_messages(site: OrchestratedCluster, tmp_path: Path):
    car1, car2 = Device(site, "car-1"), Device(site, "car-2")
    try:
        car2.say(1, "join", {}, certificate_of="car-1")  # another device's certificate: refused
        car1.say(1, "join", {})
        assert wait_until(lambda: identity_records(site, "car-1") != [], 20, 0.3), site.logs()
        [(state, attributes)] = identity_records(site, "car-1")
        assert state == ID_CREATE and attributes["via"] == "join message"
        proof = next(r.structure.proof for _, r, _ in site.ledger_records()
                     if r.state == ID_CREATE and getattr(r.structure, "object", None) == "car-1")
        assert proof == cluster.load(site.directory).certificate("car-1").encoded
        assert identity_records(site, "car-2") == []
        assert "carries the certificate of sensor car-1" in "".join(n.tail(400) for n in site.nodes.values())

        car1.say(2, "leave", {"reason": "graceful"})
        assert wait_until(lambda: len(identity_records(site, "car-1")) == 2, 20, 0.3), site.logs()
        assert identity_records(site, "car-1")[1] == (ID_DELETE, {"reason": "graceful", "seq": 2})
        car1.say(2, "join", {})  # a replayed seq: no third record
    finally:
        car1.close()
        car2.close()

    child = subprocess.Popen([sys.executable, "-c", VANISHING_DEVICE, str(site.directory), "car-3", str(site.broker.port)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "joined"
        assert wait_until(lambda: identity_records(site, "car-3") != [], 20, 0.3), site.logs()
    finally:
        kill_process(child)  # SIGKILL: the broker publishes its last will
    assert wait_until(lambda: len(identity_records(site, "car-3")) == 2, 30, 0.3), site.logs()
    assert identity_records(site, "car-3")[1] == (ID_DELETE, {"reason": "vanished", "seq": 2})
    time.sleep(1.0)
    assert len(identity_records(site, "car-1")) == 2  # the replayed join recorded nothing


def test_a_contract_records_its_command_then_the_actuator_can_check_it(site: OrchestratedCluster, tmp_path: Path):
    spec = tmp_path / "traffic.toml"
    spec.write_text(f'[service]\nname = "traffic"\ncommand = ["sleep", "600"]\n{CONTRACTS}')
    result = site.tomq("deploy", str(site.directory), str(spec), "--wait", "30")
    assert result.returncode == 0, result.stdout + result.stderr + site.logs()
    light, car = Device(site, "tl-j1"), Device(site, "car-1")
    try:
        light.say(1, "join", {})
        car.say(1, "join", {})
        assert wait_until(lambda: identity_records(site, "tl-j1") and identity_records(site, "car-1"), 20, 0.3)
        # The passive contract answered the car's join on its cmd topic, signed by a node.
        assert wait_until(lambda: car.received, 10, 0.2), site.logs()
        ack = EnvelopeOpener(cluster.load(site.directory).trust_store()).open(car.received[0], time.time())
        assert ack.type == "ack" and ack.body["contract"] == "car-connects" and ack.body["device"] == "car-1"

        proposer = site.proposer()
        try:
            # 5 and 6 meet the condition, but the second would only repeat the setting the light already
            # has: one command. 1 meets no condition.
            for cars in (5.0, 6.0, 1.0):
                summary = {"count": 4, "density": {"j1": {"readings": 4, "cars_mean": cars, "cars_last": cars}}}
                digest = hashlib.sha256(repr(summary).encode()).digest()
                record = Record(DATA, Provenance(f"result:{digest.hex()[:32]}", digest, "analyse:traffic",
                                                 "publish:traffic"), int(time.time() * 1000), {"summary": summary})
                wire, seq = proposer.seal(record.to_map())
                proposer.propose(wire)
                assert proposer.wait([seq], 20, resend={seq: wire}) == [], site.logs()
        finally:
            proposer.close()

        def commands() -> list[Orchestrate]:
            return [r.structure for _, r, _ in site.ledger_records()
                    if r.state == ORCH and isinstance(r.structure, Orchestrate) and r.structure.action == "command"]

        assert wait_until(lambda: commands(), 20, 0.3), site.logs()
        assert wait_until(lambda: light.received, 20, 0.2), site.logs()
        time.sleep(3.5)  # past a leader's retry interval: a second proposal would have committed by now
        [command] = commands()
        assert (command.location, command.reason["setting"], command.reason["rule"]) == ("tl-j1", {"colour": "green"},
                                                                                          "j1-busy")
        loaded = cluster.load(site.directory)
        checker = CommandChecker(loaded.operator, loaded.name, "tl-j1", quorum_from_cluster(loaded))
        checked = checker.check(light.received[0], time.time())
        assert checked.setting == {"colour": "green"}
        assert len(light.received) >= 1
    finally:
        light.close()
        car.close()

