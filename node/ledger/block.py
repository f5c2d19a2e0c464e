"""Ledger blocks: the header, its hash, the proposer signature, the commit certificate and the block file.

A block is one Raft log entry holding a batch of records (DESIGN §4). Each record is a signed envelope
(`tomq.wire.seal(key, type="record", body=record.to_map())`) from its proposer, kept byte for byte.

Header (canonical CBOR map; every field is covered by the block hash):
    v             1
    height        genesis = 0, then +1 per block (below 10^12, the width of a block file name)
    prev          block hash of height-1, 32 bytes; 32 zero bytes for genesis
    term          the Raft term of the log entry that carried the block
    t             milliseconds since the epoch, from the proposer's clock
    proposer      identity id of the proposer (the operator for genesis, a node afterwards)
    records_root  Merkle root over the record envelopes (see `merkle_root`)
    record_count  how many records the block holds

Block hash = SHA-256(canonical CBOR of the header map). Records are bound through records_root and
record_count, signatures are not covered (they sign the hash). The proposer signs
`b"tomq/block/v1\\0" + hash`; each node that persists the block signs `b"tomq/block-commit/v1\\0" + hash`,
and those signatures keyed by signer id are the commit certificate.

Block file (one per height, `<height as 12 digits>.block`): canonical CBOR map
    {"header": {...}, "records": [envelope bytes, ...], "proposer_sig": bytes, "certificate": {id: sig}}

What this module must never do: I/O, read a clock, or judge whether a block is acceptable (who may
propose, how many must sign, whether records are legal): that is verify.py's job. Decoding checks
shape only and raises `MalformedBlock` and nothing else, whatever the bytes.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tomq import canonical
from tomq.errors import PeerError
from tomq.identity import SIGNATURE_BYTES, PublicKey, SigningKey, signing_input
from tomq.wire import DEFAULT_MAX_BYTES

BLOCK_VERSION = 1
HASH_BYTES = 32
GENESIS_PREV = bytes(HASH_BYTES)
BLOCK_DOMAIN = b"tomq/block/v1\x00"
COMMIT_DOMAIN = b"tomq/block-commit/v1\x00"
MAX_HEIGHT = 10**12 - 1  # file names carry 12 digits
MAX_INT = 2**63 - 1
MAX_RECORD_BYTES = DEFAULT_MAX_BYTES  # a record is an envelope; receivers refuse bigger ones anyway
MAX_BLOCK_FILE_BYTES = 64 * 1024 * 1024  # bounds what a reader loads before it can judge anything
MAX_SIGNERS = 1024  # far above any Raft group; bounds the work a forged certificate can ask for
MAX_ID_CHARS = 64

_LEAF = b"\x00"
_NODE = b"\x01"
_HEADER_FIELDS = frozenset({"v", "height", "prev", "term", "t", "proposer", "records_root", "record_count"})
_FILE_FIELDS = frozenset({"header", "records", "proposer_sig", "certificate"})
_FILE_NAME = re.compile(r"([0-9]{12})\.block")


class MalformedBlock(PeerError):
    """The bytes are not a well-formed, canonical tomq block file."""


@dataclass(frozen=True, slots=True)
class Block:
    """A block as its header states it; `records_root` and `record_count` are what the header claims,
    which `make_block` computes and verify.py checks against `records`."""

    version: int
    height: int
    prev: bytes
    term: int
    time_ms: int
    proposer: str
    records: tuple[bytes, ...]
    records_root: bytes
    record_count: int
    # The hash, once computed: a node asks for it about eight times per block (signing, certificates,
    # audit lines, the store), each an encoding of the header. Blocks are immutable.
    _hash: bytes | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def hash(self) -> bytes:
        if self._hash is None:
            object.__setattr__(self, "_hash", block_hash(self))
        assert self._hash is not None
        return self._hash


@dataclass(frozen=True, slots=True)
class BlockFile:
    """A block with the signatures that travel with it."""

    block: Block
    proposer_signature: bytes
    commit_certificate: Mapping[str, bytes] = field(default_factory=dict)  # signer id -> signature


def merkle_root(leaves: Sequence[bytes]) -> bytes:
    """Binary Merkle root over `leaves` (the record envelope bytes), RFC 6962 style.

    leaf hash = SHA-256(0x00 || leaf); interior = SHA-256(0x01 || left || right); level by level, an
    odd node at the end of a level is promoted unchanged to the next level; no leaves = SHA-256("").
    This equals RFC 6962's Merkle Tree Hash, so its audit paths can serve a later inclusion proof.
    The prefixes keep a leaf from ever being read as an interior node (second-preimage attacks).
    """
    if not leaves:
        return hashlib.sha256(b"").digest()
    level = [hashlib.sha256(_LEAF + leaf).digest() for leaf in leaves]
    while len(level) > 1:
        paired = [hashlib.sha256(_NODE + level[i] + level[i + 1]).digest() for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            paired.append(level[-1])
        level = paired
    return level[0]


def make_block(*, height: int, prev: bytes, term: int, time_ms: int, proposer: str,
               records: Sequence[bytes]) -> Block:
    """A new block over `records`, with its root and count computed. Raises ValueError on bad arguments."""
    records = tuple(bytes(record) for record in records)
    block = Block(BLOCK_VERSION, height, bytes(prev), term, time_ms, proposer, records, merkle_root(records),
                  len(records))
    problem = _header_problem(header_map(block))
    if problem is not None:
        raise ValueError(f"cannot make block {height}: {problem}")
    for index, record in enumerate(records):
        if not 0 < len(record) <= MAX_RECORD_BYTES:
            raise ValueError(f"cannot make block {height}: record {index} has {len(record)} bytes (1..{MAX_RECORD_BYTES})")
    return block


def header_map(block: Block) -> dict[str, Any]:
    return {
        "v": block.version,
        "height": block.height,
        "prev": block.prev,
        "term": block.term,
        "t": block.time_ms,
        "proposer": block.proposer,
        "records_root": block.records_root,
        "record_count": block.record_count,
    }


def block_hash(block: Block) -> bytes:
    return hashlib.sha256(canonical.encode(header_map(block))).digest()


def sign_block(key: SigningKey, block: Block) -> bytes:
    """The proposer's signature over the block hash."""
    return key.sign(signing_input(BLOCK_DOMAIN, block.hash))


