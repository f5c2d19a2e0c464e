"""The demo's scenarios as data: which devices to enrol and run, which service specs to deploy.

Each scenario is a set of devices (sensors with a simulator and a rate, actuators with theirs) and
the TOML text of the service specs `tomq deploy` sends, exactly as an operator would write them, so
`tomq demo --keep DIR` leaves them in DIR/specs/ to read and reuse. The specs carry the contracts of
the trusted-orchestration paper (section IV.C, node/orchestrator/contracts.py): passive ones that
acknowledge a device's join, executable ones that turn an analyser result into a signed command to
an actuator, recorded first as PROV-ORCH.

What this module must never do: start anything, or hold a spec that `parse_spec` would refuse
(tests/test_demo_view.py parses every one).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

SENSOR = "sensor"
ACTUATOR = "actuator"


@dataclass(frozen=True, slots=True)
class DemoDevice:
    name: str
    role: str  # SENSOR or ACTUATOR: the role `tomq device add` enrols it with
    sim: str  # `tomq sensor --sim` or `tomq actuator --sim`
    rate: float | None = None  # readings per second (sensors); None: the simulator's default
    seed: int = 0

    def argv(self, directory: str) -> list[str]:
        """The `tomq ...` arguments that run this device against the cluster in `directory`."""
        if self.role == ACTUATOR:
            return ["actuator", directory, "--name", self.name, "--sim", self.sim]
        argv = ["sensor", directory, "--name", self.name, "--sim", self.sim, "--seed", str(self.seed)]
        if self.rate is not None:
            argv += ["--rate", f"{self.rate:g}"]
        return argv


@dataclass(frozen=True, slots=True)
class DemoService:
    name: str
    spec: str  # the TOML text of the spec file


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    summary: str  # one line: what the demo shows
    devices: tuple[DemoDevice, ...]
    services: tuple[DemoService, ...]  # deployed in this order (consumers after their inputs)

    @property
    def sensors(self) -> tuple[DemoDevice, ...]:
        return tuple(d for d in self.devices if d.role == SENSOR)

    @property
    def actuators(self) -> tuple[DemoDevice, ...]:
        return tuple(d for d in self.devices if d.role == ACTUATOR)


def _names(devices: Iterable[DemoDevice]) -> str:
    return json.dumps([d.name for d in devices])


def _collector(name: str, devices: Iterable[DemoDevice]) -> str:
    return (f'[service]\nname = "{name}"\nprogram = "collector"\n\n'
            f"[service.inputs]\ndevices = {_names(devices)}\n")


def _analyser(name: str, inputs: Iterable[str], contracts: Iterable[str], env: str = 'EMIT_SECONDS = "1"') -> str:
    # TOML 1.0 keeps an inline table on one line: one contract per line, inside a multi-line array.
    lines = [f'[service]\nname = "{name}"\nprogram = "analyser"\nenv = {{ {env} }}']
    written = list(contracts)
    if written:
        lines.append("contracts = [\n" + "".join(f"  {c},\n" for c in written) + "]")
    lines.append(f"\n[service.inputs]\nservices = {json.dumps(list(inputs))}\n")
    return "\n".join(lines)


def _threshold_rules(prefix: str, field: str, threshold: float, actuator: str, setting: str,
                     above: str | bool, below: str | bool) -> list[str]:
    """Two executable rules on one result field: one setting above the threshold, the other below."""
    return [
        f'{{ name = "{prefix}-high", kind = "executable", on = "result", '
        f'when = {{ field = "{field}", above = {threshold} }}, '
        f'then = [ {{ command = "{actuator}", set = {{ {setting} = {json.dumps(above)} }} }} ] }}',
        f'{{ name = "{prefix}-low", kind = "executable", on = "result", '
        f'when = {{ field = "{field}", below = {threshold} }}, '
        f'then = [ {{ command = "{actuator}", set = {{ {setting} = {json.dumps(below)} }} }} ] }}',
    ]


def _smart_city() -> Scenario:
    cars = tuple(DemoDevice(f"car-{i}", SENSOR, "car", rate=1.0, seed=i) for i in range(1, 7))
    lights = tuple(DemoDevice(f"tl-{j}", ACTUATOR, "traffic-light") for j in ("j1", "j2"))
    contracts = ['{ name = "car-connects", kind = "passive", on = "join", devices = "car-*", then = ["acknowledge"] }']
    for junction in ("j1", "j2"):
        # A busy junction gets green, a quiet one red: the paper's traffic-management example.
        field = f"density.{junction}.cars_mean"
        contracts += [
            f'{{ name = "{junction}-busy", kind = "executable", on = "result", '
            f'when = {{ field = "{field}", above = 3.0 }}, '
            f'then = [ {{ command = "tl-{junction}", set = {{ colour = "green" }} }} ] }}',
            f'{{ name = "{junction}-quiet", kind = "executable", on = "result", '
            f'when = {{ field = "{field}", below = 3.0 }}, '
            f'then = [ {{ command = "tl-{junction}", set = {{ colour = "red" }} }} ] }}',
        ]
    return Scenario(
        "smart-city",
        "six cars report the traffic at two junctions; busy junctions turn their lights green",
        cars + lights,
        # A light's report is a reading too, so the collector records it as PROV-DATA.
        (DemoService("collector", _collector("collector", cars + lights)),
         # One window per junction (every car there feeds it), a result every 2 s.
         DemoService("analyser", _analyser("analyser", ["collector"], contracts,
                                           'GROUP_BY = "junction", WINDOW = "12", EMIT_SECONDS = "2"'))))


def _agriculture() -> Scenario:
    weather = (DemoDevice("temp-1", SENSOR, "temperature", rate=1.0, seed=11),
               DemoDevice("hum-1", SENSOR, "humidity", rate=1.0, seed=12),
               DemoDevice("sun-1", SENSOR, "sun", rate=1.0, seed=14))
    rain = DemoDevice("rain-1", SENSOR, "rain", rate=1.0, seed=13)
    valve = DemoDevice("v1", ACTUATOR, "valve")
    # Contract conditions name a field of a result summary, not a device, and a temperature's
    # summary has a "value" as a rain gauge's does: the gauge gets a collector and an analyser of
    # its own, so "value.mean" in the irrigation rules can only be rain.
    contracts = ['{ name = "sensor-connects", kind = "passive", on = "join", devices = "*-1", '
                 'then = ["acknowledge"] }',
                 *_threshold_rules("rain", "value.mean", 0.5, "v1", "open", above=False, below=True)]
    return Scenario(
        "agriculture",
        "a field's weather is recorded; the irrigation valve opens while it is dry and closes when it rains",
        (*weather, rain, valve),
        (DemoService("collector", _collector("collector", (*weather, valve))),
         DemoService("rain-gauge", _collector("rain-gauge", (rain,))),
         DemoService("irrigation", _analyser("irrigation", ["rain-gauge"], contracts))))


def _logistics() -> Scenario:
    readers = tuple(DemoDevice(f"rfid-{i}", SENSOR, "rfid", rate=2.0, seed=20 + i) for i in range(1, 4))
    contracts = ['{ name = "reader-connects", kind = "passive", on = "join", devices = "rfid-*", '
                 'then = ["acknowledge"] }']
    return Scenario(
        "logistics",
        "three RFID readers at a warehouse's gates record every tag they see; no actuator",
        readers,
        (DemoService("collector", _collector("collector", readers)),
         DemoService("analyser", _analyser("analyser", ["collector"], contracts))))


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (_smart_city(), _agriculture(), _logistics())}
DEFAULT_SCENARIO = "smart-city"
