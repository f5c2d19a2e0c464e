"""An independent checker of a ledger history after a fault-injection (nemesis) run (issue 9).

`check_history` reads every copy of the ledger (each node's store of block files and the shared
directory) and reports, one line per problem naming the copy, height and term:

1. files: each copy holds heights 0..h with no gap, no misnamed `*.block`, no torn or malformed file;
2. agreement: a height held by two copies is the same file in both. Nodes write byte-identical block
   files (the commit certificate, too, is decided by the Raft log), so whole files are compared; a
   difference in the certificate alone is reported apart from a fork (a different header or records);
3. the chain: height 0 is the genesis block proposed and certified by the operator; every `prev` is the
   hash of the block before; record_count and records_root match the records; the proposer signature
   verifies under the key of a node joined at that height; the commit certificate carries valid
   signatures from a strict majority of those nodes; terms never decrease with height;
4. one leader per term: across all copies, every block of a term has the same proposer;
5. exactly once: every acknowledged record is in the longest copy exactly once, and no record (by its
   own id, per sender) appears twice;
6. envelopes: each record's Ed25519 signature verifies under its sender's key, the sender's sequence
   numbers rise, and its certificate is valid at the block's time.

Why it is independent: it imports nothing from tomq. It walks the CBOR with its own small reader
(which also checks the canonical form), decodes values with cbor2, verifies Ed25519 with cryptography
and recomputes every hash with hashlib, following the formats as documented in node/ledger/block.py,
tomq/wire.py, tomq/identity.py and tomq/certificate.py. It trusts only the operator public key: node
and member keys come from the certificates that genesis and later PROV-ID-create records carry.
A bug in the node's own decoders or verifier therefore cannot hide itself from this check.

Not checked here, because `tomq ledger verify` does and a replication fault cannot cause them: Table II
legality of each record (node/ledger/pattern.py) beyond the identity proofs, the canonical form of the
envelopes inside a block, and the rules for replacing a member's certificate. The tests run both on
the same ledgers.

Cost: one Ed25519 verification per record and about three per block, once per distinct line of blocks
(identical copies are parsed and verified once): 3,000 blocks of one record in three copies take about
2 s on a loaded two-core machine, nearly all of it in signature checks.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import cbor2
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

# Domains and sizes, as documented in tomq's modules (copied on purpose, not imported).
BLOCK_DOMAIN = b"tomq/block/v1\x00"
COMMIT_DOMAIN = b"tomq/block-commit/v1\x00"
ENVELOPE_DOMAIN = b"tomq/envelope/v1\x00"
CERTIFICATE_DOMAIN = b"tomq/certificate/v1\x00"
IDENTITY_DOMAIN = b"tomq/id/v1\x00"
GENESIS_PREV = bytes(32)
OPERATOR_NAME = "<operator>"
MAX_NESTING = 32
HEADER_FIELDS = frozenset({"v", "height", "prev", "term", "t", "proposer", "records_root", "record_count"})
FILE_FIELDS = frozenset({"header", "records", "proposer_sig", "certificate"})
ENVELOPE_FIELDS = frozenset({"v", "from", "seq", "t", "type", "body"})
CERTIFICATE_FIELDS = frozenset({"v", "cluster", "subject", "name", "role", "nb", "na", "publish", "issuer"})
ROLES_FOR_KIND = {"device": ("sensor", "actuator"), "node": ("node",), "service": ("service",),
                  "auditor": ("auditor",)}  # containers carry no certificate
DATA = "PROV-DATA"
ID_CREATE = "PROV-ID-create"
ID_DELETE = "PROV-ID-delete"
BLOCK_FILE_NAME = re.compile(r"[0-9]{12}\.block")

Problem = Callable[[str], None]  # takes one line naming the copy, height and term


@dataclass
class Acknowledged:
    """A record a client saw committed."""

    proposer: str  # identity id of the envelope signer
    record_id: str  # PROV-DATA: the datum id ("reading:17"); any record: its content id (RecordSeen)


@dataclass
class HistoryReport:
    heights: dict[str, int]  # copy name -> top of its usable prefix 0..h (-1: none)
    blocks: int = 0  # in the reference copy (the longest)
    records: int = 0  # in the reference copy
    acknowledged: int = 0  # acknowledged records found exactly once
    terms: dict[int, str] = field(default_factory=dict)  # term -> its (first) proposer id
    problems: list[str] = field(default_factory=list)
    reference: str = ""  # the copy the record checks read

    def assert_ok(self) -> None:
        if self.problems:
            raise AssertionError(f"{len(self.problems)} problem(s) in the ledger history:\n"
                                 + "\n".join(f"  {problem}" for problem in self.problems))

    def summary(self) -> str:
        heights = ", ".join(f"{name} {height}" for name, height in self.heights.items())
        verdict = "ok" if not self.problems else f"{len(self.problems)} problem(s)"
        return (f"history {verdict}: {self.blocks} blocks, {self.records} records, {self.acknowledged} "
                f"acknowledged found once, {len(self.terms)} terms; heights {heights}")


# --- Identities and signatures --------------------------------------------------------------------

def identity_id(public_key: bytes) -> str:
    """tomq's identity id: lowercase base32 of SHA-256("tomq/id/v1\\0" + key), 16 characters."""
    digest = hashlib.sha256(IDENTITY_DOMAIN + public_key).digest()
    return base64.b32encode(digest).decode("ascii").lower()[:16]


