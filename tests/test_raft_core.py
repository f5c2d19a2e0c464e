"""The Raft core driven directly: the promises of `RaftNode` that the scenario files do not cover.

Most tests use `Net`, a tiny lossless network defined here: a dict of `RaftNode`s, a FIFO of
messages moved from `ready().messages` to `step()`, a `MemoryStorage` per node that every Ready is
persisted to before its messages leave, and a record of every Ready handed out. The Ready-contract
test uses the fault simulator (tests/raft_sim.py) instead, because the contract matters most when
nodes crash and messages are lost.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raft_sim import Simulation
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
    encode_bootstrap,
    least_loaded_node,
)
from tomq.node.raft.messages import Message, MessageType
from tomq.node.raft.storage import MemoryStorage
from tomq.node.raft.types import Entry, EntryKind, HardState

ELECTION = 10
IDS3 = ("n1", "n2", "n3")


class Net:
    """Nodes, storage and a FIFO network. `cut` holds isolated node ids: their messages vanish."""

    def __init__(self, ids: tuple[str, ...] = IDS3, *, seed: int = 0, mode: str = STABLE, **config: object) -> None:
        self.ids = ids
        self.seed = seed
        self.mode = mode
        self.config = config
        self.nodes: dict[str, RaftNode] = {}
        self.storage: dict[str, MemoryStorage] = {}
        self.readies: list[tuple[str, Ready]] = []
        self.queue: deque[Message] = deque()
        self.cut: set[str] = set()
        self.on_message: Callable[[Message], None] | None = None
        for node_id in ids:
            self.storage[node_id] = MemoryStorage()
            self.start(node_id)

    def raft_config(self, node_id: str) -> RaftConfig:
        return RaftConfig(node_id, self.ids, mode=self.mode, election_ticks=ELECTION, **self.config)

    def rng(self, node_id: str) -> random.Random:
        return random.Random(f"{self.seed}/{node_id}")

    def start(self, node_id: str) -> RaftNode:
        """Start (or restart) a node from what its storage holds, and nothing else."""
        loaded = self.storage[node_id].load()
        node = RaftNode(self.raft_config(node_id), self.rng(node_id), hard_state=loaded.hard_state,
                        snapshot=loaded.snapshot, entries=loaded.entries)
        self.nodes[node_id] = node
        self.process(node_id)
        return node

    def process(self, node_id: str) -> None:
        node = self.nodes[node_id]
        while node.has_ready():
            ready = node.ready()
            storage = self.storage[node_id]
            if ready.snapshot is not None:
                storage.save_snapshot(ready.snapshot)
            storage.append(ready.entries)
            if ready.hard_state is not None:
                storage.set_hard_state(ready.hard_state)
            self.readies.append((node_id, ready))
            for message in ready.messages:
                if message.from_ not in self.cut and message.to not in self.cut:
                    self.queue.append(message)

    def deliver_one(self) -> bool:
        if not self.queue:
            return False
        message = self.queue.popleft()
        if message.to in self.nodes and message.to not in self.cut:
            if self.on_message is not None:
                self.on_message(message)
            self.nodes[message.to].step(message)
            self.process(message.to)
        return True

    def deliver(self, limit: int = 100_000) -> None:
        for _ in range(limit):
            if not self.deliver_one():
                return
        raise AssertionError("messages keep flowing without time passing")

    def tick(self, count: int = 1) -> None:
        for _ in range(count):
            for node_id in self.ids:
                if node_id in self.nodes:
                    self.nodes[node_id].tick()
                    self.process(node_id)
            self.deliver()

    def leader(self) -> str | None:
        leaders = [n for n, raft in self.nodes.items() if raft.role is Role.LEADER and n not in self.cut]
        assert len(leaders) <= 1 or len({self.nodes[n].term for n in leaders}) == len(leaders)
        return max(leaders, key=lambda n: self.nodes[n].term) if leaders else None

    def elect(self, node_id: str) -> RaftNode:
        node = self.nodes[node_id]
        node.campaign()
        self.process(node_id)
        self.deliver()
        assert node.role is Role.LEADER, node.status()
        return node

    def propose(self, node_id: str, data: bytes) -> None:
        self.nodes[node_id].propose(data)
        self.process(node_id)

    def committed(self, node_id: str, kind: EntryKind = EntryKind.NORMAL) -> list[bytes]:
        return [e.data for n, r in self.readies if n == node_id for e in r.committed if e.kind is kind]

    def events(self, node_id: str | None = None) -> list[tuple[str, str]]:
        return [(n, e.phase) for n, r in self.readies if node_id in (None, n) for e in r.events]

    def decisions(self, node_id: str) -> list[Decision]:
        log = self.nodes[node_id].log
        return [Decision.decode(e.data) for e in log.entries if e.kind is EntryKind.DECISION]


def run_until(net: Net, done: Callable[[], bool], max_ticks: int) -> int:
    """Tick until `done()`; return the ticks it took."""
    for elapsed in range(max_ticks + 1):
        if done():
            return elapsed
        net.tick()
    raise AssertionError(f"not done within {max_ticks} ticks: {[n.status() for n in net.nodes.values()]}")


# =========================================================================== determinism


def replay(seed: int, ticks: int = 30 * ELECTION) -> list[tuple[str, object, object, object, object]]:
    """A fixed script of inputs; everything random comes from `seed`. Returns every Ready handed out."""
    net = Net(("n1", "n2", "n3", "n4", "n5"), seed=seed)
    for t in range(ticks):
        net.tick()
        leader = net.leader()
        if leader is not None and t % 3 == 0:
            net.propose(leader, f"p{t}".encode())
        if t == 12 * ELECTION and leader is not None:
            net.cut.add(leader)  # force a second election halfway through
        if t == 20 * ELECTION:
            net.cut.clear()
    return [(n, r.hard_state, tuple(r.entries), tuple(r.messages), tuple(r.committed)) for n, r in net.readies]


def first_campaign(seed: int) -> tuple[int, str]:
    net = Net(seed=seed)
    for t in range(1, 5 * ELECTION):
        net.tick()
        for node_id, ready in net.readies:
            if any(m.type in (MessageType.PRE_VOTE, MessageType.VOTE) for m in ready.messages):
                return t, node_id
    raise AssertionError("nobody campaigned")


def test_the_same_seed_gives_the_same_ready_sequence():
    first, second = replay(7), replay(7)
    assert len(first) > 300 and any(r[3] for r in first)  # a real run, with traffic
    assert first == second


def test_a_different_seed_gives_different_election_timing():
    timings = {seed: first_campaign(seed) for seed in range(6)}
    assert len(set(timings.values())) > 1, timings
    # and the first campaign always comes within the randomized window [election, 2 * election)
    assert all(ELECTION <= t < 2 * ELECTION for t, _ in timings.values()), timings
    assert replay(7) != replay(8)


# =========================================================================== the Ready contract


class ContractSimulation(Simulation):
    """The fault simulator, checking at each send that the message's promises are already on disk."""

    def __init__(self, seed: int, nodes: int, mode: str) -> None:
        super().__init__(seed, nodes, mode)
        self.checked = {"vote": 0, "ack": 0}

    def _send(self, message: Message) -> None:
        disk = self.nodes[message.from_].disk
        if message.type is MessageType.VOTE or (message.type is MessageType.VOTE_RESP and not message.reject):
            candidate = message.from_ if message.type is MessageType.VOTE else message.to
            # the vote for `candidate` in this term was in this Ready's hard state or an earlier one
            assert disk.hard_state.term == message.term, (message, disk.hard_state)
            assert disk.hard_state.vote == candidate, (message, disk.hard_state)
            self.checked["vote"] += 1
        if message.type is MessageType.APPEND_RESP and not message.reject and message.index > 0:
            # everything up to the acknowledged index was in this Ready's entries or an earlier one's
            snap_index = disk.snapshot.meta.index if disk.snapshot else 0
            last = disk.entries[-1].index if disk.entries else snap_index
            assert last >= message.index, (message, last)
            raft = self.nodes[message.from_].raft
            assert raft is not None
            if message.index > snap_index:
                assert disk.entries[message.index - snap_index - 1].term == raft.log.term(message.index)
            self.checked["ack"] += 1
        super()._send(message)


