"""Placement: which node runs each replica of each service, decided as a pure function.

The leader calls `plan(specs, nodes, table)` with the deployed specs, its current view of every node
(load, labels, liveness) and the placement table built from committed decisions. It gets back the
actions to propose (place a replica on a node, remove a replica from a node) and the replicas that
no node can take. Each action becomes one PROV-ORCH record; only when that record is committed does
anyone apply it to the table (`PlacementTable.assign` / `unassign`) and only then does the chosen
node's runtime start or stop a container (STYLE habit 6: decide, then act). Every node applies the
same committed records in the same order, so every node holds the same table.

The rule is the consensus paper's "the winner picks the least-loaded node"
(seeds/consensus-orchestration-edge.txt, "Orchestration", steps 2-3), made to work for specs:

- Only *eligible* nodes compete: alive, carrying every label the spec asks for, in its allow-list if
  it has one, not hosting a service it is anti-affine with (in either direction, when the caller
  passes every spec), and, when the spec spreads more than one replica, not hosting another replica
  of the same service. The paper has no constraints; every node is eligible there.
- A node's load is the weighted average the paper allows (step 2: "average CPU usage ... or the
  amount of central memory used, or even the weighted average of these two"), with equal weights,
  of its monitor's smoothed CPU and memory fractions, plus what it was promised but does not yet show:

      cpu_load    = view.cpu    + sum(a.cpu       for a in unreported) / view.cores
      memory_load = view.memory + sum(a.memory_mb for a in unreported) / view.memory_mb
      score       = (cpu_load + memory_load) / 2

  where `unreported` are the table's assignments on that node with `height > view.reported_height`
  (decisions its load report does not reflect yet), including replicas planned earlier in the same
  `plan` call. The paper places one request per election and the next vote carries fresh load;
  `plan` places many replicas at once, and without this term every replica placed in one pass
  (of different services, or of one service that does not spread) would land on the node that was
  idlest before any of them started.
- The lowest score wins; ties go to the smallest name, through `least_loaded_node`, the very rule
  the Raft core uses for on-demand decisions, so both modes and every node choose alike. An unknown
  or non-finite load counts as fully busy rather than making the order depend on NaN.

The decision's `reason` records what it was based on (every node's loads and score, the eligible
set, and why each other node was excluded), so an auditor reading the ledger can check the choice.

What this module must never do: I/O, read a clock, use randomness, or iterate anything in an order
that is not sorted. Two leaders that disagree on a choice would write different records for the
same state.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from tomq.errors import TomqError, UsageError
from tomq.node.orchestrator.spec import ServiceSpec
from tomq.node.raft.core import least_loaded_node

# The height of an assignment planned in this pass but not committed yet: above every real ledger
# height, so its requests always count as not reflected in any load report.
TENTATIVE = 2**63 - 1

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # service and node names (spec.py, tomq.topics)

RULE = "least-loaded eligible node; score = (cpu + memory) / 2 with unreported requests added; ties by name"


class NoEligibleNode(TomqError):
    """No node may take a replica; the message says why each node was excluded."""

    def __init__(self, service: str, replica: int, excluded: Mapping[str, str]) -> None:
        if excluded:
            why = "; ".join(f"{node}: {reason}" for node, reason in sorted(excluded.items()))
            message = f"cannot place {replica_entity(service, replica)}: no eligible node ({why})"
        else:
            message = f"cannot place {replica_entity(service, replica)}: no node has reported its load yet"
        super().__init__(message)
        self.service = service
        self.replica = replica
        self.excluded = dict(sorted(excluded.items()))


class InvalidPlacementTable(TomqError):
    """A placement table snapshot is malformed; it came from a broken store or a faulty peer."""


def replica_entity(service: str, replica: int) -> str:
    """The entity id of one replica in ledger records ("avg:0"); service names never contain ':'."""
    return f"{service}:{replica}"


@dataclass(frozen=True, slots=True)
class NodeView:
    """What the leader knows of a node: its last load report, its labels, and whether it is alive.

    `cpu` is the node's smoothed CPU use as a fraction of the whole machine (0..1, already divided by
    its core count) and `memory` its memory use as a fraction of the machine's memory; both come
    from its monitor (node/monitor.py). `cores` and `memory_mb` are the machine's size, used to turn
    requested cores and MiB into those fractions. `reported_height` says which decisions the report
    already reflects: the node sets it to the highest ledger height whose replicas on it have run
    long enough to show in the smoothed load; requests of later assignments are added on top.
    """

    name: str
    cpu: float
    memory: float
    labels: Mapping[str, str] = field(default_factory=dict)
    alive: bool = True
    cores: float = 1.0
    memory_mb: float = 1024.0
    reported_height: int = 0


@dataclass(frozen=True, slots=True)
class Assignment:
    """One replica on one node, as decided by the PROV-ORCH record committed at `height`.

    `cpu` and `memory_mb` are the replica's requests when it was placed; placement counts them
    against the node until its load report catches up (see the module docstring).
    """

    service: str
    replica: int
    node: str
    height: int
    cpu: float = 0.0
    memory_mb: int = 0

    @property
    def entity(self) -> str:
        return replica_entity(self.service, self.replica)

    def to_map(self) -> dict[str, Any]:
        return {"service": self.service, "replica": self.replica, "node": self.node, "height": self.height,
                "cpu": float(self.cpu), "memory_mb": self.memory_mb}


class PlacementTable:
    """The current assignments, one per (service, replica), changed only by committed decisions.

    Iteration, `on_node`, `of_service` and `to_map` are sorted by (service, replica), so everything
    computed from a table is the same on every node.
    """

    def __init__(self, assignments: Iterable[Assignment] = ()) -> None:
        self._by_replica: dict[tuple[str, int], Assignment] = {}
        self._by_node: dict[str, set[tuple[str, int]]] = {}  # an index: placement asks per node
        for assignment in assignments:
            self.assign(assignment)

    def assign(self, assignment: Assignment) -> Assignment | None:
        """Put a replica on its node, replacing where it was; returns the replaced assignment."""
        key = (assignment.service, assignment.replica)
        previous = self.unassign(*key)
        self._by_replica[key] = assignment
        self._by_node.setdefault(assignment.node, set()).add(key)
        return previous

    def unassign(self, service: str, replica: int) -> Assignment | None:
        previous = self._by_replica.pop((service, replica), None)
        if previous is not None:
            keys = self._by_node[previous.node]
            keys.discard((service, replica))
            if not keys:
                del self._by_node[previous.node]
        return previous

    def remove_service(self, service: str) -> list[Assignment]:
        removed = self.of_service(service)
        for assignment in removed:
            self.unassign(assignment.service, assignment.replica)
        return removed

    def get(self, service: str, replica: int) -> Assignment | None:
        return self._by_replica.get((service, replica))

    def on_node(self, node: str) -> list[Assignment]:
        return [self._by_replica[key] for key in sorted(self._by_node.get(node, ()))]

    def of_service(self, service: str) -> list[Assignment]:
        return [assignment for assignment in self if assignment.service == service]

    def services(self) -> list[str]:
        return sorted({service for service, _ in self._by_replica})

    def copy(self) -> PlacementTable:
        return PlacementTable(self)

    def __iter__(self) -> Iterator[Assignment]:
        return iter([self._by_replica[key] for key in sorted(self._by_replica)])

    def __len__(self) -> int:
        return len(self._by_replica)

    def __contains__(self, key: object) -> bool:
        return key in self._by_replica

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PlacementTable) and self._by_replica == other._by_replica

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"PlacementTable({list(self)!r})"

    def to_map(self) -> dict[str, Any]:
        """Plain, sorted data for a snapshot (canonical CBOR)."""
        return {"assignments": [assignment.to_map() for assignment in self]}

    @classmethod
    def from_map(cls, table_map: Any) -> PlacementTable:
        """Rebuild a table from `to_map()`; InvalidPlacementTable names the first bad entry."""
        if not isinstance(table_map, dict) or set(table_map) != {"assignments"} \
                or not isinstance(table_map["assignments"], list):
            raise InvalidPlacementTable("placement table snapshot must be a map with one list, 'assignments'")
        table = cls()
        for index, entry in enumerate(table_map["assignments"]):
            assignment = _assignment_from_map(entry, index)
            if (assignment.service, assignment.replica) in table:
                raise InvalidPlacementTable(f"placement table snapshot lists {assignment.entity} twice")
            table.assign(assignment)
        return table


_ASSIGNMENT_KEYS = {"service": str, "replica": int, "node": str, "height": int, "cpu": float, "memory_mb": int}


def _assignment_from_map(entry: Any, index: int) -> Assignment:
    where = f"placement table snapshot entry {index}"
    if not isinstance(entry, dict) or set(entry) != set(_ASSIGNMENT_KEYS):
        raise InvalidPlacementTable(f"{where} must be a map with keys {', '.join(sorted(_ASSIGNMENT_KEYS))}")
    for key, kind in _ASSIGNMENT_KEYS.items():
        value = entry[key]
        if kind is str:
            if not isinstance(value, str) or _NAME.fullmatch(value) is None:
                raise InvalidPlacementTable(f"{where}: {key} must be a service or node name, got {value!r}")
            continue
        number = type(value) in (int, float) and math.isfinite(value) if kind is float else type(value) is int
        if not number or value < 0:
            raise InvalidPlacementTable(f"{where}: {key} must be a non-negative {kind.__name__}, got {value!r}")
    return Assignment(entry["service"], entry["replica"], entry["node"], entry["height"], float(entry["cpu"]),
                      entry["memory_mb"])


@dataclass(frozen=True, slots=True)
class PlacementDecision:
    """Where one replica goes and why; `reason` goes into the PROV-ORCH record as it is."""

    service: str
    replica: int
    node: str
    reason: dict[str, Any]
    cpu: float = 0.0  # the spec's requests, carried into the assignment
    memory_mb: int = 0

    def assignment(self, height: int) -> Assignment:
        """The table entry for this decision once it is committed at `height`."""
        return Assignment(self.service, self.replica, self.node, height, self.cpu, self.memory_mb)


def place_replica(spec: ServiceSpec, replica: int, nodes: Iterable[NodeView], table: PlacementTable, *,
                  specs: Mapping[str, ServiceSpec] | None = None) -> PlacementDecision:
    """Choose the least-loaded eligible node for replica `replica` of `spec` (module docstring).

    `specs` (every deployed spec, by name) makes anti-affinity symmetric: a service that says it must
    not share a node with this one keeps this one away too. Raises NoEligibleNode when no node fits.
    """
    if type(replica) is not int or not 0 <= replica < spec.replicas:
        raise UsageError(f"{spec.name} has replicas 0..{spec.replicas - 1}; cannot place replica {replica!r}")
    views = _by_name(nodes)
    loads: dict[str, dict[str, Any]] = {}
    scores: dict[str, float] = {}
    excluded: dict[str, str] = {}
    for name, view in views.items():
        score = node_score(view, table)
        loads[name] = {"cpu": _recordable(view.cpu), "memory": _recordable(view.memory),
                       "score": _recordable(score)}
        why = exclusion(spec, replica, view, table, specs)
        if why is None:
            scores[name] = score
        else:
            excluded[name] = why
    if not scores:
        raise NoEligibleNode(spec.name, replica, excluded)
    chosen = least_loaded_node(scores)
    reason = {"rule": RULE, "requests": {"cpu": float(spec.resources.cpu), "memory_mb": spec.resources.memory_mb},
              "loads": loads, "eligible": sorted(scores), "excluded": excluded}
    return PlacementDecision(spec.name, replica, chosen, reason, float(spec.resources.cpu),
                             spec.resources.memory_mb)


def node_score(view: NodeView, table: PlacementTable) -> float:
    """A node's load for placement: reported CPU and memory plus unreported requests (docstring)."""
    numbers = (view.cpu, view.memory, view.cores, view.memory_mb)
    if not all(isinstance(n, int | float) and math.isfinite(n) for n in numbers) \
            or view.cpu < 0 or view.memory < 0 or view.cores <= 0 or view.memory_mb <= 0:
        return math.inf  # an unknown or absurd report counts as fully busy
    pending_cpu = 0.0
    pending_memory_mb = 0.0
    for assignment in table.on_node(view.name):
        if assignment.height > view.reported_height:
            pending_cpu += assignment.cpu
            pending_memory_mb += assignment.memory_mb
    cpu_load = view.cpu + pending_cpu / view.cores
    memory_load = view.memory + pending_memory_mb / view.memory_mb
    return (cpu_load + memory_load) / 2


