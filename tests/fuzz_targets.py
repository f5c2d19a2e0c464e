"""What tomq's fuzzing (tests/fuzzing.py) runs: every decoder of bytes from outside, with a corpus of
valid encodings built in code from deterministic keys, and the fixups that re-sign and re-checksum a
mutated input so mutations reach the code behind the signature and CRC checks.

Targets, and the one error each may raise for bad bytes (the module docstrings promise it):

    canonical          tomq.canonical.decode                          CanonicalDecodeError
    envelope           tomq.wire.EnvelopeOpener.open                  EnvelopeRejected
    operator-request   orchestrator open_request (open_signed_by)     EnvelopeRejected
    certificate        tomq.certificate decode, via TrustStore.add    InvalidCertificate
    raft-message       tomq.node.raft.messages.decode                 MalformedRaftMessage
    raft-batch         RaftTransport.handle(topic, payload)           never raises: counts a rejection
    serial-frames      tomq.bridge.framing.FrameDecoder.feed          never raises: returns Faults
    bridge-session     tomq.bridge.session.Session.receive            never raises: sends error frames
    block-file         ledger block.decode_block_file                 MalformedBlock
    ledger-bundle      ledger verify.verify_path(an audit bundle)     LedgerInvalid
    ledger-reader      bundle.LedgerReader, without then with a key   LedgerInvalid
    raft-storage       FileStorage open + load of damaged files       StorageError

Two targets take a harness format rather than the decoder's own bytes: raft-storage reads a canonical
CBOR map {"log", "hardstate", "snapshot"?: file bytes} and writes those files to a scratch directory;
ledger-bundle and ledger-reader write the input to a scratch file and read it as an audit bundle.

`bash scripts/fuzz` runs this module for longer (`python tests/fuzz_targets.py --help`).
"""

from __future__ import annotations

import argparse
import atexit
import functools
import hashlib
import os
import random
import shutil
import struct
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: find keys and fuzzing

from fuzzing import (
    NOT_CBOR,
    Dictionary,
    Fuzzer,
    Mutator,
    Refused,
    Target,
    loads_exactly,
    mutate_cbor_value,
    saved_inputs,
)
from keys import CLUSTER, NOW, OPERATOR, key
from tomq import canonical, certificate
from tomq.bridge import framing
from tomq.bridge.session import Introduce, Send, Session, Take
from tomq.certificate import _DOMAIN as CERTIFICATE_DOMAIN
from tomq.certificate import TrustStore
from tomq.cluster import broker_password
from tomq.errors import EnvelopeRejected, InvalidCertificate
from tomq.identity import SigningKey
from tomq.node.ledger.block import (
    BLOCK_DOMAIN,
    COMMIT_DOMAIN,
    GENESIS_PREV,
    BlockFile,
    MalformedBlock,
    commit_signature,
    decode_block_file,
    encode_block_file,
    make_block,
    merkle_root,
    sign_block,
)
from tomq.node.ledger.bundle import Bundle, BundleSource, LedgerReader, encode_bundle
from tomq.node.ledger.genesis import genesis_block
from tomq.node.ledger.verify import LedgerInvalid, verify_path
from tomq.node.orchestrator.requests import REQUEST_TYPE, open_request
from tomq.node.orchestrator.spec import parse_spec
from tomq.node.raft import messages
from tomq.node.raft.messages import MalformedRaftMessage, Message, MessageType
from tomq.node.raft.storage import FileStorage, StorageError
from tomq.node.raft.transport import SHARED_KEY_PURPOSE, RaftTransport
from tomq.node.raft.types import Entry, EntryKind, HardState, Snapshot, SnapshotMeta
from tomq.node.services.readings import seal_attested_reading, seal_reading
from tomq.records import DATA, ID_CREATE, ID_DELETE, ORCH, Identity, Orchestrate, Provenance, Record
from tomq.topics import Topics, default_publish_rights
from tomq.wire import _DOMAIN as ENVELOPE_DOMAIN
from tomq.wire import (
    MAC_BYTES,
    EnvelopeOpener,
    MemoryWatermarks,
    SequenceCounter,
    envelope_mac,
    seal,
    seal_shared,
)

REPO = Path(__file__).resolve().parent.parent
SAVED_INPUTS = REPO / "tests" / "fuzz_inputs"
NOW_S = float(NOW)
START_MS = NOW * 1000
VALID_FROM, VALID_UNTIL = 1_000, 2**40  # certificates valid whatever the wall clock (RaftTransport reads it)


# ------------------------------------------------------------------------------------------ the world


@dataclass(frozen=True)
class World:
    """One cluster's keys and certificates, all derived from fixed labels."""

    keys: dict[str, SigningKey]  # member name -> key
    certificates: dict[str, bytes]  # member name -> encoded certificate
    signers: dict[str, SigningKey]  # identity id -> key, the operator included: what fixups re-sign with
    trust: TrustStore

    def sealed(self, name: str, *, seq: int, type: str, body: Any, time_ms: int = START_MS) -> bytes:
        return seal(self.keys[name], seq=seq, time_ms=time_ms, type=type, body=body)


MEMBERS = (("n1", "node"), ("n2", "node"), ("n3", "node"), ("s1", "sensor"), ("tl-j1", "actuator"),
           ("b1", "sensor"), ("collector", "service"), ("auditor1", "auditor"))


