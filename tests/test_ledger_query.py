"""`tomq ledger query` (node/ledger/query.py): the auditor's four questions, answered from a real ledger
(tests/audit_ledger.py) and compared with what the scenario wrote.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_ledger_verify import LedgerBuilder

from audit_ledger import LOADS, Scenario, _place, at, build_city
from tomq.identity import PublicKey
from tomq.node.ledger import cli as ledger_cli
from tomq.node.ledger import query
from tomq.node.ledger.bundle import DirectorySource, LedgerReader
from tomq.node.ledger.query import LedgerIndex, QueryError


@pytest.fixture(scope="module")
def city(tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    return build_city(tmp_path_factory.mktemp("city"))


@pytest.fixture(scope="module")
def index(city: Scenario) -> LedgerIndex:
    reader = LedgerReader(DirectorySource(city.ledger), PublicKey.from_hex(city.operator_pub.read_text().strip()))
    return LedgerIndex(reader.entries(), verified=reader.verified)


def last_result(city: Scenario) -> str:
    return list(city.results)[-1]


def expected_readings(city: Scenario, result: str) -> set[str]:
    parents, _, _ = city.results[result]
    out = {p for p in parents if p.startswith("reading:")}
    for parent in parents:
        if parent in city.results:
            out |= expected_readings(city, parent)
    return out


# --- lineage ---------------------------------------------------------------------------------------


def test_lineage_goes_back_to_every_reading_and_device(city: Scenario, index: LedgerIndex):
    result = last_result(city)
    answer = query.lineage(index, result)
    assert set(answer["readings"]) == expected_readings(city, result) and len(answer["readings"]) == 12
    assert answer["devices"] == ["s1", "s2"] and answer["missing"] == [] and answer["verified"]
    assert set(answer["results"]) == set(city.results)
    root = answer["lineage"]
    _, height, record_id = city.results[result]
    assert (root["kind"], root["height"], root["record"], root["proposer"]) == ("result", height, record_id, "analyser")
    assert root["ran_on"] == [{"container": "analyser:0:n3:3", "node": "n3", "joined": "4/1"}]
    reading = next(child for child in root["derived_from"] if child["kind"] == "reading")
    device, reading_height, _ = city.readings[reading["data"]]
    assert reading["source"] == device and reading["height"] == reading_height
    assert reading["source_identity"]["joined"] == ("1/0" if device == "s1" else "1/1")
    assert reading["proposer"] == "collector" and reading["derived_from"] == []


def test_lineage_by_record_id_or_command_and_rendering(city: Scenario, index: LedgerIndex):
    result = last_result(city)
    _, _, record_id = city.results[result]
    by_record = query.lineage(index, record_id)
    assert by_record["lineage"]["data"] == result
    command_id, fired_by, _, _ = city.commands[-1]
    via_command = query.lineage(index, command_id)
    assert via_command["command"]["actuator"] == "tl-j1" and via_command["lineage"]["data"] == fired_by
    text = query.render_lineage(via_command)
    assert text.startswith(f"command {command_id} to tl-j1") and "reading(s) from 2 device(s) (s1, s2)" in text
    assert "ran on n3 as analyser:0:n3:3" in text


def test_a_parent_outside_the_range_read_is_reported_missing(city: Scenario):
    key = PublicKey.from_hex(city.operator_pub.read_text().strip())
    later = LedgerIndex(LedgerReader(DirectorySource(city.ledger), key).entries(10, None), verified=True)
    answer = query.lineage(later, last_result(city))
    assert answer["missing"] and all(m.startswith(("reading:", "result:")) for m in answer["missing"])
    assert "NOT ON THIS LEDGER" in query.render_lineage(answer)


def test_lineage_of_something_that_is_not_data_is_refused(index: LedgerIndex):
    with pytest.raises(QueryError, match="PROV-ORCH record, not a datum"):
        query.lineage(index, "3/0")
    with pytest.raises(QueryError, match="no datum 'result:nope'"):
        query.lineage(index, "result:nope")


# --- device ----------------------------------------------------------------------------------------


def test_everything_a_device_did_between_two_times(city: Scenario, index: LedgerIndex):
    everything = query.device_activity(index, "s2")
    events = [e["event"] for e in everything["events"]]
    assert events[0] == "joined" and events[-1] == "left"
    assert everything["counts"]["data"] == sum(1 for d, _, _ in city.readings.values() if d == "s2") == 6
    window = query.device_activity(index, "s2", at(9), at(9, 999))
    assert [e["height"] for e in window["events"]] == [9, 9]
    assert {e["data"] for e in window["events"]} == {d for d, (dev, h, _) in city.readings.items() if dev == "s2" and h == 9}
    actuator = query.device_activity(index, "tl-j1")
    assert actuator["counts"] == {"command": 3, "data": 3, "joined": 1}
    text = query.render_device(window)
    assert text.startswith("s2 from 2027-01-15T08:00:09.000+00:00 to 2027-01-15T08:00:09.999+00:00: 2 record(s)")


def test_a_node_s_containers_and_placements_show_as_its_doings(index: LedgerIndex):
    answer = query.device_activity(index, "n2")
    assert answer["counts"] == {"container started": 1, "container stopped": 1, "joined": 1, "place": 1}


def test_an_unknown_device_and_a_bad_time_are_refused(index: LedgerIndex):
    with pytest.raises(QueryError, match="never joined"):
        query.device_activity(index, "ghost")
    with pytest.raises(QueryError, match="neither ISO 8601"):
        query.parse_time("yesterday")
    assert query.parse_time("2027-01-15T08:00:09Z") == at(9) == query.parse_time("1800000009")


# --- placements --------------------------------------------------------------------------------------


def test_placements_show_the_loads_and_check_the_rule(city: Scenario, index: LedgerIndex):
    answer = query.placements(index)
    decisions = answer["decisions"]
    assert [(d["replica"], d["node"], d["height"]) for d in decisions] == city.placements
    assert all(d["chosen_is_least_loaded"] for d in decisions)
    assert decisions[0]["loads"] == LOADS and decisions[0]["proposer"] == "n1"
    moved = decisions[-1]
    assert moved["replaces"] == {"node": "n2", "why": "moved by the operator"} and "n2" in moved["excluded"]
    assert [d["replica"] for d in query.placements(index, "analyser")["decisions"]] == ["analyser:0"]
    text = query.render_placements(query.placements(index, "collector"))
    assert "n2         cpu 0.050  memory 0.100  score 0.075  chosen" in text
    assert "excluded: not alive" in text and "NOT" not in text


def test_a_placement_against_the_rule_is_flagged(tmp_path: Path):
    builder = LedgerBuilder(tmp_path)
    builder.genesis()
    builder.block([builder.seal("n1", _place("svc:0", "n1", at(1)))])  # n1 is the busiest in LOADS
    index = LedgerIndex(LedgerReader(DirectorySource(builder.ledger), builder.operator.public_key).entries(),
                        verified=True)
    decision = query.placements(index)["decisions"][0]
    assert decision["chosen_is_least_loaded"] is False and decision["least_loaded"] == "n2"
    assert "NOT the least-loaded eligible node (n2)" in query.render_placements(query.placements(index))


# --- commands ----------------------------------------------------------------------------------------


def test_commands_with_their_rule_and_what_fired_them(city: Scenario, index: LedgerIndex):
    answer = query.commands(index, "tl-j1")
    items = answer["commands"]
    assert [(c["command"], c["height"]) for c in items] == [(cid, h) for cid, _, h, _ in city.commands]
    first = items[0]
    assert first["setting"] == {"colour": "green"} and first["rule"] == "j1-busy" and first["proposer"] == "n1"
    assert first["fired_by"]["object"] == city.commands[0][1] and first["fired_by"]["summary"] == {"cars_mean": 4.5}
    assert first["contract"]["definition"]["when"] == {"field": "cars_mean", "above": 3.0}
    assert first["contract"]["service"] == "analyser" and first["contract"]["deployed"] == "2/1"
    assert items[1]["rule"] == "j1-quiet" and items[1]["contract"]["definition"]["then"][0]["set"] == {"colour": "red"}
    text = query.render_commands(answer)
    assert text.startswith("3 command(s) recorded for tl-j1") and 'rule as deployed with analyser at 2/1' in text
    assert query.commands(index, "s1")["commands"] == []
    with pytest.raises(QueryError, match="never joined"):
        query.commands(index, "tl-9")


# --- The command line ------------------------------------------------------------------------------------


def test_cli_answers_in_text_and_json(city: Scenario, capsys: pytest.CaptureFixture[str]):
    key = str(city.operator_pub)
    assert ledger_cli.main(["query", str(city.ledger), "lineage", last_result(city), "--operator-key", key]) == 0
    assert "12 reading(s) from 2 device(s)" in capsys.readouterr().out
    assert ledger_cli.main(["query", str(city.ledger), "commands", "tl-j1", "--json", "--operator-key", key]) == 0
    assert len(json.loads(capsys.readouterr().out)["commands"]) == 3
    assert ledger_cli.main(["query", str(city.ledger), "device", "s1", "--since", "2027-01-15T08:00:09Z",
                            "--until", "2027-01-15T08:00:09.5Z", "--json", "--operator-key", key]) == 0
    assert {e["height"] for e in json.loads(capsys.readouterr().out)["events"]} == {9}
    assert ledger_cli.main(["query", str(city.ledger), "placements", "--service", "analyser"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("1 placement decision(s) for service analyser") and "NOT" in captured.err
    assert ledger_cli.main(["query", str(city.ledger), "lineage", "result:nope"]) == 2
    assert "no datum" in capsys.readouterr().err
