"""Placement (node/orchestrator/placement.py): the paper's "winner picks the least-loaded node"
(seeds/consensus-orchestration-edge.txt, "Orchestration", steps 2-3), restricted to eligible nodes,
checked by scenario and against a deliberately naive reference."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tomq import canonical
from tomq.errors import TomqError, UsageError
from tomq.node.orchestrator.placement import (
    RULE,
    TENTATIVE,
    Assignment,
    InvalidPlacementTable,
    NodeView,
    NoEligibleNode,
    Place,
    PlacementTable,
    Remove,
    Unplaceable,
    node_failed,
    node_score,
    place_replica,
    plan,
)
from tomq.node.orchestrator.spec import Constraints, Resources, ServiceSpec

SETTINGS = settings(max_examples=100, deadline=None)


def service(name: str, replicas: int = 1, cpu: float = 0.1, memory_mb: int = 64, **constraints) -> ServiceSpec:
    return ServiceSpec(name=name, program="collector", replicas=replicas, resources=Resources(cpu, memory_mb),
                       constraints=Constraints(**constraints))


def node(name: str, cpu: float = 0.0, memory: float = 0.0, **fields) -> NodeView:
    return NodeView(name, cpu, memory, **fields)


def apply(table: PlacementTable, actions, height: int = 100) -> PlacementTable:
    """What every node does as each action's PROV-ORCH record commits, in log order."""
    table = table.copy()
    for offset, action in enumerate(actions):
        if isinstance(action, Place):
            table.assign(action.decision.assignment(height + offset))
        else:
            table.unassign(action.service, action.replica)
    return table


# --- choosing one node (paper: "choosing the node with the lowest load") ---------------------------

def test_the_least_loaded_eligible_node_wins_and_the_reason_explains_it():
    nodes = [node("n1", 0.6, 0.2, labels={"zone": "north"}), node("n2", 0.1, 0.1, labels={"zone": "north"}),
             node("n3", 0.05, 0.1, alive=False, labels={"zone": "north"}),
             node("n4", 0.0, 0.0, labels={"zone": "south"})]
    decision = place_replica(service("avg", cpu=0.5, memory_mb=100, labels={"zone": "north"}), 0, nodes,
                             PlacementTable())
    assert (decision.service, decision.replica, decision.node) == ("avg", 0, "n2")
    assert (decision.cpu, decision.memory_mb) == (0.5, 100)
    assert decision.reason == {
        "rule": RULE,
        "requests": {"cpu": 0.5, "memory_mb": 100},
        "loads": {"n1": {"cpu": 0.6, "memory": 0.2, "score": 0.4},
                  "n2": {"cpu": 0.1, "memory": 0.1, "score": 0.1},
                  "n3": {"cpu": 0.05, "memory": 0.1, "score": pytest.approx(0.075)},
                  "n4": {"cpu": 0.0, "memory": 0.0, "score": 0.0}},
        "eligible": ["n1", "n2"],
        "excluded": {"n3": "not alive", "n4": "lacks label zone=north"},
    }
    canonical.encode(decision.reason)  # goes into a PROV-ORCH record as it is


def test_ties_go_to_the_smallest_name_whatever_the_order_of_views():
    views = [node("n3", 0.2, 0.2), node("n1", 0.3, 0.1), node("n2", 0.1, 0.3)]
    for order in (views, views[::-1], views[1:] + views[:1]):
        assert place_replica(service("s"), 0, order, PlacementTable()).node == "n1"


def test_an_unknown_load_counts_as_fully_busy_and_is_recorded_as_none():
    nodes = [node("n1", math.nan, 0.1), node("n2", 0.9, 0.9), node("n3", -1.0, 0.0), node("n4", 0.0, 0.0, cores=0)]
    decision = place_replica(service("s"), 0, nodes, PlacementTable())
    assert decision.node == "n2"
    assert decision.reason["loads"]["n1"] == {"cpu": None, "memory": 0.1, "score": None}
    assert decision.reason["loads"]["n3"]["score"] is None
    assert decision.reason["loads"]["n4"]["score"] is None


