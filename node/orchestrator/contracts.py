"""Service contracts: rules of the form "IF uses(generates[...]) THEN actions", fired by committed records.

The trusted-orchestration paper (section IV.C) has two kinds, and a service spec declares both:

    contracts = [
      # passive: a car connecting to traffic management is acknowledged; its identity and its
      # location/direction data are recorded (the collector records its readings with this
      # service's collector as receiver), nothing is actuated
      { name = "car-connects", kind = "passive", on = "join", devices = "car-*", then = ["acknowledge"] },
      # executable: traffic management sets a light's colour: PROV-ORCH first, then the signed command
      { name = "j1-busy", kind = "executable", on = "result",
        when = { field = "density.j1.cars_mean", above = 3.0 },
        then = [ { command = "tl-j1", set = { colour = "green" } } ] },
    ]

`on` names what the rule uses:
    "join"    a committed PROV-ID-create of a device whose name matches the `devices` glob
    "result"  a committed PROV-DATA that this service generated (origin analyse:<service>, the
              analyser's results), whose `summary` attribute the `when` condition reads
`when` (optional) compares one dotted field of the result summary: `above`, `below` (numbers) or
`equals`; a field that is missing, or of the wrong type, means the rule does not fire.
`then` holds "acknowledge" (tell a joined device, on its cmd topic, that its join is on the ledger)
and, in executable contracts only, `{ command = <actuator>, set = { key = value, ... } }`.

Determinism: `fire` is a pure function of the deployed contracts and one committed record, so every
node computes the same intents from the same ledger. Each command's id is derived from the contract,
the action's position and the record's id (`command_id`); Table II records a command id at most once
(pattern.command_not_issued), so a rule that would fire twice for one record fires once even when two
leaders propose it across a failover.

What this module must never do: I/O, read a clock, or look at anything but committed records: a
contract firing on a proposal that never commits would act on something the ledger does not hold.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from tomq.records import DATA, ID_CREATE, Identity, Provenance, Record

KINDS = ("passive", "executable")
TRIGGERS = ("join", "result")
COMPARISONS = ("above", "below", "equals")
ACKNOWLEDGE = "acknowledge"
MAX_ACTIONS = 16
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,47}")  # ends up inside a command id (see command_id)
_DEVICE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_FIELD = re.compile(r"[A-Za-z0-9_-]{1,64}(\.[A-Za-z0-9_-]{1,64}){0,7}")
_SETTING_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,31}")
_GLOB = re.compile(r"[A-Za-z0-9._*?\[\]!-]{1,64}")


class ContractError(ValueError):
    """A contract table is not valid; `field` is the dotted path inside it (e.g. "when.above")."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


@dataclass(frozen=True, slots=True)
class Condition:
    field: str
    comparison: str  # one of COMPARISONS
    value: float | str | bool

    def holds(self, summary: Any) -> bool:
        found = _lookup(summary, self.field)
        if self.comparison == "equals":
            return found == self.value and type(found) is type(self.value)
        if isinstance(found, bool) or not isinstance(found, int | float) or not math.isfinite(found):
            return False
        assert isinstance(self.value, int | float)
        return found > self.value if self.comparison == "above" else found < self.value


@dataclass(frozen=True, slots=True)
class CommandAction:
    actuator: str
    setting: tuple[tuple[str, Any], ...]  # sorted (key, value) pairs: hashable, one order


@dataclass(frozen=True, slots=True)
class Contract:
    service: str  # the service whose spec declares it
    name: str
    kind: str
    on: str
    devices: str | None  # glob, for on = "join"
    when: Condition | None
    acknowledge: bool
    commands: tuple[CommandAction, ...]


@dataclass(frozen=True, slots=True)
class Acknowledge:
    """Tell `device` that its join is on the ledger (at `height`), as `contract` promised."""

    contract: str
    device: str
    height: int
    trigger: str  # the record id of the join


@dataclass(frozen=True, slots=True)
class Command:
    """Record, then send, `setting` to `actuator`: what `contract` decided on record `trigger`."""

    contract: str
    command_id: str
    actuator: str
    setting: dict[str, Any]
    trigger: str  # the id of the committed record that fired the rule
    height: int  # where that record is

    def reason(self) -> dict[str, Any]:
        """The PROV-ORCH record's reason: what the actuator checks, what an auditor reads."""
        return {"setting": dict(self.setting), "rule": self.contract, "trigger": self.trigger,
                "trigger_height": self.height}


Intent = Acknowledge | Command


def command_id(contract: str, action_index: int, trigger: str) -> str:
    """`cmd:<contract>.<n>:<record id>`: one id per (rule, action, record), within ledger name rules."""
    return f"cmd:{contract}.{action_index}:{trigger}"


