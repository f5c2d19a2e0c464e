"""Sensor readings on the wire: what a sensor publishes on `dev/<device>/data`, and how a service opens it.

A reading is an ordinary signed envelope (tomq.wire) of type "reading", published at QoS 1 on
`tomq/<cluster>/dev/<device>/data` by the device itself:

    seal(device_key, seq, time_ms, type="reading", body={
        "value": <int | float | text | map with text keys>,   the measurement itself
        "unit": <text>,                                        optional, e.g. "degC"
        "payload_hash": <32 bytes>,                            optional: SHA-256 of a larger payload
    })                                                         kept off-chain (an image, a trace)

The body holds exactly these keys; anything else is refused, so that two readers never disagree on
what a device said. `seq` rises per device (tomq.wire.SequenceCounter keeps it across restarts) and
`time_ms` is the device's clock at sampling.

A bridge-attested reading (firmware-bridge/PROTOCOL.md) is the same envelope, signed by a serial
bridge for a sensor too small to sign, and published on the bridge's own `dev/<bridge>/data`; its
body carries one more key:

        "attested": {"device": <the sensor's name>, "seq": <the sensor's own sequence number>}

The bridge may attest only for devices its certificate names, as `dev/<device>/data` in its publish
rights: the operator's signed delegation (the broker never lets a sensor-role member publish outside
its own topics, whatever its certificate lists). Such a reading is the bridge's word, not the
sensor's: the ledger records the bridge as the source, acting on behalf of the sensor.

The datum's ledger name is derived from the bytes alone, `reading:<first 32 hex of sha256(wire)>`,
so every service instance that sees the same envelope names it the same way: a redelivered or
replayed reading maps onto the datum already on the ledger, and Table II refuses it a second time.

`open_reading` is the only way bytes from `dev/<device>/data` become a `Reading`: the envelope
checks of `EnvelopeOpener.open`, then that the signer's certificate is the device's own (its name is
the topic's device, its role a device role, its rights include that topic) and that the body has the
shape above (for an attested reading: that the signer's rights include the sensor's topic). Each
failure raises one `EnvelopeRejected` subclass naming the device.

What this module must never do: decide membership (whether the device has joined is the ledger's
answer, kept by the caller) or touch the network.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

from tomq.errors import EnvelopeRejected, InvalidTopic, MalformedEnvelope
from tomq.identity import SigningKey
from tomq.topics import check_segment
from tomq.wire import MAX_SEQ, EnvelopeOpener, seal

READING_TYPE = "reading"
READING_TYPES = frozenset({READING_TYPE})
DEVICE_ROLES = ("sensor", "actuator")  # actuators report what they did as readings, too
_REQUIRED = frozenset({"value"})
_OPTIONAL = frozenset({"unit", "payload_hash", "attested"})
_ATTESTED = frozenset({"device", "seq"})
MAX_UNIT_CHARS = 32
DEVICE_SIGNED, BRIDGE_ATTESTED = "device-signed", "bridge-attested"  # a reading's trust mode


class WrongDevice(EnvelopeRejected):
    """A validly signed envelope on a device's topic whose signer is not that device."""


class MalformedReading(MalformedEnvelope):
    """A validly signed envelope from the device whose body is not a reading."""


@dataclass(frozen=True, slots=True)
class Reading:
    device: str  # the device's certificate name (= the topic's device level)
    sender: str  # its identity id
    seq: int
    time_ms: int
    value: Any
    unit: str | None
    payload_hash: bytes | None
    signature: bytes  # the device's signature over its envelope: the ledger's "signed hash"
    wire: bytes  # exactly what the device sent
    attested_device: str | None = None  # a bridge-attested reading: the sensor the bridge (`device`) spoke for
    device_seq: int | None = None  # ... and that sensor's own sequence number

    @property
    def mode(self) -> str:
        return BRIDGE_ATTESTED if self.attested_device is not None else DEVICE_SIGNED

    @property
    def data_id(self) -> str:
        return reading_data_id(self.wire)

    @property
    def data_hash(self) -> bytes:
        """What the ledger records as the datum's hash: the off-chain payload's, else the envelope's."""
        return self.payload_hash if self.payload_hash is not None else hashlib.sha256(self.wire).digest()


def reading_data_id(wire: bytes) -> str:
    return f"reading:{hashlib.sha256(wire).hexdigest()[:32]}"


def reading_body(value: Any, unit: str | None = None, payload_hash: bytes | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"value": value}
    if unit is not None:
        body["unit"] = unit
    if payload_hash is not None:
        body["payload_hash"] = payload_hash
    _check_body(body, "this device")
    return body


