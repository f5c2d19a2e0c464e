"""Signed envelopes: how every message between tomq members is framed, signed and checked.

Wire form: the canonical CBOR array `[signed, signature]`, where `signed` is the canonical CBOR map
`{v, from, seq, t, type, body}` and `signature` is the sender's Ed25519 signature over
`b"tomq/envelope/v1\\0" + signed`. Verifying over the received bytes (not a re-encoding) keeps
opening an envelope close to the cost of one signature check.

`EnvelopeOpener.open` is the only way bytes from outside become an `Envelope`. It raises one
`EnvelopeRejected` subclass per reason and nothing else, whatever the bytes; it advances the
sender's sequence high-water mark only for an envelope that passed every check.

Between two nodes, Raft batches carry a MAC instead of a signature (`seal_shared`, `open_shared`):
`[signed, mac]` with a 32-byte keyed BLAKE2b of `b"tomq/envelope-mac/v1\\0" + signed` under the key
only those two nodes can compute (`SigningKey.shared_key`). It proves the sender to the receiver, as
a signature does, but to nobody else, which Raft traffic does not need; and it costs about a
microsecond where signing costs 20 us and verifying 54 us here, each twice per committed record.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tomq import canonical
from tomq.certificate import Certificate, TrustStore
from tomq.errors import (
    BadSignature,
    BodyTooLarge,
    CertificateExpired,
    ConfigError,
    MalformedEnvelope,
    ReplayedEnvelope,
    UnknownEnvelopeType,
    UnknownSender,
    UnsupportedVersion,
)
from tomq.identity import SIGNATURE_BYTES, PublicKey, SigningKey, signing_input

ENVELOPE_VERSION = 1
_DOMAIN = b"tomq/envelope/v1\x00"
_MAC_DOMAIN = b"tomq/envelope-mac/v1\x00"
MAC_BYTES = 32
_FIELDS = frozenset({"v", "from", "seq", "t", "type", "body"})
DEFAULT_MAX_BYTES = 64 * 1024
MAX_SEQ = 2**63 - 1

# What travels in envelopes (DESIGN.md §3). A receiver may narrow this per topic.
ENVELOPE_TYPES = frozenset(
    {
        "join",  # a device or service announces itself, with its certificate
        "leave",  # graceful leave, or the broker-published last will
        "reading",  # a sensor reading
        "command",  # cluster -> actuator, naming the ledger block that authorises it
        "report",  # actuator -> cluster: what it did
        "ack",  # cluster -> device: its join is on the ledger (a passive contract's acknowledgement)
        "raft",  # node -> node consensus traffic
        "load",  # node load report
        "orch-request",  # operator deployment / removal request
        "record",  # a proposed ledger record
    }
)


@dataclass(frozen=True, slots=True)
class Envelope:
    sender: str
    seq: int
    time_ms: int
    type: str
    body: Any
    signature: bytes  # or the MAC, for an envelope between two nodes (`open_shared`)
    wire: bytes  # exactly what was signed and sent; its hash names this envelope in the ledger

    @property
    def digest(self) -> bytes:
        return hashlib.sha256(self.wire).digest()


def seal(key: SigningKey, *, seq: int, time_ms: int, type: str, body: Any) -> bytes:
    """Sign and encode one envelope. The caller owns sequence numbers (see SequenceCounter)."""
    signed = _signed_part(key.id, seq, time_ms, type, body)
    return canonical.encode([signed, key.sign(signing_input(_DOMAIN, signed))])


def seal_shared(key: bytes, sender: str, *, seq: int, time_ms: int, type: str, body: Any) -> bytes:
    """`seal` for a receiver that shares `key` with `sender` (an identity id): a MAC, not a signature."""
    signed = _signed_part(sender, seq, time_ms, type, body)
    return canonical.encode([signed, envelope_mac(key, signed)])


def _signed_part(sender: str, seq: int, time_ms: int, type: str, body: Any) -> bytes:
    if type not in ENVELOPE_TYPES:
        raise ValueError(f"unknown envelope type {type!r}")
    if not 1 <= seq <= MAX_SEQ:
        raise ValueError(f"sequence number {seq} must be in 1..2^63-1")
    return canonical.encode({"v": ENVELOPE_VERSION, "from": sender, "seq": seq, "t": time_ms, "type": type, "body": body})


def envelope_mac(key: bytes, signed: bytes) -> bytes:
    return hashlib.blake2b(_MAC_DOMAIN + signed, key=key, digest_size=MAC_BYTES).digest()


class SequenceWatermarks(Protocol):
    """The highest sequence number accepted from each sender; must survive the receiver's restart."""

    def get(self, sender: str) -> int: ...

    def advance(self, sender: str, seq: int) -> None: ...


