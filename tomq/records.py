"""Ledger records: the trusted-orchestration pattern's three structures, tagged with the state they create.

    IDENTITY(object, id-proof)          -> PROV-ID-create, PROV-ID-delete
    PROV(data, origin, receiver)        -> PROV-DATA
    ORCHESTRATE(deployed, location)     -> PROV-ORCH

This module checks that a record is well-formed (fields, types, the pairing of state and structure).
Whether a record is *legal now* (joined before leaving, data left before joining an activity) is the
state machine's business, not this module's. `prov_statements` maps each record onto W3C PROV terms;
the ledger export builds its PROV documents from exactly these statements.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

from tomq import canonical
from tomq.errors import InvalidRecord

ID_CREATE = "PROV-ID-create"
ID_DELETE = "PROV-ID-delete"
DATA = "PROV-DATA"
ORCH = "PROV-ORCH"
RECORD_STATES = (ID_CREATE, ID_DELETE, DATA, ORCH)

IDENTITY_KINDS = ("device", "container", "node", "service", "auditor")
_STRUCTURE_OF = {ID_CREATE: "identity", ID_DELETE: "identity", DATA: "prov", ORCH: "orchestrate"}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_MAX_ATTRS_BYTES = 4096


@dataclass(frozen=True, slots=True)
class Identity:
    """IDENTITY(object, id-proof): who joined or left, and the proof of who it is."""

    object: str  # the identity's name (devices, nodes) or container id
    kind: str  # one of IDENTITY_KINDS
    proof: bytes  # the membership certificate, or the hash of the evidence for a container
    attributed_to: str | None = None  # for a container: the node that runs it


@dataclass(frozen=True, slots=True)
class Provenance:
    """PROV(data, origin, receiver): data left `origin` and is used by `receiver`."""

    data: str  # entity id of the data, e.g. "reading:<sha256 hex prefix>"
    data_hash: bytes  # SHA-256 of the payload (which stays off-chain, in the blob store)
    origin: str  # the activity that generated the data (a sensor's sampling, a service's run)
    receiver: str  # the activity that uses it
    source: str | None = None  # the agent behind origin: the device or service
    source_signature: bytes = b""  # the source's own signature over its envelope (the signed hash)
    derived_from: tuple[str, ...] = ()  # entity ids this data was computed from
    on_behalf_of: str | None = None  # when an intermediary (a serial bridge) acted for the source


@dataclass(frozen=True, slots=True)
class Orchestrate:
    """ORCHESTRATE(deployed, location): an orchestration decision and where it takes effect."""

    deployed: str  # the entity placed or acted upon: a service replica, a light's setting
    location: str  # the node (or actuator) where it takes effect
    action: str = "place"  # place, remove, command, ...
    reason: dict[str, Any] = field(default_factory=dict)  # e.g. the loads the placement was based on


Structure = Identity | Provenance | Orchestrate


@dataclass(frozen=True, slots=True)
class Record:
    state: str
    structure: Structure
    time_ms: int
    attributes: dict[str, Any] = field(default_factory=dict)
    # The id, once computed: it costs a validation, an encoding and a hash, and the ledger leader asks
    # for it several times per record (audit line, orchestrator, actuation). Records are immutable.
    _id: str | None = field(default=None, init=False, repr=False, compare=False)

    def encode(self) -> bytes:
        return canonical.encode(self.to_map())

    @property
    def record_id(self) -> str:
        if self._id is None:
            object.__setattr__(self, "_id", hashlib.sha256(self.encode()).hexdigest()[:32])
        assert self._id is not None
        return self._id

    def to_map(self) -> dict[str, Any]:
        validate(self)
        return {"state": self.state, "t": self.time_ms, _STRUCTURE_OF[self.state]: _structure_map(self.structure),
                "attrs": self.attributes}


def _structure_map(structure: Structure) -> dict[str, Any]:
    if isinstance(structure, Identity):
        out: dict[str, Any] = {"object": structure.object, "kind": structure.kind, "proof": structure.proof}
        if structure.attributed_to is not None:
            out["attributed_to"] = structure.attributed_to
        return out
    if isinstance(structure, Provenance):
        out = {"data": structure.data, "hash": structure.data_hash, "origin": structure.origin,
               "receiver": structure.receiver, "derived_from": list(structure.derived_from)}
        if structure.source is not None:
            out["source"] = structure.source
        if structure.source_signature:
            out["source_sig"] = structure.source_signature
        if structure.on_behalf_of is not None:
            out["on_behalf_of"] = structure.on_behalf_of
        return out
    return {"deployed": structure.deployed, "location": structure.location, "action": structure.action,
            "reason": structure.reason}


def validate(record: Record) -> None:
    """Raise InvalidRecord naming the first defect; return None for a well-formed record."""
    if record.state not in RECORD_STATES:
        raise InvalidRecord(f"record state {record.state!r} is not one of {', '.join(RECORD_STATES)}")
    want = _STRUCTURE_OF[record.state]
    structure = record.structure
    got = {Identity: "identity", Provenance: "prov", Orchestrate: "orchestrate"}.get(type(structure))
    if got != want:
        raise InvalidRecord(f"a {record.state} record carries a {want.upper()} structure, not {got or type(structure).__name__}")
    if type(record.time_ms) is not int or record.time_ms < 0:
        raise InvalidRecord("record time must be a non-negative integer of milliseconds")
    if not isinstance(record.attributes, dict) or not all(isinstance(k, str) for k in record.attributes):
        raise InvalidRecord("record attributes must be a map with text keys")
    if record.attributes and len(canonical.encode(record.attributes)) > _MAX_ATTRS_BYTES:
        raise InvalidRecord(f"record attributes exceed {_MAX_ATTRS_BYTES} bytes; keep payloads off-chain")
    if isinstance(structure, Identity):
        _check_name(structure.object, "identity object")
        if structure.kind not in IDENTITY_KINDS:
            raise InvalidRecord(f"identity kind {structure.kind!r} is not one of {', '.join(IDENTITY_KINDS)}")
        if not isinstance(structure.proof, bytes) or not structure.proof:
            raise InvalidRecord(f"identity record for {structure.object} has no id-proof")
        if structure.attributed_to is not None:
            _check_name(structure.attributed_to, "identity attributed_to")
    elif isinstance(structure, Provenance):
        for name in ("data", "origin", "receiver"):
            _check_name(getattr(structure, name), f"prov {name}")
        if not isinstance(structure.data_hash, bytes) or len(structure.data_hash) != 32:
            raise InvalidRecord(f"prov record for {structure.data} needs a 32-byte SHA-256 data hash")
        if structure.origin == structure.receiver:
            raise InvalidRecord(f"prov record for {structure.data}: origin and receiver are the same activity")
        for name in ("source", "on_behalf_of"):
            value = getattr(structure, name)
            if value is not None:
                _check_name(value, f"prov {name}")
        if not isinstance(structure.source_signature, bytes):
            raise InvalidRecord("prov source signature must be bytes")
        for parent in structure.derived_from:
            _check_name(parent, "prov derived_from")
    else:
        _check_name(structure.deployed, "orchestrate deployed")
        _check_name(structure.location, "orchestrate location")
        _check_name(structure.action, "orchestrate action")
        if not isinstance(structure.reason, dict) or not all(isinstance(k, str) for k in structure.reason):
            raise InvalidRecord("orchestrate reason must be a map with text keys")


def _check_name(value: object, what: str) -> None:
    if not isinstance(value, str) or _NAME.fullmatch(value) is None:
        raise InvalidRecord(f"{what} {value!r} is not a valid id (1-128 of A-Z a-z 0-9 . _ : -)")


def decode(data: bytes) -> Record:
    """Decode and validate a record from canonical CBOR; any defect raises InvalidRecord."""
    try:
        raw = canonical.decode(data)
    except canonical.CanonicalDecodeError as exc:
        raise InvalidRecord(f"record: {exc}") from None
    return from_map(raw)


def from_map(raw: Any) -> Record:
    if not isinstance(raw, dict) or raw.get("state") not in RECORD_STATES:
        raise InvalidRecord(f"record needs a state, one of {', '.join(RECORD_STATES)}")
    state = raw["state"]
    key = _STRUCTURE_OF[state]
    if set(raw) != {"state", "t", key, "attrs"}:
        raise InvalidRecord(f"a {state} record has exactly the fields state, t, {key}, attrs")
    body = raw[key]
    if not isinstance(body, dict):
        raise InvalidRecord(f"record field {key} must be a map")
    try:
        structure: Structure
        if key == "identity":
            _only(body, {"object", "kind", "proof"}, {"attributed_to"})
            structure = Identity(body["object"], body["kind"], body["proof"], body.get("attributed_to"))
        elif key == "prov":
            _only(body, {"data", "hash", "origin", "receiver", "derived_from"}, {"source", "source_sig", "on_behalf_of"})
            if not isinstance(body["derived_from"], list):
                raise InvalidRecord("prov derived_from must be a list")
            structure = Provenance(body["data"], body["hash"], body["origin"], body["receiver"], body.get("source"),
                                   body.get("source_sig", b""), tuple(body["derived_from"]), body.get("on_behalf_of"))
        else:
            _only(body, {"deployed", "location", "action", "reason"}, set())
            structure = Orchestrate(body["deployed"], body["location"], body["action"], body["reason"])
    except KeyError as exc:
        raise InvalidRecord(f"record field {key}.{exc.args[0]} is missing") from None
    record = Record(state, structure, raw["t"], raw["attrs"])
    validate(record)
    return record


def _only(body: dict[str, Any], required: set[str], optional: set[str]) -> None:
    missing = required - body.keys()
    if missing:
        raise InvalidRecord(f"record is missing {', '.join(sorted(missing))}")
    extra = body.keys() - required - optional
    if extra:
        raise InvalidRecord(f"record has unknown fields {', '.join(sorted(extra))}")


@dataclass(frozen=True, slots=True)
class ProvStatement:
    """One W3C PROV statement: `relation(subject[, object])` with attributes.

    Relations used: entity, activity, agent, used, wasGeneratedBy, wasAttributedTo, actedOnBehalfOf,
    wasDerivedFrom, wasAssociatedWith, wasInvalidatedBy.
    """

    relation: str
    subject: str
    object: str | None = None
    attributes: tuple[tuple[str, str], ...] = ()


def prov_statements(record: Record, *, proposer: str | None = None) -> list[ProvStatement]:
    """Map one record onto PROV terms (the pattern's PROV-to-pattern mapping, §IV.C)."""
    validate(record)
    rid = record.record_id
    stamp = (("tomq:state", record.state), ("tomq:record", rid), ("tomq:time_ms", str(record.time_ms)))
    out: list[ProvStatement] = []
    s = record.structure
    if isinstance(s, Identity):
        proof = (("tomq:kind", s.kind), ("tomq:proof_sha256", hashlib.sha256(s.proof).hexdigest()))
        # The pattern's footnote: a member that acts and is also placed or identified is declared both
        # as agent and as entity, so assertions can be made about it in either role.
        out.append(ProvStatement("agent", s.object, None, proof))
        out.append(ProvStatement("entity", s.object, None, proof))
        if record.state == ID_CREATE:
            act = f"identify:{rid}"
            out.append(ProvStatement("activity", act, None, stamp))
            out.append(ProvStatement("wasGeneratedBy", s.object, act))
        else:
            act = f"terminate:{rid}"
            out.append(ProvStatement("activity", act, None, stamp))
            out.append(ProvStatement("wasInvalidatedBy", s.object, act))
        if proposer is not None:
            out.append(ProvStatement("wasAssociatedWith", act, proposer))
        if s.attributed_to is not None:
            out.append(ProvStatement("wasAttributedTo", s.object, s.attributed_to))
            out.append(ProvStatement("actedOnBehalfOf", s.object, s.attributed_to))
    elif isinstance(s, Provenance):
        out.append(ProvStatement("entity", s.data, None, (*stamp, ("tomq:sha256", s.data_hash.hex()))))
        out.append(ProvStatement("activity", s.origin))
        out.append(ProvStatement("activity", s.receiver))
        out.append(ProvStatement("wasGeneratedBy", s.data, s.origin))
        out.append(ProvStatement("used", s.receiver, s.data))
        if s.source is not None:
            out.append(ProvStatement("agent", s.source))
            out.append(ProvStatement("wasAttributedTo", s.data, s.source))
            out.append(ProvStatement("wasAssociatedWith", s.origin, s.source))
        if s.on_behalf_of is not None and s.source is not None:
            out.append(ProvStatement("actedOnBehalfOf", s.source, s.on_behalf_of))
        for parent in s.derived_from:
            out.append(ProvStatement("wasDerivedFrom", s.data, parent))
    else:
        act = f"orchestrate:{rid}"
        reason = tuple(sorted((f"tomq:reason_{k}", str(v)) for k, v in s.reason.items()))
        out.append(ProvStatement("entity", s.deployed))
        out.append(ProvStatement("agent", s.location))
        out.append(ProvStatement("activity", act, None, (*stamp, ("tomq:action", s.action), *reason)))
        out.append(ProvStatement("used", act, s.deployed))
        out.append(ProvStatement("wasAssociatedWith", act, s.location))
        if proposer is not None:
            out.append(ProvStatement("wasAssociatedWith", act, proposer))
    return out