def seal_reading(key: SigningKey, *, seq: int, time_ms: int, value: Any, unit: str | None = None,
                 payload_hash: bytes | None = None) -> bytes:
    """The envelope a sensor publishes on dev/<its name>/data (QoS 1). Raises ValueError on a bad body."""
    try:
        body = reading_body(value, unit, payload_hash)
    except MalformedReading as exc:
        raise ValueError(str(exc)) from None
    return seal(key, seq=seq, time_ms=time_ms, type=READING_TYPE, body=body)


def seal_attested_reading(bridge_key: SigningKey, *, seq: int, time_ms: int, device: str, device_seq: int,
                          value: Any, unit: str | None = None) -> bytes:
    """The envelope a serial bridge publishes on dev/<bridge>/data for a sensor that cannot sign.

    `seq` is the bridge's own sequence number; `device_seq` the sensor's. Raises ValueError on a bad body.
    """
    body = {"value": value, "attested": {"device": device, "seq": device_seq}}
    if unit is not None:
        body["unit"] = unit
    try:
        _check_body(body, "this bridge")
    except MalformedReading as exc:
        raise ValueError(str(exc)) from None
    return seal(bridge_key, seq=seq, time_ms=time_ms, type=READING_TYPE, body=body)


def open_reading(opener: EnvelopeOpener, wire: bytes, *, device: str, now: float) -> Reading:
    """The reading in `wire`, received on dev/<device>/data at `now` (unix seconds), or EnvelopeRejected.

    Give each device topic its own opener (sharing one TrustStore): the sequence watermark is then
    kept per topic, so a device's envelope copied onto another device's topic cannot burn the seq of
    the genuine one.
    """
    envelope = opener.open(wire, now)
    certificate = opener.trust.by_id(envelope.sender)
    assert certificate is not None  # open() has just found it
    if certificate.name != device:
        raise WrongDevice(f"reading on dev/{device}/data is signed by {certificate.name}, not {device}",
                          envelope.sender)
    if certificate.role not in DEVICE_ROLES:
        raise WrongDevice(f"reading on dev/{device}/data is signed by a {certificate.role}, not a device",
                          envelope.sender)
    if not certificate.may_publish(f"dev/{device}/data"):
        raise WrongDevice(f"the certificate of {device} does not let it publish dev/{device}/data", envelope.sender)
    _check_body(envelope.body, device, envelope.sender)
    body = envelope.body
    attested = body.get("attested")
    if attested is not None:
        for_device = attested["device"]
        if for_device == device or not certificate.may_publish(f"dev/{for_device}/data"):
            raise WrongDevice(f"reading on dev/{device}/data attests for {for_device}, which the certificate of "
                              f"{device} does not let it speak for", envelope.sender)
    return Reading(device=device, sender=envelope.sender, seq=envelope.seq, time_ms=envelope.time_ms,
                   value=body["value"], unit=body.get("unit"), payload_hash=body.get("payload_hash"),
                   signature=envelope.signature, wire=envelope.wire,
                   attested_device=attested["device"] if attested is not None else None,
                   device_seq=attested["seq"] if attested is not None else None)


def _check_body(body: Any, device: str, sender: str | None = None) -> None:
    def bad(problem: str) -> MalformedReading:
        return MalformedReading(f"reading from {device}: {problem}", sender)

    if type(body) is not dict:
        raise bad("body must be a map")
    missing = _REQUIRED - body.keys()
    if missing:
        raise bad(f"body lacks {', '.join(sorted(missing))}")
    extra = body.keys() - _REQUIRED - _OPTIONAL
    if extra:
        raise bad(f"body has unknown keys {', '.join(sorted(map(str, extra)))[:80]}")
    value = body["value"]
    if isinstance(value, bool) or not isinstance(value, int | float | str | dict):
        raise bad(f"value must be a number, text or map, not {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise bad("value is not a finite number")
    if isinstance(value, dict) and not all(isinstance(k, str) for k in value):
        raise bad("a map value must have text keys")
    unit = body.get("unit")
    if unit is not None and (not isinstance(unit, str) or not 0 < len(unit) <= MAX_UNIT_CHARS):
        raise bad(f"unit must be text of 1-{MAX_UNIT_CHARS} characters")
    payload_hash = body.get("payload_hash")
    if payload_hash is not None and (not isinstance(payload_hash, bytes) or len(payload_hash) != 32):
        raise bad("payload_hash must be 32 bytes (a SHA-256)")
    if "attested" in body:
        attested = body["attested"]
        if type(attested) is not dict or attested.keys() != _ATTESTED:
            raise bad("attested must be a map of exactly device and seq")
        if type(attested["seq"]) is not int or not 1 <= attested["seq"] <= MAX_SEQ:
            raise bad("attested seq must be an integer in 1..2^63-1")
        try:
            check_segment(attested["device"], "attested device")
        except InvalidTopic as exc:
            raise bad(str(exc)) from None