class MemoryWatermarks:
    def __init__(self) -> None:
        self._marks: dict[str, int] = {}

    def get(self, sender: str) -> int:
        return self._marks.get(sender, 0)

    def advance(self, sender: str, seq: int) -> None:
        self._marks[sender] = seq


class FileWatermarks:
    """High-water marks kept in an append-only text file, compacted atomically when it grows.

    Each accepted envelope appends one line with a plain write, so a process crash loses nothing;
    `flush()` fsyncs, and the node calls it with its other per-batch fsync rather than once per
    message (an fsync per envelope would cost more than the signature check itself).
    """

    def __init__(self, path: str | os.PathLike[str], compact_after: int = 100_000) -> None:
        self.path = Path(path)
        self._compact_after = compact_after
        self._marks: dict[str, int] = {}
        self._lines = 0
        if self.path.exists():
            content = self.path.read_bytes()
            complete = content.rfind(b"\n") + 1
            if complete < len(content):
                # A line torn by a crash (no newline): its envelope was never acted on. Cut it off so
                # the next line does not glue onto it.
                os.truncate(self.path, complete)
            for line in content[:complete].split(b"\n")[:-1]:
                parts = line.split(b" ")
                if len(parts) == 2 and parts[1].isdigit():
                    sender = parts[0].decode("ascii", "replace")
                    self._marks[sender] = max(self._marks.get(sender, 0), int(parts[1]))
                    self._lines += 1
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def get(self, sender: str) -> int:
        return self._marks.get(sender, 0)

    def advance(self, sender: str, seq: int) -> None:
        self._marks[sender] = seq
        os.write(self._fd, f"{sender} {seq}\n".encode("ascii"))
        self._lines += 1
        if self._lines > self._compact_after and self._lines > 4 * len(self._marks):
            self._compact()

    def flush(self) -> None:
        os.fsync(self._fd)

    def close(self) -> None:
        os.close(self._fd)

    def _compact(self) -> None:
        temp = self.path.with_suffix(".tmp")
        text = "".join(f"{sender} {seq}\n" for sender, seq in sorted(self._marks.items()))
        with open(temp, "wb") as handle:
            handle.write(text.encode("ascii"))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, self.path)
        os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self._lines = len(self._marks)


