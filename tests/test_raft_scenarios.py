"""Named Raft scenarios, each a classic trap, driven step by step through the simulator.

Sections cite Ongaro & Ousterhout, "In Search of an Understandable Consensus Algorithm" (2014), and
Ongaro's thesis (2014) where pre-vote, leader lease and single-server changes come from.
"""

from __future__ import annotations

import pytest

from raft_sim import ELECTION_TICKS, Simulation
from tomq import canonical
from tomq.node.raft.core import ON_DEMAND, STABLE, Decision, ProposalDropped, Role
from tomq.node.raft.types import EntryKind


def isolate(sim: Simulation, node: str) -> None:
    for other in sim.nodes:
        if other != node:
            sim.blocked.update({(node, other), (other, node)})


def elect(sim: Simulation, node: str) -> None:
    raft = sim.nodes[node].raft
    assert raft is not None
    raft.campaign()
    sim.process(sim.nodes[node])
    sim.stabilize()
    assert raft.role is Role.LEADER, raft.status()


def become_leader_quietly(sim: Simulation, node: str) -> None:
    """Campaign and deliver only until `node` wins: its first appends are still in flight."""
    raft = sim.nodes[node].raft
    assert raft is not None
    raft.campaign()
    sim.process(sim.nodes[node])
    while raft.role is not Role.LEADER:
        assert sim.deliver_one(), "election did not finish"


def propose(sim: Simulation, node: str, data: bytes) -> None:
    raft = sim.nodes[node].raft
    assert raft is not None
    raft.propose(data)
    sim.process(sim.nodes[node])


def applied_data(sim: Simulation, node: str) -> list[bytes]:
    return [data for _, _, data in sim.nodes[node].applied]


def ticks(sim: Simulation, count: int) -> None:
    for _ in range(count):
        sim.tick()
        sim.stabilize()


def test_figure_8_an_old_term_entry_is_not_committed_by_counting():
    """§5.4.2 and figure 8: a leader may count replicas only for entries of its own term."""
    sim = Simulation(8, 5, STABLE)
    elect(sim, "n1")  # term 2
    isolate(sim, "n1")
    sim.blocked -= {("n1", "n2"), ("n2", "n1")}
    propose(sim, "n1", b"old")  # reaches n2 only
    sim.stabilize()
    index_old = sim.nodes["n1"].raft.log.last_index()
    sim.crash("n1")

    sim.blocked = {(a, b) for a in sim.nodes for b in sim.nodes if "n2" in (a, b) and a != b}
    become_leader_quietly(sim, "n5")  # term 3, votes from n3 and n4
    isolate(sim, "n5")  # its no-op and "new" stay on n5
    propose(sim, "n5", b"new")  # stays on n5
    sim.stabilize()
    sim.crash("n5")

    sim.blocked = set()
    sim.restart("n1")
    sim.blocked = {(a, b) for a in sim.nodes for b in sim.nodes if "n4" in (a, b) and a != b}
    raft1 = sim.nodes["n1"].raft
    for _ in range(3):  # the first try may land in term 3, where n3 already voted for n5
        raft1.campaign()
        sim.process(sim.nodes["n1"])
        sim.stabilize()
        if raft1.role is Role.LEADER:
            break
    assert raft1.role is Role.LEADER and raft1.term >= 4  # votes from n2 and n3
    # Let the append reach n3 (which then holds "old") but no one else gets the term-4 entry.
    assert raft1.log.term(index_old) == 2
    holders = [n for n in ("n1", "n2", "n3") if sim.nodes[n].raft.log.term(index_old) == 2]
    assert len(holders) == 3, "old entry is now on a majority"
    # Majority holds it, but its term is not the leader's: it must not be committed by counting alone,
    # unless the leader's own no-op has reached a majority too (which commits both, safely).
    noop_index = raft1.log.last_index()
    noop_holders = [n for n in ("n1", "n2", "n3") if sim.nodes[n].raft.log.term(noop_index) == raft1.term]
    assert (raft1.log.committed >= index_old) == (len(noop_holders) >= 3)

    # Now the dangerous move: block the term-4 entry from spreading further, crash n1, let n5 win.
    sim.crash("n1")
    sim.blocked = set()
    sim.restart("n5")
    raft5 = sim.nodes["n5"].raft
    raft5.campaign()
    sim.process(sim.nodes["n5"])
    sim.stabilize()
    ticks(sim, 3 * ELECTION_TICKS)
    sim.restart("n1")
    ticks(sim, 6 * ELECTION_TICKS)
    # Whatever won, every node applied the same entries (the simulator raises otherwise), and an
    # entry once applied anywhere is applied everywhere.
    logs = {n: applied_data(sim, n) for n in sim.nodes}
    longest = max(logs.values(), key=len)
    for node, applied in logs.items():
        assert applied == longest[: len(applied)], node


