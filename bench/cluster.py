"""The replicated ledger end to end, against a 3-member etcd cluster measured in the same run.

    .venv/bin/python bench/cluster.py [--quick] [--brokers amqtt,mosquitto] [--nodes 3,5] [--no-etcd]

For every broker (the embedded amqtt broker as its own process, mosquitto with the ACL tomq emits)
and every cluster size, a fresh cluster of real `tomq node` processes on 127.0.0.1 is started and
measured, as a client sees it (publish on ledger/propose/n1 -> the record's audit line arrives, i.e.
the leader applied its block: a majority holds it):

1. commit latency of one record at a time (p50, p99 of ~200 sequential proposals, from a client
   that publishes and reads on one thread, as the etcd client does), beside the leader's own figure
   from its status report (proposal received -> block applied);
2. throughput: 5,000 records proposed as fast as possible, first publish -> last audit line; beside
   it the ceiling of this machine: raw Ed25519 verifications per second on one core with the
   library the nodes verify with (libsodium, measured here; OpenSSL's rate is printed beside it)
   divided by the number of nodes, as every node verifies every record;
3. leader failover: records stream every 10 ms, the leader is SIGKILLed; the time from the kill
   until the first record proposed after it is committed (the killed node is restarted between runs).

The anchor is a 3-member etcd cluster on loopback with default timing flags (`etcd-server` and
`etcd-client` from Debian), driven through its HTTP/JSON gateway from this process: sequential puts
to the leader (p50, p99), puts from 64 kept-alive connections (throughput), and the time from
SIGKILLing the leader until a put issued after the kill succeeds (puts are started every 10 ms on
the survivors, as records are above). Right before each tomq cluster starts, a fresh etcd cluster
measures its put p50 once more, and that cluster's latency ratio is taken against it: the machine
is shared, and its speed drifts by half within minutes (the Python nodes feel it more than etcd). Each measurement is repeated (3 times by default) and the
median printed; the final table carries the ratios against etcd and the targets of issue 4, and
the CPU each process used during the throughput runs (where the time goes on a small machine).

A run that stops making progress (nothing committed for 20 s) is reported, with where its records
are (certified blocks, uncertified blocks, nowhere) and what each node says, and the rest of that
cluster is skipped; its logs are kept. `--node-args '--tick-ms 10'` passes options to every node.

Every process this script starts runs in its own session and is stopped at the end, also on
Ctrl-C or an error; nothing else is touched. A benchmark, never a test.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

# Run as a script, bench/ is on sys.path, the repository is not: make bench.common importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    PYTHON,
    Processes,
    cpu_seconds,
    cpu_shares,
    free_port,
    interrupted,
    log,
    log_tails,
    median,
    num,
    per_record_ms,
    percentile,
    scheduler_seconds,
    wait_for_port,
    wait_until,
    which,
)
from tomq import canonical, cluster
from tomq.identity import SigningKey
from tomq.mqtt import MqttLink
from tomq.node.cli import write_genesis
from tomq.node.ledger.block import decode_block_file
from tomq.node.status import collect
from tomq.records import DATA, ID_CREATE, Identity, Provenance, Record
from tomq.wire import ClockSequence, seal

ETCD_INSTALL = "apt-get install -y etcd-server etcd-client"
STREAM_EVERY = 0.010  # seconds between records (or puts) streamed through a failover
# Targets of issue 4.
TARGET_LATENCY_RATIO = 3.0
TARGET_THROUGHPUT = 3000.0
TARGET_FAILOVER = 2.0


# --------------------------------------------------------------------------- tomq: cluster and client


def reading(number: int) -> dict[str, Any]:
    digest = hashlib.sha256(f"reading {number}".encode()).digest()
    return Record(DATA, Provenance(f"reading:{number}", digest, "sample:s1", "collect:c1", source="s1"),
                  int(time.time() * 1000)).to_map()


class Stalled(Exception):
    """Records stopped being committed: the measurement cannot finish."""

    def __init__(self, message: str, missing: list[int]) -> None:
        super().__init__(message)
        self.missing = missing


def audit_reader(loaded: cluster.Cluster, key: SigningKey, on_message: Callable[[str, bytes, bool], None], *,
                 threaded: bool = True) -> MqttLink:
    """A started MQTT link, as n1, that hands `on_message` every audit line."""
    link = MqttLink(host="127.0.0.1", port=loaded.broker_port, username="n1",
                    password=cluster.broker_password(key), on_message=on_message, threaded=threaded)
    link.subscribe(f"{loaded.topics.root}/audit/#")
    link.start()
    return link


def our_audit_seq(payload: bytes, proposer_id: str) -> int | None:
    """The sequence number of the record an audit line is about, if `proposer_id` proposed it."""
    try:
        line = json.loads(payload)
    except ValueError:
        return None
    if isinstance(line, dict) and line.get("proposer") == proposer_id and isinstance(line.get("seq"), int):
        return int(line["seq"])
    return None


class Client:
    """Seals readings as n1, proposes them on ledger/propose/n1 and notes when each one's audit line
    (`audit/<state>`, published by the leader once its block is committed) arrives."""

    def __init__(self, directory: Path) -> None:
        loaded = cluster.load(directory)
        self.key = loaded.signing_key("n1")
        self.topic = loaded.topics.ledger_propose("n1")
        self.arrived: dict[int, float] = {}  # seq -> monotonic time its audit line arrived
        self.maps: dict[int, dict[str, Any]] = {}  # seq -> the record map sealed under it
        self.first_seq: dict[int, int] = {}  # seq of a re-proposal -> seq of the first proposal
        self.changed = threading.Condition()
        self.sequence = ClockSequence()  # above anything an earlier client under n1 used
        self.readings = 0
        self.reproposed = 0  # records proposed again because their commit did not show up
        self.link = audit_reader(loaded, self.key, self._on_message)

    def _on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        now = time.monotonic()
        seq = our_audit_seq(payload, self.key.id)
        if seq is not None:
            with self.changed:
                self.arrived.setdefault(self.first_seq.get(seq, seq), now)
                self.changed.notify_all()

    def seal(self, record_map: dict[str, Any]) -> tuple[bytes, int]:
        seq = self.sequence.next()
        self.maps[seq] = record_map
        return seal(self.key, seq=seq, time_ms=int(time.time() * 1000), type="record", body=record_map), seq

    def propose_again(self, seq: int) -> None:
        """Propose the record first sealed as `seq` again, under a new sequence number: the leader
        refuses a sequence number lower than one it has already taken from us."""
        wire, new_seq = self.seal(self.maps[seq])
        with self.changed:
            self.first_seq[new_seq] = seq
        self.propose(wire)

    def next_reading(self) -> tuple[bytes, int]:
        self.readings += 1
        return self.seal(reading(self.readings))

    def propose(self, wire: bytes) -> None:
        self.link.publish(self.topic, wire, qos=1)

    def first_arrival(self, seqs: list[int]) -> float | None:
        with self.changed:
            done = [self.arrived[s] for s in seqs if s in self.arrived]
        return min(done) if done else None

    def wait_all(self, seqs: list[int], quiet: float = 3.0, stall: float = 20.0) -> None:
        """Wait until every record is committed. The missing ones are proposed again after `quiet`
        seconds without progress (not sooner: each one costs the leader a verify); after `stall`
        seconds without progress, give up."""
        progress_at = resent_at = time.monotonic()
        last_count = len(seqs) + 1
        missing = list(seqs)
        while True:
            with self.changed:
                missing = [s for s in missing if s not in self.arrived]
            if not missing:
                return
            if len(missing) < last_count:
                progress_at = resent_at = time.monotonic()
                last_count = len(missing)
            # Polled, not woken by each audit line: a wake-up per line, each scanning every record still
            # missing, was a tenth of this process's CPU, taken from the nodes on a small machine.
            time.sleep(0.05)
            now = time.monotonic()
            if now - progress_at > stall:
                raise Stalled(f"{len(missing)} of {len(seqs)} record(s) not committed, "
                              f"no progress for {stall:.0f} s", missing)
            if now - resent_at > quiet:
                resent_at = now
                self.reproposed += len(missing)
                for seq in missing:
                    self.propose_again(seq)

    def close(self) -> None:
        self.link.stop()


class TomqCluster:
    """A broker and N `tomq node` processes on loopback, in a fresh cluster directory."""

    def __init__(self, processes: Processes, workdir: Path, broker: str, nodes: int,
                 node_args: tuple[str, ...] = (), *, checkout: Path | None = None,
                 env: dict[str, str] | None = None) -> None:
        """`checkout`: run the broker and nodes from another clone of tomq (its .venv and, as the
        working directory, its sources: `python -m tomq` puts the cwd first on sys.path); `env`:
        extra environment for them. Both for bench/ab.py."""
        self.processes = processes
        self.python = str(checkout / ".venv" / "bin" / "python") if checkout is not None else PYTHON
        self.cwd = checkout
        self.env = env or {}
        self.node_args = node_args
        self.workdir = workdir
        self.broker_kind = broker
        self.port = free_port()
        self.directory = workdir / "cluster"
        self.names = [f"n{i}" for i in range(1, nodes + 1)]
        cluster.init(self.directory, self.names, broker=f"127.0.0.1:{self.port}")
        cluster.add_member(self.directory, "s1", "sensor")
        write_genesis(self.directory)
        self.metrics_ports: dict[str, int] = {}  # each node picks a free one and logs it
        self.nodes: dict[str, subprocess.Popen[bytes]] = {}
        self.log_offsets: dict[str, int] = {}
        self.broker: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if self.broker_kind == "mosquitto":
            from tomq.broker.mosquitto import write_mosquitto_config

            binary = which("mosquitto")
            assert binary is not None
            config = write_mosquitto_config(self.directory, self.workdir / "mosquitto", self.port)
            argv = [binary, "-c", str(config)]
        else:
            argv = [self.python, "-m", "tomq", "broker", str(self.directory), "--port", str(self.port)]
        self.broker = self.processes.start(argv, self.workdir / f"{self.broker_kind}.log", cwd=self.cwd, env=self.env)
        wait_for_port(self.port, self.broker)
        for name in self.names:
            self.start_node(name)
        wait_until(lambda: self.leader() is not None, 30, "a leader")

    def start_node(self, name: str) -> None:
        argv = [self.python, "-m", "tomq", "node", str(self.directory), "--id", name, "--host", "127.0.0.1",
                "--port", str(self.port), "--ledger-dir", str(self.workdir / "shared-ledger"),
                "--metrics-port", "0", *self.node_args]
        self.metrics_ports.pop(name, None)
        log_path = self.workdir / f"{name}.log"
        self.log_offsets[name] = log_path.stat().st_size if log_path.exists() else 0
        self.nodes[name] = self.processes.start(argv, log_path, cwd=self.cwd, env=self.env)

    def metrics_port(self, name: str) -> int:
        """The port this run of the node logged (OSError until it has)."""
        if name not in self.metrics_ports:
            with open(self.workdir / f"{name}.log", "rb") as node_log:
                node_log.seek(self.log_offsets[name])
                found = re.search(rb"metrics on http://127\.0\.0\.1:(\d+)/metrics", node_log.read())
            if found is None:
                raise OSError(f"{name} has not logged its metrics port yet")
            self.metrics_ports[name] = int(found.group(1))
        return self.metrics_ports[name]

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """SIGSTOP the broker and every node for a moment (all at once: no timeout fires among them)."""
        processes = [p for p in (self.broker, *self.nodes.values()) if p is not None]
        for process in processes:
            os.kill(process.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            for process in processes:
                os.kill(process.pid, signal.SIGCONT)

    def kill_node(self, name: str) -> None:
        self.processes.kill(self.nodes.pop(name))

    def metrics(self, name: str) -> dict[str, float]:
        """The node's unlabelled Prometheus samples ({} while it is down or starting)."""
        if name not in self.nodes:
            return {}
        try:
            url = f"http://127.0.0.1:{self.metrics_port(name)}/metrics"
            with urllib.request.urlopen(url, timeout=1) as response:
                text = response.read().decode()
        except OSError:
            return {}
        samples = {}
        for line in text.splitlines():
            sample, _, value = line.rpartition(" ")
            if sample and not line.startswith("#") and "{" not in sample:
                with contextlib.suppress(ValueError):
                    samples[sample] = float(value)
        return samples

    def leader(self) -> str | None:
        leaders = []
        for name in self.nodes:
            samples = self.metrics(name)
            if samples.get("tomq_raft_role") == 3:
                leaders.append((samples["tomq_raft_term"], name))
        return max(leaders)[1] if leaders else None

    def leader_figures(self) -> tuple[float | None, float | None]:
        """The leader's own commit latency (proposal received -> block applied), from its status report."""
        time.sleep(1.2)  # reports are retained once a second
        view = collect(str(self.directory), "n1", wait=3)
        row = view["nodes"].get(view["leader"] or "", {})
        return row.get("commit_p50_ms"), row.get("commit_p99_ms")

    def describe(self) -> str:
        """Each node's Raft and ledger progress and refusals, as it reports them."""
        try:
            view = collect(str(self.directory), "n1", wait=3)
        except Exception as exc:
            return f"no status: {exc}"
        rows = []
        for name, r in view["nodes"].items():
            if r.get("reported"):
                refusals = {**r.get("rejected", {}), **r.get("refused", {})}
                rows.append(f"{name} {r.get('role')} commit {r.get('commit')} applied {r.get('applied')} "
                            f"height {r.get('height')} certified {r.get('certified')} pending {r.get('pending')}"
                            + (f" refused {refusals}" if refusals else ""))
        return "; ".join(rows)

    def locate(self, proposer_id: str, seqs: list[int], first_seq: dict[int, int]) -> str:
        """Where the records that never showed up are: certified blocks (so their audit lines were
        lost), blocks applied but not certified, or no block at all (the proposals were lost)."""
        wanted = set(seqs)
        found: dict[str, set[int]] = {"certified": set(), "uncertified": set()}
        stores = [self.directory / "members" / name / "state" / "blocks" for name in self.names]
        for path in sorted(p for store in stores for p in store.glob("*.block")):
            block_file = decode_block_file(path.read_bytes())
            kind = "certified" if block_file.commit_certificate else "uncertified"
            for envelope in block_file.block.records:
                fields = canonical.decode(canonical.decode(envelope)[0], check_canonical=False)
                seq = first_seq.get(fields["seq"], fields["seq"])  # a record proposed again counts as itself
                if fields["from"] == proposer_id and seq in wanted:
                    found[kind].add(seq)
        found["uncertified"] -= found["certified"]
        lost = wanted - found["certified"] - found["uncertified"]
        return (f"of the {len(wanted)} missing: {len(found['certified'])} in certified blocks, "
                f"{len(found['uncertified'])} only in uncertified blocks, {len(lost)} in no block")