@pytest.mark.parametrize("mode", [STABLE, ON_DEMAND])
def test_votes_and_acknowledgements_never_outrun_the_disk(mode):
    checked = {"vote": 0, "ack": 0}
    for seed in range(12):
        sim = ContractSimulation(seed, (3, 5)[seed % 2], mode)
        for _ in range(1500):
            sim.random_step()
        sim.heal()
        for key in checked:
            checked[key] += sim.checked[key]
    assert checked["vote"] > 50 and checked["ack"] > 500, checked  # the checks really ran


def test_a_vote_is_persisted_in_the_ready_that_sends_it():
    net = Net()
    net.nodes["n1"].campaign()
    ready = net.nodes["n1"].ready()
    votes = [m for m in ready.messages if m.type is MessageType.VOTE]
    assert votes and ready.hard_state == HardState(votes[0].term, "n1", 1)
    net.nodes["n2"].step(votes[0])
    ready = net.nodes["n2"].ready()
    grant = [m for m in ready.messages if m.type is MessageType.VOTE_RESP]
    assert grant and not grant[0].reject
    assert ready.hard_state is not None and (ready.hard_state.term, ready.hard_state.vote) == (votes[0].term, "n1")


# =========================================================================== basics


def test_a_single_node_cluster_elects_itself_and_commits_at_once():
    net = Net(("solo",))
    run_until(net, lambda: net.leader() == "solo", 2 * ELECTION)
    node = net.nodes["solo"]
    assert not net.queue  # there is nobody to talk to
    for i in range(3):
        node.propose(f"x{i}".encode())
        ready = node.ready()
        assert [e.data for e in ready.entries] == [f"x{i}".encode()]
        assert [e.data for e in ready.committed] == [f"x{i}".encode()]  # persisted and applied in one go
        assert ready.hard_state is not None and ready.hard_state.commit == ready.entries[-1].index
        assert ready.messages == []


