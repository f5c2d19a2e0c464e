import hashlib
import io

import prov.model
import pytest

from tomq import records
from tomq.errors import InvalidRecord
from tomq.records import (
    DATA,
    ID_CREATE,
    ID_DELETE,
    ORCH,
    Identity,
    Orchestrate,
    Provenance,
    Record,
    prov_statements,
)

HASH = hashlib.sha256(b"reading").digest()

EXAMPLES = {
    "device joins": Record(ID_CREATE, Identity("car7", "device", b"certificate bytes"), 1000),
    "container joins": Record(ID_CREATE, Identity("collector-0", "container", b"image digest", attributed_to="n2"), 1001),
    "device leaves": Record(ID_DELETE, Identity("car7", "device", b"certificate bytes"), 1002),
    "data": Record(DATA, Provenance("reading:ab12", HASH, "sample:car7", "collect:collector-0", source="car7",
                                    source_signature=b"\x01" * 64), 1003, {"topic": "dev/car7/data"}),
    "derived data": Record(DATA, Provenance("result:9", HASH, "analyse:analyser-0", "serve:tm", source="analyser-0",
                                            derived_from=("joint:1", "joint:2")), 1004),
    "bridged data": Record(DATA, Provenance("reading:cd", HASH, "sample:t1", "collect:c0", source="bridge1",
                                            on_behalf_of="t1"), 1005),
    "placement": Record(ORCH, Orchestrate("collector-0", "n2", "place", {"n1": 0.7, "n2": 0.2}), 1006),
    "light command": Record(ORCH, Orchestrate("light:tl1:green", "tl1", "command"), 1007),
}


@pytest.mark.parametrize("name", EXAMPLES)
def test_round_trip_through_canonical_cbor(name):
    record = EXAMPLES[name]
    assert records.decode(record.encode()) == record
    assert len(record.record_id) == 32


@pytest.mark.parametrize(
    "record, message",
    [
        (Record("PROV-MAGIC", Identity("a", "device", b"x"), 1), "state"),
        (Record(ID_CREATE, Provenance("d", HASH, "o", "r"), 1), "IDENTITY"),
        (Record(DATA, Identity("a", "device", b"x"), 1), "PROV"),
        (Record(ORCH, Identity("a", "device", b"x"), 1), "ORCHESTRATE"),
        (Record(ID_CREATE, Identity("a/b", "device", b"x"), 1), "not a valid id"),
        (Record(ID_CREATE, Identity("a", "robot", b"x"), 1), "kind"),
        (Record(ID_CREATE, Identity("a", "device", b""), 1), "id-proof"),
        (Record(DATA, Provenance("d", b"short", "o", "r"), 1), "32-byte"),
        (Record(DATA, Provenance("d", HASH, "same", "same"), 1), "same activity"),
        (Record(ORCH, Orchestrate("s", "n1", "place", {1: 2}), 1), "text keys"),  # type: ignore[dict-item]
        (Record(ID_CREATE, Identity("a", "device", b"x"), -5), "non-negative"),
        (Record(ID_CREATE, Identity("a", "device", b"x"), 1, {"blob": b"x" * 5000}), "off-chain"),
    ],
)
def test_malformed_records_are_refused_with_the_reason(record, message):
    with pytest.raises(InvalidRecord, match=message):
        records.validate(record)
    with pytest.raises(InvalidRecord):
        record.encode()


def test_decode_refuses_unknown_and_missing_fields():
    good = EXAMPLES["placement"].to_map()
    with pytest.raises(InvalidRecord, match="exactly the fields"):
        records.from_map({**good, "extra": 1})
    body = dict(good["orchestrate"])
    del body["location"]
    with pytest.raises(InvalidRecord, match="missing"):
        records.from_map({**good, "orchestrate": body})
    with pytest.raises(InvalidRecord, match="unknown fields"):
        records.from_map({**good, "orchestrate": {**good["orchestrate"], "evil": 1}})
    with pytest.raises(InvalidRecord):
        records.decode(b"\xff")


def _document(statements: list[records.ProvStatement]) -> prov.model.ProvDocument:
    """Build a prov document the way the export will: one call per statement."""
    document = prov.model.ProvDocument()
    document.add_namespace("tomq", "urn:tomq:test:")

    def q(name: str) -> str:
        return f"tomq:{name}"

    for s in statements:
        attrs = {k: v for k, v in s.attributes}
        if s.relation == "entity":
            document.entity(q(s.subject), attrs)
        elif s.relation == "activity":
            document.activity(q(s.subject), other_attributes=attrs)
        elif s.relation == "agent":
            document.agent(q(s.subject), attrs)
        else:
            getattr(document, s.relation)(q(s.subject), q(s.object))  # type: ignore[arg-type]
    return document


@pytest.mark.parametrize("name", EXAMPLES)
def test_prov_mapping_is_accepted_and_read_back_by_the_prov_library(name):
    record = EXAMPLES[name]
    statements = prov_statements(record, proposer="n1")
    document = _document(statements)
    for fmt in ("json", "provn"):
        text = document.serialize(format=fmt)
        assert text
    again = prov.model.ProvDocument.deserialize(io.StringIO(document.serialize(format="json")), format="json")
    assert len(again.get_records()) == len(document.get_records()) == len(statements)


def _relations(record: Record) -> set[tuple[str, str, str | None]]:
    return {(s.relation, s.subject, s.object) for s in prov_statements(record)}


def test_mapping_uses_the_expected_prov_relations():
    data = _relations(EXAMPLES["data"])
    assert ("wasGeneratedBy", "reading:ab12", "sample:car7") in data
    assert ("used", "collect:collector-0", "reading:ab12") in data
    assert ("wasAttributedTo", "reading:ab12", "car7") in data
    derived = _relations(EXAMPLES["derived data"])
    assert {("wasDerivedFrom", "result:9", "joint:1"), ("wasDerivedFrom", "result:9", "joint:2")} <= derived
    assert ("actedOnBehalfOf", "bridge1", "t1") in _relations(EXAMPLES["bridged data"])
    container = _relations(EXAMPLES["container joins"])
    assert ("wasAttributedTo", "collector-0", "n2") in container
    assert ("actedOnBehalfOf", "collector-0", "n2") in container
    assert any(r[0] == "wasInvalidatedBy" and r[1] == "car7" for r in _relations(EXAMPLES["device leaves"]))
    placement = prov_statements(EXAMPLES["placement"], proposer="n1")
    activity = next(s for s in placement if s.relation == "activity")
    assert ("tomq:reason_n2", "0.2") in activity.attributes
    assert ("wasAssociatedWith", activity.subject, "n1") in {(s.relation, s.subject, s.object) for s in placement}