@pytest.mark.parametrize("spec, table, excluded", [
    (service("s", nodes=("n2",)), [], "not in constraints.nodes"),
    (service("s", labels={"zone": "north", "gpu": "yes"}), [], "lacks labels gpu=yes, zone=north"),
    (service("s", anti_affinity=("noisy",)), [Assignment("noisy", 0, "n1", 3)], "hosts noisy:0 (anti-affinity)"),
    (service("s", replicas=2), [Assignment("s", 1, "n1", 3)], "hosts s:1 (spread)"),
])
def test_each_exclusion_is_named(spec, table, excluded):
    nodes = [node("n1"), node("n2", 0.9, 0.9, labels={"zone": "north", "gpu": "yes"})]
    decision = place_replica(spec, 0, nodes, PlacementTable(table))
    assert decision.node == "n2"
    assert decision.reason["excluded"] == {"n1": excluded}


def test_anti_affinity_holds_in_both_directions_when_every_spec_is_known():
    loner = service("loner", anti_affinity=("s",))
    table = PlacementTable([Assignment("loner", 0, "n1", 3)])
    nodes = [node("n1"), node("n2", 0.5, 0.5)]
    assert place_replica(service("s"), 0, nodes, table).node == "n1"  # without specs, s cannot know
    decision = place_replica(service("s"), 0, nodes, table, specs={"loner": loner})
    assert decision.node == "n2"
    assert decision.reason["excluded"] == {"n1": "hosts loner:0, which is anti-affine to s"}


def test_replicas_share_a_node_when_not_spread_or_when_there_is_one():
    table = PlacementTable([Assignment("s", 1, "n1", 3)])
    nodes = [node("n1"), node("n2", 0.5, 0.5)]
    assert place_replica(service("s", replicas=2, spread=False), 0, nodes, table).node == "n1"
    # its own old assignment (being re-placed) never excludes a node
    assert place_replica(service("s", replicas=2), 1, nodes, table).node == "n1"


def test_no_eligible_node_names_the_replica_and_every_exclusion():
    nodes = [node("n1", alive=False), node("n2", labels={"zone": "south"})]
    with pytest.raises(NoEligibleNode) as caught:
        place_replica(service("avg", replicas=2, labels={"zone": "north"}), 1, nodes, PlacementTable())
    assert str(caught.value) == "cannot place avg:1: no eligible node (n1: not alive; n2: lacks label zone=north)"
    assert (caught.value.service, caught.value.replica) == ("avg", 1)
    assert caught.value.excluded == {"n1": "not alive", "n2": "lacks label zone=north"}
    assert isinstance(caught.value, TomqError)
    with pytest.raises(NoEligibleNode, match=r"^cannot place avg:0: no node has reported its load yet$"):
        place_replica(service("avg"), 0, [], PlacementTable())


def test_misuse_is_a_usage_error():
    with pytest.raises(UsageError, match=r"s has replicas 0\.\.1; cannot place replica 2"):
        place_replica(service("s", replicas=2), 2, [node("n1")], PlacementTable())
    with pytest.raises(UsageError, match="node n1 appears twice"):
        place_replica(service("s"), 0, [node("n1"), node("n1", 0.5)], PlacementTable())
    with pytest.raises(UsageError, match="keyed by service name"):
        plan({"t": service("s")}, [node("n1")], PlacementTable())


# --- load not yet reported ---------------------------------------------------------------------------

