"""A deterministic simulator for the Raft core: many nodes, one seed, every fault we can think of.

It drives `RaftNode`s through message loss, duplication, reordering and delay, symmetric and one-way
partitions, crashes that lose whatever was not yet persisted, restarts, membership changes and
leadership transfers, and checks the Raft safety properties after every step:

    election safety      at most one leader per term
    log matching         same index and term => same entry and same history (checked periodically)
    leader completeness  a new leader holds every entry any node has applied
    state machine safety every node applies the same entry at the same index
    durability           no acknowledged proposal is lost

Then it heals everything and checks liveness: a leader is elected and a new proposal commits on every
live voter within a bounded number of ticks. All randomness comes from the seed, so a failing seed
replays exactly:  python tests/raft_sim.py --seed N --mode stable --nodes 5 [--trace]
"""

from __future__ import annotations

import argparse
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from tomq import canonical
from tomq.errors import UsageError
from tomq.node.raft.core import (
    ON_DEMAND,
    STABLE,
    Decision,
    ProposalDropped,
    RaftConfig,
    RaftNode,
    Ready,
    Role,
)
from tomq.node.raft.messages import Message
from tomq.node.raft.types import Entry, EntryKind, HardState, Snapshot

ELECTION_TICKS = 10
HEAL_BOUND_TICKS = 60 * ELECTION_TICKS  # liveness bound after the last fault heals
COMPACT_EVERY = 25  # entries applied between snapshots


class InvariantViolation(AssertionError):
    pass


@dataclass
class Disk:
    """What a node has fsynced: it survives crashes; nothing else does."""

    hard_state: HardState = field(default_factory=HardState)
    snapshot: Snapshot | None = None
    entries: list[Entry] = field(default_factory=list)

    def save_entries(self, entries: list[Entry]) -> None:
        if not entries:
            return
        first = entries[0].index
        base = self.snapshot.meta.index if self.snapshot else 0
        del self.entries[max(0, first - base - 1):]
        self.entries.extend(entries)

    def save_snapshot(self, snapshot: Snapshot) -> None:
        if self.snapshot and snapshot.meta.index <= self.snapshot.meta.index:
            return
        index, term = snapshot.meta.index, snapshot.meta.term
        keep = [e for e in self.entries if e.index > index]
        matching = any(e.index == index and e.term == term for e in self.entries)
        self.entries = keep if matching else []
        self.snapshot = snapshot


@dataclass
class SimNode:
    id: str
    disk: Disk
    raft: RaftNode | None = None
    applied: list[tuple[int, int, bytes]] = field(default_factory=list)  # (index, term, data) of NORMAL/DECISION

    @property
    def alive(self) -> bool:
        return self.raft is not None


