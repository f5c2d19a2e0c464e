"""Inclusion and consistency proofs that an auditor checks with the operator's public key and nothing else.

`tomq ledger prove PATH --record ID` writes an **inclusion proof**: one record, the header of its
block, its Merkle path to the header's records_root (proof.py), the block's commit certificate, and
what it takes to know who may certify that block. `tomq ledger prove PATH --from H1 --to H2` writes
a **consistency proof**: the headers H1..H2, each naming the hash of the one before, and the commit
certificate of H2, so the ledger at H2 extends the one at H1 (whose hash the auditor may already
hold: `check-proof --old-head`). Both are canonical CBOR maps:

    inclusion    {format: "tomq-inclusion-proof", v: 1, genesis, membership: [step...], target: step,
                  signer: certificate of the record's proposer (empty when the operator sealed it)}
    consistency  {format: "tomq-consistency-proof", v: 1, genesis, membership: [step...],
                  headers: [header map, ...] (heights H1..H2), certificate: {signer id: signature} of H2}
    step         {header: header map (block.py), certificate: {signer id: commit signature},
                  index: the record's position, record: its envelope bytes, path: [sibling hash, ...]}

Where the quorum comes from: the checker knows only the operator key. `genesis` is block 0 whole: the
operator proposed and certified it, and its records carry the first nodes' certificates (operator
issued), so it names the first node set. `membership` lists every node join and leave recorded
after genesis and below the height proven, in ledger order, each as a step: its own block header,
certified by a majority of the node set as it stood before that block, and the record's Merkle path.
The checker replays them (a change takes effect after its block, as in verify.py) and requires the
proven block's certificate to hold valid signatures of a strict majority of the node set at that
height, every node certificate being valid at the block's time.

The limitation, stated plainly: a header does not commit to the node set, so the checker cannot see
that a proof left a membership change out. Leaving out a join lets a coalition that is a majority
of the nodes the proof shows, but a minority of the real ones, certify a forged block; leaving out
a leave lets a departed node's key still count. A proof is therefore as strong as "a majority of
the node set the proof declares, starting from the operator's genesis". Checking the whole ledger
or an audit bundle (`tomq ledger verify`, which replays every record) closes the gap; for the usual
cluster, whose nodes have not changed since genesis, there is nothing to leave out.

The checker is strict, so that changing any byte of a proof fails it: exact field sets, canonical
CBOR, every signature in a certificate from a current node and valid (a proof carries no
signatures it does not need to explain), strictly increasing membership steps that each change the
node set, and the proposer's own signature over the record under its operator-issued certificate.
Like an actuator (sensors/command.py), it does not re-judge the record against Table II: the
majority that certified the block did that before signing.

What this module must never do: I/O (callers read and write the files), or accept a proof on
anything but signatures it verified under keys the operator certified.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tomq import canonical, records
from tomq import certificate as certificates
from tomq.certificate import Certificate
from tomq.errors import EnvelopeRejected, InvalidCertificate, InvalidRecord, PeerError
from tomq.identity import SIGNATURE_BYTES, PublicKey
from tomq.node.ledger import block as blocks
from tomq.node.ledger.block import (
    BLOCK_VERSION,
    GENESIS_PREV,
    HASH_BYTES,
    Block,
    BlockFile,
    MalformedBlock,
    decode_block_file,
    header_map,
    merkle_root,
    verify_block_signature,
    verify_commit_signature,
)
from tomq.node.ledger.bundle import certificate_subject
from tomq.node.ledger.pattern import event_object
from tomq.node.ledger.proof import inclusion_path, root_from_path
from tomq.records import ID_CREATE, ID_DELETE, Identity, Record
from tomq.wire import DEFAULT_MAX_BYTES, MemoryWatermarks, open_signed_by

INCLUSION = "tomq-inclusion-proof"
CONSISTENCY = "tomq-consistency-proof"
PROOF_VERSION = 1
MAX_PROOF_BYTES = 64 * 1024 * 1024
MAX_PATH_STEPS = 64
_INCLUSION_FIELDS = frozenset({"format", "v", "genesis", "membership", "target", "signer"})
_CONSISTENCY_FIELDS = frozenset({"format", "v", "genesis", "membership", "headers", "certificate"})
_STEP_FIELDS = frozenset({"header", "certificate", "index", "record", "path"})
_HEADER_FIELDS = frozenset({"v", "height", "prev", "term", "t", "proposer", "records_root", "record_count"})
_ARMOR = re.compile(rb"-----BEGIN TOMQ (INCLUSION|CONSISTENCY) PROOF-----(.*?)-----END TOMQ \1 PROOF-----", re.S)


class ProofRejected(PeerError):
    """A proof does not hold; the message names the first thing that failed."""


@dataclass(frozen=True, slots=True)
class ProofReport:
    kind: str  # INCLUSION or CONSISTENCY
    height: int  # the block proven (inclusion) or the later head (consistency)
    block_hash: bytes
    block_time_ms: int
    signed_by: tuple[str, ...]  # node names whose commit signatures verified
    electorate: tuple[str, ...]  # the node set at that height
    membership_changes: int
    cluster: str
    record: Record | None = None
    record_id: str = ""
    index: int = -1
    proposer: str = ""  # the record's signer: a certificate name, or "operator"
    from_height: int = -1
    from_hash: bytes = b""

    def summary(self) -> str:
        if self.height == 0:
            quorum = "certified by the operator (genesis)"
        else:
            quorum = (f"certified by {', '.join(self.signed_by)} of the {len(self.electorate)} nodes "
                      f"{','.join(self.electorate)} (genesis + {self.membership_changes} membership change(s) "
                      "in the proof)")
        if self.kind == CONSISTENCY:
            return (f"consistency proof ok: block {self.height} ({self.block_hash.hex()}) extends block "
                    f"{self.from_height} ({self.from_hash.hex()}); {quorum}")
        assert self.record is not None
        return (f"inclusion proof ok: record {self.record_id} ({self.record.state} {_object(self.record)}, signed by "
                f"{self.proposer}) is record {self.index} of block {self.height} ({self.block_hash.hex()}); {quorum}")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "height": self.height, "block": self.block_hash.hex(),
                               "block_time_ms": self.block_time_ms, "signed_by": list(self.signed_by),
                               "electorate": list(self.electorate), "membership_changes": self.membership_changes,
                               "cluster": self.cluster}
        if self.kind == CONSISTENCY:
            out.update({"from_height": self.from_height, "from_block": self.from_hash.hex()})
        elif self.record is not None:
            out.update({"record": self.record_id, "index": self.index, "state": self.record.state,
                        "object": _object(self.record), "proposer": self.proposer})
        return out


# --- Building ----------------------------------------------------------------------------------------


class _BlockReader:
    """Decoded block files by height, from any source with `read(height) -> bytes`."""

    def __init__(self, read: Any) -> None:
        self.read = read

    def block_file(self, height: int) -> BlockFile:
        try:
            return decode_block_file(self.read(height))
        except MalformedBlock as exc:
            raise ProofRejected(f"block {height}: {exc}") from None


def build_inclusion(read: Any, height: int, index: int) -> bytes:
    """The inclusion proof of record `index` of block `height`; `read(h)` returns block file h."""
    source = _BlockReader(read)
    genesis, membership, tracker = _membership_until(source, height)
    block_file = source.block_file(height)
    block = block_file.block
    if not 0 <= index < len(block.records):
        raise ProofRejected(f"block {height} has no record {index} ({len(block.records)} records)")
    envelope = block.records[index]
    sender = _envelope_sender(envelope)
    signer = b""
    if sender != tracker.operator_id:
        found = tracker.certificates.get(sender)
        if found is None:
            raise ProofRejected(f"no certificate for {sender}, the proposer of record {index} of block {height}, "
                                "is on the ledger before it")
        signer = found
    proof = {"format": INCLUSION, "v": PROOF_VERSION, "genesis": genesis, "membership": membership,
             "target": tracker.step(block_file, index), "signer": signer}
    return canonical.encode(proof)


def build_consistency(read: Any, first: int, last: int) -> bytes:
    """The consistency proof that the ledger at `last` extends the one at `first`."""
    if not 0 <= first <= last:
        raise ProofRejected(f"a consistency proof needs 0 <= from <= to, not {first}..{last}")
    source = _BlockReader(read)
    genesis, membership, tracker = _membership_until(source, last)
    headers = [header_map(source.block_file(height).block) for height in range(first, last + 1)]
    head = source.block_file(last)
    proof = {"format": CONSISTENCY, "v": PROOF_VERSION, "genesis": genesis, "membership": membership,
             "headers": headers, "certificate": tracker.certificate_for(head)}
    return canonical.encode(proof)


class _Tracker:
    """The prover's view of the node set (by identity id) and of every certificate the chain carried."""

    def __init__(self, genesis: BlockFile) -> None:
        self.operator_id = genesis.block.proposer
        self.nodes: dict[str, str] = {}  # name -> identity id
        self.certificates: dict[str, bytes] = {}  # identity id -> certificate bytes
        self.pending: list[tuple[str, str, str | None]] = []
        for envelope in genesis.block.records:
            self.observe(envelope)
        self.settle()

    def observe(self, envelope: bytes) -> bool:
        """Note a record's certificate and node change; True if it changes the node set."""
        record = _record_of(envelope)
        structure = record.structure if record is not None else None
        if record is None or not isinstance(structure, Identity):
            return False
        subject = _subject_id(structure.proof) if record.state == ID_CREATE else None
        if subject is not None:
            self.certificates[subject] = structure.proof
        if structure.kind != "node":
            return False
        if record.state == ID_CREATE and subject is not None:
            self.pending.append(("join", structure.object, subject))
            return True
        if record.state == ID_DELETE:
            self.pending.append(("leave", structure.object, None))
            return True
        return False

    def settle(self) -> None:
        for change, name, subject in self.pending:
            if change == "join" and subject is not None:
                self.nodes[name] = subject
            else:
                self.nodes.pop(name, None)
        self.pending.clear()

    def certificate_for(self, block_file: BlockFile) -> dict[str, bytes]:
        if block_file.block.height == 0:
            return {k: v for k, v in block_file.commit_certificate.items() if k == self.operator_id}
        ids = set(self.nodes.values())
        return {k: v for k, v in block_file.commit_certificate.items() if k in ids}

    def step(self, block_file: BlockFile, index: int) -> dict[str, Any]:
        block = block_file.block
        return {"header": header_map(block), "certificate": self.certificate_for(block_file), "index": index,
                "record": block.records[index], "path": inclusion_path(block.records, index)}


