"""Service specs (node/orchestrator/spec.py): what a valid file means, and the exact line an operator
reads for each kind of mistake."""

from __future__ import annotations

import pickle
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tomq import canonical
from tomq.errors import ConfigError, TomqError
from tomq.node.orchestrator.spec import (
    DEFAULT_IMAGE,
    Constraints,
    FrozenMap,
    Inputs,
    Resources,
    ServiceSpec,
    SpecError,
    load_spec,
    parse_spec,
    spec_digest,
    spec_from_map,
)

FULL = textwrap.dedent("""
    [service]
    name = "avg-temp"
    image = "registry.local:5000/tomq/analyser@sha256:abc"
    program = "analyser"
    outputs = ["mean", "alarm"]
    replicas = 3
    restart = "always"
    env = { WINDOW = "60", UNIT = "C" }
    contracts = [ { name = "hot", kind = "executable", on = "result", when = { field = "value.mean", above = 30 }, then = [ { command = "v1", set = { open = true } } ] } ]

    [service.inputs]
    devices = ["s1", "s2"]
    services = ["collector"]
    topics = ["dev/+/data", "svc/collector/#"]

    [service.resources]
    cpu = 0.25
    memory_mb = 128

    [service.constraints]
    labels = { zone = "north", arch = "arm64" }
    nodes = ["n1", "n2", "n3"]
    anti_affinity = ["noisy"]
    spread = true
""")


def spec_text(**fields: str) -> str:
    """A minimal valid [service] table with the given raw TOML lines added or replaced."""
    lines = {"name": '"svc"', "program": '"collector"'}
    lines.update(fields)
    return "[service]\n" + "".join(f"{key} = {value}\n" for key, value in lines.items() if value)


def error_of(text: str) -> str:
    with pytest.raises(SpecError) as caught:
        parse_spec(text)
    return str(caught.value)


def test_a_full_spec_means_what_it_says():
    spec = parse_spec(FULL)
    assert spec.name == "avg-temp"
    assert spec.image == "registry.local:5000/tomq/analyser@sha256:abc"
    assert (spec.program, spec.command) == ("analyser", None)
    assert spec.inputs == Inputs(("s1", "s2"), ("collector",), ("dev/+/data", "svc/collector/#"))
    assert spec.outputs == ("mean", "alarm")
    assert spec.resources == Resources(0.25, 128)
    assert spec.constraints.labels == {"arch": "arm64", "zone": "north"}
    assert list(spec.constraints.labels) == ["arch", "zone"]  # sorted, whatever the file's order
    assert spec.constraints.nodes == ("n1", "n2", "n3")
    assert spec.constraints.anti_affinity == ("noisy",)
    assert spec.constraints.spread is True
    assert (spec.replicas, spec.restart) == (3, "always")
    assert dict(spec.env) == {"UNIT": "C", "WINDOW": "60"}
    assert spec.contracts == ({"name": "hot", "kind": "executable", "on": "result",
                               "when": {"field": "value.mean", "above": 30},
                               "then": [{"command": "v1", "set": {"open": True}}]},)


def test_a_minimal_spec_takes_every_default():
    spec = parse_spec('[service]\nname = "c"\ncommand = ["python", "-m", "thing", ""]\n')
    assert spec == ServiceSpec(name="c", command=("python", "-m", "thing", ""))
    assert spec.image == DEFAULT_IMAGE == "tomq/runtime:latest"
    assert spec.program is None
    assert spec.inputs == Inputs()
    assert spec.outputs == ("out",)
    assert spec.resources == Resources(cpu=0.1, memory_mb=64)
    assert spec.constraints == Constraints(labels={}, nodes=(), anti_affinity=(), spread=True)
    assert (spec.replicas, spec.restart, dict(spec.env), spec.contracts) == (1, "on-failure", {}, ())


def test_an_integer_cpu_is_a_float_number_of_cores():
    spec = parse_spec(spec_text() + "[service.resources]\ncpu = 2\n")
    assert spec.resources.cpu == 2.0 and type(spec.resources.cpu) is float


