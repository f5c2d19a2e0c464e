"""What the auditor's tools read: a ledger directory or an audit bundle, block by block, and the bundle itself.

A **ledger source** is where block files come from: a ledger directory (`<height>.block` files, as
verify.py reads them) or an **audit bundle**, one file that carries a ledger to a machine that has
never seen the cluster. `open_source(path)` picks by what the path is.

Bundle file (canonical CBOR map):
    format    "tomq-ledger-bundle"
    v         1
    operator  identity id of the operator whose ledger it is (checked against --operator-key, so a
              wrong key gets a plain message; never trusted: the key the auditor brings is the root)
    from, to  the heights the bundle was made for (`from` is a label, not evidence: nothing signs it,
              and verification covers every block from genesis whatever it says)
    blocks    [block file bytes of heights 0..to, byte for byte as in the ledger directory]

A bundle for `--from H` still carries the blocks below H in full. A block header does not commit to
the node set, and only the identity records show who was a node when; a bundle that left out early
blocks (or pruned their records down to Merkle leaves) could hide a node's join, and a minority of
the real nodes would then pass for a majority of the ones the auditor knows of. So a bundle proves
exactly what `tomq ledger verify` proves of a directory, from genesis; `from` only names the range
that is being audited (what `export` of the bundle covers unless told otherwise).

`LedgerReader` walks a source and yields each block with its records decoded and their proposers
named. With the operator key it runs `ChainVerifier` from genesis (everything `tomq ledger verify`
checks) and refuses a ledger that does not verify. Without the key it checks only what needs no
key (block shape, heights, hash links, record counts and Merkle roots), decodes the records without
checking a signature, names senders from the certificates the chain carries, and says so
(`verified` is False): tools print that the output is unverified.

What this module must never do: write anything but the bundle file it is asked for (atomically,
never over an existing file), or present records from a ledger that failed a check as if they passed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tomq import canonical, records
from tomq.errors import ConfigError, InvalidRecord
from tomq.identity import PUBLIC_KEY_BYTES, PublicKey, identity_id
from tomq.node.ledger import pattern
from tomq.node.ledger.block import (
    GENESIS_PREV,
    MAX_BLOCK_FILE_BYTES,
    BlockFile,
    MalformedBlock,
    block_file_name,
    decode_block_file,
    height_of_file_name,
    merkle_root,
)
from tomq.node.ledger.verify import ROLES_FOR_KIND, ChainVerifier, LedgerInvalid, VerifyReport
from tomq.records import ID_CREATE, Identity, Record

BUNDLE_FORMAT = "tomq-ledger-bundle"
BUNDLE_VERSION = 1
MAX_BUNDLE_BYTES = 8 * 1024**3  # bounds what a reader loads before it can judge anything
_BUNDLE_FIELDS = frozenset({"format", "v", "operator", "from", "to", "blocks"})


class LedgerSource(Protocol):
    """Block files by height, 0..top, wherever they are kept."""

    description: str
    top: int  # the highest height present (every height below it must be there too)

    def read(self, height: int) -> bytes:
        """The block file at `height`, or LedgerInvalid naming why it cannot be had."""
        ...


class DirectorySource:
    """A ledger directory: `<height as 12 digits>.block` files; other names are ignored as verify.py does."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.description = str(self.directory)
        try:
            names = os.listdir(self.directory)
        except OSError as exc:
            raise ConfigError(f"cannot read ledger directory {self.directory}: {exc.strerror}") from None
        self.files: dict[int, str] = {}
        for name in sorted(names):
            if name.startswith(".") or not name.endswith(".block"):
                continue
            height = height_of_file_name(name)
            if height is None:
                raise LedgerInvalid(None, f"{name} is not named <height as 12 digits>.block")
            self.files[height] = name
        if not self.files:
            raise LedgerInvalid(0, f"no genesis block ({block_file_name(0)}) in {self.directory}")
        self.top = max(self.files)

    def read(self, height: int) -> bytes:
        name = self.files.get(height)
        if name is None:
            raise LedgerInvalid(height, f"block file {block_file_name(height)} is missing (blocks up to {self.top} exist)")
        try:
            with open(self.directory / name, "rb") as handle:
                data = handle.read(MAX_BLOCK_FILE_BYTES + 1)
        except OSError as exc:
            raise LedgerInvalid(height, f"cannot read {name}: {exc.strerror}") from None
        if len(data) > MAX_BLOCK_FILE_BYTES:
            raise LedgerInvalid(height, f"{name} exceeds {MAX_BLOCK_FILE_BYTES} bytes")
        return data


