"""Bridged readings into the real ledger: three `tomq node` processes on mosquitto, the collector as a
subprocess, `tomq bridge` processes on pseudo-terminals (relays from test_bridge_line.py, with a few
faults), and the reference firmware in this process.

What must hold (issue 7):
- device-signed readings arrive as a directly connected sensor's would: the device joins through the
  join it signed (presence), every reading the device saw acknowledged is exactly one PROV-DATA record
  with the device as source and its own signature, mode "device-signed", no on_behalf_of;
- bridge-attested readings are exactly one record per device reading, with the bridge as source (its
  signature), on_behalf_of the device, mode "bridge-attested" and the device's own seq, so that the
  PROV export says actedOnBehalfOf(bridge, device);
- a bridge that alters a device-signed reading (keeping the device's signature) gets it published,
  and the collector refuses it (BadSignature): nothing of it reaches the ledger;
- presence goes through the bridge as the device signed it: unplugged for longer than --vanish-after,
  the device's own will makes the ledger record it as vanished; plugged back, its new join makes it
  a member again, and no reading of the burst around it is lost or recorded twice.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from ledger_cluster import LedgerCluster
from test_bridge_line import BridgeProcess, Faults, FirmwareThread, Relay, Watcher, open_published

from conftest import require
from procs import PYTHON, stop_process, which
from tomq import canonical
from tomq import cluster as clusters
from tomq.bridge.bridge import Bridge
from tomq.bridge.provision import enrol_bridge
from tomq.bridge.session import Take
from tomq.bridge.uplink import Uplink
from tomq.mqtt import wait_until
from tomq.node.ledger.block import decode_block_file
from tomq.node.services.committed import block_records
from tomq.node.services.readings import reading_data_id
from tomq.records import DATA, ID_CREATE, ID_DELETE, Identity, Provenance, Record, prov_statements

COUNT = 60  # readings per device; the 10,000-reading run is in test_bridge_line.py


@dataclass
class LedgerSite:
    directory: Path
    ledger: LedgerCluster
    watcher: Watcher
    collector: CollectorProcess
    tmp: Path

    def records(self, state: str = DATA) -> list[tuple[str, Record]]:
        """(proposer id, record) of every record in `state` in the shared ledger directory, in ledger order."""
        out = []
        for path in sorted(self.ledger.ledger_dir.glob("*.block"), key=lambda p: int(p.stem)):
            for _, proposer, _, record in block_records(decode_block_file(path.read_bytes()).block):
                if record.state == state:
                    out.append((proposer, record))
        return out

    def presence(self, device: str) -> list[tuple[str, Any]]:
        """The device's joins and leaves on the ledger, in order: ("join", None) or ("leave", reason)."""
        out: list[tuple[int, int, tuple[str, Any]]] = []
        for path in self.ledger.ledger_dir.glob("*.block"):
            block = decode_block_file(path.read_bytes()).block
            for index, _, _, record in block_records(block):
                if isinstance(record.structure, Identity) and record.structure.object == device:
                    if record.state == ID_CREATE:
                        out.append((block.height, index, ("join", None)))
                    elif record.state == ID_DELETE:
                        out.append((block.height, index, ("leave", record.attributes.get("reason"))))
        return [what for _, _, what in sorted(out, key=lambda item: (item[0], item[1]))]

    def recorded(self) -> set[str]:
        return {r.structure.data for _, r in self.records() if isinstance(r.structure, Provenance)}

    def outputs(self) -> list[dict[str, Any]]:
        with self.watcher.lock:
            return [json.loads(p) for t, p in self.watcher.messages if t.endswith("/svc/collector/out")]


class CollectorProcess:
    """`python -m tomq.node.services.collector` in an instance directory, as a node starts it."""

    def __init__(self, argv: list[str], log_path: Path, env: dict[str, str]) -> None:
        self.log_path = log_path
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                            env=dict(os.environ, PYTHONUNBUFFERED="1", **env))

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        stop_process(self.process)


