"""Actuators act only on node-signed commands backed by a committed, certified PROV-ORCH record.

Blocks are built and certified here by hand with the real node keys of a `tomq.cluster.init`
directory (3 nodes: a quorum of 2), and commands are checked with nothing but the operator's public
key, as an actuator in the field would. Each refusal names its reason and leaves the device as it
was. The end-to-end tests run the actuator against real brokers (the embedded amqtt as `tomq broker`,
and mosquitto), and the CLI as its own process.
"""

from __future__ import annotations

import itertools
import random
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from conftest import require
from procs import BROKERS, PYTHON, free_port, stop_process, which
from tomq import canonical
from tomq import cluster as clusters
from tomq.cluster import Cluster
from tomq.errors import ConfigError, EnvelopeRejected
from tomq.identity import SigningKey
from tomq.mqtt import MqttLink, wait_until
from tomq.node.ledger.block import BlockFile, commit_signature, make_block, sign_block
from tomq.node.services.readings import open_reading
from tomq.records import DATA, ORCH, Orchestrate, Provenance, Record
from tomq.sensors.actuators import Actuator, IrrigationValve, MemoryReports, TrafficLight
from tomq.sensors.command import (
    BelowQuorum,
    CommandChecker,
    ForgedCommitSignature,
    NotACommand,
    RecordNotInBlock,
    ReplayedCommand,
    StaleCommand,
    UncertifiedSender,
    WrongActuator,
    build_command,
    command_record,
    quorum_from_cluster,
)
from tomq.wire import EnvelopeOpener, seal

CLUSTER = "act"
NODES = ("n1", "n2", "n3")
_seq = itertools.count(1)


@dataclass
class Site:
    """A cluster directory and the keys a test needs to play the cluster's nodes."""

    directory: Path
    cluster: Cluster
    keys: dict[str, SigningKey] = field(default_factory=dict)
    certs: dict[str, bytes] = field(default_factory=dict)

    @classmethod
    def create(cls, directory: Path, devices: dict[str, str]) -> Site:
        clusters.init(directory, list(NODES), cluster_name=CLUSTER, broker=f"127.0.0.1:{free_port()}")
        for name, role in devices.items():
            clusters.add_member(directory, name, role)
        loaded = clusters.load(directory)
        site = cls(directory, loaded)
        for member in loaded.members:
            site.keys[member.name] = loaded.signing_key(member.name)
            site.certs[member.name] = (loaded.member_dir(member.name) / "cert.cbor").read_bytes()
        return site

    def record(self, record: Record, proposer: str = "n1") -> bytes:
        """The proposer-signed record envelope, as it sits in a block."""
        return seal(self.keys[proposer], seq=next(_seq), time_ms=record.time_ms, type="record", body=record.to_map())

    def certified(self, records: list[bytes], *, height: int, signers: tuple[str, ...] = NODES,
                  proposer: str = "n1") -> BlockFile:
        block = make_block(height=height, prev=bytes([height % 256]) * 32, term=2, time_ms=now_ms(),
                           proposer=self.keys[proposer].id, records=records)
        certificate = {self.keys[name].id: commit_signature(self.keys[name], block.hash) for name in signers}
        return BlockFile(block, sign_block(self.keys[proposer], block), certificate)

    def command(self, *, height: int, actuator: str = "tl1", setting: dict[str, Any] | None = None,
                location: str | None = None, action: str = "command", record_time_ms: int | None = None,
                signers: tuple[str, ...] = NODES, sender: str = "n1", index: int = 2,
                record: Record | None = None, mutate_certificate: Callable[[dict[str, bytes]], None] | None = None,
                ) -> tuple[bytes, BlockFile, str]:
        """A command for `actuator` authorised by record `index` of a 5-record block at `height`."""
        command_id = f"cmd:j1-busy:{height}:{index}"
        if record is None:
            record = Record(ORCH, Orchestrate(command_id, location or actuator, action,
                                              {"setting": setting if setting is not None else {"colour": "green"},
                                               "rule": "j1-busy", "trigger": "reading:ab12"}),
                            record_time_ms if record_time_ms is not None else now_ms())
        others = [self.record(Record(ORCH, Orchestrate(f"collector-{height}-{i}", "n2", "place"), now_ms()))
                  for i in range(4)]
        records = [*others[:index], self.record(record), *others[index:]]
        block_file = self.certified(records, height=height, signers=signers)
        if mutate_certificate is not None:
            certificate = dict(block_file.commit_certificate)
            mutate_certificate(certificate)
            block_file = BlockFile(block_file.block, block_file.proposer_signature, certificate)
        signer_certs = [self.certs[sender], *(self.certs[name] for name in NODES if name != sender)]
        wire = build_command(self.keys[sender], seq=next(_seq), time_ms=now_ms(), actuator=actuator,
                             block_file=block_file, record_index=index, signer_certificates=signer_certs)
        return wire, block_file, command_id

    def checker(self, actuator: str = "tl1", **kwargs: Any) -> CommandChecker:
        return CommandChecker(self.cluster.operator, CLUSTER, actuator, quorum_from_cluster(self.cluster), **kwargs)

    def actuator(self, hardware: Any, **kwargs: Any) -> Actuator:
        name = hardware.name
        return Actuator(hardware, self.checker(name, **kwargs), MemoryReports(self.keys[name]))