class Simulation:
    def __init__(self, seed: int, nodes: int = 3, mode: str = STABLE, trace: bool = False) -> None:
        self.seed = seed
        self.mode = mode
        self.rng = random.Random(seed)
        self.trace_enabled = trace
        self.tick_count = 0
        self.voter_ids = tuple(f"n{i}" for i in range(1, nodes + 1))
        self.spare_ids = [f"n{i}" for i in range(nodes + 1, nodes + 3)]
        self.nodes: dict[str, SimNode] = {}
        for node_id in self.voter_ids:
            self._create(node_id, self.voter_ids)
        self.in_flight: list[tuple[int, int, Message]] = []  # (deliver at tick, order, message)
        self._order = 0
        self.blocked: set[tuple[str, str]] = set()  # (from, to) pairs the network drops
        self.loss = 0.0
        self.duplicate = 0.0
        self.max_delay = 1
        self.crash_during_persist = 0.0
        self.leaders: dict[int, str] = {}  # term -> leader, across the whole run
        self.committed: dict[int, tuple[int, bytes]] = {}  # index -> (term, data), as applied anywhere
        self.acknowledged: dict[bytes, int] = {}  # proposal -> index where it was first applied
        self.proposed = 0
        self.requests: dict[bytes, str] = {}  # request id -> node it was made at
        self.decided: dict[bytes, int] = {}  # request id -> index of its first committed decision
        self.duplicate_decisions: set[tuple[bytes, int]] = set()
        self.steps = 0

    # ------------------------------------------------------------ nodes

    def _create(self, node_id: str, voters: tuple[str, ...]) -> SimNode:
        node = SimNode(node_id, Disk())
        self.nodes[node_id] = node
        self._start(node, voters)
        return node

    def _config(self, node_id: str, voters: tuple[str, ...]) -> RaftConfig:
        return RaftConfig(id=node_id, voters=voters, mode=self.mode, election_ticks=ELECTION_TICKS)

    def _start(self, node: SimNode, voters: tuple[str, ...]) -> None:
        disk = node.disk
        node.raft = RaftNode(self._config(node.id, voters), random.Random(self.rng.getrandbits(64)),
                             hard_state=disk.hard_state, snapshot=disk.snapshot, entries=list(disk.entries))
        node.raft.set_load(self.rng.random())
        # The state machine restarts from the snapshot and re-applies the committed entries after it.
        node.applied = [tuple(item) for item in canonical.decode(disk.snapshot.data)] if disk.snapshot else []  # type: ignore[misc]

    def crash(self, node_id: str) -> None:
        node = self.nodes[node_id]
        if node.alive:
            self.trace(f"crash {node_id}")
            node.raft = None

    def restart(self, node_id: str) -> None:
        node = self.nodes[node_id]
        if not node.alive:
            self.trace(f"restart {node_id}")
            self._start(node, self.voter_ids)
            self._check_leader_completeness(node)

    def live(self) -> list[SimNode]:
        return [n for n in self.nodes.values() if n.raft is not None]

    def leader(self) -> SimNode | None:
        leaders = [n for n in self.live() if n.raft and n.raft.role is Role.LEADER]
        return max(leaders, key=lambda n: n.raft.term) if leaders else None  # type: ignore[union-attr]

    # ------------------------------------------------------------ readiness

    def process(self, node: SimNode) -> None:
        """The adapter's loop: persist, then send, then apply — with an optional crash mid-persist."""
        raft = node.raft
        while raft is not None and raft.has_ready():
            ready = raft.ready()
            if ready.send_before_persist:
                # A leader in an unchanged term sends its appends while its own write is in progress
                # (thesis §10.2.1): a crash below may lose entries its followers already have.
                for message in ready.messages:
                    self._send(message)
            if self.crash_during_persist and self.rng.random() < self.crash_during_persist:
                # Power cut while writing: a prefix of the entries reached the disk, the rest (and the
                # hard state written after them) did not; nothing was sent or applied.
                keep = self.rng.randrange(len(ready.entries) + 1)
                if ready.snapshot is not None:
                    node.disk.save_snapshot(ready.snapshot)
                node.disk.save_entries(ready.entries[:keep])
                self.trace(f"crash {node.id} during persist (kept {keep}/{len(ready.entries)} entries)")
                node.raft = None
                return
            self._persist(node, ready)
            for event in ready.events:
                self.trace(f"{node.id} {event.phase} {event.detail} {event.request.decode(errors='replace')}")
            if not ready.send_before_persist:
                for message in ready.messages:
                    self._send(message)
            self._apply(node, ready)
            self._check_role(node)

    def _persist(self, node: SimNode, ready: Ready) -> None:
        if ready.snapshot is not None:
            node.disk.save_snapshot(ready.snapshot)
        node.disk.save_entries(ready.entries)
        if ready.hard_state is not None and ready.durable_hard_state:
            # A commit-only change is written without an fsync: model the worst case, it is lost.
            node.disk.hard_state = ready.hard_state

    def _apply(self, node: SimNode, ready: Ready) -> None:
        raft = node.raft
        assert raft is not None
        if ready.restore is not None:
            node.applied = [tuple(item) for item in canonical.decode(ready.restore.data)]  # type: ignore[misc]
        for entry in ready.committed:
            seen = self.committed.get(entry.index)
            if seen is None:
                self.committed[entry.index] = (entry.term, entry.data)
            elif seen != (entry.term, entry.data):
                raise InvariantViolation(f"state machine safety: {node.id} applied {entry.term}/{entry.data!r} at "
                                         f"{entry.index}, another node applied {seen}")
            if entry.kind is EntryKind.NORMAL:
                node.applied.append((entry.index, entry.term, entry.data))
                self.acknowledged.setdefault(entry.data, entry.index)
            elif entry.kind is EntryKind.DECISION:
                node.applied.append((entry.index, entry.term, entry.data))
                decision = Decision.decode(entry.data)
                first = self.decided.setdefault(decision.request_id, entry.index)
                if first != entry.index:
                    # A request re-forwarded after its decision left every live memory (restart from a
                    # snapshot) can be decided again; the state machine keeps the first decision, as the
                    # Raft thesis (§6.3) has state machines filter duplicate client commands.
                    self.duplicate_decisions.add((decision.request_id, entry.index))
                if decision.chosen not in decision.loads or decision.loads[decision.chosen] != min(decision.loads.values()):
                    raise InvariantViolation(f"decision {decision!r} did not choose the least-loaded node")
        if raft.log.applied - raft.log.snap_index >= COMPACT_EVERY and self.rng.random() < 0.5:
            state = canonical.encode([list(item) for item in node.applied])
            raft.compact(raft.log.applied, state)

    def _check_role(self, node: SimNode) -> None:
        raft = node.raft
        if raft is None or raft.role is not Role.LEADER:
            return
        holder = self.leaders.setdefault(raft.term, node.id)
        if holder != node.id:
            raise InvariantViolation(f"election safety: {holder} and {node.id} both led term {raft.term}")
        if getattr(raft, "_sim_checked_term", None) != raft.term:
            raft._sim_checked_term = raft.term  # type: ignore[attr-defined]
            self._check_leader_completeness(node)

    def _check_leader_completeness(self, node: SimNode) -> None:
        raft = node.raft
        if raft is None or raft.role is not Role.LEADER:
            return
        for index, (term, _data) in self.committed.items():
            if index <= raft.log.snap_index:
                continue
            if raft.log.term(index) != term:
                raise InvariantViolation(f"leader completeness: leader {node.id} of term {raft.term} lacks "
                                         f"committed entry {index} (term {term})")

    def check_log_matching(self) -> None:
        live = [n for n in self.live()]
        for i, a in enumerate(live):
            for b in live[i + 1:]:
                la, lb = a.raft.log, b.raft.log  # type: ignore[union-attr]
                low = max(la.snap_index, lb.snap_index) + 1
                high = min(la.last_index(), lb.last_index())
                agreed = False
                for index in range(high, low - 1, -1):
                    if not agreed and la.term(index) == lb.term(index):
                        agreed = True
                    if agreed and la.entry(index) != lb.entry(index):
                        raise InvariantViolation(f"log matching: {a.id} and {b.id} agree on a later entry but "
                                                 f"differ at {index}")

    # ------------------------------------------------------------ network

    def _send(self, message: Message) -> None:
        if (message.from_, message.to) in self.blocked or message.to not in self.nodes:
            return
        if self.rng.random() < self.loss:
            return
        copies = 2 if self.rng.random() < self.duplicate else 1
        for _ in range(copies):
            self._order += 1
            self.in_flight.append((self.tick_count + self.rng.randrange(self.max_delay), self._order, message))

    def deliver_one(self) -> bool:
        due = [i for i, (at, _, _) in enumerate(self.in_flight) if at <= self.tick_count]
        if not due:
            return False
        _, _, message = self.in_flight.pop(self.rng.choice(due))  # any due message: reordering
        node = self.nodes.get(message.to)
        if node is None or node.raft is None or (message.from_, message.to) in self.blocked:
            return True
        node.raft.step(message)
        self.process(node)
        return True

    def stabilize(self, limit: int = 100_000) -> None:
        """Deliver messages until none is left (no time passes): for scenario tests."""
        for _ in range(limit):
            if not self.in_flight:
                return
            self.deliver_one()
        raise AssertionError("messages keep flowing without time passing")

    def tick(self) -> None:
        self.tick_count += 1
        for node in self.live():
            node.raft.tick()  # type: ignore[union-attr]
            self.process(node)

    # ------------------------------------------------------------ clients

    def propose(self, at: str | None = None) -> None:
        candidates = [n for n in self.live() if at is None or n.id == at]
        if not candidates:
            return
        node = self.rng.choice(candidates)
        self.proposed += 1
        data = f"p{self.proposed}".encode()
        try:
            if self.mode == ON_DEMAND:
                self.requests[data] = node.id
                node.raft.request(data, b"spec")  # type: ignore[union-attr]
            else:
                node.raft.propose(data)  # type: ignore[union-attr]
        except ProposalDropped:
            pass
        self.process(node)

    # ------------------------------------------------------------ faults

    def random_step(self) -> None:
        self.steps += 1
        r = self.rng.random()
        if r < 0.025:
            self._random_fault()
        elif r < 0.08:
            self.propose()
        elif self.rng.random() < 0.85 and self.deliver_one():
            pass
        else:
            self.tick()
        if self.steps % 100 == 0:
            self.check_log_matching()

    def _random_fault(self) -> None:
        fault = self.rng.randrange(10)
        if fault == 0:
            self._random_partition()
        elif fault == 1:
            self.trace("heal partitions")
            self.blocked.clear()
        elif fault == 2:
            self.crash(self.rng.choice(sorted(self.nodes)))
        elif fault == 3:
            dead = sorted(n.id for n in self.nodes.values() if not n.alive)
            if dead:
                self.restart(self.rng.choice(dead))
        elif fault == 4:
            self.loss = self.rng.choice([0.0, 0.05, 0.2])
            self.duplicate = self.rng.choice([0.0, 0.05])
            self.max_delay = self.rng.choice([1, 2, 4])
            self.trace(f"network loss={self.loss} dup={self.duplicate} delay<{self.max_delay}")
        elif fault == 5:
            self._random_conf_change()
        elif fault == 6:
            leader = self.leader()
            if leader is not None:
                target = self.rng.choice(sorted(leader.raft.voters))  # type: ignore[union-attr]
                try:
                    leader.raft.transfer_leadership(target)  # type: ignore[union-attr]
                    self.trace(f"transfer {leader.id} -> {target}")
                except (ProposalDropped, UsageError):
                    pass
                self.process(leader)
        elif fault == 7:
            self.crash_during_persist = self.rng.choice([0.0, 0.0, 0.02])
        elif fault == 8:
            for node in self.live():
                node.raft.set_load(self.rng.random())  # type: ignore[union-attr]
        else:
            # a burst of proposals, so that batches, conflicts and snapshots happen under faults
            for _ in range(self.rng.randrange(1, 8)):
                self.propose()

    def _random_partition(self) -> None:
        ids = sorted(self.nodes)
        self.rng.shuffle(ids)
        cut = self.rng.randrange(1, len(ids))
        left, right = ids[:cut], ids[cut:]
        one_way = self.rng.random() < 0.3
        for a in left:
            for b in right:
                self.blocked.add((a, b))
                if not one_way:
                    self.blocked.add((b, a))
        self.trace(f"partition {left} | {right}{' one-way' if one_way else ''}")

    def _random_conf_change(self) -> None:
        leader = self.leader()
        if leader is None:
            return
        raft = leader.raft
        assert raft is not None
        voters = sorted(raft.voters)
        if self.spare_ids and self.rng.random() < 0.5:
            node_id = self.spare_ids.pop(0)
            try:
                raft.propose_conf_change("add", node_id)
            except (ProposalDropped, UsageError):
                self.spare_ids.insert(0, node_id)
                return
            self.trace(f"add {node_id}")
            if node_id not in self.nodes:
                self._create(node_id, ())  # a joiner knows no configuration until the leader sends it
        elif len(voters) > 3:
            node_id = self.rng.choice(voters)
            try:
                raft.propose_conf_change("remove", node_id)
            except (ProposalDropped, UsageError):
                return
            self.trace(f"remove {node_id}")
        self.process(leader)

    # ------------------------------------------------------------ healing

    def heal(self) -> int:
        """Remove every fault and return the ticks until a new proposal is applied on every live voter.

        In on-demand mode a node that missed the last commit before the pause only catches up when the
        next leader works, so a further request is made while any voter still lags.
        """
        self.blocked.clear()
        self.loss = self.duplicate = self.crash_during_persist = 0.0
        self.max_delay = 1
        for node_id, node in self.nodes.items():
            if not node.alive:
                self.restart(node_id)
        start = self.tick_count
        marker: bytes | None = None
        submitted_at = -HEAL_BOUND_TICKS
        while self.tick_count - start < HEAL_BOUND_TICKS:
            while self.deliver_one():
                pass
            self.tick()
            done = self._marker_index(marker)
            if done is not None:
                voters = self._current_voters()
                if all(n.raft is not None and n.raft.log.applied >= done for n in self.live() if n.id in voters):
                    self.check_log_matching()
                    self._check_durability(voters)
                    return self.tick_count - start
            waited = self.tick_count - submitted_at >= 3 * ELECTION_TICKS
            if marker is None or (done is not None and waited):
                # First marker, or the last one committed but a voter still lags: make more work.
                self.proposed += 1
                marker = f"heal{self.proposed}".encode()
                submitted_at = -HEAL_BOUND_TICKS
                waited = True
            # Submit once a leader exists (stable) or at once (on-demand); resubmit if it was lost.
            if done is None and waited and self._submit_marker(marker):
                submitted_at = self.tick_count
        raise InvariantViolation(f"liveness: no new proposal applied on every voter within {HEAL_BOUND_TICKS} ticks "
                                 f"after healing (leader: {self.leader().id if self.leader() else None})")

    def _marker_index(self, marker: bytes | None) -> int | None:
        if marker is None:
            return None
        return self.decided.get(marker) if self.mode == ON_DEMAND else self.acknowledged.get(marker)

    def _submit_marker(self, marker: bytes) -> bool:
        if self.mode == ON_DEMAND:
            node = self.nodes[sorted(self._current_voters())[0]]
            node.raft.request(marker, b"spec")  # type: ignore[union-attr]
            self.process(node)
            return True
        leader = self.leader()
        if leader is None:
            return False
        try:
            leader.raft.propose(marker)  # type: ignore[union-attr]
        except ProposalDropped:
            return False
        self.process(leader)
        return True

    def _current_voters(self) -> frozenset[str]:
        best = max(self.live(), key=lambda n: (n.raft.log.committed, n.id))  # type: ignore[union-attr]
        return best.raft._compute_voters(best.raft.log.committed)  # type: ignore[union-attr]

    def _check_durability(self, voters: frozenset[str]) -> None:
        for node in self.live():
            if node.id not in voters:
                continue
            applied_index = node.raft.log.applied  # type: ignore[union-attr]
            if self.mode == ON_DEMAND:
                have = {Decision.decode(data).request_id for _, _, data in node.applied}
                lost = [d for d, index in self.decided.items() if index <= applied_index and d not in have]
            else:
                have = {data for _, _, data in node.applied}
                lost = [p for p, index in self.acknowledged.items() if index <= applied_index and p not in have]
            if lost:
                raise InvariantViolation(f"durability: {node.id} lost acknowledged {sorted(lost)[:3]}")

    def trace(self, text: str) -> None:
        if self.trace_enabled:
            print(f"[tick {self.tick_count} step {self.steps}] {text}")


def run_seed(seed: int, nodes: int, mode: str, steps: int = 2000, trace: bool = False) -> dict[str, int]:
    sim = Simulation(seed, nodes, mode, trace)
    try:
        for _ in range(steps):
            sim.random_step()
        sim.check_log_matching()
        recovery = sim.heal()
    except InvariantViolation as exc:
        raise InvariantViolation(f"{exc}\n  replay: python tests/raft_sim.py --seed {seed} --mode {mode} "
                                 f"--nodes {nodes} --steps {steps} --trace") from None
    return {"recovery_ticks": recovery, "acknowledged": len(sim.acknowledged), "decided": len(sim.decided),
            "duplicate_decisions": len(sim.duplicate_decisions),
            "terms": len(sim.leaders), "committed": len(sim.committed)}


def main() -> None:
    parser = argparse.ArgumentParser(description="Replay one seed of the Raft simulator.")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--mode", choices=(STABLE, ON_DEMAND), default=STABLE)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--trace", action="store_true")
    args = parser.parse_args()
    print(run_seed(args.seed, args.nodes, args.mode, args.steps, args.trace))


if __name__ == "__main__":
    main()