@functools.cache
def world() -> World:
    keys = {name: key(f"fuzz/{name}") for name, _ in MEMBERS}
    certificates: dict[str, bytes] = {}
    trust = TrustStore(OPERATOR.public_key, CLUSTER)
    for name, role in MEMBERS:
        publish = default_publish_rights(role, name)
        if name == "b1":
            publish = (*publish, "dev/t2/data")  # a serial bridge that may attest for device t2
        issued = certificate.issue(OPERATOR, cluster=CLUSTER, subject=keys[name].public_key, name=name,
                                   role=role, not_before=VALID_FROM, not_after=VALID_UNTIL, publish=publish)
        certificates[name] = issued.encoded
        trust.add(issued.encoded)
    signers = {member.id: member for member in keys.values()}
    signers[OPERATOR.id] = OPERATOR
    return World(keys, certificates, signers, trust)


# ------------------------------------------------------------------------------------------ fixups


class Resealer:
    """Re-signs whatever signed structures a (mutated) CBOR value holds, innermost first: envelopes
    (by their `from`), certificates (by the operator), block files (proposer and commit signatures,
    after recomputing the Merkle root and relinking `prev` in a bundle). Each repair is skipped now
    and then, so that the checks behind a valid signature get inputs that fail them too."""

    def __init__(self, signers: dict[str, SigningKey]) -> None:
        self.signers = signers

    def signer(self, identity: Any) -> SigningKey | None:
        return self.signers.get(identity) if isinstance(identity, str) else None

    def encoded(self, rng: random.Random, data: bytes, depth: int = 0) -> bytes:
        value = loads_exactly(data)
        if value is NOT_CBOR or depth > 8:
            return data
        try:
            return canonical.encode(self.value(rng, value, depth))
        except Exception:  # something canonical CBOR cannot hold (a mutation made it): leave it
            return data

    def value(self, rng: random.Random, value: Any, depth: int) -> Any:
        if isinstance(value, list):
            if len(value) == 2 and all(type(item) is bytes for item in value):
                return self.signed_pair(rng, value, depth)
            return [self.item(rng, item, depth) for item in value]
        if isinstance(value, dict):
            if "blocks" in value and "format" in value:
                return self.bundle(rng, value, depth)
            if "header" in value and "records" in value:
                return self.block(rng, value, depth, prev=None)[0]
            return {name: self.item(rng, item, depth) for name, item in value.items()}
        return value

    def item(self, rng: random.Random, item: Any, depth: int) -> Any:
        if type(item) is bytes:
            return self.encoded(rng, item, depth + 1)
        if isinstance(item, list | dict):
            return self.value(rng, item, depth + 1)
        return item

    def signed_pair(self, rng: random.Random, pair: list[bytes], depth: int) -> list[bytes]:
        """[signed bytes, signature]: an envelope or a certificate."""
        signed, signature = pair
        fields = loads_exactly(signed)
        if not isinstance(fields, dict):
            return pair
        signed = canonical.encode(self.value(rng, fields, depth + 1))
        if len(signature) == MAC_BYTES:  # a Raft batch: MAC'd for n1, the raft-batch target's receiver
            sender = self.signer(fields.get("from"))
            if sender is None or rng.random() < 0.05:
                return [signed, signature]
            return [signed, envelope_mac(sender.shared_key(world().keys["n1"].public_key, SHARED_KEY_PURPOSE), signed)]
        if "issuer" in fields and "subject" in fields:
            signer, domain = OPERATOR, CERTIFICATE_DOMAIN
        else:
            signer, domain = self.signer(fields.get("from")), ENVELOPE_DOMAIN
        if signer is None or rng.random() < 0.05:
            return [signed, signature]
        return [signed, signer.sign(domain + signed)]

    def block(self, rng: random.Random, raw: dict[Any, Any], depth: int,
              prev: bytes | None) -> tuple[dict[Any, Any], bytes | None]:
        """A block file map with its records re-signed, root and prev set, and its signatures redone;
        and its hash, for the next block's prev."""
        block = dict(raw)
        records = block["records"]
        if isinstance(records, list):
            records = block["records"] = [self.item(rng, record, depth + 1) for record in records]
        header = block["header"]
        if not isinstance(header, dict):
            return block, None
        header = block["header"] = dict(header)
        if prev is not None and rng.random() < 0.9:
            header["prev"] = prev
        if isinstance(records, list) and all(type(r) is bytes for r in records) and rng.random() < 0.9:
            header["records_root"] = merkle_root(records)
            if rng.random() < 0.9:
                header["record_count"] = len(records)
        digest = hashlib.sha256(canonical.encode(header)).digest()
        proposer = self.signer(header.get("proposer"))
        if proposer is not None and rng.random() < 0.95:
            block["proposer_sig"] = proposer.sign(BLOCK_DOMAIN + digest)
        commits = block.get("certificate")
        if isinstance(commits, dict):
            block["certificate"] = {
                signer_id: (self.signers[signer_id].sign(COMMIT_DOMAIN + digest)
                            if self.signer(signer_id) is not None and rng.random() < 0.95 else signature)
                for signer_id, signature in commits.items()}
        return block, digest

    def bundle(self, rng: random.Random, raw: dict[Any, Any], depth: int) -> dict[Any, Any]:
        bundle = dict(raw)
        blocks = bundle["blocks"]
        if not isinstance(blocks, list):
            return bundle
        prev: bytes | None = GENESIS_PREV
        fixed = []
        for blob in blocks:
            value = loads_exactly(blob) if type(blob) is bytes else NOT_CBOR
            if not (isinstance(value, dict) and "header" in value and "records" in value):
                fixed.append(blob)
                prev = None
                continue
            block, prev = self.block(rng, value, depth + 1, prev)
            try:
                fixed.append(canonical.encode(block))
            except Exception:
                fixed.append(blob)
                prev = None
        bundle["blocks"] = fixed
        if rng.random() < 0.8:
            bundle["to"] = len(fixed) - 1
        return bundle


