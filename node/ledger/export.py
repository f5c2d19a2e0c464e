"""The ledger as W3C PROV (`tomq ledger export`): PROV-JSON, PROV-N and PROV-O (Turtle), written as a stream.

Every record becomes the statements `tomq.records.prov_statements` gives it (the pattern's
PROV-to-pattern mapping, §IV.C), plus what only the ledger knows: who proposed it, when, and where it
is. The table below is exactly what is written, per record kind; "X" is the record's object.

| record                              | elements (declared once, by the first record naming them)          | relations, one statement each
|-------------------------------------|---------------------------------------------------------------------|-----------------------------------------------------------
| PROV-ID-create (device, auditor)    | agent X, entity X, activity identify:<rid>                          | wasGeneratedBy(X, identify), wasAssociatedWith(identify, proposer)
| PROV-ID-create (node, service)      | same                                                                | same + actedOnBehalfOf(X, operator)
| PROV-ID-create (container)          | same                                                                | same + wasAttributedTo(X, node), actedOnBehalfOf(X, node)
| PROV-ID-delete                      | agent X, entity X, activity terminate:<rid>                         | wasInvalidatedBy(X, terminate), wasAssociatedWith(terminate, proposer) (+ the container's two)
| PROV-DATA (a reading, joint data,   | entity data, activity origin (sample:<device>, analyse:<service>),  | wasGeneratedBy(data, origin), used(receiver, data),
|   a result)                         |   activity receiver (collect:<service>, ...), agent source          |   wasAttributedTo(data, source), wasAssociatedWith(origin, source),
|                                     |                                                                     |   wasDerivedFrom(data, parent) per parent, actedOnBehalfOf(source, on_behalf_of)
| PROV-ORCH (place, remove, command,  | entity deployed (replica, command id, datum), agent location,       | used(orchestrate, deployed), wasAssociatedWith(orchestrate, location),
|   execute)                          |   activity orchestrate:<rid> (action, reason as JSON)               |   wasAssociatedWith(orchestrate, proposer)

Devices, nodes, containers, services and the operator are agents; devices, nodes, containers and
services are entities too (the paper's footnote: the orchestrator is a container and an agent, and
PROV can speak about an agent only if it is also an entity). The proposer of a record is its
signer: the operator (genesis), a node (the orchestrator: joins, placements, commands), or a
service (collector, analyser: data). Nodes and services act on behalf of the operator that
certified them. Any agent, entity or activity a relation names without declaring it (a proposer, a
parent datum from before the exported range) is declared on first use with the role the relation
gives it.

Times: an identify, terminate or orchestrate activity starts and ends at the record's time; a
generation (and an invalidation) happens at the record's time (for a reading, the time the device
signed); a usage of data happens when the receiver sealed the record (its envelope time), a usage by
an orchestrate activity at the record's time. Every statement carries `tomq:height`, `tomq:block`
(the block hash), `tomq:index` (the record's position) and `tomq:record` (the record id); an
element carries those of the record that declared it. One last entity, `stmt:ledger-<from>-<to>`,
describes the export: range, head hash, operator, cluster and whether it was verified.

Identifiers: ledger names under `ledger:` = `urn:tomq:<cluster>:name:`, statements under `stmt:` =
`urn:tomq:<cluster>:statement:` (`<height>-<index>-<n>`), the operator under `key:` =
`urn:tomq:<cluster>:key:` by its identity id, attribute names under `tomq:` = `urn:tomq:vocab#`.
Every relation has its own identifier, so no two statements collapse in any format (RDF would
merge two identical unidentified ones), and each carries its own height and hash.

The writers stream: the `prov` library builds a whole document in memory and takes minutes for a
ledger of 100,000 records, so it is used only to read exports back (`read_back`, the tests). In
PROV-O an identifier that is both an agent and an entity is one resource with two types, which
`prov` reads back as one record; `statement_keys` counts it as both.

What this module must never do: write a statement that does not come from a record the reader
passed (verified, or marked unverified), or depend on anything but the ledger and the options.
"""

