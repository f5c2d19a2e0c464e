"""The Raft consensus core: a deterministic state machine that does no I/O.

Inputs are `tick()`, `step(message)`, `propose(data)`, `request(request_id, data)`, `read_index(context)`,
`propose_conf_change(op, node)`, `transfer_leadership(to)` and `compact(index, data)`. Outputs are
collected in a `Ready` (see `ready()`), which the caller handles in this order:

    1. persist `hard_state`, `entries` and `snapshot`, and fsync them,
    2. only then send `messages` (a vote or an acknowledgement must never outrun the disk),
    3. restore the state machine from `restore` if set, then apply `committed` in order.

Two refinements the caller may use, both marked on the Ready by this core (the rules live here):
`send_before_persist` says steps 1 and 2 may overlap: a leader whose term and vote did not change
sends its appends while it writes its own copy (Ongaro's thesis §10.2.1; the leader counts itself
toward a commit only for what it has persisted, and the single-threaded caller handles no reply
before step 1 returns). `durable_hard_state` is False when only the commit index moved: that index
is volatile state in Raft (Figure 2), so it may be written without an fsync of its own.
A caller may also apply before sending (3 before 2) when the Ready holds no entries and no snapshot:
everything it commits was persisted by an earlier Ready, and the messages only wait a little longer
(node/daemon.py does so, so that what applying produces rides with them).

Time is ticks and randomness comes from the injected `random.Random`, so the same inputs always give
the same outputs; that is what lets the simulator replay a failing seed exactly. This module never
reads a clock, opens a file or touches a socket.

Two modes share this code. `stable` keeps a long-lived leader (pre-vote, check-quorum, leader lease).
`on-demand` is the consensus-orchestration paper's protocol: no leader while idle (the pause phase);
the node that receives a request stands for election, votes carry the voter's load, the winner
decides where the request runs (least-loaded node), commits that decision and pauses again.
"""

from __future__ import annotations

import enum
import math
import random
from dataclasses import dataclass, field

from tomq import canonical
from tomq.errors import TomqError, UsageError
from tomq.node.raft import quorum
from tomq.node.raft.log import RaftLog
from tomq.node.raft.messages import Message, MessageType
from tomq.node.raft.types import Entry, EntryKind, HardState, Snapshot

STABLE = "stable"
ON_DEMAND = "on-demand"
MAX_DECIDED_IDS = 100_000  # request ids remembered for de-duplication of re-forwarded requests


class ProposalDropped(TomqError):
    """The proposal or read could not be taken now (no leader, transfer under way); retry later."""


class Role(enum.Enum):
    FOLLOWER = "follower"
    PRE_CANDIDATE = "pre-candidate"
    CANDIDATE = "candidate"
    LEADER = "leader"


@dataclass(frozen=True, slots=True)
class RaftConfig:
    id: str
    voters: tuple[str, ...]  # the bootstrap configuration; later ones come from the log
    mode: str = STABLE
    election_ticks: int = 10
    heartbeat_ticks: int = 1
    pre_vote: bool = True
    check_quorum: bool = True
    max_append_entries: int = 64

    def __post_init__(self) -> None:
        if self.mode not in (STABLE, ON_DEMAND):
            raise UsageError(f"raft mode {self.mode!r} is not {STABLE!r} or {ON_DEMAND!r}")
        if self.heartbeat_ticks < 1 or self.election_ticks <= self.heartbeat_ticks:
            raise UsageError("raft needs 1 <= heartbeat_ticks < election_ticks")


@dataclass(frozen=True, slots=True)
class ReadState:
    """Reads with this context are linearizable once the state machine has applied `index`."""

    index: int
    context: bytes


@dataclass(frozen=True, slots=True)
class PhaseEvent:
    """Something the adapter timestamps with its own clock, for the paper's per-phase figures."""

    phase: str  # request, campaign, vote, elected, chosen, appended, committed, pause
    detail: str = ""
    request: bytes = b""


@dataclass(slots=True)
class Ready:
    hard_state: HardState | None = None
    entries: list[Entry] = field(default_factory=list)
    snapshot: Snapshot | None = None
    restore: Snapshot | None = None
    messages: list[Message] = field(default_factory=list)
    committed: list[Entry] = field(default_factory=list)
    read_states: list[ReadState] = field(default_factory=list)
    events: list[PhaseEvent] = field(default_factory=list)
    send_before_persist: bool = False  # see the module docstring: a leader's appends need not wait
    durable_hard_state: bool = True  # False when only `hard_state.commit` changed: no fsync needed

    def __bool__(self) -> bool:
        return bool(self.hard_state or self.entries or self.snapshot or self.messages or self.committed
                    or self.read_states or self.events)


@dataclass(frozen=True, slots=True)
class Decision:
    """A committed placement: where request `request_id` runs and why."""

    request_id: bytes
    request: bytes
    chosen: str
    loads: dict[str, float]
    leader: str
    term: int

    def encode(self) -> bytes:
        return canonical.encode({"id": self.request_id, "request": self.request, "chosen": self.chosen,
                                 "loads": self.loads, "leader": self.leader, "term": self.term})

    @staticmethod
    def decode(data: bytes) -> Decision:
        raw = canonical.decode(data, check_canonical=False)
        return Decision(raw["id"], raw["request"], raw["chosen"], dict(raw["loads"]), raw["leader"], raw["term"])


def least_loaded_node(loads: dict[str, float]) -> str:
    """The node with the lowest load; ties go to the smallest id, so every node would choose the same."""
    return min(loads.items(), key=lambda item: (_finite_load(item[1]), item[0]))[0]


