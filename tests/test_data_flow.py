"""Readings through the orchestrated collector and analyser, across a forced move (issue 5, "Show").

20 simulated sensors publish 100 signed readings per second in all, for a minute, to a 3-node
cluster that runs the built-in collector and analyser as placed instances (process runtime, real
mosquitto, real node processes). A third of the way in, the operator moves the collector to another
node. Every reading must be accounted for in the ledger: exactly one PROV-DATA per reading, counted
by the datum id every service derives from the reading's bytes; and the analyser's results must be
recorded as derived from collector data.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from test_orchestration import OrchestratedCluster, orchestrated  # noqa: F401  (the fixture)

from tomq import cluster, records
from tomq.mqtt import MqttLink, wait_until
from tomq.node.services.readings import reading_data_id, seal_reading
from tomq.records import DATA, ID_CREATE, Identity, Record

SENSORS = 20
RATE = 100  # readings per second, all sensors together
SECONDS = 60
MOVE_AT = 20  # seconds into the stream


def join_devices(running: OrchestratedCluster, names: list[str]) -> None:
    proposer = running.proposer()
    try:
        sealed = {}
        for name in names:
            proof = (running.directory / "members" / name / "cert.cbor").read_bytes()
            wire, seq = proposer.seal(Record(ID_CREATE, Identity(name, "device", proof), int(time.time() * 1000)).to_map())
            sealed[seq] = wire
            proposer.propose(wire)
        assert not proposer.wait(list(sealed), 30, sealed), running.logs()
    finally:
        proposer.close()


def stream(running: OrchestratedCluster, names: list[str], stop_after: float, sent: list[bytes],
           errors: list[str]) -> None:
    """Each sensor on its own connection; all together RATE readings per second, paced by one clock."""
    loaded = cluster.load(running.directory)
    links = {}
    for name in names:
        link = MqttLink(host="127.0.0.1", port=running.broker.port, username=name,
                        password=cluster.broker_password(loaded.signing_key(name)))
        link.start()
        links[name] = link
    keys = {name: loaded.signing_key(name) for name in names}
    seqs = dict.fromkeys(names, int(time.time() * 1000))
    started = time.monotonic()
    count = 0
    try:
        while time.monotonic() - started < stop_after:
            due = started + count / RATE
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            name = names[count % len(names)]
            seqs[name] += 1
            wire = seal_reading(keys[name], seq=seqs[name], time_ms=int(time.time() * 1000),
                                value={"vehicles": count % 7, "junction": f"j{count % 4}"}, unit="count")
            if links[name].publish(loaded.topics.root + f"/dev/{name}/data", wire, qos=1):
                sent.append(wire)
            else:
                errors.append(f"{name}: broker not connected")
            count += 1
    finally:
        time.sleep(0.5)  # QoS 1: let paho hand the last ones over
        for link in links.values():
            link.stop()


@pytest.mark.slow
@pytest.mark.parametrize("orchestrated", ["process"], indirect=True)
def test_a_minute_of_readings_across_a_move_is_all_on_the_ledger(orchestrated: OrchestratedCluster,  # noqa: F811
                                                               tmp_path: Path):
    names = [f"car{i}" for i in range(SENSORS)]
    # Members are enrolled before the cluster starts in the other tests; here the broker must learn
    # of them while it runs: the emitted mosquitto files are written again and mosquitto reloaded.
    for name in names:
        cluster.add_member(orchestrated.directory, name, "sensor")
    for service in ("collector", "analyser"):
        cluster.add_member(orchestrated.directory, service, "service")
    orchestrated.broker.refresh()
    time.sleep(0.5)  # mosquitto re-reads its files on SIGHUP
    join_devices(orchestrated, names)
    collector = tmp_path / "collector.toml"
    collector.write_text('[service]\nname = "collector"\nprogram = "collector"\n'
                         '[service.inputs]\ntopics = ["dev/+/data"]\n')
    analyser = tmp_path / "analyser.toml"
    analyser.write_text('[service]\nname = "analyser"\nprogram = "analyser"\n'
                        '[service.inputs]\nservices = ["collector"]\n'
                        '[service.constraints]\nanti_affinity = ["collector"]\n')
    for spec in (collector, analyser):
        result = orchestrated.tomq("deploy", str(orchestrated.directory), str(spec), "--wait", "30")
        assert result.returncode == 0, result.stdout + result.stderr + orchestrated.logs()
    assert wait_until(lambda: {("collector", 0), ("analyser", 0)} <= orchestrated.running().keys(), 20)
    time.sleep(2)  # the instances subscribe (persistent sessions) before the first reading

    sent: list[bytes] = []
    errors: list[str] = []
    streamer = threading.Thread(target=stream, args=(orchestrated, names, SECONDS, sent, errors))
    streamer.start()
    time.sleep(MOVE_AT)
    before = orchestrated.running()[("collector", 0)][0]
    moved = orchestrated.tomq("move", str(orchestrated.directory), "collector:0")
    streamer.join()
    assert moved.returncode == 0, moved.stdout + moved.stderr
    after = orchestrated.running()[("collector", 0)][0]
    assert after != before
    assert not errors, errors[:5]
    assert len(sent) >= RATE * SECONDS * 0.95  # the generator kept up

    wanted = {reading_data_id(wire) for wire in sent}

    def recorded() -> dict[str, int]:
        counts: dict[str, int] = {}
        for _, record, _ in orchestrated.ledger_records():
            if record.state == DATA and isinstance(record.structure, records.Provenance):
                counts[record.structure.data] = counts.get(record.structure.data, 0) + 1
        return counts

    assert wait_until(lambda: wanted <= recorded().keys(), 90, 1.0), (
        f"{len(wanted - recorded().keys())} of {len(wanted)} readings missing\n" + orchestrated.logs())
    counts = recorded()
    assert all(counts[data] == 1 for data in wanted)  # exactly once, whatever was redelivered
    results = [r.structure for _, r, _ in orchestrated.ledger_records()
               if r.state == DATA and isinstance(r.structure, records.Provenance) and r.structure.data.startswith("result:")]
    assert results and all(set(r.derived_from) <= wanted for r in results)
    print(f"{len(wanted)} readings from {SENSORS} sensors over {SECONDS} s, collector moved {before} -> {after}; "
          f"{len(results)} analyser results; all on the ledger exactly once")
    # the collector that left was recorded as stopped, the one that came was recorded as started
    containers = [(r.state, r.structure.object) for _, r, _ in orchestrated.ledger_records()  # type: ignore[union-attr]
                  if isinstance(r.structure, Identity) and r.structure.kind == "container"
                  and r.structure.object.startswith("collector:")]
    assert sum(1 for state, _ in containers if state == ID_CREATE) >= 2