from __future__ import annotations

import datetime
import json
import math
import re
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any

from tomq.errors import UsageError
from tomq.node.ledger import pattern
from tomq.node.ledger.bundle import LedgerEntry, LedgerReader
from tomq.records import DATA, ID_CREATE, Identity, Orchestrate, prov_statements

FORMATS = ("prov-json", "prov-n", "prov-o")
VOCABULARY = "urn:tomq:vocab#"
ELEMENT_KINDS = ("entity", "activity", "agent")
# relation -> the element kinds of its two formal arguments, in PROV order
RELATION_ARGUMENTS: dict[str, tuple[str, str]] = {
    "wasGeneratedBy": ("entity", "activity"),
    "used": ("activity", "entity"),
    "wasInvalidatedBy": ("entity", "activity"),
    "wasAttributedTo": ("entity", "agent"),
    "wasAssociatedWith": ("activity", "agent"),
    "actedOnBehalfOf": ("agent", "agent"),
    "wasDerivedFrom": ("entity", "entity"),
}
TIMED_RELATIONS = frozenset({"wasGeneratedBy", "used", "wasInvalidatedBy"})
_ACTS_FOR_OPERATOR = ("node", "service")  # identity kinds the operator certifies to act for it
_ATTRIBUTE_NAME = re.compile(r"[^A-Za-z0-9_]")

Ref = tuple[str, str]  # (prefix, local part)
Value = str | int


@dataclass(frozen=True, slots=True)
class Statement:
    """One PROV statement as written: an element declaration or an identified relation."""

    kind: str  # an ELEMENT_KINDS member or a RELATION_ARGUMENTS key
    ident: Ref
    args: tuple[Ref, ...] = ()  # a relation's two formal arguments
    time_ms: int | None = None  # a relation's time; an activity's start and end
    attributes: tuple[tuple[str, Value], ...] = ()  # tomq vocabulary terms


@dataclass(frozen=True, slots=True)
class ExportReport:
    first: int
    last: int
    head_hash: bytes
    records: int
    counts: Counter[str]
    verified: bool

    def summary(self) -> str:
        kinds = ", ".join(f"{kind} {self.counts[kind]}" for kind in (*ELEMENT_KINDS, *RELATION_ARGUMENTS)
                          if self.counts[kind])
        return (f"exported heights {self.first}..{self.last} ({self.records} records"
                f"{'' if self.verified else ', NOT verified: no operator key'}): {kinds}")