def test_propose_on_a_follower_goes_to_the_leader():
    net = Net()
    net.elect("n1")
    net.nodes["n2"].propose(b"via-n2")
    ready = net.nodes["n2"].ready()
    assert [(m.type, m.to, m.data, m.term) for m in ready.messages] == [(MessageType.PROPOSE, "n1", b"via-n2", 0)]
    assert ready.entries == []  # a follower appends nothing itself
    net.queue.extend(ready.messages)
    net.deliver()
    net.tick()
    for node_id in IDS3:
        assert net.committed(node_id) == [b"via-n2"]


def test_propose_without_a_leader_is_dropped():
    net = Net()
    with pytest.raises(ProposalDropped, match="no leader"):
        net.nodes["n2"].propose(b"early")
    net.elect("n1")
    net.cut.update({"n1", "n2"})  # n2 alone: it campaigns, cannot win, and forgets the leader
    run_until(net, lambda: net.nodes["n2"].leader is None, 4 * ELECTION)
    with pytest.raises(ProposalDropped):
        net.nodes["n2"].propose(b"orphan")
    assert all(m.type is not MessageType.PROPOSE for m in net.nodes["n2"].ready().messages)


def test_a_restarted_node_keeps_its_term_vote_and_log_and_never_votes_twice():
    net = Net()
    net.elect("n1")
    for i in range(5):
        net.propose("n1", f"e{i}".encode())
    net.deliver()
    n2 = net.nodes["n2"]
    before = (n2.term, n2.vote, n2.log.committed, list(n2.log.entries))
    assert before[1] == "n1"

    restarted = net.start("n2")  # from what MemoryStorage holds, nothing else
    assert (restarted.term, restarted.vote, list(restarted.log.entries)) == (before[0], before[1], before[3])
    assert restarted.log.committed <= before[2]

    # n3, with a log as good as n1's, asks n2 for its vote in the term n2 already voted in: refused.
    n3 = net.nodes["n3"]
    request = Message(MessageType.VOTE, "n2", "n3", restarted.term, index=n3.log.last_index(),
                      log_term=n3.log.last_term())
    restarted.step(request)
    answer = [m for m in restarted.ready().messages if m.type is MessageType.VOTE_RESP]
    assert answer and answer[0].reject
    # The same candidate asking again (a retransmission) still gets its vote.
    restarted.step(Message(MessageType.VOTE, "n2", "n1", restarted.term, index=restarted.log.last_index(),
                           log_term=restarted.log.last_term()))
    answer = [m for m in restarted.ready().messages if m.type is MessageType.VOTE_RESP]
    assert answer and not answer[0].reject

    # Control: a node that had lost its hard state would have voted for n3 — the test can tell.
    amnesiac = RaftNode(net.raft_config("n2"), random.Random(1), hard_state=HardState(before[0] - 1),
                        entries=list(before[3]))
    amnesiac.step(request)
    assert not next(m for m in amnesiac.ready().messages if m.type is MessageType.VOTE_RESP).reject