# --------------------------------------------------------------------------- tomq: the measurements


def join_sensor(client: Client, directory: Path) -> str:
    """Commit the join of sensor s1 (whose readings the client proposes), then leave the audit lines to
    a LatencyProbe: the client's subscription to them is dropped. Returns that filter, to take it again."""
    proof = (directory / "members" / "s1" / "cert.cbor").read_bytes()
    join, seq = client.seal(Record(ID_CREATE, Identity("s1", "device", proof), int(time.time() * 1000)).to_map())
    client.propose(join)
    client.wait_all([seq], quiet=1.0, stall=30)
    audit_topics = f"{cluster.load(directory).topics.root}/audit/#"
    client.link.unsubscribe(audit_topics)
    return audit_topics


class LatencyProbe:
    """The latency client: one thread, like the etcd client below (sequential puts on one kept-alive
    connection). Its MQTT link is pumped here, so a publish is written on this thread and the audit
    line is read on it, with no hand-off to and from a network thread (paho's threaded mode costs
    each of them a thread wake-up under the GIL, which is the client's time, not the cluster's).
    It seals with the Client's key and sequence, under the same identity (n1)."""

    def __init__(self, client: Client, directory: Path) -> None:
        loaded = cluster.load(directory)
        self.client = client
        self.arrived: dict[int, float] = {}
        self.link = audit_reader(loaded, client.key, self._on_message, threaded=False)

    def _on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        now = time.monotonic()
        seq = our_audit_seq(payload, self.client.key.id)
        if seq is not None:
            self.arrived.setdefault(seq, now)

    def measure(self, count: int, give_up: float = 20.0) -> list[float]:
        """Seconds from publishing one record to its audit line, one record at a time."""
        latencies = []
        for _ in range(count):
            wire, seq = self.client.next_reading()
            started = time.monotonic()
            self.link.publish(self.client.topic, wire, qos=1)
            while seq not in self.arrived:
                if time.monotonic() - started > give_up:
                    raise Stalled(f"record {seq} not committed within {give_up:.0f} s", [seq])
                self.link.pump(0.5)
            latencies.append(self.arrived[seq] - started)
        return latencies

    def close(self) -> None:
        self.link.stop()