class StatementBuilder:
    """Turns ledger entries into statements, remembering which elements are declared already."""

    def __init__(self, operator_id: str) -> None:
        self.operator = ("key", operator_id)
        self.declared: set[tuple[str, Ref]] = set()

    def ref(self, name: str) -> Ref:
        return self.operator if name == pattern.OPERATOR else ("ledger", name)

    def for_entry(self, entry: LedgerEntry) -> list[Statement]:
        record = entry.record
        rid = entry.record_id
        stamp: tuple[tuple[str, Value], ...] = (("height", entry.height), ("block", entry.block_hash.hex()),
                                                ("index", entry.index), ("record", rid))
        own_activities = {f"identify:{rid}", f"terminate:{rid}", f"orchestrate:{rid}"}
        reason = _reason_attributes(record.structure) if isinstance(record.structure, Orchestrate) else {}
        elements: list[Statement] = []
        relations: list[tuple[str, Ref, Ref, int | None]] = []
        for statement in prov_statements(record, proposer=entry.sender):
            subject = self.ref(statement.subject)
            if statement.relation in ELEMENT_KINDS:
                attributes = _merge(_attributes(statement.attributes, reason), stamp)
                start = record.time_ms if statement.relation == "activity" and statement.subject in own_activities \
                    else None
                elements.append(Statement(statement.relation, subject, (), start, attributes))
                continue
            assert statement.object is not None  # every relation prov_statements writes has two ends
            time_ms = None
            if statement.relation in TIMED_RELATIONS:
                # Data is used when its receiver sealed the record; everything else happens at record time.
                time_ms = entry.envelope_time_ms if statement.relation == "used" and record.state == DATA \
                    else record.time_ms
            relations.append((statement.relation, subject, self.ref(statement.object), time_ms))
        structure = record.structure
        if record.state == ID_CREATE and isinstance(structure, Identity) and structure.kind in _ACTS_FOR_OPERATOR:
            relations.append(("actedOnBehalfOf", self.ref(structure.object), self.operator, None))

        out: list[Statement] = []
        for element in elements:
            if (element.kind, element.ident) not in self.declared:
                self.declared.add((element.kind, element.ident))
                out.append(element)
        for kind, subject, obj, _ in relations:
            for role, ident in zip(RELATION_ARGUMENTS[kind], (subject, obj), strict=True):
                if (role, ident) not in self.declared:
                    self.declared.add((role, ident))
                    extra: tuple[tuple[str, Value], ...] = (("role", "operator"),) if ident == self.operator else ()
                    out.append(Statement(role, ident, (), None, (*extra, *stamp)))
        for n, (kind, subject, obj, time_ms) in enumerate(relations):
            out.append(Statement(kind, ("stmt", f"{entry.height}-{entry.index}-{n}"), (subject, obj), time_ms, stamp))
        return out


def statements(reader: LedgerReader, first: int = 0, last: int | None = None) -> Iterator[Statement]:
    """Every statement of heights first..last, then the entity that describes the export."""
    builder: StatementBuilder | None = None
    records = 0
    for block in reader.blocks(first, last):
        if builder is None:
            assert reader.operator_id is not None  # known from genesis, read before any block is yielded
            builder = StatementBuilder(reader.operator_id)
        for entry in block.entries:
            records += 1
            yield from builder.for_entry(entry)
    yield Statement("entity", ("stmt", f"ledger-{first}-{reader.head_height}"), (), None, (
        ("from", first), ("to", reader.head_height), ("height", reader.head_height),
        ("block", reader.head_hash.hex()), ("records", records), ("operator", reader.operator_id or ""),
        ("cluster", reader.cluster or ""), ("verified", "true" if reader.verified else "false")))


def namespaces(cluster: str) -> dict[str, str]:
    base = f"urn:tomq:{cluster or 'unknown'}:"
    return {"ledger": base + "name:", "stmt": base + "statement:", "key": base + "key:", "tomq": VOCABULARY}


def export(reader: LedgerReader, fmt: str, out: IO[str], first: int = 0, last: int | None = None) -> ExportReport:
    """Write heights first..last of the ledger to `out` in `fmt` (one of FORMATS)."""
    if fmt not in FORMATS:
        raise UsageError(f"export format {fmt!r} is not one of {', '.join(FORMATS)}")
    counts: Counter[str] = Counter()
    writer: _Writer | None = None
    ledger_entity: Statement | None = None
    for statement in statements(reader, first, last):
        if writer is None:  # the cluster name is known once genesis has been read
            writer = _WRITERS[fmt](out, namespaces(reader.cluster or ""))
        counts[statement.kind] += 1
        writer.write(statement)
        ledger_entity = statement
    assert writer is not None and ledger_entity is not None
    writer.close()
    described = dict(ledger_entity.attributes)
    return ExportReport(first, int(described["to"]), reader.head_hash, int(described["records"]), counts,
                        reader.verified)


# --- Values ------------------------------------------------------------------------------------------


def _attributes(pairs: Sequence[tuple[str, str]], reason: dict[str, Value]) -> tuple[tuple[str, Value], ...]:
    out: list[tuple[str, Value]] = []
    for key, value in pairs:
        name = _ATTRIBUTE_NAME.sub("_", key.removeprefix("tomq:"))
        if name in reason:
            out.append((name, reason[name]))  # the record's reason as JSON, not Python's str() of it
        elif name == "time_ms" and value.isdigit():
            out.append((name, int(value)))
        else:
            out.append((name, value))
    return tuple(out)


