"""Offline ledger verification with nothing but the operator public key (`tomq ledger verify`, DESIGN §4).

`verify_ledger(directory, operator)` reads `<height as 12 digits>.block` files in height order from 0
and stops at the first problem with `LedgerInvalid(height, reason)`. For each block, in this order:

1. the file exists (heights are contiguous) and decodes as a block file (block.py);
2. the header: version, the height the file name says, `prev` = hash of the block before, a Raft
   term that never decreases;
3. the proposer signature: the operator for genesis, afterwards a node joined at that height;
4. the commit certificate: valid signatures from a strict majority of the nodes joined at that height
   (genesis: the operator). Signers that are not such a node are ignored, since a certificate may
   carry more signatures than it needs; a signature from such a node that does not verify fails;
5. record_count and records_root against the records;
6. each record in order: the envelope opens (`tomq.wire.EnvelopeOpener`) under a trust store of the
   operator plus every certificate carried as id-proof by the chain's PROV-ID-create records so far,
   with sequence numbers strictly increasing per proposer across the whole chain; the body is a
   well-formed record (`tomq.records.from_map`); an id-proof of a device, node, service or auditor is
   a certificate from this operator for that very name and a matching role; and Table II allows it
   (`pattern.apply`).

"Joined at height h" means joined after applying blocks 0..h-1: membership changes in a block take
effect for the blocks after it. Certificates are checked at the block's own time (`t`), not at the
auditor's wall clock, so a ledger stays verifiable after its members' certificates expire.

`ChainVerifier` is the same check one block at a time, without the disk, for a node that receives
blocks. `verify_path` takes a directory or an audit bundle file (bundle.py). Only `verify_ledger`
(and, through bundle.py, `verify_path`) read files, and nothing here ever writes.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tomq import certificate as certificates
from tomq import records
from tomq.certificate import Certificate, TrustStore
from tomq.errors import ConfigError, EnvelopeRejected, InvalidCertificate, InvalidRecord, PeerError
from tomq.identity import PublicKey
from tomq.node.ledger import pattern
from tomq.node.ledger.block import (
    BLOCK_VERSION,
    GENESIS_PREV,
    MAX_BLOCK_FILE_BYTES,
    MAX_INT,
    MAX_RECORD_BYTES,
    BlockFile,
    MalformedBlock,
    block_file_name,
    decode_block_file,
    height_of_file_name,
    merkle_root,
    verify_block_signature,
    verify_commit_signature,
)
from tomq.node.ledger.pattern import IllegalTransition, PatternState
from tomq.records import ID_CREATE, Identity, Record
from tomq.wire import Envelope, EnvelopeOpener

# The certificate role an IDENTITY kind must be backed by. Containers are absent: their id-proof is
# the hash of the evidence (image digest, spec), and their own service identity joins as a service.
ROLES_FOR_KIND: Mapping[str, tuple[str, ...]] = {
    "device": ("sensor", "actuator"),
    "node": ("node",),
    "service": ("service",),
    "auditor": ("auditor",),
}


class LedgerInvalid(PeerError):
    """A ledger does not verify; `height` is the first block with a problem (None: the directory itself)."""

    def __init__(self, height: int | None, reason: str) -> None:
        where = f" at height {height}" if height is not None else ""
        super().__init__(f"ledger invalid{where}: {reason}")
        self.height = height
        self.reason = reason


@dataclass(frozen=True, slots=True)
class VerifyReport:
    blocks: int
    records: int
    records_by_state: Mapping[str, int]
    head_height: int
    head_hash: bytes
    nodes: tuple[str, ...] = ()  # nodes joined after the head block
    members: int = 0  # identities joined after the head block, nodes included
    data_left: int = 0

    def summary(self) -> str:
        by_state = ", ".join(f"{state} {count}" for state, count in self.records_by_state.items())
        return (f"ledger ok: {self.blocks} blocks (heights 0..{self.head_height}), {self.records} records"
                f" ({by_state}); head {self.head_hash.hex()}; nodes {','.join(self.nodes) or '-'}")


class _ChainTrust(TrustStore):
    """The certificates the chain has carried so far, plus the operator itself as a sender.

    The cluster name is not known before the first certificate arrives (genesis), so it is taken from
    that certificate; every later one must belong to the same cluster (TrustStore.add checks).
    """

    def __init__(self, operator: PublicKey) -> None:
        super().__init__(operator, cluster="")
        # The operator has no certificate of its own; this stand-in lets EnvelopeOpener check the
        # operator's genesis records like any other sender's.
        self.operator_certificate = Certificate(
            cluster="", subject=operator, name=pattern.OPERATOR, role="operator", not_before=0,
            not_after=MAX_INT, publish=(), issuer=operator.id, encoded=b"",
        )

    def by_id(self, identity: str) -> Certificate | None:
        if identity == self.operator.id:
            return self.operator_certificate
        return super().by_id(identity)

    def add(self, data: bytes) -> Certificate:
        if not self.cluster:
            self.cluster = certificates.decode(data, self.operator).cluster
        return super().add(data)

    def checkpoint(self) -> tuple[dict[str, Certificate], dict[str, Certificate], str]:
        return dict(self._by_id), dict(self._by_name), self.cluster

    def restore(self, checkpoint: tuple[dict[str, Certificate], dict[str, Certificate], str]) -> None:
        self._by_id, self._by_name, self.cluster = checkpoint


class _StagedWatermarks:
    """Per-sender sequence high-water marks whose advances within one block can be undone, so a
    block that fails leaves the verifier exactly as it was."""

    def __init__(self) -> None:
        self.committed: dict[str, int] = {}
        self._staged: dict[str, int] = {}

    def get(self, sender: str) -> int:
        if sender in self._staged:
            return self._staged[sender]
        return self.committed.get(sender, 0)

    def advance(self, sender: str, seq: int) -> None:
        self._staged[sender] = seq

    def commit(self) -> None:
        self.committed.update(self._staged)
        self._staged.clear()

    def discard(self) -> None:
        self._staged.clear()


@dataclass(frozen=True, slots=True)
class _Signer:
    name: str
    certificate: Certificate


@dataclass(frozen=True, slots=True)
class Certifiers:
    """Who may certify one block: the nodes joined before it (the operator for genesis), by key id,
    with the certificates the chain itself holds for them, and the block's time they must be valid at."""

    signers: Mapping[str, _Signer]
    electorate: int
    time_ms: int

    @property
    def majority(self) -> int:
        return self.electorate // 2 + 1

    def counts(self, signer_id: str) -> bool:
        """Whether a valid signature of `signer_id` counts towards this block's certificate."""
        signer = self.signers.get(signer_id)
        return signer is not None and signer.certificate.is_valid_at(self.time_ms / 1000)