def now_ms() -> int:
    return int(time.time() * 1000)


def reseal(wire: bytes, key: SigningKey, change: Callable[[dict[str, Any]], None]) -> bytes:
    """The same command with its body changed and signed again (by a key of the test's choosing)."""
    fields = canonical.decode(canonical.decode(wire)[0])
    body = fields["body"]
    change(body)
    return seal(key, seq=next(_seq), time_ms=fields["t"], type=fields["type"], body=body)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    return Site.create(tmp_path_factory.mktemp("actuators") / "site",
                       {"tl1": "actuator", "tl2": "actuator", "v1": "actuator", "s1": "sensor"})


@pytest.fixture(scope="module")
def foreign(tmp_path_factory: pytest.TempPathFactory) -> Site:
    """Another cluster of the same name and node names, under another operator."""
    return Site.create(tmp_path_factory.mktemp("actuators") / "foreign", {})


# --- accepted ---------------------------------------------------------------------------------------


def test_a_certified_command_changes_the_light_and_the_report_is_a_signed_reading(site: Site) -> None:
    light = site.actuator(TrafficLight("tl1"))
    assert light.state == {"colour": "red"}
    wire, block_file, command_id = site.command(height=42, setting={"colour": "green"})

    outcome = light.handle(wire, time.time())

    assert outcome.refusal is None and outcome.command is not None
    command = outcome.command
    assert (command.command_id, command.setting, command.height, command.index) == (command_id, {"colour": "green"}, 42, 2)
    assert command.block_hash == block_file.block.hash
    assert (command.sender, command.rule, command.trigger) == ("n1", "j1-busy", "reading:ab12")
    assert light.state == {"colour": "green"}
    assert light.history == [command]
    assert outcome.message == f"tl1 green (command {command_id}, height 42)"
    reports = light.reports
    assert isinstance(reports, MemoryReports) and len(reports.sent) == 1
    reading = open_reading(EnvelopeOpener(site.cluster.trust_store()), reports.sent[0], device="tl1", now=time.time())
    assert reading.value == {"colour": "green", "command": command_id, "height": 42}
    assert (reading.sender, reading.seq) == (site.keys["tl1"].id, outcome.report_seq)


def test_the_valve_opens_sets_its_flow_and_refuses_what_it_cannot_do(site: Site) -> None:
    valve = site.actuator(IrrigationValve("v1"))
    steps = [({"open": True}, {"open": True, "flow": 100}), ({"flow": 40}, {"open": True, "flow": 40}),
             ({"flow": 101}, None), ({"open": "yes"}, None), ({"open": True, "flow": 3}, None),
             ({"flow": True}, None), ({"open": False}, {"open": False, "flow": 0})]
    for height, (setting, expected) in enumerate(steps, start=10):
        before = valve.state
        outcome = valve.handle(site.command(height=height, actuator="v1", setting=setting)[0], time.time())
        if expected is None:
            assert outcome.refusal == "bad-setting", (setting, outcome.message)
            assert valve.state == before
        else:
            assert outcome.refusal is None, outcome.message
            assert valve.state == expected
    assert valve.refused == {"bad-setting": 4}
    assert [c.height for c in valve.history] == [10, 11, 16]