def start_collector(ledger: LedgerCluster, tmp: Path, devices: list[str]) -> CollectorProcess:
    """A collector instance, its directory written as a node writes it (node/services/context.py)."""
    loaded = clusters.load(ledger.directory)
    directory = tmp / "instance-collector"
    directory.mkdir()
    spec = {"name": "collector", "image": "tomq/runtime:latest", "program": "collector",
            "inputs": {"devices": devices, "services": [], "topics": []}, "outputs": ["out"],
            "resources": {"cpu": 0.1, "memory_mb": 64},
            "constraints": {"labels": {}, "nodes": [], "anti_affinity": [], "spread": True},
            "replicas": 1, "restart": "on-failure", "env": {}, "contracts": []}
    description = {"cluster": loaded.name, "broker": {"host": "127.0.0.1", "port": ledger.broker.port},
                   "service": "collector", "replica": 0, "node": "n1", "height": 1, "program": "collector",
                   "spec": spec, "identity": "collector", "ledger_height": 0}
    member = ledger.directory / "members" / "collector"
    files = {"service.json": json.dumps(description).encode(), "key": (member / "key").read_bytes(),
             "cert.cbor": (member / "cert.cbor").read_bytes(), "operator.pub": (loaded.operator.hex() + "\n").encode(),
             "devices.cbor": canonical.encode({})}
    for name, data in files.items():
        (directory / name).write_bytes(data)
        os.chmod(directory / name, 0o400)
    env = {"TOMQ_INSTANCE_DIR": str(directory), "TOMQ_CLUSTER": loaded.name, "TOMQ_SERVICE": "collector",
           "TOMQ_REPLICA": "0", "TOMQ_NODE": "n1", "TOMQ_HEIGHT": "1"}
    return CollectorProcess([PYTHON, "-m", "tomq.node.services.collector"], tmp / "collector.log", env)


@pytest.fixture(scope="module")
def ledger_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LedgerSite]:
    require("mosquitto", which("mosquitto") is not None, "install the Debian package mosquitto")
    tmp = tmp_path_factory.mktemp("bridge-ledger")
    ledger = LedgerCluster(tmp, nodes=3, broker="mosquitto")
    directory = ledger.directory
    clusters.add_member(directory, "t1", "sensor")
    enrol_bridge(directory, "b1", ["t2"])
    clusters.add_member(directory, "collector", "service")
    ledger.broker.refresh()
    ledger.start()
    proposer = ledger.proposer()  # also points cluster.toml at the test broker
    collector: CollectorProcess | None = None
    watcher: Watcher | None = None
    try:
        proof = (directory / "members" / "collector" / "cert.cbor").read_bytes()
        wire, seq = proposer.seal(Record(ID_CREATE, Identity("collector", "service", proof),
                                         int(time.time() * 1000)).to_map())
        proposer.propose(wire)
        assert not proposer.wait([seq], 30, {seq: wire}), ledger.logs()
        watcher = Watcher(directory, ledger.broker.port)
        watcher.client.subscribe(f"{watcher.root}/svc/collector/out", qos=1)
        collector = start_collector(ledger, tmp, ["t1", "b1"])
        assert wait_until(lambda: "subscribed (session" in collector.tail(50), 20, 0.05), collector.tail()
        yield LedgerSite(directory, ledger, watcher, collector, tmp)
    finally:
        if collector is not None:
            collector.stop()
        if watcher is not None:
            watcher.close()
        proposer.close()
        ledger.stop()