def _finite_load(load: float) -> float:
    # NaN would make the choice depend on dict order; an unknown or absurd load counts as fully busy.
    value = float(load)
    return value if math.isfinite(value) and value >= 0 else math.inf


def encode_conf_change(op: str, node: str) -> bytes:
    return canonical.encode({"op": op, "node": node})


def encode_bootstrap(voters: tuple[str, ...]) -> bytes:
    return canonical.encode({"op": "bootstrap", "voters": sorted(voters)})


def decode_conf_change(data: bytes) -> tuple[str, tuple[str, ...]]:
    """(op, nodes): ("add", (n,)), ("remove", (n,)) or ("bootstrap", voters)."""
    raw = canonical.decode(data, check_canonical=False)
    if raw["op"] == "bootstrap":
        return "bootstrap", tuple(raw["voters"])
    return raw["op"], (raw["node"],)


class _ProgressState(enum.Enum):
    PROBE = 1  # one append in flight until the follower answers: we do not know where its log ends
    REPLICATE = 2  # pipelining: send everything after `next` optimistically
    SNAPSHOT = 3  # a snapshot is in flight; wait for its answer


@dataclass(slots=True)
class _Progress:
    match: int = 0
    next: int = 1
    state: _ProgressState = _ProgressState.PROBE
    paused: bool = False  # PROBE: an append is in flight
    recent_active: bool = True
    snapshot_ticks: int = 0  # SNAPSHOT: ticks since it was sent; resent if no answer in an election timeout


@dataclass(slots=True)
class _PendingRead:
    seq: int
    index: int
    context: bytes
    origin: str
    acks: set[str]