def test_an_acknowledgement_on_the_cmd_topic_is_ignored_not_refused(site: Site) -> None:
    light = site.actuator(TrafficLight("tl1"))
    ack = seal(site.keys["n1"], seq=next(_seq), time_ms=now_ms(), type="ack",
               body={"contract": "hello", "device": "tl1", "height": 3, "record": "ab"})
    outcome = light.handle(ack, time.time())
    assert (outcome.command, outcome.refusal, light.refused, light.state) == (None, None, {}, {"colour": "red"})


def test_a_signature_from_a_signer_without_a_certificate_neither_counts_nor_harms(site: Site) -> None:
    stranger = SigningKey.generate()

    def add_stranger(certificate: dict[str, bytes]) -> None:
        certificate[stranger.id] = bytes(64)

    only_one = site.command(height=3, signers=("n1",), mutate_certificate=add_stranger)[0]
    with pytest.raises(BelowQuorum, match="1 verified commit signature"):
        site.checker().check(only_one, time.time())
    two = site.command(height=4, signers=("n1", "n3"), mutate_certificate=add_stranger)[0]
    assert site.checker().check(two, time.time()).height == 4


# --- refused, each with its own reason, the device unchanged ---------------------------------------------


def _foreign_node(site: Site, foreign: Site, light: Actuator) -> bytes:
    wire, _, _ = site.command(height=5)
    return reseal(wire, foreign.keys["n1"], lambda body: body.update(signers=[foreign.certs["n1"], *body["signers"][1:]]))


def _sensor_signed(site: Site, foreign: Site, light: Actuator) -> bytes:
    wire, _, _ = site.command(height=5)
    return reseal(wire, site.keys["s1"], lambda body: body.update(signers=[site.certs["s1"], *body["signers"]]))


def _key_without_certificate(site: Site, foreign: Site, light: Actuator) -> bytes:
    wire, _, _ = site.command(height=5)
    return reseal(wire, SigningKey.generate(), lambda body: None)  # n1's certificate, some other key


def _bad_signature(site: Site, foreign: Site, light: Actuator) -> bytes:
    wire, _, _ = site.command(height=5)
    return wire[:-1] + bytes([wire[-1] ^ 0x01])


def _replayed(site: Site, foreign: Site, light: Actuator) -> bytes:
    wire, _, _ = site.command(height=5, setting={"colour": "amber"})
    assert light.handle(wire, time.time()).refusal is None
    return wire


def _older_after_newer(site: Site, foreign: Site, light: Actuator) -> bytes:
    older, _, _ = site.command(height=5, setting={"colour": "green"})
    newer, _, _ = site.command(height=6, setting={"colour": "amber"})
    assert light.handle(newer, time.time()).refusal is None
    return older


def _one_commit_signature(site: Site, foreign: Site, light: Actuator) -> bytes:
    return site.command(height=5, signers=("n1",))[0]


def _forged_commit_signature(site: Site, foreign: Site, light: Actuator) -> bytes:
    def forge(certificate: dict[str, bytes]) -> None:
        certificate[site.keys["n2"].id] = commit_signature(site.keys["n2"], bytes(32))  # n2's key, another block

    return site.command(height=5, mutate_certificate=forge)[0]


def _wrong_index(site: Site, foreign: Site, light: Actuator) -> bytes:
    wire, _, _ = site.command(height=5)
    return reseal(wire, site.keys["n1"], lambda body: body.update(index=1))


def _record_not_in_block(site: Site, foreign: Site, light: Actuator) -> bytes:
    wire, _, _ = site.command(height=5, setting={"colour": "amber"})
    outsider = site.record(command_record(command_id="cmd:evil", actuator="tl1", setting={"colour": "green"},
                                          rule="evil", trigger="reading:00", time_ms=now_ms()))
    return reseal(wire, site.keys["n1"], lambda body: body.update(record=outsider))


def _bad_path(site: Site, foreign: Site, light: Actuator) -> bytes:
    wire, _, _ = site.command(height=5)
    return reseal(wire, site.keys["n1"], lambda body: body["path"].__setitem__(0, bytes(32)))


def _another_actuators_record(site: Site, foreign: Site, light: Actuator) -> bytes:
    return site.command(height=5, location="tl2")[0]


def _addressed_to_another_actuator(site: Site, foreign: Site, light: Actuator) -> bytes:
    return site.command(height=5, actuator="tl2")[0]


def _placement_record(site: Site, foreign: Site, light: Actuator) -> bytes:
    return site.command(height=5, action="place")[0]