@functools.cache
def resealer() -> Resealer:
    return Resealer(world().signers)


def reseal(rng: random.Random, data: bytes) -> bytes:
    return resealer().encoded(rng, data)


# ------------------------------------------------------------------------------------------ serial frames


def _frame(type: int, seq: int, ref: int, body: bytes) -> bytes:
    return framing.encode_frame(type, seq, ref, body)


def fix_frames(rng: random.Random, data: bytes, *, bodies: bool = True) -> bytes:
    """Every run that unstuffs to a frame gets its CRC recomputed, and its body re-signed if `bodies`."""
    pieces = data.split(b"\x00")
    for index, piece in enumerate(pieces):
        raw = framing.cobs_decode(piece) if piece else None
        if raw is None or len(raw) < framing.MIN_FRAME_BYTES:
            continue
        body = raw[framing.HEADER_BYTES: -framing.CRC_BYTES]
        frame = raw[: framing.HEADER_BYTES] + (reseal(rng, body) if bodies else body)
        pieces[index] = framing.cobs_encode(frame + framing.crc32(frame).to_bytes(4, "big"))
    return b"\x00".join(pieces)


def frame_mutator(dictionary: Dictionary) -> Mutator:
    def mutate_frames(rng: random.Random, data: bytes) -> bytes | None:
        """Change one frame of a stream where it matters (header fields, the CBOR body), or the stream's
        order; the CRC is right nine times in ten, so that the change gets past it."""
        pieces = data.split(b"\x00")
        operation = rng.randrange(10)
        if operation == 0 and len(pieces) > 1:  # the stream: lose, repeat or swap runs
            i, j = rng.randrange(len(pieces)), rng.randrange(len(pieces))
            choice = rng.randrange(3)
            if choice == 0:
                del pieces[i]
            elif choice == 1:
                pieces.insert(j, pieces[i])
            else:
                pieces[i], pieces[j] = pieces[j], pieces[i]
            return b"\x00".join(pieces)
        if operation == 1:  # an over-long run (0x01s: COBS's most work per byte; 0xffs: its least)
            run = bytes([rng.choice((0x01, 0xFF))]) * (framing.MAX_STUFFED_BYTES + rng.choice((0, 1, 2)))
            pieces.insert(rng.randrange(len(pieces) + 1), run)
            return b"\x00".join(pieces)
        frames = [(index, raw) for index, piece in enumerate(pieces)
                  if (raw := framing.cobs_decode(piece)) is not None and len(raw) >= framing.MIN_FRAME_BYTES]
        if not frames:
            return None
        index, raw = rng.choice(frames)
        header = bytearray(raw[: framing.HEADER_BYTES])
        body = raw[framing.HEADER_BYTES: -framing.CRC_BYTES]
        if operation == 2:
            header[0] = rng.choice((0, 2, 255))
        elif operation == 3:
            header[1] = rng.choice((0, 1, 2, 3, 4, 5, 255))
        elif operation in (4, 5):
            seq, ref = struct.unpack_from(">QQ", header, 2)
            number = rng.choice((0, 1, 2**64 - 1, 2**63, seq, seq + 1, seq - 1, ref, ref + 1)) % 2**64
            struct.pack_into(">Q", header, 2 if operation == 4 else 10, number)
        elif operation in (6, 7, 8):
            value = loads_exactly(body)
            mutated = mutate_cbor_value(rng, value, dictionary) if value is not NOT_CBOR else None
            body = mutated if mutated is not None else body[: rng.randint(0, len(body))]
        else:
            body = body + bytes([rng.randrange(256)]) * rng.choice((1, 100, framing.MAX_BODY_BYTES))
        frame = bytes(header) + body
        crc = framing.crc32(frame) if rng.random() < 0.9 else rng.randrange(2**32)
        pieces[index] = framing.cobs_encode(frame + crc.to_bytes(4, "big"))
        return b"\x00".join(pieces)

    return mutate_frames


def _hello(w: World, device: str, seq: int, ref: int) -> bytes:
    device_key = w.keys[device]
    join = seal(device_key, seq=seq, time_ms=5, type="join", body={"certificate": w.certificates[device]})
    will = seal(device_key, seq=seq + 1, time_ms=5, type="leave", body={"reason": "vanished"})
    body = canonical.encode({"device": device, "mode": "signed", "join": join, "will": will,
                             "password": broker_password(device_key), "fw": "fuzz"})
    return _frame(framing.HELLO, seq, ref, body)