# =========================================================================== fast back-tracking


def divergent_cluster(leader_terms: list[int], follower_terms: list[int]) -> Net:
    """n1 and n2 share a log whose entries after index 10 have `leader_terms`; n3 diverged after
    index 10 with entries of `follower_terms` (old leaders that were cut off while accepting)."""
    bootstrap = Entry(1, 1, EntryKind.CONFIG, encode_bootstrap(IDS3))
    prefix = [bootstrap] + [Entry(2, i, data=b"common") for i in range(2, 11)]
    tail = [Entry(term, 11 + k, data=b"new") for k, term in enumerate(leader_terms)]
    stale = [Entry(term, 11 + k, data=b"stale") for k, term in enumerate(follower_terms)]
    top = max(leader_terms + follower_terms)
    net = Net()
    for node_id, entries, term in (("n1", prefix + tail, top), ("n2", prefix + tail, top),
                                   ("n3", prefix + stale, max(follower_terms, default=2))):
        storage = net.storage[node_id] = MemoryStorage()
        storage.append(entries)
        storage.set_hard_state(HardState(term, None, 10))
        net.start(node_id)
    net.readies.clear()
    return net


@pytest.mark.parametrize(
    ("leader_terms", "follower_terms", "bound"),
    [
        ([4] * 200, [3] * 200, 1),  # one old term against one newer term, 200 entries each
        ([4] * 100 + [5] * 100, [3] * 200, 2),  # the leader's tail spans two terms
        ([4] * 70 + [5] * 70 + [7] * 60, [3] * 300, 3),  # three terms, follower even longer
        ([4] * 100 + [6] * 100, [3] * 100 + [5] * 100, 2),  # both sides span two terms, interleaved
        ([4] * 10, [3] * 200, 1),  # follower much longer than the leader
        ([4] * 200, [], 1),  # follower simply behind: its log ends at 10
    ],
    ids=["one-term", "two-terms", "three-terms", "interleaved", "long-follower", "short-follower"],
)
def test_a_long_divergent_tail_is_repaired_in_a_few_round_trips(leader_terms, follower_terms, bound):
    # Walking back one entry per rejection would take ~200 round trips; hints skip a term at a time.
    net = divergent_cluster(leader_terms, follower_terms)
    rejections = []
    net.on_message = lambda m: rejections.append(m) if m.type is MessageType.APPEND_RESP and m.reject else None
    net.elect("n1")
    net.tick(2)
    leader, follower = net.nodes["n1"].log, net.nodes["n3"].log
    assert follower.entries == leader.entries and follower.committed == leader.committed
    assert all(e.data != b"stale" for e in follower.entries)
    assert 1 <= len([m for m in rejections if m.from_ == "n3"]) <= bound, rejections


# =========================================================================== check-quorum


@pytest.mark.parametrize("phase", range(0, ELECTION, 3))
def test_an_isolated_leader_steps_down_within_two_election_timeouts(phase):
    net = Net()
    net.elect("n1")
    net.tick(phase)  # isolation can start anywhere in the leader's check-quorum window
    net.cut.add("n1")
    leader = net.nodes["n1"]
    ticks = run_until(net, lambda: leader.role is not Role.LEADER, 2 * ELECTION)
    assert ticks <= 2 * ELECTION and leader.leader is None


def test_without_check_quorum_an_isolated_leader_stays_and_a_connected_one_never_leaves():
    net = Net(check_quorum=False)
    net.elect("n1")
    net.cut.add("n1")
    net.tick(10 * ELECTION)
    assert net.nodes["n1"].role is Role.LEADER  # so it is check-quorum that makes the leader step down

    net = Net()
    net.elect("n1")
    net.tick(10 * ELECTION)
    assert net.leader() == "n1" and net.nodes["n1"].term == net.nodes["n2"].term


# =========================================================================== on-demand mode


def deliver_until(net: Net, done: Callable[[], bool]) -> None:
    while not done():
        assert net.deliver_one(), "ran out of messages"