def _membership_until(source: _BlockReader, height: int) -> tuple[bytes, list[dict[str, Any]], _Tracker]:
    genesis_bytes = source.read(0)
    genesis = source.block_file(0)
    tracker = _Tracker(genesis)
    membership: list[dict[str, Any]] = []
    for h in range(1, height):
        block_file = source.block_file(h)
        steps = []
        for index, envelope in enumerate(block_file.block.records):
            if tracker.observe(envelope):
                steps.append(index)
        membership.extend(tracker.step(block_file, index) for index in steps)  # certified by the set before h
        tracker.settle()
    if height > 0:
        for envelope in source.block_file(height).block.records:
            tracker.observe(envelope)  # certificates only: changes in the proven block take effect after it
        tracker.pending.clear()
    return bytes(genesis_bytes), membership, tracker


# --- Checking ----------------------------------------------------------------------------------------


def check(data: bytes, operator: PublicKey, *, old_head: bytes | None = None) -> ProofReport:
    """Check a proof (CBOR, or armored text) with the operator key alone; ProofRejected names the failure."""
    raw = _decode(dearmor(data))
    if raw["format"] == INCLUSION:
        if old_head is not None:
            raise ProofRejected("--old-head applies to a consistency proof, not to an inclusion proof")
        return _check_inclusion(raw, operator)
    return _check_consistency(raw, operator, old_head)


