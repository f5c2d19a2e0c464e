"""Devices join and leave the ledger themselves: their signed birth and leave messages become records.

A device (tomq.sensors.device) publishes on `dev/<name>/state`, retained, QoS 1:
    join    seal(device key, seq=S, type="join", body={"certificate": <its membership certificate>})
    leave   seal(device key, seq=S+1, type="leave", body={"reason": "graceful"})  when it leaves, or
            the same envelope with reason "vanished", registered at connect as its MQTT last will,
            which the broker publishes when the device disappears without leaving.
Every node follows these messages (each checked: the certificate is the operator's, names the
topic's device and a device role; the signature is that certificate's key; seqs only rise, so a
stale retained message cannot undo a newer one) and keeps what each device last said. The leader
compares that with the committed ledger and proposes the difference: PROV-ID-create with the
certificate as id-proof for a device that said join and has not joined, PROV-ID-delete for one that
said leave (or vanished) and is joined. Table II refuses a second join or a leave before a join,
so a proposal that races a failover cannot record anything twice.

What this module must never do: propose on a message it could not check, or act on the ledger's
state before this node's leader has applied every earlier block (`is_ready_leader`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tomq import canonical
from tomq import certificate as certificates
from tomq.canonical import CanonicalDecodeError
from tomq.certificate import Certificate
from tomq.errors import (
    EnvelopeRejected,
    InvalidCertificate,
    InvalidTopic,
    MalformedEnvelope,
    ReplayedEnvelope,
)
from tomq.node.services.readings import DEVICE_ROLES
from tomq.records import ID_CREATE, ID_DELETE, Identity, Record
from tomq.topics import parse
from tomq.wire import MemoryWatermarks, open_signed_by, seal

if TYPE_CHECKING:
    from tomq.node.ledger_service import LedgerService

log = logging.getLogger("tomq.presence")

STATE_TYPES = frozenset({"join", "leave"})
LEAVE_REASONS = ("graceful", "vanished")
RETRY_SECONDS = 3.0  # a proposal that has not committed by then is proposed again


@dataclass(frozen=True, slots=True)
class DeviceSaid:
    """The latest checked state message of one device."""

    joined: bool
    certificate: Certificate
    seq: int
    reason: str  # "join", or the leave's reason


class DevicePresence:
    def __init__(self, ledger: LedgerService) -> None:
        self.ledger = ledger
        self.node = ledger.node
        self.prefix = f"{self.node.topics.root}/dev/"
        self.said: dict[str, DeviceSaid] = {}
        self.watermarks = MemoryWatermarks()
        self.proposed: dict[str, float] = {}  # device -> when we last proposed its change
        self.refusals = self.node.refusals("device state", log)
        # tick() runs every Raft tick; it compares with the ledger only when a message arrived, a block
        # was applied or a retry is due, not on every tick for every device ever heard of.
        self._changed = False
        self._compared_at_height = -1
        self._next_retry = 0.0

    def subscriptions(self) -> list[str]:
        return [f"{self.node.topics.root}/dev/+/state"]

    def handles(self, topic: str) -> bool:
        return topic.startswith(self.prefix) and topic.endswith("/state")

    def on_message(self, topic: str, payload: bytes) -> None:
        try:
            parsed = parse(topic)
        except InvalidTopic as exc:
            self.refusals.refuse(topic[:120], "InvalidTopic", str(exc))
            return
        if parsed.kind != "device-state" or parsed.cluster != self.node.cluster.name:
            return
        device = parsed.params["device"]
        if self.refusals.is_quarantined(device):
            return
        try:
            said = self._check(device, payload)
        except ReplayedEnvelope:
            return  # the retained copy of a message already taken (a reconnect redelivers it)
        except (EnvelopeRejected, InvalidCertificate) as exc:
            self.refusals.refuse(device, type(exc).__name__, str(exc))
            return
        self.said[device] = said
        self._changed = True
        log.info("device %s says %s", device, said.reason)

    def tick(self) -> None:
        """On the ready leader: propose what the ledger does not yet say about each device."""
        if not self.said:
            return
        now = time.monotonic()
        height = self.ledger.verifier.height
        if not self._changed and height == self._compared_at_height and now < self._next_retry:
            return
        self._changed = False
        self._compared_at_height = height
        self._next_retry = now + RETRY_SECONDS
        leading = self.ledger.is_ready_leader()
        state = self.ledger.verifier.state
        for device, said in self.said.items():
            member = state.member(device)
            if said.joined == (member is not None):
                self.proposed.pop(device, None)
                continue
            if member is not None and member.kind != "device":
                continue  # a name held by something else: Table II would refuse it anyway
            if not leading:
                node = self.node
                if node.options.mode == "on-demand" and node.raft.leader is None:
                    self.ledger.wants_leader = True  # as for any request: this node stands for election
                continue
            if now - self.proposed.get(device, -RETRY_SECONDS) < RETRY_SECONDS:
                continue
            self.proposed[device] = now
            identity = Identity(device, "device", said.certificate.encoded)
            now_ms = int(time.time() * 1000)
            if said.joined:
                record = Record(ID_CREATE, identity, now_ms, {"via": "join message", "seq": said.seq})
            else:
                record = Record(ID_DELETE, identity, now_ms, {"reason": said.reason, "seq": said.seq})
            log.info("proposing %s of device %s", record.state, device)
            self.ledger.submit(seal(self.node.key, seq=self.node.record_sequence.next(), time_ms=now_ms,
                                    type="record", body=record.to_map()))

    def status(self) -> dict[str, object]:
        return {"devices_said": {name: said.reason for name, said in sorted(self.said.items())},
                "refused": dict(self.refusals.by_reason)}

    def _check(self, device: str, payload: bytes) -> DeviceSaid:
        certificate = self._certificate_in_join(device, payload)
        if certificate is None:  # a leave: signed by the certificate we know for this device
            known = self.said.get(device)
            certificate = known.certificate if known is not None else self.node.trust.by_name(device)
            if certificate is None:
                raise InvalidCertificate(f"leave of {device}, which never showed a certificate")
        envelope = open_signed_by(payload, certificate.subject, name=device, accepted_types=STATE_TYPES,
                                  watermarks=self.watermarks)
        if not certificate.is_valid_at(time.time()):
            raise InvalidCertificate(f"the certificate of {device} is not valid now")
        if envelope.type == "join":
            return DeviceSaid(True, certificate, envelope.seq, "join")
        reason = envelope.body.get("reason") if isinstance(envelope.body, dict) else None
        if reason not in LEAVE_REASONS:
            raise InvalidCertificate(f"leave of {device} gives no reason among {', '.join(LEAVE_REASONS)}")
        return DeviceSaid(False, certificate, envelope.seq, str(reason))

    def _certificate_in_join(self, device: str, payload: bytes) -> Certificate | None:
        """For a join, the certificate it carries, checked against the operator and the topic."""
        try:
            signed, _ = canonical.decode(payload)
            fields = canonical.decode(signed, check_canonical=False)
        except (CanonicalDecodeError, TypeError, ValueError) as exc:
            raise MalformedEnvelope(f"state message of {device} is not an envelope: {exc}") from None
        if not isinstance(fields, dict) or fields.get("type") != "join":
            return None
        body = fields.get("body")
        proof = body.get("certificate") if isinstance(body, dict) else None
        if not isinstance(proof, bytes):
            raise InvalidCertificate(f"join of {device} carries no certificate")
        certificate = certificates.decode(proof, self.node.cluster.operator)
        if certificate.name != device or certificate.role not in DEVICE_ROLES:
            raise InvalidCertificate(f"join on dev/{device}/state carries the certificate of {certificate.role} "
                                     f"{certificate.name}")
        if certificate.cluster != self.node.cluster.name:
            raise InvalidCertificate(f"join of {device} carries a certificate of cluster {certificate.cluster!r}")
        return certificate