def certificate_problem(certifiers: Certifiers, digest: bytes, certificate: Mapping[str, bytes], needed: int,
                        verified: Mapping[str, bytes] | None = None) -> str | None:
    """Why `certificate` does not certify the block `digest` (None if it does), as an auditor judges it:
    signatures of others than `certifiers` neither count nor harm; one of theirs that does not verify
    is an error; `needed` must verify. `verified`: signatures the caller has already checked."""
    valid = 0
    for signer_id, signature in sorted(certificate.items()):
        if not certifiers.counts(signer_id):
            continue
        signer = certifiers.signers[signer_id]
        if (verified is None or verified.get(signer_id) != signature) and \
                not verify_commit_signature(signer.certificate.subject, digest, signature):
            return f"commit signature of {signer.name} ({signer_id}) does not verify"
        valid += 1
    if valid < needed:
        return (f"commit certificate has {valid} valid signature(s) of the {certifiers.electorate} node(s) "
                f"joined at this height; a majority needs {needed}")
    return None


@dataclass
class ChainVerifier:
    """Checks blocks one height at a time, from genesis.

    `add` is all or nothing: a block that fails changes nothing. The failure is nevertheless sticky
    (every later `add` raises it again), because for an auditor the first problem is the answer and
    what follows a bad block cannot be judged. A node that must skip a committed block that every
    node refuses alike calls `reset_failure()` and goes on from the block before it.
    """

    operator: PublicKey
    state: PatternState = field(default_factory=PatternState)
    height: int = -1  # of the last block that verified
    head_hash: bytes = GENESIS_PREV
    term: int = 0
    records_by_state: Counter[str] = field(default_factory=Counter)
    _failed: LedgerInvalid | None = None

    def __post_init__(self) -> None:
        self.trust = _ChainTrust(self.operator)
        # One opener for the whole chain: its watermarks make sequence numbers strictly increasing
        # per proposer across blocks, so a record cannot be replayed in a later block either.
        self.watermarks = _StagedWatermarks()
        self.opener = EnvelopeOpener(self.trust, self.watermarks, max_bytes=MAX_RECORD_BYTES,
                                     accepted_types=frozenset({"record"}))
        # Envelopes the caller already opened, by their bytes (a ledger leader, at proposal time): their
        # decoding and signature are not checked again. Offline verification leaves this empty.
        self.checked_envelopes: dict[bytes, Envelope] = {}
        self._trust_checkpoint: tuple[dict[str, Certificate], dict[str, Certificate], str] | None = None
        self._nodes_cache: tuple[str, ...] | None = None
        # The records of the block the last successful `add` checked, with their signers' names.
        self.last_records: list[tuple[Record, str]] = []
        self.last_envelopes: list[Envelope] = []  # the same records' envelopes, opened
        self.last_certifiers: Certifiers | None = None  # who may certify the block `add` last checked

    def add(self, height: int, data: bytes, *, require_certificate: bool = True,
            decoded: BlockFile | None = None, signed_here: bool = False) -> BlockFile:
        """Check the block file `data` found at `height`; return it decoded, or raise LedgerInvalid.

        With require_certificate=False the commit certificate is not checked (a node checks a block
        before it is certified); everything else is. `decoded`: what `decode_block_file(data)` has
        just returned to the caller (a node reads the height first), so it is not decoded twice.
        `signed_here`: `decoded` is the block this process made and signed (a leader applying its own
        block): the proposer's signature is ours and is not checked again; everything else is.
        """
        if self._failed is not None:
            raise self._failed
        self._trust_checkpoint = None
        try:
            block_file = self._add(height, data, require_certificate, decoded, signed_here)
        except LedgerInvalid as exc:
            self.watermarks.discard()
            if self._trust_checkpoint is not None:
                self.trust.restore(self._trust_checkpoint)
            self._failed = exc
            raise
        finally:
            self._trust_checkpoint = None
        self.watermarks.commit()
        return block_file

    def reset_failure(self) -> ChainVerifier:
        """Accept blocks again after a failure, from the last block that verified (see the class)."""
        self._failed = None
        return self

    def high_water(self, sender: str) -> int:
        """The highest record sequence number of `sender` (an identity id) in the verified chain."""
        return self.watermarks.committed.get(sender, 0)

    def report(self) -> VerifyReport:
        nodes = self._joined_nodes()
        return VerifyReport(
            blocks=self.height + 1,
            records=sum(self.records_by_state.values()),
            records_by_state={state: self.records_by_state[state] for state in records.RECORD_STATES},
            head_height=self.height,
            head_hash=self.head_hash,
            nodes=nodes,
            members=len(self.state.members()),
            data_left=len(self.state.left_data()),
        )

    def _add(self, height: int, data: bytes, require_certificate: bool, decoded: BlockFile | None,
             signed_here: bool) -> BlockFile:
        def fail(reason: str) -> LedgerInvalid:
            return LedgerInvalid(height, reason)

        if height != self.height + 1:
            raise fail(f"blocks must be checked in order; expected height {self.height + 1}")
        try:
            block_file = decoded if decoded is not None else decode_block_file(data)
        except MalformedBlock as exc:
            raise fail(str(exc)) from None
        block = block_file.block
        if block.version != BLOCK_VERSION:
            raise fail(f"block version {block.version} is not {BLOCK_VERSION}")
        if block.height != height:
            raise fail(f"file {block_file_name(height)} holds block {block.height}")
        if block.prev != self.head_hash:
            raise fail(f"prev {block.prev.hex()[:16]}… is not the hash of block {height - 1} ({self.head_hash.hex()[:16]}…)"
                       if height else "genesis prev must be 32 zero bytes")
        if block.term < self.term:
            raise fail(f"Raft term {block.term} is below the previous block's term {self.term}")
        digest = block.hash
        now = block.time_ms / 1000
        joined_nodes = self._joined_nodes()
        signers = self._signers(height, joined_nodes)

        proposer = signers.get(block.proposer)
        if proposer is None:
            if height == 0:
                raise fail(f"genesis must be proposed by the operator {self.operator.id}, not {block.proposer}")
            raise fail(f"proposer {block.proposer} is not a node joined at this height ({', '.join(joined_nodes) or 'none'})")
        if not proposer.certificate.is_valid_at(now):
            raise fail(f"certificate of proposer {proposer.name} is not valid at the block's time ({block.time_ms} ms)")
        if not (signed_here and decoded is not None) and \
                not verify_block_signature(proposer.certificate.subject, digest, block_file.proposer_signature):
            raise fail(f"proposer signature of {proposer.name} ({block.proposer}) does not verify")

        certifiers = Certifiers(signers, 1 if height == 0 else len(joined_nodes), block.time_ms)
        problem = certificate_problem(certifiers, digest, block_file.commit_certificate,
                                      certifiers.majority if require_certificate else 0)
        if problem is not None:
            raise fail(problem)

        if block.record_count != len(block.records):
            raise fail(f"header counts {block.record_count} records, the block holds {len(block.records)}")
        if merkle_root(block.records) != block.records_root:
            raise fail("records_root does not match the records (a record was changed, added, removed or reordered)")

        state = self.state
        counts: Counter[str] = Counter()
        changed_identities: list[Identity] = []
        applied: list[tuple[Record, str]] = []
        opened: list[Envelope] = []
        for index, envelope_bytes in enumerate(block.records):
            state = self._apply_record(height, index, envelope_bytes, now, state, counts, changed_identities, applied,
                                       opened)
        self.last_records = applied  # what the block's records said and who signed each: for the caller
        self.last_envelopes = opened
        self.last_certifiers = certifiers
        if any(identity.kind == "node" for identity in changed_identities):
            self._nodes_cache = None
        self.state = state
        self.records_by_state.update(counts)
        self.height = height
        self.head_hash = digest
        self.term = block.term
        return block_file

    def _joined_nodes(self) -> tuple[str, ...]:
        # Listing members walks every identity the chain has seen; node sets change rarely, devices
        # often, so remember the list until a node's join or leave is applied.
        if self._nodes_cache is None:
            self._nodes_cache = tuple(self.state.members("node"))
        return self._nodes_cache

    def _signers(self, height: int, joined_nodes: tuple[str, ...]) -> dict[str, _Signer]:
        """Who may propose and certify block `height`, by id: the operator for genesis, else the joined nodes."""
        if height == 0:
            return {self.operator.id: _Signer(pattern.OPERATOR, self.trust.operator_certificate)}
        signers: dict[str, _Signer] = {}
        for name in joined_nodes:
            cert = self.trust.by_name(name)
            if cert is not None:  # always found: a node's join carried its certificate
                signers[cert.subject_id] = _Signer(name, cert)
        return signers

    def _apply_record(self, height: int, index: int, envelope_bytes: bytes, now: float, state: PatternState,
                      counts: Counter[str], changed_identities: list[Identity],
                      applied: list[tuple[Record, str]], opened: list[Envelope]) -> PatternState:
        def fail(reason: str) -> LedgerInvalid:
            return LedgerInvalid(height, f"record {index}: {reason}")

        try:
            envelope = self.opener.open(envelope_bytes, now, opened=self.checked_envelopes.get(envelope_bytes))
        except EnvelopeRejected as exc:
            raise fail(str(exc)) from None
        sender = self.trust.by_id(envelope.sender)
        assert sender is not None  # the opener has just found its certificate
        try:
            record = records.from_map(envelope.body)
        except InvalidRecord as exc:
            raise fail(f"from {sender.name}: {exc}") from None
        proof = None
        if record.state == ID_CREATE:
            assert isinstance(record.structure, Identity)
            proof = self._identity_proof(record.structure, now, fail)
        try:
            state = pattern.apply(state, record, sender.name)
        except IllegalTransition as exc:
            raise fail(f"from {sender.name}: {exc}") from None
        if proof is not None:
            if self._trust_checkpoint is None:
                self._trust_checkpoint = self.trust.checkpoint()
            try:
                self.trust.add(proof)
            except InvalidCertificate as exc:
                raise fail(str(exc)) from None
        counts[record.state] += 1
        if isinstance(record.structure, Identity):
            changed_identities.append(record.structure)
        applied.append((record, sender.name))
        opened.append(envelope)
        return state

    def _identity_proof(self, identity: Identity, now: float, fail: Callable[[str], LedgerInvalid]) -> bytes | None:
        """The certificate bytes to trust once the record is applied, or None for a container."""
        roles = ROLES_FOR_KIND.get(identity.kind)
        if roles is None:
            return None
        try:
            cert = certificates.decode(identity.proof, self.operator)
        except InvalidCertificate as exc:
            raise fail(f"id-proof of {identity.object} is not a certificate from the operator: {exc}") from None
        if cert.name != identity.object:
            raise fail(f"id-proof of {identity.object} certifies {cert.name}")
        if cert.role not in roles:
            raise fail(f"id-proof of {identity.object} certifies a {cert.role}, not a {identity.kind}")
        if self.trust.cluster and cert.cluster != self.trust.cluster:
            raise fail(f"id-proof of {identity.object} belongs to cluster {cert.cluster!r}, not {self.trust.cluster!r}")
        if not cert.is_valid_at(now):
            raise fail(f"certificate of {identity.object} is not valid at the block's time")
        return identity.proof