def test_requests_count_until_the_load_report_reflects_them():
    table = PlacementTable([Assignment("big", 0, "n1", height=5, cpu=1.0, memory_mb=512)])
    fresh = node("n1", 0.1, 0.1, cores=2.0, memory_mb=1024.0, reported_height=4)
    # cpu 0.1 + 1.0/2 cores, memory 0.1 + 512/1024: (0.6 + 0.6) / 2
    assert node_score(fresh, table) == pytest.approx(0.6)
    caught_up = node("n1", 0.1, 0.1, cores=2.0, memory_mb=1024.0, reported_height=5)
    assert node_score(caught_up, table) == pytest.approx(0.1)


def test_one_pass_spreads_replicas_by_their_requests_even_without_spread():
    nodes = [node("n1", 0.10, 0.1), node("n2", 0.20, 0.1), node("n3", 0.30, 0.1)]
    actions, unplaceable = plan({"s": service("s", replicas=3, cpu=0.5, spread=False)}, nodes, PlacementTable())
    assert [(a.replica, a.node) for a in actions] == [(0, "n1"), (1, "n2"), (2, "n3")]
    assert unplaceable == []
    # A fourth would go back to n1: 0.1 + 0.5 is still the least.
    actions, _ = plan({"s": service("s", replicas=4, cpu=0.5, spread=False)}, nodes, PlacementTable())
    assert [a.node for a in actions] == ["n1", "n2", "n3", "n1"]


# --- plan: the leader's reconcile step -----------------------------------------------------------------

def test_plan_places_removes_and_replaces_in_a_fixed_order():
    table = PlacementTable([
        Assignment("gone", 0, "n1", 1),  # service removed
        Assignment("web", 0, "n1", 2), Assignment("web", 1, "n2", 3), Assignment("web", 2, "n3", 4),  # scale 3 -> 2
        Assignment("db", 0, "n2", 5),  # n2 died
    ])
    specs = {"web": service("web", replicas=2), "db": service("db"), "new": service("new")}
    nodes = [node("n1", 0.5, 0.5), node("n2", alive=False), node("n3", 0.2, 0.2)]
    actions, unplaceable = plan(specs, nodes, table)
    assert [(a.action, a.entity, a.node) for a in actions] == [
        ("remove", "gone:0", "n1"), ("remove", "web:2", "n3"),
        ("place", "db:0", "n3"), ("place", "new:0", "n3"), ("place", "web:1", "n3")]
    # web:1 sat on dead n2; n1 hosts web:0 (spread), so it goes to n3 which web:2 just left.
    assert [a.reason for a in actions if isinstance(a, Remove)] == [
        {"why": "service removed"}, {"why": "scaled down to 2 replicas"}]
    db = actions[2]
    assert isinstance(db, Place) and db.previous_node == "n2"
    assert db.reason["replaces"] == {"node": "n2", "why": "not alive"}
    new = actions[3]
    assert isinstance(new, Place) and new.previous_node is None and "replaces" not in new.reason
    assert unplaceable == []
    assert plan(specs, nodes, apply(table, actions)).actions == []


def test_a_replica_on_an_absent_node_is_placed_again():
    table = PlacementTable([Assignment("s", 0, "n9", 1)])
    actions, _ = plan({"s": service("s")}, [node("n1")], table)
    assert len(actions) == 1 and isinstance(actions[0], Place)
    assert actions[0].reason["replaces"] == {"node": "n9", "why": "absent"}


def test_plan_reports_what_fits_nowhere_and_carries_on():
    specs = {"a": service("a", replicas=3), "b": service("b")}
    table = PlacementTable([Assignment("a", 2, "n3", 1)])
    nodes = [node("n1"), node("n2", 0.5, 0.5), node("n3", alive=False)]
    actions, unplaceable = plan(specs, nodes, table)
    assert [(a.entity, a.node) for a in actions] == [("a:0", "n1"), ("a:1", "n2"), ("b:0", "n1")]
    assert unplaceable == [Unplaceable("a", 2, {"n1": "hosts a:0 (spread)", "n2": "hosts a:1 (spread)",
                                               "n3": "not alive"}, current_node="n3")]
    assert unplaceable[0].message == ("cannot place a:2: no eligible node (n1: hosts a:0 (spread); "
                                      "n2: hosts a:1 (spread); n3: not alive)")
    applied = apply(table, actions)
    assert plan(specs, nodes, applied).actions == []
    assert plan(specs, nodes, applied).unplaceable == unplaceable


