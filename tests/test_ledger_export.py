"""`tomq ledger export`: a real ledger (tests/audit_ledger.py) as PROV-JSON, PROV-N and PROV-O, read back by
the `prov` library with every statement kept, and as many of each PROV relation as the export's
mapping table (node/ledger/export.py) gives the ledger's records of each kind.
"""

from __future__ import annotations

import io
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

from audit_ledger import Scenario, build_city
from conftest import require
from tomq.identity import PublicKey
from tomq.node.ledger import cli as ledger_cli
from tomq.node.ledger import export
from tomq.node.ledger.block import block_file_name
from tomq.node.ledger.bundle import DirectorySource, LedgerReader
from tomq.records import DATA, ID_CREATE, ID_DELETE, ORCH, Identity, Provenance, Record


def _has_rdflib() -> bool:
    try:
        import rdflib  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def city(tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    return build_city(tmp_path_factory.mktemp("city"))


@pytest.fixture
def ledger_copy(city: Scenario, tmp_path: Path) -> Path:
    shutil.copytree(city.ledger, tmp_path / "ledger")
    return tmp_path / "ledger"


def operator(city: Scenario) -> PublicKey:
    return PublicKey.from_hex(city.operator_pub.read_text().strip())


def reader(city: Scenario, ledger: Path | None = None, verified: bool = True) -> LedgerReader:
    return LedgerReader(DirectorySource(ledger or city.ledger), operator(city) if verified else None)


def ledger_records(city: Scenario) -> list[Record]:
    return [entry.record for entry in reader(city).entries()]


def relations_by_mapping_table(records: list[Record]) -> Counter[str]:
    """The relation counts export.py's table promises, computed from the records' kinds alone."""
    want: Counter[str] = Counter()
    for record in records:
        structure = record.structure
        if isinstance(structure, Identity):
            want["wasGeneratedBy" if record.state == ID_CREATE else "wasInvalidatedBy"] += 1
            want["wasAssociatedWith"] += 1  # the identify / terminate activity, with its proposer
            if record.state == ID_CREATE and structure.kind in ("node", "service"):
                want["actedOnBehalfOf"] += 1  # on behalf of the operator
            if structure.attributed_to is not None:  # a container, with the node that runs it
                want["wasAttributedTo"] += 1
                want["actedOnBehalfOf"] += 1
        elif isinstance(structure, Provenance):
            want["wasGeneratedBy"] += 1
            want["used"] += 1
            if structure.source is not None:
                want["wasAttributedTo"] += 1
                want["wasAssociatedWith"] += 1
            want["wasDerivedFrom"] += len(structure.derived_from)
            if structure.on_behalf_of is not None:
                want["actedOnBehalfOf"] += 1
        else:
            want["used"] += 1
            want["wasAssociatedWith"] += 2  # with the location, and with the proposer (the orchestrator)
    return want


@pytest.mark.parametrize("fmt", export.FORMATS)
def test_round_trip_keeps_every_statement_and_the_relation_counts(city: Scenario, fmt: str):
    if fmt == "prov-o":
        require("rdflib", _has_rdflib(), "prov needs rdflib to read PROV-O: pip install 'prov[rdf]'")
    out = io.StringIO()
    report = export.export(reader(city), fmt, out)
    document = export.read_back(out.getvalue(), fmt)

    written = list(export.statements(reader(city)))
    got = export.statement_keys(document)
    assert got == export.expected_keys(written, "city")  # every statement, each once, under its identifier
    relations: Counter[str] = Counter()
    for (kind, _), n in got.items():
        if kind in export.RELATION_ARGUMENTS:
            relations[kind] += n
    records = ledger_records(city)
    assert relations == relations_by_mapping_table(records)
    kinds = Counter(record.state for record in records)
    assert relations["wasGeneratedBy"] == kinds[ID_CREATE] + kinds[DATA]
    assert relations["wasInvalidatedBy"] == kinds[ID_DELETE]
    assert relations["used"] == kinds[DATA] + kinds[ORCH]
    assert relations["wasDerivedFrom"] == sum(len(parents) for parents, _, _ in city.results.values())
    assert report.records == len(records) == 3 + len(city.records)
    assert report.counts == Counter(kind for kind, _ in export.expected_keys(written, "city").elements())


def test_the_mapping_names_the_paper_s_elements(city: Scenario):
    written = {(s.kind, s.ident[1]) for s in export.statements(reader(city))}
    reading, (device, _, _) = next(iter(city.readings.items()))
    result = next(iter(city.results))
    for element in [("agent", device), ("entity", device), ("agent", "n1"), ("entity", "n1"),  # devices, nodes
                    ("agent", "collector:0:n2:3"), ("entity", "collector:0:n2:3"),  # containers both ways
                    ("entity", reading), ("entity", result), ("activity", f"sample:{device}"),
                    ("activity", "collect:collector"), ("activity", "analyse:analyser"), ("agent", "analyser")]:
        assert element in written, element
    operator_id = operator(city).id
    assert ("agent", operator_id) in written  # the operator, under key:
    statements = list(export.statements(reader(city)))
    delegations = {(s.args[0][1], s.args[1][1]) for s in statements if s.kind == "actedOnBehalfOf"}
    assert {("n1", operator_id), ("analyser", operator_id), ("collector:0:n2:3", "n2")} <= delegations
    placements = [s for s in statements if s.kind == "activity" and dict(s.attributes).get("action") == "place"]
    loads = json.loads(str(dict(placements[0].attributes)["reason_loads"]))
    assert loads["n2"]["score"] == 0.075  # the reason as JSON, readable by any tool


def test_statements_carry_height_hash_and_times_through_prov_json(city: Scenario):
    out = io.StringIO()
    export.export(reader(city), "prov-json", out)
    document = export.read_back(out.getvalue(), "prov-json")
    raw = json.loads(out.getvalue())
    reading, (_, height, record_id) = next(iter(city.readings.items()))
    generations = [g for g in raw["wasGeneratedBy"].values() if g["prov:entity"] == f"ledger:{reading}"]
    assert len(generations) == 1
    generation = generations[0]
    block = reader(city).source.read(height)
    from tomq.node.ledger.block import decode_block_file

    assert generation["tomq:height"] == {"$": str(height), "type": "xsd:long"}
    assert generation["tomq:block"] == decode_block_file(block).block.hash.hex()
    assert generation["tomq:record"] == record_id
    assert generation["prov:time"].startswith("2027-01-15T08:00:")
    timed = [r for r in document.get_records() if type(r).__name__ == "ProvGeneration" and r.identifier
             and r.identifier.uri.endswith(f":statement:{height}-0-0")]
    assert len(timed) == 1 and timed[0].get_attribute("prov:time")


def test_a_range_exports_only_its_records_and_declares_what_they_name(city: Scenario):
    out = io.StringIO()
    report = export.export(reader(city), "prov-n", out, first=5, last=6)
    text = out.getvalue()
    assert report.first == 5 and report.last == 6
    heights = {int(line.split('tomq:height="')[1].split('"')[0]) for line in text.splitlines() if "tomq:height=" in line}
    assert heights <= {5, 6}
    document = export.read_back(text, "prov-n")
    keys = export.statement_keys(document)
    # The result at 6 derives from readings at 5 and names its analyser: all declared in the range.
    assert ("agent", "urn:tomq:city:name:analyser") in keys and ("agent", "urn:tomq:city:name:s1") in keys
    assert report.records == sum(1 for h, _ in city.records if h in (5, 6))


def test_an_unverified_export_says_so_and_a_verified_one_refuses_a_forgery(city: Scenario, ledger_copy: Path):
    out = io.StringIO()
    report = export.export(reader(city, ledger_copy, verified=False), "prov-json", out)
    assert not report.verified and "NOT verified" in report.summary()
    ledger_entity = json.loads(out.getvalue())["entity"][f"stmt:ledger-0-{report.last}"]
    assert ledger_entity["tomq:verified"] == "false" and ledger_entity["tomq:cluster"] == "city"
    # Re-sign nothing, change one record byte: the Merkle root no longer matches (checked in both modes).
    path = ledger_copy / block_file_name(5)
    data = bytearray(path.read_bytes())
    data[data.index(b"sample:s1") + 7] ^= 0x01
    path.write_bytes(bytes(data))
    from tomq.node.ledger.verify import LedgerInvalid

    for verified in (True, False):
        with pytest.raises(LedgerInvalid) as caught:
            export.export(reader(city, ledger_copy, verified=verified), "prov-json", io.StringIO())
        assert caught.value.height == 5


def test_cli_writes_the_file_the_demo_asks_for(city: Scenario, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    # node/demo/run.py looks for --operator-key and --output among the options of `ledger export`.
    import argparse

    parser = argparse.ArgumentParser()
    actions = ledger_cli.register(parser.add_subparsers(dest="command"))
    options = {o for action in actions.choices["export"]._actions for o in action.option_strings}
    assert {"--operator-key", "--output", "--format", "--from", "--to"} <= options
    target = tmp_path / "ledger.prov.json"
    assert ledger_cli.main(["export", str(city.ledger), "--format", "prov-json", "--operator-key",
                            str(city.operator_pub), "--output", str(target)]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and "exported heights 0..18" in captured.err
    assert export.statement_keys(export.read_back(target.read_text(), "prov-json"))
    assert not list(tmp_path.glob(".*.tmp"))


def test_cli_prints_to_stdout_and_notes_an_unverified_read(city: Scenario, capsys: pytest.CaptureFixture[str]):
    assert ledger_cli.main(["export", str(city.ledger), "--format", "prov-n", "--to", "2"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("document\n") and captured.out.endswith("endDocument\n")
    assert "NOT" in captured.err and "without --operator-key" in captured.err


def test_cli_refuses_a_ledger_that_does_not_verify(city: Scenario, ledger_copy: Path, capsys: pytest.CaptureFixture[str]):
    (ledger_copy / block_file_name(3)).unlink()
    assert ledger_cli.main(["export", str(ledger_copy), "--operator-key", str(city.operator_pub)]) == 1
    assert "ledger invalid at height 3" in capsys.readouterr().out