def verify_block_signature(public_key: PublicKey, hash: bytes, signature: bytes) -> bool:
    return public_key.verify(signature, signing_input(BLOCK_DOMAIN, hash))


def commit_signature(key: SigningKey, hash: bytes) -> bytes:
    """A node's statement "I have persisted the block with this hash", for the commit certificate."""
    return key.sign(signing_input(COMMIT_DOMAIN, hash))


def verify_commit_signature(public_key: PublicKey, hash: bytes, signature: bytes) -> bool:
    return public_key.verify(signature, signing_input(COMMIT_DOMAIN, hash))


def block_file_name(height: int) -> str:
    if not 0 <= height <= MAX_HEIGHT:
        raise ValueError(f"height {height} does not fit a block file name")
    return f"{height:012d}.block"


def height_of_file_name(name: str) -> int | None:
    """The height a block file name stands for, or None if `name` is not exactly `<12 digits>.block`."""
    match = _FILE_NAME.fullmatch(name)
    return int(match.group(1)) if match else None


def encode_block_file(block_file: BlockFile) -> bytes:
    block = block_file.block
    return canonical.encode(
        {
            "header": header_map(block),
            "records": list(block.records),
            "proposer_sig": block_file.proposer_signature,
            "certificate": dict(block_file.commit_certificate),
        }
    )


