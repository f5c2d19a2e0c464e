"""Raft over MQTT: one inbox topic per node, one authenticated envelope per destination per batch.

A batch to node `to` is published on `tomq/<cluster>/node/<to>/raft/<from>` as an envelope of type
"raft" whose body is `{"m": [encoded messages], "x": extras}`, sealed with a MAC under the key that
only `<from>` and `<to>` can compute from their certified keys (tomq/wire.py `seal_shared`; Raft
traffic needs no proof to third parties, and a signature and its check cost 74 us per batch here,
the MAC about 1 us). The broker's ACL already lets a client publish only where `<from>` is its own name;
the receiver checks again that the envelope comes from the certified node `<from>` (its MAC under
their shared key, which nobody else holds) and that every message inside claims to be from it, so
a compromised broker, or another node, cannot forge Raft traffic either.

QoS 0: Raft retransmits on its own (heartbeats, probes), and QoS 1 would only add acknowledgements
and, with paho's defaults, head-of-line stalls; lost messages are what the core is built for.

Malformed or forged batches are counted and logged with the sender's name, never raised: one bad
peer must not take the node down, and one that keeps sending them is not listened to for a while
(tomq/refusals.py), so a flood from a compromised node cannot spend this node's CPU.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from tomq.certificate import Certificate, TrustStore
from tomq.errors import EnvelopeRejected
from tomq.identity import SigningKey
from tomq.mqtt import MqttLink
from tomq.node.raft.messages import MalformedRaftMessage, Message, decode, encode
from tomq.refusals import Refusals
from tomq.topics import Topics, is_segment
from tomq.wire import EnvelopeOpener, SequenceCounter, SequenceWatermarks, seal_shared

log = logging.getLogger("tomq.raft.transport")

SHARED_KEY_PURPOSE = b"raft batches"  # what the nodes' pairwise keys are for (SigningKey.shared_key)

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
        self._shared_keys: dict[bytes, bytes] = {}  # a peer's public key -> the key we share with it

    def start(self) -> None:
        self.link.subscribe(self.topics.raft_inbox(self.name))

    def send(self, messages: list[Message], extras: dict[str, dict[str, Any]] | None = None) -> None:
        """Send each destination its messages (and extras) as one authenticated batch."""
        by_peer: dict[str, list[bytes]] = {}
        for message in messages:
            by_peer.setdefault(message.to, []).append(encode(message))
        for peer in (extras or {}):
            by_peer.setdefault(peer, [])
        for peer, encoded in by_peer.items():
            body: dict[str, Any] = {"m": encoded}
            if extras and peer in extras:
                body["x"] = extras[peer]
            key = self._key_for_peer(peer)
            if key is None:
                continue  # not a certified node (a stale membership): it could not check the batch anyway
            wire = seal_shared(key, self.key.id, seq=self.counter.next(), time_ms=int(time.time() * 1000),
                               type="raft", body=body)
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

        def key_for(certificate: Certificate) -> bytes | None:
            # Before the MAC is computed: an envelope from anyone but the node this topic names.
            if certificate.name != sender or certificate.role != "node":
                raise _Spoofed(f"envelope from {certificate.name} ({certificate.subject_id}), not node {sender}", sender)
            return self._shared_key(certificate)

        try:
            envelope = self.opener.open_shared(payload, time.time(), key_for)
        except _Spoofed as exc:
            self._reject("spoofed", sender, str(exc))
            return
        except EnvelopeRejected as exc:
            self._reject(type(exc).__name__, sender, str(exc))
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

    def _key_for_peer(self, peer: str) -> bytes | None:
        certificate = self.trust.by_name(peer)
        if certificate is None or certificate.role != "node":
            return None
        return self._shared_key(certificate)

    def _shared_key(self, certificate: Certificate) -> bytes | None:
        raw = certificate.subject.raw
        key = self._shared_keys.get(raw)
        if key is None:
            try:
                key = self.key.shared_key(certificate.subject, SHARED_KEY_PURPOSE)
            except ValueError as exc:  # a certified key that is no usable point: nothing to share
                log.error("no Raft key can be shared with %s: %s", certificate.name, exc)
                return None
            self._shared_keys[raw] = key
        return key

    def _reject(self, reason: str, sender: str, detail: str) -> None:
        self.refusals.refuse(sender, reason, detail)


class _Spoofed(EnvelopeRejected):
    """A batch on a node's topic from someone else (counted as "spoofed", as before the MAC)."""