_key_objects: dict[bytes, Ed25519PublicKey] = {}


def signature_ok(public_key: bytes, signature: object, message: bytes) -> bool:
    if type(signature) is not bytes or len(signature) != 64:
        return False
    key = _key_objects.get(public_key)
    if key is None:
        key = _key_objects[public_key] = Ed25519PublicKey.from_public_bytes(public_key)
    try:
        key.verify(signature, message)
    except InvalidSignature:
        return False
    return True


@dataclass(frozen=True, slots=True)
class MemberKey:
    """What a certificate on the chain says (or the operator, who has none)."""

    name: str
    role: str
    public_key: bytes
    id: str
    not_before: int
    not_after: int
    cluster: str

    def valid_at(self, seconds: float) -> bool:
        return self.not_before <= seconds < self.not_after


class Refused(ValueError):
    """One line saying why a piece of the ledger is not acceptable."""


def decode_certificate(data: object, operator_key: bytes) -> MemberKey:
    """A membership certificate: `[signed, signature]`, the operator's signature over
    "tomq/certificate/v1\\0" + signed."""
    outer = _loads(data) if type(data) is bytes else None
    if not (type(outer) is list and len(outer) == 2 and all(type(x) is bytes for x in outer)):
        raise Refused("is not a CBOR array [signed bytes, signature]")
    signed, signature = outer
    if not signature_ok(operator_key, signature, CERTIFICATE_DOMAIN + signed):
        raise Refused("is not signed by the operator")
    fields = _loads(signed)
    if type(fields) is not dict or fields.keys() != CERTIFICATE_FIELDS:
        raise Refused(f"does not hold exactly the certificate fields {sorted(CERTIFICATE_FIELDS)}")
    if type(fields["subject"]) is not bytes or len(fields["subject"]) != 32:
        raise Refused("has no 32-byte subject key")
    if fields["issuer"] != identity_id(operator_key):
        raise Refused(f"names issuer {fields['issuer']!r}, not the operator")
    if not all(type(fields[name]) is str for name in ("name", "role", "cluster")):
        raise Refused("has a name, role or cluster that is not text")
    if not (type(fields["nb"]) is int and type(fields["na"]) is int and fields["nb"] < fields["na"]):
        raise Refused("has no validity window")
    return MemberKey(fields["name"], fields["role"], fields["subject"], identity_id(fields["subject"]),
                     fields["nb"], fields["na"], fields["cluster"])


def _loads(data: bytes) -> object:
    """cbor2's decoder, with whatever it raises on odd bytes turned into None (which no check accepts)."""
    try:
        return cbor2.loads(data)
    except Exception:  # cbor2 raises many kinds (decode, value, overflow, recursion): all mean "not this"
        return None


# --- A small CBOR reader: item boundaries and the canonical form ----------------------------------

class TornCbor(ValueError):
    """The bytes end inside a CBOR item: a partial write (or a truncated file)."""


class BadCbor(ValueError):
    """Not one canonical CBOR item of the plain kinds tomq uses."""


def _head(data: bytes, offset: int) -> tuple[int, int, int, int]:
    """(major type, additional info, argument, offset after the head); refuses non-shortest heads."""
    if offset >= len(data):
        raise TornCbor(f"ends at byte {len(data)} where an item should start")
    initial = data[offset]
    major, info = initial >> 5, initial & 0x1F
    if info < 24:
        return major, info, info, offset + 1
    if info > 27:
        raise BadCbor(f"indefinite length or reserved head 0x{initial:02x} at byte {offset}")
    end = offset + 1 + (1 << (info - 24))
    if end > len(data):
        raise TornCbor(f"ends at byte {len(data)} inside a head")
    argument = int.from_bytes(data[offset + 1 : end], "big")
    if major != 7 and argument < (24, 256, 65536, 2**32)[info - 24]:
        raise BadCbor(f"length or integer at byte {offset} is not in its shortest form")
    return major, info, argument, end