def _data_record(site: Site, foreign: Site, light: Actuator) -> bytes:
    record = Record(DATA, Provenance("reading:ab12", bytes(32), "sample:s1", "collect:c1", source="s1"), now_ms())
    return site.command(height=5, record=record)[0]


def _no_setting(site: Site, foreign: Site, light: Actuator) -> bytes:
    record = Record(ORCH, Orchestrate("cmd:x", "tl1", "command", {"rule": "j1-busy"}), now_ms())
    return site.command(height=5, record=record)[0]


def _stale(site: Site, foreign: Site, light: Actuator) -> bytes:
    return site.command(height=5, record_time_ms=now_ms() - 60_000)[0]


def _from_the_future(site: Site, foreign: Site, light: Actuator) -> bytes:
    return site.command(height=5, record_time_ms=now_ms() + 60_000)[0]


def _purple(site: Site, foreign: Site, light: Actuator) -> bytes:
    return site.command(height=5, setting={"colour": "purple"})[0]


def _not_a_command_envelope(site: Site, foreign: Site, light: Actuator) -> bytes:
    wire, _, _ = site.command(height=5)
    fields = canonical.decode(canonical.decode(wire)[0])
    return seal(site.keys["n1"], seq=next(_seq), time_ms=fields["t"], type="report", body=fields["body"])


