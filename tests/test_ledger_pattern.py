"""Table II of seeds/trusted-orchestration-pattern.txt (§V.B), row by row, and against a naive model.

Each legal case fires one row of `pattern.TABLE`; each illegal case names the condition it breaks
and the exact message an operator reads. A hypothesis property replays random record sequences,
branching from old states, through the real module and a deliberately naive copy-everything model.
"""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tomq.errors import PeerError
from tomq.node.ledger import pattern
from tomq.node.ledger.pattern import OPERATOR, TABLE, IllegalTransition, Member, PatternState, apply, replay
from tomq.records import DATA, ID_CREATE, ID_DELETE, ORCH, Identity, Orchestrate, Provenance, Record

HASH = hashlib.sha256(b"payload").digest()


def join(name: str, kind: str = "device", attributed_to: str | None = None) -> Record:
    return Record(ID_CREATE, Identity(name, kind, b"proof of " + name.encode(), attributed_to), 1)


def leave(name: str, kind: str = "device") -> Record:
    return Record(ID_DELETE, Identity(name, kind, b"proof of " + name.encode()), 2)


def data(data_id: str, source: str | None = "car7") -> Record:
    return Record(DATA, Provenance(data_id, HASH, f"sample:{source}", "collect:collector-0", source=source), 3)


def orch(action: str, deployed: str, location: str) -> Record:
    return Record(ORCH, Orchestrate(deployed, location, action), 4)


# A small cluster as the genesis block and a first device join leave it.
BASE = [(join("n1", "node"), OPERATOR), (join("n2", "node"), OPERATOR), (join("car7"), "n1"),
        (join("tl1"), "n1"), (join("analytics", "service"), "n1")]


def base() -> PatternState:
    return replay(BASE)


# event -> (records before, the record, proposer, what must hold afterwards)
LEGAL = {
    "join-device": ([], join("s1"), "n1", lambda s: s.member("s1") == Member("device")),
    "join-node": ([], join("n3", "node"), "n1", lambda s: s.member("n3") == Member("node")),
    "join-service": ([], join("svc2", "service"), "n2", lambda s: s.member("svc2") == Member("service")),
    "join-auditor": ([], join("aud", "auditor"), "n1", lambda s: s.member("aud") == Member("auditor")),
    "join-container": ([], join("collector-0", "container", "n2"), "n1",
                       lambda s: s.member("collector-0") == Member("container", "n2")),
    "leave-device": ([], leave("car7"), "n1", lambda s: not s.joined("car7")),
    "leave-node": ([], leave("n2", "node"), "n1", lambda s: not s.joined("n2") and s.joined("n1")),
    "leave-service": ([], leave("analytics", "service"), "n1", lambda s: not s.joined("analytics")),
    "leave-auditor": ([(join("aud", "auditor"), "n1")], leave("aud", "auditor"), "n2", lambda s: not s.joined("aud")),
    "leave-container": ([(join("collector-0", "container", "n2"), "n1")], leave("collector-0", "container"), "n2",
                        lambda s: not s.joined("collector-0")),
    "leave-data": ([], data("reading:1"), "n1", lambda s: s.has_left("reading:1")),
    "join-data": ([(data("reading:1"), "n1")], orch("execute", "reading:1", "collect:collector-0"), "n1",
                  lambda s: s.has_left("reading:1")),
    "place": ([], orch("place", "collector-0", "n2"), "n1", lambda s: s.joined("n2")),
    "remove": ([], orch("remove", "collector-0", "n2"), "n1", lambda s: s.joined("n2")),
    "command": ([], orch("command", "light:tl1:green", "tl1"), "n2", lambda s: s.joined("tl1")),
}


def test_every_row_of_the_table_has_a_legal_case():
    assert {row.event for row in TABLE} == set(LEGAL)


@pytest.mark.parametrize("event", LEGAL)
def test_legal_transition_fires_its_row(event):
    before, record, proposer, holds = LEGAL[event]
    state = replay(before, base())
    assert pattern.check(state, record, proposer).event == event
    after = apply(state, record, proposer)
    assert holds(after)
    assert after.version == state.version + 1