def _merge(first: tuple[tuple[str, Value], ...], second: tuple[tuple[str, Value], ...]) -> tuple[tuple[str, Value], ...]:
    seen = {key for key, _ in first}
    return (*first, *((key, value) for key, value in second if key not in seen))


def _reason_attributes(structure: Orchestrate) -> dict[str, Value]:
    out: dict[str, Value] = {}
    for key, value in structure.reason.items():
        name = _ATTRIBUTE_NAME.sub("_", f"reason_{key}")
        out[name] = value if isinstance(value, str) else json.dumps(_jsonable(value), sort_keys=True,
                                                                    separators=(",", ":"))
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def iso_time(time_ms: int) -> str | None:
    """UTC ISO 8601 with milliseconds, or None for a time no calendar holds (the attribute keeps it)."""
    try:
        moment = datetime.datetime.fromtimestamp(time_ms / 1000, datetime.UTC)
    except (OverflowError, ValueError, OSError):
        return None
    return moment.isoformat(timespec="milliseconds")


# --- Writers -----------------------------------------------------------------------------------------


class _Writer:
    def __init__(self, out: IO[str], prefixes: dict[str, str]) -> None:
        self.out = out
        self.prefixes = prefixes

    def write(self, statement: Statement) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class _JsonWriter(_Writer):
    """PROV-JSON groups statements by kind, so each kind is spooled apart and joined at the end."""

    def __init__(self, out: IO[str], prefixes: dict[str, str]) -> None:
        super().__init__(out, prefixes)
        self.sections: dict[str, IO[str]] = {}

    def write(self, statement: Statement) -> None:
        body: dict[str, Any] = {}
        if statement.kind in RELATION_ARGUMENTS:
            names = _JSON_ARGUMENTS[statement.kind]
            for name, ref in zip(names, statement.args, strict=True):
                body[name] = _qname(ref)
            if statement.time_ms is not None and (time := iso_time(statement.time_ms)) is not None:
                body["prov:time"] = time
        elif statement.kind == "activity" and statement.time_ms is not None \
                and (time := iso_time(statement.time_ms)) is not None:
            body["prov:startTime"] = body["prov:endTime"] = time
        for key, value in statement.attributes:
            body[f"tomq:{key}"] = {"$": str(value), "type": "xsd:long"} if isinstance(value, int) else value
        section = self.sections.get(statement.kind)
        if section is None:
            section = self.sections[statement.kind] = tempfile.TemporaryFile("w+", encoding="utf-8")
        else:
            section.write(",\n")
        section.write(f"    {json.dumps(_qname(statement.ident))}: {json.dumps(body, ensure_ascii=True)}")

    def close(self) -> None:
        self.out.write('{\n  "prefix": ' + json.dumps(self.prefixes, sort_keys=True))
        for kind in (*ELEMENT_KINDS, *RELATION_ARGUMENTS):
            section = self.sections.pop(kind, None)
            if section is None:
                continue
            self.out.write(f',\n  "{kind}": {{\n')
            section.seek(0)
            while chunk := section.read(1 << 20):
                self.out.write(chunk)
            section.close()
            self.out.write("\n  }")
        self.out.write("\n}\n")


_JSON_ARGUMENTS: dict[str, tuple[str, str]] = {
    "wasGeneratedBy": ("prov:entity", "prov:activity"),
    "used": ("prov:activity", "prov:entity"),
    "wasInvalidatedBy": ("prov:entity", "prov:activity"),
    "wasAttributedTo": ("prov:entity", "prov:agent"),
    "wasAssociatedWith": ("prov:activity", "prov:agent"),
    "actedOnBehalfOf": ("prov:delegate", "prov:responsible"),
    "wasDerivedFrom": ("prov:generatedEntity", "prov:usedEntity"),
}


