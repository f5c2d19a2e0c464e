"""The collector: signed sensor readings in, one PROV-DATA record per reading on the ledger, joint data out.

    python -m tomq.node.services.collector        (started by a node; see context.py for the contract)

Inputs: `dev/<d>/data` for each spec `inputs.devices`, plus each `inputs.topics` filter below the
cluster root (e.g. "dev/+/data"); with neither, every device's data. For each message:

1. The datum's id comes from the bytes: `reading:<first 32 hex of sha256(wire)>` (readings.py).
   A message whose datum this instance is already handling or has finished is a redelivery (or a
   replay of the same bytes): it joins the first copy's fate and is never proposed twice.
2. A device the ledger does not list as joined is held up to HOLD_SECONDS, since its join may be
   committing right now, then refused. Later messages on the same device topic wait behind it, so
   that the per-device sequence check sees them in order.
3. The envelope is opened (readings.open_reading): type "reading", the signer is the topic's device,
   the signature verifies, the sequence number rises. Any failure is one log line naming the device
   and the reason; the message is acknowledged and nothing is proposed.
4. A good reading becomes PROV-DATA(data=<id>, hash=payload_hash or sha256(wire),
   origin=sample:<device>, receiver=collect:<service>, source=<device>, source_signature=<the
   device's envelope signature>) at the envelope's time, with attributes {"mode": "device-signed"}.
   A bridge-attested reading (readings.py; firmware-bridge/PROTOCOL.md), signed by serial bridge B
   for sensor D, becomes PROV-DATA(origin=sample:D, source=B, source_signature=<B's signature>,
   on_behalf_of=D) with {"mode": "bridge-attested", "device_seq": <D's own seq>}: the ledger says
   that B, not D, vouches for it, and tomq.records maps it to PROV actedOnBehalfOf(B, D).
   If the datum is already committed (seen in a certified block or an audit line, e.g. by the
   instance this one replaced) nothing is proposed.
5. Once committed: the joint data goes out on svc/<service>/out (QoS 1, JSON) and only then is the
   input acknowledged. Output is therefore at least once; consumers de-duplicate by "data".

Output JSON: {"data", "device", "seq", "time_ms", "value", "unit", "payload_hash", "height", "service",
"mode", "bridge"} with bytes as hex and "height" the ledger height of the block that holds the record.
For a bridge-attested reading "device" is the sensor, "bridge" the bridge that signed (else null),
and "seq" the sensor's own sequence number.

What this program must never do: acknowledge a good reading before its record is committed (or
given up), or propose a reading it has not verified as signed by the device of its topic.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from tomq.errors import EnvelopeRejected, InvalidTopic
from tomq.node.services.link import Inbound
from tomq.node.services.readings import READING_TYPES, Reading, open_reading, reading_data_id
from tomq.node.services.runner import ServiceProgram, ServiceRunner, run_program
from tomq.records import DATA, Provenance, Record
from tomq.topics import parse
from tomq.wire import EnvelopeOpener

log = logging.getLogger("tomq.service.collector")

HOLD_SECONDS = 5.0
REMEMBERED_DONE = 100_000


@dataclass
class _Datum:
    """One datum in flight through this instance, with every delivery of it still to acknowledge."""

    data: str
    reading: Reading
    deliveries: list[Inbound] = field(default_factory=list)
    received: float = 0.0


class Collector:
    def __init__(self, runner: ServiceRunner) -> None:
        self.runner = runner
        self.context = runner.context
        self.service = self.context.service
        self._out_topic = runner.topics.service_out(self.service)
        self._openers: dict[str, EnvelopeOpener] = {}  # per device topic: its own seq watermarks
        self._in_flight: dict[str, _Datum] = {}
        self._done: OrderedDict[str, None] = OrderedDict()
        self._held: dict[str, deque[tuple[Inbound, float]]] = {}
        self.stats = {"recorded": 0, "refused": 0, "duplicates": 0, "gave_up": 0}
        self._last_report = time.monotonic()

    def input_filters(self) -> list[str]:
        root = self.runner.topics.root
        filters = [self.runner.topics.device_data(device) for device in self.context.inputs("devices")]
        filters += [f"{root}/{topic}" for topic in self.context.inputs("topics")]
        return filters or [f"{root}/dev/+/data"]

    # ------------------------------------------------------------------------------ inputs

    def on_input(self, message: Inbound, now: float) -> None:
        try:
            parsed = parse(message.topic)
        except InvalidTopic as exc:
            self._refuse(message, "?", f"not a device data topic: {exc}")
            return
        if parsed.kind != "device-data":
            self._refuse(message, "?", f"{message.topic} is not a device data topic")
            return
        device = parsed.params["device"]
        data = reading_data_id(message.payload)
        if self._duplicate(message, data):
            return
        waiting = self._held.get(device)
        if waiting:
            waiting.append((message, now))
            return
        if not self._consider(message, device, data, now, now):
            self._held.setdefault(device, deque()).append((message, now))

    def _duplicate(self, message: Inbound, data: str) -> bool:
        datum = self._in_flight.get(data)
        if datum is not None:
            datum.deliveries.append(message)
            self.stats["duplicates"] += 1
            return True
        if data in self._done:
            self.stats["duplicates"] += 1
            log.info("%s again (a redelivery or a replay): already done", data)
            self.runner.ack(message)
            return True
        return False

    def _consider(self, message: Inbound, device: str, data: str, received: float, now: float) -> bool:
        """Handle one message; False to hold it (its device has not joined yet, as far as we know)."""
        if not self.runner.devices.joined(device):
            if now - received < HOLD_SECONDS:
                return False
            self._refuse(message, device, f"UnknownDevice: {device} has not joined the cluster (no PROV-ID-create on "
                                          f"the ledger within {HOLD_SECONDS:.0f} s)")
            return True
        opener = self._openers.get(device)
        if opener is None:
            opener = self._openers[device] = EnvelopeOpener(self.context.trust, accepted_types=READING_TYPES)
        try:
            reading = open_reading(opener, message.payload, device=device, now=time.time())
        except EnvelopeRejected as exc:
            self._refuse(message, device, f"{type(exc).__name__}: {exc}")
            return True
        sensor = reading.attested_device or device
        attributes: dict[str, Any] = {"mode": reading.mode}
        if reading.device_seq is not None:
            attributes["device_seq"] = reading.device_seq
        record = Record(DATA, Provenance(data=data, data_hash=reading.data_hash, origin=f"sample:{sensor}",
                                         receiver=f"collect:{self.service}", source=device,
                                         source_signature=reading.signature,
                                         on_behalf_of=reading.attested_device), reading.time_ms, attributes)
        datum = self._in_flight[data] = _Datum(data, reading, [message], received)
        height = self.runner.proposer.committed_height(data)
        if height is not None:
            self._committed(datum, height)  # an earlier instance recorded it; only the output is missing
            return True
        self.runner.proposer.propose(record, now=now, label=f"{data} (reading {reading.seq} from {device})",
                                     on_commit=lambda h: self._committed(datum, h),
                                     on_give_up=lambda: self._gave_up(datum))
        return True

    def _refuse(self, message: Inbound, device: str, reason: str) -> None:
        self.stats["refused"] += 1
        log.warning("refused reading on dev/%s/data: %s", device, reason)
        self.runner.ack(message)

    # ------------------------------------------------------------------------------ outcomes

    def _committed(self, datum: _Datum, height: int) -> None:
        reading = datum.reading
        attested = reading.attested_device is not None
        output = {"data": datum.data, "device": reading.attested_device or reading.device,
                  "seq": reading.device_seq if reading.device_seq is not None else reading.seq,
                  "time_ms": reading.time_ms, "value": to_json_value(reading.value), "unit": reading.unit,
                  "payload_hash": reading.payload_hash.hex() if reading.payload_hash is not None else None,
                  "height": height, "service": self.service, "mode": reading.mode,
                  "bridge": reading.device if attested else None}
        # default=repr: a device may send CBOR that JSON has no form for (a tag); say what it was.
        self.runner.publish(self._out_topic, json.dumps(output, sort_keys=True, default=repr).encode(), 1)
        self.stats["recorded"] += 1
        self._finish(datum)

    def _gave_up(self, datum: _Datum) -> None:
        self.stats["gave_up"] += 1
        self._finish(datum)

    def _finish(self, datum: _Datum) -> None:
        # Published first (above), acknowledged second: a crash in between repeats the output.
        for message in datum.deliveries:
            self.runner.ack(message)
        datum.deliveries.clear()
        self._in_flight.pop(datum.data, None)
        self._done[datum.data] = None
        while len(self._done) > REMEMBERED_DONE:
            self._done.popitem(last=False)

    # ------------------------------------------------------------------------------ time

    def tick(self, now: float) -> None:
        for device in list(self._held):
            waiting = self._held[device]
            while waiting:
                message, received = waiting[0]
                data = reading_data_id(message.payload)
                if not self._duplicate(message, data) and not self._consider(message, device, data, received, now):
                    break
                waiting.popleft()
            if not waiting:
                del self._held[device]
        if time.monotonic() - self._last_report >= 60:
            self._last_report = time.monotonic()
            log.info("readings recorded %(recorded)s, refused %(refused)s, duplicates %(duplicates)s, "
                     "given up %(gave_up)s", self.stats)


def to_json_value(value: Any) -> Any:
    """A CBOR value as JSON: bytes as hex, map keys as text, non-finite floats as null."""
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {str(k): to_json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json_value(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _program(runner: ServiceRunner) -> ServiceProgram:
    return Collector(runner)


def main() -> int:
    return run_program(_program, "collector")


if __name__ == "__main__":
    sys.exit(main())