# name -> (records before, the illegal record, proposer, exact message)
ILLEGAL = {
    "second join of a device": ([], join("car7"), "n1", "cannot join-device car7: car7 has already joined (as a device)"),
    "second join of a node": ([], join("n2", "node"), "n1", "cannot join-node n2: n2 has already joined (as a node)"),
    "second join of a service": ([], join("analytics", "service"), "n1",
                                 "cannot join-service analytics: analytics has already joined (as a service)"),
    "second join of an auditor": ([(join("aud", "auditor"), "n1")], join("aud", "auditor"), "n1",
                                  "cannot join-auditor aud: aud has already joined (as an auditor)"),
    "a name joined as a device joins as a node": ([], join("car7", "node"), "n1",
                                                  "cannot join-node car7: car7 has already joined (as a device)"),
    "second join of a container": ([(join("c0", "container", "n1"), "n1")], join("c0", "container", "n2"), "n1",
                                   "cannot join-container c0: c0 has already joined (as a container)"),
    "container on a node that never joined": ([], join("c0", "container", "n9"), "n1",
                                              "cannot join-container c0: node n9 has not joined"),
    "container attributed to a device": ([], join("c0", "container", "car7"), "n1",
                                         "cannot join-container c0: node car7 is a device, not a node"),
    "container attributed to nobody": ([], join("c0", "container"), "n1",
                                       "cannot join-container c0: a container must be attributed to the node that runs it"),
    "container on a node that left": ([(leave("n2", "node"), "n1")], join("c0", "container", "n2"), "n1",
                                      "cannot join-container c0: node n2 has not joined"),
    "device leaves before joining": ([], leave("car9"), "n1", "cannot leave-device car9: car9 has not joined"),
    "device leaves twice": ([(leave("car7"), "n1")], leave("car7"), "n1", "cannot leave-device car7: car7 has not joined"),
    "node leaves before joining": ([], leave("n9", "node"), "n1", "cannot leave-node n9: n9 has not joined"),
    "service leaves before joining": ([], leave("svc9", "service"), "n1", "cannot leave-service svc9: svc9 has not joined"),
    "auditor leaves before joining": ([], leave("aud", "auditor"), "n1", "cannot leave-auditor aud: aud has not joined"),
    "container leaves before joining": ([], leave("c0", "container"), "n1",
                                        "cannot leave-container c0: c0 has not joined"),
    "leave as the wrong kind": ([], leave("car7", "container"), "n1",
                                "cannot leave-container car7: car7 joined as a device, not a container"),
    "reading from a device that left": ([(leave("car7"), "n1")], data("reading:1"), "n1",
                                        "cannot leave-data reading:1: source car7 has not joined"),
    "reading from a device that never joined": ([], data("reading:1", "car9"), "n1",
                                                "cannot leave-data reading:1: source car9 has not joined"),
    "the same data leaves twice": ([(data("reading:1"), "n1")], data("reading:1"), "n2",
                                   "cannot leave-data reading:1: reading:1 has already left its source"),
    "data joins an activity before leaving its source": (
        [], orch("execute", "reading:1", "collect:c0"), "n1", "cannot join-data reading:1: reading:1 has not left its source"),
    "placement on a node that never joined": ([], orch("place", "collector-0", "n9"), "n1",
                                              "cannot place collector-0: location n9 has not joined"),
    "placement on a device": ([], orch("place", "collector-0", "car7"), "n1",
                              "cannot place collector-0: location car7 is a device, not a node"),
    "placement on a node that left": ([(leave("n2", "node"), "n1")], orch("place", "collector-0", "n2"), "n1",
                                      "cannot place collector-0: location n2 has not joined"),
    "removal from a node that never joined": ([], orch("remove", "collector-0", "n9"), "n1",
                                              "cannot remove collector-0: location n9 has not joined"),
    "the same command twice": ([(orch("command", "light:tl1:green", "tl1"), "n1")], orch("command", "light:tl1:green", "tl1"),
                               "n2", "cannot command light:tl1:green: light:tl1:green has already been issued"),
    "command to an actuator that left": ([(leave("tl1"), "n1")], orch("command", "light:tl1:red", "tl1"), "n1",
                                         "cannot command light:tl1:red: location tl1 has not joined"),
    "an action no row handles": ([], orch("dance", "collector-0", "n1"), "n1",
                                 "cannot dance collector-0: no row of Table II handles PROV-ORCH action dance"),
    "proposer that never joined": ([], join("s1"), "n9", "cannot join-device s1: proposer n9 has not joined"),
    "proposer that left": ([(leave("n2", "node"), "n1")], join("s1"), "n2",
                           "cannot join-device s1: proposer n2 has not joined"),
    "a device proposes": ([], data("reading:1"), "car7",
                          "cannot leave-data reading:1: proposer car7 is a device; only nodes, services and containers propose records"),
}


