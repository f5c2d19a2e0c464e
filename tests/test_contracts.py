"""Contracts (node/orchestrator/contracts.py): parsing names the field; firing is pure and exact."""

from __future__ import annotations

import pytest

from tomq.node.orchestrator.contracts import (
    Acknowledge,
    Command,
    ContractError,
    command_id,
    fire,
    parse,
    parse_all,
)
from tomq.records import DATA, ID_CREATE, ID_DELETE, Identity, Provenance, Record

PASSIVE = {"name": "car-connects", "kind": "passive", "on": "join", "devices": "car-*", "then": ["acknowledge"]}
BUSY = {"name": "j1-busy", "kind": "executable", "on": "result",
        "when": {"field": "density.j1.cars_mean", "above": 3.0},
        "then": [{"command": "tl-j1", "set": {"colour": "green"}}, {"command": "tl-j2", "set": {"colour": "red"}}]}


def join(name: str, state: str = ID_CREATE) -> Record:
    return Record(state, Identity(name, "device", b"cert"), 1000)


def result(service: str, summary: object) -> Record:
    return Record(DATA, Provenance("result:1", b"\0" * 32, f"analyse:{service}", f"publish:{service}", source=service),
                  1000, {"summary": summary})


def test_a_passive_contract_acknowledges_the_joins_it_names_and_nothing_else():
    contracts = parse_all("traffic", [PASSIVE])
    assert fire(contracts, join("car-7"), "rid", 12) == [Acknowledge("car-connects", "car-7", 12, "rid")]
    assert fire(contracts, join("bus-1"), "rid", 12) == []
    assert fire(contracts, join("car-7", ID_DELETE), "rid", 12) == []  # a leave is not a join
    assert fire(contracts, result("traffic", {}), "rid", 12) == []


@pytest.mark.parametrize(("cars", "fires"), [(3.5, True), (3.0, False), (1, False), ("many", False), (True, False)])
def test_an_executable_contract_fires_on_its_condition_only(cars, fires):
    contracts = parse_all("traffic", [BUSY])
    intents = fire(contracts, result("traffic", {"density": {"j1": {"cars_mean": cars}}}), "r1", 40)
    if not fires:
        assert intents == []
        return
    assert intents == [
        Command("j1-busy", command_id("j1-busy", 0, "r1"), "tl-j1", {"colour": "green"}, "r1", 40),
        Command("j1-busy", command_id("j1-busy", 1, "r1"), "tl-j2", {"colour": "red"}, "r1", 40),
    ]
    assert intents[0].reason() == {"setting": {"colour": "green"}, "rule": "j1-busy", "trigger": "r1",
                                   "trigger_height": 40}


def test_results_of_another_service_or_missing_fields_fire_nothing():
    contracts = parse_all("traffic", [BUSY])
    assert fire(contracts, result("other", {"density": {"j1": {"cars_mean": 9}}}), "r", 1) == []
    assert fire(contracts, result("traffic", {"density": {"j2": {"cars_mean": 9}}}), "r", 1) == []
    assert fire(contracts, result("traffic", None), "r", 1) == []


def test_the_same_record_always_gives_the_same_command_ids():
    contracts = parse_all("traffic", [BUSY])
    record = result("traffic", {"density": {"j1": {"cars_mean": 5}}})
    first = fire(contracts, record, record.record_id, 3)
    assert first == fire(parse_all("traffic", [BUSY]), record, record.record_id, 3)
    ids = {intent.command_id for intent in first if isinstance(intent, Command)}
    assert len(ids) == 2 and all(len(i) <= 128 for i in ids)


@pytest.mark.parametrize(("change", "field"), [
    ({"name": "has space"}, "name"),
    ({"kind": "sla"}, "kind"),
    ({"on": "data"}, "on"),
    ({"devices": "car-*"}, "devices"),
    ({"when": {"field": "x", "above": 1, "below": 2}}, "when"),
    ({"when": {"field": "x", "near": 1}}, "when.near"),
    ({"then": []}, "then"),
    ({"then": ["acknowledge"]}, "then[0]"),
    ({"then": [{"command": "tl/1", "set": {"c": 1}}]}, "then[0].command"),
    ({"then": [{"command": "tl1", "set": {"c": [1]}}]}, "then[0].set.c"),
    ({"extra": 1}, "extra"),
])
def test_a_bad_contract_names_its_field(change, field):
    with pytest.raises(ContractError) as caught:
        parse("traffic", {**BUSY, **change})
    assert caught.value.field == field