def test_on_demand_request_at_a_follower_is_forwarded_and_decided_once():
    net = Net(mode=ON_DEMAND)
    net.nodes["n1"].request(b"first", b"spec")
    net.process("n1")
    deliver_until(net, lambda: net.nodes["n2"].leader == "n1")  # n1 is working on "first"
    net.nodes["n2"].request(b"second", b"spec")
    ready = net.nodes["n2"].ready()
    assert [(m.type, m.to, m.context, m.term) for m in ready.messages] == [
        (MessageType.PROPOSE, "n1", b"second", 0)]
    net.readies.append(("n2", ready))
    net.queue.extend(ready.messages)
    net.deliver()
    net.tick(3 * ELECTION)
    for node_id in IDS3:
        ids = [d.request_id for d in net.decisions(node_id)]
        assert sorted(ids) == [b"first", b"second"], node_id
        assert all(d.leader == "n1" for d in net.decisions(node_id))
    assert ("n2", "campaign") not in net.events()  # the follower did not stand for election


def test_on_demand_duplicate_request_ids_are_decided_once():
    net = Net(mode=ON_DEMAND)
    duplicated: list[Message] = []

    def twice(message: Message) -> None:
        if message.type is MessageType.PROPOSE and not duplicated:
            duplicated.append(message)
            net.queue.appendleft(message)  # the network delivers this PROPOSE a second time, at once

    net.nodes["n1"].request(b"work", b"spec")
    net.process("n1")
    deliver_until(net, lambda: net.nodes["n3"].leader == "n1")
    net.on_message = twice
    net.nodes["n3"].request(b"dup", b"spec")
    net.nodes["n3"].request(b"dup", b"spec")  # the same id twice at one node
    net.process("n3")
    net.deliver()
    net.tick(3 * ELECTION)
    assert duplicated and duplicated[0].context == b"dup"
    # And again at another node after the decision committed, and a late copy of the PROPOSE.
    net.nodes["n2"].request(b"dup", b"spec")
    net.nodes["n2"].request(b"other", b"spec")  # so that a leader is at work when the late copy lands
    net.process("n2")
    net.queue.append(duplicated[0])
    net.deliver()
    net.tick(3 * ELECTION)
    for node_id in IDS3:
        ids = [d.request_id for d in net.decisions(node_id)]
        assert sorted(ids) == [b"dup", b"other", b"work"], (node_id, ids)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["n1", "n2", "n3", "n4", "n10"]),
                       st.sampled_from([0.0, 0.25, 0.5, 1.0]), min_size=1), st.randoms())
def test_least_loaded_node_breaks_ties_by_smallest_id(loads, rnd):
    items = list(loads.items())
    rnd.shuffle(items)  # insertion order must not matter
    chosen = least_loaded_node(dict(items))
    lowest = min(loads.values())
    assert chosen == sorted(n for n, load in loads.items() if load == lowest)[0]


def test_least_loaded_node_examples():
    assert least_loaded_node({"n3": 0.1, "n1": 0.1, "n2": 0.5}) == "n1"
    assert least_loaded_node({"n2": 0.7, "n10": 0.7}) == "n10"  # string order, as every node computes it
    assert least_loaded_node({"n9": 0.2}) == "n9"


def test_on_demand_phase_events_for_one_request_on_an_idle_cluster():
    net = Net(mode=ON_DEMAND)
    net.tick(5 * ELECTION)
    assert not net.events() and net.leader() is None  # idle: nobody campaigns
    net.nodes["n2"].request(b"job", b"spec")
    net.process("n2")
    net.deliver()
    net.tick(3 * ELECTION)
    phases = [phase for node, phase in net.events()]
    collapsed = [p for i, p in enumerate(phases) if i == 0 or not (p == "vote" and phases[i - 1] == "vote")]
    assert collapsed == ["request", "campaign", "vote", "elected", "chosen", "appended", "committed", "pause"]
    assert {node for node, _ in net.events()} == {"n2"}  # the requester did all the work
    with_request = [e for _, r in net.readies for e in r.events if e.phase in ("request", "chosen", "appended",
                                                                              "committed")]
    assert all(e.request == b"job" for e in with_request)
    assert net.leader() is None  # and paused again