@pytest.mark.parametrize("name", ILLEGAL)
def test_illegal_transition_names_event_object_and_state(name):
    before, record, proposer, message = ILLEGAL[name]
    state = replay(before, base())
    snapshot = (state.members(), state.left_data())
    with pytest.raises(IllegalTransition) as caught:
        apply(state, record, proposer)
    assert str(caught.value) == message
    assert "\n" not in message
    assert caught.value.proposer == proposer
    assert isinstance(caught.value, PeerError)
    assert (state.members(), state.left_data()) == snapshot  # a refused record changes nothing


def test_every_row_has_an_illegal_case():
    # Every row with a condition is broken by some case above (rows only differ by what they check).
    broken = {str(case[3]).split(" ")[1] for case in ILLEGAL.values()}
    assert {row.event for row in TABLE} <= broken


def test_message_matches_the_h11_style_example():
    with pytest.raises(IllegalTransition, match=r"^cannot leave-device car7: car7 has not joined$"):
        apply(PatternState(), leave("car7"), OPERATOR)


def test_a_device_may_rejoin_after_leaving():
    state = replay([(leave("car7"), "n1"), (join("car7"), "n2")], base())
    assert state.member("car7") == Member("device")


def test_data_from_a_source_after_it_rejoined_is_legal_again():
    state = replay([(leave("car7"), "n1"), (join("car7"), "n2"), (data("reading:2"), "n1")], base())
    assert state.has_left("reading:2")


def test_data_without_a_named_source_needs_no_member():
    state = apply(base(), data("result:1", None), "analytics")
    assert state.has_left("result:1")


def test_a_node_leaving_does_not_take_its_containers_with_it():
    # Table II has no cascade: the orchestrator records each container's leave itself.
    state = replay([(join("c0", "container", "n2"), "n1"), (leave("n2", "node"), "n1")], base())
    assert state.member("c0") == Member("container", "n2")
    assert apply(state, leave("c0", "container"), "n1").joined("c0") is False


def test_old_states_never_change():
    start = base()
    after = apply(start, leave("car7"), "n1")
    assert start.joined("car7") and not after.joined("car7")
    later = apply(after, data("reading:1", "tl1"), "n1")
    assert not after.has_left("reading:1") and later.has_left("reading:1")
    assert start.version == len(BASE) and later.version == len(BASE) + 2


def test_applying_to_an_old_state_branches_without_touching_the_newer_one():
    start = base()
    left = apply(start, leave("car7"), "n1")
    branch = apply(start, data("reading:1"), "n1")  # start is no longer the newest state
    assert branch.joined("car7") and branch.has_left("reading:1")
    assert not left.joined("car7") and not left.has_left("reading:1")
    newest = apply(left, join("car7"), "n2")  # the original line of history goes on
    assert newest.joined("car7") and not newest.has_left("reading:1")
    assert branch.members() == start.members()


def test_members_filters_by_kind_in_name_order():
    state = base()
    assert list(state.members("node")) == ["n1", "n2"]
    assert set(state.members()) == {"n1", "n2", "car7", "tl1", "analytics"}