REFUSALS: dict[str, tuple[Callable[[Site, Site, Actuator], bytes], str, str]] = {
    "a node of another cluster (certificate not from this operator)": (
        _foreign_node, "uncertified-sender", "does not verify under operator"),
    "a sensor of this cluster": (_sensor_signed, "uncertified-sender", "a sensor: only a node"),
    "a key no certificate names": (_key_without_certificate, "uncertified-sender", "no membership certificate"),
    "a broken envelope signature": (_bad_signature, "bad-signature", "does not verify"),
    "the same envelope again": (_replayed, "replayed", "was already accepted"),
    "an older (height, index) after a newer one": (_older_after_newer, "replayed", "is older than 6/2"),
    "one commit signature (quorum 2)": (_one_commit_signature, "below-quorum", "1 verified commit signature(s)"),
    "a forged commit signature": (_forged_commit_signature, "forged-commit-signature", "commit signature of n2"),
    "another index for the same path": (_wrong_index, "not-in-block", "record 1 is not in block 5"),
    "a record that is not in the block": (_record_not_in_block, "not-in-block", "leads to another root"),
    "a tampered Merkle path": (_bad_path, "not-in-block", "leads to another root"),
    "a record naming another actuator": (_another_actuators_record, "other-actuator", "commands tl2, not tl1"),
    "a command addressed to another actuator": (_addressed_to_another_actuator, "other-actuator", "command for 'tl2'"),
    "a PROV-ORCH placement, not a command": (_placement_record, "not-a-command", "PROV-ORCH place record"),
    "a PROV-DATA record": (_data_record, "not-a-command", "is a PROV-DATA record"),
    "a command record without a setting": (_no_setting, "not-a-command", "no setting map"),
    "a record older than max_age": (_stale, "stale", "recorded 60"),
    "a record dated in the future": (_from_the_future, "stale", "in the future"),
    "a colour the light does not have": (_purple, "bad-setting", "no colour 'purple'"),
    "an envelope of another type": (_not_a_command_envelope, "malformed", "not accepted here"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refused_with_its_reason_and_the_light_unchanged(site: Site, foreign: Site, case: str) -> None:
    make, reason, message = REFUSALS[case]
    light = site.actuator(TrafficLight("tl1"))
    wire = make(site, foreign, light)
    state, history = light.state, light.history

    outcome = light.handle(wire, time.time())

    assert outcome.refusal == reason, outcome.message
    assert message in outcome.message
    assert outcome.message.startswith("tl1 refused: ") and "\n" not in outcome.message
    assert outcome.command is None and outcome.report_seq is None
    assert light.state == state and light.history == history
    assert isinstance(light.reports, MemoryReports) and len(light.reports.sent) == len(history)  # no report
    assert light.refused == {reason: 1}


def test_each_refusal_class_is_what_the_checker_raises(site: Site) -> None:
    # The reasons above come from these classes; the checker raises them (never a bare exception).
    checks: list[tuple[type[EnvelopeRejected], bytes]] = [
        (BelowQuorum, site.command(height=5, signers=("n2",))[0]),
        (ForgedCommitSignature, site.command(height=5, mutate_certificate=lambda c: c.update(
            {site.keys["n3"].id: bytes(64)}))[0]),
        (WrongActuator, site.command(height=5, location="tl2")[0]),
        (NotACommand, site.command(height=5, action="remove")[0]),
        (StaleCommand, site.command(height=5, record_time_ms=now_ms() - 31_000)[0]),
    ]
    for kind, wire in checks:
        with pytest.raises(kind):
            site.checker().check(wire, time.time())
    with pytest.raises(UncertifiedSender):
        site.checker().check(reseal(site.command(height=5)[0], site.keys["tl2"],
                                    lambda body: body.update(signers=[site.certs["tl2"]])), time.time())
    wire = site.command(height=5, index=0)[0]
    with pytest.raises(RecordNotInBlock):
        site.checker().check(reseal(wire, site.keys["n1"], lambda body: body.update(index=4)), time.time())


def test_a_restarted_actuator_still_refuses_old_commands(site: Site, tmp_path: Path) -> None:
    mark = tmp_path / "state" / "command.mark"
    first, _, _ = site.command(height=20, index=3)
    assert site.checker(mark_path=mark).check(first, time.time()).height == 20
    assert mark.read_text() == "20 3\n"

    restarted = site.checker(mark_path=mark)
    with pytest.raises(ReplayedCommand, match="already accepted"):
        restarted.check(first, time.time())
    with pytest.raises(ReplayedCommand, match="older than 20/3"):
        restarted.check(site.command(height=20, index=1)[0], time.time())
    assert restarted.check(site.command(height=20, index=4)[0], time.time()).index == 4
    assert restarted.check(site.command(height=21, index=0)[0], time.time()).height == 21

    mark.write_text("twenty\n")
    with pytest.raises(ConfigError, match="damaged"):
        site.checker(mark_path=mark)


def test_quorum_is_a_majority_of_the_nodes_in_cluster_toml(site: Site, tmp_path: Path) -> None:
    assert quorum_from_cluster(site.cluster) == 2  # 3 nodes; its actuators and sensor do not count
    assert quorum_from_cluster(clusters.init(tmp_path / "four", ["a", "b", "c", "d"])) == 3
    assert quorum_from_cluster(clusters.init(tmp_path / "one", ["a"])) == 1


# --- fuzz: whatever the bytes, only EnvelopeRejected ---------------------------------------------------


def test_byte_mutations_of_a_valid_command_raise_only_envelope_rejected(site: Site) -> None:
    wire, _, _ = site.command(height=7)
    rng = random.Random(6)
    now = time.time()
    outcomes: dict[str, int] = {}
    for _ in range(1500):
        data = bytearray(wire)
        for _ in range(rng.choice((1, 1, 2, 4))):
            kind = rng.random()
            position = rng.randrange(len(data))
            if kind < 0.6:
                data[position] ^= 1 << rng.randrange(8)
            elif kind < 0.75:
                data[position] = rng.randrange(256)
            elif kind < 0.9:
                del data[position : position + rng.randrange(1, 8)]
            else:
                data[position:position] = rng.randbytes(rng.randrange(1, 8))
        if bytes(data) == wire:
            continue  # a byte overwritten with itself: still the valid command
        try:
            site.checker().check(bytes(data), now)
            outcomes["accepted"] = outcomes.get("accepted", 0) + 1
        except EnvelopeRejected as exc:
            outcomes[type(exc).__name__] = outcomes.get(type(exc).__name__, 0) + 1
    assert outcomes.get("accepted", 0) == 0, outcomes  # every byte is signed: no mutation may pass
    assert len(outcomes) >= 2, outcomes


_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=12)
    | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
_BODY_KEYS = ("actuator", "header", "record", "index", "path", "certificate", "signers")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(_BODY_KEYS), value=_values, header_key=st.sampled_from(
    ("v", "height", "prev", "term", "t", "proposer", "records_root", "record_count")), where=st.integers(0, 2))
def test_resigned_bodies_with_any_field_replaced_raise_only_envelope_rejected(
        site: Site, key: str, value: Any, header_key: str, where: int) -> None:
    wire, _, _ = _fuzz_base(site)

    def change(body: dict[str, Any]) -> None:
        if where == 0:
            assume(not _same(body[key], value))  # an unchanged body is a valid command
            body[key] = value
        elif where == 1:
            assume(not _same(body["header"][header_key], value))
            body["header"][header_key] = value
        else:
            del body[key]

    with pytest.raises(EnvelopeRejected):
        site.checker().check(reseal(wire, site.keys["n1"], change), time.time())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(record_body=_values, reason=st.dictionaries(st.text(max_size=8), _values, max_size=3), raw=st.binary(min_size=1,
                                                                                                           max_size=60))