def test_an_on_demand_leader_that_is_held_does_not_pause_until_released():
    net = Net(mode=ON_DEMAND)
    net.nodes["n2"].request(b"job", b"spec")
    for node in net.nodes.values():
        node.hold(True)  # the ledger above has a block to certify, say
    net.process("n2")
    net.deliver()
    net.tick(3 * ELECTION)
    assert net.leader() == "n2"  # decided, committed, and still leading
    assert "pause" not in [phase for _, phase in net.events()]
    net.nodes["n2"].hold(False)
    net.tick(2 * ELECTION)
    assert net.leader() is None and "pause" in [phase for _, phase in net.events()]


# =========================================================================== configuration


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mode": "x"},
        {"mode": "ON-DEMAND"},
        {"election_ticks": 1, "heartbeat_ticks": 1},
        {"election_ticks": 3, "heartbeat_ticks": 5},
        {"heartbeat_ticks": 0},
    ],
)
def test_bad_configs_are_refused(kwargs):
    with pytest.raises(UsageError):
        RaftConfig("n1", IDS3, **kwargs)


def test_good_configs_are_accepted():
    assert RaftConfig("n1", IDS3, mode=ON_DEMAND, election_ticks=2, heartbeat_ticks=1).election_ticks == 2


# =========================================================================== membership


def test_removing_the_leader_hands_over_to_the_remaining_voters():
    net = Net()
    old = net.elect("n1")
    net.tick(1)
    old.propose_conf_change("remove", "n1")
    net.process("n1")
    mark = len(net.readies)
    old_term = old.term
    removal = old.log.last_index()
    net.deliver()
    assert old.log.committed >= removal and old.role is not Role.LEADER  # steps down once it commits
    assert net.nodes["n2"].voters == net.nodes["n3"].voters == {"n2", "n3"}

    run_until(net, lambda: net.leader() in ("n2", "n3"), 4 * ELECTION)
    new = net.leader()
    assert new is not None and net.nodes[new].term > old_term
    net.propose(new, b"after-removal")
    net.deliver()
    net.tick(2)
    for node_id in ("n2", "n3"):
        assert b"after-removal" in net.committed(node_id)
    net.tick(10 * ELECTION)
    assert net.leader() == new and old.role is Role.FOLLOWER  # the removed node never disrupts
    assert all(m.from_ != "n1" or m.type not in (MessageType.PRE_VOTE, MessageType.VOTE)
               for _, r in net.readies[mark:] for m in r.messages)


# =========================================================================== regressions: bugs these tests found, now fixed


def committed_events(net: Net) -> dict[bytes, int]:
    counts: dict[bytes, int] = {}
    for _, ready in net.readies:
        for event in ready.events:
            if event.phase == "committed":
                counts[event.request] = counts.get(event.request, 0) + 1
    return counts


def test_each_decision_gets_exactly_one_committed_event():
    net = Net(mode=ON_DEMAND)
    net.nodes["n1"].request(b"first", b"spec")
    net.process("n1")
    deliver_until(net, lambda: net.nodes["n2"].leader == "n1")
    for i in range(100):  # a burst at the working leader: appends of 64 entries, commit moves in steps
        net.nodes["n1"].request(f"r{i}".encode(), b"spec")
    net.process("n1")
    net.deliver()
    net.tick(3 * ELECTION)
    assert len(net.decisions("n1")) == 101
    counts = committed_events(net)
    assert counts.keys() == {d.request_id for d in net.decisions("n1")}
    assert set(counts.values()) == {1}, {k: v for k, v in counts.items() if v != 1}


def test_a_large_commit_step_reports_every_decision():
    net = Net(mode=ON_DEMAND, max_append_entries=1000)
    net.nodes["n1"].request(b"first", b"spec")
    net.process("n1")
    deliver_until(net, lambda: net.nodes["n2"].leader == "n1")
    net.cut.update({"n2", "n3"})  # the followers hear nothing while 100 decisions are appended
    for i in range(100):
        net.nodes["n1"].request(f"r{i}".encode(), b"spec")
    net.process("n1")
    net.cut.clear()
    net.tick(3 * ELECTION)  # one append carries all 100; the commit index jumps past them at once
    assert len(net.decisions("n2")) == 101
    assert {f"r{i}".encode() for i in range(100)} <= committed_events(net).keys()