def item_end(data: bytes, offset: int = 0, depth: int = 0) -> int:
    """Where the CBOR item at `offset` ends; checks definite lengths, shortest heads and map keys in
    strictly rising bytewise order (RFC 8949 §4.2.1). Floats are accepted without a shortest-form check."""
    if depth > MAX_NESTING:
        raise BadCbor(f"nests deeper than {MAX_NESTING} levels")
    major, info, argument, offset = _head(data, offset)
    if major in (0, 1):
        return offset
    if major in (2, 3):
        if offset + argument > len(data):
            raise TornCbor(f"a string of {argument} bytes at byte {offset} runs past the end ({len(data)})")
        return offset + argument
    if major == 4:
        for _ in range(argument):
            offset = item_end(data, offset, depth + 1)
        return offset
    if major == 5:
        previous_key = b""
        for index in range(argument):
            key_start = offset
            offset = item_end(data, offset, depth + 1)
            key = data[key_start:offset]
            if index and key <= previous_key:
                raise BadCbor(f"map keys at byte {key_start} are not in canonical order (or repeat)")
            previous_key = key
            offset = item_end(data, offset, depth + 1)
        return offset
    if major == 6:
        raise BadCbor(f"a tag at byte {offset}")
    if info in (20, 21, 22, 25, 26, 27):  # false, true, null, floats
        return offset
    raise BadCbor(f"simple value {argument} is not allowed")


def map_value_spans(data: bytes, offset: int = 0) -> dict[str, tuple[int, int]]:
    """The byte span of each value of the (already checked) CBOR map at `offset`, by text key."""
    major, _, count, offset = _head(data, offset)
    if major != 5:
        raise BadCbor("is not a CBOR map")
    spans: dict[str, tuple[int, int]] = {}
    for _ in range(count):
        key_major, _, key_length, key_start = _head(data, offset)
        offset = item_end(data, offset)
        value_end = item_end(data, offset)
        if key_major == 3:
            spans[data[key_start : key_start + key_length].decode("utf-8", "replace")] = (offset, value_end)
        offset = value_end
    return spans


# --- Block files ----------------------------------------------------------------------------------

def merkle_root(leaves: list[bytes]) -> bytes:
    """RFC 6962 tree hash: leaf SHA-256(0x00 || leaf), node SHA-256(0x01 || l || r), odd node promoted."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    level = [hashlib.sha256(b"\x00" + leaf).digest() for leaf in leaves]
    while len(level) > 1:
        paired = [hashlib.sha256(b"\x01" + level[i] + level[i + 1]).digest()
                  for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            paired.append(level[-1])
        level = paired
    return level[0]


@dataclass(frozen=True, slots=True)
class ParsedBlock:
    """One block file as its bytes state it; `hash` is SHA-256 of the header's own bytes in the file."""

    file_digest: bytes  # SHA-256 of the whole file
    hash: bytes
    version: int
    height: int
    prev: bytes
    term: int
    time_ms: int
    proposer: str
    records_root: bytes
    record_count: int
    records: tuple[bytes, ...]
    proposer_signature: bytes
    certificate: dict[str, bytes]

    @property
    def content(self) -> tuple[bytes, tuple[bytes, ...]]:
        """What a fork changes: header (by its hash) and records. The certificate is not part of it."""
        return self.hash, self.records