class SequenceCounter:
    """A sender's next sequence numbers, never repeating across restarts.

    Blocks of numbers are reserved on disk (write, fsync) before any of them is used, so a crash
    skips at most one block and never reuses a number a receiver may already have seen.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, block: int = 1024) -> None:
        self.path = Path(path) if path is not None else None
        self._block = block
        self._next = 1
        self._reserved = 0
        if self.path is not None and self.path.exists():
            text = self.path.read_text().strip()
            if not text.isdigit():
                raise ConfigError(f"sequence file {self.path} is damaged ({text[:20]!r}); delete it only if no receiver has seen this sender")
            # Everything up to the number on disk may have been used; nothing after it is reserved yet.
            self._reserved = int(text)
            self._next = self._reserved + 1

    def next(self) -> int:
        if self._next > self._reserved:
            self._reserve(self._next + self._block - 1)
        value = self._next
        self._next += 1
        return value

    def _reserve(self, upto: int) -> None:
        if self.path is not None:
            temp = self.path.with_suffix(".tmp")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(temp, "w") as handle:
                handle.write(f"{upto}\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, self.path)
        self._reserved = upto


class ClockSequence:
    """Sequence numbers for an identity that several processes sign as (a node and the operator's
    tools, or the successive instances of a service): microseconds since the epoch, strictly rising
    within this process. A process that starts later starts above what an earlier one used, so the
    ledger's per-proposer rising-sequence rule holds without the processes sharing a counter file.

    `lane` of `lanes`: processes that sign as one identity *at the same time* (the replicas of a
    service) each take the numbers congruent to their lane, microseconds x `lanes` + `lane`. Their
    sequences then never meet: two replicas sealing in the same microsecond would otherwise use
    one number twice, the ledger would take one record, and the other replica would read that
    record's audit line as its own commit.
    """

    def __init__(self, micros: Callable[[], int] = lambda: time.time_ns() // 1000, *, lane: int = 0,
                 lanes: int = 1) -> None:
        if not 0 <= lane < lanes:
            raise ValueError(f"sequence lane {lane} is not in 0..{lanes - 1}")
        self._micros = micros
        self.lane = lane
        self.lanes = lanes
        self.last = lane - lanes  # so that every number handed out stays in the lane

    def next(self) -> int:
        self.last = max(self.last + self.lanes, self._micros() * self.lanes + self.lane)
        return self.last


class EnvelopeOpener:
    """Checks envelopes from outside against the cluster's certificates and per-sender watermarks."""

    def __init__(
        self,
        trust: TrustStore,
        watermarks: SequenceWatermarks | None = None,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        accepted_types: frozenset[str] = ENVELOPE_TYPES,
    ) -> None:
        self.trust = trust
        self.watermarks: SequenceWatermarks = watermarks if watermarks is not None else MemoryWatermarks()
        self.max_bytes = max_bytes
        self.accepted_types = accepted_types

    def open(self, data: bytes, now: float, *, opened: Envelope | None = None) -> Envelope:
        """Return the envelope in `data` if it passes every check at receiver time `now` (unix seconds).

        `opened`: these same bytes as this process opened them before (the ledger leader opens each
        proposal on arrival and again when its block is applied). Their decoding and signature stand;
        every check that depends on this opener or on `now` runs again.
        """
        if opened is not None and opened.wire == data:
            if len(data) > self.max_bytes:
                raise BodyTooLarge(f"envelope of {len(data)} bytes exceeds the limit of {self.max_bytes}")
            if opened.type not in self.accepted_types:
                raise UnknownEnvelopeType(f"envelope type {opened.type[:40]!r} is not accepted here", opened.sender)
            return self._admit(opened, self._certificate_of(opened.sender), now)
        data, signed, signature, fields = _unpack(data, self.max_bytes, self.accepted_types)
        sender = fields["from"]
        certificate = self._certificate_of(sender)
        if len(signature) != SIGNATURE_BYTES:
            raise BadSignature(f"envelope from {sender} has no valid signature ({len(signature)} bytes)", sender)
        if not certificate.subject.verify(signature, signing_input(_DOMAIN, signed)):
            raise BadSignature(f"signature of envelope {fields['seq']} from {sender} does not verify", sender)
        return self._admit(_envelope(fields, signature, data), certificate, now)

    def open_shared(self, data: bytes, now: float, key_for: Callable[[Certificate], bytes | None]) -> Envelope:
        """`open` for an envelope sealed with `seal_shared`: `key_for(sender's certificate)` gives the key
        this receiver shares with the sender (None: none, refused). It may itself refuse the sender by
        raising an `EnvelopeRejected` (the caller's own rule: who may send on this topic), before the
        MAC is computed. The same checks as `open` otherwise, the MAC in place of the signature."""
        data, signed, mac, fields = _unpack(data, self.max_bytes, self.accepted_types)
        sender = fields["from"]
        certificate = self._certificate_of(sender)
        key = key_for(certificate)
        if key is None:
            raise BadSignature(f"{certificate.name} ({sender}) shares no key with this receiver", sender)
        if len(mac) != MAC_BYTES:
            raise BadSignature(f"envelope from {certificate.name} carries no {MAC_BYTES}-byte MAC ({len(mac)} bytes)", sender)
        if not hmac.compare_digest(mac, envelope_mac(key, signed)):
            raise BadSignature(f"MAC of envelope {fields['seq']} from {certificate.name} does not verify", sender)
        return self._admit(_envelope(fields, mac, data), certificate, now)

    def _certificate_of(self, sender: str) -> Certificate:
        certificate = self.trust.by_id(sender)
        if certificate is None:
            raise UnknownSender(f"sender {sender} has no membership certificate in this cluster", sender)
        return certificate

    def _admit(self, envelope: Envelope, certificate: Certificate, now: float) -> Envelope:
        """The checks of a well-signed envelope from `certificate`'s holder that depend on when it is opened."""
        sender = envelope.sender
        if not certificate.is_valid_at(now):
            raise CertificateExpired(
                f"certificate of {certificate.name} ({sender}) is valid only in "
                f"[{certificate.not_before}, {certificate.not_after}), not at {int(now)}",
                sender,
            )
        high_water = self.watermarks.get(sender)
        if envelope.seq <= high_water:
            raise ReplayedEnvelope(
                f"envelope {envelope.seq} from {certificate.name} ({sender}) is not above its high-water mark {high_water}",
                sender,
            )
        self.watermarks.advance(sender, envelope.seq)
        return envelope


def open_signed_by(data: bytes, key: PublicKey, *, name: str, accepted_types: frozenset[str],
                   watermarks: SequenceWatermarks, max_bytes: int = DEFAULT_MAX_BYTES) -> Envelope:
    """Open an envelope that only one key may sign: the operator's requests, which no certificate covers.

    The same checks as `EnvelopeOpener.open` except that the signer is fixed and has no validity window.
    """
    data, signed, signature, fields = _unpack(data, max_bytes, accepted_types)
    sender = fields["from"]
    if sender != key.id:
        raise UnknownSender(f"envelope signed by {sender}; only {name} ({key.id}) may send it", sender)
    if len(signature) != SIGNATURE_BYTES or not key.verify(signature, signing_input(_DOMAIN, signed)):
        raise BadSignature(f"signature of envelope {fields['seq']} from {name} does not verify", sender)
    high_water = watermarks.get(sender)
    if fields["seq"] <= high_water:
        raise ReplayedEnvelope(f"envelope {fields['seq']} from {name} is not above its high-water mark {high_water}",
                               sender)
    watermarks.advance(sender, fields["seq"])
    return _envelope(fields, signature, data)