class _ProvNWriter(_Writer):
    def __init__(self, out: IO[str], prefixes: dict[str, str]) -> None:
        super().__init__(out, prefixes)
        out.write("document\n")
        for prefix, uri in sorted(prefixes.items()):
            out.write(f"  prefix {prefix} <{uri}>\n")
        out.write("\n")

    def write(self, statement: Statement) -> None:
        ident = _provn_qname(statement.ident)
        attributes = ", ".join(f"tomq:{key}={_provn_value(value)}" for key, value in statement.attributes)
        tail = f"[{attributes}]"
        if statement.kind in ("entity", "agent"):
            line = f"{statement.kind}({ident}, {tail})"
        elif statement.kind == "activity":
            time = iso_time(statement.time_ms) if statement.time_ms is not None else None
            line = f"activity({ident}, {time or '-'}, {time or '-'}, {tail})"
        else:
            first, second = (_provn_qname(ref) for ref in statement.args)
            if statement.kind in TIMED_RELATIONS:
                time = iso_time(statement.time_ms) if statement.time_ms is not None else None
                middle = f", {time or '-'}"
            else:
                middle = _PROVN_MARKERS[statement.kind]
            line = f"{statement.kind}({ident}; {first}, {second}{middle}, {tail})"
        self.out.write(f"  {line}\n")

    def close(self) -> None:
        self.out.write("endDocument\n")


_PROVN_MARKERS = {"wasAttributedTo": "", "wasAssociatedWith": ", -", "actedOnBehalfOf": ", -",
                  "wasDerivedFrom": ", -, -, -"}


class _TurtleWriter(_Writer):
    """PROV-O in Turtle: elements typed, relations in the qualified pattern under their own identifier."""

    def __init__(self, out: IO[str], prefixes: dict[str, str]) -> None:
        super().__init__(out, prefixes)
        every = {**prefixes, "prov": "http://www.w3.org/ns/prov#", "xsd": "http://www.w3.org/2001/XMLSchema#"}
        for prefix, uri in sorted(every.items()):
            out.write(f"@prefix {prefix}: <{uri}> .\n")
        out.write("\n")

    def iri(self, ref: Ref) -> str:
        return f"<{self.prefixes[ref[0]]}{ref[1]}>"

    def write(self, statement: Statement) -> None:
        properties = []
        if statement.kind in RELATION_ARGUMENTS:
            qualifier, cls, role = _PROV_O[statement.kind]
            subject, obj = statement.args
            self.out.write(f"{self.iri(subject)} prov:{qualifier} {self.iri(statement.ident)} .\n")
            properties.append(f"a prov:{cls}")
            properties.append(f"prov:{role} {self.iri(obj)}")
            if statement.time_ms is not None and (time := iso_time(statement.time_ms)) is not None:
                properties.append(f'prov:atTime "{time}"^^xsd:dateTime')
        else:
            properties.append(f"a prov:{statement.kind.capitalize()}")
            if statement.kind == "activity" and statement.time_ms is not None \
                    and (time := iso_time(statement.time_ms)) is not None:
                properties.append(f'prov:startedAtTime "{time}"^^xsd:dateTime')
                properties.append(f'prov:endedAtTime "{time}"^^xsd:dateTime')
        for key, value in statement.attributes:
            properties.append(f"tomq:{key} {_turtle_value(value)}")
        self.out.write(f"{self.iri(statement.ident)} " + " ;\n    ".join(properties) + " .\n")

    def close(self) -> None:
        pass


