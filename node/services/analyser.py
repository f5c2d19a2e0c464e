"""The analyser: other services' joint data in, windowed results out, each result a PROV-DATA record.

    python -m tomq.node.services.analyser         (started by a node; see context.py for the contract)

Inputs: `svc/<s>/out` for each spec `inputs.services` (and any `inputs.topics` filter below the
cluster root), in the collector's output form: JSON with at least "data" (the datum's ledger id),
"device", "time_ms" and "value". Anything else is acknowledged and dropped with one log line.

Per (input service, device) the analyser keeps the last WINDOW samples and summarises them
(`summarise`, pure). With env GROUP_BY = "<field>", a map value that has that text field is windowed
by the field's value instead of by device (GROUP_BY = "junction": one window per junction, fed by
every car there; the result's "device" is then the junction):

    count, first_ms, last_ms
    value:   {count, mean, min, max, trend_per_s}   over numeric values; trend_per_s is the
                                                      least-squares slope against time_ms, per second
    fields:  {<key>: {the same}}                     per numeric field of map values
    density: {<junction>: {readings, cars_mean, cars_last}}   for map values with a text "junction"
                                                      and a numeric "cars": cars per junction, the
                                                      traffic density of the smart-city scenario
    last_text: the latest text value, if any

A window emits a result when it has EMIT_EVERY new samples, EMIT_SECONDS after its oldest new
sample, or when the analyser holds MAX_HELD unacknowledged inputs in all (kept below mosquitto's
default of 20 QoS 1 messages in flight per client, which would otherwise stall delivery until the
timer fires). Settings come from the spec's env, e.g. env = { WINDOW = "20", EMIT_SECONDS = "1" }.

A result is recorded as PROV-DATA(data=result:<first 32 hex of its hash>, hash=sha256 of the result
JSON, origin=analyse:<service>, receiver=publish:<service>, source=<this service's identity>,
derived_from=<the data ids of every sample in the window>), with the device and the summary as
attributes, so that contracts (node/orchestrator/contracts.py) decide on what the ledger holds. When it commits, the result goes out on
svc/<service>/out as that JSON plus "data" and "height" (remove those two to recompute the hash),
and only then are the inputs that were new in it acknowledged. Results are at least once: after a
restart, redelivered inputs start fresh windows.

What this program must never do: acknowledge an input before the result that used it is committed
(or given up), or name in derived_from a datum it did not receive.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import sys
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tomq import canonical
from tomq.errors import InvalidTopic
from tomq.node.services.link import Inbound
from tomq.node.services.runner import ServiceProgram, ServiceRunner, run_program
from tomq.records import DATA, Provenance, Record
from tomq.topics import parse

log = logging.getLogger("tomq.service.analyser")

REMEMBERED_DONE = 100_000
MAX_SUMMARY_BYTES = 3072  # of the 4096 a record's attributes may hold (tomq.records)
_DATA_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


@dataclass(frozen=True, slots=True)
class Sample:
    data: str  # the datum's ledger id
    time_ms: int
    value: Any


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def statistics(points: Sequence[tuple[int, float]]) -> dict[str, Any]:
    """count, mean, min, max and the least-squares trend (units per second) of (time_ms, value) points."""
    values = [v for _, v in points]
    count = len(values)
    mean = sum(values) / count
    trend: float | None = None
    if count >= 2:
        seconds = [t / 1000 for t, _ in points]
        t_mean = sum(seconds) / count
        spread = sum((t - t_mean) ** 2 for t in seconds)
        if spread > 0:
            trend = sum((t - t_mean) * (v - mean) for t, v in zip(seconds, values, strict=True)) / spread
    return {"count": count, "mean": _round(mean), "min": _round(min(values)), "max": _round(max(values)),
            "trend_per_s": None if trend is None else _round(trend)}


def _round(value: float) -> float:
    return round(value, 6)


def ledger_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """The part of a summary the ledger carries, for contracts to decide on (contracts.py): all of
    it when it fits the record's attribute limit, else without the per-field statistics."""
    if len(canonical.encode(summary)) <= MAX_SUMMARY_BYTES:
        return summary
    slim = {key: value for key, value in summary.items() if key != "fields"}
    if len(canonical.encode(slim)) <= MAX_SUMMARY_BYTES:
        return slim
    return {key: summary[key] for key in ("count", "first_ms", "last_ms") if key in summary}


def summarise(samples: Sequence[Sample]) -> dict[str, Any]:
    """The result of one window (see the module docstring). Pure: same samples, same summary."""
    out: dict[str, Any] = {"count": len(samples)}
    if not samples:
        return out
    out["first_ms"] = min(s.time_ms for s in samples)
    out["last_ms"] = max(s.time_ms for s in samples)
    numbers = [(s.time_ms, n) for s in samples if (n := _number(s.value)) is not None]
    if numbers:
        out["value"] = statistics(numbers)
    fields: dict[str, list[tuple[int, float]]] = {}
    junctions: dict[str, list[float]] = {}
    last_text: str | None = None
    for sample in samples:
        value = sample.value
        if isinstance(value, str):
            last_text = value
        if not isinstance(value, dict):
            continue
        for key, item in value.items():
            number = _number(item)
            if number is not None and isinstance(key, str):
                fields.setdefault(key, []).append((sample.time_ms, number))
        junction, cars = value.get("junction"), _number(value.get("cars"))
        if isinstance(junction, str) and cars is not None:
            junctions.setdefault(junction, []).append(cars)
    if fields:
        out["fields"] = {key: statistics(points) for key, points in sorted(fields.items())}
    if junctions:
        out["density"] = {j: {"readings": len(c), "cars_mean": _round(sum(c) / len(c)), "cars_last": _round(c[-1])}
                          for j, c in sorted(junctions.items())}
    if last_text is not None:
        out["last_text"] = last_text[:256]
    return out


