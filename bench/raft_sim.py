"""What the Raft core costs in CPU, and how close durable Raft storage gets to the disk.

    .venv/bin/python bench/raft_sim.py [--quick] [--dir /var/lib/tomq]

(a) Simulated throughput of the sans-IO core, in CPU time (`time.process_time()`), with every node in
    this process, no faults and every message delivered: entries committed (and applied on every
    node) per CPU-second in stable mode for 3 and 5 nodes, proposals submitted in batches to the
    leader; and on-demand placement decisions per CPU-second, one request at a time on an idle
    cluster (each one is an election, a decision, a commit and a pause). The CPU-second is the sum
    over all nodes, as they share one process: a real node spends roughly 1/N of it. Nothing is
    persisted here; that cost is (b).
(b) Durable appends per second (wall time, since fsync waits for the disk): `FileStorage.append` of one
    ~200-byte entry plus `sync()` each, against a bare `os.write` + `os.fsync` loop of the same record
    size in the same directory, interleaved run by run so both see the same disk weather.

Every figure is the median of 5 runs. A benchmark, never a test.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from tomq.node.raft.core import ON_DEMAND, STABLE, RaftConfig, RaftNode, Role
from tomq.node.raft.messages import Message
from tomq.node.raft.storage import FileStorage
from tomq.node.raft.types import Entry, EntryKind

REPEATS = 5
PAYLOAD = 200
RECORD = 27 + PAYLOAD  # FileStorage's record header plus the payload, so both loops write the same bytes
ELECTION_TICKS = 10


# --------------------------------------------------------------------------- (a) the core in CPU time


class Cluster:
    """Nodes in one process: every Ready's messages are delivered, in order, nothing is persisted."""

    def __init__(self, nodes: int, mode: str, seed: int) -> None:
        ids = tuple(f"n{i}" for i in range(1, nodes + 1))
        self.nodes = {
            node_id: RaftNode(RaftConfig(node_id, ids, mode=mode, election_ticks=ELECTION_TICKS),
                              random.Random(f"{seed}/{node_id}"))
            for node_id in ids
        }
        self.queue: deque[Message] = deque()
        self.applied = dict.fromkeys(ids, 0)  # NORMAL and DECISION entries applied per node
        for node_id in ids:
            self.process(node_id)

    def process(self, node_id: str) -> None:
        node = self.nodes[node_id]
        while node.has_ready():
            ready = node.ready()
            self.queue.extend(ready.messages)
            self.applied[node_id] += sum(1 for e in ready.committed if e.kind in (EntryKind.NORMAL, EntryKind.DECISION))

    def deliver(self) -> None:
        while self.queue:
            message = self.queue.popleft()
            self.nodes[message.to].step(message)
            self.process(message.to)

    def tick(self) -> None:
        for node_id, node in self.nodes.items():
            node.tick()
            self.process(node_id)
        self.deliver()

    def all_applied(self, count: int) -> bool:
        return min(self.applied.values()) >= count


def stable_rate(nodes: int, entries: int, batch: int, seed: int) -> float:
    """Entries committed and applied on every node per CPU-second, proposals in batches at the leader."""
    cluster = Cluster(nodes, STABLE, seed)
    leader = cluster.nodes["n1"]
    leader.campaign()
    cluster.process("n1")
    cluster.deliver()
    assert leader.role is Role.LEADER
    data = os.urandom(PAYLOAD)
    start = time.process_time()
    proposed = 0
    while proposed < entries:
        for _ in range(min(batch, entries - proposed)):
            leader.propose(data)
            proposed += 1
        cluster.process("n1")
        cluster.deliver()
        cluster.tick()  # heartbeats carry the final commit index to the followers
    while not cluster.all_applied(entries):
        cluster.tick()
    elapsed = time.process_time() - start
    return entries / elapsed


