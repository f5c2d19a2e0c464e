"""The trusted-orchestration pattern's state machine (Table II of seeds/trusted-orchestration-pattern.txt).

Every record on the ledger is one transition. Whether a record is *legal* depends only on the records
before it, so every node, and an auditor replaying the chain offline, reaches the same verdict with
the same message. This module is that verdict and nothing else: `apply(state, record, proposer)`
returns the next `PatternState` or raises `IllegalTransition` naming the event (the table row), the
object and the state it was in, e.g. "cannot leave-device car7: car7 has not joined".

Table II, read as the paper's BCOR-SM = [S, T, C, A, δ]: a trigger T (join/leave of a device,
container or datum) whose condition C holds (joined(device), joined(container), left(data)) makes the
orchestrator take action A and store a record in state S (PROV-ID-create, PROV-ID-delete, PROV-DATA,
PROV-ORCH). `TABLE` below is that table, one `Row` per trigger, extended where the paper leaves tomq
to decide: nodes, services and auditors join and leave like devices; a container joins attributed to
a joined node (DESIGN §2); placements and actuator commands are PROV-ORCH records whose location must
be a current member, and each command id is issued once. Every row also requires that the proposer is
the operator or a joined node, service or container, because devices and auditors do not propose
records (DESIGN §3 ACL).

Names: members are identified by their `IDENTITY.object` (a device's, node's or service's certificate
name, a container's id); the caller passes the proposer by its certificate name, or `OPERATOR`.

What this module must never do: I/O, read a clock, use randomness, check signatures or certificates
(verify.py does that), or depend on anything but the state and the record, since two nodes that
disagree on legality would fork the ledger.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from tomq.errors import PeerError
from tomq.records import DATA, ID_CREATE, ID_DELETE, ORCH, Identity, Orchestrate, Provenance, Record

# The operator proposes the genesis records. Its name cannot collide with a member's: names never
# contain "<" (tomq.records and tomq.topics both refuse it).
OPERATOR = "<operator>"

# Kinds whose members may propose records: the cluster's own processes, not devices or auditors.
PROPOSER_KINDS = ("node", "service", "container")


class IllegalTransition(PeerError):
    """A well-formed record that Table II does not allow in the current state."""

    def __init__(self, event: str, object: str, reason: str, proposer: str) -> None:
        super().__init__(f"cannot {event} {object}: {reason}")
        self.event = event
        self.object = object
        self.reason = reason
        self.proposer = proposer


@dataclass(frozen=True, slots=True)
class Member:
    """A joined identity: what it joined as and, for a container, the node it is attributed to."""

    kind: str
    attributed_to: str | None = None


class _History:
    """Every version of the state, append-only: per name, (version, membership) pairs; per datum, the
    version at which it left its source.

    Copying sets on every apply would make replaying a ledger quadratic in its length (one reading
    per second is 86 400 data ids a day). Instead all states of one line of history share this log
    and each `PatternState` reads it "as of" its own version, so old states never change.
    """

    __slots__ = ("issued", "left_data", "members", "version")

    def __init__(self) -> None:
        self.members: dict[str, list[tuple[int, Member | None]]] = {}
        self.left_data: dict[str, int] = {}
        self.issued: dict[str, int] = {}  # actuator command id -> version at which it was recorded
        self.version = 0

    def member_at(self, name: str, version: int) -> Member | None:
        entries = self.members.get(name)
        if not entries:
            return None
        if entries[-1][0] <= version:  # the common case: reading the newest state
            return entries[-1][1]
        index = bisect_right(entries, version, key=lambda entry: entry[0])
        return entries[index - 1][1] if index else None

    def left_at(self, data: str, version: int) -> bool:
        left = self.left_data.get(data)
        return left is not None and left <= version

    def issued_at(self, command: str, version: int) -> bool:
        issued = self.issued.get(command)
        return issued is not None and issued <= version

    def fork(self, version: int) -> _History:
        """A private copy of history up to `version`, for applying to a state that is not the newest."""
        copy = _History()
        for name, entries in self.members.items():
            kept = [entry for entry in entries if entry[0] <= version]
            if kept:
                copy.members[name] = kept
        copy.left_data = {data: at for data, at in self.left_data.items() if at <= version}
        copy.issued = {command: at for command, at in self.issued.items() if at <= version}
        copy.version = version
        return copy


class PatternState:
    """What the ledger says at one point: who has joined (and as what), and which data has left its source.

    Immutable: `apply` returns a new state and the old one keeps answering as before. Applying to the
    newest state of a history is O(1); applying to an older one first copies what it can see. Apply
    from one thread at a time (the node's apply loop, the verifier), as states share their history.
    """

    __slots__ = ("_history", "_version")

    def __init__(self) -> None:
        self._history = _History()
        self._version = 0

    @classmethod
    def _at(cls, history: _History, version: int) -> PatternState:
        state = cls.__new__(cls)
        state._history = history
        state._version = version
        return state

    @property
    def version(self) -> int:
        """How many records have been applied to reach this state."""
        return self._version

    def member(self, name: str) -> Member | None:
        return self._history.member_at(name, self._version)

    def joined(self, name: str) -> bool:
        return self.member(name) is not None

    def has_left(self, data: str) -> bool:
        return self._history.left_at(data, self._version)

    def members(self, kind: str | None = None) -> dict[str, Member]:
        """Every joined member (of `kind`, if given), sorted by name; a snapshot, not a view."""
        out: dict[str, Member] = {}
        for name in sorted(self._history.members):
            member = self.member(name)
            if member is not None and (kind is None or member.kind == kind):
                out[name] = member
        return out

    def has_issued(self, command: str) -> bool:
        """Whether an actuator command with this id is already on the ledger."""
        return self._history.issued_at(command, self._version)

    def left_data(self) -> frozenset[str]:
        return frozenset(d for d, at in self._history.left_data.items() if at <= self._version)

    def _writable_history(self) -> _History:
        if self._history.version == self._version:
            return self._history
        return self._history.fork(self._version)

    def __repr__(self) -> str:
        return f"PatternState(version={self._version}, members={len(self.members())}, left_data={len(self.left_data())})"


# --- Conditions (Table II's "IF" column) -------------------------------------------------------------
# Each returns None when it holds, or the reason it does not: one phrase describing the state, which
# becomes the end of the IllegalTransition message.

Condition = Callable[[PatternState, Record], str | None]


def _identity(record: Record) -> Identity:
    assert isinstance(record.structure, Identity)  # the row's record state guarantees it
    return record.structure


def _prov(record: Record) -> Provenance:
    assert isinstance(record.structure, Provenance)
    return record.structure


def _orchestrate(record: Record) -> Orchestrate:
    assert isinstance(record.structure, Orchestrate)
    return record.structure


def _article(kind: str) -> str:
    return "an" if kind[0] in "aeiou" else "a"


def not_joined(state: PatternState, record: Record) -> str | None:
    name = _identity(record).object
    member = state.member(name)
    if member is None:
        return None
    return f"{name} has already joined (as {_article(member.kind)} {member.kind})"


def joined_as_kind(state: PatternState, record: Record) -> str | None:
    identity = _identity(record)
    member = state.member(identity.object)
    if member is None:
        return f"{identity.object} has not joined"
    if member.kind != identity.kind:
        return f"{identity.object} joined as {_article(member.kind)} {member.kind}, not {_article(identity.kind)} {identity.kind}"
    return None


def attributed_to_joined_node(state: PatternState, record: Record) -> str | None:
    node = _identity(record).attributed_to
    if node is None:
        return "a container must be attributed to the node that runs it"
    return _is_joined_node(state, node, "node")


def source_joined(state: PatternState, record: Record) -> str | None:
    source = _prov(record).source
    if source is None or state.joined(source):
        return None
    return f"source {source} has not joined"


def data_not_left(state: PatternState, record: Record) -> str | None:
    data = _prov(record).data
    return f"{data} has already left its source" if state.has_left(data) else None


def deployed_data_left(state: PatternState, record: Record) -> str | None:
    data = _orchestrate(record).deployed
    return None if state.has_left(data) else f"{data} has not left its source"


def location_joined_node(state: PatternState, record: Record) -> str | None:
    return _is_joined_node(state, _orchestrate(record).location, "location")


def location_joined(state: PatternState, record: Record) -> str | None:
    location = _orchestrate(record).location
    return None if state.joined(location) else f"location {location} has not joined"


def command_not_issued(state: PatternState, record: Record) -> str | None:
    # A command's id names the contract and the committed record that fired it, so this is what makes
    # "a rule that would fire twice for one record fires once" hold on the ledger itself, whichever
    # leader (or two leaders, across a failover) proposed it.
    command = _orchestrate(record).deployed
    return f"{command} has already been issued" if state.has_issued(command) else None


def _is_joined_node(state: PatternState, name: str, what: str) -> str | None:
    member = state.member(name)
    if member is None:
        return f"{what} {name} has not joined"
    if member.kind != "node":
        return f"{what} {name} is {_article(member.kind)} {member.kind}, not a node"
    return None


# --- Effects (what the new state holds) ---------------------------------------------------------------

Effect = Callable[[_History, Record], None]


def _join(history: _History, record: Record) -> None:
    identity = _identity(record)
    member = Member(identity.kind, identity.attributed_to)
    history.members.setdefault(identity.object, []).append((history.version, member))


def _leave(history: _History, record: Record) -> None:
    history.members.setdefault(_identity(record).object, []).append((history.version, None))


def _data_leaves(history: _History, record: Record) -> None:
    history.left_data[_prov(record).data] = history.version


def _command_issued(history: _History, record: Record) -> None:
    history.issued[_orchestrate(record).deployed] = history.version


def _no_change(history: _History, record: Record) -> None:
    """Joining data to an activity and placing are recorded but change no membership."""


@dataclass(frozen=True, slots=True)
class Row:
    """One line of Table II: ON `event` (a record in `state` with `key`) IF `conditions` DO `action`."""

    event: str  # the trigger, and the name errors use
    state: str  # the record state the row stores (Table II's blockchain action)
    key: str | None  # identity kind or orchestrate action that selects the row; None for PROV-DATA
    conditions: tuple[Condition, ...]
    action: str  # Table II's orchestrator action, for people reading the table and the audit trail
    effect: Effect


TABLE: tuple[Row, ...] = (
    # event                record     key          IF (all must hold)                       DO (orchestrator action)             effect
    Row("join-device",     ID_CREATE, "device",    (not_joined,),                           "identify device",                   _join),
    Row("join-node",       ID_CREATE, "node",      (not_joined,),                           "identify node",                     _join),
    Row("join-service",    ID_CREATE, "service",   (not_joined,),                           "identify service",                  _join),
    Row("join-auditor",    ID_CREATE, "auditor",   (not_joined,),                           "identify auditor",                  _join),
    Row("join-container",  ID_CREATE, "container", (not_joined, attributed_to_joined_node), "identify container",                _join),
    Row("leave-device",    ID_DELETE, "device",    (joined_as_kind,),                       "terminate device",                  _leave),
    Row("leave-node",      ID_DELETE, "node",      (joined_as_kind,),                       "terminate node",                    _leave),
    Row("leave-service",   ID_DELETE, "service",   (joined_as_kind,),                       "terminate service",                 _leave),
    Row("leave-auditor",   ID_DELETE, "auditor",   (joined_as_kind,),                       "terminate auditor",                 _leave),
    Row("leave-container", ID_DELETE, "container", (joined_as_kind,),                       "terminate container",               _leave),
    Row("leave-data",      DATA,      None,        (source_joined, data_not_left),          "determine processing activity",     _data_leaves),
    Row("join-data",       ORCH,      "execute",   (deployed_data_left,),                   "instruct activity (EXEC CONTRACT)", _no_change),
    Row("place",           ORCH,      "place",     (location_joined_node,),                 "place container on node",           _no_change),
    Row("remove",          ORCH,      "remove",    (location_joined_node,),                 "remove container from node",        _no_change),
    Row("command",         ORCH,      "command",   (location_joined, command_not_issued),   "command actuator",                  _command_issued),
)

_ROWS: dict[tuple[str, str | None], Row] = {(row.state, row.key): row for row in TABLE}
assert len(_ROWS) == len(TABLE), "two rows of TABLE answer the same record"


def event_object(record: Record) -> str:
    """The object a record is about: the identity, the datum, or the deployed entity."""
    structure = record.structure
    if isinstance(structure, Identity):
        return structure.object
    if isinstance(structure, Provenance):
        return structure.data
    return structure.deployed


def row_for(record: Record) -> Row | None:
    """The row of TABLE that answers `record`, or None when no row does (e.g. an unknown action)."""
    structure = record.structure
    key: str | None
    if isinstance(structure, Identity):
        key = structure.kind
    elif isinstance(structure, Orchestrate):
        key = structure.action
    else:
        key = None
    return _ROWS.get((record.state, key))


def check(state: PatternState, record: Record, proposer: str) -> Row:
    """The row `record` fires in `state`, or IllegalTransition naming the first condition that fails."""
    row = row_for(record)
    if row is None:
        structure = record.structure
        if isinstance(structure, Orchestrate):
            raise IllegalTransition(structure.action, structure.deployed,
                                    f"no row of Table II handles {ORCH} action {structure.action}", proposer)
        raise IllegalTransition(record.state, event_object(record), f"no row of Table II handles this {record.state} record",
                                proposer)
    reason = _proposer_problem(state, proposer)
    if reason is None:
        for condition in row.conditions:
            reason = condition(state, record)
            if reason is not None:
                break
    if reason is not None:
        raise IllegalTransition(row.event, event_object(record), reason, proposer)
    return row


def apply(state: PatternState, record: Record, proposer: str) -> PatternState:
    """The state after `record`, proposed by `proposer` (a certificate name or OPERATOR), or IllegalTransition."""
    row = check(state, record, proposer)
    history = state._writable_history()
    history.version += 1
    row.effect(history, record)
    return PatternState._at(history, history.version)


def replay(transitions: Iterable[tuple[Record, str]], state: PatternState | None = None) -> PatternState:
    """Apply (record, proposer) pairs in order from `state` (default: empty)."""
    current = state if state is not None else PatternState()
    for record, proposer in transitions:
        current = apply(current, record, proposer)
    return current


def _proposer_problem(state: PatternState, proposer: str) -> str | None:
    if proposer == OPERATOR:
        return None
    member = state.member(proposer)
    if member is None:
        return f"proposer {proposer} has not joined"
    if member.kind not in PROPOSER_KINDS:
        return f"proposer {proposer} is {_article(member.kind)} {member.kind}; only nodes, services and containers propose records"
    return None
