"""The node daemon's loop: the only place where the Raft core meets disk, clock and network.

One thread owns the core and the MQTT connection: it waits in `link.pump` (paho's socket, no network
thread), whose callbacks only enqueue what arrived; the loop takes items off the queue, ticks the core
on a fixed period, and handles every Ready in the order the core demands:

    persist (append, hard state, snapshot) and fsync  ->  send  ->  apply

What is applied is up to an `Applier` (the ledger); the loop knows nothing about blocks or records.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tomq import canonical, cluster
from tomq.errors import EnvelopeRejected, ReplayedEnvelope
from tomq.mqtt import MqttLink
from tomq.node.metrics import NodeMetrics
from tomq.node.raft.core import PhaseEvent, ProposalDropped, RaftConfig, RaftNode, Ready, Role
from tomq.node.raft.messages import Message
from tomq.node.raft.storage import FileStorage
from tomq.node.raft.transport import RaftTransport
from tomq.node.raft.transport import log as transport_log
from tomq.node.raft.types import Entry, EntryKind
from tomq.refusals import Refusals
from tomq.wire import ClockSequence, EnvelopeOpener, FileWatermarks, SequenceCounter, seal

log = logging.getLogger("tomq.node")


# The peers' Raft batch watermarks (replay protection) are written as batches arrive and fsynced
# this often, not with every Raft fsync: a second fsync there sat between a follower's append and
# its acknowledgement. A power cut can lose the last second of them; a replayed batch from that
# second is one Raft already tolerates (it is built for duplicated and delayed messages), and a
# process crash loses nothing (the lines are in the kernel's page cache).
WATERMARK_SYNC_SECONDS = 1.0


class Applier(Protocol):
    """The replicated state machine behind the log (the ledger)."""

    def apply(self, entry: Entry) -> None: ...

    def snapshot(self) -> bytes: ...

    def compactable_index(self) -> int: ...

    def restore(self, data: bytes) -> None: ...

    def tick(self, node: NodeDaemon) -> None: ...

    def after_input(self, node: NodeDaemon) -> None: ...

    def has_work(self) -> bool: ...  # after_input has something to do that needs no new input

    def extras_for_peers(self, peers: list[str], sending: set[str]) -> dict[str, dict[str, Any]]:
        """peer -> extras for the Raft batches going out now (`sending`: peers that get messages anyway)."""

    def on_extras(self, sender: str, extras: dict[str, Any]) -> None: ...

    def on_message(self, topic: str, payload: bytes, retained: bool) -> None: ...

    def status(self) -> dict[str, Any]: ...  # merged into the node's status report

    def load_report(self) -> dict[str, Any]: ...  # merged into the node's load report (node/<id>/load)

    def load_score(self) -> float | None: ...  # the load votes carry; None: the machine's load average

    def close(self) -> None: ...  # the node is stopping


@dataclass
class NodeOptions:
    mode: str = "stable"
    tick_seconds: float = 0.05  # one Raft tick: heartbeats every tick, elections after 10-20
    election_ticks: int = 10
    data_dir: Path | None = None  # default: DIR/members/<name>/state
    snapshot_every: int = 2000  # applied entries between log compactions
    status_every: float = 1.0  # seconds between status/load reports
    host: str | None = None
    port: int | None = None
    metrics_port: int | None = None  # serve Prometheus metrics on 127.0.0.1:PORT (0: any free port, logged)
    extra_subscriptions: list[str] = field(default_factory=list)


class NodeDaemon:
    def __init__(self, cluster_dir: str | os.PathLike[str], name: str, applier_factory: Callable[[NodeDaemon], Applier],
                 options: NodeOptions | None = None) -> None:
        self.options = options or NodeOptions()
        self.cluster = cluster.load(cluster_dir)
        member = self.cluster.member(name)
        if member.role != "node":
            raise cluster.ConfigError(f"{name} is a {member.role}, not a node")
        self.name = member.name
        self.key = self.cluster.signing_key(self.name)
        self.trust = self.cluster.trust_store()
        self.topics = self.cluster.topics
        self.node_names = tuple(m.name for m in self.cluster.members if m.role == "node")
        data_dir = self.options.data_dir or (self.cluster.directory / "members" / self.name / "state")
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.storage = FileStorage(self.data_dir / "raft")
        if self.storage.recovered_tail:
            log.warning("%s", self.storage.recovered_tail)
        loaded = self.storage.load()
        config = RaftConfig(id=self.name, voters=self.node_names, mode=self.options.mode,
                            election_ticks=self.options.election_ticks)
        self.raft = RaftNode(config, random.Random(int.from_bytes(os.urandom(8), "big")),
                             hard_state=loaded.hard_state, snapshot=loaded.snapshot, entries=loaded.entries)
        self.last_persist_seconds = 0.0  # the latest fsync's duration (placement timings report it)
        # The highest log index known to be on disk: what a leader may apply before its next fsync.
        self._durable_index = (loaded.entries[-1].index if loaded.entries
                               else loaded.snapshot.meta.index if loaded.snapshot else 0)
        self.inbox: deque[tuple[Any, ...]] = deque()  # appended to by any thread, taken by the loop
        self._node_prefix = f"{self.topics.root}/node/"
        self._peers_of: frozenset[str] = frozenset()
        self._extras: deque[tuple[str, dict[str, Any]]] = deque()  # peers' extras, taken after the Ready
        self._peer_names: list[str] = []
        self._raft_inbox_prefix = self.topics.raft_inbox_prefix(self.name)
        self.watermarks = FileWatermarks(self.data_dir / "watermarks")
        self.counter = SequenceCounter(self.data_dir / "sequence")
        # One sequence for every record and command this node seals (orchestrator, device presence,
        # actuation): the ledger takes a proposer's records only in rising order, and two clocks in
        # one process could hand out the same microsecond.
        self.record_sequence = ClockSequence()
        self.link = MqttLink(
            host=self.options.host or self.cluster.broker_host,
            port=self.options.port or self.cluster.broker_port,
            username=self.name,
            password=cluster.broker_password(self.key),
            client_id=f"tomq-node-{self.name}",
            on_message=self._on_mqtt,
            threaded=False,  # run() pumps it: messages arrive and leave on the loop's thread
        )
        self.metrics: NodeMetrics | None = None
        self.refusal_kinds: dict[str, Refusals] = {}
        self.transport = RaftTransport(link=self.link, topics=self.topics, name=self.name, key=self.key,
                                       trust=self.trust, counter=self.counter, watermarks=self.watermarks,
                                       on_batch=self._on_batch, refusals=self.refusals("raft batch", transport_log))
        self.opener = EnvelopeOpener(self.trust, FileWatermarks(self.data_dir / "watermarks-proposals"))
        self.load_opener = EnvelopeOpener(self.trust, accepted_types=frozenset({"load"}))
        self.load_refusals = self.refusals("load report", log)
        self.events: list[tuple[float, PhaseEvent]] = []
        self.stopping = threading.Event()
        self.applier = applier_factory(self)
        if loaded.snapshot is not None:
            self.applier.restore(loaded.snapshot.data)
        self._last_report = 0.0
        self._watermarks_synced = 0.0
        self.started = time.time()
        self.peer_reports: dict[str, tuple[float, dict[str, Any]]] = {}  # node -> (received at, report)
        self.last_status: dict[str, Any] = self.status()
        if self.options.metrics_port is not None:
            self.metrics = NodeMetrics(lambda: self.last_status, self._transport_counts)

    # ------------------------------------------------------------ inputs (MQTT: inside link.pump on the loop)

    def _on_mqtt(self, topic: str, payload: bytes, retained: bool) -> None:
        # Raft batches are opened (their signature checked) when the loop takes them, not here: a
        # leader that reads two acknowledgements in one pump commits on the first before checking
        # the second (see run()).
        if topic.startswith(self._raft_inbox_prefix):
            self.inbox.append(("raft", topic, payload))
        else:
            self.inbox.append(("mqtt", topic, payload, retained))

    def _on_batch(self, sender: str, messages: list[Message], extras: dict[str, Any]) -> None:
        for message in messages:
            self.raft.step(message)
        if extras:
            # Taken after this turn's Ready: a follower's commit signature rides with the acknowledgement
            # that commits the next block, and checking it (an Ed25519 verify) held back that block's
            # audit lines.
            self._extras.append((sender, extras))

    def _take_extras(self) -> None:
        while self._extras:
            sender, extras = self._extras.popleft()
            self.applier.on_extras(sender, extras)

    def call(self, function: Callable[[], Any]) -> None:
        """Run `function` on the loop's thread (the only thread allowed to touch the core)."""
        self.inbox.append(("call", function))
        self.link.wake()

    def stop(self) -> None:
        """Safe from any thread and from signal handlers."""
        self.stopping.set()
        self.inbox.append(("stop",))
        self.link.wake()

    # ------------------------------------------------------------ the loop

    def run(self) -> None:
        # Metrics first: a port already taken stops the node before it joins anything.
        if self.metrics is not None and self.options.metrics_port is not None:
            port = self.metrics.serve(self.options.metrics_port)
            log.info("metrics on http://127.0.0.1:%s/metrics", port)
        self.transport.start()
        self.link.subscribe(f"{self.topics.root}/node/+/load")
        for topic_filter in self.options.extra_subscriptions:
            self.link.subscribe(topic_filter)
        self.link.start(timeout=30)
        log.info("node %s up: term %s, %s entries, mode %s", self.name, self.raft.term,
                 self.raft.log.last_index(), self.options.mode)
        next_tick = time.monotonic()
        try:
            while not self.stopping.is_set():
                # Wait for the broker (or call()/stop()) until the next tick is due; the callbacks run
                # in here, on this thread, and queue what arrived.
                # What was just applied may leave work for after_input (committed placements to publish):
                # it goes now, not when the next message or tick happens to come.
                busy = self.inbox or self.applier.has_work()
                self.link.pump(0.0 if busy else max(0.0, next_tick - time.monotonic()))
                # Drain what is waiting before handling Ready: one fsync for the whole batch. But a
                # leader whose commit index just moved applies at once (the audit lines clients wait
                # for leave first); the rest waits for the next turn, a pump that does not block.
                committed = self.raft.log.committed
                for _ in range(1001):
                    try:
                        item = self.inbox.popleft()
                    except IndexError:
                        break
                    self._handle(item)
                    if self.raft.log.committed != committed and self.raft.role is Role.LEADER:
                        break
                self.applier.after_input(self)
                now = time.monotonic()
                if now >= next_tick:
                    self.raft.tick()
                    self.applier.tick(self)
                    for refusals in self.refusal_kinds.values():
                        refusals.flush()
                    if now - self._watermarks_synced >= WATERMARK_SYNC_SECONDS:
                        self._watermarks_synced = now
                        self.watermarks.flush()
                    self.last_status = self.status()
                    if now - self._last_report >= self.options.status_every:
                        self._last_report = now
                        self._report_load()
                    next_tick += self.options.tick_seconds
                    if next_tick < now:  # we were stalled (SIGSTOP, a slow disk): do not burst ticks
                        next_tick = now + self.options.tick_seconds
                self.process_ready()
                self._take_extras()
                if self.applier.has_work():
                    # What was just applied left work (a committed placement to publish, a command
                    # to send): do it before reading more messages, which took 1-3 ms per turn.
                    self.applier.after_input(self)
                    self.process_ready()
        finally:
            self.applier.close()  # e.g. the orchestrator's worker thread; instances outlive the node
            self.link.stop()
            self.storage.close()
            self.watermarks.close()

    def _handle(self, item: tuple[Any, ...]) -> None:
        kind = item[0]
        if kind == "raft":
            try:
                self.transport.handle(item[1], item[2])  # checks it; calls _on_batch if it passes
            except Exception:  # as inside MqttLink's callback guard, where this ran before: drop it, go on
                log.exception("a raft batch on %s could not be handled", item[1])
        elif kind == "mqtt":
            if item[1].endswith("/load") and item[1].startswith(self._node_prefix):
                self._on_load_report(item[1], item[2])
            else:
                self.applier.on_message(item[1], item[2], item[3])
        elif kind == "call":
            item[1]()
        elif kind == "stop":
            self.stopping.set()

    def process_ready(self) -> None:
        while self.raft.has_ready():
            ready = self.raft.ready()
            overlap = ready.send_before_persist
            if not overlap:
                self._persist(ready)
            # A leader's committed entries are already on its disk (a follower's acknowledgement of
            # them was handled after our earlier fsync), so they may be applied before the new ones
            # are written; with one voter an entry commits in the Ready that appends it, so check.
            apply_first = overlap and ready.restore is None and all(
                entry.index <= self._durable_index for entry in ready.committed)
            # With nothing new to replicate, what goes out only tells the followers the commit index
            # (a leader), or answers a heartbeat (a follower): apply before sending, so the audit lines
            # (what clients wait for) leave before those notices, and a follower's signatures of what it
            # just applied ride with its answer instead of waiting a heartbeat for the next one.
            if not ready.entries and ready.snapshot is None and (
                    apply_first or (not overlap and ready.restore is None)):
                apply_at = "before-send"
            else:
                apply_at = "after-send" if apply_first else "last"
            if apply_at == "before-send":
                self._apply(ready)
            extras = self.applier.extras_for_peers(self._peers(), {m.to for m in ready.messages})
            if ready.messages or extras:
                self.transport.send(ready.messages, extras)
            if apply_at == "after-send":
                self._apply(ready)
            if overlap:
                self._persist(ready)  # the core allows a leader's appends to go out first
            if apply_at == "last":
                self._apply(ready)
            self._maybe_compact()
        # What the applier has for everyone (its periodic gossip) goes out without waiting for a message.
        extras = self.applier.extras_for_peers(self._peers(), set())
        if extras:
            self.transport.send([], extras)

    def _peers(self) -> list[str]:
        # Asked twice per turn of the loop; the voters change only with the membership (a new set).
        voters = self.raft.voters
        if voters is not self._peers_of:
            self._peers_of = voters
            self._peer_names = sorted(p for p in voters if p != self.name)
        return self._peer_names

    def _apply(self, ready: Ready) -> None:
        now = time.time()
        for event in ready.events:
            if event.phase == "elected":
                log.info("%s became leader of term %s", self.name, event.detail)
        self.events.extend((now, event) for event in ready.events)
        del self.events[:-10_000]
        if ready.restore is not None:
            self.applier.restore(ready.restore.data)
        for entry in ready.committed:
            if entry.kind in (EntryKind.NORMAL, EntryKind.DECISION):
                self.applier.apply(entry)

    def _persist(self, ready: Ready) -> None:
        wrote = False
        if ready.snapshot is not None:
            self.storage.save_snapshot(ready.snapshot)
            wrote = True
        if ready.entries:
            self.storage.append(ready.entries)
            wrote = True
            self._durable_index = ready.entries[-1].index  # once the sync below returns
        if ready.hard_state is not None:
            self.storage.set_hard_state(ready.hard_state, durable=ready.durable_hard_state)
            wrote = wrote or ready.durable_hard_state  # a new commit index alone needs no fsync
        if wrote:
            started = time.monotonic()
            self.storage.sync()  # the ordering rule: nothing below leaves before this returns
            self.last_persist_seconds = time.monotonic() - started

    def _maybe_compact(self) -> None:
        log_ = self.raft.log
        # Only as far as the applier allows: its snapshot must describe state at that index.
        index = min(log_.applied, self.applier.compactable_index())
        if index - log_.snap_index >= self.options.snapshot_every and index == log_.applied:
            self.raft.compact(index, self.applier.snapshot())

    # ------------------------------------------------------------ helpers for appliers

    def propose(self, data: bytes) -> bool:
        try:
            self.raft.propose(data)
            return True
        except ProposalDropped:
            return False

    def sealed(self, type: str, body: Any) -> bytes:
        return seal(self.key, seq=self.counter.next(), time_ms=int(time.time() * 1000), type=type, body=body)

    def refusals(self, what: str, logger: logging.Logger) -> Refusals:
        """Where this node's parts refuse inputs of one kind: shown in status, counted in Prometheus
        (tomq_refused_total{what, sender, reason}), logged without letting a flood flood the log."""

        def count(sender: str, reason: str) -> None:
            if self.metrics is not None:
                self.metrics.refused.labels(what=what, sender=sender, reason=reason).inc()

        refusals = Refusals(what, logger, on_refuse=count)
        self.refusal_kinds[what] = refusals
        return refusals

    def status(self) -> dict[str, Any]:
        status = dict(self.raft.status())
        status.pop("progress", None)
        status["uptime"] = round(time.time() - self.started, 1)
        status["rejected"] = dict(self.transport.rejected)
        status["refusals"] = {what: refusals.status() for what, refusals in self.refusal_kinds.items()}
        status["load"] = round(self.raft.load, 4)
        status.update(self.applier.status())
        return status

    def _transport_counts(self) -> dict[str, int]:
        return {"sent": self.transport.sent_batches, "received": self.transport.received_batches,
                "refused": sum(self.transport.rejected.values())}

    def _report_load(self) -> None:
        """Publish our load and Raft view (retained): peers use the load, `tomq status` shows the rest."""
        # The load that votes and heartbeats carry (on-demand mode chooses by it): the orchestrator's
        # monitor of this node's own processes and instances when there is one, else the machine's.
        score = self.applier.load_score()
        self.raft.set_load(score if score is not None else load_average())
        report = {**self.applier.load_report(), "load": self.raft.load, "status": self.last_status,
                  "time_ms": int(time.time() * 1000)}
        self.link.publish(self.topics.node_load(self.name), self.sealed("load", report), retain=True)

    def _on_load_report(self, topic: str, payload: bytes) -> None:
        sender = topic.split("/")[-2]
        if self.load_refusals.is_quarantined(sender):
            return
        try:
            envelope = self.load_opener.open(payload, time.time())
        except ReplayedEnvelope:
            return  # a retained report seen again after a reconnect
        except EnvelopeRejected as exc:
            self.load_refusals.refuse(sender, type(exc).__name__, str(exc))
            return
        certificate = self.trust.by_id(envelope.sender)
        if certificate is None or certificate.name != sender or certificate.role != "node":
            self.load_refusals.refuse(sender, "spoofed", f"load report on {topic} signed by {envelope.sender}")
            return
        body = envelope.body if isinstance(envelope.body, dict) else {}
        load = body.get("load")
        if isinstance(load, int | float) and sender != self.name:
            self.raft.observe_load(sender, float(load))
        self.peer_reports[sender] = (time.time(), body)


def load_average() -> float:
    """This node's load in [0, 1+]: the 1-minute load average per core (smoothed by the kernel)."""
    try:
        return os.getloadavg()[0] / (os.cpu_count() or 1)
    except OSError:
        return 0.0


def encode_status(status: dict[str, Any]) -> bytes:
    return canonical.encode(status)