def test_the_map_round_trips_and_is_plain_canonical_cbor():
    spec = parse_spec(FULL)
    service_map = spec.to_map()
    assert spec_from_map(service_map) == spec
    assert canonical.decode(canonical.encode(service_map)) == service_map
    assert spec_from_map(canonical.decode(canonical.encode(service_map))) == spec
    # The map is the [service] table again, every default written out.
    assert set(service_map) == {"name", "image", "program", "inputs", "outputs", "resources", "constraints",
                                "replicas", "restart", "env", "contracts"}


def test_explicit_defaults_and_omitted_ones_give_one_digest():
    short = parse_spec(spec_text())
    spelled_out = parse_spec(spec_text(image='"tomq/runtime:latest"', replicas="1", restart='"on-failure"',
                                       outputs='["out"]') + "[service.resources]\ncpu = 0.1\nmemory_mb = 64\n")
    assert short == spelled_out
    assert spec_digest(short) == spec_digest(spelled_out)
    assert len(spec_digest(short)) == 64
    assert spec_digest(short) != spec_digest(parse_spec(spec_text(replicas="2")))


def test_a_map_is_checked_like_a_file():
    service_map = parse_spec(spec_text()).to_map()
    service_map["replicas"] = 65
    with pytest.raises(SpecError, match=r"^request: service\.replicas: must be an integer from 1 to 64, got 65$"):
        spec_from_map(service_map, "request")


def test_constructing_an_invalid_spec_directly_fails_too():
    with pytest.raises(SpecError, match=r"service\.name"):
        ServiceSpec(name="a/b", program="collector")
    with pytest.raises(SpecError, match="exactly one of command"):
        ServiceSpec(name="a")
    with pytest.raises(SpecError, match=r"service\.command: must be a list, got \"python x\.py\""):
        ServiceSpec(name="a", command="python x.py")
    with pytest.raises(SpecError, match=r"service\.resources\.cpu: .* got true"):
        ServiceSpec(name="a", program="collector", resources=Resources(True, 64))


def test_a_spec_built_directly_is_normalised_like_a_parsed_one():
    built = ServiceSpec(name="c", command=["run", "it"], outputs=["out"],
                        resources=Resources(2, 64), constraints=Constraints(labels={"b": "1", "a": "2"}))
    parsed = parse_spec('[service]\nname = "c"\ncommand = ["run", "it"]\n'
                        "[service.resources]\ncpu = 2.0\n[service.constraints]\nlabels = { a = '2', b = '1' }\n")
    assert built == parsed and hash(built) == hash(parsed)
    assert built.command == ("run", "it") and type(built.resources.cpu) is float
    assert isinstance(built.constraints.labels, FrozenMap)


def test_specs_are_hashable_and_picklable():
    spec = parse_spec(FULL)
    assert hash(spec) == hash(parse_spec(FULL))
    assert pickle.loads(pickle.dumps(spec)) == spec
    assert FrozenMap({"b": "2", "a": "1"}) == FrozenMap([("a", "1"), ("b", "2")])
    with pytest.raises(TypeError):
        spec.constraints.labels["zone"] = "south"


def test_spec_errors_are_config_errors():
    assert issubclass(SpecError, ConfigError) and issubclass(SpecError, TomqError)


