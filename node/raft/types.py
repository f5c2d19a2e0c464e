"""Plain values exchanged between the Raft core, its storage and its transport.

Nothing here does I/O or reads a clock; every type is immutable so that a value handed out by the
core can be persisted or sent later without being changed underneath.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class EntryKind(enum.IntEnum):
    NORMAL = 0  # an application command (a ledger block, a placement decision)
    CONFIG = 1  # a single-server membership change; data is the encoded ConfigChange
    NOOP = 2  # appended by a new leader so that it can commit entries of earlier terms
    DECISION = 3  # a placement decision: request, chosen node and the loads it was based on


@dataclass(frozen=True, slots=True)
class Entry:
    term: int
    index: int
    kind: EntryKind = EntryKind.NORMAL
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class HardState:
    """What must be on disk before any message that depends on it leaves the node."""

    term: int = 0
    vote: str | None = None
    commit: int = 0


@dataclass(frozen=True, slots=True)
class SnapshotMeta:
    index: int
    term: int
    voters: tuple[str, ...] = field(default_factory=tuple)
    # Request ids already decided when the snapshot was taken, so a request re-forwarded after a
    # restart is not decided a second time (the log entries that said so are gone).
    decided: tuple[bytes, ...] = field(default_factory=tuple)


@dataclass(frozen=True, slots=True)
class Snapshot:
    meta: SnapshotMeta
    data: bytes = b""
