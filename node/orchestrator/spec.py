"""Service specs: the TOML an operator writes for `tomq deploy`, checked field by field.

A spec file holds one `[service]` table (DESIGN.md §6):

    [service]
    name = "avg-temp"                      # a service name: also a topic level (svc/<name>/in)
    image = "tomq/runtime:latest"          # the default
    program = "analyser"                   # a built-in service program, or
    # command = ["python", "-m", "x"]      # ... a command line; exactly one of the two
    outputs = ["out"]                      # the default
    replicas = 2                           # 1..64, default 1
    restart = "on-failure"                 # "no" | "on-failure" (default) | "always"
    env = { WINDOW = "60" }
    contracts = [ { ... } ]                # rules fired by committed records: see contracts.py

    [service.inputs]
    devices = ["s1", "s2"]
    services = ["collector"]               # services whose output we consume
    topics = ["dev/+/data"]                # filters relative to the cluster root tomq/<cluster>/

    [service.resources]
    cpu = 0.25                             # cores, > 0, default 0.1
    memory_mb = 128                        # > 0, default 64

    [service.constraints]
    labels = { zone = "north" }            # a node must carry all of them
    nodes = ["n1", "n2", "n3"]             # allow-list; empty means any node
    anti_affinity = ["other-service"]      # never share a node with these
    spread = true                          # replicas of this service never share a node (default)

`ServiceSpec.to_map()` is the `[service]` table again, with every default written out, so one spec
has one map and one `spec_digest` however the file was written; `spec_from_map` checks a map exactly
as `parse_spec` checks a file, because the map arrives in a signed request that someone else wrote.
Every `ServiceSpec` that exists has passed those checks (its constructor runs them).

Errors are `SpecError` naming the file, the dotted field and what was wrong, one line, e.g.
`spec.toml: service.replicas: must be an integer from 1 to 64, got 0`.

What this module must never do: decide placement (placement.py does), touch a runtime, or accept a
key it does not know: a misspelt `replica = 3` silently meaning "1 replica" is the bug it exists
to prevent.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import re
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tomq import canonical
from tomq.errors import ConfigError
from tomq.node.orchestrator import contracts as contracts_module

DEFAULT_IMAGE = "tomq/runtime:latest"
PROGRAMS = ("collector", "analyser")  # the built-in service programs (node/services)
RESTART_POLICIES = ("no", "on-failure", "always")
MAX_REPLICAS = 64
MAX_CPU_CORES = 1024.0
MAX_MEMORY_MB = 1 << 24  # 16 TiB: anything above is a typo, not a request

# Service, device, node and output names become topic levels (svc/<service>/in, dev/<device>/data,
# node/<node>/load), so they follow tomq.topics' segment rule: no "/", "+", "#" and, unlike ledger
# names, no ":", which joins a service and its replica index in a replica's entity id ("avg:0").
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_IMAGE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:@-]{0,254}")
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_LABEL_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,127}")
_MAX_LABEL_VALUE = 256
_MAX_LIST = 256  # entries in any list field; a spec is a page of TOML, not a database
_TOML_POSITION = re.compile(r"^(?P<message>.*?)\s*\(at line (?P<line>\d+), column (?P<column>\d+)\)$")


def _one_line(text: str) -> str:
    return text if text.isprintable() else repr(text)[1:-1]


class SpecError(ConfigError):
    """A service spec is not valid; the message names the file, the field and the problem."""

    def __init__(self, source: str, field: str, problem: str) -> None:
        # One line whatever the spec holds: a TOML quoted key may contain a newline (found by fuzzing).
        super().__init__(f"{source}: {_one_line(field)}: {_one_line(problem)}")
        self.source = source
        self.field = field
        self.problem = problem


class FrozenMap(Mapping[str, str]):
    """An immutable, hashable str -> str map that iterates in key order (labels, env)."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, str] | Iterable[tuple[str, str]] = ()) -> None:
        self._items: dict[str, str] = dict(sorted(dict(items).items()))

    def __getitem__(self, key: str) -> str:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(tuple(self._items.items()))

    def __repr__(self) -> str:
        return f"FrozenMap({self._items!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (FrozenMap, (self._items,))


