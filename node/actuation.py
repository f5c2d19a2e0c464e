"""Contracts acted on: committed records fire rules, the leader records each command, then sends it signed.

Every node runs this as a listener of the ledger, so every node computes the same intents from the
same committed records (contracts.fire is pure). Only the ready leader acts on them:

1. A command intent is proposed as `PROV-ORCH(deployed=<command id>, location=<actuator>,
   action="command", reason={setting, rule, trigger, trigger_height})`. Table II records each command
   id once, so re-proposing after a timeout or a failover cannot issue it twice.
2. Once that record's block is certified (a majority of nodes signed it as they persisted it), the
   leader sends the actuator the command envelope (tomq.sensors.command): the block header, the
   record, its Merkle path and the commit certificate, so the actuator can check on its own that
   the cluster committed exactly this command. The record comes first, the command after: the
   ledger always holds the authority for what an actuator did.
3. An acknowledgement intent (a passive contract: a device's join is on the ledger) is published
   signed on the device's cmd topic.

A command that would give an actuator the setting it was last commanded (committed, or about to
be) is not issued: a busy junction stays green without a new record every time the analyser says so.

A new leader sends again the commands certified in the last MAX_AGE_SECONDS: the actuator refuses
what it has already taken (its (height, index) watermark), so a resend is harmless and a command
whose sender died between commit and send still arrives. Records older than MAX_AGE_SECONDS (a
node replaying its store at startup, a long outage) fire nothing: a command is refused as stale by
the actuator after that anyway.

What this module must never do: send a command whose record is not certified, or propose from
anything but committed records.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tomq import canonical
from tomq.node.ledger.block import block_file_name, decode_block_file
from tomq.node.orchestrator import contracts
from tomq.node.orchestrator.contracts import Acknowledge, Command, Contract
from tomq.node.orchestrator.state import AppliedRecord
from tomq.records import ORCH, Orchestrate, Record
from tomq.wire import seal

if TYPE_CHECKING:
    from tomq.node.ledger_service import LedgerService
    from tomq.node.orchestrator.service import Orchestrator

log = logging.getLogger("tomq.actuation")

MAX_AGE_SECONDS = 30.0  # what actuators accept (sensors/command.py max_age_s); older intents are dropped
RETRY_SECONDS = 3.0


@dataclass
class _Certifiable:
    """A committed command record waiting for its block's certificate, then for the leader to send it."""

    height: int
    command_id: str
    actuator: str
    time_ms: int