def run_device(site: LedgerSite, name: str, device: str, *, attested: bool, faults: Faults) -> tuple[
        FirmwareThread, list[bytes]]:
    """One bridge process and one firmware on a faulty pty: COUNT readings, all acknowledged."""
    work = site.tmp / name
    work.mkdir()
    relay = Relay(work, faults)
    bridge = BridgeProcess(site, relay.link, work / "bridge", "--broker-port", str(site.ledger.broker.port))
    firmware = FirmwareThread(site, relay, device, site.tmp / f"fw-{device}", attested=attested)
    topic_device = "b1" if attested else device
    try:
        # Hello first, readings once the ledger has the join (the device's own, or the bridge's): the
        # collector holds a reading from a device not yet joined only so long (collector.HOLD_SECONDS).
        firmware.start(0, value=lambda i: 15.0 + i)
        assert wait_until(lambda: ("join", None) in site.presence(topic_device), 30, 0.1), bridge.log()
        firmware.extend(COUNT)
        assert firmware.wait(30), (firmware.firmware.counters, bridge.log())
        assert wait_until(lambda: len(site.watcher.data(topic_device)) >= COUNT, 20, 0.05), bridge.log()
        bridge.stop()
    finally:
        bridge.kill()
        firmware.close()
        relay.close()
    return firmware, site.watcher.data(topic_device)


def test_both_modes_reach_the_ledger_exactly_once_with_their_mode(ledger_site: LedgerSite) -> None:
    site = ledger_site
    results: dict[str, tuple[FirmwareThread, list[bytes]]] = {}
    errors: list[BaseException] = []

    def device_run(name: str, device: str, attested: bool) -> None:
        try:
            results[device] = run_device(site, name, device, attested=attested,
                                         faults=Faults(noise=0.05, truncate=0.03, flip=0.03, ack_flip=0.05, seed=3))
        except BaseException as exc:
            errors.append(exc)

    runs = [threading.Thread(target=device_run, args=("signed", "t1", False)),
            threading.Thread(target=device_run, args=("attested", "t2", True))]
    for run in runs:
        run.start()
    for run in runs:
        run.join(90)
    if errors:
        raise errors[0]

    signed_fw, signed_wires = results["t1"]
    attested_fw, attested_wires = results["t2"]
    signed_ids = {reading_data_id(w): r.seq for w, r in zip(signed_wires, open_published(site, "t1", signed_wires),
                                                          strict=True)}
    attested_ids = {reading_data_id(w): r.device_seq for w, r in
                    zip(attested_wires, open_published(site, "b1", attested_wires), strict=True)}
    assert set(signed_ids.values()) == set(signed_fw.acked) and len(signed_ids) == COUNT
    assert set(attested_ids.values()) == set(attested_fw.acked) and len(attested_ids) == COUNT

    wanted = set(signed_ids) | set(attested_ids)
    assert wait_until(lambda: wanted <= {o["data"] for o in site.outputs()}, 40, 0.1), site.collector.tail(40)
    assert wait_until(lambda: wanted <= site.recorded(), 20, 0.2), site.collector.tail(40)

    by_data: dict[str, list[Record]] = {}
    for _, record in site.records():
        assert isinstance(record.structure, Provenance)
        by_data.setdefault(record.structure.data, []).append(record)
    for data in signed_ids:
        (record,) = by_data[data]  # exactly once
        prov = record.structure
        assert isinstance(prov, Provenance)
        assert prov.source == "t1" and prov.origin == "sample:t1" and prov.on_behalf_of is None
        assert len(prov.source_signature) == 64
        assert record.attributes == {"mode": "device-signed"}
    for data, device_seq in attested_ids.items():
        (record,) = by_data[data]
        prov = record.structure
        assert isinstance(prov, Provenance)
        assert prov.source == "b1" and prov.origin == "sample:t2" and prov.on_behalf_of == "t2"
        assert record.attributes == {"mode": "bridge-attested", "device_seq": device_seq}
        statements = {(s.relation, s.subject, s.object) for s in prov_statements(record)}
        assert ("actedOnBehalfOf", "b1", "t2") in statements and ("wasAttributedTo", prov.data, "b1") in statements
    out = {o["data"]: o for o in site.outputs()}
    sample = out[next(iter(attested_ids))]
    assert sample["device"] == "t2" and sample["bridge"] == "b1" and sample["mode"] == "bridge-attested"
    assert out[next(iter(signed_ids))]["mode"] == "device-signed"