def verify_ledger(directory: str | os.PathLike[str], operator: PublicKey) -> VerifyReport:
    """Verify every block file in `directory` from genesis; LedgerInvalid names the first problem."""
    root = Path(directory)
    try:
        names = os.listdir(root)
    except OSError as exc:
        raise ConfigError(f"cannot read ledger directory {root}: {exc.strerror}") from None
    files: dict[int, str] = {}
    for name in sorted(names):
        # Dot files are writers' temporaries (shared_dir.py) and editors' droppings; other names are
        # the blob store and notes. Only something that claims to be a block must be one.
        if name.startswith(".") or not name.endswith(".block"):
            continue
        height = height_of_file_name(name)
        if height is None:
            raise LedgerInvalid(None, f"{name} is not named <height as 12 digits>.block")
        files[height] = name
    if not files:
        raise LedgerInvalid(0, f"no genesis block ({block_file_name(0)}) in {root}")
    verifier = ChainVerifier(operator)
    top = max(files)
    for height in range(top + 1):
        if height not in files:
            raise LedgerInvalid(height, f"block file {block_file_name(height)} is missing (blocks up to {top} exist)")
        verifier.add(height, _read_block_file(root / files[height], height))
    return verifier.report()


def _read_block_file(path: Path, height: int) -> bytes:
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_BLOCK_FILE_BYTES + 1)
    except OSError as exc:
        raise LedgerInvalid(height, f"cannot read {path.name}: {exc.strerror}") from None
    if len(data) > MAX_BLOCK_FILE_BYTES:
        raise LedgerInvalid(height, f"{path.name} exceeds {MAX_BLOCK_FILE_BYTES} bytes")
    return data


def verify_path(path: str | os.PathLike[str], operator: PublicKey) -> VerifyReport:
    """`verify_ledger` for a ledger directory; for a file, the audit bundle it holds (bundle.py), from genesis."""
    if Path(path).is_file():
        from tomq.node.ledger.bundle import verify_bundle  # bundle.py builds on this module

        return verify_bundle(path, operator)[0]
    return verify_ledger(path, operator)