def _envelope(fields: dict[str, Any], proof: bytes, data: bytes) -> Envelope:
    """The opened envelope; `proof` is its signature or MAC."""
    return Envelope(fields["from"], fields["seq"], fields["t"], fields["type"], fields["body"], proof, data)


def _unpack(data: Any, max_bytes: int, accepted_types: frozenset[str]) -> tuple[bytes, bytes, bytes, dict[str, Any]]:
    """The checks every opener starts with: bytes, size, shape, version, type. Signature not yet checked."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise MalformedEnvelope(f"envelope must be bytes, not {type(data).__name__}")
    data = bytes(data)
    if len(data) > max_bytes:
        raise BodyTooLarge(f"envelope of {len(data)} bytes exceeds the limit of {max_bytes}")
    signed, signature = _split(data)
    fields = _fields(signed)
    sender = fields["from"]
    if fields["v"] != ENVELOPE_VERSION:
        raise UnsupportedVersion(f"envelope version {fields['v']} is not {ENVELOPE_VERSION}", sender)
    if fields["type"] not in accepted_types:
        raise UnknownEnvelopeType(f"envelope type {fields['type'][:40]!r} is not accepted here", sender)
    return data, signed, signature, fields


def _split(data: bytes) -> tuple[bytes, bytes]:
    """Read the outer `[bytes, bytes]` by hand: strict, canonical, and cheaper than a general decoder."""
    if data[:1] != b"\x82":
        raise MalformedEnvelope("envelope must be the CBOR array [signed bytes, signature bytes]")
    signed, offset = _byte_string(data, 1)
    signature, offset = _byte_string(data, offset)
    if offset != len(data):
        raise MalformedEnvelope(f"envelope has {len(data) - offset} trailing bytes")
    return signed, signature


def _byte_string(data: bytes, offset: int) -> tuple[bytes, int]:
    """One definite-length CBOR byte string at `offset` with a minimal (canonical) length header."""
    if offset >= len(data):
        raise MalformedEnvelope("envelope ends early")
    head = data[offset]
    if head >> 5 != 2:
        raise MalformedEnvelope("envelope must be the CBOR array [signed bytes, signature bytes]")
    info = head & 0x1F
    if info < 24:
        length, start = info, offset + 1
    elif info in (24, 25, 26):
        width = 1 << (info - 24)
        start = offset + 1 + width
        if start > len(data):
            raise MalformedEnvelope("envelope ends early")
        length = int.from_bytes(data[offset + 1 : start], "big")
        if length < (24, 256, 65536)[info - 24]:
            raise MalformedEnvelope("envelope length header is not in canonical (shortest) form")
    else:
        raise MalformedEnvelope("envelope byte strings must have a definite length below 4 GiB")
    end = start + length
    if end > len(data):
        raise MalformedEnvelope("envelope ends early")
    return data[start:end], end


def _fields(signed: bytes) -> dict[str, Any]:
    try:
        fields = canonical.decode(signed)
    except canonical.CanonicalDecodeError as exc:
        raise MalformedEnvelope(f"envelope body: {exc}") from None
    if type(fields) is not dict or fields.keys() != _FIELDS:
        raise MalformedEnvelope(f"envelope must hold exactly the fields {sorted(_FIELDS)}")
    sender = fields["from"] if type(fields["from"]) is str else None
    for name in ("v", "seq", "t"):
        if type(fields[name]) is not int:
            raise MalformedEnvelope(f"envelope field {name} must be an integer", sender)
    # Printable: the sender goes into every refusal's message and log line, which must stay one line
    # (a newline in `from` let a peer forge log lines; found by fuzzing).
    if sender is None or not 0 < len(sender) <= 64 or not sender.isprintable():
        raise MalformedEnvelope("envelope field from must be an identity id")
    if type(fields["type"]) is not str:
        raise MalformedEnvelope("envelope field type must be text", sender)
    if not 1 <= fields["seq"] <= MAX_SEQ:
        raise MalformedEnvelope(f"envelope sequence number {fields['seq']} is outside 1..2^63-1", sender)
    if fields["t"] < 0:
        raise MalformedEnvelope("envelope time is negative", sender)
    return fields