def test_any_record_inside_a_certified_block_raises_only_envelope_rejected(
        site: Site, record_body: Any, reason: dict[str, Any], raw: bytes) -> None:
    # What a certified block could hold in the command's place: any envelope body, any reason, any bytes.
    now = now_ms()
    bodies = [
        seal(site.keys["n1"], seq=next(_seq), time_ms=now, type="record", body=record_body),
        seal(site.keys["n1"], seq=next(_seq), time_ms=now, type="record",
             body={"state": ORCH, "t": now, "attrs": {},
                   "orchestrate": {"deployed": "cmd:f", "location": "tl1", "action": "command", "reason": reason}}),
        raw,
    ]
    for record in bodies:
        block_file = site.certified([record], height=9)
        wire = build_command(site.keys["n1"], seq=next(_seq), time_ms=now, actuator="tl1", block_file=block_file,
                             record_index=0, signer_certificates=[site.certs[n] for n in NODES])
        try:
            command = site.checker().check(wire, time.time())
        except EnvelopeRejected:
            continue
        assert type(reason.get("setting")) is dict and command.setting == reason["setting"]


def _same(old: Any, new: Any) -> bool:
    return canonical.encode(old) == canonical.encode(new)


def _fuzz_base(site: Site) -> tuple[bytes, BlockFile, str]:
    # made afresh each time: a fuzzed command must be refused for what changed, not for having aged
    return site.command(height=8)


def test_the_unfuzzed_base_is_accepted(site: Site) -> None:
    # The fuzz tests above prove something only if their starting point passes every check.
    wire, _, _ = _fuzz_base(site)
    assert site.checker().check(reseal(wire, site.keys["n1"], lambda body: None), time.time()).height == 8


# --- over real brokers ----------------------------------------------------------------------------------


class Observer:
    """A node-identity client that watches dev/<actuator>/# and can publish commands."""

    def __init__(self, site: Site, port: int, name: str) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self._lock = threading.Lock()
        self.link = MqttLink(host="127.0.0.1", port=port, username=name,
                             password=clusters.broker_password(site.keys[name]), on_message=self._on_message)

    def _on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        with self._lock:
            self.messages.append((topic, payload, retained))

    def on(self, topic: str) -> list[bytes]:
        with self._lock:
            return [payload for t, payload, _ in self.messages if t == topic]


@pytest.fixture
def broker(request: pytest.FixtureRequest, site: Site, tmp_path: Path) -> Iterator[Any]:
    kind = request.param
    if kind == "mosquitto":
        require("mosquitto", which("mosquitto") is not None, "install the Debian package mosquitto")
    running = BROKERS[kind](site.directory, tmp_path / kind)
    running.start()
    try:
        yield running
    finally:
        running.close()