@dataclass(frozen=True, slots=True)
class Inputs:
    """What a service consumes: device data, other services' output, and raw topic filters."""

    devices: tuple[str, ...] = ()
    services: tuple[str, ...] = ()
    topics: tuple[str, ...] = ()  # MQTT filters relative to tomq/<cluster>/


@dataclass(frozen=True, slots=True)
class Resources:
    """What one replica asks for; placement counts it until the node's load report shows it."""

    cpu: float = 0.1  # cores
    memory_mb: int = 64


@dataclass(frozen=True, slots=True)
class Constraints:
    """Where a replica may run. An empty `nodes` allow-list means every node."""

    labels: Mapping[str, str] = field(default_factory=FrozenMap)
    nodes: tuple[str, ...] = ()
    anti_affinity: tuple[str, ...] = ()
    spread: bool = True  # replicas of this service never share a node


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    """One validated service spec. Build it with `parse_spec`, `load_spec` or `spec_from_map`.

    Built directly, it is checked all the same, and its parts are normalised (lists to tuples, maps
    to FrozenMaps, an integer cpu to a float), so it is hashable and equal to the parsed spec.
    """

    name: str
    image: str = DEFAULT_IMAGE
    command: tuple[str, ...] | None = None  # exactly one of command and program is set
    program: str | None = None  # one of PROGRAMS
    inputs: Inputs = field(default_factory=Inputs)
    outputs: tuple[str, ...] = ("out",)
    resources: Resources = field(default_factory=Resources)
    constraints: Constraints = field(default_factory=Constraints)
    replicas: int = 1
    restart: str = "on-failure"
    env: Mapping[str, str] = field(default_factory=FrozenMap)
    # Service contracts, each a table as written (checked by contracts.parse_all when the spec is built).
    contracts: tuple[dict[str, Any], ...] = field(default=(), hash=False)

    def __post_init__(self) -> None:
        # Whoever built it, a ServiceSpec that exists is valid: check it exactly as a file would be,
        # then keep the checked values (tuples, FrozenMaps, a float cpu) so equal specs compare equal.
        checked = _check_service(self.to_map(), f"ServiceSpec {self.name!r}")
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    def to_map(self) -> dict[str, Any]:
        """The `[service]` table with every default written out: plain types, one map per spec."""
        out: dict[str, Any] = {"name": self.name, "image": self.image}
        if self.command is not None:
            out["command"] = _as_list(self.command)
        if self.program is not None:
            out["program"] = self.program
        out["inputs"] = {"devices": _as_list(self.inputs.devices), "services": _as_list(self.inputs.services),
                         "topics": _as_list(self.inputs.topics)}
        out["outputs"] = _as_list(self.outputs)
        out["resources"] = {"cpu": self.resources.cpu, "memory_mb": self.resources.memory_mb}
        out["constraints"] = {"labels": _as_dict(self.constraints.labels),
                              "nodes": _as_list(self.constraints.nodes),
                              "anti_affinity": _as_list(self.constraints.anti_affinity),
                              "spread": self.constraints.spread}
        out["replicas"] = self.replicas
        out["restart"] = self.restart
        out["env"] = _as_dict(self.env)
        out["contracts"] = [_copy_plain(contract) for contract in self.contracts]
        return out


def _as_list(value: Any) -> Any:
    # Only real sequences become lists: a string where a list belongs must reach the check as a string.
    return list(value) if isinstance(value, list | tuple) else value


def _as_dict(value: Any) -> Any:
    return dict(value) if isinstance(value, Mapping) else value


