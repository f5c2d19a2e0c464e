"""Actuator commands: what the cluster sends on `dev/<actuator>/cmd`, and how an actuator checks it.

An actuator acts only on what the ledger holds. A command is a node-signed envelope (QoS 1, not
retained) that carries its own proof: the committed block's header, the commit certificate over its
hash, the certificates of the nodes that signed (the actuator knows nothing but the operator's key),
and the PROV-ORCH record that authorises the command with its Merkle path to the header:

    seal(node_key, seq, time_ms, type="command", body={
        "actuator":    <the actuator's name>,
        "header":      block.header_map(block),          hashed here to the block hash
        "record":      <the block's record envelope at index, byte for byte>,
        "index":       <its position in the block>,
        "path":        proof.inclusion_path(block.records, index),
        "certificate": {signer id: commit signature},     the block's commit certificate
        "signers":     [certificate bytes, ...],          the sender's and every commit signer's
    })

The record is a proposer-signed `seal(..., type="record", body=Record.to_map())` of
`Record(PROV-ORCH, Orchestrate(deployed=<command id>, location=<actuator>, action="command",
reason={"setting": {...}, "rule": <contract>, "trigger": <record id>}))`. The record's own signature
is not checked here: the majority that certified the block checked it before signing.

`CommandChecker.check` runs the checks below in this order and raises one `CommandRejected` subclass
(or, from the envelope layer, one `tomq.errors.EnvelopeRejected` subclass) per failure, with a
one-line message, and nothing else whatever the bytes:

1. the envelope: bytes, size, canonical shape, type "command"; every certificate in "signers" is the
   operator's for this cluster; the sender is one of them, a node, valid now; its signature verifies;
2. the body's shape, addressed to this actuator;
3. the header's shape, hashed to the block hash;
4. the commit certificate: at least `quorum` distinct nodes (by certificate name, among "signers",
   valid now) whose commit signatures over the block hash verify; a signature from such a node that
   does not verify is forged and refuses the command, signers without a certificate are ignored;
5. the Merkle path from the record to the header's records_root, with its record_count;
6. the record: a PROV-ORCH "command" record for this actuator with a "setting" map in its reason;
7. its time: no older than `max_age_s`, no further ahead than `max_skew_s`, relative to `now`;
8. replay: its (height, index) must be above the last accepted one. The checker keeps that mark, in a
   file if given one (written before `check` returns), so a restarted actuator still refuses old
   commands. A command that passed every check is consumed even if the device then refuses its
   setting: sending it again would get the same answer.

What this module must never do: read a clock (`now` is passed in), touch the network, or act.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from tomq import canonical, records
from tomq.certificate import Certificate, TrustStore
from tomq.cluster import Cluster
from tomq.durable import replace_file
from tomq.errors import (
    BadSignature,
    BodyTooLarge,
    CertificateExpired,
    ConfigError,
    EnvelopeRejected,
    InvalidCertificate,
    InvalidRecord,
    MalformedEnvelope,
    ReplayedEnvelope,
    UnknownEnvelopeType,
    UnknownSender,
    UnsupportedVersion,
)
from tomq.identity import SIGNATURE_BYTES, PublicKey, SigningKey
from tomq.node.ledger import block as blocks
from tomq.node.ledger.block import BlockFile
from tomq.node.ledger.proof import inclusion_path, root_from_path
from tomq.records import ORCH, Orchestrate, Record
from tomq.wire import EnvelopeOpener, MemoryWatermarks, seal

COMMAND_TYPE = "command"
COMMAND_ACTION = "command"  # the Orchestrate action of the authorising record
MAX_COMMAND_BYTES = 256 * 1024  # a record may be a whole 64 KiB envelope, plus certificates and path
MAX_SIGNER_CERTIFICATES = 64  # far above any Raft group; bounds the signature checks one command costs
MAX_PATH_STEPS = 64  # a tree of 2^63 leaves has a path of 63
DEFAULT_MAX_AGE_S = 30.0
DEFAULT_MAX_SKEW_S = 5.0
_BODY_FIELDS = frozenset({"actuator", "header", "record", "index", "path", "certificate", "signers"})
_HEADER_FIELDS = frozenset({"v", "height", "prev", "term", "t", "proposer", "records_root", "record_count"})


class CommandRejected(EnvelopeRejected):
    """Base of every reason an actuator refuses a command; `reason` is a short, stable key for counting."""

    reason: ClassVar[str] = "refused"


class MalformedCommand(CommandRejected):
    reason = "malformed"


class UncertifiedSender(CommandRejected):
    """The sender is not a node certified by this cluster's operator, or a signer certificate is bad."""

    reason = "uncertified-sender"


