"""The in-memory Raft log of one node: a snapshot boundary, the entries after it, and two cursors.

`stable` is the last index handed to storage; everything after it still has to be persisted.
`applied` is the last index handed to the application. Nothing here does I/O.
"""

from __future__ import annotations

from tomq.node.raft.types import Entry, Snapshot, SnapshotMeta


class RaftLog:
    def __init__(self, snapshot: Snapshot | None = None, entries: list[Entry] | None = None, commit: int = 0) -> None:
        self.snapshot = snapshot
        self.snap_index = snapshot.meta.index if snapshot else 0
        self.snap_term = snapshot.meta.term if snapshot else 0
        self.entries: list[Entry] = list(entries or [])
        if self.entries and self.entries[0].index != self.snap_index + 1:
            raise ValueError(f"entries start at {self.entries[0].index}, not after snapshot {self.snap_index}")
        self.committed = max(commit, self.snap_index)
        self.applied = self.snap_index
        self.stable = self.last_index()

    def last_index(self) -> int:
        return self.entries[-1].index if self.entries else self.snap_index

    def last_term(self) -> int:
        return self.entries[-1].term if self.entries else self.snap_term

    def first_index(self) -> int:
        return self.snap_index + 1

    def term(self, index: int) -> int | None:
        """Term of the entry at `index`; None when it is compacted away or beyond the end."""
        if index == self.snap_index:
            return self.snap_term
        if index < self.snap_index or index > self.last_index():
            return None
        return self.entries[index - self.snap_index - 1].term

    def entry(self, index: int) -> Entry:
        return self.entries[index - self.snap_index - 1]

    def slice(self, low: int, high: int) -> list[Entry]:
        """Entries with low <= index < high (low must be above the snapshot)."""
        return self.entries[low - self.snap_index - 1 : high - self.snap_index - 1]

    def matches(self, index: int, term: int) -> bool:
        return self.term(index) == term

    def is_up_to_date(self, last_index: int, last_term: int) -> bool:
        """Raft §5.4.1: a candidate's log is at least as up to date as ours."""
        return (last_term, last_index) >= (self.last_term(), self.last_index())

    def append(self, entries: list[Entry]) -> None:
        """Append entries, first truncating any suffix they replace. Never below the commit index."""
        if not entries:
            return
        first = entries[0].index
        if first <= self.committed:
            raise AssertionError(f"raft: refusing to overwrite committed index {first} (commit {self.committed})")
        if first > self.last_index() + 1:
            raise AssertionError(f"raft: gap in log: appending {first} after {self.last_index()}")
        del self.entries[first - self.snap_index - 1 :]
        self.entries.extend(entries)
        self.stable = min(self.stable, first - 1)

    def find_conflict(self, entries: tuple[Entry, ...]) -> int:
        """Index of the first entry that is not already in the log with the same term (0 if none)."""
        for entry in entries:
            if not self.matches(entry.index, entry.term):
                return entry.index
        return 0

    def conflict_hint(self, index: int) -> tuple[int, int]:
        """Fast back-tracking (Raft §5.3, "optimization"): where a leader probing at `index` should retry.

        Returns (hint_index, hint_term): the first index of our term at min(index, last), so the leader
        can skip that whole term; hint_term 0 means our log simply ends before `index`.
        """
        if index > self.last_index():
            return self.last_index() + 1, 0
        term = self.term(index)
        if term is None:  # below our snapshot: the leader should send from our snapshot on
            return self.snap_index + 1, 0
        first = index
        while first - 1 > self.snap_index and self.term(first - 1) == term:
            first -= 1
        return first, term

    def last_index_of_term(self, term: int, at_most: int) -> int:
        """Last index <= at_most whose term is <= term (0 or the snapshot index if none)."""
        index = min(at_most, self.last_index())
        while index > self.snap_index:
            entry_term = self.term(index)
            if entry_term is not None and entry_term <= term:
                return index
            index -= 1
        return self.snap_index

    def commit_to(self, index: int) -> bool:
        if index > self.committed:
            if index > self.last_index():
                raise AssertionError(f"raft: commit {index} beyond last index {self.last_index()}")
            self.committed = index
            return True
        return False

    def unstable_entries(self) -> list[Entry]:
        return self.slice(self.stable + 1, self.last_index() + 1) if self.stable < self.last_index() else []

    def to_apply(self) -> list[Entry]:
        upto = min(self.committed, self.stable)
        if upto <= self.applied:
            return []
        return self.slice(self.applied + 1, upto + 1)

    def restore(self, snapshot: Snapshot) -> None:
        """Replace the log with a snapshot received from the leader."""
        meta = snapshot.meta
        if self.matches(meta.index, meta.term):
            # We already hold the entries the snapshot covers: keep what follows it.
            self.entries = self.slice(meta.index + 1, self.last_index() + 1)
        else:
            self.entries = []
        self.snapshot = snapshot
        self.snap_index, self.snap_term = meta.index, meta.term
        self.committed = max(self.committed, meta.index)
        self.applied = max(self.applied, meta.index)
        self.stable = max(self.stable, meta.index) if self.entries else meta.index

    def compact(self, index: int, data: bytes, voters: tuple[str, ...], decided: tuple[bytes, ...] = ()) -> Snapshot:
        """Take a snapshot of the applied state at `index` and drop the entries it covers."""
        if index <= self.snap_index:
            raise AssertionError(f"raft: compacting to {index}, already compacted to {self.snap_index}")
        if index > self.applied:
            raise AssertionError(f"raft: compacting to {index} beyond applied {self.applied}")
        term = self.term(index)
        assert term is not None
        snapshot = Snapshot(SnapshotMeta(index, term, voters, decided), data)
        self.entries = self.slice(index + 1, self.last_index() + 1)
        self.snapshot = snapshot
        self.snap_index, self.snap_term = index, term
        return snapshot