def parse_spec(text: str, source: str = "spec.toml") -> ServiceSpec:
    """Parse the TOML text of a spec file; `source` names it in errors."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        position = _TOML_POSITION.match(message)
        if position is None:
            raise SpecError(source, "TOML", message) from None
        raise SpecError(source, f"line {position['line']}, column {position['column']}",
                        f"invalid TOML: {position['message']}") from None
    _reject_unknown(document, ("service",), "", source)
    if "service" not in document:
        raise SpecError(source, "service", "missing: a spec file needs a [service] table")
    return spec_from_map(document["service"], source)


def load_spec(path: str | Path) -> ServiceSpec:
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise SpecError(str(path), "file", f"cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise SpecError(str(path), "file", f"not UTF-8 text (byte {exc.start})") from None
    return parse_spec(text, str(path))


def spec_from_map(service_map: Mapping[str, Any], source: str = "spec") -> ServiceSpec:
    """Check a `[service]` table (from a file or from `to_map()` in a request) and build the spec."""
    return ServiceSpec(**_check_service(service_map, source))


def spec_digest(spec: ServiceSpec) -> str:
    """SHA-256 (hex) of the spec's canonical CBOR map: equal specs, equal digests."""
    return hashlib.sha256(canonical.encode(spec.to_map())).hexdigest()


# --- checking ---------------------------------------------------------------------------------

_SERVICE_KEYS = ("name", "image", "command", "program", "inputs", "outputs", "resources", "constraints",
                 "replicas", "restart", "env", "contracts")
_INPUT_KEYS = ("devices", "services", "topics")
_RESOURCE_KEYS = ("cpu", "memory_mb")
_CONSTRAINT_KEYS = ("labels", "nodes", "anti_affinity", "spread")