def tomq_throughput(client: Client, count: int) -> float:
    """Records per second committed when `count` records are proposed as fast as possible."""
    sealed = dict(client.next_reading()[::-1] for _ in range(count))  # sealed beforehand: not timed
    started = time.monotonic()
    for wire in sealed.values():
        client.propose(wire)
    client.wait_all(list(sealed))
    return count / (max(client.arrived[s] for s in sealed) - started)


class Streamer:
    """Starts `emit(started_at)` every STREAM_EVERY seconds on its own thread until stopped."""

    def __init__(self, emit: Callable[[float], None]) -> None:
        self.emit = emit
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self.stopping.is_set():
            self.emit(time.monotonic())
            next_at += STREAM_EVERY
            self.stopping.wait(max(0.0, next_at - time.monotonic()))

    def __enter__(self) -> Streamer:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stopping.set()
        self.thread.join(10)


def tomq_failover(running: TomqCluster, client: Client) -> float:
    """Seconds from SIGKILLing the leader until the first record proposed after the kill is committed."""
    leader = running.leader()
    assert leader is not None
    proposed: list[tuple[float, int]] = []

    def emit(at: float) -> None:
        wire, seq = client.next_reading()
        proposed.append((at, seq))
        client.propose(wire)

    with Streamer(emit):
        time.sleep(1.0)  # records flow through the old leader first
        killed_at = time.monotonic()
        running.kill_node(leader)

        def first_commit_after_kill() -> float | None:
            return client.first_arrival([seq for at, seq in list(proposed) if at > killed_at])

        wait_until(lambda: first_commit_after_kill() is not None, 30, f"a commit after killing {leader}")
    failover = first_commit_after_kill()
    assert failover is not None
    # Bring the killed node back and let it catch up before the next run.
    running.start_node(leader)
    leaders: list[str | None] = [None]

    def leader_known() -> bool:  # a busy node may answer its metrics late: look again, do not fail at once
        leaders[0] = running.leader()
        return leaders[0] is not None

    wait_until(leader_known, 10, "a leader after restarting the old one")
    new_leader = leaders[0]
    assert new_leader is not None

    def caught_up() -> bool:
        target = running.metrics(new_leader).get("tomq_raft_commit_index", 0)
        return running.metrics(leader).get("tomq_raft_applied_index", -1) >= target > 0

    wait_until(caught_up, 60, f"{leader} to catch up")
    return failover - killed_at