@pytest.mark.parametrize("broker", ["amqtt", "mosquitto"], indirect=True)
def test_over_a_real_broker_only_the_certified_command_changes_the_light(site: Site, broker: Any,
                                                                          tmp_path: Path) -> None:
    topics = site.cluster.topics
    observer = Observer(site, broker.port, "n2")
    observer.link.subscribe(f"{topics.root}/dev/tl1/#", qos=1)
    observer.link.start(10)
    light = Actuator.from_cluster(site.directory, "tl1", TrafficLight("tl1"), data_dir=tmp_path / "tl1",
                                  port=broker.port)
    publisher = MqttLink(host="127.0.0.1", port=broker.port, username="n1",
                         password=clusters.broker_password(site.keys["n1"]))
    publisher.start(10)
    opener = EnvelopeOpener(site.cluster.trust_store())
    try:
        light.start(10)
        assert wait_until(lambda: observer.on(topics.device_state("tl1")), 5), "no join on dev/tl1/state"
        join = opener.open(observer.on(topics.device_state("tl1"))[0], time.time())
        assert (join.type, join.body) == ("join", {"certificate": site.certs["tl1"]})
        # The join goes out just before the subscription: probe (with junk the actuator refuses) until
        # the broker delivers on dev/tl1/cmd, so the commands below cannot be published too early.
        assert wait_until(lambda: bool(publisher.publish(topics.device_cmd("tl1"), b"probe", qos=1)) and
                          wait_until(lambda: "malformed" in light.refused, 0.3), 10), "dev/tl1/cmd never delivered"

        forged, _, _ = site.command(height=31, setting={"colour": "amber"}, mutate_certificate=lambda c: c.update(
            {site.keys["n2"].id: commit_signature(site.keys["n2"], bytes(32))}))
        valid, _, command_id = site.command(height=30, setting={"colour": "green"})
        assert publisher.publish(topics.device_cmd("tl1"), forged, qos=1)
        assert publisher.publish(topics.device_cmd("tl1"), valid, qos=1)

        assert wait_until(lambda: light.history and light.refused.get("forged-commit-signature"), 10), (
            light.history, light.refused)
        assert light.state == {"colour": "green"}
        assert [c.command_id for c in light.history] == [command_id]
        assert light.refused.keys() == {"malformed", "forged-commit-signature"}  # the probes, and the forgery
        assert light.refused["forged-commit-signature"] == 1

        assert wait_until(lambda: observer.on(topics.device_data("tl1")), 5), "no report on dev/tl1/data"
        reports = observer.on(topics.device_data("tl1"))
        assert len(reports) == 1
        reading = open_reading(EnvelopeOpener(site.cluster.trust_store()), reports[0], device="tl1", now=time.time())
        assert reading.value == {"colour": "green", "command": command_id, "height": 30}
        assert reading.seq > join.seq + 1  # above the join (S) and its will (S+1)
    finally:
        left = light.stop()
        publisher.stop()
    try:
        assert left
        assert wait_until(lambda: len(observer.on(topics.device_state("tl1"))) >= 2, 5), "no leave on stop"
        leave = opener.open(observer.on(topics.device_state("tl1"))[-1], time.time())
        assert (leave.type, leave.body) == ("leave", {"reason": "graceful"})
    finally:
        observer.link.stop()


def test_the_cli_prints_state_changes_and_refusals_and_stops_on_sigterm(site: Site, tmp_path: Path) -> None:
    require("mosquitto", which("mosquitto") is not None, "install the Debian package mosquitto")
    broker = BROKERS["mosquitto"](site.directory, tmp_path / "mosquitto")
    broker.start()
    process = subprocess.Popen([PYTHON, "-m", "tomq", "actuator", str(site.directory), "--name", "v1", "--sim",
                                "valve", "--data-dir", str(tmp_path / "v1"), "--port", str(broker.port)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    output = process.stdout
    assert output is not None
    reader = threading.Thread(target=lambda: lines.extend(iter(output.readline, "")), daemon=True)
    reader.start()
    publisher = MqttLink(host="127.0.0.1", port=broker.port, username="n3",
                         password=clusters.broker_password(site.keys["n3"]))
    cmd_topic = site.cluster.topics.device_cmd("v1")
    try:
        assert wait_until(lambda: any("listening" in line for line in lines), 15), lines
        assert lines[0] == f"v1 closed (valve, listening on {cmd_topic})\n"
        publisher.start(10)
        # probe with junk until the subscription delivers (the refusal is printed), then the real thing
        assert wait_until(lambda: bool(publisher.publish(cmd_topic, b"probe", qos=1)) and
                          wait_until(lambda: len(lines) > 1, 0.3), 10), lines
        wire, _, command_id = site.command(height=50, actuator="v1", setting={"flow": 40}, sender="n3")
        for _ in range(2):
            assert publisher.publish(cmd_topic, wire, qos=1)
        assert wait_until(lambda: any("replayed" in line for line in lines), 10), lines
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
        reader.join(5)
    finally:
        publisher.stop()
        stop_process(process)
        broker.close()
    acted = f"v1 open, flow 40% (command {command_id}, height 50)\n"
    replayed = [i for i, line in enumerate(lines)
                if line.startswith(f"v1 refused: replayed command {command_id} at block 50 record 2")]
    probes = [line for line in lines if line.startswith("v1 refused: command is not a canonical envelope")]
    assert lines.count(acted) == 1 and len(replayed) == 1 and lines.index(acted) < replayed[0], lines
    assert len(lines) == 1 + len(probes) + 2 + 1, lines  # listening, probes, acted, replayed, left
    assert lines[-1] == f"v1 left: 1 command(s) carried out, refused: malformed {len(probes)}, replayed 1\n"