@pytest.mark.parametrize("text, message", [
    (spec_text(replicas="0"), "spec.toml: service.replicas: must be an integer from 1 to 64, got 0"),
    (spec_text(replicas="65"), "spec.toml: service.replicas: must be an integer from 1 to 64, got 65"),
    (spec_text(replicas='"3"'), 'spec.toml: service.replicas: must be an integer from 1 to 64, got "3"'),
    (spec_text(replicas="true"), "spec.toml: service.replicas: must be an integer from 1 to 64, got true"),
    (spec_text(replica="3"), "spec.toml: service.replica: unknown field (did you mean replicas?)"),
    (spec_text(imgae='"x"'), "spec.toml: service.imgae: unknown field (did you mean image?)"),
    (spec_text(zzz="1"), "spec.toml: service.zzz: unknown field; known fields: name, image, command, program, "
                         "inputs, outputs, resources, constraints, replicas, restart, env, contracts"),
    ("[servce]\n", "spec.toml: servce: unknown field (did you mean service?)"),
    ("", "spec.toml: service: missing: a spec file needs a [service] table"),
    ("service = 3\n", "spec.toml: service: must be a table, got 3"),
    (spec_text(name=""), "spec.toml: service.name: missing: every service needs a name"),
    (spec_text(name='"a/b"'), 'spec.toml: service.name: must be a name of 1-64 of A-Z a-z 0-9 . _ -, starting '
                             'with a letter or digit, got "a/b"'),
    (spec_text(name='"svc:1"'), "service.name: must be a name"),
    (spec_text(name='"' + "x" * 65 + '"'), "service.name: must be a name"),
    (spec_text(program=""), "spec.toml: service.command: set exactly one of command (a list of strings) and "
                            "program ('collector' or 'analyser')"),
    (spec_text(command='["x"]'), "set exactly one of command"),
    (spec_text(program='"janitor"'), 'spec.toml: service.program: must be one of collector, analyser, got "janitor"'),
    (spec_text(program="", command='"python x.py"'), 'service.command: must be a list, got "python x.py"'),
    (spec_text(program="", command='[""]'), "service.command[0]: the program to run cannot be empty"),
    (spec_text(program="", command='["x", 3]'), "service.command[1]: must be a string without NUL characters, got 3"),
    (spec_text(image='"has space"'), 'service.image: must be an image reference like'),
    (spec_text(outputs="[]"), "spec.toml: service.outputs: must not be empty"),
    (spec_text(outputs='["a", "a"]'), 'spec.toml: service.outputs: lists "a" twice'),
    (spec_text(restart='"sometimes"'), "spec.toml: service.restart: must be one of 'no', 'on-failure', 'always', "
                                      'got "sometimes"'),
    (spec_text(env="{ 1X = 'v' }"), "spec.toml: service.env.1X: key must be a shell variable name"),
    (spec_text(env="{ X = 1 }"), "spec.toml: service.env.X: must be a string, got 1"),
    (spec_text(contracts="{ a = 1 }"), "spec.toml: service.contracts: must be a list of tables, got a table"),
    (spec_text(contracts="[1]"), "spec.toml: service.contracts[0]: must be a table, got 1"),
    (spec_text(contracts="[{ when = 1979-05-27 }]"), "service.contracts[0].when: must be a string, number, boolean, "
                                                    "list or table (dates and times are not allowed), got a date"),
    (spec_text(contracts="[{ x = nan }]"), "service.contracts[0].x: must be a finite number, got nan"),
    (spec_text(contracts='[{ name = "a", kind = "sla", on = "join", devices = "c*", then = ["acknowledge"] }]'),
     "spec.toml: service.contracts[0].kind: must be one of passive, executable, got 'sla'"),
    (spec_text(contracts='[{ name = "a", kind = "passive", on = "join", then = ["acknowledge"] }]'),
     "spec.toml: service.contracts[0].devices: a rule on 'join' needs a device name glob like 'car-*', got None"),
    (spec_text(contracts='[{ name = "a", kind = "passive", on = "result", then = [{ command = "tl", set = { c = 1 } }] }]'),
     "spec.toml: service.contracts[0].then[0]: a passive contract records and acknowledges; only an executable one commands"),
    (spec_text(contracts='[{ name = "a", kind = "executable", on = "result", when = { field = "x", above = "high" }, '
                         'then = [{ command = "tl", set = { c = 1 } }] }]'),
     "spec.toml: service.contracts[0].when.above: must be a finite number, got 'high'"),
    (spec_text(contracts='[{ name = "a", kind = "executable", on = "result", then = [{ command = "tl", set = {} }] }]'),
     "spec.toml: service.contracts[0].then[0].set: must be a non-empty table of settings, e.g. { colour = \"green\" }"),
    (spec_text(contracts='[{ name = "a", kind = "passive", on = "join", devices = "c*", then = ["acknowledge"] }, '
                         '{ name = "a", kind = "passive", on = "join", devices = "d*", then = ["acknowledge"] }]'),
     "spec.toml: service.contracts[1].name: 'a' is declared twice"),
    (spec_text(inputs="{ device = ['s1'] }"), "spec.toml: service.inputs.device: unknown field (did you mean devices?)"),
    (spec_text(inputs="{ devices = ['s+'] }"), "service.inputs.devices[0]: must be a name"),
    (spec_text(inputs="{ services = ['svc'] }"), "service.inputs.services: a service cannot consume its own output"),
    (spec_text(inputs="{ topics = ['/dev/x'] }"), "service.inputs.topics[0]: \"/dev/x\" must be relative to the cluster"),
    (spec_text(inputs="{ topics = ['tomq/c1/dev/+/data'] }"), "must be relative to the cluster root"),
    (spec_text(inputs="{ topics = ['dev/#/data'] }"), 'service.inputs.topics[0]: "dev/#/data": level "#" must be +, '
                                                      "a final #, or 1-64"),
    (spec_text(inputs="{ topics = ['dev//data'] }"), 'level "" must be +'),
    (spec_text(inputs="{ topics = ['dev/a+/data'] }"), 'level "a+" must be +'),
    (spec_text(resources="{ cpu = 0 }"), "spec.toml: service.resources.cpu: must be a number of cores above 0 and at "
                                         "most 1024, got 0"),
    (spec_text(resources="{ cpu = -0.5 }"), "service.resources.cpu: must be a number of cores above 0"),
    (spec_text(resources="{ cpu = inf }"), "service.resources.cpu: must be a number of cores above 0 and at most "
                                           "1024, got inf"),
    (spec_text(resources="{ cpu = nan }"), "service.resources.cpu: must be a number of cores above 0"),
    (spec_text(resources="{ cpu = true }"), "service.resources.cpu: must be a number of cores above 0"),
    (spec_text(resources="{ memory_mb = 0 }"), "service.resources.memory_mb: must be an integer of MiB from 1"),
    (spec_text(resources="{ memory_mb = 1.5 }"), "service.resources.memory_mb: must be an integer of MiB from 1 to "
                                                 "16777216, got 1.5"),
    (spec_text(resources="{ memroy_mb = 1 }"), "service.resources.memroy_mb: unknown field (did you mean memory_mb?)"),
    (spec_text(constraints="{ label = {} }"), "service.constraints.label: unknown field (did you mean labels?)"),
    (spec_text(constraints="{ labels = { zone = 1 } }"), "service.constraints.labels.zone: must be a string, got 1"),
    (spec_text(constraints="{ labels = { 'a=b' = 'c' } }"), "service.constraints.labels.a=b: key must be 1-128 of"),
    (spec_text(constraints="{ labels = { zone = \"a\\nb\" } }"), "service.constraints.labels.zone: must be printable"),
    (spec_text(constraints="{ nodes = ['n1', 'n1'] }"), 'service.constraints.nodes: lists "n1" twice'),
    (spec_text(constraints="{ anti_affinity = ['svc'] }"), "service.constraints.anti_affinity: names the service "
                                                           "itself (svc); use spread = true"),
    (spec_text(constraints="{ spread = 'yes' }"), 'service.constraints.spread: must be true or false, got "yes"'),
    (spec_text(replicas="3", constraints="{ nodes = ['n1', 'n2'] }"),
     "spec.toml: service.replicas: 3 replicas cannot spread over the 2 nodes of constraints.nodes; lower replicas, "
     "allow more nodes or set spread = false"),
    (spec_text(replicas="3", program="= = 1"), "spec.toml: line 3, column 11: invalid TOML: Invalid value"),
    ("[service]\nname = \"a\"\nname = \"b\"\n", "spec.toml: line 3, column"),
])
def test_each_mistake_is_named_by_file_and_field(text, message):
    got = error_of(text)
    assert got.startswith(message) or message in got, got
    assert "\n" not in got