@dataclass
class TomqResult:
    broker: str
    nodes: int
    p50: list[float] = field(default_factory=list)  # seconds, one per run
    p99: list[float] = field(default_factory=list)
    leader_p50_ms: float | None = None
    leader_p99_ms: float | None = None
    throughput: list[float] = field(default_factory=list)
    failover: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # runs that did not complete
    cpu: dict[str, float] = field(default_factory=dict)  # process -> CPU share over the throughput runs
    # Per record of each latency run: process -> (ms on a CPU, ms runnable but waiting for one).
    latency_cpu: list[dict[str, tuple[float, float]]] = field(default_factory=list)
    # etcd's put p50 measured in turns with this cluster's latency runs, one before each (a fresh
    # 3-member etcd, up beside this cluster): the machine is shared and its speed drifts by half
    # within a minute, so each latency run is compared with an etcd run taken a second before it,
    # and the ratio is the median of those per-run ratios.
    anchor_p50: list[float] = field(default_factory=list)

    def latency_ratio(self, etcd: EtcdResult | None) -> float | None:
        """Median over runs of tomq p50 / etcd p50 (the runs' own anchors; else the anchor cluster's)."""
        if self.anchor_p50 and len(self.anchor_p50) == len(self.p50):
            return median([ours / theirs for ours, theirs in zip(self.p50, self.anchor_p50, strict=True)])
        p50, anchor = median(self.p50), median(etcd.p50) if etcd is not None else None
        return None if p50 is None or not anchor else p50 / anchor

    @property
    def label(self) -> str:
        return f"tomq {self.broker} {self.nodes} nodes"