def test_the_figure_8_rule_is_what_stops_the_commit(monkeypatch):
    """The same rule, directly: count replicas of a previous-term entry and nothing is committed."""
    sim = Simulation(1, 3, STABLE)
    elect(sim, "n1")
    isolate(sim, "n1")
    propose(sim, "n1", b"stale")  # term 2, only on n1
    sim.stabilize()
    sim.blocked = set()
    raft = sim.nodes["n1"].raft
    # Pretend a later leader (term 3) inherited this log and learnt both followers hold the entry.
    raft.term += 1
    raft.progress = {p: type(raft.progress["n1"])(match=raft.log.last_index()) for p in raft.voters}
    assert raft._maybe_commit() is False
    assert raft.log.committed < raft.log.last_index()


def test_a_partitioned_old_leader_accepts_proposals_that_never_commit():
    sim = Simulation(2, 3, STABLE)
    elect(sim, "n1")
    old_term = sim.nodes["n1"].raft.term
    isolate(sim, "n1")
    propose(sim, "n1", b"doomed")  # the old leader cannot know it is cut off yet
    assert sim.nodes["n1"].raft.log.entry(sim.nodes["n1"].raft.log.last_index()).data == b"doomed"
    ticks(sim, 4 * ELECTION_TICKS)
    # check-quorum: the isolated leader noticed it lost its majority and stepped down
    assert sim.nodes["n1"].raft.role is not Role.LEADER
    new_leader = sim.leader()
    assert new_leader is not None and new_leader.id != "n1" and new_leader.raft.term > old_term
    propose(sim, new_leader.id, b"kept")
    ticks(sim, 2)
    sim.blocked = set()
    ticks(sim, 4 * ELECTION_TICKS)
    for node in sim.nodes:
        assert b"doomed" not in applied_data(sim, node)
        assert b"kept" in applied_data(sim, node)


def test_a_removed_node_that_keeps_calling_elections_does_not_disrupt():
    sim = Simulation(3, 4, STABLE)
    elect(sim, "n1")
    isolate(sim, "n4")  # n4 never learns it was removed
    leader = sim.nodes["n1"].raft
    leader.propose_conf_change("remove", "n4")
    sim.process(sim.nodes["n1"])
    ticks(sim, 3)
    assert "n4" not in leader.voters and leader.log.committed == leader.log.last_index()
    ticks(sim, 3 * ELECTION_TICKS)  # n4 times out, alone, again and again
    sim.blocked = set()
    term_before = leader.term
    for i in range(10):
        ticks(sim, ELECTION_TICKS)
        propose(sim, "n1", f"after-{i}".encode())
    ticks(sim, 2)
    assert sim.leader() is sim.nodes["n1"] and leader.term == term_before
    assert all(f"after-{i}".encode() in applied_data(sim, "n2") for i in range(10))


def test_pre_vote_keeps_a_rejoining_follower_from_bumping_the_term():
    """Thesis §9.6: a node that cannot reach a majority must not inflate everyone's term."""
    sim = Simulation(4, 3, STABLE)
    elect(sim, "n1")
    term = sim.nodes["n1"].raft.term
    isolate(sim, "n3")
    ticks(sim, 10 * ELECTION_TICKS)
    assert sim.nodes["n3"].raft.term == term  # pre-votes failed; the term never moved
    sim.blocked = set()
    ticks(sim, 2 * ELECTION_TICKS)
    assert sim.leader() is sim.nodes["n1"] and sim.nodes["n1"].raft.term == term


def test_a_disk_that_loses_its_unsynced_tail_loses_nothing_acknowledged():
    sim = Simulation(5, 3, STABLE)
    elect(sim, "n1")
    for i in range(5):
        propose(sim, "n1", f"safe-{i}".encode())
    sim.stabilize()
    ticks(sim, 1)
    acknowledged = dict(sim.acknowledged)
    assert len(acknowledged) == 5
    # n2 loses power while writing the next batch: part of it never reaches the disk.
    sim.crash_during_persist = 1.0
    propose(sim, "n1", b"in-flight")
    for _ in range(20):
        if sim.nodes["n2"].raft is None:
            break
        sim.deliver_one()
    sim.crash_during_persist = 0.0
    assert sim.nodes["n2"].raft is None or sim.nodes["n1"].raft is None
    for node in list(sim.nodes):
        sim.restart(node)
    ticks(sim, 6 * ELECTION_TICKS)
    leader = sim.leader()
    assert leader is not None
    propose(sim, leader.id, b"after")
    ticks(sim, 3)
    for node in sim.nodes:
        applied = applied_data(sim, node)
        assert all(p in applied for p in acknowledged), node
        assert b"after" in applied


def test_leadership_transfer_hands_over_within_a_few_messages():
    sim = Simulation(6, 5, STABLE)
    elect(sim, "n1")
    sim.nodes["n1"].raft.transfer_leadership("n4")
    sim.process(sim.nodes["n1"])
    sim.stabilize()
    assert sim.leader() is sim.nodes["n4"]
    with pytest.raises(ProposalDropped):
        sim.nodes["n2"].raft.transfer_leadership("n1")