def _decode(data: bytes) -> dict[str, Any]:
    if len(data) > MAX_PROOF_BYTES:
        raise ProofRejected(f"proof of {len(data)} bytes exceeds {MAX_PROOF_BYTES}")
    try:
        raw = canonical.decode(data)
    except canonical.CanonicalDecodeError as exc:
        raise ProofRejected(f"not a proof: {exc}") from None
    if type(raw) is not dict or raw.get("format") not in (INCLUSION, CONSISTENCY):
        raise ProofRejected(f"not a proof: expected a map with format {INCLUSION} or {CONSISTENCY}")
    fields = _INCLUSION_FIELDS if raw["format"] == INCLUSION else _CONSISTENCY_FIELDS
    if raw.keys() != fields:
        raise ProofRejected(f"a {raw['format']} has exactly the fields {', '.join(sorted(fields))}")
    if raw["v"] != PROOF_VERSION or type(raw["v"]) is not int:
        raise ProofRejected(f"proof version {raw['v']!r} is not {PROOF_VERSION}")
    if type(raw["genesis"]) is not bytes or type(raw["membership"]) is not list:
        raise ProofRejected("proof genesis must be a block file and membership a list of steps")
    return raw


class _Electorate:
    """The node set as the proof shows it, from genesis through the membership steps."""

    def __init__(self, operator: PublicKey, genesis_bytes: bytes) -> None:
        self.operator = operator
        try:
            genesis = decode_block_file(genesis_bytes)
        except MalformedBlock as exc:
            raise ProofRejected(f"genesis: {exc}") from None
        block = genesis.block
        if (block.version, block.height, block.prev) != (BLOCK_VERSION, 0, GENESIS_PREV):
            raise ProofRejected("genesis must be block 0 of version 1 with a zero prev")
        if block.proposer != operator.id or not verify_block_signature(operator, block.hash, genesis.proposer_signature):
            raise ProofRejected(f"genesis is not proposed and signed by operator {operator.id}")
        if set(genesis.commit_certificate) != {operator.id} or not verify_commit_signature(
                operator, block.hash, genesis.commit_certificate[operator.id]):
            raise ProofRejected("genesis must be certified by the operator's signature alone")
        if block.record_count != len(block.records) or merkle_root(block.records) != block.records_root:
            raise ProofRejected("genesis records do not match its records_root")
        self.genesis = block
        self.cluster = ""
        self.nodes: dict[str, Certificate] = {}
        now = block.time_ms / 1000
        watermarks = MemoryWatermarks()
        for index, envelope in enumerate(block.records):
            try:
                opened = open_signed_by(envelope, operator, name="the operator", accepted_types=frozenset({"record"}),
                                        watermarks=watermarks, max_bytes=DEFAULT_MAX_BYTES)
                record = records.from_map(opened.body)
            except (EnvelopeRejected, InvalidRecord) as exc:
                raise ProofRejected(f"genesis record {index}: {exc}") from None
            structure = record.structure
            if record.state != ID_CREATE or not isinstance(structure, Identity) or structure.kind != "node":
                raise ProofRejected(f"genesis record {index} is not a node's PROV-ID-create")
            self.nodes[structure.object] = self._node_certificate(structure, now, f"genesis record {index}")
        self.changes = 0

    def _node_certificate(self, identity: Identity, now: float, where: str) -> Certificate:
        try:
            cert = certificates.decode(identity.proof, self.operator)
        except InvalidCertificate as exc:
            raise ProofRejected(f"{where}: the id-proof of {identity.object} is not the operator's: {exc}") from None
        if cert.name != identity.object or cert.role != "node":
            raise ProofRejected(f"{where}: the id-proof of {identity.object} certifies {cert.role} {cert.name}")
        if self.cluster and cert.cluster != self.cluster:
            raise ProofRejected(f"{where}: certificate of {cert.name} is for cluster {cert.cluster}, not {self.cluster}")
        if not cert.is_valid_at(now):
            raise ProofRejected(f"{where}: certificate of {cert.name} is not valid at the block's time")
        self.cluster = cert.cluster
        return cert

    def check_certificate(self, block: Block, certificate: Any, where: str) -> tuple[str, ...]:
        """The names of the nodes that certified `block`: a strict majority, every signature theirs and valid."""
        if type(certificate) is not dict or not 0 < len(certificate) <= blocks.MAX_SIGNERS:
            raise ProofRejected(f"{where}: the commit certificate must map signer ids to signatures")
        digest = block.hash
        now = block.time_ms / 1000
        by_id = {cert.subject_id: (name, cert) for name, cert in self.nodes.items()}
        signed: list[str] = []
        for signer, signature in sorted(certificate.items()):
            found = by_id.get(signer)
            if found is None:
                raise ProofRejected(f"{where}: commit signer {str(signer)[:64]!r} is not a node at height {block.height}")
            name, cert = found
            if not cert.is_valid_at(now):
                raise ProofRejected(f"{where}: certificate of {name} is not valid at the block's time")
            if type(signature) is not bytes or len(signature) != SIGNATURE_BYTES \
                    or not verify_commit_signature(cert.subject, digest, signature):
                raise ProofRejected(f"{where}: commit signature of {name} does not verify over block {block.height}")
            signed.append(name)
        needed = len(self.nodes) // 2 + 1
        if len(signed) < needed:
            raise ProofRejected(f"{where}: {len(signed)} commit signature(s) of the {len(self.nodes)} nodes; "
                                f"a majority needs {needed}")
        return tuple(sorted(signed))

    def apply_steps(self, steps: list[Any], below: int) -> None:
        """Replay the membership steps (all below height `below`), each certified by the set before its block."""
        staged: dict[str, Certificate | None] = {}
        current = 0
        last: tuple[int, int] = (0, 0)
        for number, step in enumerate(steps):
            where = f"membership step {number}"
            block, index, envelope = _check_step(step, where)
            if (block.height, index) <= last or block.height >= below:
                raise ProofRejected(f"{where}: steps must go up strictly by height and index, below height {below}")
            if block.height != current:
                self._settle(staged)
                current = block.height
            last = (block.height, index)
            self.check_certificate(block, step["certificate"], where)
            record = _record_of(envelope)
            structure = record.structure if record is not None else None
            if record is None or not isinstance(structure, Identity) or structure.kind != "node":
                raise ProofRejected(f"{where}: record {index} of block {block.height} is not a node's join or leave")
            joined = structure.object in self.nodes if structure.object not in staged \
                else staged[structure.object] is not None
            if record.state == ID_CREATE and not joined:
                staged[structure.object] = self._node_certificate(structure, block.time_ms / 1000, where)
            elif record.state == ID_DELETE and joined:
                staged[structure.object] = None
            else:
                raise ProofRejected(f"{where}: {record.state} of {structure.object} does not change the node set")
            self.changes += 1
        self._settle(staged)

    def _settle(self, staged: dict[str, Certificate | None]) -> None:
        for name, cert in staged.items():
            if cert is None:
                self.nodes.pop(name, None)
            else:
                self.nodes[name] = cert
        staged.clear()