def bench_tomq(processes: Processes, broker: str, nodes: int, args: argparse.Namespace,
               anchor: EtcdCluster | None = None, value: bytes = b"") -> TomqResult:
    """Measure one tomq cluster; with `anchor`, an etcd latency run (puts of `value`) before each of its own."""
    result = TomqResult(broker, nodes)
    workdir = Path(tempfile.mkdtemp(prefix=f"tomq-bench-{broker}-{nodes}-", dir=args.workdir))
    running = TomqCluster(processes, workdir, broker, nodes, tuple(args.node_args.split()))
    client: Client | None = None
    phase, keep = "start", args.keep
    try:
        running.start()
        client = Client(running.directory)
        audit_topics = join_sensor(client, running.directory)
        probe = LatencyProbe(client, running.directory)
        try:
            probe.measure(10)  # warm-up
            for run in range(args.repeats):
                phase = f"latency run {run + 1}"
                if anchor is not None:
                    try:
                        with running.paused():  # its idle ticks and reports must not slow etcd down
                            etcd_p50 = percentile(etcd_latency(anchor, args.latency_count, value), 0.5)
                    except Exception as exc:  # a failed anchor must not cost this cluster's measurement
                        log(f"  etcd beside it failed ({type(exc).__name__}: {exc}); this cluster's ratio is "
                            "taken against the anchor's runs")
                        anchor = None
                        result.anchor_p50.clear()
                    else:
                        result.anchor_p50.append(etcd_p50)
                        log(f"  etcd beside it: latency run {run + 1}: p50 {etcd_p50 * 1000:.2f} ms")
                    probe.measure(10)  # warm-up again: the ticks and reports held up by the pause go first
                watched = {"broker": running.broker, **running.nodes}
                before = scheduler_seconds(watched)
                latencies = probe.measure(args.latency_count)
                result.latency_cpu.append(per_record_ms(before, scheduler_seconds(watched), len(latencies),
                                                        running.leader()))
                result.p50.append(percentile(latencies, 0.5))
                result.p99.append(percentile(latencies, 0.99))
                per_record = result.latency_cpu[-1]
                log(f"  {result.label}: latency run {run + 1}: p50 {result.p50[-1] * 1000:.1f} ms, "
                    f"p99 {result.p99[-1] * 1000:.1f} ms; per record {sum(v[0] for v in per_record.values()):.1f} ms "
                    f"on a CPU, {sum(v[1] for v in per_record.values()):.1f} ms waiting for one")
        finally:
            probe.close()
            client.link.subscribe(audit_topics)
        result.leader_p50_ms, result.leader_p99_ms = running.leader_figures()
        # Failover before throughput: a run that stalls under load then costs the least.
        for run in range(args.failovers):
            phase = f"failover run {run + 1}"
            result.failover.append(tomq_failover(running, client))
            log(f"  {result.label}: failover run {run + 1}: {result.failover[-1]:.2f} s")
        leader = running.leader()
        processes_now = {"broker": running.broker, **running.nodes}
        cpu_before, started = cpu_seconds(processes_now), time.monotonic()
        for run in range(args.repeats):
            phase = f"throughput run {run + 1}"
            client.reproposed = 0
            result.throughput.append(tomq_throughput(client, args.throughput_count))
            log(f"  {result.label}: throughput run {run + 1}: {result.throughput[-1]:.0f} records/s"
                + (f" ({client.reproposed} re-proposed after 3 s without progress)" if client.reproposed else ""))
        result.cpu = cpu_shares(cpu_before, cpu_seconds(processes_now), time.monotonic() - started, leader)
    except (Stalled, TimeoutError) as exc:
        # Note it with what the nodes report, keep the logs, and go on with the next cluster.
        where = f"; {running.locate(client.key.id, exc.missing, client.first_seq)}" if isinstance(exc, Stalled) and client else ""
        result.notes.append(f"{phase}: {exc}{where}; nodes: {running.describe()}; logs kept in {workdir}")
        log(f"  {result.label}: {result.notes[-1]}; the rest of this cluster is skipped")
        keep = True
    except Exception:
        tails = log_tails(workdir, running.names)
        if tails:
            log(tails)
        raise
    finally:
        if client is not None:
            client.close()
        for process in [*running.nodes.values(), running.broker]:
            if process is not None and process in processes.running:
                processes.stop(process)
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return result


# --------------------------------------------------------------------------- the anchor: etcd


class EtcdCluster:
    """Three etcd members on loopback with default timing flags, each with its own temp data dir."""

    def __init__(self, processes: Processes, workdir: Path, binary: str) -> None:
        self.processes = processes
        self.workdir = workdir
        self.binary = binary
        self.names = ["e1", "e2", "e3"]
        self.client_ports = {name: free_port() for name in self.names}
        self.peer_ports = {name: free_port() for name in self.names}
        self.members: dict[str, subprocess.Popen[bytes]] = {}

    def start(self) -> None:
        for name in self.names:
            self.start_member(name)
        for name in self.names:
            wait_for_port(self.client_ports[name], self.members[name])
        wait_until(lambda: self.leader() is not None, 30, "an etcd leader")

    def start_member(self, name: str) -> None:
        initial = ",".join(f"{n}=http://127.0.0.1:{self.peer_ports[n]}" for n in self.names)
        client = f"http://127.0.0.1:{self.client_ports[name]}"
        peer = f"http://127.0.0.1:{self.peer_ports[name]}"
        argv = [self.binary, "--name", name, "--data-dir", str(self.workdir / name),
                "--listen-client-urls", client, "--advertise-client-urls", client,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", initial, "--initial-cluster-token", "tomq-bench",
                "--initial-cluster-state", "new"]
        self.members[name] = self.processes.start(argv, self.workdir / f"{name}.log")

    def kill_member(self, name: str) -> None:
        self.processes.kill(self.members.pop(name))

    def status(self, name: str) -> dict[str, Any]:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", self.client_ports[name], timeout=1)
            try:
                connection.request("POST", "/v3/maintenance/status", body=b"{}")
                response = connection.getresponse()
                body = response.read()
            finally:
                connection.close()
        except OSError:
            return {}
        return json.loads(body) if response.status == 200 else {}

    def leader(self) -> str | None:
        for name in self.members:
            status = self.status(name)
            if status and status.get("leader") == status.get("header", {}).get("member_id"):
                return name
        return None

    def connect(self, name: str, timeout: float = 10) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.client_ports[name], timeout=timeout)