def parse_block_file(data: bytes) -> ParsedBlock:
    """Raises TornCbor for a partial file, BadCbor or Refused (one line) for any other defect."""
    if not data:
        raise TornCbor("is empty")
    end = item_end(data)
    if end != len(data):
        raise BadCbor(f"has {len(data) - end} bytes after the block")
    header_start, header_end = map_value_spans(data).get("header", (0, 0))
    value = cbor2.loads(data)
    if type(value) is not dict or value.keys() != FILE_FIELDS:
        raise Refused(f"is not a map of exactly {', '.join(sorted(FILE_FIELDS))}")
    header = value["header"]
    if type(header) is not dict or header.keys() != HEADER_FIELDS:
        raise Refused(f"has a header that is not a map of exactly {', '.join(sorted(HEADER_FIELDS))}")
    for name in ("v", "height", "term", "t", "record_count"):
        if type(header[name]) is not int or header[name] < 0:
            raise Refused(f"header field {name} is not a non-negative integer")
    for name in ("prev", "records_root"):
        if type(header[name]) is not bytes or len(header[name]) != 32:
            raise Refused(f"header field {name} is not 32 bytes")
    if type(header["proposer"]) is not str:
        raise Refused("header field proposer is not text")
    records = value["records"]
    if type(records) is not list or not all(type(record) is bytes and record for record in records):
        raise Refused("records are not a list of envelope bytes")
    certificate = value["certificate"]
    if type(certificate) is not dict or not all(type(signer) is str and type(signature) is bytes
                                                for signer, signature in certificate.items()):
        raise Refused("certificate is not a map of signer ids to signatures")
    if type(value["proposer_sig"]) is not bytes:
        raise Refused("proposer_sig is not bytes")
    return ParsedBlock(
        file_digest=hashlib.sha256(data).digest(),
        hash=hashlib.sha256(data[header_start:header_end]).digest(),
        version=header["v"], height=header["height"], prev=header["prev"], term=header["term"],
        time_ms=header["t"], proposer=header["proposer"], records_root=header["records_root"],
        record_count=header["record_count"],
        records=tuple(records), proposer_signature=value["proposer_sig"], certificate=certificate)


@dataclass
class Copy:
    """One directory of block files: the well-formed ones by height, and the usable prefix 0..top."""

    name: str
    blocks: dict[int, ParsedBlock] = field(default_factory=dict)
    top: int = -1  # of the prefix 0..top that is complete and well-formed
    prefix_keys: list[bytes] = field(default_factory=list)  # per height of the prefix: digest of files 0..h


def read_copy(name: str, directory: Path, parsed: dict[bytes, ParsedBlock], problem: Problem) -> Copy:
    copy = Copy(name)
    try:
        names = sorted(os.listdir(directory))
    except OSError as exc:
        problem(f"copy {name}: cannot read {directory}: {exc.strerror or exc}")
        return copy
    files: dict[int, str] = {}
    for file_name in names:
        if file_name.startswith(".") or not file_name.endswith(".block"):
            continue  # writers' temporaries (dot files) and other things that do not claim to be blocks
        if BLOCK_FILE_NAME.fullmatch(file_name) is None:
            problem(f"copy {name}: stray file {file_name} is not named <height as 12 digits>.block")
            continue
        files[int(file_name[:12])] = file_name
    if not files:
        problem(f"copy {name}: no block files in {directory}")
        return copy
    top = max(files)
    missing = [height for height in range(top) if height not in files]
    for first, last in _runs(missing):
        if first == last:
            problem(f"copy {name}: height {first} ({first:012d}.block) is missing, "
                    f"below its top height {top}")
        else:
            problem(f"copy {name}: heights {first}..{last} are missing (a gap below its top height {top})")
    for height, file_name in sorted(files.items()):
        where = f"height {height} ({file_name})"
        if height == top:
            where = f"its last file, {where},"
        try:
            data = (directory / file_name).read_bytes()
        except OSError as exc:
            problem(f"copy {name}: cannot read {where}: {exc.strerror or exc}")
            continue
        digest = hashlib.sha256(data).digest()
        block = parsed.get(digest)
        if block is None:
            try:
                block = parsed[digest] = parse_block_file(data)
            except TornCbor as exc:
                problem(f"copy {name}: {where} is torn: its {len(data)} bytes end inside a CBOR item "
                        f"({exc}); a partial write")
                continue
            except Exception as exc:  # BadCbor, Refused or cbor2's own: never let odd bytes stop the check
                problem(f"copy {name}: {where} is not a well-formed canonical block file: {exc}")
                continue
        if block.height != height:
            problem(f"copy {name}: file {file_name} holds block {block.height}")
            continue
        copy.blocks[height] = block
    running = b""
    while copy.top + 1 in copy.blocks:
        copy.top += 1
        running = hashlib.sha256(running + copy.blocks[copy.top].file_digest).digest()
        copy.prefix_keys.append(running)
    return copy


# --- The chain ------------------------------------------------------------------------------------

