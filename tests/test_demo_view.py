"""`tomq demo`'s scenarios and live view, fast: no broker, no processes.

The view is fed the bytes the cluster really publishes, built with the project's own encoders
(sealed load reports, block files, audit lines from ledger_service.audit_lines, placement documents,
a traffic light's signed report), through `ClusterWatcher._handle` exactly as MQTT would deliver them,
and what `render` draws is checked line by line.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tomq import canonical, cluster
from tomq.node.demo import view
from tomq.node.demo.run import ledger_summary
from tomq.node.demo.scenarios import ACTUATOR, SCENARIOS, SENSOR
from tomq.node.demo.view import (
    ClusterWatcher,
    ViewState,
    actuator_state,
    describe_record,
    render,
    status_line,
)
from tomq.node.ledger.block import (
    BlockFile,
    block_file_name,
    decode_block_file,
    encode_block_file,
    make_block,
    sign_block,
)
from tomq.node.ledger_service import audit_lines
from tomq.node.orchestrator import contracts
from tomq.node.orchestrator.spec import parse_spec
from tomq.node.services.readings import seal_reading
from tomq.records import DATA, ID_CREATE, ID_DELETE, ORCH, Identity, Orchestrate, Provenance, Record
from tomq.wire import seal

NOW = time.time()  # certificates made in these tests are valid from now on
NOW_MS = int(NOW * 1000)


# -- scenarios ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_every_scenario_spec_parses_and_names_only_its_own_devices(name: str):
    scenario = SCENARIOS[name]
    names = {d.name for d in scenario.devices}
    assert len(names) == len(scenario.devices)
    assert {d.role for d in scenario.devices} <= {SENSOR, ACTUATOR}
    services: list[str] = []
    for service in scenario.services:
        spec = parse_spec(service.spec, f"{name}/{service.name}.toml")
        assert spec.name == service.name
        assert set(spec.inputs.devices) <= names
        assert set(spec.inputs.services) <= set(services), "a service is deployed after its inputs"
        services.append(spec.name)
        for contract in contracts.parse_all(spec.name, spec.contracts):
            assert {c.actuator for c in contract.commands} <= {a.name for a in scenario.actuators}
    # every device's data is collected exactly once: a second collector would propose the same datum again
    collected = [d for s in scenario.services for d in parse_spec(s.spec).inputs.devices]
    assert sorted(collected) == sorted(names)


def test_the_smart_city_analyser_carries_the_traffic_contracts():
    scenario = SCENARIOS["smart-city"]
    assert [d.name for d in scenario.sensors] == [f"car-{i}" for i in range(1, 7)]
    assert [d.name for d in scenario.actuators] == ["tl-j1", "tl-j2"]
    analyser = parse_spec(next(s.spec for s in scenario.services if s.name == "analyser"))
    assert analyser.program == "analyser" and analyser.inputs.services == ("collector",)
    assert dict(analyser.env) == {"GROUP_BY": "junction", "WINDOW": "12", "EMIT_SECONDS": "2"}
    by_name = {c["name"]: c for c in analyser.contracts}
    assert by_name["car-connects"] == {"name": "car-connects", "kind": "passive", "on": "join", "devices": "car-*",
                                       "then": ["acknowledge"]}
    assert by_name["j1-busy"] == {"name": "j1-busy", "kind": "executable", "on": "result",
                                  "when": {"field": "density.j1.cars_mean", "above": 3.0},
                                  "then": [{"command": "tl-j1", "set": {"colour": "green"}}]}
    assert by_name["j2-quiet"]["then"] == [{"command": "tl-j2", "set": {"colour": "red"}}]
    assert by_name["j2-quiet"]["when"] == {"field": "density.j2.cars_mean", "below": 3.0}
    # the lights' reports are readings, so the collector takes them too
    collector = parse_spec(next(s.spec for s in scenario.services if s.name == "collector"))
    assert {"tl-j1", "tl-j2", "car-1"} <= set(collector.inputs.devices)


def test_device_command_lines():
    car = SCENARIOS["smart-city"].sensors[0]
    assert car.argv("D") == ["sensor", "D", "--name", "car-1", "--sim", "car", "--seed", "1", "--rate", "1"]
    light = SCENARIOS["smart-city"].actuators[0]
    assert light.argv("D") == ["actuator", "D", "--name", "tl-j1", "--sim", "traffic-light"]


# -- the view, fed real payloads ----------------------------------------------------------------------

@pytest.fixture
def demo_cluster(tmp_path: Path) -> cluster.Cluster:
    directory = tmp_path / "c"
    cluster.init(directory, ["n1", "n2", "n3"], cluster_name="city", broker="127.0.0.1:1")
    for name, role in (("car-1", "sensor"), ("tl-j1", "actuator"), ("collector", "service")):
        cluster.add_member(directory, name, role)
    return cluster.load(directory)


def _watcher(loaded: cluster.Cluster) -> ClusterWatcher:
    state = ViewState.new(loaded.name, "smart-city", ["n1", "n2", "n3"], ["tl-j1"], started_ms=NOW_MS - 12_000,
                          duration_s=60)
    return ClusterWatcher(loaded.directory, state, clock=lambda: NOW)  # never started: fed by hand


def _load_report(loaded: cluster.Cluster, node: str, seq: int, *, role: str, leader: str, term: int = 2,
                 time_ms: int = NOW_MS, instances: tuple[str, ...] = ()) -> bytes:
    # The shape node/daemon.py publishes: the orchestrator's part, the load, the node's status, the time.
    report = {"cpu": 0.05, "memory": 0.02, "cores": 2, "memory_mb": 2048, "labels": {}, "reported_height": 7,
              "runtime": "process", "instances": list(instances), "load": 0.035,
              "status": {"id": node, "role": role, "term": term, "leader": leader, "commit": 9, "applied": 9,
                         "height": 7, "mode": "stable"},
              "time_ms": time_ms}
    return seal(loaded.signing_key(node), seq=seq, time_ms=time_ms, type="load", body=report)


def _records(loaded: cluster.Cluster) -> list[Record]:
    proof = (loaded.directory / "members" / "car-1" / "cert.cbor").read_bytes()
    return [
        Record(ID_CREATE, Identity("car-1", "device", proof), NOW_MS),
        Record(ORCH, Orchestrate("collector:0", "n1", "place", {"loads": {"n1": 0.1}}), NOW_MS),
        Record(DATA, Provenance("reading:" + "ab" * 16, b"\1" * 32, "sample:car-1", "collect:collector",
                                source="car-1", source_signature=b"\2" * 64), NOW_MS),
        Record(ORCH, Orchestrate("cmd:j1-busy.0:" + "cd" * 16, "tl-j1", "command",
                                 {"setting": {"colour": "green"}, "rule": "j1-busy", "trigger": "cd" * 16,
                                  "trigger_height": 8}), NOW_MS),
    ]


def _block(loaded: cluster.Cluster, height: int, proposer: str, recs: list[Record]) -> bytes:
    key = loaded.signing_key(proposer)
    envelopes = [seal(key, seq=1000 + i, time_ms=NOW_MS, type="record", body=r.to_map()) for i, r in enumerate(recs)]
    block = make_block(height=height, prev=b"\0" * 32, term=2, time_ms=NOW_MS, proposer=key.id, records=envelopes)
    return encode_block_file(BlockFile(block, sign_block(key, block), {}))


def test_the_view_of_a_running_smart_city(demo_cluster: cluster.Cluster):
    watcher = _watcher(demo_cluster)
    root = demo_cluster.topics.root
    for seq, node in enumerate(("n1", "n2", "n3"), start=1):
        role = "leader" if node == "n2" else "follower"
        instances = ("collector:0@5:running",) if node == "n1" else ()
        watcher._handle(f"{root}/node/{node}/load",
                        _load_report(demo_cluster, node, seq, role=role, leader="n2", instances=instances))
    block = _block(demo_cluster, 9, "n2", _records(demo_cluster))
    watcher._handle(f"{root}/ledger/block/9", block)
    # the same records as audit lines: counted once
    for topic, line in audit_lines(demo_cluster.topics, 9, decode_block_file(block)):
        watcher._handle(topic, line.encode())
    watcher._handle(f"{root}/ledger/head", canonical.encode({"height": 9, "hash": b"\x5a" * 32}))
    watcher._handle(f"{root}/orch/placement/collector",
                    json.dumps({"service": "collector", "height": 9,
                                "replicas": {"0": {"node": "n1", "height": 5}}}).encode())
    report = seal_reading(demo_cluster.signing_key("tl-j1"), seq=1, time_ms=NOW_MS,
                          value={"colour": "green", "command": "cmd:j1-busy.0:" + "cd" * 16, "height": 10})
    watcher._handle(f"{root}/dev/tl-j1/data", report)
    watcher._handle(f"{root}/dev/car-1/data",
                    seal_reading(demo_cluster.signing_key("car-1"), seq=1, time_ms=NOW_MS,
                                 value={"junction": "j1", "cars": 5}, unit="cars"))

    state = watcher.state
    assert state.leader(NOW_MS) == ("n2", 2)
    assert state.counts == {ID_CREATE: 1, ORCH: 2, DATA: 1}
    assert state.devices_joined == {"car-1"}
    assert state.actuators["tl-j1"].state == "green"
    assert state.actuators["tl-j1"].commanded == "colour=green"
    assert state.readings == {"tl-j1": 1, "car-1": 1}

    screen = render(state, 120, NOW_MS)
    lines = screen.splitlines()
    assert all(len(line) <= 120 for line in lines)
    assert lines[0] == "tomq demo · smart-city · cluster city · 00:12 of 01:00"
    assert lines[1].startswith("leader n2 · term 2 · ledger height 9 (head 5a5a5a5a5a5a)")
    assert any(line.startswith("  n1     follower   term 2 height 7 load 0.04") and "runs collector:0" in line
               for line in lines)
    assert "  collector    collector:0 on n1 (height 5)" in lines
    assert any(line.startswith("  tl-j1        green since ") and line.endswith(
        " · 1 change · last command colour=green at height 9") for line in lines)
    assert "records PROV-ID-create 1, PROV-DATA 1, PROV-ORCH 2" in lines
    assert "       9     4 records  PROV-ID-create 1, PROV-DATA 1, PROV-ORCH 2" in lines
    audit = lines[lines.index("audit (last 4)") + 1:lines.index("events")]
    assert [line.split()[:2] for line in audit] == [["9.0", ID_CREATE], ["9.1", ORCH], ["9.2", DATA], ["9.3", ORCH]]
    assert audit[0].endswith("device car-1  [n2]")
    assert "command tl-j1 colour=green (rule j1-busy)" in audit[3]
    events = [text for _, text in state.events]
    assert events == ["leader n2 (term 2)", "car-1 joined (PROV-ID-create at height 9)",
                      "collector:0 placed on n1 at height 5", "tl-j1 green (commanded at height 10)"]

    line = status_line(state, NOW_MS)
    assert line == ("[00:12] leader n2 term 2 · 3/3 nodes · height 9 · PROV-ID-create 1, PROV-DATA 1, PROV-ORCH 2"
                    " · tl-j1=green")


def test_messages_the_view_cannot_trust_or_read_change_nothing(demo_cluster: cluster.Cluster):
    watcher = _watcher(demo_cluster)
    root = demo_cluster.topics.root
    # n1 signing a report on n2's topic, garbage on every topic, a reading signed by another device
    watcher._on_message(f"{root}/node/n2/load", _load_report(demo_cluster, "n1", 1, role="leader", leader="n1"), False)
    for topic in ("node/n1/load", "ledger/head", "ledger/block/3", "audit/PROV-DATA", "orch/placement/x",
                  "dev/tl-j1/data"):
        watcher._on_message(f"{root}/{topic}", b"\xff not what it should be", False)
    watcher._on_message(f"{root}/dev/tl-j1/data",
                        seal_reading(demo_cluster.signing_key("car-1"), seq=1, time_ms=NOW_MS, value={"colour": "x"}),
                        False)
    state = watcher.state
    assert not state.counts and not state.readings and not state.placements and state.head_height == -1
    assert all(not n.reported_ms for n in state.nodes.values())
    assert state.actuators["tl-j1"].state is None


def test_a_silent_node_and_a_disagreement_show_as_such():
    state = ViewState.new("c", "smart-city", ["n1", "n2", "n3"], [])
    status = {"role": "leader", "term": 3, "leader": "n1", "height": 4}
    state.on_load("n1", {"status": status, "time_ms": NOW_MS - 10_000}, NOW_MS)  # killed 10 s ago
    state.on_load("n2", {"status": {**status, "role": "leader", "leader": "n2", "term": 4}, "time_ms": NOW_MS}, NOW_MS)
    state.on_load("n3", {"status": {**status, "role": "follower", "leader": "n2", "term": 4}, "time_ms": NOW_MS}, NOW_MS)
    assert state.leader(NOW_MS) == ("n2", 4)
    screen = render(state, 100, NOW_MS)
    assert "  n1     silent for 10 s (last seen as leader, term 3)" in screen.splitlines()
    # an older copy of a report never replaces a newer one
    state.on_load("n3", {"status": {**status, "role": "candidate", "leader": "n3"}, "time_ms": NOW_MS - 5}, NOW_MS)
    assert state.nodes["n3"].role == "follower"
    state.on_load("n3", {"status": {**status, "role": "follower", "leader": "n1", "term": 4}, "time_ms": NOW_MS + 1},
                  NOW_MS + 1)
    assert state.leader(NOW_MS + 1) == (None, 4)
    assert "leader (none agreed)" in render(state, 100, NOW_MS + 1)


def test_actuator_changes_are_events_once_and_a_flapping_one_a_line_every_2_s():
    state = ViewState.new("a-very-long-cluster-name", "agriculture", ["n1"], ["v1"])
    for at, value in ((0, {"open": True, "flow": 100, "command": "c1", "height": 3}),
                      (500, {"open": True, "flow": 100, "command": "c2", "height": 4}),  # no change
                      (2500, {"open": False, "flow": 0, "command": "c3", "height": 5}),
                      (3000, {"open": True, "flow": 100, "command": "c4", "height": 6}),
                      (3500, {"open": False, "flow": 0, "command": "c5", "height": 7}),
                      (4600, {"open": True, "flow": 100, "command": "c6", "height": 8})):
        state.on_reading("v1", value, NOW_MS + at, NOW_MS + at)
    assert [text for _, text in state.events] == [
        "v1 open (commanded at height 3)", "v1 closed (commanded at height 5)",
        "v1 open (commanded at height 8; 2 quicker changes not shown)"]
    assert state.noted == 3 and state.actuators["v1"].changes == 5 and state.actuators["v1"].state == "open"


def test_the_view_fits_any_terminal():
    state = ViewState.new("a-very-long-cluster-name", "agriculture", ["n1"], ["v1"])
    state.on_reading("v1", {"open": True, "flow": 100}, NOW_MS, NOW_MS)
    for height in range(30):
        state.on_record(height, 0, "n1", {"state": DATA, "prov": {"data": f"reading:{height}", "source": "temp-1",
                                                                 "receiver": "collect:collector"}}, NOW_MS)
        state.note(f"event {height}", NOW_MS)
    full = render(state, 100, NOW_MS).splitlines()
    assert full[full.index("latest blocks") + 1].startswith("      29     1 records")
    assert full[-1].endswith("event 29") and "audit (last 10)" in full
    # a short terminal: the bottom lists shrink (blocks first), the newest events stay
    short = render(state, 100, NOW_MS, height=len(full) - 8).splitlines()
    assert len(short) == len(full) - 8
    assert short[short.index("latest blocks") + 1] == "audit (last 7)"
    assert short[-8:] == full[-8:]
    tiny = render(state, 100, NOW_MS, height=5).splitlines()
    assert len(tiny) == 5
    for width in (20, 40, 80):
        assert all(len(line) <= width for line in render(state, width, NOW_MS).splitlines())


def test_record_and_state_descriptions():
    assert actuator_state({"colour": "amber", "command": "c", "height": 1}) == "amber"
    assert actuator_state({"flow": 40}) == "flow=40"
    assert actuator_state(12.5) == "12.5"
    assert describe_record({"state": ID_DELETE, "identity": {"object": "svc:0:n1:4", "kind": "container",
                                                           "proof": "00", "attributed_to": "n1"}}) \
        == "container svc:0:n1:4 on n1"
    result = {"state": DATA, "prov": {"data": "result:" + "e" * 32, "hash": "00", "origin": "analyse:analyser",
                                      "receiver": "publish:analyser", "source": "analyser",
                                      "derived_from": ["reading:1", "reading:2"]},
              "attrs": {"device": "car-3", "summary": {}}}
    assert describe_record(result) == "result:eeeeeeeeeeeeee… by analyser → publish:analyser, from 2 inputs of car-3"


def test_the_ledger_summary_reads_block_files(demo_cluster: cluster.Cluster, tmp_path: Path):
    ledger = tmp_path / "ledger"
    ledger.mkdir()
    recs = _records(demo_cluster)
    (ledger / block_file_name(1)).write_bytes(_block(demo_cluster, 1, "n1", recs[:2]))
    leave = Record(ID_DELETE, Identity("car-1", "device", b"\0"), NOW_MS)
    (ledger / block_file_name(2)).write_bytes(_block(demo_cluster, 2, "n1", [*recs[2:], leave]))
    assert ledger_summary(ledger, ["car-1", "tl-j1"]) == [
        "devices joined: car-1", "devices left: car-1", "readings recorded: 1; analyser results: 0",
        "never joined: tl-j1", "commands: tl-j1 colour=green ×1"]


def test_stale_threshold_is_a_few_report_intervals():
    assert 2000 < view.STALE_MS < 10_000  # reports go out every second (node/daemon.py status_every)