def etcd_put(connection: http.client.HTTPConnection, key: str, value: bytes) -> None:
    body = json.dumps({"key": base64.b64encode(key.encode()).decode(), "value": base64.b64encode(value).decode()})
    connection.request("POST", "/v3/kv/put", body=body.encode(), headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    text = response.read()
    if response.status != 200 or b"error" in text:
        raise RuntimeError(f"etcd put failed: {response.status} {text[:200]!r}")


def etcd_latency(etcd: EtcdCluster, count: int, value: bytes) -> list[float]:
    leader = etcd.leader()
    assert leader is not None
    connection = etcd.connect(leader)
    latencies = []
    try:
        for i in range(count):
            started = time.perf_counter()
            etcd_put(connection, f"latency/{i}", value)
            latencies.append(time.perf_counter() - started)
    finally:
        connection.close()
    return latencies


def etcd_throughput(etcd: EtcdCluster, count: int, connections: int, value: bytes) -> float:
    leader = etcd.leader()
    assert leader is not None
    barrier = threading.Barrier(connections + 1)
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        connection = etcd.connect(leader)
        try:
            etcd_put(connection, f"warm/{index}", value)  # connected before the clock starts
            barrier.wait()
            for i in range(index, count, connections):
                etcd_put(connection, f"throughput/{i}", value)
        except BaseException as exc:
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(connections)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise errors[0]
    return count / elapsed


def etcd_failover(etcd: EtcdCluster, value: bytes) -> float:
    """Seconds from SIGKILLing the leader until a put issued after the kill succeeds."""
    leader = etcd.leader()
    assert leader is not None
    survivors = [n for n in etcd.names if n != leader]
    succeeded: list[tuple[float, float]] = []  # (started, finished)
    lock = threading.Lock()
    count = [0]

    def put(at: float) -> None:
        count[0] += 1
        name, key = survivors[count[0] % len(survivors)], f"failover/{count[0]}"

        def attempt() -> None:
            connection = etcd.connect(name, timeout=15)
            try:
                etcd_put(connection, key, value)
            except (OSError, RuntimeError):
                return
            finally:
                connection.close()
            with lock:
                succeeded.append((at, time.monotonic()))

        threading.Thread(target=attempt, daemon=True).start()

    with Streamer(put):
        time.sleep(1.0)
        killed_at = time.monotonic()
        etcd.kill_member(leader)

        def first_after_kill() -> float | None:
            with lock:
                done = [finished for started, finished in succeeded if started > killed_at]
            return min(done) if done else None

        wait_until(lambda: first_after_kill() is not None, 30, f"an etcd put after killing {leader}")
    failover = first_after_kill()
    assert failover is not None
    etcd.start_member(leader)
    wait_for_port(etcd.client_ports[leader], etcd.members[leader])
    wait_until(lambda: etcd.leader() is not None and bool(etcd.status(leader)), 30, f"{leader} back")
    time.sleep(1.0)
    return failover - killed_at


@dataclass
class EtcdResult:
    p50: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)
    throughput: list[float] = field(default_factory=list)
    failover: list[float] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)


@contextlib.contextmanager
def running_etcd(processes: Processes, binary: str, args: argparse.Namespace, name: str) -> Iterator[EtcdCluster]:
    """A fresh 3-member etcd cluster, warmed up; stopped (and its directory removed unless --keep) after."""
    workdir = Path(tempfile.mkdtemp(prefix=f"tomq-bench-{name}-", dir=args.workdir))
    etcd = EtcdCluster(processes, workdir, binary)
    try:
        etcd.start()
        etcd_latency(etcd, 20, os.urandom(64))  # warm-up
        yield etcd
    finally:
        for process in list(etcd.members.values()):
            if process in processes.running:
                processes.stop(process)
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def bench_etcd(processes: Processes, binary: str, args: argparse.Namespace, value: bytes) -> EtcdResult:
    result = EtcdResult()
    with running_etcd(processes, binary, args, "etcd") as etcd:
        for run in range(args.repeats):
            latencies = etcd_latency(etcd, args.latency_count, value)
            result.p50.append(percentile(latencies, 0.5))
            result.p99.append(percentile(latencies, 0.99))
            log(f"  etcd: latency run {run + 1}: p50 {result.p50[-1] * 1000:.2f} ms, "
                f"p99 {result.p99[-1] * 1000:.2f} ms")
        members = dict(etcd.members)
        leader = etcd.leader()
        cpu_before, started = cpu_seconds(dict(members)), time.monotonic()
        for run in range(args.repeats):
            result.throughput.append(etcd_throughput(etcd, args.throughput_count, args.etcd_connections, value))
            log(f"  etcd: throughput run {run + 1}: {result.throughput[-1]:.0f} puts/s")
        result.cpu = cpu_shares(cpu_before, cpu_seconds(dict(members)), time.monotonic() - started, leader)
        for run in range(args.failovers):
            result.failover.append(etcd_failover(etcd, value))
            log(f"  etcd: failover run {run + 1}: {result.failover[-1]:.2f} s")
    return result