@dataclass(slots=True)
class RecordSeen:
    height: int
    sender: str
    state: str
    datum: str | None  # the PROV-DATA datum id
    signed: bytes  # the envelope's signed bytes, for the content id

    def content_id(self) -> str | None:
        """tomq's record id: SHA-256 of the canonical record map (the envelope body, byte for byte),
        as 32 hex digits."""
        try:
            start, end = map_value_spans(self.signed)["body"]
        except (BadCbor, TornCbor, KeyError, UnicodeDecodeError):
            return None
        return hashlib.sha256(self.signed[start:end]).hexdigest()[:32]

    def primary_id(self) -> str | None:
        return self.datum if self.datum is not None else self.content_id()


class Chain:
    """The state an auditor keeps while walking one line of blocks from genesis."""

    def __init__(self, operator_key: bytes, names: dict[str, str]) -> None:
        self.operator_key = operator_key
        operator_id = identity_id(operator_key)
        self.operator = MemberKey(OPERATOR_NAME, "operator", operator_key, operator_id, 0, 2**63, "")
        self.by_id: dict[str, MemberKey] = {operator_id: self.operator}  # every sender known so far
        self.by_name: dict[str, MemberKey] = {}
        self.nodes: dict[str, None] = {}  # joined node names, in join order
        self.high_seq: dict[str, int] = {}
        self.cluster: str | None = None
        self.head = GENESIS_PREV
        self.term = 0
        self.names = names  # identity id -> name, for messages (shared across lines of blocks)
        self.names[operator_id] = OPERATOR_NAME
        self.records: list[RecordSeen] = []

    def label(self, identity: str) -> str:
        name = self.names.get(identity)
        return f"{name} ({identity})" if name else identity

    def add(self, height: int, block: ParsedBlock, problem: Problem) -> None:
        if block.version != 1:
            problem(f"block version {block.version} is not 1")
        if block.prev != self.head:
            problem("genesis prev is not 32 zero bytes" if height == 0 else
                    f"prev {block.prev.hex()[:16]}… is not the hash of block {height - 1} "
                    f"({self.head.hex()[:16]}…)")
        if block.term < self.term:
            problem(f"Raft term {block.term} is below the term {self.term} of block {height - 1}")
        seconds = block.time_ms / 1000
        if height == 0:
            signers = {self.operator.id: self.operator}
        else:
            members = [self.by_name[name] for name in self.nodes if name in self.by_name]
            signers = {member.id: member for member in members}
        proposer = signers.get(block.proposer)
        if proposer is None:
            if height == 0:
                problem(f"genesis is proposed by {block.proposer}, not the operator {self.operator.id}")
            else:
                joined = ", ".join(self.nodes) or "none"
                problem(f"proposer {block.proposer} is not a node joined at this height ({joined})")
        elif not proposer.valid_at(seconds):
            problem(f"certificate of proposer {proposer.name} is not valid at the block's time "
                    f"({block.time_ms} ms)")
        elif not signature_ok(proposer.public_key, block.proposer_signature, BLOCK_DOMAIN + block.hash):
            problem(f"proposer signature of {self.label(block.proposer)} does not verify")
        electorate = 1 if height == 0 else len(self.nodes)
        needed = electorate // 2 + 1
        valid = 0
        for signer_id, signature in sorted(block.certificate.items()):
            signer = signers.get(signer_id)
            if signer is None or not signer.valid_at(seconds):
                continue  # not a node at this height: it neither counts nor harms (as verify.py)
            if signature_ok(signer.public_key, signature, COMMIT_DOMAIN + block.hash):
                valid += 1
            else:
                problem(f"commit signature of {self.label(signer_id)} does not verify")
        if valid < needed:
            problem(f"commit certificate has {valid} valid signature(s) of the {electorate} node(s) "
                    f"joined at this height; a majority needs {needed}")
        if block.record_count != len(block.records):
            problem(f"header counts {block.record_count} records, the block holds {len(block.records)}")
        if merkle_root(list(block.records)) != block.records_root:
            problem("records_root does not match the records "
                    "(a record was changed, added, removed or reordered)")
        joins: list[str] = []
        leaves: list[str] = []
        for index, envelope in enumerate(block.records):
            try:
                self._add_record(height, envelope, seconds, joins, leaves)
            except Refused as exc:
                problem(f"record {index}: {exc}")
        for name in joins:
            self.nodes[name] = None
        for name in leaves:
            self.nodes.pop(name, None)
        self.head = block.hash
        self.term = block.term

    def _add_record(self, height: int, envelope: bytes, seconds: float, joins: list[str],
                    leaves: list[str]) -> None:
        outer = _loads(envelope)
        if not (type(outer) is list and len(outer) == 2 and all(type(x) is bytes for x in outer)):
            raise Refused("is not an envelope [signed bytes, signature]")
        signed, signature = outer
        fields = _loads(signed)
        if type(fields) is not dict or fields.keys() != ENVELOPE_FIELDS:
            raise Refused(f"envelope does not hold exactly the fields {sorted(ENVELOPE_FIELDS)}")
        sender, seq, body = fields["from"], fields["seq"], fields["body"]
        if type(sender) is not str or type(seq) is not int or fields["type"] != "record" or fields["v"] != 1:
            raise Refused("envelope is not a version-1 record from an identity with an integer seq")
        state = body.get("state") if type(body) is dict else None
        prov = body.get("prov") if type(body) is dict else None
        datum = prov.get("data") if state == DATA and type(prov) is dict else None
        datum = datum if type(datum) is str else None
        self.records.append(RecordSeen(height, sender, str(state), datum, signed))
        member = self.by_id.get(sender)
        if member is None:
            raise Refused(f"sender {sender} has no certificate on the chain so far")
        if not signature_ok(member.public_key, signature, ENVELOPE_DOMAIN + signed):
            raise Refused(f"envelope signature of {self.label(sender)} (seq {seq}) does not verify")
        if not member.valid_at(seconds):
            raise Refused(f"certificate of {member.name} is not valid at the block's time")
        if seq <= self.high_seq.get(sender, 0):
            raise Refused(f"seq {seq} from {self.label(sender)} is not above its previous "
                          f"{self.high_seq[sender]}")
        self.high_seq[sender] = seq
        if state in (ID_CREATE, ID_DELETE):
            self._identity(state, body.get("identity"), seconds, joins, leaves)

    def _identity(self, state: str, identity: object, seconds: float, joins: list[str],
                  leaves: list[str]) -> None:
        if type(identity) is not dict:
            raise Refused(f"a {state} record without an identity map")
        name, kind = identity.get("object"), identity.get("kind")
        if state == ID_DELETE:
            if kind == "node":
                leaves.append(str(name))
            return
        roles = ROLES_FOR_KIND.get(str(kind))
        if roles is None:
            return  # a container: its id-proof is a hash of evidence, not a key
        try:
            member = decode_certificate(identity.get("proof"), self.operator_key)
        except Refused as exc:
            raise Refused(f"id-proof of {name} {exc}") from None
        if member.name != name or member.role not in roles:
            raise Refused(f"id-proof of {name} certifies {member.name} as {member.role}, not a {kind}")
        if self.cluster is not None and member.cluster != self.cluster:
            raise Refused(f"id-proof of {name} belongs to cluster {member.cluster!r}, not {self.cluster!r}")
        if not member.valid_at(seconds):
            raise Refused(f"certificate of {name} is not valid at the block's time")
        self.cluster = member.cluster
        replaced = self.by_name.get(member.name)
        if replaced is not None and replaced.id != member.id:
            self.by_id.pop(replaced.id, None)
        self.by_name[member.name] = self.by_id[member.id] = member
        self.names[member.id] = member.name
        if kind == "node":
            joins.append(member.name)