class Actuation:
    def __init__(self, ledger: LedgerService, orchestrator: Orchestrator) -> None:
        self.ledger = ledger
        self.orchestrator = orchestrator
        self.node = ledger.node
        self._contracts: tuple[Contract, ...] = ()
        self._contracts_version = -1
        self.due: dict[str, Command] = {}  # command id -> intent not yet on the ledger
        self.due_since: dict[str, float] = {}  # command id -> its trigger record's time (ms)
        self.proposed_at: dict[str, float] = {}
        self.acks: list[Acknowledge] = []
        self.to_send: list[_Certifiable] = []  # committed in the last MAX_AGE_SECONDS, in ledger order
        self.unsent: deque[_Certifiable] = deque()  # of those, what this leader has not sent yet
        self.was_leader = False
        self.commanded: dict[str, dict[str, Any]] = {}  # actuator -> setting of its latest committed command
        self.counts = {"fired": 0, "unchanged": 0, "proposed": 0, "sent": 0, "acknowledged": 0, "dropped_stale": 0}

    # ------------------------------------------------------------------ every node

    def on_records(self, applied: list[AppliedRecord]) -> None:
        now_ms = time.time() * 1000
        deployed = self._deployed_contracts()
        for item in applied:
            record = item.record
            fresh = now_ms - record.time_ms < MAX_AGE_SECONDS * 1000
            structure = record.structure
            if record.state == ORCH and isinstance(structure, Orchestrate) and structure.action == "command":
                setting = structure.reason.get("setting")
                if isinstance(setting, dict):
                    self.commanded[structure.location] = setting
                self.due.pop(structure.deployed, None)
                self.due_since.pop(structure.deployed, None)
                self.proposed_at.pop(structure.deployed, None)
                if fresh:
                    pending = _Certifiable(item.height, structure.deployed, structure.location, record.time_ms)
                    self.to_send.append(pending)
                    self.unsent.append(pending)
                    self.ledger.certify_soon(item.height)  # the command waits for this certificate
            if not fresh or not deployed:
                continue
            for intent in contracts.fire(deployed, record, record.record_id, item.height):
                self.counts["fired"] += 1
                if isinstance(intent, Acknowledge):
                    self.acks.append(intent)
                elif intent.setting == self._latest_setting(intent.actuator):
                    self.counts["unchanged"] += 1  # the actuator already has (or is getting) this setting
                elif not self.ledger.verifier.state.has_issued(intent.command_id):
                    self.due[intent.command_id] = intent
                    self.due_since[intent.command_id] = record.time_ms

    def _latest_setting(self, actuator: str) -> dict[str, Any] | None:
        for intent in reversed(self.due.values()):
            if intent.actuator == actuator:
                return intent.setting
        return self.commanded.get(actuator)

    def has_leader_work(self) -> bool:
        return bool(self.due)

    def has_work(self) -> bool:
        """Whether the leader could act now (the node loop then turns at once, not at its next tick):
        an intent not proposed yet, an acknowledgement to send, a command whose block is certified."""
        if not self.ledger.is_ready_leader():
            return False
        return (bool(self.acks) or any(command_id not in self.proposed_at for command_id in self.due)
                or self._sendable())

    def _sendable(self) -> bool:
        """The oldest unsent command's block is certified, and its file at hand: kept in memory when
        it was certified, or (certified before this node led) in the store."""
        if not self.unsent:
            return False
        height = self.unsent[0].height
        return height <= self.ledger.certified and (
            self.ledger.certified_file(height) is not None or height <= self.ledger.stored)

    def status(self) -> dict[str, Any]:
        return {"contracts": len(self._deployed_contracts()), "commands_due": len(self.due), **self.counts}

    # ------------------------------------------------------------------ the leader

    def tick(self) -> None:
        self._expire()
        self.act()

    def act(self) -> None:
        """What the leader does with what committed: at every tick, and at once when `has_work`."""
        leader = self.ledger.is_ready_leader()
        if leader and not self.was_leader:
            self.unsent = deque(self.to_send)  # a new leader sends again what is recent: see the module docstring
        self.was_leader = leader
        if not leader:
            self.acks.clear()  # the leader acknowledges; a follower's copy would only pile up
            self.unsent.clear()
            return
        now = time.monotonic()
        for command_id, intent in list(self.due.items()):
            if now - self.proposed_at.get(command_id, -RETRY_SECONDS) >= RETRY_SECONDS:
                self.proposed_at[command_id] = now
                self._propose(intent)
        for ack in self.acks:
            self._acknowledge(ack)
        self.acks.clear()
        # In ledger order: a command goes out once its block is certified (the envelope carries the
        # certificate), never before.
        while self._sendable():
            self._send(self.unsent.popleft())

    def _expire(self) -> None:
        now_ms = time.time() * 1000
        horizon = now_ms - MAX_AGE_SECONDS * 1000
        self.to_send = [p for p in self.to_send if p.time_ms > horizon]
        # All of them, not only the head: after a leader change (clocks apart) a stale one may sit
        # behind a fresher one.
        self.unsent = deque(p for p in self.unsent if p.time_ms > horizon)
        for command_id, since in list(self.due_since.items()):
            if since <= horizon:
                log.warning("command %s to %s dropped: not committed within %.0f s of its trigger", command_id,
                            self.due[command_id].actuator, MAX_AGE_SECONDS)
                self.counts["dropped_stale"] += 1
                del self.due[command_id], self.due_since[command_id]
                self.proposed_at.pop(command_id, None)

    def _propose(self, intent: Command) -> None:
        now_ms = int(time.time() * 1000)
        record = Record(ORCH, Orchestrate(intent.command_id, intent.actuator, "command", intent.reason()), now_ms)
        self.counts["proposed"] += 1
        log.info("contract %s: proposing %s -> %s %s", intent.contract, intent.command_id, intent.actuator,
                 intent.setting)
        self.ledger.submit(seal(self.node.key, seq=self.node.record_sequence.next(), time_ms=now_ms, type="record",
                                body=record.to_map()))

    def _acknowledge(self, ack: Acknowledge) -> None:
        body = {"contract": ack.contract, "device": ack.device, "height": ack.height, "record": ack.trigger}
        wire = seal(self.node.key, seq=self.node.record_sequence.next(), time_ms=int(time.time() * 1000), type="ack",
                    body=body)
        self.node.link.publish(self.node.topics.device_cmd(ack.device), wire, qos=1)
        self.counts["acknowledged"] += 1

    def _send(self, pending: _Certifiable) -> None:
        from tomq.sensors.command import build_command  # the actuator's side of the same format

        block_file = self.ledger.certified_file(pending.height)
        if block_file is None:  # certified before this node led (a new leader's resend): from the store
            path = self.ledger.store / block_file_name(pending.height)
            try:
                block_file = decode_block_file(path.read_bytes())
            except (OSError, ValueError) as exc:
                log.warning("cannot send command %s: block %s unreadable: %s", pending.command_id, pending.height,
                            exc)
                return
        index = _index_of_command(block_file.block.records, pending.command_id)
        if index is None:
            log.warning("cannot send command %s: not in block %s", pending.command_id, pending.height)
            return
        signers = [self.node.cluster.certificate(self.node.name).encoded]
        for signer in block_file.commit_certificate:
            certificate = self.node.trust.by_id(signer)
            if certificate is not None and certificate.name != self.node.name:
                signers.append(certificate.encoded)
        wire = build_command(self.node.key, seq=self.node.record_sequence.next(), time_ms=int(time.time() * 1000),
                             actuator=pending.actuator, block_file=block_file, record_index=index,
                             signer_certificates=signers)
        self.node.link.publish(self.node.topics.device_cmd(pending.actuator), wire, qos=1)
        self.counts["sent"] += 1
        log.info("sent command %s to %s (block %s, record %s)", pending.command_id, pending.actuator, pending.height,
                 index)

    def _deployed_contracts(self) -> tuple[Contract, ...]:
        state = self.orchestrator.state
        if state.version != self._contracts_version:
            found: list[Contract] = []
            for name, spec in sorted(state.specs.items()):
                try:
                    found.extend(contracts.parse_all(name, spec.contracts))
                except contracts.ContractError as exc:  # checked when the spec was built; kept for safety
                    log.warning("service %s: contracts not used: %s", name, exc)
            self._contracts = tuple(found)
            self._contracts_version = state.version
        return self._contracts


def _index_of_command(envelopes: tuple[bytes, ...], command_id: str) -> int | None:
    for index, envelope in enumerate(envelopes):
        if command_id.encode() not in envelope:
            continue  # cheap filter before decoding
        signed, _ = canonical.decode(envelope)
        body = canonical.decode(signed, check_canonical=False).get("body", {})
        orchestrate = body.get("orchestrate") if isinstance(body, dict) else None
        if isinstance(orchestrate, dict) and orchestrate.get("deployed") == command_id:
            return index
    return None