def exclusion(spec: ServiceSpec, replica: int, view: NodeView, table: PlacementTable,
              specs: Mapping[str, ServiceSpec] | None = None) -> str | None:
    """Why `view` may not take this replica (the first rule it breaks), or None if it is eligible."""
    if not view.alive:
        return "not alive"
    constraints = spec.constraints
    if constraints.nodes and view.name not in constraints.nodes:
        return "not in constraints.nodes"
    missing = [f"{key}={value}" for key, value in sorted(constraints.labels.items())
               if view.labels.get(key) != value]
    if missing:
        return f"lacks label{'s' if len(missing) > 1 else ''} {', '.join(missing)}"
    hosted = table.on_node(view.name)
    for assignment in hosted:
        if assignment.service in constraints.anti_affinity:
            return f"hosts {assignment.entity} (anti-affinity)"
        other = specs.get(assignment.service) if specs is not None else None
        if other is not None and spec.name in other.constraints.anti_affinity:
            return f"hosts {assignment.entity}, which is anti-affine to {spec.name}"
    if constraints.spread and spec.replicas > 1:
        for assignment in hosted:
            if assignment.service == spec.name and assignment.replica != replica:
                return f"hosts {assignment.entity} (spread)"
    return None


@dataclass(frozen=True, slots=True)
class Place:
    """Propose: put a replica on `node`. `previous_node` is the dead or absent node it leaves."""

    decision: PlacementDecision
    previous_node: str | None = None
    previous_why: str | None = None  # "not alive" or "absent"

    action = "place"  # the PROV-ORCH action

    @property
    def service(self) -> str:
        return self.decision.service

    @property
    def replica(self) -> int:
        return self.decision.replica

    @property
    def node(self) -> str:
        return self.decision.node

    @property
    def entity(self) -> str:
        return replica_entity(self.service, self.replica)

    @property
    def reason(self) -> dict[str, Any]:
        if self.previous_node is None:
            return self.decision.reason
        return {**self.decision.reason, "replaces": {"node": self.previous_node, "why": self.previous_why}}