def _check_inclusion(raw: dict[str, Any], operator: PublicKey) -> ProofReport:
    electorate = _Electorate(operator, raw["genesis"])
    block, index, envelope = _check_step(raw["target"], "target")
    if block.height == 0:
        if raw["membership"] or block.hash != electorate.genesis.hash:
            raise ProofRejected("target: a record of block 0 is proven by genesis alone (same header, no membership)")
        if set(_certificate_map(raw["target"]["certificate"], "target")) != {operator.id} or not verify_commit_signature(
                operator, block.hash, raw["target"]["certificate"][operator.id]):
            raise ProofRejected("target: block 0 is certified by the operator's signature alone")
        signed_by: tuple[str, ...] = ("operator",)
    else:
        electorate.apply_steps(raw["membership"], block.height)
        signed_by = electorate.check_certificate(block, raw["target"]["certificate"], "target")
    signer = raw["signer"]
    if type(signer) is not bytes:
        raise ProofRejected("signer must be the proposer's certificate (bytes), empty for the operator")
    now = block.time_ms / 1000
    if signer:
        try:
            cert = certificates.decode(signer, operator)
        except InvalidCertificate as exc:
            raise ProofRejected(f"signer certificate: {exc}") from None
        if cert.cluster != electorate.cluster or not cert.is_valid_at(now):
            raise ProofRejected(f"signer certificate of {cert.name} is not of cluster {electorate.cluster} "
                                "or not valid at the block's time")
        key, proposer = cert.subject, cert.name
    else:
        key, proposer = operator, "operator"
    try:
        opened = open_signed_by(envelope, key, name=proposer, accepted_types=frozenset({"record"}),
                                watermarks=MemoryWatermarks(), max_bytes=DEFAULT_MAX_BYTES)
        record = records.from_map(opened.body)
    except (EnvelopeRejected, InvalidRecord) as exc:
        raise ProofRejected(f"target record: {exc}") from None
    return ProofReport(INCLUSION, block.height, block.hash, block.time_ms, signed_by,
                       tuple(sorted(electorate.nodes)) if block.height else ("operator",), electorate.changes,
                       electorate.cluster, record, record.record_id, index, proposer)