def test_a_replica_on_a_live_node_is_never_moved():
    table = PlacementTable([Assignment("s", 0, "n1", 1)])
    busy = [node("n1", 0.99, 0.99), node("n2")]
    assert plan({"s": service("s", nodes=("n2",))}, busy, table).actions == []


def test_node_failed_lists_what_the_node_strands():
    table = PlacementTable([Assignment("b", 0, "n1", 1), Assignment("a", 1, "n1", 2), Assignment("a", 0, "n2", 3)])
    assert node_failed(table, "n1") == [Assignment("a", 1, "n1", 2), Assignment("b", 0, "n1", 1)]
    assert node_failed(table, "n3") == []
    assert len(table) == 3  # unchanged


# --- the table ------------------------------------------------------------------------------------------

def test_the_table_keeps_one_assignment_per_replica_in_sorted_order():
    table = PlacementTable()
    assert table.assign(Assignment("b", 0, "n1", 1)) is None
    table.assign(Assignment("a", 1, "n2", 2))
    table.assign(Assignment("a", 0, "n1", 3))
    assert table.assign(Assignment("a", 1, "n3", 4)) == Assignment("a", 1, "n2", 2)
    assert [a.entity for a in table] == ["a:0", "a:1", "b:0"]
    assert table.on_node("n2") == []
    assert [a.entity for a in table.on_node("n1")] == ["a:0", "b:0"]
    assert [a.entity for a in table.of_service("a")] == ["a:0", "a:1"]
    assert table.services() == ["a", "b"]
    assert ("a", 1) in table and ("a", 2) not in table
    assert table.unassign("a", 7) is None
    assert table.remove_service("a") == [Assignment("a", 0, "n1", 3), Assignment("a", 1, "n3", 4)]
    assert list(table) == [Assignment("b", 0, "n1", 1)]
    assert table.on_node("n3") == []


def test_the_table_snapshot_round_trips_through_canonical_cbor():
    table = PlacementTable([Assignment("b", 0, "n1", 1, 0.25, 64), Assignment("a", 3, "n2", 9, 1.0, 128)])
    table_map = table.to_map()
    assert [entry["service"] for entry in table_map["assignments"]] == ["a", "b"]
    assert PlacementTable.from_map(canonical.decode(canonical.encode(table_map))) == table
    assert PlacementTable.from_map(table.to_map()) != PlacementTable()


@pytest.mark.parametrize("table_map, message", [
    ([], "must be a map with one list"),
    ({"assignments": [{"service": "a"}]}, "entry 0 must be a map with keys cpu, height, memory_mb, node, replica, "
                                          "service"),
    ({"assignments": [{"service": "a/b", "replica": 0, "node": "n1", "height": 1, "cpu": 0.1, "memory_mb": 1}]},
     "entry 0: service must be a service or node name"),
    ({"assignments": [{"service": "a", "replica": -1, "node": "n1", "height": 1, "cpu": 0.1, "memory_mb": 1}]},
     "entry 0: replica must be a non-negative int, got -1"),
    ({"assignments": [{"service": "a", "replica": True, "node": "n1", "height": 1, "cpu": 0.1, "memory_mb": 1}]},
     "replica must be a non-negative int"),
    ({"assignments": [{"service": "a", "replica": 0, "node": "n1", "height": 1, "cpu": math.nan, "memory_mb": 1}]},
     "cpu must be a non-negative float"),
    ({"assignments": [{"service": "a", "replica": 0, "node": "n1", "height": 1, "cpu": 0.1, "memory_mb": 1}] * 2},
     "lists a:0 twice"),
])
def test_a_bad_table_snapshot_is_refused_by_entry(table_map, message):
    with pytest.raises(InvalidPlacementTable, match=message):
        PlacementTable.from_map(table_map)


