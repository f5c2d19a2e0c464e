"""A small, real smart-city ledger for the auditor's tools (export, proofs, bundles, queries).

Built with test_ledger_verify's LedgerBuilder: a cluster from `tomq.cluster.init`, real keys, sealed
records, blocks signed by their proposer and certified by a majority, written as block files. The
records are what a running cluster writes (node/presence.py, orchestrator/service.py, the collector
and analyser, node/actuation.py) and pass Table II; `verify_ledger` accepts the result.

    0  genesis: n1, n2, n3
    1  devices s1, s2 (sensors) and tl-j1 (actuator) join (proposed by n1)
    2  services collector and analyser join (the operator's deployments)
    3  collector:0 placed on n2, analyser:0 on n3, with every node's load
    4  their containers start (proposed by the node that runs each, attributed to it)
    5+ per round: readings from s1 and s2 (proposed by the collector), then a result derived from them
       and from the round before's result (the analyser), then the command to tl-j1 that the analyser's
       contract j1-busy (green) or j1-quiet (red) issues on it (n1), then tl-j1's report (a reading)
    .. the collector moves from n2 to n1 (a placement that replaces), an execute (join-data) record,
       s2 leaves, the old collector container stops
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from test_ledger_verify import START_MS, LedgerBuilder

from keys import NOW
from tomq import cluster
from tomq.node.orchestrator.requests import seal_deploy
from tomq.node.orchestrator.spec import parse_spec
from tomq.records import DATA, ID_CREATE, ID_DELETE, ORCH, Identity, Orchestrate, Provenance, Record
from tomq.wire import SequenceCounter

LOADS = {"n1": {"cpu": 0.40, "memory": 0.30, "score": 0.35}, "n2": {"cpu": 0.05, "memory": 0.10, "score": 0.075},
         "n3": {"cpu": 0.20, "memory": 0.10, "score": 0.15}}
COLLECTOR_SPEC = """
[service]
name = "collector"
program = "collector"
[service.inputs]
devices = ["s1", "s2", "tl-j1"]
"""
ANALYSER_SPEC = """
[service]
name = "analyser"
program = "analyser"
contracts = [
  { name = "j1-busy", kind = "executable", on = "result", when = { field = "cars_mean", above = 3.0 }, then = [ { command = "tl-j1", set = { colour = "green" } } ] },
  { name = "j1-quiet", kind = "executable", on = "result", when = { field = "cars_mean", below = 3.0 }, then = [ { command = "tl-j1", set = { colour = "red" } } ] },
]
[service.inputs]
services = ["collector"]
"""
RULE = "least-loaded eligible node; score = (cpu + memory) / 2 with unreported requests added; ties by name"


@dataclass
class Scenario:
    """What was written, for tests to compare tools' answers with."""

    builder: LedgerBuilder
    readings: dict[str, tuple[str, int, str]] = field(default_factory=dict)  # data id -> (device, height, record id)
    results: dict[str, tuple[list[str], int, str]] = field(default_factory=dict)  # id -> (parents, height, rid)
    commands: list[tuple[str, str, int, str]] = field(default_factory=list)  # (command id, result id, height, rid)
    placements: list[tuple[str, str, int]] = field(default_factory=list)  # (replica, node, height)
    records: list[tuple[int, Record]] = field(default_factory=list)  # every (height, record) after genesis

    @property
    def ledger(self) -> Path:
        return self.builder.ledger

    @property
    def operator_pub(self) -> Path:
        return self.builder.cluster_dir / "operator" / "operator.pub"


def at(height: int, offset: int = 0) -> int:
    return START_MS + height * 1000 + offset