def _check_service(table: Any, source: str) -> dict[str, Any]:
    """The ServiceSpec keyword arguments for a valid `[service]` table; SpecError at the first defect."""
    table = _table(table, "service", source)
    _reject_unknown(table, _SERVICE_KEYS, "service.", source)
    if "name" not in table:
        raise SpecError(source, "service.name", "missing: every service needs a name")
    name = _name(table["name"], "service.name", source)
    image = table.get("image", DEFAULT_IMAGE)
    if not isinstance(image, str) or _IMAGE.fullmatch(image) is None:
        raise SpecError(source, "service.image", f"must be an image reference like {DEFAULT_IMAGE!r}, "
                        f"got {_describe(image)}")

    command = program = None
    if ("command" in table) == ("program" in table):
        raise SpecError(source, "service.command",
                        "set exactly one of command (a list of strings) and program "
                        f"({' or '.join(repr(p) for p in PROGRAMS)})")
    if "command" in table:
        command = tuple(_list(table["command"], "service.command", source, _command_arg, allow_empty=False,
                                 unique=False))
        if not command[0]:
            raise SpecError(source, "service.command[0]", "the program to run cannot be empty")
    else:
        program = table["program"]
        if not isinstance(program, str) or program not in PROGRAMS:
            raise SpecError(source, "service.program",
                            f"must be one of {', '.join(PROGRAMS)}, got {_describe(program)}")

    inputs_table = _table(table.get("inputs", {}), "service.inputs", source)
    _reject_unknown(inputs_table, _INPUT_KEYS, "service.inputs.", source)
    inputs = Inputs(
        devices=tuple(_list(inputs_table.get("devices", []), "service.inputs.devices", source, _name)),
        services=tuple(_list(inputs_table.get("services", []), "service.inputs.services", source, _name)),
        topics=tuple(_list(inputs_table.get("topics", []), "service.inputs.topics", source, _topic_filter)))
    if name in inputs.services:
        raise SpecError(source, "service.inputs.services", f"a service cannot consume its own output ({name})")

    outputs = tuple(_list(table.get("outputs", ["out"]), "service.outputs", source, _name, allow_empty=False))

    resources_table = _table(table.get("resources", {}), "service.resources", source)
    _reject_unknown(resources_table, _RESOURCE_KEYS, "service.resources.", source)
    cpu = resources_table.get("cpu", 0.1)
    if type(cpu) not in (int, float) or not (0 < cpu <= MAX_CPU_CORES) or not math.isfinite(cpu):
        raise SpecError(source, "service.resources.cpu",
                        f"must be a number of cores above 0 and at most {MAX_CPU_CORES:g}, got {_describe(cpu)}")
    memory_mb = resources_table.get("memory_mb", 64)
    if type(memory_mb) is not int or not (0 < memory_mb <= MAX_MEMORY_MB):
        raise SpecError(source, "service.resources.memory_mb",
                        f"must be an integer of MiB from 1 to {MAX_MEMORY_MB}, got {_describe(memory_mb)}")

    constraints_table = _table(table.get("constraints", {}), "service.constraints", source)
    _reject_unknown(constraints_table, _CONSTRAINT_KEYS, "service.constraints.", source)
    labels = _str_map(constraints_table.get("labels", {}), "service.constraints.labels", source,
                      _LABEL_KEY, "1-128 of A-Z a-z 0-9 . _ / -, starting with a letter or digit")
    for key, value in labels.items():
        if len(value) > _MAX_LABEL_VALUE or not value.isprintable():
            raise SpecError(source, f"service.constraints.labels.{key}",
                            f"must be printable text of at most {_MAX_LABEL_VALUE} characters")
    nodes = tuple(_list(constraints_table.get("nodes", []), "service.constraints.nodes", source, _name))
    anti_affinity = tuple(_list(constraints_table.get("anti_affinity", []), "service.constraints.anti_affinity",
                                source, _name))
    if name in anti_affinity:
        raise SpecError(source, "service.constraints.anti_affinity",
                        f"names the service itself ({name}); use spread = true to keep its replicas apart")
    spread = constraints_table.get("spread", True)
    if type(spread) is not bool:
        raise SpecError(source, "service.constraints.spread", f"must be true or false, got {_describe(spread)}")

    replicas = table.get("replicas", 1)
    if type(replicas) is not int or not (1 <= replicas <= MAX_REPLICAS):
        raise SpecError(source, "service.replicas",
                        f"must be an integer from 1 to {MAX_REPLICAS}, got {_describe(replicas)}")
    if spread and nodes and replicas > len(nodes):
        raise SpecError(source, "service.replicas",
                        f"{replicas} replicas cannot spread over the {len(nodes)} nodes of "
                        "constraints.nodes; lower replicas, allow more nodes or set spread = false")
    restart = table.get("restart", "on-failure")
    if not isinstance(restart, str) or restart not in RESTART_POLICIES:
        raise SpecError(source, "service.restart",
                        f"must be one of {', '.join(repr(p) for p in RESTART_POLICIES)}, got {_describe(restart)}")
    env = _str_map(table.get("env", {}), "service.env", source, _ENV_KEY,
                   "a shell variable name (A-Z a-z 0-9 _, not starting with a digit)")
    for key, value in env.items():
        if "\0" in value:
            raise SpecError(source, f"service.env.{key}", "cannot contain a NUL character")

    contracts_value = table.get("contracts", [])
    if not isinstance(contracts_value, list):
        raise SpecError(source, "service.contracts", f"must be a list of tables, got {_describe(contracts_value)}")
    contracts: list[dict[str, Any]] = []
    for index, contract in enumerate(contracts_value):
        where = f"service.contracts[{index}]"
        if not isinstance(contract, dict):
            raise SpecError(source, where, f"must be a table, got {_describe(contract)}")
        _check_plain(contract, where, source)
        contracts.append(_copy_plain(contract))
    try:
        contracts_module.parse_all(name, contracts)
    except contracts_module.ContractError as exc:
        raise SpecError(source, f"service.contracts{exc.field}", exc.problem) from None

    return {"name": name, "image": image, "command": command, "program": program, "inputs": inputs,
            "outputs": outputs, "resources": Resources(float(cpu), memory_mb),
            "constraints": Constraints(FrozenMap(labels), nodes, anti_affinity, spread), "replicas": replicas,
            "restart": restart, "env": FrozenMap(env), "contracts": tuple(contracts)}


def _reject_unknown(table: Mapping[str, Any], known: tuple[str, ...], prefix: str, source: str) -> None:
    for key in table:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else f"; known fields: {', '.join(known)}"
            raise SpecError(source, f"{prefix}{key}", f"unknown field{hint}")


