"""Records onto the ledger, and knowing when they are on it: `LedgerProposer`.

It seals records as the service identity (type "record", seq = a strictly rising microsecond
clock), publishes them on ledger/propose/<member>, and takes a record's audit line (proposer = our key id,
seq = one of the seqs it was sealed with), its certified block, or any committed PROV-DATA for the
same datum as the commit. Without that after RETRY_SECONDS it re-seals with a new seq (the ledger
takes a proposer's records only in rising seq order) and proposes again; after MAX_PROPOSALS it
gives up with one log line naming the record. Giving up counts as done: the usual cause is a datum
already committed under an earlier proposal, which the ledger refuses silently.

The time is given on every call (`now`), the seq clock is injectable (`micros`) and publishing is a
callable, so the proposer runs without a broker in tests.

What this module must never do: seal two proposals with the same seq or a lower one than before,
take anything but a commit at one of a record's own seqs, or of its datum, as its commit, or report
one record's commit twice.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tomq.identity import SigningKey
from tomq.node.ledger.block import Block
from tomq.node.services.committed import block_records
from tomq.records import DATA, Provenance, Record
from tomq.topics import Topics
from tomq.wire import ClockSequence, seal

log = logging.getLogger("tomq.service")

SEQUENCE_LANES = 1024  # above the spec's MAX_REPLICAS (64); microseconds x 1024 fits a seq until 2255


@dataclass
class _Outstanding:
    record: Record
    label: str
    data: str | None  # the datum of a PROV-DATA record: its commit by anyone counts
    on_commit: Callable[[int], None]
    on_give_up: Callable[[], None]
    seqs: list[int] = field(default_factory=list)
    proposals: int = 0
    first_sent: float = 0.0
    last_sent: float = 0.0
    gave_up_at: float | None = None


class LedgerProposer:
    """Records out on ledger/propose/<member>; commits in from audit lines and certified blocks.

    `on_commit(height)` runs once per record, on the loop's thread; a record committed after it was
    given up still gets `on_commit` (a late commit), as long as it is remembered (LATE_COMMIT_SECONDS).
    """

    RETRY_SECONDS = 2.0
    MAX_PROPOSALS = 3
    LATE_COMMIT_SECONDS = 60.0
    REMEMBERED_DATA = 200_000  # committed data ids kept to recognise redelivered inputs

    def __init__(self, key: SigningKey, topics: Topics, publish: Callable[[str, bytes, int], object], *,
                 member: str, micros: Callable[[], int] = lambda: time.time_ns() // 1000, replica: int = 0) -> None:
        self.key = key
        self.topics = topics
        self.topic = topics.ledger_propose(member)  # the only proposal topic the broker lets `member` use
        self._publish = publish
        # The replicas of a service sign with its one key: each keeps to its own sequence lane.
        self._sequence = ClockSequence(micros, lane=replica, lanes=SEQUENCE_LANES)
        self._by_seq: dict[int, _Outstanding] = {}
        self._by_data: dict[str, _Outstanding] = {}
        self._pending: dict[int, _Outstanding] = {}  # id(entry) -> entry, not yet committed or given up
        self._given_up: dict[int, _Outstanding] = {}
        self._committed_data: OrderedDict[str, int] = OrderedDict()
        self.committed = 0
        self.gave_up = 0

    @property
    def outstanding(self) -> int:
        return len(self._pending)

    def committed_height(self, data: str) -> int | None:
        """The height at which PROV-DATA for `data` committed, if this process saw it happen."""
        return self._committed_data.get(data)

    def propose(self, record: Record, *, now: float, on_commit: Callable[[int], None],
                on_give_up: Callable[[], None], label: str | None = None) -> None:
        data = getattr(record.structure, "data", None) if record.state == DATA else None
        entry = _Outstanding(record, label or record.record_id, data, on_commit, on_give_up, first_sent=now)
        self._pending[id(entry)] = entry
        if data is not None:
            self._by_data[data] = entry
        self._send(entry, now)

    def _send(self, entry: _Outstanding, now: float) -> None:
        # Above anything an earlier instance of this identity sealed (see ClockSequence).
        seq = self._sequence.next()
        wire = seal(self.key, seq=seq, time_ms=int(now * 1000), type="record", body=entry.record.to_map())
        entry.seqs.append(seq)
        entry.proposals += 1
        entry.last_sent = now
        self._by_seq[seq] = entry
        self._publish(self.topic, wire, 1)

    def on_audit_line(self, line: Mapping[str, Any]) -> None:
        height = line.get("height")
        if not isinstance(height, int):
            return
        body = line.get("body")
        prov = body.get("prov") if isinstance(body, dict) else None
        if line.get("state") == DATA and isinstance(prov, dict) and isinstance(prov.get("data"), str):
            self._data_committed(prov["data"], height)
        if line.get("proposer") == self.key.id and isinstance(line.get("seq"), int):
            entry = self._by_seq.get(line["seq"])
            if entry is not None:
                self._commit(entry, height)

    def on_block(self, height: int, block: Block) -> None:
        for _, proposer, seq, record in block_records(block):
            if isinstance(record.structure, Provenance):
                self._data_committed(record.structure.data, height)
            if proposer == self.key.id:
                entry = self._by_seq.get(seq)
                if entry is not None:
                    self._commit(entry, height)

    def _data_committed(self, data: str, height: int) -> None:
        self._committed_data[data] = height
        self._committed_data.move_to_end(data)
        while len(self._committed_data) > self.REMEMBERED_DATA:
            self._committed_data.popitem(last=False)
        entry = self._by_data.get(data)
        if entry is not None:
            self._commit(entry, height)

    def _commit(self, entry: _Outstanding, height: int) -> None:
        if id(entry) not in self._pending and id(entry) not in self._given_up:
            return  # already reported
        self._forget(entry)
        self.committed += 1
        entry.on_commit(height)

    def _forget(self, entry: _Outstanding) -> None:
        self._pending.pop(id(entry), None)
        self._given_up.pop(id(entry), None)
        for seq in entry.seqs:
            self._by_seq.pop(seq, None)
        if entry.data is not None and self._by_data.get(entry.data) is entry:
            del self._by_data[entry.data]

    def tick(self, now: float) -> None:
        for entry in list(self._pending.values()):
            if now - entry.last_sent < self.RETRY_SECONDS:
                continue
            if entry.proposals >= self.MAX_PROPOSALS:
                del self._pending[id(entry)]
                entry.gave_up_at = now
                self._given_up[id(entry)] = entry
                self.gave_up += 1
                log.warning("gave up on record %s: not committed after %d proposals in %.0f s (already on the "
                            "ledger under an earlier proposal, or refused: see the leader's log)", entry.label,
                            entry.proposals, now - entry.first_sent)
                entry.on_give_up()
            else:
                self._send(entry, now)
        for entry in list(self._given_up.values()):
            if entry.gave_up_at is not None and now - entry.gave_up_at > self.LATE_COMMIT_SECONDS:
                self._forget(entry)