class WrongActuator(CommandRejected):
    """The command, or the record authorising it, is for another actuator."""

    reason = "other-actuator"


class BelowQuorum(CommandRejected):
    """Fewer than a majority of the cluster's nodes have certified the block."""

    reason = "below-quorum"


class ForgedCommitSignature(CommandRejected):
    """A certified node's commit signature does not verify over the block's hash."""

    reason = "forged-commit-signature"


class RecordNotInBlock(CommandRejected):
    """The Merkle path does not lead from the record to the header's records_root."""

    reason = "not-in-block"


class NotACommand(CommandRejected):
    """The record in the block is not a PROV-ORCH command record carrying a setting."""

    reason = "not-a-command"


class StaleCommand(CommandRejected):
    """The authorising record is too old (or dated in the future) to act on now."""

    reason = "stale"


class ReplayedCommand(CommandRejected):
    """The command's (height, index) is not above the last one this actuator accepted."""

    reason = "replayed"


# The envelope layer's own errors (tomq.wire), mapped onto the same reason keys.
_ENVELOPE_REASONS: tuple[tuple[type[EnvelopeRejected], str], ...] = (
    (BadSignature, "bad-signature"),
    (UnknownSender, "uncertified-sender"),
    (CertificateExpired, "uncertified-sender"),
    (ReplayedEnvelope, "replayed"),
    (MalformedEnvelope, "malformed"),
    (BodyTooLarge, "malformed"),
    (UnsupportedVersion, "malformed"),
    (UnknownEnvelopeType, "malformed"),
)


def refusal_reason(error: EnvelopeRejected) -> str:
    """The short key an actuator counts a refusal under."""
    if isinstance(error, CommandRejected):
        return error.reason
    for kind, reason in _ENVELOPE_REASONS:
        if isinstance(error, kind):
            return reason
    return "refused"


@dataclass(frozen=True, slots=True)
class Command:
    """A command that passed every check: what to do, and the ledger entry that says so."""

    command_id: str  # the record's Orchestrate.deployed
    setting: dict[str, Any]
    height: int
    index: int
    block_hash: bytes
    record_time_ms: int
    sender: str  # the sending node's certificate name
    rule: str | None = None  # the contract that fired, when the record names it
    trigger: str | None = None  # the record (datum) that fired it
    reason: dict[str, Any] = field(default_factory=dict)  # the record's whole reason


def command_record(*, command_id: str, actuator: str, setting: Mapping[str, Any], rule: str, trigger: str,
                   time_ms: int) -> Record:
    """The PROV-ORCH record that authorises `setting` on `actuator`."""
    return Record(ORCH, Orchestrate(deployed=command_id, location=actuator, action=COMMAND_ACTION,
                                    reason={"setting": dict(setting), "rule": rule, "trigger": trigger}),
                  time_ms)


def build_command(key: SigningKey, *, seq: int, time_ms: int, actuator: str, block_file: BlockFile,
                  record_index: int, signer_certificates: Sequence[bytes]) -> bytes:
    """The command envelope a node publishes on dev/<actuator>/cmd (QoS 1, not retained).

    Only for a block that is committed and certified: the actuator refuses anything else. Raises
    ValueError on an index outside the block or a command too large to send.
    """
    block = block_file.block
    if not 0 <= record_index < len(block.records):
        raise ValueError(f"block {block.height} has no record {record_index} ({len(block.records)} records)")
    body = {
        "actuator": actuator,
        "header": blocks.header_map(block),
        "record": block.records[record_index],
        "index": record_index,
        "path": inclusion_path(block.records, record_index),
        "certificate": dict(block_file.commit_certificate),
        "signers": [bytes(certificate) for certificate in signer_certificates],
    }
    wire = seal(key, seq=seq, time_ms=time_ms, type=COMMAND_TYPE, body=body)
    if len(wire) > MAX_COMMAND_BYTES:
        raise ValueError(f"command for {actuator} is {len(wire)} bytes, above {MAX_COMMAND_BYTES}")
    return wire