@functools.cache
def line_seeds() -> list[bytes]:
    """What a serial line carries: hellos, readings (signed and attested), acks, errors and noise."""
    w = world()
    values = [1.5, 20, "x", {"k": 1}]
    signed = _hello(w, "s1", 10, 10) + b"".join(
        _frame(framing.READING, seq, seq - 1 if seq > 11 else 10,
               seal_reading(w.keys["s1"], seq=seq, time_ms=5, value=values[seq % 4], unit="degC"))
        for seq in range(11, 15))
    attested = _frame(framing.HELLO, 7, 7, canonical.encode({"device": "t2", "mode": "attested"})) + b"".join(
        _frame(framing.READING, seq, seq - 1,
               canonical.encode({"value": 21.5 + seq, "unit": "degC", "t": 1000 + seq}))
        for seq in range(8, 11))
    control = (_frame(framing.ACK, 3, 0, b"")
               + _frame(framing.ERROR, 4, 3, canonical.encode({"code": "gap", "reason": "x"}))
               + b"\x17\x42"  # noise between frames
               + _frame(framing.HELLO, 0, 0, canonical.encode({"bridge": "b", "now": 1, "reason": "start"})))
    gap = _hello(w, "s1", 20, 20) + _frame(framing.READING, 23, 22,
                                           seal_reading(w.keys["s1"], seq=23, time_ms=5, value=1))
    return [signed, attested, control, gap, signed[: len(signed) // 2]]


# ------------------------------------------------------------------------------------------ ledger


@dataclass(frozen=True)
class Chain:
    blocks: tuple[bytes, ...]

    def bundle(self, last: int | None = None) -> bytes:
        last = len(self.blocks) - 1 if last is None else last
        return encode_bundle(Bundle(OPERATOR.id, 0, last, self.blocks[: last + 1]))


@functools.cache
def chain() -> Chain:
    """Six blocks that verify: genesis (n1..n3); s1 joins; two readings; a container placed and used;
    removed; s1 leaves. The records are those of tests/test_ledger_verify.py's standard ledger."""
    w = world()
    blocks = [genesis_block(OPERATOR, [w.certificates[name] for name in ("n1", "n2", "n3")], START_MS)]
    prev = decode_block_file(blocks[0]).block.hash
    sequences = dict.fromkeys(w.keys, 0)

    def sealed(signer: str, record: Record, height: int) -> bytes:
        sequences[signer] += 1
        return w.sealed(signer, seq=sequences[signer], type="record", body=record.to_map(),
                        time_ms=START_MS + (height - 1) * 1000)

    def reading(data_id: str) -> Record:
        digest = hashlib.sha256(data_id.encode()).digest()
        return Record(DATA, Provenance(data_id, digest, "sample:s1", "collect:collector-0", source="s1",
                                       source_signature=b"\x07" * 64), START_MS)

    def place(action: str, deployed: str, location: str) -> Record:
        return Record(ORCH, Orchestrate(deployed, location, action, {"n1": 0.5, "n2": 0.1}), START_MS)

    container = Identity("collector-0", "container", b"sha256:image-digest", "n2")
    s1 = Identity("s1", "device", w.certificates["s1"])
    plan: list[tuple[list[tuple[str, Record]], tuple[str, ...], int]] = [
        ([("n1", Record(ID_CREATE, s1, START_MS))], ("n1", "n2"), 1),
        ([("n1", reading("reading:1")), ("n2", reading("reading:2"))], ("n1", "n2"), 1),
        ([("n1", Record(ID_CREATE, container, START_MS)), ("n1", place("place", "collector-0", "n2")),
          ("n1", place("execute", "reading:1", "collect:collector-0"))], ("n1", "n2", "n3"), 2),
        ([("n2", Record(ID_DELETE, Identity("collector-0", "container", b"sha256:image-digest"), START_MS)),
          ("n1", place("remove", "collector-0", "n2"))], ("n1", "n2"), 2),
        ([("n1", Record(ID_DELETE, s1, START_MS))], ("n2", "n3"), 3),
    ]
    for height, (items, certifiers, term) in enumerate(plan, start=1):
        records = [sealed(signer, record, height) for signer, record in items]
        block = make_block(height=height, prev=prev, term=term, time_ms=START_MS + height * 1000,
                           proposer=w.keys["n1"].id, records=records)
        commits = {w.keys[name].id: commit_signature(w.keys[name], block.hash) for name in certifiers}
        blocks.append(encode_block_file(BlockFile(block, sign_block(w.keys["n1"], block), commits)))
        prev = block.hash
    return Chain(tuple(blocks))


class ScratchFiles:
    """One scratch directory for the targets that must go through a file; in RAM where Linux has it."""

    def __init__(self) -> None:
        root = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        self.directory = Path(tempfile.mkdtemp(prefix="tomq-fuzz-", dir=root))
        atexit.register(shutil.rmtree, self.directory, True)

    def path(self, name: str) -> Path:
        return self.directory / name


@functools.cache
def scratch() -> ScratchFiles:
    return ScratchFiles()


def run_ledger_bundle(data: bytes) -> None:
    path = scratch().path("ledger.bundle")
    path.write_bytes(data)
    verify_path(path, OPERATOR.public_key)


def run_ledger_reader(data: bytes) -> None:
    path = scratch().path("reader.bundle")
    path.write_bytes(data)
    refused = []
    for operator in (None, OPERATOR.public_key):
        try:
            for _ in LedgerReader(BundleSource(path), operator).entries():
                pass
        except LedgerInvalid as exc:
            refused.append(exc)
    if refused:
        raise Refused(str(refused[0]))


# ------------------------------------------------------------------------------------------ raft


@functools.cache
def raft_messages() -> list[Message]:
    entries = (Entry(3, 7, EntryKind.NORMAL, b"block"),
               Entry(3, 8, EntryKind.CONFIG, canonical.encode({"add": "n4"})),
               Entry(4, 9, EntryKind.NOOP, b""), Entry(4, 10, EntryKind.DECISION, b"\x01" * 40))
    snapshot = Snapshot(SnapshotMeta(12, 4, ("n1", "n2", "n3"), (b"req-1", b"req-2")), b"state" * 10)
    base = {"to": "n1", "from_": "n2", "term": 4}
    return [
        Message(MessageType.PRE_VOTE, log_term=3, index=9, load=0.25, **base),
        Message(MessageType.VOTE_RESP, reject=True, **base),
        Message(MessageType.APPEND, log_term=3, index=6, entries=entries, commit=6, **base),
        Message(MessageType.APPEND_RESP, reject=True, hint_index=5, hint_term=2, index=9, **base),
        Message(MessageType.HEARTBEAT, commit=9, read_seq=17, context=b"ctx", **base),
        Message(MessageType.SNAPSHOT, snapshot=snapshot, **base),
        Message(MessageType.PROPOSE, context=b"request-1", data=b"proposal", **base),
        Message(MessageType.READ_INDEX_RESP, index=9, context=b"r", **base),
        Message(MessageType.TIMEOUT_NOW, force=True, load=3, **base),
    ]


def run_raft_message(data: bytes) -> None:
    message = messages.decode(data)
    assert messages.decode(messages.encode(message)) == message, "an accepted message does not re-encode"


def raft_batch(sender: str, to: str, *, seq: int, body: Any) -> bytes:
    """A Raft batch as node `sender` seals it for node `to`: with the MAC of the key they share."""
    w = world()
    key = w.keys[sender].shared_key(w.keys[to].public_key, SHARED_KEY_PURPOSE)
    return seal_shared(key, w.keys[sender].id, seq=seq, time_ms=START_MS, type="raft", body=body)


@functools.cache
def raft_batches() -> list[bytes]:
    encoded = [messages.encode(message) for message in raft_messages()]
    return [
        raft_batch("n2", "n1", seq=1, body={"m": encoded[:3]}),
        raft_batch("n2", "n1", seq=2, body={"m": encoded[3:], "x": {"load": {"cpu": 0.5}}}),
        raft_batch("n2", "n1", seq=3, body={"m": [], "x": {"presence": ["s1"]}}),
    ]


RAFT_TOPIC = Topics(CLUSTER).raft("n1", "n2")


def run_raft_batch(data: bytes) -> None:
    w = world()
    batches: list[tuple[str, list[Message], dict[str, Any]]] = []
    transport = RaftTransport(link=None, topics=Topics(CLUSTER), name="n1", key=w.keys["n1"],
                              trust=w.trust, counter=SequenceCounter(), watermarks=MemoryWatermarks(),
                              on_batch=lambda sender, items, extras: batches.append((sender, items, extras)))
    transport.handle(RAFT_TOPIC, data)
    rejected = sum(transport.rejected.values())
    assert rejected + len(batches) == 1, f"{rejected} rejections and {len(batches)} batches for one payload"
    if rejected:
        raise Refused(str(dict(transport.rejected)))


# ------------------------------------------------------------------------------------------ raft storage

_LOG_RECORD = 27  # magic 2, crc 4, length 4, term 8, index 8, kind 1 (node/raft/storage.py's docstring)
_HS_RECORD = 10  # magic 2, crc 4, length 4
_SNAPSHOT_HEADER = struct.Struct("<8sIQQIQ")  # magic, crc, index, term, meta length, data length
STORAGE_FILES = {"log": "raft.log", "hardstate": "hardstate", "snapshot": "snapshot"}


def storage_image(data: bytes) -> dict[str, bytes]:
    files = loads_exactly(data)
    if (not isinstance(files, dict) or not {"log", "hardstate"} <= files.keys() <= STORAGE_FILES.keys()
            or not all(type(blob) is bytes for blob in files.values())):
        raise Refused("not a raft-storage harness image")
    return files


def _records(blob: bytes, header: int, length_at: int) -> list[tuple[int, int]]:
    """(start, end) of each record as its length field claims, from after the file header."""
    spans, pos = [], 8
    while pos + header <= len(blob):
        end = pos + header + int.from_bytes(blob[pos + length_at: pos + length_at + 4], "little")
        spans.append((pos, min(end, len(blob))))
        pos = end
    return spans


def fix_storage(rng: random.Random, data: bytes) -> bytes:
    """Recompute every checksum (and the snapshot's data length), so that damage gets past the CRCs."""
    files = storage_image(data)
    for name, header in (("log", _LOG_RECORD), ("hardstate", _HS_RECORD)):
        blob = bytearray(files[name])
        for start, end in _records(bytes(blob), header, 6):
            if end - start >= header:
                struct.pack_into("<I", blob, start + 2, zlib.crc32(blob[start + 6: end]))
        files[name] = bytes(blob)
    snapshot = files.get("snapshot")
    if snapshot is not None and len(snapshot) >= _SNAPSHOT_HEADER.size:
        blob = bytearray(snapshot)
        meta_length = struct.unpack_from("<I", blob, 28)[0]
        if rng.random() < 0.9:
            struct.pack_into("<Q", blob, 32, max(0, len(blob) - _SNAPSHOT_HEADER.size - meta_length))
        struct.pack_into("<I", blob, 8, zlib.crc32(blob[12:]))
        files["snapshot"] = bytes(blob)
    return canonical.encode(files)


def storage_mutator(dictionary: Dictionary) -> Mutator:
    def mutate_storage(rng: random.Random, data: bytes) -> bytes | None:
        """Damage one file the way disks and crashes do: a torn tail, a flipped bit, a changed field of
        a record, a record repeated or lost, garbage appended; or change the snapshot's CBOR meta."""
        try:
            files = storage_image(data)
        except Refused:
            return None
        name = rng.choice(sorted(files))
        blob = bytearray(files[name])
        operation = rng.randrange(9)
        header = _LOG_RECORD if name == "log" else _HS_RECORD
        spans = _records(bytes(blob), header, 6) if name != "snapshot" else []
        if operation == 0:
            del blob[rng.randint(0, len(blob)):]
        elif operation == 1 and blob:
            blob[rng.randrange(len(blob))] ^= 1 << rng.randrange(8)
        elif operation == 2 and spans:  # a field of a record: length, term, index, kind or a payload byte
            start, end = rng.choice(spans)
            offset = start + rng.choice((6, 10, 18, 26, 6 + header - 6, end - start - 1))
            if offset < len(blob):
                blob[offset] = rng.choice((0, 1, 2, 3, 4, 0x7F, 0x80, 0xFF, blob[offset] ^ 1))
        elif operation == 3 and spans:
            start, end = rng.choice(spans)
            at = rng.choice([s for s, _ in spans] + [len(blob)])
            blob[at:at] = blob[start:end]
        elif operation == 4 and spans:
            start, end = rng.choice(spans)
            del blob[start:end]
        elif operation == 5:
            blob += bytes(rng.randrange(256) for _ in range(rng.choice((1, 5, 27, 64))))
        elif operation == 6 and name == "snapshot" and len(blob) >= _SNAPSHOT_HEADER.size:
            meta_length = struct.unpack_from("<I", blob, 28)[0]
            meta_end = _SNAPSHOT_HEADER.size + meta_length
            value = loads_exactly(bytes(blob[_SNAPSHOT_HEADER.size: meta_end]))
            meta = mutate_cbor_value(rng, value, dictionary) if value is not NOT_CBOR else None
            if meta is None:
                return None
            blob[_SNAPSHOT_HEADER.size: meta_end] = meta
            struct.pack_into("<I", blob, 28, len(meta))
        elif operation == 7 and name == "snapshot":
            del files["snapshot"]
            return canonical.encode(files)
        elif operation == 8 and name != "snapshot" and spans:  # a record from the other file's kind
            blob[:8] = rng.choice((b"TOMQLOG1", b"TOMQHS01", b"TOMQLOG2"))
        else:
            return None
        files[name] = bytes(blob)
        return canonical.encode(files)

    return mutate_storage


@functools.cache
def storage_seeds() -> list[bytes]:
    images = []
    with tempfile.TemporaryDirectory(prefix="tomq-fuzz-seed-") as root:
        def image(directory: Path) -> bytes:
            files = {label: (directory / name).read_bytes() for label, name in STORAGE_FILES.items()
                     if (directory / name).exists()}
            return canonical.encode(files)

        kinds = list(EntryKind)
        plain = Path(root) / "plain"
        with FileStorage(plain) as storage:
            storage.append([Entry(1 + i // 3, i, kinds[i % 4], b"entry-%d" % i) for i in range(1, 7)])
            storage.set_hard_state(HardState(2, "n2", 4))
            storage.set_hard_state(HardState(3, None, 5))
        images.append(image(plain))
        snapshotted = Path(root) / "snapshotted"
        with FileStorage(snapshotted) as storage:
            storage.append([Entry(1, i, EntryKind.NORMAL, b"x" * i) for i in range(1, 9)])
            storage.save_snapshot(Snapshot(SnapshotMeta(4, 1, ("n1", "n2", "n3"), (b"decided",)), b"state"))
            storage.set_hard_state(HardState(1, "nœud", 6))
        images.append(image(snapshotted))
        empty = Path(root) / "empty"
        FileStorage(empty).close()
        images.append(image(empty))
    return images


def run_raft_storage(data: bytes) -> None:
    files = storage_image(data)
    directory = scratch().path("raft")
    directory.mkdir(exist_ok=True)
    for label, name in STORAGE_FILES.items():
        path = directory / name
        if label in files:
            path.write_bytes(files[label])
        else:
            path.unlink(missing_ok=True)
    with FileStorage(directory) as storage:
        loaded = storage.load()
    first = loaded.snapshot.meta.index + 1 if loaded.snapshot is not None else 1
    indices = [entry.index for entry in loaded.entries]
    expected = list(range(first, first + len(indices)))
    assert indices == expected, f"entries {indices[:5]}… do not follow {first - 1}"


# ------------------------------------------------------------------------------------------ envelopes etc.


@functools.cache
def envelope_seeds() -> list[bytes]:
    w = world()
    return [
        seal_reading(w.keys["s1"], seq=5, time_ms=START_MS, value=21.5, unit="degC",
                     payload_hash=b"\x01" * 32),
        seal_attested_reading(w.keys["b1"], seq=6, time_ms=START_MS, device="t2", device_seq=3,
                              value={"cars": 4}),
        w.sealed("s1", seq=7, type="join", body={"certificate": w.certificates["s1"]}),
        w.sealed("s1", seq=8, type="leave", body={"reason": "vanished"}),
        w.sealed("tl-j1", seq=2, type="report", body={"did": {"colour": "red"}, "command": "cmd:1"}),
        w.sealed("n1", seq=9, type="command", body={"setting": {"colour": "green"}, "block": 12}),
        w.sealed("n1", seq=10, type="load", body={"cpu": 0.25, "memory": 0.5, "score": 0.375}),
        raft_batches()[0],
        *decode_block_file(chain().blocks[2]).block.records,
    ]


def run_envelope(data: bytes) -> None:
    w = world()
    envelope = EnvelopeOpener(w.trust, MemoryWatermarks()).open(data, NOW_S)
    assert envelope.wire == data
    member = w.signers[envelope.sender]
    again = seal(member, seq=envelope.seq, time_ms=envelope.time_ms, type=envelope.type, body=envelope.body)
    assert again == data, "an accepted envelope is not what seal() makes of its fields (malleable)"


ANALYSER_SPEC = """
[service]
name = "collector"
program = "analyser"
replicas = 2
[[service.contracts]]
name = "busy"
kind = "executable"
on = "result"
when = { field = "cars_mean", above = 3.0 }
then = [ { command = "tl-j1", set = { colour = "green" } } ]
[service.inputs]
devices = ["s1"]
services = ["other"]
[service.resources]
cpu = 0.25
memory_mb = 128
[service.constraints]
labels = { zone = "north" }
nodes = ["n1", "n2"]
"""


@functools.cache
def request_seeds() -> list[bytes]:
    w = world()
    spec = parse_spec(ANALYSER_SPEC)

    def sealed(seq: int, body: dict[str, Any]) -> bytes:
        return seal(OPERATOR, seq=seq, time_ms=START_MS, type=REQUEST_TYPE, body=body)

    return [sealed(1, {"op": "deploy", "spec": spec.to_map(), "certificate": w.certificates["collector"]}),
            sealed(2, {"op": "remove", "service": "collector"}),
            sealed(3, {"op": "move", "service": "collector", "replica": 1, "to": "n3"})]


def run_operator_request(data: bytes) -> None:
    open_request(data, OPERATOR.public_key, CLUSTER, MemoryWatermarks())


def run_certificate(data: bytes) -> None:
    cert = TrustStore(OPERATOR.public_key, CLUSTER).add(data)
    again = certificate.issue(OPERATOR, cluster=cert.cluster, subject=cert.subject, name=cert.name,
                              role=cert.role, not_before=cert.not_before, not_after=cert.not_after,
                              publish=cert.publish)
    assert again.encoded == data, "an accepted certificate is not what issue() makes of its fields"


def run_canonical(data: bytes) -> None:
    value = canonical.decode(data)
    assert canonical.encode(value) == data, "decode accepted bytes that encode does not give back"
    canonical.decode(data, check_canonical=False)


@functools.cache
def canonical_seeds() -> list[bytes]:
    values: list[Any] = [0, -1, 24, 2**64 - 1, -(2**64), 1.5, -0.0, 1e300, "", "tomq", b"", b"\x00" * 40,
                         True, None, [], {}, [1, [2, [3]]],
                         {"a": 1, "bb": [b"x", 2.5, None], "c": {"d": False}}]
    seeds = [canonical.encode(value) for value in values]
    seeds += [*envelope_seeds()[:2], world().certificates["s1"], messages.encode(raft_messages()[2]),
              chain().blocks[1]]
    return seeds


def run_block_file(data: bytes) -> None:
    decoded = decode_block_file(data)
    assert encode_block_file(decoded) == data, "an accepted block file does not encode back to its bytes"


def run_serial_frames(data: bytes) -> None:
    items = framing.FrameDecoder().feed(data)
    cut = data[0] % (len(data) + 1) if data else 0  # the same bytes in two reads give the same answer
    split = framing.FrameDecoder()
    assert split.feed(data[:cut]) + split.feed(data[cut:]) == items, "the answer depends on how bytes arrive"
    if any(isinstance(item, framing.Fault) for item in items):
        raise Refused("a fault")


def run_bridge_session(data: bytes) -> None:
    session = Session(operator=OPERATOR.public_key, cluster=CLUSTER,
                      attester_for=lambda device: "b1" if device == "t2" else None)
    introduced: set[str] = set()
    errors = 0
    for action in session.receive(data, NOW_S):
        if isinstance(action, Introduce):
            introduced.add(action.device)
        elif isinstance(action, Take):
            assert action.device in introduced, f"a reading of {action.device} taken before its hello"
        else:
            assert isinstance(action, Send), f"unexpected action {action!r}"
            errors += sum(1 for item in framing.FrameDecoder().feed(action.data)
                          if isinstance(item, framing.Frame) and item.type == framing.ERROR)
    if errors:
        raise Refused(f"{errors} error frame(s)")


# ------------------------------------------------------------------------------------------ the targets


@functools.cache
def _dictionary(seeds: Callable[[], Sequence[bytes]]) -> Dictionary:
    return Dictionary.from_inputs(list(seeds()))


def _frame_bodies() -> list[bytes]:
    bodies = []
    for stream in line_seeds():
        for item in framing.FrameDecoder().feed(stream):
            if isinstance(item, framing.Frame):
                bodies.append(item.body)
    return bodies


def _snapshot_metas() -> list[bytes]:
    return [canonical.encode({"voters": ["n1", "n2", "n3"], "decided": [b"decided"]})]


class _LazyMutator:
    """A mutator whose dictionary is built on first use, so that importing this module stays cheap."""

    def __init__(self, make: Callable[[Dictionary], Mutator], seeds: Callable[[], Sequence[bytes]]) -> None:
        self.make, self.seeds = make, seeds
        self.__name__ = make.__name__

    @functools.cached_property
    def mutator(self) -> Mutator:
        return self.make(_dictionary(self.seeds))

    def __call__(self, rng: random.Random, data: bytes) -> bytes | None:
        return self.mutator(rng, data)


_FRAMES = _LazyMutator(frame_mutator, _frame_bodies)
_LEDGER_MODULES = ("tomq.node.ledger.verify", "tomq.node.ledger.block", "tomq.node.ledger.bundle",
                   "tomq.records", "tomq.node.ledger.pattern", "tomq.wire", "tomq.certificate",
                   "tomq.canonical")

TARGETS: dict[str, Target] = {target.name: target for target in (
    Target("canonical", run_canonical, (canonical.CanonicalDecodeError,), canonical_seeds,
           ("tomq.canonical",), description="tomq.canonical.decode"),
    Target("envelope", run_envelope, (EnvelopeRejected,), envelope_seeds, ("tomq.wire", "tomq.canonical"),
           fixup=reseal, description="EnvelopeOpener.open"),
    Target("operator-request", run_operator_request, (EnvelopeRejected,), request_seeds,
           ("tomq.wire", "tomq.node.orchestrator.requests", "tomq.node.orchestrator.spec",
            "tomq.node.orchestrator.contracts", "tomq.certificate"),
           fixup=reseal, description="orchestrator open_request (open_signed_by + the request body)"),
    Target("certificate", run_certificate, (InvalidCertificate,), lambda: list(world().certificates.values()),
           ("tomq.certificate", "tomq.canonical", "tomq.topics"), fixup=reseal,
           description="certificate decode through TrustStore.add"),
    Target("raft-message", run_raft_message, (MalformedRaftMessage,),
           lambda: [messages.encode(message) for message in raft_messages()],
           ("tomq.node.raft.messages", "tomq.canonical"), description="tomq.node.raft.messages.decode"),
    Target("raft-batch", run_raft_batch, (Refused,), raft_batches,
           ("tomq.node.raft.transport", "tomq.node.raft.messages", "tomq.wire", "tomq.topics"), fixup=reseal,
           description="RaftTransport.handle (never raises; counts a rejection)"),
    Target("serial-frames", run_serial_frames, (Refused,), line_seeds, ("tomq.bridge.framing",),
           mutators=(_FRAMES,), fixup=functools.partial(fix_frames, bodies=False), cbor=False,
           description="FrameDecoder.feed (never raises; returns faults)"),
    Target("bridge-session", run_bridge_session, (Refused,), line_seeds,
           ("tomq.bridge.session", "tomq.bridge.framing", "tomq.wire", "tomq.certificate",
            "tomq.node.services.readings"),
           mutators=(_FRAMES,), fixup=fix_frames, fixup_chance=0.7, cbor=False,
           description="Session.receive (never raises; answers with error frames)"),
    Target("block-file", run_block_file, (MalformedBlock,), lambda: list(chain().blocks),
           ("tomq.node.ledger.block", "tomq.canonical"), description="decode_block_file"),
    Target("ledger-bundle", run_ledger_bundle, (LedgerInvalid,),
           lambda: [chain().bundle(last) for last in (5, 1, 2)], _LEDGER_MODULES, fixup=reseal,
           fixup_chance=0.7, description="verify_path on an audit bundle (ChainVerifier.add per block)"),
    Target("ledger-reader", run_ledger_reader, (Refused,), lambda: [chain().bundle(last) for last in (5, 2)],
           _LEDGER_MODULES, fixup=reseal, fixup_chance=0.7,
           description="LedgerReader over an audit bundle, without and with the operator key"),
    Target("raft-storage", run_raft_storage, (StorageError, Refused), storage_seeds,
           ("tomq.node.raft.storage",), mutators=(_LazyMutator(storage_mutator, _snapshot_metas),),
           fixup=fix_storage, fixup_chance=0.6,
           cbor=False, byte_level=False, description="FileStorage open + load of damaged files"),
)}


# ------------------------------------------------------------------------------------------ scripts/fuzz


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/fuzz",
                                     description="Fuzz tomq's decoders of bytes from outside.")
    parser.add_argument("targets", nargs="*", metavar="TARGET", help=f"default: all of {', '.join(TARGETS)}")
    parser.add_argument("--seconds", type=float, default=60.0, help="per target (default 60)")
    parser.add_argument("--runs", type=int, help="inputs per target instead of a time (a deterministic run)")
    parser.add_argument("--seed", type=int, help="default: from the clock; printed, so a run can be repeated")
    parser.add_argument("--crashes", type=int, default=5, help="distinct crashes per target before moving on")
    parser.add_argument("--save", type=Path, default=SAVED_INPUTS,
                        help=f"where crashes are saved, and saved inputs read (default {SAVED_INPUTS})")
    parser.add_argument("--list", action="store_true", help="list the targets and exit")
    args = parser.parse_args(argv)
    if args.list:
        for target in TARGETS.values():
            print(f"{target.name:18} {target.description}")
        return 0
    unknown = [name for name in args.targets if name not in TARGETS]
    if unknown:
        parser.error(f"unknown target(s) {', '.join(unknown)}; --list shows them")
    seed = args.seed if args.seed is not None else int(time.time())
    budget = f"{args.runs} inputs" if args.runs else f"{args.seconds:g} s"
    print(f"seed {seed}; {budget} per target; crashes are saved under {args.save}", flush=True)
    crashed = False
    for name in args.targets or list(TARGETS):
        target = TARGETS[name]
        saved = [path.read_bytes() for path in saved_inputs(args.save, name)]
        fuzzer = Fuzzer(target, seed=seed, crash_dir=args.save, extra_inputs=saved)
        report = fuzzer.run(runs=args.runs, seconds=None if args.runs else args.seconds,
                            max_crashes=args.crashes)
        print(report.summary(), flush=True)
        for crash in report.crashes:
            crashed = True
            print(f"  CRASH {crash.error}\n        saved as {crash.path}", flush=True)
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
