"""The ledger on a node: batching proposals into blocks, applying committed blocks, certifying them.

This is the `Applier` the node daemon drives. Raft entries carry one of two things, as canonical CBOR:

    {"t": "block", "file": <block file without certificate>, "certs": [...]}   a batch of records,
        proposed by the leader; "certs" (optional) certifies earlier blocks, as below
    {"t": "cert", "certs": [[height, hash, {signer id: sig}], ...]}   commit certificates alone

Applying a block checks it exactly as an auditor would (ChainVerifier without the certificate) and
then, because every node decides on the same committed bytes, every node accepts or skips the same
blocks. Each node then signs the block hash and sends its signature to the leader with its next Raft
batch; the leader puts a majority of signatures into the next block's entry (or a `cert` entry if no
block follows within a tick), so the certificate, too, is decided by the log and every node writes
byte-identical block files: to its own store and to the shared ledger directory (exclusive create;
different bytes there are divergence), both from a writer thread (node/ledger/block_writer.py), and
as retained MQTT topics.
The audit lines (`audit/<type>`, one per record) do not wait for the certificate: the leader publishes
them as it applies the block, i.e. as soon as a majority holds it, which is what "committed" means.

Proposals arrive on `ledger/propose/<member>` as record envelopes; the broker lets a member publish
only on its own, so the topic says who sent a proposal, and an envelope signed by anyone else is
refused there ("spoofed"). Only the leader batches them, and in stable mode only the leader listens
to them; in on-demand mode every node does and keeps the last moments of them, for the node that
wins the election they trigger. Refusals are counted and logged by member (tomq/refusals.py); a member that
keeps sending forged or malformed ones is not listened to for a while. A proposal lost in a leader change is not acknowledged: the
proposer sees its record on `audit/…` or in a block, or proposes again (same envelope, same seq).
"""

from __future__ import annotations

import hashlib
import json
import logging
import statistics
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tomq import canonical, records
from tomq.durable import replace_file
from tomq.errors import EnvelopeRejected, InvalidRecord, PeerError, TomqError
from tomq.node.ledger import pattern
from tomq.node.ledger.block import (
    BlockFile,
    block_file_name,
    certificate_shape_problem,
    commit_signature,
    decode_block_file,
    encode_block_file,
    make_block,
    sign_block,
    verify_commit_signature,
)
from tomq.node.ledger.block_writer import BlockWriter
from tomq.node.ledger.verify import Certifiers, ChainVerifier, LedgerInvalid, certificate_problem
from tomq.node.orchestrator.state import AppliedRecord
from tomq.node.raft.core import Role
from tomq.node.raft.types import Entry, EntryKind
from tomq.wire import EnvelopeOpener

if TYPE_CHECKING:
    from tomq.node.daemon import NodeDaemon

log = logging.getLogger("tomq.ledger")

STAND_TICKS = 2  # on-demand: how many ticks each node waits for the one before it to stand (see _maybe_stand)
RECENT_SECONDS = 2.0  # how long every node remembers proposals, for the next leader to batch
MAX_BLOCKS_IN_FLIGHT = 2  # proposed but not yet applied
LATENCY_SUMMARY_SECONDS = 1.0  # how often status() recomputes the commit latency percentiles
KEPT_CERTIFIED = 32  # certified block files a leader keeps for its commands; older ones come from the store


class _NoReplayCheck:
    """Proposals are de-duplicated against the ledger itself (per-proposer committed sequence)."""

    def get(self, sender: str) -> int:
        return 0

    def advance(self, sender: str, seq: int) -> None:
        pass


@dataclass
class _Pending:
    envelope: bytes
    proposer_id: str
    seq: int
    received: float


