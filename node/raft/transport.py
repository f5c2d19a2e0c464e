"""Raft over MQTT: one inbox topic per node, one signed envelope per destination per batch.

A batch to node `to` is published on `tomq/<cluster>/node/<to>/raft/<from>` as an envelope of type
"raft" signed by the sender, whose body is `{"m": [encoded messages], "x": extras}`. The broker's ACL
already lets a client publish only where `<from>` is its own name; the receiver checks again that
the envelope's signer is the certified node `<from>`, and that every message inside claims to be from
it, so a compromised broker cannot forge Raft traffic either.

QoS 0: Raft retransmits on its own (heartbeats, probes), and QoS 1 would only add acknowledgements
and, with paho's defaults, head-of-line stalls; lost messages are what the core is built for.

Malformed or forged batches are counted and logged with the sender's name, never raised: one bad
peer must not take the node down, and one that keeps sending them is not listened to for a while
(tomq/refusals.py), so a flood from a compromised node cannot spend this node's CPU on signatures.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from tomq.certificate import TrustStore
from tomq.errors import EnvelopeRejected
from tomq.identity import SigningKey
from tomq.mqtt import MqttLink
from tomq.node.raft.messages import MalformedRaftMessage, Message, decode, encode
from tomq.refusals import Refusals
from tomq.topics import Topics, is_segment
from tomq.wire import EnvelopeOpener, SequenceCounter, SequenceWatermarks, seal

log = logging.getLogger("tomq.raft.transport")

BatchHandler = Callable[[str, list[Message], dict[str, Any]], None]  # from node, messages, extras


class RaftTransport:
    def __init__(
        self,
        *,
        link: MqttLink,
        topics: Topics,
        name: str,
        key: SigningKey,
        trust: TrustStore,
        counter: SequenceCounter,
        watermarks: SequenceWatermarks,
        on_batch: BatchHandler,
        refusals: Refusals | None = None,
    ) -> None:
        self.link = link
        self.topics = topics
        self.name = name
        self.key = key
        self.trust = trust
        self.counter = counter
        self._inbox_prefix = topics.raft_inbox_prefix(name)
        self.opener = EnvelopeOpener(trust, watermarks, max_bytes=8 * 1024 * 1024, accepted_types=frozenset({"raft"}))
        self.on_batch = on_batch
        self.refusals = refusals or Refusals("raft batch", log)
        self.rejected = self.refusals.by_reason  # reason -> count, for metrics and operators
        self.sent_batches = 0
        self.received_batches = 0

    def start(self) -> None:
        self.link.subscribe(self.topics.raft_inbox(self.name))

    def send(self, messages: list[Message], extras: dict[str, dict[str, Any]] | None = None) -> None:
        """Send each destination its messages (and extras) as one signed batch."""
        by_peer: dict[str, list[bytes]] = {}
        for message in messages:
            by_peer.setdefault(message.to, []).append(encode(message))
        for peer in (extras or {}):
            by_peer.setdefault(peer, [])
        for peer, encoded in by_peer.items():
            body: dict[str, Any] = {"m": encoded}
            if extras and peer in extras:
                body["x"] = extras[peer]
            wire = seal(self.key, seq=self.counter.next(), time_ms=int(time.time() * 1000), type="raft", body=body)
            if self.link.publish(self.topics.raft(peer, self.name), wire):
                self.sent_batches += 1

    def handle(self, topic: str, payload: bytes) -> None:
        """Called for every message on our inbox (inside the daemon's `link.pump`, on its loop thread)."""
        # A prefix and one segment, not the general topic parser: that was a sixth of handling a batch.
        if not topic.startswith(self._inbox_prefix):
            return  # not addressed to us
        sender = topic[len(self._inbox_prefix):]
        if not is_segment(sender):
            self._reject("bad-topic", topic[:80], f"topic {topic[:80]!r}: {sender[:64]!r} is not a node id")
            return
        if self.refusals.is_quarantined(sender):
            return
        try:
            envelope = self.opener.open(payload, time.time())
        except EnvelopeRejected as exc:
            self._reject(type(exc).__name__, sender, str(exc))
            return
        certificate = self.trust.by_id(envelope.sender)
        if certificate is None or certificate.name != sender or certificate.role != "node":
            self._reject("spoofed", sender, f"envelope signed by {envelope.sender}, not node {sender}")
            return
        body = envelope.body
        if not isinstance(body, dict) or not isinstance(body.get("m"), list):
            self._reject("malformed", sender, "raft batch body must be a map with a message list")
            return
        messages: list[Message] = []
        try:
            for item in body["m"]:
                if type(item) is not bytes:
                    raise MalformedRaftMessage("raft batch item is not bytes")
                message = decode(item)
                if message.from_ != sender or message.to != self.name:
                    raise MalformedRaftMessage(f"message claims {message.from_}->{message.to} on {sender}'s topic")
                messages.append(message)
        except MalformedRaftMessage as exc:
            self._reject("malformed", sender, str(exc))
            return
        extras = body.get("x", {})
        self.received_batches += 1
        self.on_batch(sender, messages, extras if isinstance(extras, dict) else {})

    def _reject(self, reason: str, sender: str, detail: str) -> None:
        self.refusals.refuse(sender, reason, detail)