@dataclass(frozen=True, slots=True)
class Bundle:
    operator_id: str
    first: int  # "from": the first height of the audited range
    last: int  # "to": the last height, also the last block carried
    blocks: tuple[bytes, ...]  # heights 0..last


class BundleSource:
    """An audit bundle file, decoded once; its blocks are checked as they are read, like a directory's."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.description = f"bundle {self.path}"
        try:
            size = self.path.stat().st_size
            if size > MAX_BUNDLE_BYTES:
                raise LedgerInvalid(None, f"bundle {self.path} has {size} bytes, more than {MAX_BUNDLE_BYTES}")
            data = self.path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read bundle {self.path}: {exc.strerror}") from None
        self.bundle = decode_bundle(data)
        self.top = self.bundle.last

    def read(self, height: int) -> bytes:
        if not 0 <= height <= self.top:
            raise LedgerInvalid(height, f"the bundle holds heights 0..{self.top} only")
        return self.bundle.blocks[height]


def open_source(path: str | os.PathLike[str]) -> DirectorySource | BundleSource:
    """A directory is a ledger directory; a file is an audit bundle."""
    target = Path(path)
    if target.is_dir():
        return DirectorySource(target)
    if target.is_file():
        return BundleSource(target)
    raise ConfigError(f"{target} is neither a ledger directory nor an audit bundle file")


def encode_bundle(bundle: Bundle) -> bytes:
    return canonical.encode({"format": BUNDLE_FORMAT, "v": BUNDLE_VERSION, "operator": bundle.operator_id,
                             "from": bundle.first, "to": bundle.last, "blocks": list(bundle.blocks)})


def decode_bundle(data: bytes) -> Bundle:
    """The bundle in `data`, its shape checked (the blocks are judged by whoever reads them)."""
    try:
        raw = canonical.decode(data)
    except canonical.CanonicalDecodeError as exc:
        raise LedgerInvalid(None, f"not an audit bundle: {exc}") from None
    if type(raw) is not dict or raw.keys() != _BUNDLE_FIELDS or raw["format"] != BUNDLE_FORMAT:
        raise LedgerInvalid(None, f"not an audit bundle: expected a {BUNDLE_FORMAT} map of exactly "
                                  f"{', '.join(sorted(_BUNDLE_FIELDS))}")
    if type(raw["v"]) is not int or raw["v"] != BUNDLE_VERSION:  # not True or 1.0
        raise LedgerInvalid(None, f"audit bundle version {raw['v']!r} is not {BUNDLE_VERSION}")
    first, last, blocks, operator = raw["from"], raw["to"], raw["blocks"], raw["operator"]
    if type(first) is not int or type(last) is not int or not 0 <= first <= last:
        raise LedgerInvalid(None, "audit bundle range must be heights 0 <= from <= to")
    if type(blocks) is not list or len(blocks) != last + 1 or not all(type(b) is bytes for b in blocks):
        raise LedgerInvalid(None, f"audit bundle for heights up to {last} must carry {last + 1} block files "
                                  "(every height from genesis)")
    # Printable: the id is quoted in refusals, which must stay one line (fuzzing found a newline in one).
    if type(operator) is not str or not 0 < len(operator) <= 64 or not operator.isprintable():
        raise LedgerInvalid(None, "audit bundle operator must be an identity id")
    return Bundle(operator, first, last, tuple(blocks))


def write_bundle(source: LedgerSource, out: str | os.PathLike[str], first: int, last: int | None,
                 operator: PublicKey | None = None) -> Bundle:
    """Write the bundle for heights first..last (default: the head) of `source` to `out`.

    With `operator`, blocks 0..last are verified first and a ledger that does not verify is refused.
    Without it, the operator id is read from genesis (its proposer). `out` must not exist.
    """
    last = source.top if last is None else last
    if not 0 <= first <= last:
        raise ConfigError(f"--from {first} --to {last}: need 0 <= from <= to")
    if last > source.top:
        raise ConfigError(f"--to {last} is above the head of {source.description} (height {source.top})")
    target = Path(out)
    if target.exists():
        raise ConfigError(f"{target} exists; a bundle is never written over a file")
    reader = LedgerReader(source, operator)
    blocks: list[bytes] = []
    for block in reader.blocks(0, last):
        blocks.append(source.read(block.height))
    assert reader.operator_id is not None  # read from genesis, which every walk starts with
    bundle = Bundle(reader.operator_id, first, last, tuple(blocks))
    data = encode_bundle(bundle)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "xb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.link(temporary, target)  # fails if `out` appeared meanwhile: never replace a file
    except FileExistsError:
        raise ConfigError(f"{target} exists; a bundle is never written over a file") from None
    except OSError as exc:
        raise ConfigError(f"cannot write bundle {target}: {exc.strerror}") from None
    finally:
        temporary.unlink(missing_ok=True)
    return bundle


def verify_bundle(path: str | os.PathLike[str], operator: PublicKey) -> tuple[VerifyReport, Bundle]:
    """Verify every block of a bundle from genesis, exactly as `verify_ledger` does a directory."""
    source = BundleSource(path)
    bundle = source.bundle
    if bundle.operator_id != operator.id:
        raise LedgerInvalid(0, f"the bundle is the ledger of operator {bundle.operator_id}; the key given is "
                               f"operator {operator.id}")
    verifier = ChainVerifier(operator)
    for height in range(bundle.last + 1):
        verifier.add(height, bundle.blocks[height])
    return verifier.report(), bundle


# --- Reading records -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """One record where the ledger holds it, with who proposed it."""

    height: int
    index: int  # position in the block
    block_hash: bytes
    block_time_ms: int
    envelope: bytes  # the record envelope, byte for byte (its Merkle leaf)
    envelope_time_ms: int  # when the proposer sealed it (the proposer's clock)
    sender_id: str
    sender: str  # the proposer's certificate name, pattern.OPERATOR, or (unverified, unknown) its id
    record: Record
    record_id: str  # Record.record_id, computed once

    @property
    def where(self) -> str:
        return f"{self.height}/{self.index}"


@dataclass(frozen=True, slots=True)
class LedgerBlock:
    height: int
    hash: bytes
    block_file: BlockFile
    entries: tuple[LedgerEntry, ...]


class LedgerReader:
    """Walks a source from genesis (see the module docstring for what is checked in either mode)."""

    def __init__(self, source: LedgerSource, operator: PublicKey | None) -> None:
        self.source = source
        self.operator = operator
        self.verified = operator is not None
        self.operator_id: str | None = operator.id if operator is not None else None
        self.cluster: str | None = None
        self.head_height = -1
        self.head_hash = GENESIS_PREV

    def blocks(self, first: int = 0, last: int | None = None) -> Iterator[LedgerBlock]:
        """Blocks first..last (default: to the head), read and checked from genesis on."""
        last = self.source.top if last is None else last
        if first < 0 or last > self.source.top or first > last:
            raise ConfigError(f"heights {first}..{last} are not within {self.source.description} "
                              f"(heights 0..{self.source.top})")
        walk = self._verified if self.operator is not None else self._unverified
        for block in walk(last):
            self.head_height, self.head_hash = block.height, block.hash
            if block.height >= first:
                yield block

    def entries(self, first: int = 0, last: int | None = None) -> Iterator[LedgerEntry]:
        for block in self.blocks(first, last):
            yield from block.entries

    def _verified(self, last: int) -> Iterator[LedgerBlock]:
        assert self.operator is not None
        verifier = ChainVerifier(self.operator)
        for height in range(last + 1):
            block_file = verifier.add(height, self.source.read(height))
            self.cluster = verifier.trust.cluster or self.cluster
            block = block_file.block
            entries = []
            for index, (envelope, (record, sender)) in enumerate(zip(block.records, verifier.last_records,
                                                                     strict=True)):
                fields = _envelope_fields(envelope, height, index)
                entries.append(LedgerEntry(height, index, verifier.head_hash, block.time_ms, envelope, fields["t"],
                                           fields["from"], sender, record, record.record_id))
            yield LedgerBlock(height, verifier.head_hash, block_file, tuple(entries))

    def _unverified(self, last: int) -> Iterator[LedgerBlock]:
        names: dict[str, str] = {}  # identity id -> certificate name, from the certificates the chain carries
        prev = GENESIS_PREV
        for height in range(last + 1):
            try:
                block_file = decode_block_file(self.source.read(height))
            except MalformedBlock as exc:
                raise LedgerInvalid(height, str(exc)) from None
            block = block_file.block
            if block.height != height:
                raise LedgerInvalid(height, f"file {block_file_name(height)} holds block {block.height}")
            if block.prev != prev:
                raise LedgerInvalid(height, f"prev {block.prev.hex()[:16]}… is not the hash of block {height - 1}"
                                    if height else "genesis prev must be 32 zero bytes")
            if block.record_count != len(block.records) or merkle_root(block.records) != block.records_root:
                raise LedgerInvalid(height, "records_root or record_count does not match the records")
            if height == 0:
                self.operator_id = block.proposer
                names[block.proposer] = pattern.OPERATOR
            digest = block.hash
            entries = []
            for index, envelope in enumerate(block.records):
                fields = _envelope_fields(envelope, height, index)
                try:
                    record = records.from_map(fields["body"])
                except InvalidRecord as exc:
                    raise LedgerInvalid(height, f"record {index}: {exc}") from None
                structure = record.structure
                if record.state == ID_CREATE and isinstance(structure, Identity) and structure.kind in ROLES_FOR_KIND:
                    subject = certificate_subject(structure.proof)
                    if subject is not None:
                        names[subject[0]] = structure.object
                        self.cluster = self.cluster or subject[1]
                sender = fields["from"]
                entries.append(LedgerEntry(height, index, digest, block.time_ms, envelope, fields["t"], sender,
                                           names.get(sender, sender), record, record.record_id))
            prev = digest
            yield LedgerBlock(height, digest, block_file, tuple(entries))


def _envelope_fields(envelope: bytes, height: int, index: int) -> dict[str, Any]:
    """The signed fields of a record envelope, read without checking its signature."""
    try:
        outer = canonical.decode(envelope, check_canonical=False)
        if type(outer) is not list or len(outer) != 2 or type(outer[0]) is not bytes:
            raise LedgerInvalid(height, f"record {index} is not a signed envelope")
        fields = canonical.decode(outer[0], check_canonical=False)
    except canonical.CanonicalDecodeError as exc:
        raise LedgerInvalid(height, f"record {index} is not a signed envelope: {exc}") from None
    if (type(fields) is not dict or type(fields.get("from")) is not str or type(fields.get("t")) is not int
            or fields.get("type") != "record" or "body" not in fields):  # no body: KeyError later (fuzzing)
        raise LedgerInvalid(height, f"record {index} is not a record envelope")
    return fields


def certificate_subject(encoded: bytes) -> tuple[str, str] | None:
    """(identity id, cluster) a certificate names, read without checking the operator's signature."""
    try:
        outer = canonical.decode(encoded, check_canonical=False)
        fields = canonical.decode(outer[0], check_canonical=False)
        subject, cluster = fields["subject"], fields["cluster"]
    except (canonical.CanonicalDecodeError, TypeError, KeyError, IndexError):
        return None
    if type(subject) is not bytes or len(subject) != PUBLIC_KEY_BYTES or type(cluster) is not str:
        return None
    return identity_id(subject), cluster