class LedgerService:
    def __init__(self, node: NodeDaemon, *, ledger_dir: Path | None = None, max_batch: int = 1000,
                 retained_window: int = 100,
                 listeners: Sequence[Callable[[list[AppliedRecord]], None]] = ()) -> None:
        self.node = node
        # Called with every block's records, in ledger order, on every node (the orchestrator's state
        # is folded from them), from the store at startup as well as when a block commits.
        self.listeners = list(listeners)
        self.apply_started = 0.0
        self.ledger_dir = ledger_dir
        self.max_batch = max_batch
        self.retained_window = retained_window
        self.store = node.data_dir / "blocks"
        self.store.mkdir(parents=True, exist_ok=True)
        if ledger_dir is not None:
            ledger_dir.mkdir(parents=True, exist_ok=True)
        self.proposal_opener = EnvelopeOpener(node.trust, _NoReplayCheck(), accepted_types=frozenset({"record"}))
        self.verifier = ChainVerifier(node.cluster.operator)
        self.certified = -1  # highest height whose certificate is applied
        self.block_files: dict[int, BlockFile] = {}  # applied, not yet certified
        self.signatures: dict[int, dict[str, bytes]] = {}  # height -> signer id -> commit signature
        self.certifiers: dict[int, Certifiers] = {}  # height -> who may certify it (applied, uncertified)
        self.own_unsent: list[list[Any]] = []
        self.last_gossip = 0.0
        self.last_catchup_error = 0.0
        # leader-only state
        self.pending: list[_Pending] = []
        self.pending_ids: set[tuple[str, int]] = set()
        self.tentative_height = -1
        self.tentative_head = b""
        self.tentative_state: pattern.PatternState | None = None
        self.tentative_seqs: dict[str, int] = {}
        # Block files this leader made and signed (height -> bytes, decoded), until applied: applying one
        # needs neither decoding it again nor checking our own signature (a tenth of a millisecond).
        self.made: dict[int, tuple[bytes, BlockFile]] = {}
        self.cert_in_flight = -1
        self.certify_urgently = -1  # blocks up to here: certify as soon as a majority has signed
        # Certified block files someone asked to keep (an actuator command's authority), by height:
        # the command goes out with its certificate without waiting for the writer's disk round.
        self.kept_certified: dict[int, BlockFile | None] = {}
        self.was_leader = False
        self.ready_at = 0
        self.early: list[tuple[str, bytes]] = []  # (member, envelope)
        self.received_at: dict[tuple[str, int], float] = {}
        self.latencies: deque[float] = deque(maxlen=2000)
        self._latency_summary: tuple[float, dict[str, float | None]] = (-LATENCY_SUMMARY_SECONDS, {})
        self.committed_records = 0
        self.refusals = node.refusals("proposal", log)
        self._proposals_prefix = f"{node.topics.root}/ledger/propose/"
        # One subscription per member that may propose (nodes and services), not a wildcard: a member
        # in quarantine is unsubscribed, so the broker stops sending us its flood at all.
        self.proposal_subscriptions: set[str] = set()
        self.quarantine_gossip: dict[str, float] = {}
        self.seqs: dict[str, int] = {}  # proposer id -> highest committed record seq
        self.catchup_target = -1
        self.certify_target = -1  # applied blocks whose certificates are only in the shared directory
        self.backlog: list[Entry] = []
        self.compactable = 0  # highest Raft index up to which every block is certified
        self.recent: deque[tuple[float, str, bytes]] = deque()  # (received, member, envelope)
        self.wants_leader = False
        self.standing_ticks = 0  # ticks since this node wanted a leader and none appeared
        self.standing_turn: int | None = None  # its turn to stand, fixed when it began to want one
        self.standing_term = -1  # the Raft term in which the wait began (or last restarted)
        self.led_term = -1  # the last term in which this node knew a leader
        # (Raft index, certified height) of certificate entries applied: the log may be compacted to
        # such an index once the writer has that height durably in the store.
        self.compact_candidates: deque[tuple[int, int]] = deque()
        self._load_store()
        self.writer = BlockWriter(self.store, ledger_dir, stored=self.certified, speak=self._speak_soon,
                                  creates_first=self._is_leader)
        self.writer.start()

    # ------------------------------------------------------------------ startup

    def _load_store(self) -> None:
        genesis_path = self.node.cluster.directory / "genesis.block"
        stored = self.store / block_file_name(0)
        if not stored.exists():
            if not genesis_path.exists():
                raise TomqError(f"{genesis_path} is missing; create it with: tomq ledger genesis {self.node.cluster.directory}")
            # Atomically: a crash mid-write on first start would leave a torn genesis that stops the node.
            replace_file(stored, genesis_path.read_bytes())
        height = 0
        while True:
            path = self.store / block_file_name(height)
            if not path.exists():
                break
            data = path.read_bytes()
            block_file = decode_block_file(data)
            if block_file.commit_certificate or height == 0:
                self.verifier.add(height, data)
                self._notify(height, block_file)
                self.certified = height
            else:
                # Uncertified (written before certificates rode in entries): certify it like a block
                # just applied.
                self._check_and_account(height, data)
                self._await_certificate(block_file)
            height += 1
        log.info("ledger store holds blocks 0..%s (certified up to %s)", self.verifier.height, self.certified)

    # ------------------------------------------------------------------ Applier interface

    def apply(self, entry: Entry) -> None:
        if self.catchup_target > self.verifier.height:
            self.backlog.append(entry)
            return
        self._apply_entry(entry)

    def _apply_entry(self, entry: Entry) -> None:
        try:
            item = canonical.decode(entry.data, check_canonical=False)
        except canonical.CanonicalDecodeError:
            log.warning("skipping entry %s: not a ledger entry", entry.index)
            return
        if not isinstance(item, dict):
            return
        if item.get("t") == "block" and isinstance(item.get("file"), bytes):
            if isinstance(item.get("certs"), list):
                self._apply_certs(item["certs"], entry.index)  # of earlier blocks: before this one, whatever it holds
            self._apply_block(entry, item["file"])
        elif item.get("t") == "cert" and isinstance(item.get("certs"), list):
            self._apply_certs(item["certs"], entry.index)
            if self.certified == self.verifier.height:
                # Every block up to here is certified, so (once the writer has put it there) in the
                # store and the shared directory: the Raft log may be compacted this far, and a node
                # restored from such a snapshot can fetch them all.
                self.compact_candidates.append((entry.index, self.certified))

    def compactable_index(self) -> int:
        while self.compact_candidates and self.compact_candidates[0][1] <= self.writer.stored:
            self.compactable = self.compact_candidates.popleft()[0]
        return self.compactable

    def close(self) -> None:
        self.writer.stop()

    @property
    def stored(self) -> int:
        """The highest height whose certified file is on this node's disk."""
        return self.writer.stored

    @property
    def divergent(self) -> bool:
        """The shared directory disagreed with us: this node no longer writes there."""
        return self.writer.divergent

    def snapshot(self) -> bytes:
        # Blocks themselves live in the store (and the shared directory); the Raft snapshot only records
        # how far the ledger had got, so a restarted node replays its store rather than the log.
        return canonical.encode({"height": self.verifier.height, "head": self.verifier.head_hash,
                                 "certified": self.certified})

    def restore(self, data: bytes) -> None:
        """The leader sent a snapshot: the blocks it covers come from the shared directory.

        Until this node holds them, later committed entries wait in a backlog (applying them now would
        skip them as not following our head, and this node would silently fall off the chain).
        """
        marker = canonical.decode(data, check_canonical=False) if data else {}
        height = marker.get("height", -1) if isinstance(marker, dict) else -1
        certified = marker.get("certified", -1) if isinstance(marker, dict) else -1
        if certified > self.certified and isinstance(certified, int):
            # Blocks we applied before a crash may have had their certificates compacted away with
            # the log: those certificates, too, come from the shared directory.
            self.certify_target = max(self.certify_target, min(certified, self.verifier.height))
        if height > self.verifier.height or self.certify_target > self.certified:
            self.catchup_target = max(self.catchup_target, height)
            self._catch_up()

    def _sync_proposal_subscriptions(self) -> None:
        # In stable mode only the leader listens to proposals. Followers used to keep a copy for a
        # leader change; it cost each of them a wake-up and the broker a delivery per record (on one
        # 2-core machine, 3 nodes committed a sixth fewer records per second), and proposers propose
        # again what they do not see committed anyway (services after 2 s, `tomq ledger propose`
        # after 1 s). In on-demand mode everyone listens: a proposal while no one leads makes the node
        # that receives it stand for election.
        wanted: set[str] = set()
        if self._is_leader() or self.node.options.mode == "on-demand":
            wanted = {c.name for c in self.node.trust if c.role in ("node", "service")}
            wanted -= set(self.refusals.quarantined())
        if wanted == self.proposal_subscriptions:
            return
        for member in sorted(wanted - self.proposal_subscriptions):
            self.node.link.subscribe(self.node.topics.ledger_propose(member))
        for member in sorted(self.proposal_subscriptions - wanted):
            self.node.link.unsubscribe(self.node.topics.ledger_propose(member))
        self.proposal_subscriptions = wanted

    def tick(self, node: NodeDaemon) -> None:
        self._sync_proposal_subscriptions()
        self.cut_block()
        self._maybe_propose_certificates()
        if self.catchup_target > self.verifier.height or self.certify_target > self.certified:
            self._catch_up()
        self._maybe_stand(ticked=True)
        self._follow_leadership()

    def after_input(self, node: NodeDaemon) -> None:
        self._maybe_stand(ticked=False)
        self._follow_leadership()
        self.cut_block()
        if self.certify_urgently > max(self.certified, self.cert_in_flight) and not self.pending:
            # No block is about to take them along (under load one is, and carries them): alone, now.
            self._maybe_propose_certificates()

    def certify_soon(self, height: int) -> None:
        """Block `height` is the authority of something waiting (an actuator command): have it
        certified now rather than with the next block or at a tick, and keep its certified file.

        The followers learn of a commit lazily (with the next append or heartbeat) and sign what they
        apply; a leader tells them at once here, their signatures come back with their answers, and
        the certificate goes in an entry of its own as soon as a majority has signed (after_input).
        """
        if not self._is_leader():
            return  # followers neither certify nor send; a new leader's resends read the store
        if height > self.certify_urgently and height > self.certified:
            self.node.raft.announce_commit()  # once per block, however many commands it holds
        self.certify_urgently = max(self.certify_urgently, height)
        self.kept_certified.setdefault(height, None)  # filled when certified
        while len(self.kept_certified) > KEPT_CERTIFIED:
            del self.kept_certified[min(self.kept_certified)]  # the oldest: long sent, or read from the store

    def certified_file(self, height: int) -> BlockFile | None:
        """The certified file of a height passed to `certify_soon`, once certified (None before)."""
        return self.kept_certified.get(height)

    def _maybe_stand(self, *, ticked: bool) -> None:
        """On-demand: no leader while idle; a node that holds work (a request, a proposal) stands for
        election. Every node got the same request, so they take turns rather than all standing at once
        (split votes) or each at a random tick (that wait was most of an on-demand placement): in the
        order of the voters rotated by the term, which every node that saw the last election agrees
        on, the first stands at once, the k-th only after STAND_TICKS * k ticks without a leader (the
        ones before it may be down). The turn is fixed when the wish begins (the first one's campaign
        raises everyone's term). A term that moves during the wait means someone stood: the wait starts
        again. Nobody stands at once who has not known a leader in this term (just started, or a
        campaign under way): a sitting leader's heartbeat gets a turn to arrive first. Two nodes that
        stand together split the vote; on-demand Raft has no election timeout of its own, so the next
        in turn, still waiting, stands after its wait and settles it."""
        raft = self.node.raft
        if raft.leader is not None or self._is_leader():
            self.led_term = raft.term
            self.wants_leader = False
        if not self.wants_leader:
            self.standing_ticks, self.standing_turn = 0, None
            return
        if self.standing_turn is None:
            self.standing_turn = stand_turn(raft.voters, self.node.name, raft.term)
            self.standing_term = raft.term
        elif raft.term != self.standing_term:
            self.standing_term, self.standing_ticks = raft.term, 0
        if ticked:
            self.standing_ticks += 1
        turn = self.standing_turn if self.led_term == raft.term else max(1, self.standing_turn)
        if self.standing_ticks >= STAND_TICKS * turn:
            self.wants_leader = False
            self.standing_ticks, self.standing_turn = 0, None
            raft.campaign()

    def extras_for_peers(self, peers: list[str], sending: set[str]) -> dict[str, dict[str, Any]]:
        """What rides with this node's Raft batches, per peer.

        A fresh commit signature goes to the leader alone, with the next message we send it anyway
        (an append acknowledgement, or a heartbeat's answer within a tick): only the leader certifies,
        certificates ride in the next block (or go alone at a tick), and a batch of its own would cost
        a signature and an MQTT hop here and two signature checks there, on the cores the commit path
        shares. Once a second every peer gets all our signatures of uncertified blocks, so that a new
        leader has them.
        """
        now = time.monotonic()
        if now - self.last_gossip > 1.0:
            self.last_gossip = now
            extras: dict[str, Any] = {}
            if self._is_leader():
                # Followers do not check proposals' signatures, so they cannot tell a forgery flood
                # from traffic: they stop listening to whom the leader stopped listening to.
                quarantined = self.refusals.quarantined()
                if quarantined:
                    extras["quarantine"] = {m: round(s, 1) for m, s in sorted(quarantined.items())[:64]}
            mine = self.node.key.id
            # The oldest first: certificates are issued in height order, so those unblock the rest.
            sigs = [[h, self.block_files[h].block.hash, by_signer[mine]]
                    for h, by_signer in sorted(self.signatures.items())
                    if h in self.block_files and mine in by_signer][:256]
            self.own_unsent = []
            if sigs:
                extras["sigs"] = sigs
            return {peer: extras for peer in peers} if extras else {}
        leader = self.node.raft.leader
        if not self.own_unsent or leader is None or leader not in sending:
            return {}
        unsent, self.own_unsent = self.own_unsent, []
        return {leader: {"sigs": unsent}}

    def on_extras(self, sender: str, extras: dict[str, Any]) -> None:
        certificate = self.node.trust.by_name(sender)
        if certificate is None:
            return
        quarantine = extras.get("quarantine")
        if isinstance(quarantine, dict) and sender == self.node.raft.leader:
            for member, seconds in list(quarantine.items())[:64]:
                if isinstance(member, str) and isinstance(seconds, int | float) and 0 < seconds <= 300:
                    self.refusals.impose(member, float(seconds), f"leader {sender}")
        for item in extras.get("sigs", []) if isinstance(extras.get("sigs"), list) else []:
            if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], int)):
                continue
            height, digest, signature = item
            block_file = self.block_files.get(height)
            if block_file is None or block_file.block.hash != digest or not isinstance(signature, bytes):
                continue
            if verify_commit_signature(certificate.subject, digest, signature):
                self.signatures.setdefault(height, {})[certificate.subject_id] = signature

    def on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        if topic.startswith(self._proposals_prefix):
            member = topic[len(self._proposals_prefix):]
            if self.refusals.is_quarantined(member):
                return
            # Whoever listens keeps the last moments of proposals: a node that becomes leader a little
            # later (an on-demand election this very proposal triggers) batches them too.
            now = time.monotonic()
            self.recent.append((now, member, payload))
            while self.recent and now - self.recent[0][0] > RECENT_SECONDS:
                self.recent.popleft()
            if self.node.options.mode == "on-demand" and self.node.raft.leader is None and not self._is_leader():
                self.wants_leader = True
            self._on_proposal(member, payload)

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        if now - self._latency_summary[0] >= LATENCY_SUMMARY_SECONDS:
            # The loop asks every tick; sorting the last 2,000 latencies that often was a few
            # percent of a busy leader's loop for figures people read every few seconds.
            latencies = sorted(self.latencies)
            self._latency_summary = (now, {
                "commit_p50_ms": round(statistics.median(latencies) * 1000, 2) if latencies else None,
                "commit_p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 2) if latencies else None})
        return {
            "height": self.verifier.height,
            "certified": self.certified,
            "head": self.verifier.head_hash.hex()[:16],
            "records_committed": self.committed_records,
            "pending": len(self.pending),
            **self._latency_summary[1],
            "refused": dict(self.refusals.by_reason),
            "divergent": self.divergent,
        }

    # ------------------------------------------------------------------ leader: proposals and blocks

    def _is_leader(self) -> bool:
        return self.node.raft.role is Role.LEADER

    def _last_unapplied_ledger_entry(self) -> int:
        """The index of the last entry in our log that the ledger must apply first (the applied index if none)."""
        log_ = self.node.raft.log
        last = log_.applied
        for entry in log_.slice(log_.applied + 1, log_.last_index() + 1):
            if entry.kind in (EntryKind.NORMAL, EntryKind.DECISION):
                last = entry.index
        return last

    def _follow_leadership(self) -> None:
        leader = self._is_leader()
        if leader and not self.was_leader:
            # Blocks from an earlier leader may still sit in the log after our no-op. Build on them only
            # once they are applied; otherwise our first block would name the wrong predecessor. With
            # none there (an on-demand leader after a pause, usually) we build at once: our first block
            # then commits with the no-op instead of one replication round after it.
            self.ready_at = self._last_unapplied_ledger_entry()
            self.tentative_state = None
            self.cert_in_flight = self.certified
        elif not leader and self.was_leader:
            self.verifier.checked_envelopes.clear()
            self.pending.clear()
            self.pending_ids.clear()
            self.early.clear()
            self.made.clear()
            self.tentative_state = None
        if leader != self.was_leader:
            self._sync_proposal_subscriptions()  # now, not at the next tick: proposals go to the leader only
        self.was_leader = leader
        caught_up = self.catchup_target <= self.verifier.height
        if leader and self.tentative_state is None and self.node.raft.log.applied >= self.ready_at and caught_up:
            self.tentative_height = self.verifier.height
            self.tentative_head = self.verifier.head_hash
            self.tentative_state = self.verifier.state
            self.tentative_seqs = dict(self.seqs)
            # Only the last moments: a follower no longer listening (stable mode) keeps an old copy.
            fresh_after = time.monotonic() - RECENT_SECONDS
            candidates = {(member, p): None for received, member, p in self.recent if received >= fresh_after}
            candidates.update(dict.fromkeys(self.early))
            self.early = []
            # Replay in rising sequence order: the ledger takes a proposer's records only in that order.
            for member, payload in sorted(candidates, key=lambda item: _envelope_seq(item[1])):
                self._on_proposal(member, payload, replaying=True)

    def submit(self, payload: bytes) -> None:
        """A record envelope this node sealed itself: batched here if we lead, else sent to the leader."""
        if self._is_leader():
            self._on_proposal(self.node.name, payload)
        else:
            self.node.link.publish(self.node.topics.ledger_propose(self.node.name), payload, qos=1)

    def has_leader_work(self) -> bool:
        """Whether a leader is still needed here: records to batch, blocks in flight or uncertified."""
        return bool(self.pending or self.early or self.tentative_height > self.verifier.height
                    or self.certified < self.verifier.height)

    def is_ready_leader(self) -> bool:
        """Leading, and every earlier term's block applied: what we plan from is the ledger's state."""
        return self._is_leader() and self.tentative_state is not None

    def _on_proposal(self, member: str, payload: bytes, *, replaying: bool = False) -> None:
        """A proposal `member` published (the topic says so). `replaying`: from what this node kept while
        following, re-read as it starts to lead; a copy of something already on the ledger is expected there."""
        if not self._is_leader() or self.refusals.is_quarantined(member):
            return
        if self.tentative_state is None:
            if len(self.early) < 100_000:
                self.early.append((member, payload))  # handled once earlier terms' blocks are applied
            return
        try:
            envelope = self.proposal_opener.open(payload, time.time())
        except EnvelopeRejected as exc:
            self.refusals.refuse(member, type(exc).__name__, str(exc))
            return
        sender = self.node.trust.by_id(envelope.sender)
        assert sender is not None
        if sender.name != member:
            # Someone else's envelope (a forgery would not have got this far; this is a copy) on this
            # member's topic: only the signer itself may propose its records.
            self.refusals.refuse(member, "spoofed", f"envelope {envelope.seq} signed by {sender.name} "
                                                    f"published on {member}'s proposal topic")
            return
        key = (envelope.sender, envelope.seq)
        if key in self.pending_ids or envelope.seq <= self.seqs.get(envelope.sender, 0):
            # Already batched, or at or below what the ledger holds from this proposer: a redelivery or
            # a replay. Counted (not a strike: QoS 1 redelivers), silently when re-reading our own copy.
            if not replaying:
                self.refusals.refuse(member, "replayed", f"record {envelope.seq} is already on the ledger "
                                                         "or in a block being made", strike=False)
            return
        if envelope.seq <= self.tentative_seqs.get(envelope.sender, 0):
            # Sequence numbers must rise per proposer in ledger order (that is the ledger's replay
            # protection); this one arrived after a later one was batched. The proposer re-seals it.
            self.refusals.refuse(member, "OutOfOrder", f"record {envelope.seq} arrived after a later one; "
                                                       "propose it again with a new sequence number", strike=False)
            return
        try:
            record = records.from_map(envelope.body)
            self.tentative_state = pattern.apply(self.tentative_state, record, sender.name)
        except (InvalidRecord, PeerError) as exc:
            # A signed record the rules refuse: the member's mistake or a race, not a forgery.
            self.refusals.refuse(member, type(exc).__name__, str(exc), strike=False)
            return
        self.tentative_seqs[envelope.sender] = envelope.seq
        self.verifier.checked_envelopes[payload] = envelope  # opened once, here; not again when applied
        self.pending.append(_Pending(payload, envelope.sender, envelope.seq, time.monotonic()))
        self.pending_ids.add(key)
        if len(self.pending) >= self.max_batch:
            self.cut_block()

    def cut_block(self) -> None:
        """Batch what is pending into a block now, if the blocks in flight allow."""
        if not self.pending or not self._is_leader():
            return
        in_flight = self.tentative_height - self.verifier.height
        if in_flight >= MAX_BLOCKS_IN_FLIGHT and len(self.pending) < self.max_batch:
            # Let records gather while earlier blocks commit: under load blocks grow instead of
            # multiplying, and every block costs a Raft round, a certificate and broker fan-out.
            return
        batch, self.pending = self.pending[: self.max_batch], self.pending[self.max_batch :]
        height = self.tentative_height + 1
        block = make_block(height=height, prev=self.tentative_head, term=self.node.raft.term,
                           time_ms=int(time.time() * 1000), proposer=self.node.key.id,
                           records=[p.envelope for p in batch])
        made = BlockFile(block, sign_block(self.node.key, block), {})
        block_file = encode_block_file(made)
        entry: dict[str, Any] = {"t": "block", "file": block_file}
        certs = self._ready_certificates()
        if certs:
            entry["certs"] = certs
        if not self.node.propose(canonical.encode(entry)):
            self.pending = batch + self.pending
            return
        if certs:
            self.cert_in_flight = certs[-1][0]
        if len(self.made) < 4 * MAX_BLOCKS_IN_FLIGHT:  # bounded, whatever happens to what we proposed
            self.made[height] = (block_file, made)
        for item in batch:
            self.pending_ids.discard((item.proposer_id, item.seq))
            self.received_at[(item.proposer_id, item.seq)] = item.received
        self.tentative_height = height
        self.tentative_head = block.hash

    def _maybe_propose_certificates(self) -> None:
        """Certificates no block took along: alone, once a tick.

        They ride in the next block's entry when one is cut (cut_block); alone they cost a Raft round of
        their own (an fsync on every node, six MQTT hops, signatures). Under load that halves the Raft
        rounds per block; a quiet cluster's last block is certified up to a tick later.
        """
        if not self._is_leader():
            return
        certs = self._ready_certificates()
        if certs and self.node.propose(canonical.encode({"t": "cert", "certs": certs})):
            self.cert_in_flight = certs[-1][0]

    def _ready_certificates(self) -> list[list[Any]]:
        """[height, hash, signatures] for each block, in height order, that a majority has signed and
        no entry in flight certifies yet."""
        if not self._is_leader():
            return []
        certs: list[list[Any]] = []
        for height in range(max(self.certified, self.cert_in_flight) + 1, self.verifier.height + 1):
            block_file = self.block_files.get(height)
            certifiers = self.certifiers.get(height)
            if block_file is None or certifiers is None:
                break
            sigs = {s: sig for s, sig in self.signatures.get(height, {}).items() if certifiers.counts(s)}
            if len(sigs) < certifiers.majority:
                break  # certify in order
            # The followers' signatures before ours: every node checks each signature in a certificate
            # but its own, so with 3 nodes each follower then checks one, not two (ours and the other's).
            own = self.node.key.id
            chosen = dict(sorted(sigs.items(), key=lambda item: (item[0] == own, item[0]))[:certifiers.majority])
            certs.append([height, block_file.block.hash, chosen])
        return certs

    # ------------------------------------------------------------------ every node: apply

    def _check_and_account(self, height: int, data: bytes, *, committed: bool = False,
                           decoded: BlockFile | None = None, signed_here: bool = False) -> BlockFile:
        """Check a block as an auditor would, learn its proposers' sequence numbers, tell the listeners.

        `committed`: it was just committed; if we lead, its audit lines (the records are committed: a
        majority holds them) go out before the listeners (orchestrator, actuation) act on it.
        """
        block_file = self.verifier.add(height, data, require_certificate=False, decoded=decoded,
                                       signed_here=signed_here)
        self._account_seqs()
        if committed and self._is_leader():
            self._publish_audit(height, block_file)
        self._notify(height, block_file)
        return block_file

    def _notify(self, height: int, block_file: BlockFile) -> None:
        """Tell the listeners what a block holds; learn the certificates its join records carry."""
        applied = []
        # The verifier has just decoded and checked these records (it is always called right before).
        for record, signer in self.verifier.last_records:
            applied.append(AppliedRecord(height, record, signer))
            structure = record.structure
            if (record.state == records.ID_CREATE and isinstance(structure, records.Identity)
                    and structure.kind != "container" and self.node.trust.by_name(structure.object) is None):
                # A member enrolled after this node started (a device, a deployed service): from now
                # on its envelopes are accepted here too, e.g. its ledger proposals.
                try:
                    self.node.trust.add(structure.proof)
                except TomqError as exc:
                    log.warning("height %s: cannot take the certificate of %s: %s", height, structure.object, exc)
        for listener in self.listeners:
            listener(applied)

    def _account_seqs(self) -> None:
        """Learn the proposers' sequence numbers from the block the verifier has just checked (it opened
        the envelopes already: decoding them again here was a fifth of a follower's CPU under load)."""
        for envelope in self.verifier.last_envelopes:
            self.seqs[envelope.sender] = max(self.seqs.get(envelope.sender, 0), envelope.seq)

    def _apply_block(self, entry: Entry, data: bytes) -> None:
        self.apply_started = time.monotonic()  # listeners time how long checking a block takes
        ours = self.made.pop(self.verifier.height + 1, None)
        made = ours[1] if ours is not None and ours[0] == data else None
        for stale in [h for h in self.made if h <= self.verifier.height + 1]:
            del self.made[stale]  # proposed, then replaced by another block at that height
        try:
            decoded = made if made is not None else decode_block_file(data)
        except PeerError as exc:
            log.warning("skipping entry %s: %s", entry.index, exc)
            return
        header = decoded.block
        if header.height <= self.verifier.height:
            return  # re-applied after a restart: the store already has it
        try:
            block_file = self._check_and_account(header.height, data, committed=True, decoded=decoded,
                                                 signed_here=made is not None)
        except LedgerInvalid as exc:
            # Deterministic: every node reaches the same verdict on the same committed bytes.
            self.verifier = self.verifier.reset_failure()
            log.warning("skipping block from entry %s (term %s): %s", entry.index, entry.term, exc)
            if self._is_leader():
                # Rebuild the tentative chain from what is applied (said directly: faking a step-down
                # here kept a real step-down in the same turn from clearing what it must).
                self.tentative_state = None
                self.ready_at = self._last_unapplied_ledger_entry()
                self.cert_in_flight = self.certified
            return
        finally:
            for envelope_bytes in header.records:  # applied or refused, this block is done with them
                self.verifier.checked_envelopes.pop(envelope_bytes, None)
        # Not written to the store yet: until its certificate is applied the block lives in the Raft
        # log, which is never compacted past an uncertified block, so a restart re-applies it.
        self._await_certificate(block_file)
        now = time.monotonic()
        for envelope in self.verifier.last_envelopes:  # this block's, opened by the check just made
            started = self.received_at.pop((envelope.sender, envelope.seq), None)
            if started is not None:
                self.latencies.append(now - started)
                if self.node.metrics is not None:
                    self.node.metrics.commit_latency.observe(now - started)
        self.committed_records += len(block_file.block.records)
        if self.node.metrics is not None:
            self.node.metrics.records_committed.inc(len(block_file.block.records))

    def _await_certificate(self, block_file: BlockFile) -> None:
        """Hold a block the verifier has just checked until its certificate comes: who may certify it,
        and our own signature (to the leader, unless we lead: the leader counts its own where made)."""
        height = block_file.block.height
        self.block_files[height] = block_file
        assert self.verifier.last_certifiers is not None
        self.certifiers[height] = self.verifier.last_certifiers
        signature = commit_signature(self.node.key, block_file.block.hash)
        self.signatures.setdefault(height, {})[self.node.key.id] = signature
        if not self._is_leader():
            self.own_unsent.append([height, block_file.block.hash, signature])

    def _apply_certs(self, certs: list[Any], entry_index: int) -> None:
        for item in certs:
            if not (isinstance(item, list) and len(item) == 3 and isinstance(item[2], dict)):
                continue
            height, digest, certificate = item
            if height != self.certified + 1:
                continue  # a duplicate (a retried cert entry) or out of order: ignored everywhere alike
            block_file = self.block_files.get(height)
            if block_file is None or block_file.block.hash != digest:
                continue
            problem = self._certificate_problem(height, digest, certificate)
            if problem is not None:
                # Deterministic (judged from the chain alone: the nodes joined before the block, the
                # certificates the chain holds, the block's time): every node refuses it alike, and
                # the block stays uncertified; no command is sent on its authority. A leader assembles
                # the certificate again at its next tick.
                log.error("refusing the certificate of height %s in entry %s: %s", height, entry_index, problem)
                if self._is_leader():
                    self.cert_in_flight = self.certified
                break  # certify in order
            final = BlockFile(block_file.block, block_file.proposer_signature, certificate)
            if height in self.kept_certified:
                self.kept_certified[height] = final
            data = encode_block_file(final)
            self._write_store(height, data)
            self._certified(height)
            if self.ledger_dir is None and self._is_leader():
                self._speak([(height, data)])  # without a shared directory the leader speaks

    def _certificate_problem(self, height: int, digest: bytes, certificate: Any) -> str | None:
        """Why `certificate` does not certify block `height` (None if it does), judged as `tomq ledger
        verify` will judge the file: by the nodes joined before the block, with the chain's own
        certificates for them (not this host's cluster.toml, which may differ). A signature this node
        has already verified (its own, or one a peer sent) is not verified again: under load that is
        every one of them."""
        certifiers = self.certifiers.get(height)
        if certifiers is None:
            return "this node has not applied the block"
        shape = certificate_shape_problem(certificate)
        if shape is not None:
            return shape
        return certificate_problem(certifiers, digest, certificate, certifiers.majority, self.signatures.get(height))

    def _certified(self, height: int) -> None:
        self.certified = height
        self.block_files.pop(height, None)
        self.signatures.pop(height, None)
        self.certifiers.pop(height, None)

    def _write_store(self, height: int, data: bytes) -> None:
        self.writer.put(height, data)

    def _speak_soon(self, created: list[tuple[int, bytes]]) -> None:
        """The writer created these heights' shared files (on its thread): speak for them from the loop."""
        self.node.call(lambda: self._speak(created))

    def _speak(self, blocks: list[tuple[int, bytes]]) -> None:
        """Publish certified blocks: each retained, and the head once for the last (the audit lines
        went out at commit).

        One node speaks for each height (the one whose link created the shared file), so the broker
        carries each block once, not once per node; the writer hands over a batch at a time.
        """
        topics = self.node.topics
        link = self.node.link
        for height, data in blocks:
            link.publish(topics.ledger_block(height), data, qos=1, retain=True)
            if height >= self.retained_window:
                link.publish(topics.ledger_block(height - self.retained_window), b"", qos=1, retain=True)
        height, data = blocks[-1]
        head_hash = decode_block_file(data, check_canonical=False).block.hash  # bytes this node encoded
        link.publish(topics.ledger_head(), canonical.encode({"height": height, "hash": head_hash}), qos=1, retain=True)

    def _publish_audit(self, height: int, block_file: BlockFile) -> None:
        # From what the verifier has just decoded and checked (it is always called right before):
        # decoding every record again here was a sixth of the leader's loop under load.
        opened = [(index, record, envelope.sender, envelope.seq, envelope.body) for index, ((record, _), envelope)
                  in enumerate(zip(self.verifier.last_records, self.verifier.last_envelopes, strict=True))]
        for line_topic, line in audit_lines(self.node.topics, height, block_file, opened):
            self.node.link.publish(line_topic, line.encode(), qos=0)

    def _catch_up(self) -> None:
        """Fetch certified blocks up to the snapshot's height from the shared directory, then drain."""
        if self.ledger_dir is None:
            if time.monotonic() - self.last_catchup_error > 10:
                self.last_catchup_error = time.monotonic()
                log.error("snapshot covers height %s, this node holds %s, and there is no --ledger-dir to fetch "
                          "the blocks from; start it with the shared ledger directory", self.catchup_target,
                          self.verifier.height)
            return
        # Certified in order: before blocks beyond our head are taken from the shared directory (each
        # certified as it comes), every block we applied ourselves must have its certificate too.
        while self.certified < self.certify_target or (
                self.verifier.height < self.catchup_target and self.certified < self.verifier.height):
            if not self._certify_from_shared(self.certified + 1):
                return  # not there yet, or bad: try again next tick
        while self.verifier.height < self.catchup_target:
            height = self.verifier.height + 1
            path = self.ledger_dir / block_file_name(height)
            try:
                data = path.read_bytes()
            except OSError:
                return  # not certified (or not written) yet: try again next tick
            try:
                block_file = self.verifier.add(height, data)
            except LedgerInvalid as exc:
                self.verifier = self.verifier.reset_failure()
                log.error("cannot catch up from the shared directory: %s", exc)
                return
            self._account_seqs()
            self._notify(height, block_file)
            self._write_store(height, data)
            self._certified(height)
        log.info("caught up to ledger height %s from %s", self.verifier.height, self.ledger_dir)
        backlog, self.backlog = self.backlog, []
        for entry in backlog:
            self.apply(entry)


    def _certify_from_shared(self, height: int) -> bool:
        """Take the certificate of a block we hold uncertified from its file in the shared directory."""
        assert self.ledger_dir is not None
        block_file = self.block_files.get(height)
        try:
            data = (self.ledger_dir / block_file_name(height)).read_bytes()
            shared = decode_block_file(data)
        except (OSError, PeerError):
            return False
        if block_file is None or shared.block.hash != block_file.block.hash:
            log.error("cannot take the certificate of height %s from %s: it holds another block", height,
                      self.ledger_dir)
            return False
        problem = self._certificate_problem(height, shared.block.hash, shared.commit_certificate)
        if problem is not None:
            log.error("cannot take the certificate of height %s from %s: %s", height, self.ledger_dir, problem)
            return False
        self._write_store(height, data)
        self._certified(height)
        return True


def _envelope_seq(envelope: bytes) -> int:
    try:
        fields = canonical.decode(canonical.decode(envelope)[0], check_canonical=False)
        return int(fields["seq"])
    except (canonical.CanonicalDecodeError, KeyError, TypeError, ValueError, IndexError):
        return 0  # malformed: the opener will refuse it with a reason


def stand_turn(voters: Iterable[str], name: str, term: int) -> int:
    """On-demand: when `name` stands for election after a pause in `term` (0 = at once; see
    LedgerService._maybe_stand). The voters in name order, rotated by the term: each term another
    node goes first, and every node that agrees on the term agrees on the order. A non-voter comes last."""
    ordered = sorted(voters)
    if name not in ordered:
        return len(ordered)
    return (ordered.index(name) - term) % len(ordered)


def audit_lines(topics: Any, height: int, block_file: BlockFile,
                opened: list[tuple[int, records.Record, str, int, Any]] | None = None) -> list[tuple[str, str]]:
    """One readable JSON line per record, for `mosquitto_sub -t 'tomq/+/audit/#'`.

    `opened`: (index, record, proposer id, seq, body) of each record, if already decoded."""
    if opened is None:
        opened = []
        for index, envelope in enumerate(block_file.block.records):
            signed, _ = canonical.decode(envelope)
            fields = canonical.decode(signed, check_canonical=False)
            try:
                opened.append((index, records.from_map(fields["body"]), fields["from"], fields["seq"], fields["body"]))
            except InvalidRecord:
                continue
    block = block_file.block.hash.hex()[:16]
    out = []
    for index, record, proposer, seq, body in opened:
        line = {"height": height, "index": index, "block": block, "record": record.record_id, "state": record.state,
                "proposer": proposer, "seq": seq, "t": record.time_ms, "body": jsonable(body)}
        out.append((topics.audit(record.state), json.dumps(line, sort_keys=True)))
    return out


def jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex() if len(value) <= 64 else f"sha256:{hashlib.sha256(value).hexdigest()}"
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [jsonable(v) for v in value]
    return value
