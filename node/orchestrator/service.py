"""The orchestrator on a node: operator requests in, PROV-ORCH records out, instances started and stopped.

Three duties, all driven by the node loop (never by a thread of their own):

1. Every node receives operator requests on `orch/request`, checks them against the operator key and
   keeps them until the ledger shows their effect. In on-demand mode a request makes the node stand
   for election, as the consensus paper has it.
2. The leader turns requests into records: a deployment is the service's PROV-ID-create carrying the
   operator's signed request (so the spec is on the ledger), a removal its PROV-ID-delete. Then it
   plans (node/orchestrator/placement.py, a pure function of the committed state and the nodes' load
   reports) and proposes one PROV-ORCH record per action, with the loads it saw as the reason. It plans
   again only once those records are committed (or have failed), never twice for one replica. A node
   whose load reports and Raft contact have both stopped for `dead_after` seconds is not alive: its
   replicas are placed again, and its containers are recorded as gone.
3. Every node carries out what is committed for it: the worker thread (instances.py) starts the
   replicas the ledger assigns to this node and stops the rest; each started instance is recorded as
   a container (PROV-ID-create, attributed to this node), each stopped one as PROV-ID-delete.
   A replica moved away from a live node starts here only once that node's container of it is
   recorded as gone and its load report no longer lists it running (or after HANDOVER_SECONDS):
   break before make, so the ledger itself shows a replica never ran on two nodes at once.

The rule that orders these: nothing starts before its PROV-ORCH record is committed, and the
retained `orch/placement/<service>` (published by the leader) only ever shows committed placements.
Running service instances watch it and exit when it no longer names them (fencing).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import statistics
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tomq import canonical
from tomq.errors import EnvelopeRejected, ReplayedEnvelope
from tomq.node.monitor import ResourceMonitor
from tomq.node.orchestrator.instances import Desired, InstanceWorker
from tomq.node.orchestrator.placement import (
    NodeView,
    NoEligibleNode,
    Place,
    place_replica,
    plan,
    replica_entity,
)
from tomq.node.orchestrator.requests import OrchRequest, open_request
from tomq.node.orchestrator.spec import ServiceSpec
from tomq.node.orchestrator.state import (
    AppliedRecord,
    OrchestrationState,
    container_name,
    parse_container_name,
)
from tomq.node.orchestrator.timings import PlacementTiming
from tomq.node.raft.core import Role
from tomq.node.runtime.base import Instance, InstanceSpec, Runtime
from tomq.records import ID_CREATE, ID_DELETE, ORCH, Identity, Orchestrate, Record
from tomq.wire import FileWatermarks, seal

if TYPE_CHECKING:
    from tomq.node.daemon import NodeDaemon
    from tomq.node.ledger_service import LedgerService

log = logging.getLogger("tomq.orchestrator")

RETRY_SECONDS = 3.0  # a proposed record not committed by then is proposed again (or planned again)
LEAD_SECONDS = 0.2  # how often an idle leader plans (a dead node is noticed within this of dead_after)
SAMPLE_SECONDS = 0.5  # how often the resource monitor samples (it smooths over seconds anyway)
# How long a node waits for a live node's instance of a replica moved here to stop before starting its
# own anyway: the runtimes' stop grace period (5 s) plus the worker's period and a commit.
HANDOVER_SECONDS = 10.0
REQUEST_KEEP_SECONDS = 600.0  # how long a node remembers a request whose effect it has not seen


@dataclass
class _Pending:
    request: OrchRequest
    received: float  # wall clock
    baseline: int  # the ledger height when it arrived: a move is done once a later placement exists
    proposed: float = 0.0  # when this node (as leader) last proposed the record that carries it out


@dataclass
class _Outstanding:
    """Records this node proposed and has not yet seen committed."""

    by_id: dict[str, tuple[float, Record]] = field(default_factory=dict)  # record id -> (proposed at, record)

    def add(self, record: Record, now: float) -> None:
        self.by_id[record.record_id] = (now, record)

    def has(self, record_id: str) -> bool:
        return record_id in self.by_id

    def settle(self, record_id: str) -> None:
        self.by_id.pop(record_id, None)

    def expired(self, now: float) -> list[Record]:
        late = [r for t, r in self.by_id.values() if now - t > RETRY_SECONDS]
        for record in late:
            del self.by_id[record.record_id]
        return late


class Orchestrator:
    def __init__(self, node: NodeDaemon, runtime: Runtime | None, *, labels: dict[str, str] | None = None,
                 dead_after: float = 2.5, load_pids_file: Path | None = None) -> None:
        self.node = node
        self.ledger: LedgerService | None = None  # set by attach(); the ledger is built after us
        self.runtime = runtime
        self.labels = dict(labels or {})
        self.dead_after = dead_after
        self.state = OrchestrationState()
        self.requests: dict[bytes, _Pending] = {}
        self.request_watermarks = FileWatermarks(node.data_dir / "watermarks-operator")
        self.outstanding = _Outstanding()  # our own proposed records
        self.plan_in_flight: set[str] = set()  # record ids of the leader's last planning round
        self.plan_started = 0.0
        self.unplaceable: list[str] = []
        self.instance_pids: list[int] = []  # from the worker: only its thread may call the runtime
        self.monitor = ResourceMonitor(os.getpid(), lambda: self.instance_pids, load_pids_file=load_pids_file)
        self.sampled_at = time.monotonic()
        self.sample = self.monitor.sample(self.sampled_at)
        self.last_contact: dict[str, float] = {}  # node -> wall clock of the last sign of life
        self.instances: list[Instance] = []
        self.worker_reported = False  # what runs here is unknown until the worker's first report
        self.instance_problems: list[str] = []
        self.worker = InstanceWorker(runtime, self._on_worker_report) if runtime is not None else None
        self.timings: deque[PlacementTiming] = deque(maxlen=200)
        self.open_timings: dict[str, PlacementTiming] = {}  # PROV-ORCH record id -> its timing
        self.published: dict[str, str] = {}  # service -> replicas this node published retained, as leader
        # service -> replicas of the retained orch/placement/<service> as the broker holds it (every node
        # listens): a new leader publishes only what differs, not every service at every election.
        self.retained: dict[str, str] = {}
        self.connects_seen = 0  # MqttLink.connects when `retained` was started
        self.placement_prefix = f"{node.topics.root}/orch/placement/"
        self.was_leader = False
        self.dirty = True  # the state changed since the last reconcile
        # (service, replica, height) placed here but still recorded as running on a live node ->
        # (since when, monotonic; whether we gave up waiting and said so)
        self.handovers: dict[tuple[str, int, int], tuple[float, bool]] = {}
        # (service, replica, height) handed to the worker to run: never withheld again, or a holder
        # appearing late (its container record committing after our start) would stop ours.
        self.handed_over: set[tuple[str, int, int]] = set()
        self.caught_up = False
        self.last_lead = 0.0
        self.catch_up_to: int | None = None
        self.last_reconcile = 0.0

    # ------------------------------------------------------------------ wiring

    def attach(self, ledger: LedgerService) -> None:
        self.ledger = ledger
        if self.worker is not None:
            self.worker.start()

    def close(self) -> None:
        if self.worker is not None:
            self.worker.stop()
        self.request_watermarks.close()

    def on_records(self, applied: list[AppliedRecord]) -> None:
        """Listener of the ledger: fold committed records into the state (every node, in order)."""
        now = time.time()
        version = self.state.version
        # A record's id costs an encoding and a hash: only worth it while we wait for records of ours.
        awaited = bool(self.outstanding.by_id or self.plan_in_flight or self.open_timings)
        for item in applied:
            self.state.apply(item)
            if not awaited:
                continue
            record_id = item.record.record_id
            self.outstanding.settle(record_id)
            self.plan_in_flight.discard(record_id)
            timing = self.open_timings.pop(record_id, None)
            if timing is not None:
                timing.committed = now
                if self.ledger is not None and self.ledger.apply_started:
                    timing.apply_s = max(0.0, time.monotonic() - self.ledger.apply_started)
                self.timings.append(timing)
        if self.state.version != version:
            self.dirty = True

    # ------------------------------------------------------------------ inputs

    def on_placement(self, topic: str, payload: bytes) -> None:
        """A retained orch/placement/<service> (only nodes may publish there): remember what it says.
        One that is not what we published as leader (a late copy from an earlier leader, a node
        overwriting it) makes us publish ours again at the next turn of the loop."""
        service = topic[len(self.placement_prefix):]
        key: str | None = None
        try:
            key = _replicas_key(json.loads(payload)["replicas"]) if payload else None
        except (ValueError, KeyError, TypeError):
            pass  # unreadable: as good as none
        if key is None:
            self.retained.pop(service, None)
        else:
            self.retained[service] = key
        if service in self.published and self.published[service] != key:
            del self.published[service]
            self.dirty = True

    def on_request(self, payload: bytes) -> None:
        try:
            request = open_request(payload, self.node.cluster.operator, self.node.cluster.name,
                                   self.request_watermarks)
        except ReplayedEnvelope:
            # The same request again (the operator tool resends until it sees the result). In
            # on-demand mode it still asks for a leader: the first copy may have found none.
            self._want_leader()
            return
        except EnvelopeRejected as exc:
            log.warning("refused operator request: %s", exc)
            return
        self.requests[request.digest] = _Pending(request, time.time(), self.state.height)
        log.info("operator request: %s %s", request.op, request.service)
        self._want_leader()

    def _want_leader(self) -> None:
        ledger = self.ledger
        if (ledger is not None and self.requests and self.node.options.mode == "on-demand"
                and self.node.raft.leader is None and self.node.raft.role is not Role.LEADER):
            ledger.wants_leader = True  # the paper: the node that receives a request stands for election

    def has_work(self) -> bool:
        """Whether after_input would act now: committed changes to reconcile and, leading, to publish."""
        return self.dirty and self.ledger is not None

    def has_leader_work(self) -> bool:
        """Whether a leader must stay: requests not carried out, records on their way, replicas unplaced."""
        if self.requests or self.plan_in_flight or self.outstanding.by_id:
            return True
        return not self.state.fully_placed()

    def _on_worker_report(self, instances: list[Instance], problems: list[str], pids: list[int]) -> None:
        def handle() -> None:
            if not self.worker_reported:
                self.worker_reported = self.dirty = True  # now the desired set can be handed over
            self.instances = instances
            self.instance_problems = problems
            self.instance_pids = pids
            self._record_containers()

        self.node.call(handle)

    # ------------------------------------------------------------------ the loop's hooks

    def tick(self) -> None:
        now = time.time()
        if time.monotonic() - self.sampled_at >= SAMPLE_SECONDS:
            # Walking /proc for the process trees costs milliseconds: not on every 50 ms tick.
            self.sampled_at = time.monotonic()
            self.sample = self.monitor.sample(self.sampled_at)
        self._note_contacts(now)
        self._forget_done_requests(now)
        for record in self.outstanding.expired(now):
            if self._still_wanted(record):
                self._propose(record)
        if now - self.last_reconcile > 1.0:
            self.dirty = True  # acted on by the after_input that follows every loop iteration

    def after_input(self) -> None:
        ledger = self.ledger
        if ledger is None:
            return
        leader = ledger.is_ready_leader()
        if self.node.link.connects != self.connects_seen:
            # A new connection (a restarted broker may hold no retained messages at all): what we knew
            # of its retained placements, and what we published to it, no longer counts.
            self.connects_seen = self.node.link.connects
            self.retained.clear()
            self.published.clear()
            self.dirty = True
        if leader and not self.was_leader:
            self.published.clear()  # a new leader checks every placement against what is retained
            self.plan_in_flight.clear()
        self.was_leader = leader
        if self.dirty and leader:
            # What just committed goes out before this turn plans anything: a client waits for the
            # retained placement, and planning over every deployed service takes milliseconds.
            self._publish_placements()
        now = time.time()
        # Planning reads every node's view: on news (a request, a changed state), else a few times a
        # second (to notice a node that stopped answering), not on every input batch.
        if leader and (self.dirty or self.requests or now - self.last_lead >= LEAD_SECONDS):
            self.last_lead = now
            self._lead(now)
            ledger.cut_block()  # what it proposed replicates while we reconcile below
        if self.dirty:
            self.dirty = False
            self.last_reconcile = time.time()
            self._reconcile_instances()

    # ------------------------------------------------------------------ leader

    def _lead(self, now: float) -> None:
        joining: dict[str, ServiceSpec] = {}  # services whose ID-create this round proposes
        # Services with an ID-create on its way from an earlier round: a second deployment of one of
        # them waits until the ledger shows which spec joined.
        on_its_way = {p.request.service for p in self.requests.values() if p.request.spec is not None
                      and now - p.proposed < RETRY_SECONDS and p.request.service not in self.state.specs}
        for pending in sorted(self.requests.values(), key=lambda p: p.request.seq):
            if now - pending.proposed < RETRY_SECONDS:
                continue  # its record is on its way; the state shows it once committed
            record = self._record_for_request(pending, now)
            if record is not None and record.state == ID_CREATE and (
                    pending.request.service in joining or pending.request.service in on_its_way):
                continue  # two deployments of one service: the first joins; the next is looked at after
            if record is not None:
                pending.proposed = now
                self._propose(record)
                if record.state == ID_CREATE and pending.request.spec is not None:
                    joining[pending.request.service] = pending.request.spec
        if self.plan_in_flight and now - self.plan_started < RETRY_SECONDS:
            return  # never plan twice for one replica: wait for the last round to commit
        self.plan_in_flight.clear()
        views = self.node_views(now)
        planning = time.time()
        # A service that joins in this round is placed in it too: its placements follow its ID-create
        # in the same block (the ledger and every node's state take them in that order), so a
        # deployment costs one ledger round, not two. Should the ID-create be refused, every node
        # skips the placements alike and the request is tried again.
        specs = {**self.state.specs, **joining} if joining else self.state.specs
        result = plan(specs, views, self.state.table)
        now = time.time()
        self.unplaceable = [u.message for u in result.unplaceable]
        round_ids = set()
        for action in result.actions:
            reason = dict(action.reason)
            record = Record(ORCH, Orchestrate(deployed=action.entity, location=action.node, action=action.action,
                                              reason=reason), int(now * 1000))
            round_ids.add(record.record_id)
            if isinstance(action, Place):
                self.open_timings[record.record_id] = self._timing_for(action, planning, now)
            self._propose(record)
        for record in self._containers_of_dead_nodes(views):
            round_ids.add(record.record_id)
            self._propose(record)
        if round_ids:
            self.plan_in_flight = round_ids
            self.plan_started = now

    def _request_done(self, pending: _Pending) -> bool:
        """Whether the committed state shows a request carried out (every node asks; no side effects)."""
        request = pending.request
        joined = self.state.specs.get(request.service)
        if request.op == "remove":
            return joined is None
        if request.op == "move":
            current = self.state.table.get(request.service, request.replica)
            return (joined is None or current is None or current.height > pending.baseline
                    or current.node == request.to)
        # Registered is not deployed: a deployment is done once every replica has a committed placement
        # (until then it keeps its timing and, in on-demand mode, the leader it needs).
        assert request.spec is not None
        return joined == request.spec and len(self.state.table.of_service(request.service)) >= request.spec.replicas

    def _record_for_request(self, pending: _Pending, now: float) -> Record | None:
        """The record that carries out a request next (the leader's step), or None if none is due."""
        request = pending.request
        joined = self.state.specs.get(request.service)
        now_ms = int(now * 1000)
        if request.op == "move":
            return self._move_record(pending, now)
        if request.op == "remove":
            if joined is None:
                return None
            return Record(ID_DELETE, Identity(request.service, "service", request.certificate or b"\0"), now_ms,
                          {"request": request.wire})
        assert request.spec is not None
        if joined is not None:
            if joined == request.spec:
                return None  # registered; `plan` places its replicas (the request stays until then)
            # A changed spec: the old deployment leaves, the new one joins (in a later round).
            return Record(ID_DELETE, Identity(request.service, "service", b"\0"), now_ms,
                          {"request": request.wire})
        return Record(ID_CREATE, Identity(request.service, "service", request.certificate), now_ms,
                      {"request": request.wire})

    def _move_record(self, pending: _Pending, now: float) -> Record | None:
        """Place a replica again, away from where it runs (or onto the node the operator names)."""
        request = pending.request
        spec = self.state.specs.get(request.service)
        current = self.state.table.get(request.service, request.replica)
        if spec is None or current is None or self._request_done(pending):
            return None
        views = [dataclasses.replace(v, alive=False) if v.name == current.node or (request.to and v.name != request.to)
                 else v for v in self.node_views(now)]
        table = self.state.table.copy()
        table.unassign(request.service, request.replica)
        try:
            decision = place_replica(spec, request.replica, views, table, specs=self.state.specs)
        except NoEligibleNode as exc:
            log.warning("cannot move %s:%s: %s", request.service, request.replica, exc)
            self.requests.pop(request.digest, None)
            return None
        reason = {**decision.reason, "replaces": {"node": current.node, "why": "moved by the operator"}}
        record = Record(ORCH, Orchestrate(replica_entity(request.service, request.replica), decision.node, "place",
                                          reason), int(now * 1000))
        self.open_timings[record.record_id] = PlacementTiming(
            request.service, request.replica, decision.node, self.node.options.mode, "move", pending.received,
            request.time_ms, planning=now, chosen=time.time(), log_write_s=self.node.last_persist_seconds)
        return record

    def _forget_done_requests(self, now: float) -> None:
        for digest, pending in list(self.requests.items()):
            if self._request_done(pending) or now - pending.received > REQUEST_KEEP_SECONDS:
                del self.requests[digest]

    def _timing_for(self, action: Place, planning: float, now: float) -> PlacementTiming:
        trigger, received, sent_ms = "plan", now, None
        if action.previous_node is not None:
            trigger = "heal"
            received = self.last_contact.get(action.previous_node, now - self.dead_after) + self.dead_after
        else:
            for pending in self.requests.values():
                if pending.request.service == action.service:
                    trigger, received, sent_ms = "request", pending.received, pending.request.time_ms
        timing = PlacementTiming(action.service, action.replica, action.node, self.node.options.mode, trigger,
                                 received, sent_ms, planning=planning, chosen=now,
                                 log_write_s=self.node.last_persist_seconds)
        # The election this placement waited for, if one happened since the request (on-demand mode).
        # A leader may plan in the same turn it was elected, before that Ready stamped its events.
        unstamped = [(now, event) for event in self.node.raft.pending_events()]
        for at, event in [*self.node.events[-50:], *unstamped]:
            if at < received - 0.001:
                continue
            if event.phase == "campaign" and timing.campaign is None:
                timing.campaign = at
            elif event.phase == "vote" and timing.first_vote is None and timing.campaign is not None:
                timing.first_vote = at
            elif event.phase == "elected" and timing.campaign is not None:
                timing.elected = at
        return timing

    def node_views(self, now: float) -> list[NodeView]:
        views = [NodeView(self.node.name, self.sample.cpu, self.sample.memory, self.labels, True,
                          float(self.monitor.cores), float(self.monitor.memory_total_mb), self.state.height)]
        for name in self.node.node_names:
            if name == self.node.name or not self.state_joined_node(name):
                continue
            _, report = self.node.peer_reports.get(name, (0.0, {}))
            alive = self._alive(name, now)
            cpu, memory = _fraction(report.get("cpu")), _fraction(report.get("memory"))
            voted = self.node.raft.loads.get(name)
            if self.node.options.mode == "on-demand" and voted is not None:
                # The paper's protocol: the load each voter sent with its vote, fresher than any report.
                # It is the voter's score, (cpu + memory) / 2, so both halves take it.
                cpu = memory = voted
            views.append(NodeView(
                name, cpu, memory,
                {str(k): str(v) for k, v in (report.get("labels") or {}).items()}, alive,
                _positive(report.get("cores"), 1.0), _positive(report.get("memory_mb"), 1024.0),
                int(report.get("reported_height") or 0)))
        return views

    def state_joined_node(self, name: str) -> bool:
        ledger = self.ledger
        return ledger is not None and ledger.verifier.state.joined(name)

    def _note_contacts(self, now: float) -> None:
        """Raft contact counts as a sign of life: the leader sees which followers answered recently."""
        raft = self.node.raft
        if raft.role is Role.LEADER:
            for peer, progress in raft.progress.items():
                if progress.recent_active:
                    self.last_contact[peer] = now
        elif raft.leader is not None:
            self.last_contact[raft.leader] = now

    def _containers_of_dead_nodes(self, views: list[NodeView]) -> list[Record]:
        """Containers on nodes that stopped answering and whose replica now runs elsewhere: gone."""
        dead = {v.name for v in views if not v.alive}
        out = []
        for info in self.state.containers.values():
            current = self.state.table.get(info.service, info.replica)
            if info.node in dead and (current is None or current.node != info.node or current.height != info.height):
                out.append(Record(ID_DELETE, Identity(info.name, "container", b"\0", info.node), int(time.time() * 1000),
                                  {"why": f"node {info.node} stopped answering"}))
        return out

    def _publish_placements(self) -> None:
        for service in sorted(set(self.state.specs) | set(self.published) | set(self.state.table.services())):
            document = self.state.placement_of(service)
            key = _replicas_key(document["replicas"])
            if self.published.get(service) == key:
                continue
            if self.retained.get(service) == key:
                self.published[service] = key  # the broker holds it already (an earlier leader's)
                continue
            if self.node.link.publish(self.node.topics.orch_placement(service),
                                      json.dumps(document, sort_keys=True).encode(), qos=1, retain=True):
                self.published[service] = key

    # ------------------------------------------------------------------ every node: its own instances

    def _caught_up(self) -> bool:
        """Whether our view of the ledger is current enough to act on for this node's own instances.

        Just started, we hold what we had committed before: a replica placed here then may have been
        placed elsewhere while we were away. Until we have applied what the cluster had committed when
        we first heard from a leader, we neither start or stop instances nor record containers.
        """
        if self.caught_up:
            return True
        raft = self.node.raft
        if raft.leader is None:
            return False
        if self.catch_up_to is None:
            self.catch_up_to = raft.log.committed
        if raft.log.applied < self.catch_up_to:
            return False
        self.caught_up = self.dirty = True
        return True

    def _reconcile_instances(self) -> None:
        # Not before the worker has said what runs here: a replica moved away while we were down
        # may still run here, and one moved here may still run on its old node (_handover_holder).
        if self.worker is None or not self.worker_reported or not self._caught_up():
            return
        desired: dict[tuple[str, int], Desired] = {}
        now = time.time()
        waiting: dict[tuple[str, int, int], tuple[float, bool]] = {}
        for assignment in self.state.table.on_node(self.node.name):
            spec = self.state.specs.get(assignment.service)
            if spec is None:
                continue
            key = (assignment.service, assignment.replica, assignment.height)
            holder = None if key in self.handed_over else \
                self._handover_holder(assignment.service, assignment.replica, assignment.height, now)
            if holder is not None:
                since, warned = waiting[key] = self.handovers.get(key, (time.monotonic(), False))
                if time.monotonic() - since < HANDOVER_SECONDS:
                    continue
                if not warned:
                    log.warning("starting %s:%s although %s has not recorded its instance as stopped after %.0f s",
                                assignment.service, assignment.replica, holder, HANDOVER_SECONDS)
                    waiting[key] = (since, True)
            instance_spec = InstanceSpec(
                cluster=self.node.cluster.name, service=assignment.service, replica=assignment.replica,
                node=self.node.name, height=assignment.height, image=spec.image,
                command=spec.command if spec.command is not None else (sys.executable, "-m",
                                                                         f"tomq.node.services.{spec.program}"),
                env=dict(spec.env), restart=spec.restart,  # type: ignore[arg-type]
                cpu=spec.resources.cpu, memory_mb=spec.resources.memory_mb)
            desired[(assignment.service, assignment.replica)] = Desired(
                instance_spec, functools.partial(self._instance_files, assignment.service, assignment.replica,
                                                 assignment.height, spec))
        self.handovers = waiting
        self.handed_over = {(d.spec.service, d.spec.replica, d.spec.height) for d in desired.values()}
        self.worker.want(desired)

    def _handover_holder(self, service: str, replica: int, height: int, now: float) -> str | None:
        """The live node whose instance of this replica must stop before ours starts, or None.

        A node holds it while the ledger records its container, or while its latest load report
        lists the instance running (its container record may still be on its way). Ours may exist
        already (started, restarting, or left by an earlier run of this node): then it stays. A node
        that stopped answering holds nothing; its instance fences itself on the placement.
        """
        if any(i.service == service and i.replica == replica and i.height == height for i in self.instances):
            return None
        for info in self.state.containers.values():
            if (info.service, info.replica) == (service, replica) and info.node != self.node.name \
                    and self._alive(info.node, now):
                return info.node
        prefix = f"{service}:{replica}@"  # of an _instance_tags() entry
        for name, (_, report) in self.node.peer_reports.items():
            listed = report.get("instances")
            if name == self.node.name or not isinstance(listed, list) or not self._alive(name, now):
                continue
            if any(isinstance(tag, str) and tag.startswith(prefix) and tag.endswith(":running") for tag in listed):
                return name
        return None

    def _alive(self, name: str, now: float) -> bool:
        received, _ = self.node.peer_reports.get(name, (0.0, {}))
        return now - max(received, self.last_contact.get(name, 0.0)) < self.dead_after

    def _instance_files(self, service: str, replica: int, height: int, spec: ServiceSpec) -> dict[str, bytes]:
        """What an instance needs to be its service: identity, trust, broker, spec (runs on the worker)."""
        directory = self.node.cluster.directory / "members" / service
        ledger = self.ledger
        devices: dict[str, bytes] = {}
        if ledger is not None:
            for name in sorted(ledger.verifier.state.members("device")):
                certificate = ledger.verifier.trust.by_name(name)
                if certificate is not None:
                    devices[name] = certificate.encoded
        description = {
            "cluster": self.node.cluster.name,
            "broker": {"host": self.node.link.host, "port": self.node.link.port},
            "service": service, "replica": replica, "node": self.node.name, "height": height,
            "program": spec.program, "spec": spec.to_map(), "identity": service,
            "ledger_height": self.state.height,
        }
        return {
            "service.json": json.dumps(description, sort_keys=True, indent=1).encode(),
            "key": (directory / "key").read_bytes(),
            "cert.cbor": (directory / "cert.cbor").read_bytes(),
            "operator.pub": (self.node.cluster.operator.hex() + "\n").encode(),
            "devices.cbor": canonical.encode(devices),
        }

    def _record_containers(self) -> None:
        """Propose the container records that make the ledger match what runs here."""
        if not self._caught_up():
            return
        now_ms = int(time.time() * 1000)
        running = {container_name(i.service, i.replica, self.node.name, i.height): i
                   for i in self.instances if i.running}
        for name, instance in sorted(running.items()):
            assignment = self.state.table.get(instance.service, instance.replica)
            placed_here = (assignment is not None and assignment.node == self.node.name
                           and assignment.height == instance.height)
            if name not in self.state.containers and placed_here:
                proof = hashlib.sha256(f"{instance.id} {sorted(instance.labels.items())}".encode()).digest()
                self._propose_once(Record(ID_CREATE, Identity(name, "container", proof, self.node.name), now_ms,
                                          {"runtime": self.runtime.name if self.runtime else "", "id": instance.id}))
        for name, info in sorted(self.state.containers.items()):
            if info.node == self.node.name and name not in running:
                self._propose_once(Record(ID_DELETE, Identity(name, "container", b"\0", self.node.name), now_ms,
                                          {"why": "stopped"}))

    # ------------------------------------------------------------------ proposing

    def _propose_once(self, record: Record) -> None:
        """Propose unless an equal record (same object and state) is already on its way."""
        for _, pending in self.outstanding.by_id.values():
            if pending.state == record.state and pending.structure == record.structure:
                return
        self._propose(record)

    def _propose(self, record: Record) -> None:
        ledger = self.ledger
        if ledger is None:
            return
        self.outstanding.add(record, time.time())
        # Operator tools may propose as this node too (`tomq ledger propose --as`): see ClockSequence.
        ledger.submit(seal(self.node.key, seq=self.node.record_sequence.next(), time_ms=int(time.time() * 1000),
                           type="record", body=record.to_map()))

    def _still_wanted(self, record: Record) -> bool:
        """Whether a record that did not commit in time should be proposed again, unchanged."""
        structure = record.structure
        if isinstance(structure, Identity) and structure.kind == "container":
            joined = structure.object in self.state.containers
            if record.state == ID_DELETE:
                return joined
            # A create only while the replica is still placed here under that decision: one placed
            # elsewhere meanwhile is stopped, not recorded as joining late.
            parsed = parse_container_name(structure.object)
            if joined or parsed is None:
                return False
            service, replica, node, height = parsed
            current = self.state.table.get(service, replica)
            return current is not None and (current.node, current.height) == (node, height)
        return False  # requests and plans are recomputed from the state instead

    # ------------------------------------------------------------------ views

    def load_report(self) -> dict[str, Any]:
        """What this node adds to its load report (node/<id>/load): what placement needs."""
        return {"cpu": round(self.sample.cpu, 4), "memory": round(self.sample.memory, 4),
                "cores": self.monitor.cores, "memory_mb": round(self.monitor.memory_total_mb),
                "labels": self.labels, "reported_height": self.state.height,
                "runtime": self.runtime.name if self.runtime is not None else None,
                "limits": self.runtime.limits if self.runtime is not None else None,
                "instances": self._instance_tags()}

    def _instance_tags(self) -> list[str]:
        """What runs here, as load reports and status show it; _handover_holder reads peers' back."""
        return sorted(f"{i.service}:{i.replica}@{i.height}:{i.state}" for i in self.instances)

    def load_score(self) -> float:
        return (self.sample.cpu + self.sample.memory) / 2

    def status(self) -> dict[str, Any]:
        totals = [total for t in self.timings if (total := t.phases_ms()["total"]) is not None]
        return {
            "runtime": self.runtime.name if self.runtime is not None else None,
            "services": {name: {"replicas": spec.replicas, "deployed_at": self.state.spec_heights.get(name)}
                         for name, spec in sorted(self.state.specs.items())},
            "placements": [a.to_map() for a in self.state.table],
            "containers": sorted(self.state.containers),
            "instances": self._instance_tags(),
            "unplaceable": self.unplaceable,
            "pending_requests": len(self.requests),
            "placement_timings": [t.to_map() for t in list(self.timings)[-20:]],
            "placement_p50_ms": round(statistics.median(totals), 3) if totals else None,
            "problems": self.instance_problems[-5:] + self.state.skipped[-5:],
        }


def _replicas_key(replicas: Any) -> str:
    return json.dumps(replicas, sort_keys=True)


def _fraction(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and 0 <= value < 1e6 else 1.0


def _positive(value: Any, default: float) -> float:
    return float(value) if isinstance(value, int | float) and value > 0 else default


__all__ = ["Orchestrator", "PlacementTiming", "replica_entity"]