@contextlib.contextmanager
def etcd_beside(processes: Processes, binary: str | None, args: argparse.Namespace) -> Iterator[EtcdCluster | None]:
    """A fresh 3-member etcd to measure in turns with one tomq cluster (see TomqResult.anchor_p50);
    None when there is no etcd or it would not start: that must not cost the clusters still to come."""
    with contextlib.ExitStack() as stack:
        etcd = None
        if binary is not None:
            try:
                etcd = stack.enter_context(running_etcd(processes, binary, args, "etcd-beside"))
            except Exception as exc:
                log(f"  etcd beside it: not started ({type(exc).__name__}: {exc}); the anchor's own etcd p50 is used")
        yield etcd


# --------------------------------------------------------------------------- raw Ed25519


def verify_rates(message_size: int, count: int, repeats: int) -> tuple[float, float]:
    """Ed25519 verifications per second on one core, medians of `repeats` interleaved runs: with
    tomq's own verify (libsodium, what the nodes run) and with OpenSSL (cryptography)."""
    from tomq.identity import SigningKey

    key = SigningKey.generate()
    openssl_key = Ed25519PrivateKey.generate()
    openssl_public = openssl_key.public_key()
    message = os.urandom(message_size)
    signature = key.sign(message)
    openssl_signature = openssl_key.sign(message)
    rates: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(count):
            if not key.public_key.verify(signature, message):
                raise SystemExit("bench: tomq's verify refused a good signature")
        rates[0].append(count / (time.perf_counter() - started))
        started = time.perf_counter()
        for _ in range(count):
            openssl_public.verify(openssl_signature, message)  # raises if it refuses
        rates[1].append(count / (time.perf_counter() - started))
    return statistics.median(rates[0]), statistics.median(rates[1])


def sample_record_size() -> int:
    """Bytes of one sealed reading as proposed (a stand-in signing key: only the size matters)."""
    from tomq.identity import SigningKey
    from tomq.wire import seal

    return len(seal(SigningKey.generate(), seq=1, time_ms=int(time.time() * 1000), type="record", body=reading(1)))


# --------------------------------------------------------------------------- the table


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}x"


def anchor_of(result: TomqResult, etcd: EtcdResult) -> float | None:
    return median(result.anchor_p50) if result.anchor_p50 else median(etcd.p50)


def print_table(results: list[TomqResult], etcd: EtcdResult | None, verify: float, verify_openssl: float,
                record_size: int,
                args: argparse.Namespace) -> None:
    print()
    print(f"Medians of {args.repeats} run(s) ({args.latency_count} sequential records per latency run, "
          f"{args.throughput_count} records per throughput run) and of {args.failovers} failover(s); "
          f"{os.cpu_count()} CPU(s).")
    print(f"Raw Ed25519 verify ({record_size}-byte record envelope, one core): {verify:.0f}/s with libsodium "
          f"(what the nodes use; OpenSSL: {verify_openssl:.0f}/s)")
    print()
    header = (f"{'':<26}{'p50 ms':>9}{'p99 ms':>9}{'leader p50/p99 ms':>19}{'per s':>9}"
              f"{'ceiling/s':>11}{'failover s':>12}")
    print(header)
    print("-" * len(header))
    for r in results:
        lead = f"{num(r.leader_p50_ms, '.1f')}/{num(r.leader_p99_ms, '.1f')}"
        print(f"{r.label:<26}{ms(median(r.p50)):>9}{ms(median(r.p99)):>9}{lead:>19}"
              f"{num(median(r.throughput)):>9}{verify / r.nodes:>11.0f}{num(median(r.failover), '.2f'):>12}")
    if etcd is not None:
        print(f"{'etcd 3 members (anchor)':<26}{ms(median(etcd.p50)):>9}{ms(median(etcd.p99)):>9}{'':>19}"
              f"{num(median(etcd.throughput)):>9}{'':>11}{num(median(etcd.failover), '.2f'):>12}")
    print("  p50/p99: client-observed, publish -> audit line (published by the leader at commit); etcd: one put to the leader")
    print("  leader: the leader's own proposal-received -> block-applied, from its status report")
    print(f"  per s: records (etcd: puts from {args.etcd_connections} connections) committed per second")
    print("  ceiling: raw verify rate / nodes, since every node verifies every record")
    print()
    if etcd is not None:
        print(f"{'ratio against etcd':<26}{'p50 tomq/etcd':>15}{'etcd p50 ms':>13}{'throughput':>12}{'failover':>10}")
        for r in results:
            anchor = anchor_of(r, etcd)
            latency_ratio = r.latency_ratio(etcd)
            print(f"{r.label:<26}{ratio(latency_ratio, 1.0):>15}{ms(anchor):>13}"
                  f"{ratio(median(r.throughput), median(etcd.throughput)):>12}"
                  f"{ratio(median(r.failover), median(etcd.failover)):>10}")
        print("  p50 ratio: median over latency runs of tomq p50 / the p50 of an etcd run taken just before it,")
        print("  on a fresh etcd up beside that cluster (etcd p50 ms: their median); else against the anchor's runs")
        print()
    print("Per record of the latency runs (median of runs), ms on a CPU / ms runnable but waiting for one:")
    for r in results:
        if r.latency_cpu:
            names = list(r.latency_cpu[-1])
            cells = [f"{name} {median([run[name][0] for run in r.latency_cpu if name in run]):.2f}"
                     f"/{median([run[name][1] for run in r.latency_cpu if name in run]):.2f}" for name in names]
            print(f"  {r.label}: " + ", ".join(cells))
    print("  (one record at a time: every process's CPU time, and every wait for a core, is in some record's way)")
    print()
    print("CPU per process over the throughput runs (1.00 = one core busy):")
    for r in results:
        if r.cpu:
            print(f"  {r.label}: " + ", ".join(f"{name} {share:.2f}" for name, share in r.cpu.items()))
    if etcd is not None and etcd.cpu:
        print("  etcd 3 members: " + ", ".join(f"{name} {share:.2f}" for name, share in etcd.cpu.items()))
    print()
    print("Targets (issue 4):")
    for r in results:
        p50 = median(r.p50)
        latency_ratio = r.latency_ratio(etcd)
        if p50 is not None and latency_ratio is not None:
            verdict = "met" if latency_ratio <= TARGET_LATENCY_RATIO else "MISSED"
            print(f"  {r.label}: p50 commit {ms(p50)} ms, {latency_ratio:.2f}x etcd's put, within "
                  f"{TARGET_LATENCY_RATIO:.0f}x: {verdict}")
        failover = median(r.failover)
        if failover is not None:
            verdict = "met" if failover < TARGET_FAILOVER else "MISSED"
            print(f"  {r.label}: failover {failover:.2f} s under {TARGET_FAILOVER:.0f} s: {verdict}")
        rate = median(r.throughput)
        if r.broker == "mosquitto" and r.nodes == 3 and rate is not None:
            verdict = "met" if rate >= TARGET_THROUGHPUT else "MISSED"
            print(f"  {r.label}: {rate:.0f} signed records/s >= {TARGET_THROUGHPUT:.0f}: {verdict}")
    if etcd is None:
        print("  (latency target not judged: no etcd anchor in this run)")
    notes = [f"  {r.label}, {note}" for r in results for note in r.notes]
    if notes:
        print("\nRuns that did not complete (the rest of that cluster was skipped):")
        print("\n".join(notes))