# --- The checker ----------------------------------------------------------------------------------

def check_history(operator_public_key: bytes, node_keys: dict[str, bytes] | None, copies: dict[str, Path],
                  acknowledged: list[Acknowledged]) -> HistoryReport:
    """Check every copy of the ledger against the others, the chain rules and the acknowledged records.

    `copies` maps a name ("n1", "shared") to a directory of block files. `node_keys` (node name -> raw
    Ed25519 public key) is optional: node keys are learnt from the chain; given keys are compared
    with them. See the module docstring for what is checked.
    """
    problems: list[str] = []
    problem = problems.append
    parsed: dict[bytes, ParsedBlock] = {}  # by file digest: identical copies are parsed once
    read = [read_copy(name, Path(directory), parsed, problem) for name, directory in copies.items()]
    report = HistoryReport(heights={copy.name: copy.top for copy in read}, problems=problems)
    if not read:
        problem("no copies of the ledger were given")
        return report
    # Longest usable prefix first; ties keep the caller's order. The first is the reference copy.
    ordered = sorted(read, key=lambda copy: -copy.top)
    reference = ordered[0]
    report.reference = reference.name
    names: dict[str, str] = {}
    reference_chain = _check_chains(operator_public_key, ordered, names, problem)
    _compare_copies(read, reference, names, problem)
    report.terms = _check_terms(read, names, problem)
    if reference_chain is None:
        report.acknowledged = 0
        for item in acknowledged:
            problem(f"acknowledged record {item.record_id} from {item.proposer} is missing "
                    "(no copy has a genesis block)")
        return report
    report.blocks = reference.top + 1
    report.records = len(reference_chain.records)
    report.acknowledged = _check_records(reference, reference_chain, acknowledged, problem)
    for name, public_key in (node_keys or {}).items():
        member = reference_chain.by_name.get(name)
        if member is None or member.role != "node":
            problem(f"node {name}: its key was given, but no node certificate for {name} is on the chain")
        elif member.public_key != public_key:
            problem(f"node {name}: the key given ({public_key.hex()[:16]}…) is not the key its certificate "
                    f"on the chain certifies ({member.public_key.hex()[:16]}…)")
    return report