def build_city(root: Path, rounds: int = 3, readings_per_device: int = 2) -> Scenario:
    b = _builder(root)
    s = Scenario(b)
    b.genesis()

    def block(items: list[tuple[str, Record]], **options: object) -> int:
        height = b.height + 1
        b.block([b.seal(signer, record) for signer, record in items], **options)  # type: ignore[arg-type]
        s.records.extend((height, record) for _, record in items)
        return height

    h = b.height + 1
    block([("n1", Record(ID_CREATE, Identity(d, "device", b.cert(d)), at(h, i), {"via": "join message", "seq": 1}))
           for i, d in enumerate(("s1", "s2", "tl-j1"))])
    h = b.height + 1
    counter = SequenceCounter()
    block([("n1", Record(ID_CREATE, Identity(svc, "service", b.cert(svc)), at(h, i),
                         {"request": seal_deploy(b.operator, counter, parse_spec(spec), b.cert(svc))}))
           for i, (svc, spec) in enumerate((("collector", COLLECTOR_SPEC), ("analyser", ANALYSER_SPEC)))])
    h = b.height + 1
    # The second placement of one planning pass sees the first one's requests on n2 (placement.py).
    busy_n2 = {**LOADS, "n2": {"cpu": 0.05, "memory": 0.10, "score": 0.325}}
    block([("n1", _place("collector:0", "n2", at(h, 0))), ("n1", _place("analyser:0", "n3", at(h, 1), loads=busy_n2))])
    s.placements += [("collector:0", "n2", h), ("analyser:0", "n3", h)]
    placed = h
    h = b.height + 1
    block([("n2", Record(ID_CREATE, Identity(f"collector:0:n2:{placed}", "container", b"\x11" * 32, "n2"), at(h, 0),
                         {"runtime": "process"})),
           ("n3", Record(ID_CREATE, Identity(f"analyser:0:n3:{placed}", "container", b"\x12" * 32, "n3"), at(h, 1),
                         {"runtime": "process"}))], signers=("n1", "n2", "n3"))
    last_result = ""
    for round_ in range(rounds):
        h = b.height + 1
        items: list[tuple[str, Record]] = []
        ids = []
        for device in ("s1", "s2"):
            for k in range(readings_per_device):
                data = _data_id("reading", f"{device}/{round_}/{k}")
                items.append(("collector", _reading(data, device, at(h, len(items)))))
                ids.append((data, device))
        block(items)
        for (data, device), (_, record) in zip(ids, items, strict=True):
            s.readings[data] = (device, h, record.record_id)
        h = b.height + 1
        result = _data_id("result", f"round {round_}")
        busy = round_ % 2 == 0  # busy rounds fire j1-busy (green), quiet ones j1-quiet (red)
        parents = [data for data, _ in ids]
        if last_result:
            parents.append(last_result)  # a running summary: each result also builds on the one before
        result_record = Record(DATA, Provenance(result, hashlib.sha256(result.encode()).digest(), "analyse:analyser",
                                                "publish:analyser", source="analyser", derived_from=tuple(parents)),
                               at(h), {"device": "s1", "summary": {"cars_mean": 4.5 + round_ if busy else 1.5}})
        block([("analyser", result_record)])
        s.results[result] = (parents, h, result_record.record_id)
        last_result = result
        h = b.height + 1
        rule = "j1-busy" if busy else "j1-quiet"
        command_id = f"cmd:{rule}.0:{result_record.record_id}"
        command = Record(ORCH, Orchestrate(command_id, "tl-j1", "command",
                                           {"setting": {"colour": "green" if busy else "red"}, "rule": rule,
                                            "trigger": result_record.record_id, "trigger_height": h - 1}), at(h))
        block([("n1", command)])
        s.commands.append((command_id, result, h, command.record_id))
        h = b.height + 1
        report = _data_id("reading", f"tl-j1/{round_}")
        block([("collector", _reading(report, "tl-j1", at(h)))])
        s.readings[report] = ("tl-j1", h, s.records[-1][1].record_id)
    h = b.height + 1
    moved = _place("collector:0", "n1", at(h), replaces={"node": "n2", "why": "moved by the operator"},
                   loads={**LOADS, "n3": {"cpu": 0.9, "memory": 0.5, "score": 0.7}},
                   excluded={"n2": "not alive (no load report or Raft contact)"})
    first_reading = next(iter(s.readings))
    block([("n1", moved), ("n1", Record(ORCH, Orchestrate(first_reading, "collect:collector", "execute", {}), at(h, 1)))],
          term=2)
    s.placements.append(("collector:0", "n1", h))
    h = b.height + 1
    block([("n1", Record(ID_DELETE, Identity("s2", "device", b.cert("s2")), at(h), {"reason": "graceful"})),
           ("n2", Record(ID_DELETE, Identity(f"collector:0:n2:{placed}", "container", b"\0", "n2"), at(h, 1),
                         {"why": "stopped"}))], term=2)
    return s


def _builder(root: Path) -> LedgerBuilder:
    builder = LedgerBuilder(root)  # makes root/cluster with n1..n3 and s1
    for name, role in (("s2", "sensor"), ("tl-j1", "actuator"), ("collector", "service"), ("analyser", "service")):
        cluster.add_member(builder.cluster_dir, name, role, now=NOW)
    builder.cluster = cluster.load(builder.cluster_dir)
    builder.keys = {member.name: builder.cluster.signing_key(member.name) for member in builder.cluster.members}
    return builder


def _data_id(kind: str, text: str) -> str:
    return f"{kind}:{hashlib.sha256(text.encode()).hexdigest()[:32]}"


def _reading(data: str, device: str, time_ms: int) -> Record:
    return Record(DATA, Provenance(data, hashlib.sha256(data.encode()).digest(), f"sample:{device}",
                                   "collect:collector", source=device, source_signature=b"\x07" * 64), time_ms)


def _place(replica: str, node: str, time_ms: int, replaces: dict[str, str] | None = None,
           loads: dict[str, dict[str, float]] | None = None, excluded: dict[str, str] | None = None) -> Record:
    loads = loads or LOADS
    excluded = excluded or {}
    reason: dict[str, object] = {"rule": RULE, "requests": {"cpu": 0.25, "memory_mb": 64}, "loads": loads,
                                 "eligible": sorted(set(loads) - set(excluded)), "excluded": excluded}
    if replaces:
        reason["replaces"] = replaces
    return Record(ORCH, Orchestrate(replica, node, "place", reason), time_ms)