def decode_block_file(data: bytes, *, check_canonical: bool = True) -> BlockFile:
    """Decode a block file; any defect of shape raises MalformedBlock (one line), nothing else does.

    check_canonical=False skips re-encoding to prove the bytes canonical: only for bytes this node
    encoded itself, or when all that is wanted is the height (a non-canonical file is refused by
    whoever checks it: `ChainVerifier`, `tomq ledger verify`)."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise MalformedBlock(f"block file must be bytes, not {type(data).__name__}")
    if len(data) > MAX_BLOCK_FILE_BYTES:
        raise MalformedBlock(f"block file of {len(data)} bytes exceeds {MAX_BLOCK_FILE_BYTES}")
    try:
        raw = canonical.decode(bytes(data), check_canonical=check_canonical)
    except canonical.CanonicalDecodeError as exc:
        raise MalformedBlock(f"block file: {exc}") from None
    if type(raw) is not dict or raw.keys() != _FILE_FIELDS:
        raise MalformedBlock(f"block file must be a map of exactly {', '.join(sorted(_FILE_FIELDS))}")
    header = raw["header"]
    if type(header) is not dict or header.keys() != _HEADER_FIELDS:
        raise MalformedBlock(f"block header must be a map of exactly {', '.join(sorted(_HEADER_FIELDS))}")
    problem = _header_problem(header)
    if problem is not None:
        raise MalformedBlock(f"block header: {problem}")
    records = raw["records"]
    if type(records) is not list:
        raise MalformedBlock("block records must be a list of envelopes")
    for index, record in enumerate(records):
        if type(record) is not bytes or not 0 < len(record) <= MAX_RECORD_BYTES:
            raise MalformedBlock(f"block record {index} must be 1..{MAX_RECORD_BYTES} bytes of envelope")
    signature = raw["proposer_sig"]
    if type(signature) is not bytes or len(signature) != SIGNATURE_BYTES:
        raise MalformedBlock(f"block proposer signature must be {SIGNATURE_BYTES} bytes")
    certificate = raw["certificate"]
    problem = certificate_shape_problem(certificate)
    if problem is not None:
        raise MalformedBlock(problem)
    block = Block(header["v"], header["height"], header["prev"], header["term"], header["t"], header["proposer"],
                  tuple(records), header["records_root"], header["record_count"])
    return BlockFile(block, signature, certificate)


def certificate_shape_problem(certificate: Any) -> str | None:
    """The defect of shape of a commit certificate, or None; judging its signatures is verify.py's job.
    A node checks this before storing a certificate, so every file it writes decodes again."""
    if type(certificate) is not dict or len(certificate) > MAX_SIGNERS:
        return f"block commit certificate must be a map of at most {MAX_SIGNERS} signers"
    for signer, commit in certificate.items():
        if type(signer) is not str or not 0 < len(signer) <= MAX_ID_CHARS or type(commit) is not bytes \
                or len(commit) != SIGNATURE_BYTES:
            return f"block commit certificate must map signer ids to {SIGNATURE_BYTES}-byte signatures"
    return None


def _header_problem(header: dict[str, Any]) -> str | None:
    """The first defect of shape in a header map, or None. Judging the values is verify.py's job."""
    for name in ("v", "height", "term", "t", "record_count"):
        value = header[name]
        if type(value) is not int or not 0 <= value <= MAX_INT:
            return f"{name} must be an integer in 0..2^63-1"
    if header["height"] > MAX_HEIGHT:
        return f"height {header['height']} exceeds {MAX_HEIGHT}"
    for name in ("prev", "records_root"):
        if type(header[name]) is not bytes or len(header[name]) != HASH_BYTES:
            return f"{name} must be a {HASH_BYTES}-byte SHA-256 hash"
    proposer = header["proposer"]
    # Printable: verify.py names the proposer in its refusals, which must stay one line (found by fuzzing).
    if type(proposer) is not str or not 0 < len(proposer) <= MAX_ID_CHARS or not proposer.isprintable():
        return "proposer must be an identity id"
    return None