def test_stable_mode_retries_a_request_whose_forward_was_lost():
    net = Net()
    net.elect("n1")
    net.tick(2)
    net.nodes["n2"].request(b"lost-once", b"spec")
    lost = net.nodes["n2"].ready()  # the PROPOSE to the leader is lost on the way
    assert [m.type for m in lost.messages] == [MessageType.PROPOSE]
    net.tick(5 * ELECTION)  # a healthy leader, heartbeats every tick
    assert [d.request_id for d in net.decisions("n1")] == [b"lost-once"]


def test_single_node_on_demand_events_come_in_phase_order():
    net = Net(("solo",), mode=ON_DEMAND)
    net.nodes["solo"].request(b"job", b"spec")
    net.process("solo")
    net.tick(2)
    assert [phase for _, phase in net.events()] == [
        "request", "campaign", "elected", "chosen", "appended", "committed", "pause"]


# =========================================================================== commit notices


@pytest.mark.parametrize("mode", [STABLE, ON_DEMAND])
def test_followers_learn_a_commit_from_the_next_heartbeat_in_stable_mode_and_at_once_on_demand(mode):
    net = Net(mode=mode)
    leader = net.elect("n1")
    net.propose("n1", b"x")
    sent_after_commit: list[Message] = []

    def watch(message: Message) -> None:
        if leader.log.committed >= leader.log.last_index() and message.from_ == "n1":
            sent_after_commit.append(message)

    net.on_message = watch
    net.deliver()  # appends out, acknowledgements back: the leader commits, nothing ticks
    assert leader.log.committed == leader.log.last_index()
    followers = [net.nodes["n2"], net.nodes["n3"]]
    if mode == STABLE:
        # No notice of its own: that would be two more messages each way for every block.
        assert not sent_after_commit
        assert all(f.log.committed < leader.log.committed for f in followers)
        net.tick(ELECTION)  # heartbeats carry the commit index
    else:
        assert sent_after_commit  # an on-demand leader may pause instead of heartbeating: it tells at once
    assert all(f.log.committed == leader.log.committed for f in followers)
    assert [b"x"] == [d for d in net.committed("n2") if d == b"x"]


def test_a_stable_leader_announces_its_commit_index_at_once_when_asked_and_a_follower_is_a_no_op():
    # What the ledger asks for when a commit has an actuator command waiting for its certificate.
    net = Net()
    leader = net.elect("n1")
    net.propose("n1", b"x")
    net.deliver()
    followers = [net.nodes["n2"], net.nodes["n3"]]
    assert all(f.log.committed < leader.log.committed for f in followers)  # lazily, as above
    net.nodes["n2"].announce_commit()  # not the leader: nothing to announce
    net.process("n2")
    assert not net.queue
    leader.announce_commit()
    net.process("n1")
    assert {(m.type, m.to) for m in net.queue} == {(MessageType.HEARTBEAT, "n2"), (MessageType.HEARTBEAT, "n3")}
    net.deliver()  # no tick: the announcement alone tells them
    assert all(f.log.committed == leader.log.committed for f in followers)
    assert b"x" in net.committed("n3")


@pytest.mark.parametrize("mode", [STABLE, ON_DEMAND])
def test_what_a_new_leader_proposes_before_its_first_ready_rides_in_its_first_append(mode):
    # An on-demand election is triggered by a request: the new leader's no-op and the entry that
    # request leads to go to the followers in one append (one replication round trip), not the
    # no-op alone with the next entry held back until the followers answer it.
    net = Net(mode=mode)
    candidate = net.nodes["n1"]
    candidate.campaign()
    net.process("n1")
    # As the node daemon does: a batch of messages is stepped, then the appliers propose
    # (after_input), and only then is the Ready taken.
    while candidate.role is not Role.LEADER:
        message = net.queue.popleft()
        if message.to == "n1":
            candidate.step(message)
        else:
            net.nodes[message.to].step(message)
            net.process(message.to)
    candidate.propose(b"placement")
    net.process("n1")
    appends = [m for m in net.queue if m.type is MessageType.APPEND and m.from_ == "n1"]
    assert {m.to for m in appends} == {"n2", "n3"}
    for append in appends:
        assert [e.kind for e in append.entries] == [EntryKind.NOOP, EntryKind.NORMAL]
        assert append.entries[-1].data == b"placement"
    net.deliver()  # one round trip: the followers' answers commit both
    assert b"placement" in net.committed("n1")
    assert all(net.nodes[f].log.last_index() == candidate.log.last_index() for f in ("n2", "n3"))