def _check_consistency(raw: dict[str, Any], operator: PublicKey, old_head: bytes | None) -> ProofReport:
    electorate = _Electorate(operator, raw["genesis"])
    headers = raw["headers"]
    if type(headers) is not list or not headers:
        raise ProofRejected("headers must be a non-empty list of block headers")
    chain = [_header(header, f"header {number}") for number, header in enumerate(headers)]
    for before, after in itertools.pairwise(chain):
        if after.height != before.height + 1 or after.prev != before.hash:
            raise ProofRejected(f"block {after.height} does not follow block {before.height} (height or prev hash)")
        if after.term < before.term:
            raise ProofRejected(f"block {after.height} has a lower Raft term than block {before.height}")
    first, head = chain[0], chain[-1]
    if first.height == 0 and first.hash != electorate.genesis.hash:
        raise ProofRejected("header 0 is not the genesis block's")
    if old_head is not None and first.hash != old_head:
        raise ProofRejected(f"block {first.height} has hash {first.hash.hex()}, not the {old_head.hex()} you hold")
    if head.height == 0:
        if raw["membership"] or set(_certificate_map(raw["certificate"], "head")) != {operator.id} \
                or not verify_commit_signature(operator, head.hash, raw["certificate"][operator.id]):
            raise ProofRejected("head: block 0 is certified by the operator's signature alone, with no membership")
        signed_by: tuple[str, ...] = ("operator",)
    else:
        electorate.apply_steps(raw["membership"], head.height)
        signed_by = electorate.check_certificate(head, raw["certificate"], "head")
    return ProofReport(CONSISTENCY, head.height, head.hash, head.time_ms, signed_by,
                       tuple(sorted(electorate.nodes)) if head.height else ("operator",), electorate.changes,
                       electorate.cluster, from_height=first.height, from_hash=first.hash)