def _check_chains(operator_key: bytes, ordered: list[Copy], names: dict[str, str],
                  problem: Problem) -> Chain | None:
    """Walk each distinct line of blocks once; a problem names every copy holding that very prefix.

    A copy whose prefix another copy already covers is not walked again. A copy that forks is walked
    from genesis again (its state depends on every block before), reporting only from the fork on.
    """
    holders: dict[bytes, list[str]] = {}
    for copy in ordered:
        for key in copy.prefix_keys:
            holders.setdefault(key, []).append(copy.name)
    walked: set[bytes] = set()
    reference_chain = None
    for copy in ordered:
        if not copy.prefix_keys or copy.prefix_keys[-1] in walked:
            continue
        chain = Chain(operator_key, names)
        for height, key in enumerate(copy.prefix_keys):
            block = copy.blocks[height]
            if key in walked:
                chain.add(height, block, lambda _: None)
                continue
            chain.add(height, block, _located(problem, height, block.term, holders[key]))
            walked.add(key)
        if reference_chain is None:
            reference_chain = chain
    return reference_chain


def _located(problem: Problem, height: int, term: int, copies: list[str]) -> Problem:
    """`problem`, with each reason prefixed by where it is: "height 5 (term 2) in n1, shared: ..."."""
    where = f"height {height} (term {term}) in {', '.join(sorted(copies))}"
    return lambda reason: problem(f"{where}: {reason}")


def _compare_copies(read: list[Copy], reference: Copy, names: dict[str, str], problem: Problem) -> None:
    """Every height two copies hold must be the same file. Each height's yardstick is the file most
    copies hold (ties: the reference copy, then the caller's order); each copy's first fork and its
    certificate-only differences are reported once per copy."""
    def label(identity: str) -> str:
        return names.get(identity, identity)

    order = [reference, *(copy for copy in read if copy is not reference)]
    yardstick: dict[int, Copy] = {}
    for height in sorted({height for copy in read for height in copy.blocks}):
        by_digest: dict[bytes, list[Copy]] = {}
        for copy in order:
            if height in copy.blocks:
                by_digest.setdefault(copy.blocks[height].file_digest, []).append(copy)
        yardstick[height] = max(by_digest.values(), key=len)[0]  # max keeps the first of equal lengths
    for copy in order:
        fork: tuple[int, str, ParsedBlock, ParsedBlock] | None = None
        later_forks = 0
        certificate_only: list[int] = []
        certificate_other = ""
        for height, mine in sorted(copy.blocks.items()):
            other = yardstick[height]
            theirs = other.blocks[height]
            if mine.file_digest == theirs.file_digest:
                continue
            if mine.content == theirs.content:
                certificate_only.append(height)
                certificate_other = certificate_other or other.name
            elif fork is None:
                fork = (height, other.name, mine, theirs)
            else:
                later_forks += 1
        if fork is not None:
            height, other_name, mine, theirs = fork
            if mine.hash == theirs.hash:
                what = f"the same header (block {mine.hash.hex()[:16]}…) with different records"
            else:
                what = (f"block {mine.hash.hex()[:16]}… (term {mine.term}, proposed by "
                        f"{label(mine.proposer)}) vs {theirs.hash.hex()[:16]}… (term {theirs.term}, "
                        f"proposed by {label(theirs.proposer)})")
            problem(f"copy {copy.name} diverges from {other_name} at height {height}: {what}"
                    + (f"; {later_forks} later height(s) differ too" if later_forks else ""))
        if certificate_only:
            shown = ", ".join(str(height) for height in certificate_only[:5])
            shown += ", …" if len(certificate_only) > 5 else ""
            problem(f"copy {copy.name}: {len(certificate_only)} height(s) ({shown}) hold the same block as "
                    f"{certificate_other} with a different commit certificate "
                    "(nodes write byte-identical files)")


