"""The bridge's side of the serial protocol (PROTOCOL.md), as a pure state machine: bytes in, decisions out.

`Session.receive(data, now)` takes whatever the line delivered and returns actions for the shell
(tomq.bridge.bridge) to carry out, in this order:

    Introduce   a device said hello and it checked out: set up its uplink (its MQTT identity)
    Take        a reading to make durable (the outbox), then to acknowledge through `taken()`
    Send        bytes to write to the line: acknowledgements of duplicates, errors

Ordering rule: persist every Take of one `receive` before writing any Send of it, because a Send may
acknowledge a duplicate of a Take in the same batch; then write the acks that `taken()` returns. So
no acknowledgement ever leaves before the reading it acknowledges is on disk.

How readings are taken. Each reading frame carries its seq and `ref` = the seq of the reading the
device made before it (its chain). Per device the session keeps `high`, the highest seq taken (the
shell persists it: the caller passes it back in `high_water` after a restart), and `anchor`, the seq
the next reading must point back to. A reading frame is, in this order:

    refused before        -> the same refusal again (a bare "duplicate" ack would be a lie)
    seq <= high           -> a duplicate: acknowledged again, not taken again
    ref != anchor         -> a gap: an earlier reading was lost on the line; error "gap" (once per
                             anchor), the device goes back to its oldest unacknowledged reading
    body not a reading    -> refused: error "refused", the device drops it; the chain moves past it
    otherwise             -> taken: high = anchor = seq

so readings are taken in the device's own order, none is skipped while the device still holds it,
and none is taken twice. The collector's per-device sequence check therefore never sees a reading
after a later one. A device's hello sets `anchor` to the hello's `ref` (the ref of its oldest
unacknowledged reading) when that is above `high`, and refuses a hello whose seq is not above
`high` (a device whose counter went back, e.g. re-flashed): error "stale-seq" tells it how far to jump.

Transitions (frame type x line state); anything else is counted under `unknown` and answered with
nothing:

    hello    any          -> check it; Introduce + ack, or error refused / stale-seq
    reading  introduced   -> as above
    reading  not yet      -> error "hello" (once per receive): say hello first
    damaged  any          -> error "damaged" (once per receive): resend what I have not acknowledged

What this module must never do: touch the line, the disk, the network or a clock (time comes in as
`now`); acknowledge a reading it has not handed out as a Take; take a device-signed reading whose
signature, signer or sequence number does not check, or alter its bytes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from tomq import canonical
from tomq import certificate as certificates
from tomq.bridge import framing
from tomq.bridge.framing import ACK, ERROR, HELLO, READING, Fault, Frame, FrameDecoder
from tomq.certificate import Certificate, TrustStore
from tomq.errors import EnvelopeRejected, InvalidCertificate, InvalidTopic
from tomq.identity import PublicKey
from tomq.node.services.readings import (
    BRIDGE_ATTESTED,
    DEVICE_ROLES,
    DEVICE_SIGNED,
    READING_TYPES,
    MalformedReading,
    open_reading,
    reading_body,
)
from tomq.topics import check_segment
from tomq.wire import EnvelopeOpener, MemoryWatermarks, open_signed_by

BRIDGE_NAME = "tomq-bridge/1"
WIRE_MODES = {"signed": DEVICE_SIGNED, "attested": BRIDGE_ATTESTED}  # hello "mode" -> the ledger's name
REMEMBERED_REFUSALS = 64
NOBODY = "-"  # counters for what came before any device said hello


@dataclass
class LineCounters:
    """Per device: what the line brought. frames + crc_errors + resyncs = runs between delimiters."""

    frames: int = 0  # good frames (CRC matches)
    crc_errors: int = 0  # frame-sized runs whose CRC did not match
    resyncs: int = 0  # runs that were no frame at all (noise, truncation, overflow): skipped to the next 0x00
    duplicates: int = 0  # readings taken before, acknowledged again
    taken: int = 0  # readings made durable and acknowledged
    gaps: int = 0  # readings that came after a lost one
    refused: int = 0  # reading and hello frames that did not check (a refused reading sent again counts again)
    hellos: int = 0  # hellos accepted
    unknown: int = 0  # good frames of a type or version this bridge does not take

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Introduce:
    device: str
    mode: str  # DEVICE_SIGNED or BRIDGE_ATTESTED
    hello_seq: int
    join: bytes | None = None  # device-signed: its signed join (seq hello_seq) and will (hello_seq + 1)
    will: bytes | None = None
    password: str | None = None  # device-signed: its broker password (derived from its key)
    attester: str | None = None  # bridge-attested: the bridge identity that signs for it


@dataclass(frozen=True, slots=True)
class Take:
    device: str
    seq: int
    mode: str
    envelope: bytes | None = None  # device-signed: the device's envelope, published unchanged
    value: Any = None  # bridge-attested: what the device measured
    unit: str | None = None
    time_ms: int | None = None  # bridge-attested: the device's clock, if it has one
    attester: str | None = None


@dataclass(frozen=True, slots=True)
class Send:
    data: bytes


Action = Introduce | Take | Send


@dataclass
class _Device:
    high: int = 0
    anchor: int = 0
    hello_seq: int = 0
    mode: str = DEVICE_SIGNED
    opener: EnvelopeOpener | None = None  # device-signed: checks its envelopes against its certificate
    attester: str | None = None
    gap_reported: int | None = None  # the anchor a gap error was last sent for
    refused: deque[int] = field(default_factory=lambda: deque(maxlen=REMEMBERED_REFUSALS))


class Refused(Exception):
    """A hello or reading that does not check; `code` is the error code sent back to the device."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class _NoWatermarks:
    """The session orders readings itself (high, anchor); the opener only checks signature and shape."""

    def get(self, sender: str) -> int:
        return 0

    def advance(self, sender: str, seq: int) -> None:
        pass