def _check_step(step: Any, where: str) -> tuple[Block, int, bytes]:
    """A step's shape and Merkle path; returns its block (header only), the index and the record bytes."""
    if type(step) is not dict or step.keys() != _STEP_FIELDS:
        raise ProofRejected(f"{where}: a step has exactly the fields {', '.join(sorted(_STEP_FIELDS))}")
    block = _header(step["header"], where)
    index, envelope, path = step["index"], step["record"], step["path"]
    if type(index) is not int or type(envelope) is not bytes or type(path) is not list or len(path) > MAX_PATH_STEPS:
        raise ProofRejected(f"{where}: index, record and path must be an integer, bytes and a list of hashes")
    try:
        root = root_from_path(envelope, index, block.record_count, path)
    except ValueError as exc:
        raise ProofRejected(f"{where}: record {index} is not in block {block.height}: {exc}") from None
    if root != block.records_root:
        raise ProofRejected(f"{where}: the Merkle path of record {index} leads to another root than block "
                            f"{block.height}'s")
    _certificate_map(step["certificate"], where)
    return block, index, envelope


def _header(header: Any, where: str) -> Block:
    if type(header) is not dict or header.keys() != _HEADER_FIELDS:
        raise ProofRejected(f"{where}: a header has exactly the fields {', '.join(sorted(_HEADER_FIELDS))}")
    for name in ("v", "height", "term", "t", "record_count"):
        if type(header[name]) is not int or not 0 <= header[name] <= blocks.MAX_INT:
            raise ProofRejected(f"{where}: header field {name} must be an integer in 0..2^63-1")
    if header["v"] != BLOCK_VERSION:
        raise ProofRejected(f"{where}: block version {header['v']} is not {BLOCK_VERSION}")
    for name in ("prev", "records_root"):
        if type(header[name]) is not bytes or len(header[name]) != HASH_BYTES:
            raise ProofRejected(f"{where}: header field {name} must be a {HASH_BYTES}-byte hash")
    if type(header["proposer"]) is not str or not 0 < len(header["proposer"]) <= blocks.MAX_ID_CHARS:
        raise ProofRejected(f"{where}: header proposer must be an identity id")
    return Block(header["v"], header["height"], header["prev"], header["term"], header["t"], header["proposer"], (),
                 header["records_root"], header["record_count"])