def parse(service: str, raw: Mapping[str, Any]) -> Contract:
    """A contract table as written in a spec; ContractError names the offending field."""
    known = {"name", "kind", "on", "devices", "when", "then"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ContractError(unknown[0], f"unknown key (expected {', '.join(sorted(known))})")
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ContractError("name", f"must be 1-48 letters, digits, '_' or '-', got {name!r}")
    kind = raw.get("kind")
    if kind not in KINDS:
        raise ContractError("kind", f"must be one of {', '.join(KINDS)}, got {kind!r}")
    on = raw.get("on")
    if on not in TRIGGERS:
        raise ContractError("on", f"must be one of {', '.join(TRIGGERS)}, got {on!r}")
    devices = raw.get("devices")
    if on == "join":
        if not isinstance(devices, str) or not _GLOB.fullmatch(devices):
            raise ContractError("devices", f"a rule on 'join' needs a device name glob like 'car-*', got {devices!r}")
    elif devices is not None:
        raise ContractError("devices", "only a rule on 'join' selects devices")
    when = _parse_when(raw.get("when")) if "when" in raw else None
    if when is not None and on != "result":
        raise ContractError("when", "only a rule on 'result' has a condition (a join has no summary to compare)")
    acknowledge, commands = _parse_then(raw.get("then"), kind, on)
    return Contract(service, name, kind, on, devices, when, acknowledge, commands)


def parse_all(service: str, raws: Iterable[Mapping[str, Any]]) -> tuple[Contract, ...]:
    contracts = []
    names: set[str] = set()
    for index, raw in enumerate(raws):
        try:
            contract = parse(service, raw)
        except ContractError as exc:
            raise ContractError(f"[{index}].{exc.field}", exc.problem) from None
        if contract.name in names:
            raise ContractError(f"[{index}].name", f"{contract.name!r} is declared twice")
        names.add(contract.name)
        contracts.append(contract)
    return tuple(contracts)


def fire(contracts: Iterable[Contract], record: Record, record_id: str, height: int) -> list[Intent]:
    """What the deployed `contracts` decide on one committed record, in declaration order."""
    intents: list[Intent] = []
    for contract in contracts:
        if not _uses(contract, record):
            continue
        if contract.acknowledge:
            identity = record.structure
            assert isinstance(identity, Identity)  # _uses admits only device joins for acknowledge rules
            intents.append(Acknowledge(contract.name, identity.object, height, record_id))
        for index, action in enumerate(contract.commands):
            intents.append(Command(contract.name, command_id(contract.name, index, record_id), action.actuator,
                                   dict(action.setting), record_id, height))
    return intents


def _uses(contract: Contract, record: Record) -> bool:
    structure = record.structure
    if contract.on == "join":
        return (record.state == ID_CREATE and isinstance(structure, Identity) and structure.kind == "device"
                and contract.devices is not None and fnmatch.fnmatchcase(structure.object, contract.devices))
    if record.state != DATA or not isinstance(structure, Provenance):
        return False
    if structure.origin != f"analyse:{contract.service}":
        return False
    return contract.when is None or contract.when.holds(record.attributes.get("summary"))


def _lookup(value: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def _parse_when(raw: Any) -> Condition:
    if not isinstance(raw, Mapping):
        raise ContractError("when", f"must be a table like {{ field = \"a.b\", above = 3 }}, got {raw!r}")
    unknown = sorted(set(raw) - {"field", *COMPARISONS})
    if unknown:
        raise ContractError(f"when.{unknown[0]}", f"unknown key (expected field and one of {', '.join(COMPARISONS)})")
    field = raw.get("field")
    if not isinstance(field, str) or not _FIELD.fullmatch(field):
        raise ContractError("when.field", f"must be a dotted field of the result summary, got {field!r}")
    present = [c for c in COMPARISONS if c in raw]
    if len(present) != 1:
        raise ContractError("when", f"needs exactly one of {', '.join(COMPARISONS)}, got {len(present)}")
    comparison = present[0]
    value = raw[comparison]
    if comparison in ("above", "below"):
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ContractError(f"when.{comparison}", f"must be a finite number, got {value!r}")
        value = float(value)
    elif not isinstance(value, str | int | float | bool):
        raise ContractError("when.equals", f"must be text, a number or a boolean, got {value!r}")
    return Condition(field, comparison, value)


def _parse_then(raw: Any, kind: str, on: str) -> tuple[bool, tuple[CommandAction, ...]]:
    if not isinstance(raw, list) or not raw:
        raise ContractError("then", "must be a non-empty list of actions")
    if len(raw) > MAX_ACTIONS:
        raise ContractError("then", f"holds {len(raw)} actions, at most {MAX_ACTIONS}")
    acknowledge = False
    commands: list[CommandAction] = []
    for index, action in enumerate(raw):
        where = f"then[{index}]"
        if action == ACKNOWLEDGE:
            if on != "join":
                raise ContractError(where, "only a rule on 'join' acknowledges (it answers the device that joined)")
            acknowledge = True
            continue
        if not isinstance(action, Mapping):
            raise ContractError(where, f"must be \"acknowledge\" or {{ command = ..., set = {{...}} }}, got {action!r}")
        if kind == "passive":
            raise ContractError(where, "a passive contract records and acknowledges; only an executable one commands")
        unknown = sorted(set(action) - {"command", "set"})
        if unknown:
            raise ContractError(f"{where}.{unknown[0]}", "unknown key (expected command, set)")
        actuator = action.get("command")
        if not isinstance(actuator, str) or not _DEVICE.fullmatch(actuator):
            raise ContractError(f"{where}.command", f"must name an actuator, got {actuator!r}")
        setting = action.get("set")
        if not isinstance(setting, Mapping) or not setting:
            raise ContractError(f"{where}.set", "must be a non-empty table of settings, e.g. { colour = \"green\" }")
        for key, value in setting.items():
            if not isinstance(key, str) or not _SETTING_KEY.fullmatch(key):
                raise ContractError(f"{where}.set", f"setting name {key!r} must be a short identifier")
            if not isinstance(value, str | int | float | bool) or (isinstance(value, float) and not math.isfinite(value)):
                raise ContractError(f"{where}.set.{key}", f"must be text, a finite number or a boolean, got {value!r}")
        commands.append(CommandAction(actuator, tuple(sorted(setting.items()))))
    if kind == "executable" and not commands:
        raise ContractError("then", "an executable contract must command at least one actuator")
    return acknowledge, tuple(commands)
