"""Raft messages and their wire encoding.

A message is an immutable value; the core creates and consumes them, the transport encodes them as
canonical CBOR for MQTT. `decode` is fed bytes from the network and raises only `MalformedRaftMessage`.
"""

from __future__ import annotations

import enum
import itertools
import math
from dataclasses import dataclass
from typing import Any

from tomq import canonical
from tomq.errors import PeerError
from tomq.node.raft.types import Entry, EntryKind, Snapshot, SnapshotMeta


class MessageType(enum.IntEnum):
    PRE_VOTE = 1
    PRE_VOTE_RESP = 2
    VOTE = 3
    VOTE_RESP = 4
    APPEND = 5
    APPEND_RESP = 6
    HEARTBEAT = 7
    HEARTBEAT_RESP = 8
    SNAPSHOT = 9
    PROPOSE = 10  # a follower forwards a client proposal (or an on-demand request) to the leader
    READ_INDEX = 11  # a follower asks the leader for a linearizable read index
    READ_INDEX_RESP = 12
    TIMEOUT_NOW = 13  # leadership transfer: campaign now, without pre-vote or lease
    PAUSE = 14  # on-demand mode: the leader has no more work and returns to the pause phase


@dataclass(frozen=True, slots=True)
class Message:
    type: MessageType
    to: str
    from_: str
    term: int
    log_term: int = 0  # APPEND: term of entry `index`; votes: candidate's last log term
    index: int = 0  # APPEND: index before `entries`; votes: candidate's last index; responses: match
    entries: tuple[Entry, ...] = ()
    commit: int = 0
    reject: bool = False
    hint_index: int = 0  # on reject: where the leader should retry (fast conflict back-tracking)
    hint_term: int = 0  # on reject: the follower's term at hint_index, 0 if its log is shorter
    snapshot: Snapshot | None = None
    context: bytes = b""  # read-index request id, or the request id of a forwarded proposal
    read_seq: int = 0  # heartbeat round used to confirm read-index requests
    load: float | None = None  # on-demand mode: the sender's current load, carried in votes
    force: bool = False  # a campaign from leadership transfer: voters ignore their leader lease
    data: bytes = b""  # PROPOSE: the proposal itself


class MalformedRaftMessage(PeerError):
    """Bytes on a Raft topic that are not a well-formed Raft message."""


_KEYS = ("type", "to", "from", "term", "log_term", "index", "entries", "commit", "reject", "hint_index",
         "hint_term", "snapshot", "context", "read_seq", "load", "force", "data")


def encode(message: Message) -> bytes:
    out: dict[str, Any] = {"type": int(message.type), "to": message.to, "from": message.from_, "term": message.term}
    for key, value, default in (
        ("log_term", message.log_term, 0), ("index", message.index, 0), ("commit", message.commit, 0),
        ("reject", message.reject, False), ("hint_index", message.hint_index, 0),
        ("hint_term", message.hint_term, 0), ("context", message.context, b""), ("read_seq", message.read_seq, 0),
        ("load", message.load, None), ("force", message.force, False), ("data", message.data, b""),
    ):
        if value != default:
            out[key] = value
    if message.entries:
        out["entries"] = [[e.term, e.index, int(e.kind), e.data] for e in message.entries]
    if message.snapshot is not None:
        meta = message.snapshot.meta
        out["snapshot"] = [meta.index, meta.term, list(meta.voters), message.snapshot.data, list(meta.decided)]
    return canonical.encode(out)


def decode(data: bytes) -> Message:
    try:
        raw = canonical.decode(data, check_canonical=False)
    except canonical.CanonicalDecodeError as exc:
        raise MalformedRaftMessage(f"raft message: {exc}") from None
    try:
        return _from_map(raw)
    except MalformedRaftMessage:
        raise
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise MalformedRaftMessage(f"raft message has a bad field: {type(exc).__name__} {str(exc)[:80]}") from None


def _int(value: Any, name: str) -> int:
    if type(value) is not int or value < 0 or value > 2**63:
        raise MalformedRaftMessage(f"raft message field {name} must be a non-negative integer")
    return value


def _from_map(raw: Any) -> Message:
    if type(raw) is not dict:
        raise MalformedRaftMessage("raft message must be a CBOR map")
    unknown = raw.keys() - set(_KEYS)
    if unknown:
        raise MalformedRaftMessage(f"raft message has unknown fields {sorted(unknown)[:5]}")
    kind = MessageType(_int(raw["type"], "type"))
    for name in ("to", "from"):
        if type(raw[name]) is not str or not raw[name]:
            raise MalformedRaftMessage(f"raft message field {name} must be a node id")
    entries: list[Entry] = []
    for item in raw.get("entries", []):
        if type(item) is not list or len(item) != 4 or type(item[3]) is not bytes:
            raise MalformedRaftMessage("raft entry must be [term, index, kind, data]")
        if type(item[2]) is not int:
            raise MalformedRaftMessage("raft entry kind must be an integer")
        entries.append(Entry(_int(item[0], "entry term"), _int(item[1], "entry index"), EntryKind(item[2]), item[3]))
    for before, after in itertools.pairwise(entries):
        if after.index != before.index + 1 or after.term < before.term:
            raise MalformedRaftMessage("raft entries must have consecutive indices and non-decreasing terms")
    snapshot = None
    if "snapshot" in raw:
        snap = raw["snapshot"]
        if (type(snap) is not list or len(snap) != 5 or type(snap[2]) is not list or type(snap[3]) is not bytes
                or type(snap[4]) is not list):
            raise MalformedRaftMessage("raft snapshot must be [index, term, voters, data, decided]")
        if not all(type(v) is str for v in snap[2]) or not all(type(d) is bytes for d in snap[4]):
            raise MalformedRaftMessage("raft snapshot voters must be node ids and decided ids bytes")
        snapshot = Snapshot(SnapshotMeta(_int(snap[0], "snapshot index"), _int(snap[1], "snapshot term"),
                                         tuple(snap[2]), tuple(snap[4])), snap[3])
    load = raw.get("load")
    if load is not None and not (
        (type(load) is int and abs(load) <= 2**63) or (type(load) is float and not math.isnan(load))
    ):
        raise MalformedRaftMessage("raft message load must be a number (not NaN, ints within 64 bits)")
    for name in ("reject", "force"):
        if type(raw.get(name, False)) is not bool:
            raise MalformedRaftMessage(f"raft message field {name} must be a boolean")
    for name in ("context", "data"):
        if type(raw.get(name, b"")) is not bytes:
            raise MalformedRaftMessage(f"raft message field {name} must be bytes")
    return Message(
        type=kind, to=raw["to"], from_=raw["from"], term=_int(raw["term"], "term"),
        log_term=_int(raw.get("log_term", 0), "log_term"), index=_int(raw.get("index", 0), "index"),
        entries=tuple(entries), commit=_int(raw.get("commit", 0), "commit"), reject=raw.get("reject", False),
        hint_index=_int(raw.get("hint_index", 0), "hint_index"), hint_term=_int(raw.get("hint_term", 0), "hint_term"),
        snapshot=snapshot, context=raw.get("context", b""), read_seq=_int(raw.get("read_seq", 0), "read_seq"),
        load=None if load is None else float(load), force=raw.get("force", False), data=raw.get("data", b""),
    )