def _certificate_map(certificate: Any, where: str) -> Mapping[str, bytes]:
    if type(certificate) is not dict or not all(type(s) is bytes for s in certificate.values()):
        raise ProofRejected(f"{where}: the commit certificate must map signer ids to signatures")
    return certificate


def _record_of(envelope: bytes) -> Record | None:
    """The record an envelope carries, read without its signature (the block's certifiers checked it)."""
    try:
        outer = canonical.decode(envelope)
        if type(outer) is not list or len(outer) != 2 or type(outer[0]) is not bytes:
            return None
        fields = canonical.decode(outer[0])
        if type(fields) is not dict or fields.get("type") != "record":
            return None
        return records.from_map(fields.get("body"))
    except (canonical.CanonicalDecodeError, InvalidRecord):
        return None


def _envelope_sender(envelope: bytes) -> str:
    try:
        sender = canonical.decode(canonical.decode(envelope)[0])["from"]
    except (canonical.CanonicalDecodeError, TypeError, KeyError, IndexError):
        raise ProofRejected("the record is not a signed envelope") from None
    return str(sender)


def _subject_id(encoded: bytes) -> str | None:
    subject = certificate_subject(encoded)
    return subject[0] if subject is not None else None


def _object(record: Record) -> str:
    return event_object(record)


# --- Text form ------------------------------------------------------------------------------------------


def armor(data: bytes) -> str:
    """A proof as text to paste or mail: base64 between BEGIN/END lines naming its kind."""
    kind = "INCLUSION" if canonical.decode(data)["format"] == INCLUSION else "CONSISTENCY"
    body = base64.b64encode(data).decode("ascii")
    lines = "\n".join(body[i:i + 76] for i in range(0, len(body), 76))
    return f"-----BEGIN TOMQ {kind} PROOF-----\n{lines}\n-----END TOMQ {kind} PROOF-----\n"


def dearmor(data: bytes | str) -> bytes:
    """The CBOR of a proof given as armored text or as raw CBOR."""
    raw = data.encode("ascii", errors="replace") if isinstance(data, str) else bytes(data)
    if not raw.lstrip().startswith(b"-----BEGIN TOMQ "):
        return raw
    match = _ARMOR.fullmatch(raw.strip())
    if match is None:
        raise ProofRejected("armored proof must be one BEGIN TOMQ ... PROOF block and its END line")
    try:
        return base64.b64decode(b"".join(match.group(2).split()), validate=True)
    except (binascii.Error, ValueError):
        raise ProofRejected("armored proof is not valid base64") from None