class Session:
    """One serial line. `attester_for(device)` names the bridge identity allowed to attest for
    `device` (its certificate lists dev/<device>/data), or None; it must be a plain lookup."""

    def __init__(self, *, operator: PublicKey, cluster: str, high_water: Mapping[str, int] | None = None,
                 attester_for: Callable[[str], str | None] = lambda _device: None) -> None:
        self.operator = operator
        self.cluster = cluster
        self.attester_for = attester_for
        self.decoder = FrameDecoder()
        self.counters: dict[str, LineCounters] = {}
        self.device: str | None = None  # who said hello on this line since it came up
        self._last_device: str | None = None
        self._devices: dict[str, _Device] = {
            name: _Device(high=high, anchor=high) for name, high in (high_water or {}).items()}

    # ------------------------------------------------------------------ the line

    def line_up(self, now: float, reason: str = "start") -> bytes:
        """The line (re)opened: forget who was on it; return the hello that asks the device to introduce itself."""
        self.decoder = FrameDecoder()
        self.device = None
        return self.hello_request(now, reason)

    def line_down(self) -> None:
        self.device = None

    def hello_request(self, now: float, reason: str) -> bytes:
        body = canonical.encode({"bridge": BRIDGE_NAME, "now": int(now * 1000), "reason": reason})
        return framing.encode_frame(HELLO, 0, 0, body)

    def high_water(self, device: str) -> int:
        state = self._devices.get(device)
        return state.high if state is not None else 0

    def counters_for(self, device: str | None) -> LineCounters:
        name = device or NOBODY
        if name not in self.counters:
            self.counters[name] = LineCounters()
        return self.counters[name]

    # ------------------------------------------------------------------ bytes in

    def receive(self, data: bytes, now: float) -> list[Action]:
        actions: list[Action] = []
        said_damaged = said_hello = False
        for item in self.decoder.feed(data):
            counters = self.counters_for(self.device or self._last_device)
            if isinstance(item, Fault):
                if item.kind == framing.UNKNOWN:
                    counters.frames += 1
                    counters.unknown += 1
                    continue
                if item.kind == framing.DAMAGED:
                    counters.crc_errors += 1
                else:
                    counters.resyncs += 1
                if not said_damaged:
                    said_damaged = True
                    actions.append(self._error(0, self._line_high(), "damaged", "a damaged frame: resend "
                                               "everything not acknowledged"))
                continue
            if item.type == HELLO:
                actions.extend(self._hello(item, now))  # counted under the device it names
                continue
            counters.frames += 1
            if item.type == READING:
                if self.device is None:
                    if not said_hello:
                        said_hello = True
                        actions.append(self._error(item.seq, 0, "hello", "say hello first"))
                    continue
                actions.extend(self._reading(self.device, item, now))
            else:
                counters.unknown += 1  # acks and errors go from the bridge to the device, not back
        return actions

    def taken(self, takes: list[Take]) -> list[bytes]:
        """The acknowledgements of `takes`, once the shell has made them durable."""
        return [framing.encode_frame(ACK, take.seq, 0) for take in takes]

    # ------------------------------------------------------------------ hello

    def _hello(self, frame: Frame, now: float) -> list[Action]:
        try:
            hello = _decode_map(frame.body, "hello")
            device = hello.get("device")
            if not isinstance(device, str):
                raise Refused("refused", "a hello must name its device")
            check_segment(device, "device")
        except (Refused, InvalidTopic) as exc:
            counters = self.counters_for(self.device or self._last_device)
            counters.frames += 1
            counters.refused += 1
            return [self._error(frame.seq, 0, "refused", f"hello: {exc}")]
        self._last_device = device
        counters = self.counters_for(device)
        counters.frames += 1
        state = self._devices.setdefault(device, _Device())
        if frame.seq == state.hello_seq and frame.seq:
            self.device = device  # the same hello again: its ack was lost, or the line came back
            return [Send(framing.encode_frame(ACK, frame.seq, 0))]
        if frame.seq <= max(state.high, state.hello_seq):
            counters.refused += 1
            return [self._error(frame.seq, max(state.high, state.hello_seq), "stale-seq",
                                f"hello {frame.seq} of {device} is not above {max(state.high, state.hello_seq)}: "
                                "continue your counter above it")]
        try:
            introduce, certificate = self._check_hello(device, frame, hello, now)
        except Refused as exc:
            counters.refused += 1
            return [self._error(frame.seq, state.high, exc.code, exc.reason)]
        state.hello_seq = frame.seq
        state.mode = introduce.mode
        state.attester = introduce.attester
        state.opener = None
        if certificate is not None:
            trust = TrustStore(self.operator, self.cluster)
            trust.add(certificate.encoded)
            state.opener = EnvelopeOpener(trust, _NoWatermarks(), accepted_types=READING_TYPES)
        state.anchor = frame.ref if frame.ref > state.high else state.high
        state.gap_reported = None
        self.device = device
        counters.hellos += 1
        return [introduce, Send(framing.encode_frame(ACK, frame.seq, 0))]

    def _check_hello(self, device: str, frame: Frame, hello: dict[str, Any],
                     now: float) -> tuple[Introduce, Certificate | None]:
        mode = WIRE_MODES.get(str(hello.get("mode")))
        if mode is None:
            raise Refused("refused", f"hello of {device}: mode must be one of {', '.join(WIRE_MODES)}")
        if mode == BRIDGE_ATTESTED:
            attester = self.attester_for(device)
            if attester is None:
                raise Refused("refused", f"no bridge identity here may attest for {device} (enrol one: "
                                              f"tomq bridge DIR --enrol BRIDGE --attests {device})")
            return Introduce(device, mode, frame.seq, attester=attester), None
        join, will, password = hello.get("join"), hello.get("will"), hello.get("password")
        if not (isinstance(join, bytes) and isinstance(will, bytes) and isinstance(password, str) and password):
            raise Refused("refused", f"hello of signed device {device} needs join, will and password")
        certificate = self._join_certificate(device, join, now)
        marks = MemoryWatermarks()
        try:
            opened_join = open_signed_by(join, certificate.subject, name=device, accepted_types=frozenset({"join"}),
                                         watermarks=marks)
            opened_will = open_signed_by(will, certificate.subject, name=device, accepted_types=frozenset({"leave"}),
                                         watermarks=marks)
        except EnvelopeRejected as exc:
            raise Refused("refused", f"hello of {device}: {type(exc).__name__}: {exc}") from None
        if opened_join.seq != frame.seq or opened_will.seq != frame.seq + 1:
            raise Refused("refused", f"hello {frame.seq} of {device}: its join must be seq {frame.seq} and its "
                                          f"will {frame.seq + 1}, not {opened_join.seq} and {opened_will.seq}")
        if not isinstance(opened_will.body, dict) or opened_will.body.get("reason") != "vanished":
            raise Refused("refused", f"hello of {device}: the will must be a leave with reason vanished")
        return Introduce(device, mode, frame.seq, join, will, password), certificate

    def _join_certificate(self, device: str, join: bytes, now: float) -> Certificate:
        try:
            signed, _ = canonical.decode(join)
            fields = canonical.decode(signed)
            proof = fields["body"]["certificate"]
            certificate = certificates.decode(proof, self.operator)
        except (canonical.CanonicalDecodeError, InvalidCertificate, KeyError, TypeError, ValueError) as exc:
            raise Refused("refused", f"hello of {device}: the join carries no certificate of this "
                                          f"cluster's operator ({exc})") from None
        if certificate.name != device or certificate.role not in DEVICE_ROLES or certificate.cluster != self.cluster:
            raise Refused("refused", f"hello of {device} carries the certificate of {certificate.role} "
                                          f"{certificate.name} in cluster {certificate.cluster}")
        if not certificate.is_valid_at(now):
            raise Refused("refused", f"the certificate of {device} is not valid now")
        return certificate

    # ------------------------------------------------------------------ readings

    def _reading(self, device: str, frame: Frame, now: float) -> list[Action]:
        state = self._devices[device]
        counters = self.counters_for(device)
        if frame.seq in state.refused:
            counters.refused += 1
            return [self._error(frame.seq, state.high, "refused", f"reading {frame.seq} was refused before")]
        if frame.seq <= state.high:
            counters.duplicates += 1
            return [Send(framing.encode_frame(ACK, frame.seq, 0))]
        if frame.ref != state.anchor:
            counters.gaps += 1
            if state.gap_reported == state.anchor:
                return []
            state.gap_reported = state.anchor
            return [self._error(frame.seq, state.high, "gap", f"reading {frame.seq} follows {frame.ref}, but the "
                                f"last one here is {state.anchor}: resend from your oldest unacknowledged")]
        try:
            take = self._check_reading(device, state, frame, now)
        except (EnvelopeRejected, Refused) as exc:
            counters.refused += 1
            state.refused.append(frame.seq)
            state.anchor = frame.seq  # the chain moves past it; `high` stays: it was never taken
            state.gap_reported = None
            return [self._error(frame.seq, state.high, "refused", f"reading {frame.seq}: {exc}")]
        state.high = state.anchor = frame.seq
        state.gap_reported = None
        counters.taken += 1
        return [take]

    def _check_reading(self, device: str, state: _Device, frame: Frame, now: float) -> Take:
        if state.mode == DEVICE_SIGNED:
            assert state.opener is not None  # the hello that made the mode signed set it
            reading = open_reading(state.opener, frame.body, device=device, now=now)
            if reading.seq != frame.seq:
                raise MalformedReading(f"the envelope's seq {reading.seq} is not the frame's {frame.seq}")
            if reading.attested_device is not None:
                raise MalformedReading("a device-signed reading cannot attest for another device")
            return Take(device, frame.seq, DEVICE_SIGNED, envelope=frame.body)
        body = _decode_map(frame.body, "reading")
        if not body.keys() <= {"value", "unit", "t"} or "value" not in body:
            raise MalformedReading(f"an attested reading holds value and optionally unit and t, not {sorted(body)}")
        time_ms = body.get("t")
        if time_ms is not None and (type(time_ms) is not int or time_ms < 0):
            raise MalformedReading("t must be milliseconds since the epoch")
        reading_body(body["value"], body.get("unit"))  # raises MalformedReading on a bad value or unit
        return Take(device, frame.seq, BRIDGE_ATTESTED, value=body["value"], unit=body.get("unit"),
                    time_ms=time_ms, attester=state.attester)

    # ------------------------------------------------------------------ helpers

    def _line_high(self) -> int:
        return self.high_water(self.device) if self.device is not None else 0

    def _error(self, seq: int, ref: int, code: str, reason: str) -> Send:
        body = canonical.encode({"code": code, "reason": reason[:200]})
        return Send(framing.encode_frame(ERROR, seq, ref, body))


def _decode_map(body: bytes, what: str) -> dict[str, Any]:
    try:
        value = canonical.decode(body, check_canonical=False)
    except canonical.CanonicalDecodeError as exc:
        raise Refused("refused", f"{what} body: {exc}") from None
    if type(value) is not dict:
        raise Refused("refused", f"{what} body must be a CBOR map")
    return value
