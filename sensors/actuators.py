"""Actuators: devices that act only on cluster-signed commands backed by a committed, certified record.

Two simulated pieces of hardware hold state and check settings: `TrafficLight` ({"colour": "red" |
"amber" | "green"}) and `IrrigationValve` ({"open": true|false} or {"flow": 0..100}, percent).
`Actuator` runs one of them as a cluster member on the sensor SDK (tomq.sensors.device.Device), so an
actuator joins, leaves and numbers its envelopes exactly as a sensor does: a retained signed join on
dev/<name>/state per connection (seq S, its last will "leave"/"vanished" S+1, one persistent
SequenceCounter), the subscription to dev/<name>/cmd (QoS 1), readings through the durable outbox.

For each envelope on dev/<name>/cmd: CommandChecker (sensors/command.py), then the hardware's own check
of the setting, then act, then report: an ordinary signed reading on dev/<name>/data with value =
{<the new state>, "command": <command id>, "height": <block height>}, which the cluster's collector
records as PROV-DATA, so what the actuator did becomes a record too. Refusals go out one line each
(logged, or to `on_event`) and are counted by `refusal_reason` key; a refused command leaves the
hardware's state exactly as it was.

Ordering rule: the hardware acts only after the command's (height, index) mark is on disk (the checker
writes it before returning), and the report is sealed only after acting, so a report never claims what
the hardware did not do and a crash in between can lose a report but never repeat an action.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tomq import canonical
from tomq import cluster as clusters
from tomq.errors import ConfigError, EnvelopeRejected, UsageError
from tomq.identity import SigningKey
from tomq.node.services.readings import seal_reading
from tomq.sensors.command import (
    DEFAULT_MAX_AGE_S,
    Command,
    CommandChecker,
    CommandRejected,
    quorum_from_cluster,
    refusal_reason,
)
from tomq.sensors.device import Device
from tomq.wire import SequenceCounter

log = logging.getLogger("tomq.sensors.actuator")

ACK_TYPE = "ack"  # node/actuation.py: a passive contract's acknowledgement of a device's join

EventSink = Callable[[str], None]


class BadSetting(CommandRejected):
    """A certified command whose setting this device cannot carry out."""

    reason = "bad-setting"


class Hardware(Protocol):
    """What an actuator drives: holds its state, checks a setting before changing anything."""

    name: str
    kind: str

    @property
    def state(self) -> dict[str, Any]: ...

    def apply(self, setting: Mapping[str, Any]) -> dict[str, Any]:
        """Carry out `setting` and return the new state; raise BadSetting and change nothing if it is bad."""
        ...

    def describe(self) -> str:
        """The state in a few words, for a log line."""
        ...


class TrafficLight:
    kind = "traffic-light"
    COLOURS = ("red", "amber", "green")

    def __init__(self, name: str, colour: str = "red") -> None:  # red: the safe state before any command
        if colour not in self.COLOURS:
            raise ValueError(f"traffic light colour {colour!r} is not one of {', '.join(self.COLOURS)}")
        self.name = name
        self.colour = colour

    @property
    def state(self) -> dict[str, Any]:
        return {"colour": self.colour}

    def apply(self, setting: Mapping[str, Any]) -> dict[str, Any]:
        if set(setting) != {"colour"}:
            raise BadSetting(f"traffic light {self.name} takes exactly {{colour}}, not "
                             f"{{{', '.join(sorted(map(str, setting)))[:80]}}}")
        colour = setting["colour"]
        if colour not in self.COLOURS:
            raise BadSetting(f"traffic light {self.name} has no colour {str(colour)[:32]!r} "
                             f"(only {', '.join(self.COLOURS)})")
        self.colour = colour
        return self.state

    def describe(self) -> str:
        return self.colour


class IrrigationValve:
    kind = "valve"

    def __init__(self, name: str, flow: int = 0) -> None:  # closed until commanded
        self.name = name
        self.flow = flow

    @property
    def state(self) -> dict[str, Any]:
        return {"open": self.flow > 0, "flow": self.flow}

    def apply(self, setting: Mapping[str, Any]) -> dict[str, Any]:
        if set(setting) == {"open"} and type(setting["open"]) is bool:
            self.flow = 100 if setting["open"] else 0
        elif set(setting) == {"flow"} and type(setting["flow"]) is int and 0 <= setting["flow"] <= 100:
            self.flow = setting["flow"]
        else:
            shown = ", ".join(f"{key}={value!r}" for key, value in sorted(setting.items(), key=lambda kv: str(kv[0])))
            raise BadSetting(f"valve {self.name} takes {{open: true|false}} or {{flow: 0..100}}, not {{{shown[:80]}}}")
        return self.state

    def describe(self) -> str:
        return f"open, flow {self.flow}%" if self.flow else "closed"


SIMULATORS: dict[str, Callable[[str], Hardware]] = {"traffic-light": TrafficLight, "valve": IrrigationValve}


class ReportSink(Protocol):
    """Where an actuator's reports go: sensors.device.Device (signed, outboxed, published), or a twin."""

    def publish(self, value: Any, unit: str | None = None, payload: bytes | None = None) -> int:
        """Seal a reading with this value and send it; return its sequence number."""
        ...