def test_read_index_is_released_after_a_heartbeat_round():
    sim = Simulation(7, 3, STABLE)
    elect(sim, "n1")
    ticks(sim, 1)
    leader = sim.nodes["n1"].raft
    leader.read_index(b"leader-read")
    sim.process(sim.nodes["n1"])
    states = []
    for node in sim.nodes.values():
        original = node.raft.ready

        def capture(original=original):
            ready = original()
            states.extend(ready.read_states)
            return ready

        node.raft.ready = capture  # type: ignore[method-assign]
    sim.stabilize()
    follower = sim.nodes["n2"].raft
    follower.read_index(b"follower-read")
    sim.process(sim.nodes["n2"])
    sim.stabilize()
    contexts = {s.context: s.index for s in states}
    assert contexts.keys() == {b"leader-read", b"follower-read"}
    assert all(index == leader.log.committed for index in contexts.values())


def test_read_index_needs_a_majority():
    sim = Simulation(7, 3, STABLE)
    elect(sim, "n1")
    isolate(sim, "n1")
    leader = sim.nodes["n1"].raft
    leader.read_index(b"cut-off")
    sim.process(sim.nodes["n1"])
    ready = leader.ready()
    assert ready.read_states == []  # a leader that cannot hear a majority must not answer reads


def test_a_lagging_follower_catches_up_from_a_snapshot():
    sim = Simulation(9, 3, STABLE)
    elect(sim, "n1")
    sim.crash("n3")
    for i in range(60):
        propose(sim, "n1", f"e{i}".encode())
        sim.stabilize()
    ticks(sim, 1)
    leader = sim.nodes["n1"].raft
    state = canonical.encode([list(item) for item in sim.nodes["n1"].applied])  # the simulator's state machine
    leader.compact(leader.log.applied, state)
    sim.nodes["n1"].disk.snapshot = leader.log.snapshot
    assert leader.log.snap_index > 50
    sim.restart("n3")
    restored = []
    original = sim.nodes["n3"].raft.ready

    def capture():
        ready = original()
        if ready.restore is not None:
            restored.append(ready.restore.meta.index)
        return ready

    sim.nodes["n3"].raft.ready = capture  # type: ignore[method-assign]
    ticks(sim, 3)
    assert restored == [leader.log.snap_index]
    assert sim.nodes["n3"].raft.log.committed == leader.log.committed


def test_only_one_membership_change_at_a_time():
    sim = Simulation(10, 3, STABLE)
    leader = sim.nodes["n1"].raft
    become_leader_quietly(sim, "n1")
    with pytest.raises(ProposalDropped):  # a new leader must first commit an entry of its own term
        leader.propose_conf_change("add", "n4")
    sim.stabilize()
    ticks(sim, 1)
    leader.propose_conf_change("add", "n4")
    with pytest.raises(ProposalDropped, match="one voter at a time"):
        leader.propose_conf_change("remove", "n2")
    sim._create("n4", ())
    sim.process(sim.nodes["n1"])
    ticks(sim, 5)
    assert sim.nodes["n4"].raft.voters == {"n1", "n2", "n3", "n4"}
    assert sim.nodes["n4"].raft.log.committed == leader.log.committed
    leader.propose_conf_change("remove", "n2")  # the first one is applied: the next may go


def test_on_demand_idles_without_a_leader_and_places_on_the_least_loaded_node():
    sim = Simulation(11, 5, ON_DEMAND)
    loads = {"n1": 0.9, "n2": 0.5, "n3": 0.05, "n4": 0.7, "n5": 0.3}
    for node, load in loads.items():
        sim.nodes[node].raft.set_load(load)
    sent_before = sim._order
    ticks(sim, 20 * ELECTION_TICKS)
    assert sim.leader() is None and sim._order == sent_before  # the pause phase: silence
    events = []
    original = sim.nodes["n2"].raft.ready

    def capture():
        ready = original()
        events.extend(e.phase for e in ready.events)
        return ready

    sim.nodes["n2"].raft.ready = capture  # type: ignore[method-assign]
    sim.nodes["n2"].raft.request(b"req-1", b"collector")
    sim.process(sim.nodes["n2"])
    sim.stabilize()
    ticks(sim, 2)
    decision_entries = [e for e in sim.nodes["n2"].raft.log.entries if e.kind is EntryKind.DECISION]
    assert len(decision_entries) == 1
    decision = Decision.decode(decision_entries[0].data)
    assert decision.chosen == "n3" and decision.leader == "n2"
    assert decision.loads == pytest.approx(loads)  # the winner held the load of every voter
    assert events[:3] == ["request", "campaign", "vote"]
    assert "elected" in events and "chosen" in events and "committed" in events
    ticks(sim, 2 * ELECTION_TICKS)
    assert "pause" in events and sim.leader() is None


def test_on_demand_concurrent_requests_are_both_decided_exactly_once():
    for seed in range(20):
        sim = Simulation(100 + seed, 5, ON_DEMAND)
        sim.nodes["n1"].raft.request(b"a", b"spec")
        sim.nodes["n4"].raft.request(b"b", b"spec")
        sim.process(sim.nodes["n1"])
        sim.process(sim.nodes["n4"])
        for _ in range(30 * ELECTION_TICKS):
            while sim.deliver_one():
                pass
            sim.tick()
            if {b"a", b"b"} <= sim.decided.keys():
                break
        assert {b"a", b"b"} <= sim.decided.keys(), seed
        assert not sim.duplicate_decisions