# --- properties against a naive model -----------------------------------------------------------------

NODE_NAMES = ("n0", "n1", "n2", "n3", "n4")
SERVICE_NAMES = ("s0", "s1", "s2", "s3")
_load = st.sampled_from([0.0, 0.25, 0.5]) | st.floats(0, 1)  # many exact ties


@st.composite
def node_views(draw):
    names = draw(st.lists(st.sampled_from(NODE_NAMES), unique=True, max_size=5))
    return [NodeView(name, draw(_load), draw(_load),
                     labels=draw(st.dictionaries(st.sampled_from(["zone", "gpu"]), st.sampled_from(["a", "b"]))),
                     alive=draw(st.booleans() | st.just(True)), cores=draw(st.sampled_from([1.0, 2.0, 4.0])),
                     memory_mb=draw(st.sampled_from([512.0, 1024.0])), reported_height=draw(st.integers(0, 6)))
            for name in names]


@st.composite
def service_specs(draw, name=None):
    name = name or draw(st.sampled_from(SERVICE_NAMES))
    spread = draw(st.booleans())
    allowed = tuple(draw(st.lists(st.sampled_from(NODE_NAMES), unique=True, max_size=4)))
    replicas = draw(st.integers(1, 4))
    if spread and allowed:
        replicas = min(replicas, len(allowed))
    return ServiceSpec(
        name=name, program="analyser", replicas=replicas,
        resources=Resources(draw(st.sampled_from([0.1, 0.5, 1.0])), draw(st.sampled_from([64, 256]))),
        constraints=Constraints(
            labels=draw(st.dictionaries(st.sampled_from(["zone", "gpu"]), st.sampled_from(["a", "b"]), max_size=1)),
            nodes=allowed, spread=spread,
            anti_affinity=tuple(draw(st.lists(st.sampled_from([s for s in SERVICE_NAMES if s != name]),
                                              unique=True, max_size=2)))))


@st.composite
def spec_sets(draw):
    names = draw(st.lists(st.sampled_from(SERVICE_NAMES), unique=True, max_size=4))
    return {name: draw(service_specs(name)) for name in names}


@st.composite
def tables(draw):
    entries = draw(st.lists(st.tuples(st.sampled_from(SERVICE_NAMES), st.integers(0, 4),
                                      st.sampled_from((*NODE_NAMES, "gone")), st.integers(1, 8),
                                      st.sampled_from([0.1, 1.0]), st.sampled_from([64, 256])), max_size=10))
    return PlacementTable(Assignment(*entry) for entry in entries)


def naive_choice(spec, replica, nodes, table, specs):
    """Written the obvious way, independently: which nodes are eligible, and the one to choose."""
    assignments = list(table)
    eligible = []
    for view in nodes:
        here = [a for a in assignments if a.node == view.name]
        ok = view.alive
        ok = ok and (not spec.constraints.nodes or view.name in spec.constraints.nodes)
        ok = ok and all(view.labels.get(k) == v for k, v in spec.constraints.labels.items())
        ok = ok and not any(a.service in spec.constraints.anti_affinity for a in here)
        ok = ok and not any(a.service in specs and spec.name in specs[a.service].constraints.anti_affinity
                            for a in here)
        if spec.constraints.spread and spec.replicas > 1:
            ok = ok and not any(a.service == spec.name and a.replica != replica for a in here)
        if ok:
            unreported = [a for a in here if a.height > view.reported_height]
            cpu = view.cpu + sum(a.cpu for a in unreported) / view.cores
            memory = view.memory + sum(a.memory_mb for a in unreported) / view.memory_mb
            eligible.append(((cpu + memory) / 2, view.name))
    if not eligible:
        return set(), None
    return {name for _, name in eligible}, sorted(eligible)[0][1]