@dataclass
class _Window:
    source: str  # the input service
    device: str
    samples: deque[Sample]
    new: list[tuple[Sample, list[Inbound]]] = field(default_factory=list)  # not yet in a result
    first_new_at: float = 0.0


@dataclass
class _Result:
    data: str
    payload: dict[str, Any]
    inputs: list[tuple[Sample, list[Inbound]]]


class Analyser:
    def __init__(self, runner: ServiceRunner) -> None:
        self.runner = runner
        context = runner.context
        self.service = context.service
        self.window_size = int(context.setting("WINDOW", 20, minimum=1, maximum=128))
        self.emit_every = int(context.setting("EMIT_EVERY", 10, minimum=1, maximum=10_000))
        self.emit_seconds = context.setting("EMIT_SECONDS", 1.0, minimum=0.05, maximum=3600)
        self.max_held = int(context.setting("MAX_HELD", 16, minimum=1, maximum=100_000))
        self.sources = set(context.inputs("services"))
        self.group_by = context.text_setting("GROUP_BY")
        self._out_topic = runner.topics.service_out(self.service)
        self._windows: dict[tuple[str, str], _Window] = {}
        self._held: dict[str, list[Inbound]] = {}  # data id -> deliveries, until its result commits
        self._done: OrderedDict[str, None] = OrderedDict()
        self.results = 0

    def input_filters(self) -> list[str]:
        root = self.runner.topics.root
        filters = [self.runner.topics.service_out(s) for s in sorted(self.sources)]
        filters += [f"{root}/{topic}" for topic in self.runner.context.inputs("topics")]
        if not filters:
            log.error("spec inputs.services and inputs.topics are empty: this analyser has nothing to analyse")
        return filters

    def on_input(self, message: Inbound, now: float) -> None:
        try:
            parsed = parse(message.topic)
            source = parsed.params.get("service", parsed.kind)
        except InvalidTopic:
            source = message.topic
        try:
            item = json.loads(message.payload)
        except ValueError:
            item = None
        if not (isinstance(item, dict) and isinstance(item.get("data"), str) and _DATA_ID.fullmatch(item["data"])
                and isinstance(item.get("device"), str) and isinstance(item.get("time_ms"), int)
                and "value" in item):
            log.warning("dropped input on %s: not joint data (JSON with data, device, time_ms, value)", message.topic)
            self.runner.ack(message)
            return
        data = item["data"]
        if data in self._done:
            self.runner.ack(message)  # a redelivery of an input whose result has committed
            return
        held = self._held.get(data)
        if held is not None:
            held.append(message)  # a redelivery of an input still waiting for its result
            return
        label = item["device"]
        value = item["value"]
        if self.group_by is not None and isinstance(value, dict) and isinstance(value.get(self.group_by), str):
            label = value[self.group_by][:64]
        key = (source, label)
        window = self._windows.get(key)
        if window is None:
            window = self._windows[key] = _Window(source, label, deque(maxlen=self.window_size))
        sample = Sample(data, item["time_ms"], item["value"])
        window.samples.append(sample)
        deliveries = self._held[data] = [message]
        if not window.new:
            window.first_new_at = now
        window.new.append((sample, deliveries))
        if len(window.new) >= self.emit_every:
            self._emit(window, now)
        elif len(self._held) >= self.max_held:
            for other in list(self._windows.values()):
                if other.new:
                    self._emit(other, now)

    def tick(self, now: float) -> None:
        for window in list(self._windows.values()):
            if window.new and now - window.first_new_at >= self.emit_seconds:
                self._emit(window, now)

    def _emit(self, window: _Window, now: float) -> None:
        samples = list(window.samples)
        parents = list(dict.fromkeys(s.data for s in samples))
        time_ms = int(now * 1000)
        payload: dict[str, Any] = {"service": self.service, "input": window.source, "device": window.device,
                                   "time_ms": time_ms, "summary": summarise(samples), "derived_from": parents,
                                   "new": len(window.new)}
        encoded = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
        digest = hashlib.sha256(encoded).digest()
        result = _Result(f"result:{digest.hex()[:32]}", payload, window.new)
        window.new = []
        record = Record(DATA, Provenance(data=result.data, data_hash=digest, origin=f"analyse:{self.service}",
                                         receiver=f"publish:{self.service}", source=self.runner.context.identity,
                                         derived_from=tuple(parents)),
                        time_ms, {"device": window.device, "summary": ledger_summary(payload["summary"])})
        self.runner.proposer.propose(record, now=now, label=f"{result.data} ({window.device}, {len(samples)} samples)",
                                     on_commit=lambda h: self._committed(result, h),
                                     on_give_up=lambda: self._finish(result))

    def _committed(self, result: _Result, height: int) -> None:
        output = dict(result.payload, data=result.data, height=height)
        self.runner.publish(self._out_topic, json.dumps(output, sort_keys=True).encode(), 1)
        self.results += 1
        self._finish(result)

    def _finish(self, result: _Result) -> None:
        for sample, deliveries in result.inputs:
            for message in deliveries:
                self.runner.ack(message)
            deliveries.clear()
            self._held.pop(sample.data, None)
            self._done[sample.data] = None
        while len(self._done) > REMEMBERED_DONE:
            self._done.popitem(last=False)


def _program(runner: ServiceRunner) -> ServiceProgram:
    return Analyser(runner)


def main() -> int:
    return run_program(_program, "analyser")


if __name__ == "__main__":
    sys.exit(main())