class AlteringBridge(Bridge):
    """A bridge that raises every device-signed value by 10 before publishing, keeping the device's signature."""

    def store_signed(self, uplink: Uplink, take: Take) -> None:
        assert take.envelope is not None
        signed, signature = canonical.decode(take.envelope)
        fields = canonical.decode(signed)
        fields["body"]["value"] += 10
        forged = canonical.encode([canonical.encode(fields), signature])
        super().store_signed(uplink, Take(take.device, take.seq, take.mode, envelope=forged))


def test_a_bridge_that_alters_a_signed_reading_is_caught_by_the_collector(ledger_site: LedgerSite) -> None:
    site = ledger_site
    work = site.tmp / "altering"
    work.mkdir()
    relay = Relay(work, Faults())
    bridge = AlteringBridge(site.directory, str(relay.link), data_dir=work / "bridge",
                            broker_port=site.ledger.broker.port, report_every=1)
    runner = threading.Thread(target=bridge.run, daemon=True)
    runner.start()
    firmware = FirmwareThread(site, relay, "t1", site.tmp / "fw-t1")  # the same board: its seqs go on rising
    before = len(site.watcher.data("t1"))
    try:
        firmware.start(10, value=lambda i: 100.0 + i)
        assert firmware.wait(20), firmware.firmware.counters
        assert wait_until(lambda: len(site.watcher.data("t1")) >= before + 10, 20, 0.05)
    finally:
        bridge.stop()
        runner.join(15)
        firmware.close()
        relay.close()
    forged = site.watcher.data("t1")[before:]
    assert len(forged) == 10
    assert all(canonical.decode(canonical.decode(w)[0])["body"]["value"] >= 110.0 for w in forged)
    assert wait_until(lambda: site.collector.tail(200).count("dev/t1/data: BadSignature") >= 10, 20, 0.1), \
        site.collector.tail(40)
    time.sleep(1.0)
    assert not {reading_data_id(w) for w in forged} & site.recorded()
    assert site.collector.process.poll() is None  # it refused them and kept going


def test_an_unplugged_signed_device_vanishes_by_its_own_will_and_rejoins(ledger_site: LedgerSite) -> None:
    site = ledger_site
    work = site.tmp / "presence"
    work.mkdir()
    relay = Relay(work, Faults())
    bridge = BridgeProcess(site, relay.link, work / "bridge", "--broker-port", str(site.ledger.broker.port),
                           "--vanish-after", "1")
    firmware = FirmwareThread(site, relay, "t1", site.tmp / "fw-t1")
    before = len(site.watcher.data("t1"))
    joins_before = site.presence("t1").count(("join", None))
    try:
        firmware.start(80, value=lambda i: 50.0 + i)
        assert wait_until(lambda: len(firmware.acked) >= 30, 20, 0.01), bridge.log()
        relay.unplug()  # mid-burst
        assert wait_until(lambda: ("leave", "vanished") in site.presence("t1"), 20, 0.1), bridge.log()
        relay.plug()
        assert firmware.wait(30), (firmware.firmware.counters, bridge.log())
        assert wait_until(lambda: len(site.watcher.data("t1")) >= before + 80, 20, 0.05), bridge.log()
        bridge.stop()
    finally:
        bridge.kill()
        firmware.close()
        relay.close()
    wires = site.watcher.data("t1")[before:]
    readings = open_published(site, "t1", wires)
    assert sorted(r.seq for r in readings) == sorted(firmware.acked) and len(wires) == 80
    ids = {reading_data_id(w) for w in wires}
    assert wait_until(lambda: ids <= site.recorded(), 30, 0.2), site.collector.tail(40)
    counts: dict[str, int] = {}
    for _, record in site.records():
        if isinstance(record.structure, Provenance) and record.structure.data in ids:
            counts[record.structure.data] = counts.get(record.structure.data, 0) + 1
    assert set(counts.values()) == {1} and len(counts) == 80  # none lost, none twice
    history = site.presence("t1")
    vanished = history.index(("leave", "vanished"))
    assert ("join", None) in history[vanished:] and history.count(("join", None)) == joins_before + 1