def test_replicas_may_outnumber_allowed_nodes_when_not_spread():
    spec = parse_spec(spec_text(replicas="3", constraints="{ nodes = ['n1', 'n2'], spread = false }"))
    assert spec.replicas == 3 and spec.constraints.spread is False


def test_load_spec_names_the_file(tmp_path):
    path = tmp_path / "avg.toml"
    path.write_text(spec_text(replicas="0"))
    with pytest.raises(SpecError, match=rf"^{path}: service.replicas: must be an integer"):
        load_spec(path)
    path.write_text(FULL)
    assert load_spec(path) == parse_spec(FULL)
    with pytest.raises(SpecError, match=r"missing.toml: file: cannot read: No such file"):
        load_spec(tmp_path / "missing.toml")
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(SpecError, match="file: not UTF-8"):
        load_spec(path)


# --- properties ---------------------------------------------------------------------------------

_names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,10}", fullmatch=True)
_text = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\0"), max_size=8)


@st.composite
def service_maps(draw):
    name = draw(_names)
    others = st.lists(_names.filter(lambda other: other != name), unique=True, max_size=3)
    service: dict = {"name": name}
    if draw(st.booleans()):
        service["program"] = draw(st.sampled_from(["collector", "analyser"]))
    else:
        service["command"] = [draw(_names), *draw(st.lists(_text, max_size=3))]
    if draw(st.booleans()):
        service["inputs"] = {"devices": draw(st.lists(_names, unique=True, max_size=3)),
                             "services": draw(others)}
    if draw(st.booleans()):
        service["resources"] = {"cpu": draw(st.floats(min_value=0.001, max_value=64)),
                                "memory_mb": draw(st.integers(1, 1 << 16))}
    spread = draw(st.booleans())
    replicas = draw(st.integers(1, 64))
    nodes = draw(st.lists(_names, unique=True, max_size=5))
    if spread and nodes:
        replicas = min(replicas, len(nodes))
    service["constraints"] = {"labels": draw(st.dictionaries(_names, _names, max_size=3)), "nodes": nodes,
                              "anti_affinity": draw(others), "spread": spread}
    service["replicas"] = replicas
    service["env"] = draw(st.dictionaries(st.from_regex(r"[A-Z_][A-Z0-9_]{0,6}", fullmatch=True), _text, max_size=3))
    globs = st.from_regex(r"[a-z]{1,5}-?\*?", fullmatch=True)
    settings_ = st.dictionaries(st.from_regex(r"[a-z][a-z0-9_]{0,6}", fullmatch=True),
                                st.integers(-100, 100) | _text | st.booleans(), min_size=1, max_size=2)
    joins = st.builds(lambda n, g: {"name": n, "kind": "passive", "on": "join", "devices": g, "then": ["acknowledge"]},
                      st.from_regex(r"j[a-z0-9]{0,6}", fullmatch=True), globs)
    results = st.builds(lambda n, f, v, a, s: {"name": n, "kind": "executable", "on": "result",
                                               "when": {"field": f, "above": v}, "then": [{"command": a, "set": s}]},
                        st.from_regex(r"r[a-z0-9]{0,6}", fullmatch=True), st.from_regex(r"[a-z]{1,4}(\.[a-z]{1,4})?",
                                                                                        fullmatch=True),
                        st.floats(-1e6, 1e6), _names, settings_)
    service["contracts"] = draw(st.lists(joins | results, max_size=3, unique_by=lambda c: c["name"]))
    return service


@settings(max_examples=100, deadline=None)
@given(service_maps())
def test_every_valid_map_round_trips_through_canonical_cbor(service_map):
    spec = spec_from_map(service_map)
    again = spec_from_map(canonical.decode(canonical.encode(spec.to_map())))
    assert again == spec
    assert again.to_map() == spec.to_map()
    assert spec_digest(again) == spec_digest(spec)


@settings(max_examples=100, deadline=None)
@given(service_maps(), st.text(min_size=1, max_size=12).filter(lambda key: key not in {
    "name", "image", "command", "program", "inputs", "outputs", "resources", "constraints", "replicas",
    "restart", "env", "contracts"}))
def test_any_unknown_key_is_refused_by_name(service_map, key):
    service_map[key] = 1
    with pytest.raises(SpecError) as caught:
        spec_from_map(service_map)
    assert caught.value.field == f"service.{key}"
    assert caught.value.problem.startswith("unknown field")