@dataclass(frozen=True, slots=True)
class Remove:
    """Propose: take a replica off `node` (its service was removed or scaled down)."""

    service: str
    replica: int
    node: str
    why: str

    action = "remove"  # the PROV-ORCH action

    @property
    def entity(self) -> str:
        return replica_entity(self.service, self.replica)

    @property
    def reason(self) -> dict[str, Any]:
        return {"why": self.why}


Action = Place | Remove


@dataclass(frozen=True, slots=True)
class Unplaceable:
    """A replica that needs a node and has none; `current_node` is the dead or absent one, if any."""

    service: str
    replica: int
    excluded: dict[str, str]
    current_node: str | None = None

    @property
    def message(self) -> str:
        return str(NoEligibleNode(self.service, self.replica, self.excluded))


class Plan(NamedTuple):
    actions: list[Action]
    unplaceable: list[Unplaceable]


def plan(specs: Mapping[str, ServiceSpec], nodes: Iterable[NodeView], table: PlacementTable) -> Plan:
    """The reconcile step: actions that bring `table` to what `specs` ask for, given `nodes`.

    Order (deterministic, at most one action per replica):
      1. Remove, by (service, replica), every replica whose service is gone or whose index is not
         below its spec's `replicas`. They go first so the replicas placed after them can use what
         they free (a node blocked by anti-affinity or spread).
      2. Place, by (service, replica), every replica that has no node or whose node is not alive or
         not in `nodes`. Each placement sees the earlier ones (as TENTATIVE assignments) so a pass
         spreads its replicas and counts their requests.
    A replica that fits nowhere is returned in `unplaceable`, never raised: the rest still proceed.
    A replica on a live node is never moved, even if the spec's constraints changed since.

    Applying every action (assign each Place's decision at its height, unassign each Remove) and
    calling `plan` again with the same nodes returns no actions. The caller must not plan again
    while proposed actions are uncommitted, or it would propose the same replica twice.
    """
    for key, keyed_spec in specs.items():
        if key != keyed_spec.name:
            raise UsageError(f"specs are keyed by service name; {key!r} maps to the spec of {keyed_spec.name!r}")
    views = _by_name(nodes)
    working = table.copy()
    actions: list[Action] = []
    for assignment in table:
        spec = specs.get(assignment.service)
        if spec is None:
            why = "service removed"
        elif assignment.replica >= spec.replicas:
            why = f"scaled down to {spec.replicas} replica{'s' if spec.replicas > 1 else ''}"
        else:
            continue
        actions.append(Remove(assignment.service, assignment.replica, assignment.node, why))
        working.unassign(assignment.service, assignment.replica)
    unplaceable: list[Unplaceable] = []
    for service in sorted(specs):
        spec = specs[service]
        for replica in range(spec.replicas):
            current = working.get(service, replica)
            previous_why = None
            if current is not None:
                view = views.get(current.node)
                if view is not None and view.alive:
                    continue
                previous_why = "absent" if view is None else "not alive"
            try:
                decision = place_replica(spec, replica, views.values(), working, specs=specs)
            except NoEligibleNode as exc:
                unplaceable.append(Unplaceable(service, replica, exc.excluded,
                                               current.node if current is not None else None))
                continue
            actions.append(Place(decision, current.node if current is not None else None, previous_why))
            working.assign(decision.assignment(TENTATIVE))
    return Plan(actions, unplaceable)


def node_failed(table: PlacementTable, node: str) -> list[Assignment]:
    """The assignments a failed or departed node strands, sorted; the table is not changed.

    `plan` re-places them once the node's view says it is not alive (or it is no longer listed).
    An applier that drops a departed node's assignments when its PROV-ID-delete commits can use
    this list to unassign them (a `remove` record could not name a node that has left).
    """
    return table.on_node(node)


def _by_name(nodes: Iterable[NodeView]) -> dict[str, NodeView]:
    views: dict[str, NodeView] = {}
    for view in nodes:
        if view.name in views:
            raise UsageError(f"node {view.name} appears twice in the node views; pass one view per node")
        views[view.name] = view
    return dict(sorted(views.items()))


def _recordable(value: float) -> float | None:
    """A float for a ledger record: None when unknown, so the record has no NaN or infinity."""
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None