def on_demand_rate(nodes: int, requests: int, seed: int) -> float:
    """Placement decisions per CPU-second: each request arrives at an idle cluster and is decided alone."""
    cluster = Cluster(nodes, ON_DEMAND, seed)
    ids = sorted(cluster.nodes)
    start = time.process_time()
    for k in range(requests):
        at = ids[k % len(ids)]
        cluster.nodes[at].request(f"req-{k}".encode(), b"spec")
        cluster.process(at)
        cluster.deliver()
        ticks = 0
        while not cluster.all_applied(k + 1) or any(n.role is Role.LEADER for n in cluster.nodes.values()):
            cluster.tick()  # until decided everywhere and paused again
            ticks += 1
            assert ticks < 50 * ELECTION_TICKS, "on-demand request not decided"
    elapsed = time.process_time() - start
    return requests / elapsed


def median_of(runs: int, bench: Callable[..., float], *args: int) -> float:
    """Median over `runs` seeds of bench(*args, seed)."""
    return statistics.median(bench(*args, seed) for seed in range(runs))


# --------------------------------------------------------------------------- (b) storage against the disk


def storage_rate(directory: Path, entries: int) -> float:
    data = os.urandom(PAYLOAD)
    batch = [Entry(1, i, data=data) for i in range(1, entries + 1)]  # built outside the timed loop
    with FileStorage(directory) as storage:
        start = time.perf_counter()
        for entry in batch:
            storage.append([entry])
            storage.sync()
        return entries / (time.perf_counter() - start)


def bare_rate(directory: Path, entries: int) -> float:
    record = os.urandom(RECORD)
    fd = os.open(directory / "bare", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        start = time.perf_counter()
        for _ in range(entries):
            os.write(fd, record)
            os.fsync(fd)
        return entries / (time.perf_counter() - start)
    finally:
        os.close(fd)


def storage_medians(root: Path, entries: int, runs: int) -> tuple[float, float]:
    storage: list[float] = []
    bare: list[float] = []
    for _ in range(runs):  # interleaved: a slow moment of the disk hits both
        with tempfile.TemporaryDirectory(dir=root) as directory:
            storage.append(storage_rate(Path(directory), entries))
        with tempfile.TemporaryDirectory(dir=root) as directory:
            bare.append(bare_rate(Path(directory), entries))
    return statistics.median(storage), statistics.median(bare)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small workloads: a smoke run in a few seconds")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()),
                        help="where the storage benchmark writes (use the node's real data disk)")
    args = parser.parse_args(argv)
    entries = 2_000 if args.quick else 20_000
    batch = 64
    requests = 50 if args.quick else 500
    appends = 200 if args.quick else 2_000

    print(f"raft core, CPU time, median of {REPEATS} runs{' (quick)' if args.quick else ''}")
    rates: dict[int, float] = {}
    for nodes in (3, 5):
        rates[nodes] = median_of(REPEATS, stable_rate, nodes, entries, batch)
        print(f"  stable, {nodes} nodes: {rates[nodes]:>10,.0f} entries committed/CPU-s "
              f"({entries} entries of {PAYLOAD} B, batches of {batch}; "
              f"{rates[nodes] * nodes:,.0f} node-entries/CPU-s)")
    print(f"  stable, 5 nodes / 3 nodes: {rates[5] / rates[3]:.2f}")
    for nodes in (3, 5):
        rate = median_of(REPEATS, on_demand_rate, nodes, requests)
        print(f"  on-demand, {nodes} nodes: {rate:>10,.0f} placement decisions/CPU-s "
              f"({requests} requests, one at a time: election + decision + commit + pause each)")

    print(f"storage, wall time, {appends} appends of one {PAYLOAD} B entry + fsync each, in {args.dir}, "
          f"median of {REPEATS}")
    storage, bare = storage_medians(args.dir, appends, REPEATS)
    print(f"  FileStorage append+sync: {storage:>10,.0f}/s")
    print(f"  bare os.write+os.fsync:  {bare:>10,.0f}/s")
    print(f"  ratio storage/bare: {storage / bare:.2f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