class RaftNode:
    def __init__(
        self,
        config: RaftConfig,
        rng: random.Random,
        *,
        hard_state: HardState | None = None,
        snapshot: Snapshot | None = None,
        entries: list[Entry] | None = None,
    ) -> None:
        hard_state = hard_state or HardState()
        self.config = config
        self.id = config.id
        self.rng = rng
        self.log = RaftLog(snapshot, entries, hard_state.commit)
        self.term = hard_state.term
        self.vote = hard_state.vote
        if hard_state == HardState() and snapshot is None and not entries and config.voters:
            # A brand-new member of the initial cluster writes the bootstrap configuration as entry 1,
            # identical on every initial node, so a node added later learns the voters from the log.
            self.log.append([Entry(1, 1, EntryKind.CONFIG, encode_bootstrap(config.voters))])
            self.log.commit_to(1)
            self.term = 1
        self.role = Role.FOLLOWER
        self.leader: str | None = None
        self._base_voters: tuple[str, ...] = snapshot.meta.voters if snapshot else ()
        self._conf_entries: list[tuple[int, str, tuple[str, ...]]] = []
        for entry in self.log.entries:
            self._note_conf_entry(entry)
        self.voters: frozenset[str] = self._compute_voters()
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        self._timeout = self._random_timeout()
        self.progress: dict[str, _Progress] = {}
        self.votes: dict[str, bool] = {}
        self._rejecter_logs: dict[str, tuple[int, int]] = {}
        self._awaiting_loads = False
        self._first_broadcast_due = False  # a new leader's first appends wait for the next ready()
        self._forward_elapsed = 0
        self.loads: dict[str, float] = {}
        self.load = 0.0
        self.transfer_target: str | None = None
        self.pending_conf_index = 0
        self._read_seq = 0
        self._reads: list[_PendingRead] = []
        self.requests: dict[bytes, bytes] = {}  # requests received here and not yet decided
        self._leader_queue: dict[bytes, bytes] = {}  # requests this leader still has to decide
        # Ordered set of request ids decided by committed entries; carried in snapshots.
        self._decided: dict[bytes, None] = dict.fromkeys(snapshot.meta.decided) if snapshot else {}
        self._in_log: set[bytes] = set()  # leader only: request ids decided by entries in its log
        self._pause_wait = 0
        # On-demand: the state machine above us still has work that needs a leader (records to batch,
        # a certificate to commit, a placement to plan): do not pause yet. See `hold()`.
        self.held = False
        self._msgs: list[Message] = []
        self._read_states: list[ReadState] = []
        self._events: list[PhaseEvent] = []
        self._snapshot_to_save: Snapshot | None = None
        self._restore: Snapshot | None = None
        self._saved_hard_state = hard_state

    # ----------------------------------------------------------------- inputs

    def tick(self) -> None:
        if self.role is Role.LEADER:
            self._tick_leader()
        else:
            self._tick_election()

    def step(self, m: Message) -> None:
        if m.to != self.id:
            return
        if m.type in (MessageType.PROPOSE, MessageType.READ_INDEX):
            self._step_forwarded(m)  # termless: forwarded client work, valid in any term
            return
        if m.term > self.term:
            if m.type in (MessageType.PRE_VOTE, MessageType.VOTE) and self._in_lease() and not m.force:
                return  # leader stickiness: a node that cannot see the leader must not depose it
            if m.type is MessageType.PRE_VOTE or (m.type is MessageType.PRE_VOTE_RESP and not m.reject):
                pass  # pre-votes never change our term (Raft thesis §9.6)
            elif m.type in (MessageType.APPEND, MessageType.HEARTBEAT, MessageType.SNAPSHOT, MessageType.PAUSE):
                self._become_follower(m.term, m.from_)
            else:
                self._become_follower(m.term, None)
        elif m.term < self.term:
            if m.type in (MessageType.APPEND, MessageType.HEARTBEAT, MessageType.SNAPSHOT):
                # A deposed leader on the far side of a healed partition: tell it our term so it steps
                # down. Index 0 carries no acknowledgement: the same node may lead our term by the time
                # this arrives, and must not take it as a match.
                self._send(MessageType.APPEND_RESP, m.from_, index=0)
            elif m.type in (MessageType.PRE_VOTE, MessageType.VOTE):
                # Refuse with our term (Raft §5.1), or a stale candidate with no leader around to
                # correct it (on-demand pause) would campaign in old terms forever.
                kind = MessageType.PRE_VOTE_RESP if m.type is MessageType.PRE_VOTE else MessageType.VOTE_RESP
                self._send(kind, m.from_, reject=True, load=self.load, index=self.log.last_index(),
                           log_term=self.log.last_term())
            return
        handler = {
            MessageType.PRE_VOTE: self._handle_vote_request,
            MessageType.VOTE: self._handle_vote_request,
            MessageType.PRE_VOTE_RESP: self._handle_vote_response,
            MessageType.VOTE_RESP: self._handle_vote_response,
            MessageType.APPEND: self._handle_append,
            MessageType.HEARTBEAT: self._handle_heartbeat,
            MessageType.SNAPSHOT: self._handle_snapshot,
            MessageType.APPEND_RESP: self._handle_append_response,
            MessageType.HEARTBEAT_RESP: self._handle_heartbeat_response,
            MessageType.READ_INDEX_RESP: self._handle_read_index_response,
            MessageType.TIMEOUT_NOW: self._handle_timeout_now,
            MessageType.PAUSE: self._handle_pause,
        }[m.type]
        handler(m)

    def propose(self, data: bytes) -> None:
        """Replicate `data` as one log entry. Followers forward to the leader; without one, raise."""
        if self.role is Role.LEADER:
            if self.transfer_target is not None:
                raise ProposalDropped(f"{self.id} is handing leadership to {self.transfer_target}; retry")
            self._append([(EntryKind.NORMAL, data)])
        elif self.leader is not None:
            self._send(MessageType.PROPOSE, self.leader, data=data, term=0)
        else:
            raise ProposalDropped(f"{self.id} knows no leader in term {self.term}; retry")

    def request(self, request_id: bytes, data: bytes) -> None:
        """A placement request received at this node; it is decided exactly once, cluster-wide."""
        if not request_id:
            raise UsageError("a placement request needs a non-empty request id")
        if request_id in self._decided or (self.role is Role.LEADER and request_id in self._in_log):
            return
        self._events.append(PhaseEvent("request", self.id, request_id))
        if self.role is Role.LEADER:
            self._leader_queue[request_id] = data
            if not self._awaiting_loads:
                self._decide_queued()
            return
        self.requests[request_id] = data
        if self.leader is not None:
            self._send(MessageType.PROPOSE, self.leader, data=data, context=request_id, term=0)
        elif self.config.mode == ON_DEMAND:
            self._hup()  # the paper: the node that receives a request stands for election
        # stable mode without a leader: the request waits in self.requests and is forwarded once one is known

    def hold(self, held: bool) -> None:
        """On-demand mode: while held, a leader does not pause. The state machine behind the log calls
        this with True while it has work only a leader can finish (entries it will propose once it has
        applied what just committed), and with False when done; the next tick may then pause."""
        self.held = held

    def read_index(self, context: bytes) -> None:
        """Ask for a linearizable read; a ReadState with this context appears in a later Ready."""
        if self.role is Role.LEADER:
            self._start_read(context, self.id)
        elif self.leader is not None:
            self._send(MessageType.READ_INDEX, self.leader, context=context, term=0)
        else:
            raise ProposalDropped(f"{self.id} knows no leader for a read; retry")

    def propose_conf_change(self, op: str, node: str) -> None:
        """Add or remove one voter. Only the leader takes it, and only one may be pending."""
        if self.role is not Role.LEADER:
            raise ProposalDropped(f"membership changes go to the leader ({self.leader or 'unknown'}), not {self.id}")
        if op not in ("add", "remove"):
            raise UsageError(f"membership change {op!r} is not add or remove")
        if self.pending_conf_index > self.log.applied:
            raise ProposalDropped("a membership change is already in progress; one voter at a time")
        if op == "add" and node in self.voters:
            raise UsageError(f"{node} is already a voter")
        if op == "remove" and (node not in self.voters or len(self.voters) == 1):
            raise UsageError(f"cannot remove {node}: not a voter, or the last one")
        self._append([(EntryKind.CONFIG, encode_conf_change(op, node))])
        self.pending_conf_index = self.log.last_index()

    def transfer_leadership(self, to: str) -> None:
        if self.role is not Role.LEADER:
            raise ProposalDropped(f"only the leader can transfer leadership; {self.id} is {self.role.value}")
        if to == self.id or to not in self.voters:
            raise UsageError(f"cannot transfer leadership to {to}: not another voter")
        self.transfer_target = to
        self.election_elapsed = 0
        if self.progress[to].match == self.log.last_index():
            self._send(MessageType.TIMEOUT_NOW, to)
        else:
            self._send_append(to)

    def campaign(self) -> None:
        """Stand for election now, skipping pre-vote and voters' leader lease (as leadership transfer does).

        For operators forcing a hand-over and for scenario tests; normal elections come from ticks.
        """
        self._hup(transfer=True)

    def set_load(self, load: float) -> None:
        """This node's current load (from its monitor); carried in votes and append answers."""
        self.load = _finite_load(load)

    def observe_load(self, node: str, load: float) -> None:
        """A load report heard outside Raft (node/<id>/load); used when deciding placements."""
        self.loads[node] = _finite_load(load)

    def compact(self, index: int, data: bytes) -> Snapshot:
        """The application's state at `index` (<= applied) replaces the log up to there."""
        voters = self._voters_at(index)
        snapshot = self.log.compact(index, data, voters, tuple(self._decided))
        self._base_voters = voters
        self._conf_entries = [c for c in self._conf_entries if c[0] > index]
        self._snapshot_to_save = snapshot
        return snapshot

    # ---------------------------------------------------------------- outputs

    def pending_events(self) -> list[PhaseEvent]:
        """The phase events the next `ready()` will carry, for a caller that acts before handling it
        (a leader that plans in the same turn it was elected)."""
        return list(self._events)

    def has_ready(self) -> bool:
        return bool(self._msgs or self._read_states or self._events or self._snapshot_to_save or self._first_broadcast_due
                    or self.log.unstable_entries() or self.log.to_apply() or self._hard_state_changed())

    def ready(self) -> Ready:
        """Everything to persist, send and apply since the last call (see the module docstring)."""
        if self._first_broadcast_due:
            if self.role is Role.LEADER:
                self._broadcast_append()
            self._first_broadcast_due = False
        ready = Ready()
        before = self._saved_hard_state
        if self._hard_state_changed():
            ready.hard_state = self._saved_hard_state = HardState(self.term, self.vote, self.log.committed)
            ready.durable_hard_state = (before.term, before.vote) != (self.term, self.vote)
        # Only a leader in an unchanged term may send first: a vote or an acknowledgement from any
        # other role promises that something is already on disk.
        ready.send_before_persist = self.role is Role.LEADER and (ready.hard_state is None
                                                                  or not ready.durable_hard_state)
        ready.snapshot, self._snapshot_to_save = self._snapshot_to_save, None
        ready.restore, self._restore = self._restore, None
        ready.entries = self.log.unstable_entries()
        self.log.stable = self.log.last_index()
        ready.committed = self.log.to_apply()
        if ready.committed:
            self.log.applied = ready.committed[-1].index
            self._on_applied(ready.committed)
        ready.messages, self._msgs = self._msgs, []
        ready.read_states, self._read_states = self._read_states, []
        ready.events, self._events = self._events, []
        return ready

    def status(self) -> dict[str, object]:
        return {
            "id": self.id, "role": self.role.value, "term": self.term, "leader": self.leader,
            "commit": self.log.committed, "applied": self.log.applied, "last_index": self.log.last_index(),
            "voters": sorted(self.voters), "mode": self.config.mode,
            "progress": {p: {"match": pr.match, "next": pr.next} for p, pr in sorted(self.progress.items())},
        }

    # --------------------------------------------------------------- elections

    def _promotable(self) -> bool:
        return self.id in self.voters

    def _in_lease(self) -> bool:
        return (self.config.check_quorum and self.leader is not None and self.leader != self.id
                and self.election_elapsed < self.config.election_ticks)

    def _random_timeout(self) -> int:
        return self.config.election_ticks + self.rng.randrange(self.config.election_ticks)

    def _tick_election(self) -> None:
        self.election_elapsed += 1
        self._forward_elapsed += 1
        if self.requests and self.leader is not None and self._forward_elapsed >= self.config.election_ticks:
            self._forward_pending()  # the forwarded copy may have been lost; the leader de-duplicates
        if self.config.mode == ON_DEMAND and not self.requests:
            # Pause phase: with nothing to decide, nobody campaigns and nobody needs a leader.
            if self.leader is not None and self.election_elapsed >= self._timeout:
                self.leader = None
            return
        if self.election_elapsed >= self._timeout:
            self.election_elapsed = 0
            self._timeout = self._random_timeout()
            if self._promotable():
                self._hup()
            elif self.requests and self.voters:
                # We may not stand (removed, or not yet added), but our requests must not wait on us.
                peer = self.rng.choice(sorted(self.voters))
                for request_id, data in self.requests.items():
                    self._send(MessageType.PROPOSE, peer, data=data, context=request_id, term=0)

    def _hup(self, transfer: bool = False) -> None:
        if self.role is Role.LEADER or not self._promotable():
            return
        if self.config.pre_vote and not transfer and self.config.mode == STABLE:
            self._campaign(pre_vote=True)
        else:
            # On-demand campaigns skip pre-vote: there is no leader to protect, and the extra round
            # trip would double the paper's election phase.
            self._campaign(pre_vote=False, transfer=transfer)

    def _campaign(self, *, pre_vote: bool, transfer: bool = False) -> None:
        self.leader = None
        self.votes = {self.id: True}
        self._rejecter_logs = {}
        self.loads[self.id] = self.load
        self.election_elapsed = 0
        self._timeout = self._random_timeout()
        if pre_vote:
            self.role = Role.PRE_CANDIDATE
            term = self.term + 1
            kind = MessageType.PRE_VOTE
        else:
            self.role = Role.CANDIDATE
            self.term += 1
            self.vote = self.id
            term = self.term
            kind = MessageType.VOTE
            self._events.append(PhaseEvent("campaign", str(term)))
        if quorum.vote_won(self.voters, [self.id]):
            self._won(pre_vote)
            return
        for peer in sorted(self.voters - {self.id}):
            self._send(kind, peer, term=term, index=self.log.last_index(), log_term=self.log.last_term(),
                       force=transfer)

    def _won(self, pre_vote: bool) -> None:
        if pre_vote:
            self._campaign(pre_vote=False)
        else:
            self._become_leader()

    def _handle_vote_request(self, m: Message) -> None:
        pre = m.type is MessageType.PRE_VOTE
        can_vote = (
            self.vote == m.from_
            or (self.vote is None and self.leader is None)
            or (pre and m.term > self.term)
        )
        response = MessageType.PRE_VOTE_RESP if pre else MessageType.VOTE_RESP
        load = self.load
        if can_vote and self.log.is_up_to_date(m.index, m.log_term):
            self._send(response, m.from_, term=m.term, load=load)
            if not pre:
                self.vote = m.from_
                self.election_elapsed = 0
        else:
            # Say how far our log goes: an on-demand candidate that cannot win hands its requests to us.
            self._send(response, m.from_, reject=True, load=load, index=self.log.last_index(),
                       log_term=self.log.last_term())

    def _handle_vote_response(self, m: Message) -> None:
        pre = m.type is MessageType.PRE_VOTE_RESP
        if self.role is Role.LEADER and not pre and self._awaiting_loads:
            # A vote that arrives after we won still brings its voter's load (the paper's leader
            # chooses once "all the states are received").
            if m.load is not None:
                self.loads[m.from_] = _finite_load(m.load)
            self.votes[m.from_] = not m.reject
            if self.voters <= self.votes.keys():
                self._awaiting_loads = False
                self._decide_queued()
            return
        if (pre and self.role is not Role.PRE_CANDIDATE) or (not pre and self.role is not Role.CANDIDATE):
            return
        if m.load is not None:
            self.loads[m.from_] = _finite_load(m.load)
        self.votes[m.from_] = not m.reject
        if m.reject:
            self._rejecter_logs[m.from_] = (m.log_term, m.index)
        if not pre:
            self._events.append(PhaseEvent("vote", f"{m.from_} {'no' if m.reject else 'yes'}"))
        granted = [p for p, ok in self.votes.items() if ok]
        rejected = [p for p, ok in self.votes.items() if not ok]
        if quorum.vote_won(self.voters, granted):
            self._won(pre)
        elif quorum.vote_lost(self.voters, rejected):
            self._become_follower(self.term, None)
            self._hand_over_requests()

    def _hand_over_requests(self) -> None:
        """On-demand: a candidate whose log is behind can never win, and idle nodes never campaign.

        So it passes its requests to the most up-to-date node that refused it; that node then stands
        for election itself (it is now "the node that received the request").
        """
        ours = (self.log.last_term(), self.log.last_index())
        ahead = [(log, peer) for peer, log in self._rejecter_logs.items() if log > ours]
        if self.config.mode != ON_DEMAND or not self.requests or not ahead:
            return
        _, peer = max(ahead)
        for request_id, data in self.requests.items():
            self._send(MessageType.PROPOSE, peer, data=data, context=request_id, term=0)

    def _handle_timeout_now(self, m: Message) -> None:
        if self._promotable():
            self._hup(transfer=True)

    def _become_follower(self, term: int, leader: str | None) -> None:
        if term > self.term:
            self.term = term
            self.vote = None
        was_leader = self.role is Role.LEADER
        self.role = Role.FOLLOWER
        self.leader = leader
        self.election_elapsed = 0
        self._timeout = self._random_timeout()
        self.transfer_target = None
        self.votes = {}
        self._awaiting_loads = False
        if was_leader:
            # Requests we had not yet committed go back to whoever asked; they will re-send them.
            self._leader_queue.clear()
            self._reads.clear()
        if leader is not None:
            self._forward_pending()

    def _become_leader(self) -> None:
        self.role = Role.LEADER
        self.leader = self.id
        self.transfer_target = None
        self.heartbeat_elapsed = 0
        self.election_elapsed = 0
        self._pause_wait = 0
        self.progress = {p: _Progress(next=self.log.last_index() + 1) for p in self.voters}
        self._events.append(PhaseEvent("elected", str(self.term)))
        # A leader may not change membership until it has committed an entry of its own term
        # (Ongaro, "bug in single-server membership changes", 2015).
        self.pending_conf_index = self.log.last_index() + 1
        # Decisions in our log that are not yet applied will commit with our no-op: never decide twice.
        self._in_log = {Decision.decode(e.data).request_id for e in self.log.slice(self.log.applied + 1,
                        self.log.last_index() + 1) if e.kind is EntryKind.DECISION}
        for request_id, data in self.requests.items():
            self._leader_queue.setdefault(request_id, data)
        self.requests.clear()
        self._append([(EntryKind.NOOP, b"")], broadcast=False)
        # On-demand: wait (at most a heartbeat interval) for the votes still on their way, so the
        # choice is made with every voter's current load, not just the first majority's.
        self._awaiting_loads = self.config.mode == ON_DEMAND and not self.voters <= self.votes.keys()
        if not self._awaiting_loads:
            self._decide_queued(broadcast=False)
        # The first appends (the no-op) leave with the next ready(), not now: what the caller proposes
        # in between (the on-demand placement that triggered this election) rides in the same append.
        # Sent now, the followers would each be probed with the no-op alone, and the next entry
        # would wait for that answer: two replication round trips instead of one.
        self._first_broadcast_due = True

    # ------------------------------------------------------------- replication

    def _append(self, items: list[tuple[EntryKind, bytes]], broadcast: bool = True) -> None:
        index = self.log.last_index()
        entries = [Entry(self.term, index + i + 1, kind, data) for i, (kind, data) in enumerate(items)]
        self.log.append(entries)
        for entry in entries:
            self._note_conf_entry(entry)
        self._voters_changed()
        self.progress[self.id].match = self.log.last_index() if self.id in self.progress else 0
        if self.id in self.progress:
            self.progress[self.id].next = self.log.last_index() + 1
        self._maybe_commit()
        if broadcast:
            self._broadcast_append()

    def _decide_queued(self, broadcast: bool = True) -> None:
        items: list[tuple[EntryKind, bytes]] = []
        for request_id, data in list(self._leader_queue.items()):
            if request_id in self._decided or request_id in self._in_log:
                del self._leader_queue[request_id]
                continue
            loads = {n: load for n, load in self.loads.items() if n in self.voters}
            loads[self.id] = self.load
            chosen = least_loaded_node(loads)
            decision = Decision(request_id, data, chosen, loads, self.id, self.term)
            self._events.append(PhaseEvent("chosen", chosen, request_id))
            items.append((EntryKind.DECISION, decision.encode()))
            self._in_log.add(request_id)
            del self._leader_queue[request_id]
        if items:
            for _, data in items:
                self._events.append(PhaseEvent("appended", "", Decision.decode(data).request_id))
            self._append(items, broadcast=broadcast)
        self._trim_decided()

    def _broadcast_append(self) -> None:
        self._first_broadcast_due = False
        for peer in sorted(self.progress):
            if peer != self.id:
                self._send_append(peer)

    def _send_append(self, peer: str) -> None:
        pr = self.progress[peer]
        if pr.state is _ProgressState.SNAPSHOT or (pr.state is _ProgressState.PROBE and pr.paused):
            return
        prev = pr.next - 1
        prev_term = self.log.term(prev)
        if prev_term is None or pr.next <= self.log.snap_index:
            if self.log.snapshot is None:
                return  # cannot happen: compacted logs always keep their snapshot
            pr.state = _ProgressState.SNAPSHOT
            pr.snapshot_ticks = 0
            self._send(MessageType.SNAPSHOT, peer, snapshot=self.log.snapshot)
            return
        entries = tuple(self.log.slice(pr.next, min(self.log.last_index(), prev + self.config.max_append_entries) + 1))
        self._send(MessageType.APPEND, peer, index=prev, log_term=prev_term, entries=entries,
                   commit=self.log.committed)
        if entries:
            if pr.state is _ProgressState.REPLICATE:
                pr.next = entries[-1].index + 1
            else:
                pr.paused = True

    def _heard_from_leader(self, m: Message) -> None:
        self.election_elapsed = 0
        if self.role is not Role.FOLLOWER:
            self._become_follower(m.term, m.from_)
        elif self.leader != m.from_:
            self.leader = m.from_
            self._forward_pending()

    def _handle_append(self, m: Message) -> None:
        self._heard_from_leader(m)
        if m.index < self.log.committed:
            self._send(MessageType.APPEND_RESP, m.from_, index=self.log.committed, load=self.load)
            return
        if self.log.matches(m.index, m.log_term):
            conflict = self.log.find_conflict(m.entries)
            if conflict:
                new = [e for e in m.entries if e.index >= conflict]
                self._truncate_conf_entries(conflict)
                self.log.append(new)
                for entry in new:
                    self._note_conf_entry(entry)
                self._voters_changed()
            last_new = m.index + len(m.entries)
            self.log.commit_to(min(m.commit, last_new))
            self._send(MessageType.APPEND_RESP, m.from_, index=last_new, load=self.load)
        else:
            hint_index = self.log.last_index_of_term(m.log_term, min(m.index, self.log.last_index()))
            self._send(MessageType.APPEND_RESP, m.from_, index=m.index, reject=True, hint_index=hint_index,
                       hint_term=self.log.term(hint_index) or 0, load=self.load)

    def _handle_heartbeat(self, m: Message) -> None:
        self._heard_from_leader(m)
        # The leader sends min(our match, its commit), so this never commits past what we hold.
        self.log.commit_to(min(m.commit, self.log.last_index()))
        self._send(MessageType.HEARTBEAT_RESP, m.from_, read_seq=m.read_seq, load=self.load)

    def _handle_snapshot(self, m: Message) -> None:
        self._heard_from_leader(m)
        snapshot = m.snapshot
        assert snapshot is not None
        meta = snapshot.meta
        if meta.index <= self.log.committed:
            self._send(MessageType.APPEND_RESP, m.from_, index=self.log.committed, load=self.load)
            return
        if self.log.matches(meta.index, meta.term):
            self.log.commit_to(meta.index)  # we already hold everything it covers
        else:
            self.log.restore(snapshot)
            self._decided.update(dict.fromkeys(meta.decided))
            self._trim_decided()
            self._base_voters = meta.voters
            self._conf_entries = [c for c in self._conf_entries if c[0] > meta.index and
                                  self.log.last_index() >= c[0]]
            self._voters_changed()
            self._snapshot_to_save = snapshot
            self._restore = snapshot
        self._send(MessageType.APPEND_RESP, m.from_, index=meta.index, load=self.load)

    def _handle_append_response(self, m: Message) -> None:
        if self.role is not Role.LEADER or m.from_ not in self.progress:
            return
        if m.index == 0 and not m.reject:
            return  # only a term notice (see step); never an acknowledgement
        pr = self.progress[m.from_]
        pr.recent_active = True
        if m.load is not None:
            self.loads[m.from_] = _finite_load(m.load)
        if m.reject:
            if m.index < pr.match:
                return  # stale rejection
            probe = self.log.last_index_of_term(m.hint_term, m.hint_index) if m.hint_term else m.hint_index
            pr.next = max(pr.match + 1, min(m.index, probe + 1))
            pr.state = _ProgressState.PROBE
            pr.paused = False
            self._send_append(m.from_)
            return
        was_paused = pr.paused
        if m.index > pr.match:
            pr.match = m.index
            pr.next = max(pr.next, m.index + 1)
            pr.state = _ProgressState.REPLICATE
            pr.paused = False
            # Followers learn a new commit index from the next append or heartbeat (a tick at most);
            # telling them at once cost every record two more messages each way, whose handling
            # (and the followers' applying) competed for the cores with the next record's commit.
            # On-demand leaders may go quiet instead of heartbeating, so they still tell at once.
            if self._maybe_commit() and self.config.mode == ON_DEMAND:
                self._broadcast_append()
        elif pr.state is _ProgressState.SNAPSHOT or was_paused:
            pr.state = _ProgressState.PROBE
            pr.next = max(pr.match + 1, m.index + 1) if m.index >= pr.match else pr.next
            pr.paused = False
        if pr.state is _ProgressState.SNAPSHOT:
            pr.state = _ProgressState.PROBE
        if pr.match < self.log.last_index() and pr.next <= self.log.last_index():
            self._send_append(m.from_)
        if self.transfer_target == m.from_ and pr.match == self.log.last_index():
            self._send(MessageType.TIMEOUT_NOW, m.from_)

    def _handle_heartbeat_response(self, m: Message) -> None:
        if self.role is not Role.LEADER or m.from_ not in self.progress:
            return
        pr = self.progress[m.from_]
        pr.recent_active = True
        if m.load is not None:
            self.loads[m.from_] = _finite_load(m.load)
        if pr.state is _ProgressState.PROBE:
            pr.paused = False
        if pr.match < self.log.last_index():
            self._send_append(m.from_)
        if m.read_seq:
            self._ack_reads(m.from_, m.read_seq)

    def _maybe_commit(self) -> bool:
        match = {p: pr.match for p, pr in self.progress.items()}
        index = quorum.committed_index(self.voters, match)
        # Raft §5.4.2: count replicas only for entries of the current term (figure 8).
        if index > self.log.committed and self.log.term(index) == self.term:
            newly = self.log.slice(self.log.committed + 1, index + 1)
            self.log.commit_to(index)
            for entry in newly:
                if entry.kind is EntryKind.DECISION:
                    self._events.append(PhaseEvent("committed", "", Decision.decode(entry.data).request_id))
            return True
        return False

    def _tick_leader(self) -> None:
        self.heartbeat_elapsed += 1
        self.election_elapsed += 1
        if self._awaiting_loads and self.heartbeat_elapsed >= self.config.heartbeat_ticks:
            self._awaiting_loads = False  # a voter that has not answered by now is down or cut off
            self._decide_queued()
        if self.election_elapsed >= self.config.election_ticks:
            self.election_elapsed = 0
            if self.config.check_quorum:
                active = [p for p, pr in self.progress.items() if pr.recent_active or p == self.id]
                if not quorum.vote_won(self.voters, active):
                    self._become_follower(self.term, None)  # check-quorum: we cannot see a majority
                    return
                for peer, pr in self.progress.items():
                    pr.recent_active = peer == self.id
            if self.transfer_target is not None:
                self.transfer_target = None  # the transfer did not finish within an election timeout
        for pr in self.progress.values():
            if pr.state is _ProgressState.SNAPSHOT:
                pr.snapshot_ticks += 1
                if pr.snapshot_ticks >= self.config.election_ticks:
                    pr.state, pr.paused = _ProgressState.PROBE, False  # the snapshot was lost: probe again
        if self.heartbeat_elapsed >= self.config.heartbeat_ticks:
            self.heartbeat_elapsed = 0
            self._broadcast_heartbeat()
        self._maybe_pause()

    def announce_commit(self) -> None:
        """Leader: tell every follower the commit index now, not with the next append or heartbeat.

        Followers learn it lazily on purpose (see `_handle_append_response`); a caller that needs the
        followers to act on a commit soon (sign a block whose certificate an actuator command waits
        for) asks for one heartbeat round now. Resets nothing: the regular heartbeats keep their beat.
        """
        if self.role is Role.LEADER:
            self._broadcast_heartbeat()

    def _broadcast_heartbeat(self, read_seq: int = 0) -> None:
        read_seq = read_seq or (self._reads[-1].seq if self._reads else 0)
        for peer in sorted(self.progress):
            if peer != self.id:
                pr = self.progress[peer]
                self._send(MessageType.HEARTBEAT, peer, commit=min(pr.match, self.log.committed), read_seq=read_seq)

    # ------------------------------------------------------ on-demand pausing

    def _maybe_pause(self) -> None:
        if self.config.mode != ON_DEMAND or self.role is not Role.LEADER:
            return
        if (self._leader_queue or self.requests or self._reads or self.transfer_target is not None
                or self._awaiting_loads or self.held):
            return
        if self.log.applied < self.log.last_index():
            return
        others = [pr for p, pr in self.progress.items() if p != self.id]
        self._pause_wait += 1
        if any(pr.match < self.log.last_index() for pr in others) and self._pause_wait < self.config.election_ticks:
            return  # give lagging followers the final commit index before going quiet
        for peer in sorted(p for p in self.progress if p != self.id):
            pr = self.progress[peer]
            self._send(MessageType.PAUSE, peer, commit=min(pr.match, self.log.committed))
        self._events.append(PhaseEvent("pause", str(self.term)))
        self._become_follower(self.term, None)

    def _handle_pause(self, m: Message) -> None:
        self.log.commit_to(min(m.commit, self.log.last_index()))
        if self.leader in (m.from_, None):
            self.leader = None
            if self.role is not Role.FOLLOWER:
                self._become_follower(self.term, None)
            # Requests that missed the leader campaign soon, at a random moment to avoid split votes.
            self.election_elapsed = max(0, self._timeout - 1 - self.rng.randrange(self.config.election_ticks // 2 + 1))

    # ----------------------------------------------------- forwarded requests

    def _step_forwarded(self, m: Message) -> None:
        if m.type is MessageType.READ_INDEX:
            if self.role is Role.LEADER:
                try:
                    self._start_read(m.context, m.from_)
                except ProposalDropped:
                    pass  # the follower's read times out and is retried
            return
        if m.context:  # a placement request
            if self.role is Role.LEADER:
                if m.context not in self._decided and m.context not in self._in_log:
                    self._leader_queue[m.context] = m.data
                    if not self._awaiting_loads:
                        self._decide_queued()
            elif m.context not in self._decided:
                self.request(m.context, m.data)
            return
        if self.role is Role.LEADER and self.transfer_target is None:
            self._append([(EntryKind.NORMAL, m.data)])
        elif self.role is not Role.LEADER and self.leader is not None and self.leader != m.from_:
            self._send(MessageType.PROPOSE, self.leader, data=m.data, term=0)
        # otherwise dropped: the proposer learns nothing committed and retries

    def _forward_pending(self) -> None:
        self._forward_elapsed = 0
        if self.leader is None or self.leader == self.id:
            return
        for request_id, data in self.requests.items():
            self._send(MessageType.PROPOSE, self.leader, data=data, context=request_id, term=0)

    def _on_applied(self, entries: list[Entry]) -> None:
        for entry in entries:
            if entry.kind is EntryKind.DECISION:
                request_id = Decision.decode(entry.data).request_id
                self._decided[request_id] = None
                self.requests.pop(request_id, None)
                self._leader_queue.pop(request_id, None)
            elif entry.kind is EntryKind.CONFIG and self.role is Role.LEADER and self.id not in self.voters:
                # Our own removal is committed: stop leading so the remaining voters elect a leader.
                self._become_follower(self.term, None)
        self._trim_decided()
        self._maybe_pause()

    def _trim_decided(self) -> None:
        while len(self._decided) > MAX_DECIDED_IDS:
            del self._decided[next(iter(self._decided))]

    # ------------------------------------------------------------ read index

    def _start_read(self, context: bytes, origin: str) -> None:
        if self.log.term(self.log.committed) != self.term:
            raise ProposalDropped(f"leader {self.id} has not committed an entry in term {self.term} yet; retry")
        if quorum.vote_won(self.voters, [self.id]):
            self._release_read(_PendingRead(0, self.log.committed, context, origin, {self.id}))
            return
        self._read_seq += 1
        self._reads.append(_PendingRead(self._read_seq, self.log.committed, context, origin, {self.id}))
        self._broadcast_heartbeat(self._read_seq)

    def _ack_reads(self, peer: str, read_seq: int) -> None:
        # A heartbeat answered for round s confirms our leadership for every read registered up to s.
        done = 0
        for read in self._reads:
            if read.seq > read_seq:
                break
            read.acks.add(peer)
        for read in self._reads:
            if not quorum.vote_won(self.voters, read.acks):
                break
            self._release_read(read)
            done += 1
        del self._reads[:done]

    def _release_read(self, read: _PendingRead) -> None:
        if read.origin == self.id:
            self._read_states.append(ReadState(read.index, read.context))
        else:
            self._send(MessageType.READ_INDEX_RESP, read.origin, index=read.index, context=read.context)

    def _handle_read_index_response(self, m: Message) -> None:
        self._read_states.append(ReadState(m.index, m.context))

    # ------------------------------------------------------------ membership

    def _note_conf_entry(self, entry: Entry) -> None:
        if entry.kind is EntryKind.CONFIG:
            op, nodes = decode_conf_change(entry.data)
            self._conf_entries.append((entry.index, op, nodes))

    def _truncate_conf_entries(self, from_index: int) -> None:
        self._conf_entries = [c for c in self._conf_entries if c[0] < from_index]

    def _compute_voters(self, upto: int | None = None) -> frozenset[str]:
        voters = set(self._base_voters)
        for index, op, nodes in self._conf_entries:
            if upto is not None and index > upto:
                break
            if op == "bootstrap":
                voters = set(nodes)
            elif op == "add":
                voters.update(nodes)
            else:
                voters.difference_update(nodes)
        return frozenset(voters)

    def _voters_at(self, index: int) -> tuple[str, ...]:
        return tuple(sorted(self._compute_voters(index)))

    def _voters_changed(self) -> None:
        # The thesis's single-server changes take effect when appended, not when committed.
        voters = self._compute_voters()
        if voters == self.voters:
            return
        self.voters = voters
        if self.role is Role.LEADER:
            for peer in voters - self.progress.keys():
                self.progress[peer] = _Progress(next=self.log.last_index() + 1)
            for peer in self.progress.keys() - voters - {self.id}:
                del self.progress[peer]
            self._maybe_commit()

    # --------------------------------------------------------------- helpers

    def _hard_state_changed(self) -> bool:
        return self._saved_hard_state != HardState(self.term, self.vote, self.log.committed)

    def _send(self, kind: MessageType, to: str, *, term: int | None = None, **fields: object) -> None:
        self._msgs.append(Message(type=kind, to=to, from_=self.id, term=self.term if term is None else term,
                                  **fields))  # type: ignore[arg-type]