def _table(value: Any, where: str, source: str) -> dict[str, Any]:
    if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
        raise SpecError(source, where, f"must be a table, got {_describe(value)}")
    return value


def _list(value: Any, where: str, source: str, check_item: Callable[[Any, str, str], Any],
          allow_empty: bool = True, unique: bool = True) -> list[Any]:
    if not isinstance(value, list | tuple):
        raise SpecError(source, where, f"must be a list, got {_describe(value)}")
    if not value and not allow_empty:
        raise SpecError(source, where, "must not be empty")
    if len(value) > _MAX_LIST:
        raise SpecError(source, where, f"has {len(value)} entries; at most {_MAX_LIST} are allowed")
    items = [check_item(item, f"{where}[{index}]", source) for index, item in enumerate(value)]
    if unique:
        seen: set[Any] = set()
        for item in items:
            if item in seen:
                raise SpecError(source, where, f"lists {_describe(item)} twice")
            seen.add(item)
    return items


def _name(value: Any, where: str, source: str) -> str:
    if not isinstance(value, str) or _NAME.fullmatch(value) is None:
        raise SpecError(source, where, "must be a name of 1-64 of A-Z a-z 0-9 . _ -, starting with a letter "
                        f"or digit, got {_describe(value)}")
    return value


def _command_arg(value: Any, where: str, source: str) -> str:
    if not isinstance(value, str) or "\0" in value:
        raise SpecError(source, where, f"must be a string without NUL characters, got {_describe(value)}")
    return value


def _topic_filter(value: Any, where: str, source: str) -> str:
    if not isinstance(value, str) or not value:
        raise SpecError(source, where, f"must be a topic filter like \"dev/+/data\", got {_describe(value)}")
    levels = value.split("/")
    if levels[0] in ("", "tomq"):
        raise SpecError(source, where, f"{_describe(value)} must be relative to the cluster root tomq/<cluster>/; "
                        "drop the leading part")
    for index, level in enumerate(levels):
        if level == "#" and index == len(levels) - 1:
            continue
        if level != "+" and _NAME.fullmatch(level) is None:
            raise SpecError(source, where, f"{_describe(value)}: level {_describe(level)} must be +, a final #, "
                            "or 1-64 of A-Z a-z 0-9 . _ -")
    return value


def _str_map(value: Any, where: str, source: str, key_pattern: re.Pattern[str], key_rule: str) -> dict[str, str]:
    table = _table(value, where, source)
    if len(table) > _MAX_LIST:
        raise SpecError(source, where, f"has {len(table)} entries; at most {_MAX_LIST} are allowed")
    for key, item in table.items():
        if key_pattern.fullmatch(key) is None:
            raise SpecError(source, f"{where}.{key}", f"key must be {key_rule}")
        if not isinstance(item, str):
            raise SpecError(source, f"{where}.{key}", f"must be a string, got {_describe(item)}")
    return dict(table)


def _check_plain(value: Any, where: str, source: str, depth: int = 0) -> None:
    """Contracts are kept raw but must survive canonical CBOR and compare equal after a round trip."""
    if depth > 16:
        raise SpecError(source, where, "nests deeper than 16 levels")
    if isinstance(value, bool | int | str):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise SpecError(source, where, f"must be a finite number, got {_describe(value)}")
        return
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _check_plain(item, f"{where}[{index}]", source, depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise SpecError(source, where, f"keys must be strings, got {_describe(key)}")
            _check_plain(item, f"{where}.{key}", source, depth + 1)
        return
    raise SpecError(source, where, "must be a string, number, boolean, list or table "
                    f"(dates and times are not allowed), got {_describe(value)}")


def _copy_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _copy_plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_copy_plain(item) for item in value]
    return value


def _describe(value: Any) -> str:
    """A value as it would look in TOML, or its kind when it is not a scalar."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value if len(value) <= 40 else value[:40] + "...")
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list | tuple):
        return "a list"
    return f"a {type(value).__name__}"