_PROV_O: dict[str, tuple[str, str, str]] = {  # relation -> (qualified property, class, property of the object)
    "wasGeneratedBy": ("qualifiedGeneration", "Generation", "activity"),
    "used": ("qualifiedUsage", "Usage", "entity"),
    "wasInvalidatedBy": ("qualifiedInvalidation", "Invalidation", "activity"),
    "wasAttributedTo": ("qualifiedAttribution", "Attribution", "agent"),
    "wasAssociatedWith": ("qualifiedAssociation", "Association", "agent"),
    "actedOnBehalfOf": ("qualifiedDelegation", "Delegation", "agent"),
    "wasDerivedFrom": ("qualifiedDerivation", "Derivation", "entity"),
}

_WRITERS: dict[str, type[_Writer]] = {"prov-json": _JsonWriter, "prov-n": _ProvNWriter, "prov-o": _TurtleWriter}
_STRING_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_NEEDS_ESCAPE = re.compile(r'[\\"\n\r\t]')


def _qname(ref: Ref) -> str:
    return f"{ref[0]}:{ref[1]}"


def _provn_qname(ref: Ref) -> str:
    local = ref[1].replace(":", "\\:")
    if local.endswith("."):
        local = local[:-1] + "\\."
    return f"{ref[0]}:{local}"


def _quoted(text: str) -> str:
    return '"' + _NEEDS_ESCAPE.sub(lambda match: _STRING_ESCAPES[match.group(0)], text) + '"'


def _provn_value(value: Value) -> str:
    return f'"{value}" %% xsd:long' if isinstance(value, int) else _quoted(value)


def _turtle_value(value: Value) -> str:
    return f'"{value}"^^xsd:long' if isinstance(value, int) else _quoted(value)


# --- Reading back (tests and auditors' own checks) ------------------------------------------------------

_PROV_FORMATS = {"prov-json": ("json", {}), "prov-n": ("provn", {}), "prov-o": ("rdf", {"rdf_format": "turtle"})}
_RECORD_KINDS = {
    "ProvEntity": "entity", "ProvActivity": "activity", "ProvAgent": "agent", "ProvGeneration": "wasGeneratedBy",
    "ProvUsage": "used", "ProvInvalidation": "wasInvalidatedBy", "ProvAttribution": "wasAttributedTo",
    "ProvAssociation": "wasAssociatedWith", "ProvDelegation": "actedOnBehalfOf", "ProvDerivation": "wasDerivedFrom",
}
_TYPE_KINDS = {"http://www.w3.org/ns/prov#Entity": "entity", "http://www.w3.org/ns/prov#Activity": "activity",
               "http://www.w3.org/ns/prov#Agent": "agent"}


def read_back(text: str, fmt: str) -> Any:
    """The export `text` as the `prov` library reads it (a prov.model.ProvDocument)."""
    from prov.model import ProvDocument  # imported here: only readers need it, and it is slow to import

    name, options = _PROV_FORMATS[fmt]
    return ProvDocument.deserialize(content=text, format=name, **options)


def statement_keys(document: Any) -> Counter[tuple[str, str]]:
    """(kind, identifier URI) of every statement in a prov document; an element that PROV-O merged
    from several declarations (a prov:type of prov:Agent on an entity) counts once per kind."""
    keys: Counter[tuple[str, str]] = Counter()
    for record in document.get_records():
        kind = _RECORD_KINDS.get(type(record).__name__)
        if kind is None or record.identifier is None:
            continue
        uri = record.identifier.uri
        kinds = {kind}
        if kind in ELEMENT_KINDS:
            for attribute, value in record.attributes:
                if getattr(attribute, "uri", None) == "http://www.w3.org/ns/prov#type":
                    extra = _TYPE_KINDS.get(getattr(value, "uri", str(value)))
                    if extra is not None:
                        kinds.add(extra)
        for each in kinds:
            keys[(each, uri)] += 1
    return keys


def expected_keys(written: Sequence[Statement], cluster: str) -> Counter[tuple[str, str]]:
    """The statement_keys a faithful reader finds for the statements `written`."""
    prefixes = namespaces(cluster)
    return Counter((statement.kind, prefixes[statement.ident[0]] + statement.ident[1]) for statement in written)