# --------------------------------------------------------------------------- main


@contextlib.contextmanager
def stopped_at_exit(processes: Processes) -> Iterator[None]:
    previous = signal.signal(signal.SIGTERM, interrupted)
    try:
        yield
    finally:
        processes.stop_all()
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one run of each, fewer records, 3 nodes only")
    parser.add_argument("--brokers", default="amqtt,mosquitto", help="comma-separated: amqtt, mosquitto")
    parser.add_argument("--nodes", help="comma-separated cluster sizes (default 3,5; 3 with --quick)")
    parser.add_argument("--repeats", type=int, help="runs of each latency and throughput measurement (default 3)")
    parser.add_argument("--failovers", type=int, help="leader kills per cluster (default 3)")
    parser.add_argument("--latency-count", type=int, help="sequential records per latency run (default 200)")
    parser.add_argument("--throughput-count", type=int, help="records per throughput run (default 5000)")
    parser.add_argument("--etcd-connections", type=int, default=64, help="concurrent connections for etcd puts")
    parser.add_argument("--node-args", default="", help="extra `tomq node` options, e.g. '--tick-ms 10'")
    parser.add_argument("--no-etcd", action="store_true", help="skip the etcd anchor")
    parser.add_argument("--workdir", help="where the temporary cluster directories go (default: the system's)")
    parser.add_argument("--keep", action="store_true", help="keep the cluster directories and logs")
    args = parser.parse_args(argv)
    quick = args.quick
    args.repeats = args.repeats or (1 if quick else 3)
    args.failovers = args.failovers or (1 if quick else 3)
    args.latency_count = args.latency_count or (50 if quick else 200)
    args.throughput_count = args.throughput_count or (1000 if quick else 5000)
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    brokers = [b.strip() for b in args.brokers.split(",") if b.strip()]
    sizes = [int(n) for n in (args.nodes or ("3" if quick else "3,5")).split(",")]
    for broker in brokers:
        if broker not in ("amqtt", "mosquitto"):
            parser.error(f"unknown broker {broker!r}")
    if "mosquitto" in brokers and which("mosquitto") is None:
        log("mosquitto is not installed (apt-get install -y mosquitto); skipping it")
        brokers.remove("mosquitto")

    record_size = sample_record_size()
    verify, verify_openssl = verify_rates(record_size, 1000 if quick else 5000, 3)
    log(f"raw Ed25519 verify: {verify:.0f}/s on one core (libsodium; OpenSSL {verify_openssl:.0f}/s)")
    processes = Processes()
    results: list[TomqResult] = []
    etcd: EtcdResult | None = None
    with stopped_at_exit(processes):
        etcd_binary = which("etcd")
        if args.no_etcd:
            pass
        elif etcd_binary is None:
            log(f"etcd is not installed; the anchor is skipped. Install it with:\n    {ETCD_INSTALL}")
        else:
            log("etcd 3 members")
            etcd = bench_etcd(processes, etcd_binary, args, os.urandom(record_size))
        for broker in brokers:
            for nodes in sizes:
                with etcd_beside(processes, etcd_binary if etcd is not None else None, args) as anchor:
                    log(f"tomq {broker} {nodes} nodes" + (" (latency runs in turns with an etcd beside it)"
                                                          if anchor is not None else ""))
                    results.append(bench_tomq(processes, broker, nodes, args, anchor, os.urandom(record_size)))
    print_table(results, etcd, verify, verify_openssl, record_size, args)
    if etcd is None and not args.no_etcd:
        print(f"\netcd anchor skipped: etcd is not installed. Install it with: {ETCD_INSTALL}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