def test_same_records_same_verdicts():
    sequence = [*BASE, (leave("car7"), "n1"), (data("reading:1"), "n1")]
    verdicts = []
    for _ in range(2):
        with pytest.raises(IllegalTransition) as caught:
            replay(sequence)
        verdicts.append(str(caught.value))
    assert verdicts[0] == verdicts[1] == "cannot leave-data reading:1: source car7 has not joined"


def test_the_pattern_module_does_no_io():
    tree = ast.parse(Path(pattern.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert not imported & {"os", "io", "time", "random", "pathlib", "socket", "subprocess", "shutil", "datetime"}


# --- A naive model: Table II written as plainly as possible, copying everything on every step -------

class Naive:
    def __init__(self, members: dict[str, tuple[str, str | None]] | None = None, left: frozenset[str] = frozenset(),
                 issued: frozenset[str] = frozenset()):
        self.members = dict(members or {})
        self.left = left
        self.issued = issued

    def apply(self, record: Record, proposer: str) -> Naive:
        members, left, issued = dict(self.members), self.left, self.issued
        if proposer != OPERATOR and (proposer not in members or members[proposer][0] not in ("node", "service", "container")):
            raise ValueError
        s = record.structure
        if isinstance(s, Identity):
            if record.state == ID_CREATE:
                if s.object in members:
                    raise ValueError
                if s.kind == "container" and (s.attributed_to is None or members.get(s.attributed_to, ("",))[0] != "node"):
                    raise ValueError
                members[s.object] = (s.kind, s.attributed_to)
            else:
                if s.object not in members or members[s.object][0] != s.kind:
                    raise ValueError
                del members[s.object]
        elif isinstance(s, Provenance):
            if (s.source is not None and s.source not in members) or s.data in left:
                raise ValueError
            left = left | {s.data}
        else:
            assert isinstance(s, Orchestrate)
            if s.action == "execute" and s.deployed not in left:
                raise ValueError
            if s.action in ("place", "remove") and members.get(s.location, ("",))[0] != "node":
                raise ValueError
            if s.action == "command" and (s.location not in members or s.deployed in issued):
                raise ValueError
            if s.action not in ("execute", "place", "remove", "command"):
                raise ValueError
            if s.action == "command":
                issued = issued | {s.deployed}
        return Naive(members, left, issued)


NAMES = st.sampled_from(["n1", "n2", "car7", "c0", "svc"])
KINDS = st.sampled_from(["device", "node", "service", "auditor", "container"])
RECORDS = st.one_of(
    st.builds(join, NAMES, KINDS, st.one_of(st.none(), NAMES)),
    st.builds(leave, NAMES, KINDS),
    st.builds(data, st.sampled_from(["d1", "d2"]), st.one_of(st.none(), NAMES)),
    st.builds(orch, st.sampled_from(["execute", "place", "remove", "command", "dance"]),
              st.sampled_from(["d1", "d2", "c0"]), NAMES),
)
STEPS = st.lists(st.tuples(RECORDS, st.sampled_from([OPERATOR, "n1", "n2", "svc", "car7"]),
                           st.integers(min_value=0, max_value=3)), max_size=40)


@settings(max_examples=300, deadline=None)
@given(STEPS)
def test_matches_the_naive_model_including_branches(steps):
    # Each step applies to one of the last few states, so old states get applied to (branching).
    real: list[PatternState] = [PatternState()]
    naive: list[Naive] = [Naive()]
    for record, proposer, back in steps:
        pick = max(0, len(real) - 1 - back)
        try:
            expected = naive[pick].apply(record, proposer)
        except ValueError:
            with pytest.raises(IllegalTransition):
                apply(real[pick], record, proposer)
            continue
        real.append(apply(real[pick], record, proposer))
        naive.append(expected)
    for state, model in zip(real, naive, strict=True):
        assert {n: (m.kind, m.attributed_to) for n, m in state.members().items()} == model.members
        assert state.left_data() == model.left