@SETTINGS
@given(service_specs(), st.data(), node_views(), tables(), spec_sets())
def test_place_replica_agrees_with_the_naive_model(spec, data, nodes, table, others):
    replica = data.draw(st.integers(0, spec.replicas - 1))
    specs = {**others, spec.name: spec}
    eligible, expected = naive_choice(spec, replica, nodes, table, specs)
    try:
        decision = place_replica(spec, replica, nodes, table, specs=specs)
    except NoEligibleNode as exc:
        assert expected is None
        assert set(exc.excluded) == {view.name for view in nodes}
        return
    assert decision.node == expected  # never an ineligible node, always the least loaded one
    assert set(decision.reason["eligible"]) == eligible
    assert set(decision.reason["excluded"]) == {view.name for view in nodes} - eligible
    canonical.encode(decision.reason)


@SETTINGS
@given(service_specs(), node_views(), tables(), st.randoms(use_true_random=False))
def test_the_decision_does_not_depend_on_the_order_of_the_views(spec, nodes, table, random):
    shuffled = list(nodes)
    random.shuffle(shuffled)
    try:
        first = place_replica(spec, 0, nodes, table)
    except NoEligibleNode as exc:
        with pytest.raises(NoEligibleNode) as again:
            place_replica(spec, 0, shuffled, table)
        assert str(again.value) == str(exc)
        return
    assert place_replica(spec, 0, shuffled, table) == first
    assert canonical.encode(place_replica(spec, 0, shuffled, table).reason) == canonical.encode(first.reason)


@SETTINGS
@given(spec_sets(), node_views(), tables())
def test_plan_is_idempotent_once_applied(specs, nodes, table):
    actions, unplaceable = plan(specs, nodes, table)
    replicas = [(a.service, a.replica) for a in actions]
    assert len(replicas) == len(set(replicas)), "two actions for one replica"
    assert not {(u.service, u.replica) for u in unplaceable} & set(replicas)
    applied = apply(table, actions)
    again = plan(specs, nodes, applied)
    assert again.actions == []
    assert again.unplaceable == plan(specs, nodes, applied).unplaceable  # and deterministic


@SETTINGS
@given(spec_sets(), node_views(), st.data())
def test_constraints_hold_on_live_nodes_through_failures(specs, nodes, data):
    """Deploy from nothing, fail some nodes, reconcile: spread and anti-affinity still hold."""
    table = apply(PlacementTable(), plan(specs, nodes, PlacementTable()).actions)
    for _ in range(2):
        check_constraints(specs, nodes, table)
        failed = set(data.draw(st.lists(st.sampled_from([v.name for v in nodes] or ["-"]), max_size=2)))
        nodes = [NodeView(v.name, v.cpu, v.memory, v.labels, v.alive and v.name not in failed, v.cores,
                          v.memory_mb, v.reported_height) for v in nodes]
        actions = plan(specs, nodes, table).actions
        for action in actions:
            assert isinstance(action, Place) and action.previous_node in failed
        table = apply(table, actions, height=200)
    check_constraints(specs, nodes, table)


def check_constraints(specs, nodes, table):
    alive = {v.name for v in nodes if v.alive}
    for view_name in alive:
        here = table.on_node(view_name)
        for a in here:
            spec = specs[a.service]
            assert not spec.constraints.nodes or view_name in spec.constraints.nodes
            for b in here:
                if a is b:
                    continue
                assert b.service not in spec.constraints.anti_affinity, (a, b)
                if spec.constraints.spread and spec.replicas > 1:
                    assert b.service != a.service, (a, b)


def test_tentative_height_is_above_any_report():
    assert TENTATIVE > 2**62
    view = node("n1", 0.0, 0.0, reported_height=2**62)
    assert node_score(view, PlacementTable([Assignment("s", 0, "n1", TENTATIVE, 1.0, 0)])) == pytest.approx(0.5)