def _check_terms(read: list[Copy], names: dict[str, str], problem: Problem) -> dict[int, str]:
    """One leader per term: over every copy's blocks, each term has a single proposer."""
    seen: dict[int, dict[str, dict[int, set[str]]]] = {}  # term -> proposer -> height -> copies
    for copy in read:
        for height, block in copy.blocks.items():
            by_height = seen.setdefault(block.term, {}).setdefault(block.proposer, {})
            by_height.setdefault(height, set()).add(copy.name)
    terms: dict[int, str] = {}
    for term in sorted(seen):
        by_proposer = sorted(seen[term].items(), key=lambda item: min(item[1]))
        terms[term] = by_proposer[0][0]
        if len(by_proposer) > 1:
            parts = []
            for proposer, heights in by_proposer:
                copies = sorted(set().union(*heights.values()))
                name = f"{names[proposer]} ({proposer})" if proposer in names else proposer
                parts.append(f"{name} at {_heights_text(sorted(heights))} in {', '.join(copies)}")
            problem(f"term {term} has {len(by_proposer)} proposers (two leaders in one term): "
                    + "; ".join(parts))
    return terms


def _check_records(reference: Copy, chain: Chain, acknowledged: list[Acknowledged],
                   problem: Problem) -> int:
    """Exactly once, in the reference copy: every acknowledged record, and every record by its own id."""
    by_primary: dict[tuple[str, str], list[int]] = {}
    for record in chain.records:
        primary = record.primary_id()
        if primary is not None:
            by_primary.setdefault((record.sender, primary), []).append(record.height)
    by_content: dict[tuple[str, str], list[int]] | None = None  # built only if an ack names a content id
    acknowledged_keys = {(item.proposer, item.record_id) for item in acknowledged}
    found_once = 0
    for item in acknowledged:
        key = (item.proposer, item.record_id)
        heights = by_primary.get(key)
        if heights is None:
            if by_content is None:
                by_content = {}
                for record in chain.records:
                    content_id = record.content_id()
                    if content_id is not None and record.datum is not None:
                        by_content.setdefault((record.sender, content_id), []).append(record.height)
            heights = by_content.get(key, [])
        sender = chain.label(item.proposer)
        if not heights:
            problem(f"acknowledged record {item.record_id} from {sender} is missing "
                    f"(not in {reference.name}, heights 0..{reference.top})")
        elif len(heights) > 1:
            problem(f"acknowledged record {item.record_id} from {sender} appears {len(heights)} times at "
                    f"heights {', '.join(map(str, heights))} (in {reference.name})")
        else:
            found_once += 1
    for (sender, record_id), heights in by_primary.items():
        if len(heights) > 1 and (sender, record_id) not in acknowledged_keys:
            problem(f"record {record_id} from {chain.label(sender)} appears {len(heights)} times at heights "
                    f"{', '.join(map(str, heights))} (in {reference.name})")
    return found_once


def _runs(numbers: Iterable[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for number in numbers:
        if runs and runs[-1][1] == number - 1:
            runs[-1] = (runs[-1][0], number)
        else:
            runs.append((number, number))
    return runs


def _heights_text(heights: list[int]) -> str:
    parts = [str(first) if first == last else f"{first}..{last}" for first, last in _runs(heights)]
    return ("height " if len(heights) == 1 else "heights ") + ", ".join(parts)


# --- Where a tomq cluster keeps its copies --------------------------------------------------------

def operator_key_of(cluster_dir: Path) -> bytes:
    """The operator public key from DIR/operator/operator.pub (hex)."""
    return bytes.fromhex((Path(cluster_dir) / "operator" / "operator.pub").read_text().strip())


def cluster_copies(cluster_dir: Path, shared_dir: Path | None = None) -> dict[str, Path]:
    """Each node's store (DIR/members/<name>/state/blocks, the default data dir) and the shared directory."""
    members = Path(cluster_dir) / "members"
    stores = sorted(path for path in members.glob("*/state/blocks") if path.is_dir())
    copies = {path.parent.parent.name: path for path in stores}
    if shared_dir is not None:
        copies["shared"] = Path(shared_dir)
    return copies


def check_cluster(cluster_dir: Path, shared_dir: Path | None,
                  acknowledged: list[Acknowledged]) -> HistoryReport:
    """`check_history` for a cluster directory: trusts only its operator.pub."""
    copies = cluster_copies(cluster_dir, shared_dir)
    return check_history(operator_key_of(cluster_dir), None, copies, acknowledged)