def quorum_from_cluster(cluster: Cluster) -> int:
    """How many commit signers make a majority of the nodes listed in cluster.toml."""
    nodes = sum(1 for member in cluster.members if member.role == "node")
    if nodes == 0:
        raise ConfigError(f"cluster {cluster.name} ({cluster.directory}) lists no nodes; no block can be certified")
    return nodes // 2 + 1


class CommandMark:
    """The (height, index) of the last accepted command; in a file when given a path.

    The file holds one line "<height> <index>", replaced atomically (tomq.durable) before the command
    is acted on, so a crash never lets an accepted command be accepted again.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.mark: tuple[int, int] | None = None
        if self.path is not None and self.path.exists():
            parts = self.path.read_text().split()
            if len(parts) != 2 or not all(part.isdigit() for part in parts):
                raise ConfigError(f"command mark {self.path} is damaged; delete it only if no old command can "
                                  "reach this actuator any more")
            self.mark = (int(parts[0]), int(parts[1]))

    def advance(self, height: int, index: int) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            replace_file(self.path, f"{height} {index}\n".encode("ascii"))
        self.mark = (height, index)


class CommandChecker:
    """Checks command envelopes for one actuator with nothing but the operator's key (see the module doc)."""

    def __init__(self, operator: PublicKey, cluster: str, actuator: str, quorum: int,
                 max_age_s: float = DEFAULT_MAX_AGE_S, *, max_skew_s: float = DEFAULT_MAX_SKEW_S,
                 mark_path: str | os.PathLike[str] | None = None) -> None:
        if isinstance(quorum, bool) or not isinstance(quorum, int) or quorum < 1:
            raise ConfigError(f"a command quorum must be at least 1 node, not {quorum!r}")
        self.operator = operator
        self.cluster = cluster
        self.actuator = actuator
        self.quorum = quorum
        self.max_age_s = max_age_s
        self.max_skew_s = max_skew_s
        self.mark = CommandMark(mark_path)

    def check(self, wire: bytes, now: float) -> Command:
        """The command in `wire`, received at `now` (unix seconds), or one EnvelopeRejected naming why."""
        envelope_body, sender, trust = self._open(wire, now)
        body = self._body(envelope_body)
        header = self._header(body["header"])
        height = header["height"]
        block = blocks.Block(header["v"], height, header["prev"], header["term"], header["t"], header["proposer"],
                             (), header["records_root"], header["record_count"])
        block_hash = blocks.block_hash(block)
        self._check_certificate(body["certificate"], trust, height, block_hash, now)
        index = body["index"]
        try:
            root = root_from_path(body["record"], index, block.record_count, body["path"])
        except ValueError as exc:
            raise RecordNotInBlock(f"record {index} is not in block {height}: {exc}", sender.subject_id) from None
        if root != block.records_root:
            raise RecordNotInBlock(f"record {index} is not in block {height}: its Merkle path leads to another root",
                                   sender.subject_id)
        record = self._record(body["record"], height, index, sender)
        structure = record.structure
        assert isinstance(structure, Orchestrate)  # _record admits only PROV-ORCH
        age = now - record.time_ms / 1000
        if age > self.max_age_s:
            raise StaleCommand(f"command {structure.deployed} (block {height}) was recorded {age:.1f} s ago, "
                               f"more than {self.max_age_s:g} s", sender.subject_id)
        if -age > self.max_skew_s:
            raise StaleCommand(f"command {structure.deployed} (block {height}) is dated {-age:.1f} s in the future",
                               sender.subject_id)
        last = self.mark.mark
        if last is not None and (height, index) <= last:
            already = "was already accepted" if (height, index) == last else f"is older than {last[0]}/{last[1]}"
            raise ReplayedCommand(f"replayed command {structure.deployed} at block {height} record {index}: "
                                  f"{already}", sender.subject_id)
        self.mark.advance(height, index)
        reason = dict(structure.reason)
        rule, trigger = reason.get("rule"), reason.get("trigger")
        return Command(command_id=structure.deployed, setting=dict(reason["setting"]), height=height, index=index,
                       block_hash=block_hash, record_time_ms=record.time_ms, sender=sender.name,
                       rule=rule if isinstance(rule, str) else None,
                       trigger=trigger if isinstance(trigger, str) else None, reason=reason)

    # --- the steps, in order ----------------------------------------------------------------------

    def _open(self, wire: Any, now: float) -> tuple[Any, Certificate, TrustStore]:
        """Step 1: the envelope, its signers' certificates and the sender's signature."""
        if not isinstance(wire, bytes | bytearray | memoryview):
            raise MalformedCommand(f"command must be bytes, not {type(wire).__name__}")
        wire = bytes(wire)
        if len(wire) > MAX_COMMAND_BYTES:
            raise MalformedCommand(f"command of {len(wire)} bytes exceeds {MAX_COMMAND_BYTES}")
        # The signers are read before the signature is checked, because the sender's key is among them;
        # each is verified against the operator's key before anything trusts it.
        signers = _peek_signers(wire)
        trust = TrustStore(self.operator, self.cluster)
        for position, encoded in enumerate(signers):
            try:
                trust.add(encoded)
            except InvalidCertificate as exc:
                raise UncertifiedSender(f"signer certificate {position} of the command is refused: {exc}") from None
        opener = EnvelopeOpener(trust, MemoryWatermarks(), max_bytes=MAX_COMMAND_BYTES,
                                accepted_types=frozenset({COMMAND_TYPE}))
        envelope = opener.open(wire, now)  # sender among the signers, valid now, signature verifies
        sender = trust.by_id(envelope.sender)
        assert sender is not None  # open() has just found it
        if sender.role != "node":
            raise UncertifiedSender(f"command signed by {sender.name}, a {sender.role}: only a node of "
                                    f"{self.cluster} may command an actuator", envelope.sender)
        return envelope.body, sender, trust

    def _body(self, body: Any) -> dict[str, Any]:
        """Step 2: the body's shape, and that it is addressed to this actuator."""
        if type(body) is not dict or body.keys() != _BODY_FIELDS:
            raise MalformedCommand(f"command body must hold exactly {', '.join(sorted(_BODY_FIELDS))}")
        if body["actuator"] != self.actuator:
            named = body["actuator"] if type(body["actuator"]) is str else type(body["actuator"]).__name__
            raise WrongActuator(f"command for {named[:64]!r} reached actuator {self.actuator}")
        record = body["record"]
        if type(record) is not bytes or not 0 < len(record) <= blocks.MAX_RECORD_BYTES:
            raise MalformedCommand(f"command record must be 1..{blocks.MAX_RECORD_BYTES} bytes of envelope")
        if type(body["index"]) is not int or body["index"] < 0:
            raise MalformedCommand("command index must be a non-negative integer")
        path = body["path"]
        if type(path) is not list or len(path) > MAX_PATH_STEPS or not all(type(step) is bytes for step in path):
            raise MalformedCommand(f"command path must be a list of at most {MAX_PATH_STEPS} hashes")
        certificate = body["certificate"]
        if type(certificate) is not dict or len(certificate) > blocks.MAX_SIGNERS:
            raise MalformedCommand(f"command certificate must map at most {blocks.MAX_SIGNERS} signer ids to signatures")
        if not all(type(signature) is bytes for signature in certificate.values()):
            raise MalformedCommand("command certificate must map signer ids to signatures (bytes)")
        return body

    def _header(self, header: Any) -> dict[str, Any]:
        """Step 3: a header map of exactly block.py's fields and types (its hash is the block hash)."""
        if type(header) is not dict or header.keys() != _HEADER_FIELDS:
            raise MalformedCommand(f"command header must hold exactly {', '.join(sorted(_HEADER_FIELDS))}")
        for name in ("v", "height", "term", "t", "record_count"):
            if type(header[name]) is not int or not 0 <= header[name] <= blocks.MAX_INT:
                raise MalformedCommand(f"command header field {name} must be an integer in 0..2^63-1")
        if header["v"] != blocks.BLOCK_VERSION:
            raise MalformedCommand(f"command header is block version {header['v']}, not {blocks.BLOCK_VERSION}")
        for name in ("prev", "records_root"):
            if type(header[name]) is not bytes or len(header[name]) != blocks.HASH_BYTES:
                raise MalformedCommand(f"command header field {name} must be a {blocks.HASH_BYTES}-byte hash")
        if type(header["proposer"]) is not str or not 0 < len(header["proposer"]) <= blocks.MAX_ID_CHARS:
            raise MalformedCommand("command header proposer must be an identity id")
        return header

    def _check_certificate(self, commit_certificate: dict[str, bytes], trust: TrustStore, height: int,
                           block_hash: bytes, now: float) -> None:
        """Step 4: a quorum of distinct certified nodes signed this block hash, and none forged."""
        signed_by: set[str] = set()  # certificate names: one node counts once, whatever keys it had
        for signer_id, signature in sorted(commit_certificate.items()):
            certificate = trust.by_id(signer_id)
            if certificate is None or certificate.role != "node" or not certificate.is_valid_at(now):
                continue  # no usable node certificate to check it with: neither counts nor harms
            if len(signature) != SIGNATURE_BYTES or not blocks.verify_commit_signature(
                    certificate.subject, block_hash, signature):
                raise ForgedCommitSignature(f"commit signature of {certificate.name} ({signer_id}) does not verify "
                                            f"over block {height} ({block_hash.hex()[:16]})", signer_id)
            signed_by.add(certificate.name)
        if len(signed_by) < self.quorum:
            raise BelowQuorum(f"block {height} carries {len(signed_by)} verified commit signature(s) of "
                              f"{self.cluster}'s nodes; a majority needs {self.quorum}")

    def _record(self, envelope: bytes, height: int, index: int, sender: Certificate) -> Record:
        """Step 6: the authorising record, a PROV-ORCH command for this actuator with a setting."""
        where = f"record {index} of block {height}"
        try:
            outer = canonical.decode(envelope)
            if type(outer) is not list or len(outer) != 2 or type(outer[0]) is not bytes:
                raise NotACommand(f"{where} is not a signed envelope", sender.subject_id)
            fields = canonical.decode(outer[0])
        except canonical.CanonicalDecodeError as exc:
            raise NotACommand(f"{where} is not a signed envelope: {exc}", sender.subject_id) from None
        if type(fields) is not dict or fields.get("type") != "record":
            raise NotACommand(f"{where} is not a record envelope", sender.subject_id)
        try:
            record = records.from_map(fields.get("body"))
        except InvalidRecord as exc:
            raise NotACommand(f"{where} is not a valid record: {exc}", sender.subject_id) from None
        structure = record.structure
        if record.state != ORCH or not isinstance(structure, Orchestrate) or structure.action != COMMAND_ACTION:
            action = f" {structure.action}" if isinstance(structure, Orchestrate) else ""
            raise NotACommand(f"{where} is a {record.state}{action} record, not a {ORCH} {COMMAND_ACTION}",
                              sender.subject_id)
        if structure.location != self.actuator:
            raise WrongActuator(f"{where} commands {structure.location}, not {self.actuator}", sender.subject_id)
        setting = structure.reason.get("setting")
        if type(setting) is not dict or not all(type(key) is str for key in setting):
            raise NotACommand(f"{where} ({structure.deployed}) has no setting map in its reason", sender.subject_id)
        return record


def _peek_signers(wire: bytes) -> list[bytes]:
    """The certificates a command carries, read before its signature is checked (never trusted as such)."""
    try:
        outer = canonical.decode(wire)
        if type(outer) is not list or len(outer) != 2 or type(outer[0]) is not bytes:
            raise MalformedCommand("command must be the CBOR array [signed bytes, signature bytes]")
        fields = canonical.decode(outer[0])
    except canonical.CanonicalDecodeError as exc:
        raise MalformedCommand(f"command is not a canonical envelope: {exc}") from None
    body = fields.get("body") if type(fields) is dict else None
    signers = body.get("signers") if type(body) is dict else None
    if type(signers) is not list or not 0 < len(signers) <= MAX_SIGNER_CERTIFICATES:
        raise MalformedCommand(f"command must carry 1..{MAX_SIGNER_CERTIFICATES} signer certificates")
    if not all(type(encoded) is bytes for encoded in signers):
        raise MalformedCommand("command signer certificates must be bytes")
    return signers