class MemoryReports:
    """The in-memory twin of Device.publish: seals readings the same way and keeps them in `sent`."""

    def __init__(self, key: SigningKey, sequence: SequenceCounter | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.key = key
        self.sequence = sequence if sequence is not None else SequenceCounter()
        self.clock = clock
        self.sent: list[bytes] = []

    def publish(self, value: Any, unit: str | None = None, payload: bytes | None = None) -> int:
        seq = self.sequence.next()
        payload_hash = hashlib.sha256(payload).digest() if payload is not None else None
        self.sent.append(seal_reading(self.key, seq=seq, time_ms=int(self.clock() * 1000), value=value, unit=unit,
                                      payload_hash=payload_hash))
        return seq


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one command envelope led to: a carried-out command and its report, or a refusal."""

    command: Command | None
    refusal: str | None  # the refusal_reason key
    message: str  # one line: "tl1 green (command X, height 42)" or "tl1 refused: ..."
    report_seq: int | None  # the sequence number of the report reading on dev/<name>/data


class Actuator:
    """One actuator: checks commands, drives its hardware, reports what it did.

    `handle` is the whole decision and needs no broker (tests drive it with MemoryReports); made by
    `from_cluster`, the actuator runs on the sensor SDK's `Device` (tomq.sensors.device), which owns
    the connection, the join and the will, the subscription to dev/<name>/cmd (its `on_command`
    feeds `handle` on the device's network thread) and the outbox the reports go through.
    """

    def __init__(self, hardware: Hardware, checker: CommandChecker, reports: ReportSink, *,
                 device: Device | None = None, clock: Callable[[], float] = time.time,
                 on_event: EventSink | None = None) -> None:
        """`on_event` gets one line per command (a state change or a refusal); without it they are logged."""
        self.hardware = hardware
        self.name = hardware.name
        self.checker = checker
        self.reports = reports
        self.device = device
        self.clock = clock
        self.on_event = on_event
        self._lock = threading.Lock()
        self._history: list[Command] = []
        self._refused: Counter[str] = Counter()

    @classmethod
    def from_cluster(cls, directory: str | Path, name: str, hardware: Hardware, *,
                     data_dir: str | Path | None = None, host: str | None = None, port: int | None = None,
                     max_age_s: float = DEFAULT_MAX_AGE_S, on_event: EventSink | None = None) -> Actuator:
        """The actuator `name` of the cluster in `directory`. Its state lives in `data_dir` (default
        DIR/members/<name>/device, the sensor SDK's): sequence counter, outbox, the last command's mark."""
        loaded = clusters.load(directory)
        member = loaded.member(name)
        if member.role != "actuator":
            raise ConfigError(f"{name} is a {member.role} in {loaded.directory}, not an actuator "
                              f"(enrol one with: tomq device add {loaded.directory} --name {name} --role actuator)")
        state_dir = Path(data_dir) if data_dir is not None else loaded.member_dir(name) / "device"
        device = Device.from_cluster_dir(directory, name, state_dir, host=host, port=port)
        checker = CommandChecker(loaded.operator, loaded.name, name, quorum_from_cluster(loaded), max_age_s,
                                 mark_path=state_dir / "command.mark")
        return cls(hardware, checker, device, device=device, on_event=on_event)

    # --- what tests and the CLI read ---------------------------------------------------------------

    @property
    def state(self) -> dict[str, Any]:
        with self._lock:
            return dict(self.hardware.state)

    @property
    def history(self) -> list[Command]:
        with self._lock:
            return list(self._history)

    @property
    def refused(self) -> dict[str, int]:
        with self._lock:
            return dict(self._refused)

    # --- the decision ----------------------------------------------------------------------------

    def handle(self, wire: bytes, now: float) -> Outcome:
        """Check one command envelope received at `now`, act on it if it passes, report, and say what happened."""
        if _envelope_type(wire) == ACK_TYPE:
            # A passive contract acknowledging our join shares the cmd topic; it asks for nothing, so it is
            # neither acted on nor counted as a refusal (its signature is not even checked).
            log.debug("%s: an acknowledgement on its cmd topic, ignored", self.name)
            return Outcome(None, None, f"{self.name} ignored an acknowledgement", None)
        with self._lock:
            try:
                command = self.checker.check(wire, now)  # the (height, index) mark is on disk after this
                new_state = self.hardware.apply(command.setting)
            except EnvelopeRejected as exc:
                reason = refusal_reason(exc)
                self._refused[reason] += 1
                outcome = Outcome(None, reason, f"{self.name} refused: {exc}", None)
            else:
                self._history.append(command)
                report_seq = self.reports.publish({**new_state, "command": command.command_id,
                                                   "height": command.height})
                outcome = Outcome(command, None, f"{self.name} {self.hardware.describe()} "
                                  f"(command {command.command_id}, height {command.height})", report_seq)
        if self.on_event is not None:
            self.on_event(outcome.message)
        elif outcome.command is None:
            log.warning("%s", outcome.message)
        else:
            log.info("%s", outcome.message)
        return outcome

    # --- the network (through the sensor SDK's Device) ------------------------------------------------

    def start(self, timeout: float = 10.0) -> None:
        """Connect (join, will, subscription to dev/<name>/cmd); raise BrokerUnavailable if not accepted in time."""
        device = self._device()
        device.on_command = lambda wire: self.handle(wire, self.clock())
        device.start(wait=timeout)

    def stop(self, timeout: float = 5.0) -> bool:
        """Leave gracefully (the retained leave replaces the join) and disconnect; False if the broker
        did not acknowledge the leave in time (the will then speaks for the actuator)."""
        device = self._device()
        left = device.leave(timeout=timeout)
        device.stop()
        return left

    def _device(self) -> Device:
        if self.device is None:
            raise UsageError(f"actuator {self.name} has no device connection (made without from_cluster)")
        return self.device


def _envelope_type(wire: bytes) -> str | None:
    """The type an envelope claims, unverified (only to tell acknowledgements from commands), or None."""
    try:
        outer = canonical.decode(wire)
        if type(outer) is not list or len(outer) != 2 or type(outer[0]) is not bytes:
            return None
        fields = canonical.decode(outer[0])
    except canonical.CanonicalDecodeError:
        return None
    kind = fields.get("type") if type(fields) is dict else None
    return kind if type(kind) is str else None
