"""What the ledger says about orchestration: deployed specs, the placement table, running containers.

Every node folds the same committed records, in ledger order, into an `OrchestrationState`, so every
node knows the same specs and the same placement without any other replication:

    PROV-ID-create  service    a deployment: the record's `request` attribute is the operator-signed
                               request that carries the spec (auditors can check the operator's word)
    PROV-ID-delete  service    the service was removed
    PROV-ORCH       place      replica `service:i` goes to node `location` (assign, at this height)
    PROV-ORCH       remove     replica `service:i` leaves node `location` (unassign)
    PROV-ID-create  container  an instance started, attributed to the node that runs it
    PROV-ID-delete  container  an instance stopped (or its node was declared dead)

A node acts on this state (starts and stops its own instances); the leader plans from it. Records
the ledger committed but that do not fit (a place for a service that was removed since, a spec that
no longer parses) are skipped here with a reason, never raised: the ledger already decided they are
legal, and two nodes must not diverge on what they do with them.

What this module must never do: I/O, clocks, randomness. It is as deterministic as the ledger.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from tomq import canonical
from tomq.errors import TomqError
from tomq.node.orchestrator.placement import Assignment, PlacementTable
from tomq.node.orchestrator.spec import ServiceSpec, spec_from_map
from tomq.records import ID_CREATE, ID_DELETE, ORCH, Identity, Orchestrate, Record

_ORCHESTRATION_STATES = frozenset({ID_CREATE, ID_DELETE, ORCH})  # the only records that change this state

log = logging.getLogger("tomq.orchestrator")


@dataclass(frozen=True, slots=True)
class AppliedRecord:
    """One committed record as the ledger applied it."""

    height: int
    record: Record
    proposer: str  # certificate name of the signer, or pattern.OPERATOR


@dataclass(frozen=True, slots=True)
class ContainerInfo:
    """A joined container: which replica it runs, where, and the decision it runs under."""

    name: str
    service: str
    replica: int
    node: str
    height: int  # the placement decision's height


def container_name(service: str, replica: int, node: str, height: int) -> str:
    """The identity of one instance: a replica on a node under one decision (names exclude ':')."""
    return f"{service}:{replica}:{node}:{height}"


def parse_container_name(name: str) -> tuple[str, int, str, int] | None:
    parts = name.split(":")
    if len(parts) != 4 or not parts[1].isdigit() or not parts[3].isdigit():
        return None
    return parts[0], int(parts[1]), parts[2], int(parts[3])


def parse_replica_entity(entity: str) -> tuple[str, int] | None:
    service, sep, replica = entity.rpartition(":")
    if not sep or not replica.isdigit() or not service:
        return None
    return service, int(replica)


def spec_of_request(request_wire: bytes) -> ServiceSpec:
    """The spec inside an operator-signed deployment request (already checked by the ledger's proposer)."""
    signed, _ = canonical.decode(request_wire)
    body = canonical.decode(signed, check_canonical=False)["body"]
    return spec_from_map(body["spec"], source="deployment request")


@dataclass
class OrchestrationState:
    specs: dict[str, ServiceSpec] = field(default_factory=dict)
    spec_heights: dict[str, int] = field(default_factory=dict)  # service -> height of its deployment
    table: PlacementTable = field(default_factory=PlacementTable)
    containers: dict[str, ContainerInfo] = field(default_factory=dict)
    height: int = -1  # last block folded in
    version: int = 0  # counts the records that changed anything here: a cheap "did it change?"
    skipped: list[str] = field(default_factory=list)  # why records were not applied (recent ones)
    _fully_placed: tuple[int, bool] | None = None  # (version, answer): see fully_placed()

    def apply(self, applied: AppliedRecord) -> None:
        record, height = applied.record, applied.height
        self.height = max(self.height, height)
        if record.state not in _ORCHESTRATION_STATES:
            return  # readings and the like: most of what a busy ledger carries
        structure = record.structure
        if (isinstance(structure, Identity) and structure.kind in ("service", "container")) or \
                isinstance(structure, Orchestrate):
            self.version += 1
        if isinstance(structure, Identity) and structure.kind == "service":
            if record.state == ID_CREATE:
                request = record.attributes.get("request")
                if not isinstance(request, bytes):
                    self._skip(height, f"service {structure.object} joined without a deployment request")
                    return
                try:
                    spec = spec_of_request(request)
                except (TomqError, KeyError, TypeError, ValueError) as exc:
                    self._skip(height, f"service {structure.object}: its request holds no valid spec ({exc})")
                    return
                self.specs[spec.name] = spec
                self.spec_heights[spec.name] = height
            elif record.state == ID_DELETE:
                self.specs.pop(structure.object, None)
                self.spec_heights.pop(structure.object, None)
        elif isinstance(structure, Identity) and structure.kind == "container":
            parsed = parse_container_name(structure.object)
            if parsed is None:
                return  # a container started by something else than this orchestrator
            if record.state == ID_CREATE:
                service, replica, node, decided = parsed
                self.containers[structure.object] = ContainerInfo(structure.object, service, replica, node, decided)
            elif record.state == ID_DELETE:
                self.containers.pop(structure.object, None)
        elif isinstance(structure, Orchestrate) and record.state == ORCH:
            parsed_entity = parse_replica_entity(structure.deployed)
            if parsed_entity is None:
                return
            service, replica = parsed_entity
            if structure.action == "place":
                deployed = self.specs.get(service)
                if deployed is None:
                    self._skip(height, f"place {structure.deployed}: service {service} is not deployed")
                    return
                self.table.assign(Assignment(service, replica, structure.location, height,
                                             deployed.resources.cpu, deployed.resources.memory_mb))
            elif structure.action == "remove":
                current = self.table.get(service, replica)
                if current is not None and current.node == structure.location:
                    self.table.unassign(service, replica)

    def fully_placed(self) -> bool:
        """Whether every deployed replica has a placement. Asked after every input batch (on-demand
        leaders hold on while it is False), so it is computed once per change of this state."""
        if self._fully_placed is None or self._fully_placed[0] != self.version:
            placed: dict[str, int] = {}
            for assignment in self.table:
                placed[assignment.service] = placed.get(assignment.service, 0) + 1
            self._fully_placed = (self.version, all(placed.get(name, 0) >= spec.replicas
                                                    for name, spec in self.specs.items()))
        return self._fully_placed[1]

    def _skip(self, height: int, why: str) -> None:
        log.warning("orchestration skips the record at height %s: %s", height, why)
        self.skipped.append(f"{height}: {why}")
        del self.skipped[:-50]

    def placement_of(self, service: str) -> dict[str, object]:
        """The retained `orch/placement/<service>` document (empty replicas once removed)."""
        return {"service": service, "height": self.height,
                "replicas": {str(a.replica): {"node": a.node, "height": a.height}
                             for a in self.table.of_service(service)}}
