# tomq reference firmware: the device's side of the serial protocol (../PROTOCOL.md).
#
# One file that runs unchanged under MicroPython (ESP32, RP2040) and CPython: main.py drives it on a
# board, host.py drives it against a serial port or pseudo-terminal on a PC, and the tests drive it
# in-process. It frames (COBS, CRC-32), encodes canonical CBOR, seals tomq envelopes (Ed25519) in
# device-signed mode, numbers everything from one counter kept on flash, and keeps every reading
# until the bridge acknowledges it, retransmitting what was not.
#
# Its rules, which the bridge relies on:
# - Every reading gets its seq when it is sampled, from a counter that only rises (blocks of numbers
#   are reserved on flash before use), and in device-signed mode it is signed then, once: a
#   retransmission sends the same bytes.
# - A reading's `ref` (the reading before it in this device's chain) is fixed the first time it is
#   sent; readings are first sent in seq order; so the bridge can tell a gap from a duplicate.
# - A reading leaves the queue only on the bridge's ack of its seq, or on an error "refused" for it.
# - Every hello gets a fresh seq (and, device-signed, a fresh join and will under seq, seq + 1).
#
# What this file must never do: import anything a MicroPython port lacks (cryptography is used only
# if it happens to be importable, i.e. under CPython, for speed); block; or drop a reading that the
# bridge has not acknowledged or refused, except when the device itself restarts (RAM is lost).

import binascii
import hashlib
import math
import os
import struct
import time

try:  # for type checkers only: MicroPython has neither module
    from collections.abc import Callable
    from typing import Any
except ImportError:
    pass

_crc32_builtin = getattr(binascii, "crc32", None)  # not in every MicroPython port
_ticks_ms = getattr(time, "ticks_ms", None)
_ticks_diff = getattr(time, "ticks_diff", None)  # MicroPython's ticks wrap around

FIRMWARE = "tomq-fw/1"
HELLO, READING, ACK, ERROR = 1, 2, 3, 4
VERSION = 1
HEADER = ">BBQQ"
HEADER_BYTES = 18
MAX_STUFFED = 2048 + 22 + 12
ENVELOPE_DOMAIN = b"tomq/envelope/v1\x00"
ID_DOMAIN = b"tomq/id/v1\x00"
PASSWORD_PURPOSE = b"tomq/derived/v1\x00broker-password\x00"

SIGNED, ATTESTED = "signed", "attested"


# ---------------------------------------------------------------- CRC-32, COBS, frames

_CRC_TABLE = None  # type: list[int] | None


def crc32(data: bytes) -> int:
    if _crc32_builtin is not None:
        return int(_crc32_builtin(data)) & 0xFFFFFFFF
    global _CRC_TABLE
    if _CRC_TABLE is None:
        table = []  # type: list[int]
        for n in range(256):
            c = n
            for _ in range(8):
                c = (c >> 1) ^ 0xEDB88320 if c & 1 else c >> 1
            table.append(c)
        _CRC_TABLE = table
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def cobs_encode(data: bytes) -> bytes:
    out = bytearray()
    block = bytearray()
    for byte in data:
        if byte == 0:
            out.append(len(block) + 1)
            out.extend(block)
            block = bytearray()
        else:
            block.append(byte)
            if len(block) == 254:
                out.append(255)
                out.extend(block)
                block = bytearray()
    out.append(len(block) + 1)
    out.extend(block)
    return bytes(out)


def cobs_decode(data: bytes) -> "bytes | None":
    out = bytearray()
    index, end = 0, len(data)
    while index < end:
        code = data[index]
        if code == 0 or index + code > end:
            return None
        block = data[index + 1 : index + code]
        if 0 in block:
            return None
        out.extend(block)
        index += code
        if code != 255 and index < end:
            out.append(0)
    return bytes(out)


def encode_frame(type: int, seq: int, ref: int, body: bytes = b"") -> bytes:
    raw = struct.pack(HEADER, VERSION, type, seq, ref) + body
    return b"\x00" + cobs_encode(raw + struct.pack(">I", crc32(raw))) + b"\x00"


class FrameReader:
    """Bytes from the line in, (type, seq, ref, body) tuples out; damaged runs are counted and dropped."""

    def __init__(self) -> None:
        self.run = bytearray()
        self.damaged = 0

    def feed(self, data: bytes) -> "list[tuple[int, int, int, bytes]]":
        frames = []
        for byte in data:
            if byte != 0:
                if len(self.run) < MAX_STUFFED:
                    self.run.append(byte)
                continue
            if not self.run:
                continue
            raw = cobs_decode(bytes(self.run))
            self.run = bytearray()
            if raw is None or len(raw) < HEADER_BYTES + 4 or crc32(raw[:-4]) != struct.unpack(">I", raw[-4:])[0]:
                self.damaged += 1
                continue
            version, type, seq, ref = struct.unpack(HEADER, raw[:HEADER_BYTES])
            if version == VERSION:
                frames.append((type, seq, ref, raw[HEADER_BYTES:-4]))
        return frames


# ---------------------------------------------------------------- canonical CBOR (RFC 8949 4.2.1)


def _head(out: bytearray, major: int, n: int) -> None:
    if n < 24:
        out.append(major << 5 | n)
    elif n < 0x100:
        out.append(major << 5 | 24)
        out.append(n)
    elif n < 0x10000:
        out.append(major << 5 | 25)
        out.extend(struct.pack(">H", n))
    elif n < 0x100000000:
        out.append(major << 5 | 26)
        out.extend(struct.pack(">I", n))
    else:
        out.append(major << 5 | 27)
        out.extend(struct.pack(">Q", n))


def _half(value: float) -> "int | None":
    """The IEEE half-precision bits of `value` if it has that form exactly, else None."""
    if value == 0:
        return 0x8000 if str(value).startswith("-") else 0
    sign = 0x8000 if value < 0 else 0
    magnitude = -value if value < 0 else value
    if magnitude == float("inf"):
        return sign | 0x7C00
    mantissa, exponent = math.frexp(magnitude)  # magnitude = mantissa * 2**exponent, 0.5 <= mantissa < 1
    biased = exponent + 14
    if biased >= 31:
        return None
    if biased >= 1:
        fraction = (mantissa * 2 - 1) * 1024
        return sign | biased << 10 | int(fraction) if fraction == int(fraction) else None
    fraction = magnitude * 16777216  # 2**24: subnormal halves are multiples of 2**-24
    return sign | int(fraction) if fraction == int(fraction) else None


def _float(out: bytearray, value: float) -> None:
    if value != value:
        out.extend(b"\xf9\x7e\x00")  # NaN, as cbor2 writes it
        return
    half = _half(value)
    if half is not None:
        out.append(0xF9)
        out.extend(struct.pack(">H", half))
        return
    try:
        single = struct.pack(">f", value)
        if struct.unpack(">f", single)[0] == value:
            out.append(0xFA)
            out.extend(single)
            return
    except OverflowError:
        pass
    out.append(0xFB)
    out.extend(struct.pack(">d", value))


def _encode(out: bytearray, value: object) -> None:
    if value is None:
        out.append(0xF6)
    elif value is True:
        out.append(0xF5)
    elif value is False:
        out.append(0xF4)
    elif isinstance(value, int):
        if value >= 0:
            _head(out, 0, value)
        else:
            _head(out, 1, -1 - value)
    elif isinstance(value, float):
        _float(out, value)
    elif isinstance(value, str):
        data = value.encode("utf-8")
        _head(out, 3, len(data))
        out.extend(data)
    elif isinstance(value, (bytes, bytearray)):
        _head(out, 2, len(value))
        out.extend(value)
    elif isinstance(value, (list, tuple)):
        _head(out, 4, len(value))
        for item in value:
            _encode(out, item)
    elif isinstance(value, dict):
        items = sorted([(cbor(key), item) for key, item in value.items()], key=lambda pair: (len(pair[0]), pair[0]))
        _head(out, 5, len(items))
        for key, item in items:
            out.extend(key)
            _encode(out, item)
    else:
        raise TypeError("cannot encode " + str(type(value)))


def cbor(value: object) -> bytes:
    out = bytearray()
    _encode(out, value)
    return bytes(out)


def cbor_decode_map(data: bytes) -> "dict[str, Any]":
    """The few maps the bridge sends the device (text keys; text, int, bool values); {} if not one."""
    try:
        value, end = _decode(data, 0)
    except (IndexError, ValueError, UnicodeError):
        return {}
    return value if isinstance(value, dict) and end == len(data) else {}


def _decode(data: bytes, index: int) -> "tuple[Any, int]":
    head = data[index]
    major, info = head >> 5, head & 31
    index += 1
    if major == 7:
        simple = {20: False, 21: True, 22: None}
        if info in simple:
            return simple[info], index
        raise ValueError("unsupported simple value")
    if info < 24:
        n = info
    elif info <= 27:
        width = 1 << (info - 24)
        n = int.from_bytes(data[index : index + width], "big")
        index += width
    else:
        raise ValueError("indefinite lengths are not used")
    if major == 0:
        return n, index
    if major == 1:
        return -1 - n, index
    if major in (2, 3):
        chunk = bytes(data[index : index + n])
        if len(chunk) != n:
            raise ValueError("short string")
        return (chunk.decode("utf-8") if major == 3 else chunk), index + n
    if major == 4:
        items = []
        for _ in range(n):
            item, index = _decode(data, index)
            items.append(item)
        return items, index
    if major == 5:
        result = {}  # type: dict[Any, Any]
        for _ in range(n):
            key, index = _decode(data, index)
            item, index = _decode(data, index)
            result[key] = item
        return result, index
    raise ValueError("tags are not used")


# ---------------------------------------------------------------- identity and envelopes


def identity_id(public: bytes) -> str:
    """tomq.identity.identity_id: lowercase base32 of a domain-separated SHA-256, 16 characters."""
    digest = hashlib.sha256(ID_DOMAIN + public).digest()[:10]
    n = int.from_bytes(digest, "big")
    alphabet = "abcdefghijklmnopqrstuvwxyz234567"
    return "".join([alphabet[(n >> (75 - 5 * i)) & 31] for i in range(16)])


def broker_password(seed: bytes) -> str:
    """tomq.cluster.broker_password: derived from the key, one-way, so the bridge never learns the key."""
    digest = hashlib.sha256(PASSWORD_PURPOSE + seed).digest()[:24]
    text = binascii.b2a_base64(digest).decode().strip()
    return text.replace("+", "-").replace("/", "_")


def make_signer(seed: bytes, pure: bool = False) -> "tuple[Callable[[bytes], bytes], bytes]":
    """(sign(message) -> signature, public key): `cryptography` when importable (CPython), else ed25519.py."""
    if not pure:
        try:
            from cryptography.hazmat.primitives import serialization
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

            key = Ed25519PrivateKey.from_private_bytes(seed)
            public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            return key.sign, public
        except ImportError:
            pass
    import ed25519

    signer = ed25519.Signer(seed)
    return signer.sign, signer.public


def seal(sign: "Callable[[bytes], bytes]", identity: str, seq: int, time_ms: int, type: str, body: object) -> bytes:
    """tomq.wire.seal, byte for byte: canonical CBOR [signed, signature]."""
    signed = cbor({"v": 1, "from": identity, "seq": seq, "t": time_ms, "type": type, "body": body})
    return cbor([signed, sign(ENVELOPE_DOMAIN + signed)])


# ---------------------------------------------------------------- the counter on flash


class Counter:
    """Sequence numbers that never repeat across restarts: blocks are reserved on flash before use."""

    def __init__(self, path: str, block: int = 64) -> None:
        self.path = path
        self.block = block
        self.reserved = 0
        try:
            with open(path) as handle:
                self.reserved = int(handle.read().strip())
        except (OSError, ValueError):
            self.reserved = 0
        self.next_value = self.reserved + 1

    def next(self) -> int:
        if self.next_value > self.reserved:
            self._reserve(self.next_value + self.block - 1)
        value = self.next_value
        self.next_value += 1
        return value

    def jump_above(self, value: int) -> None:
        if self.next_value <= value:
            self.next_value = value + 1

    def _reserve(self, upto: int) -> None:
        temp = self.path + ".tmp"
        with open(temp, "w") as handle:
            handle.write(str(upto) + "\n")
            if hasattr(handle, "flush"):
                handle.flush()
            fsync = getattr(os, "fsync", None)
            if fsync is not None:
                fsync(handle.fileno())
        os.rename(temp, self.path)
        self.reserved = upto


# ---------------------------------------------------------------- the device


class Entry:
    __slots__ = ("body", "gen", "prev", "sent_at", "seq", "t", "unit", "value")

    def __init__(self, seq: int, body: bytes, value: object, unit: "str | None", t: int) -> None:
        self.seq = seq
        self.body = body  # device-signed: the sealed envelope; attested: the CBOR map
        self.value, self.unit, self.t = value, unit, t
        self.prev = None  # type: int | None  # fixed at the first transmission
        self.sent_at = None  # type: int | None  # ticks of the last transmission; None: send when the window allows
        self.gen = 0  # the rewind generation of the last transmission


class Firmware:
    """The device's protocol engine. `port` has read(n) -> bytes (or None/b"" when idle) and write(bytes).

    config: {"device": name, "mode": "signed" | "attested"} and, device-signed, "seed" (32 bytes) and
    "certificate" (its membership certificate, bytes). `wall_ms()` gives the wall clock in ms if the
    board has one; otherwise the firmware takes the time from the bridge's hello.
    """

    def __init__(self, port: "Any", config: "dict[str, Any]", store: str = ".", window: int = 8,
                 rto_ms: int = 400, max_queue: int = 64, wall_ms: "Callable[[], float] | None" = None,
                 ticks_ms: "Callable[[], int] | None" = None, pure_crypto: bool = False) -> None:
        self.port = port
        self.device = config["device"]
        self.mode = config.get("mode", SIGNED)
        if self.mode not in (SIGNED, ATTESTED):
            raise ValueError("mode must be signed or attested")
        self.certificate = config.get("certificate")
        self.sign = None  # type: Callable[[bytes], bytes] | None
        self.identity = ""
        self.password = ""
        if self.mode == SIGNED:
            seed = config["seed"]
            self.sign, public = make_signer(seed, pure_crypto)
            self.identity = identity_id(public)
            self.password = broker_password(seed)
        self.counter = Counter(store.rstrip("/") + "/seq")
        self.window, self.rto_ms, self.max_queue = window, rto_ms, max_queue
        self.wall_ms = wall_ms
        self.ticks_ms = ticks_ms or _default_ticks  # type: Callable[[], int]
        self.clock_offset = None  # type: int | None  # wall ms - ticks, from the bridge's hello
        self.reader = FrameReader()
        self.queue = []  # type: list[Entry]
        self.chain_tail = None  # type: int | None  # the seq the next first-sent reading points back to
        self.sent_since_boot = False
        self.gen = 0
        self.hello = None  # type: tuple[int, bytes] | None  # (seq, frame bytes) of the current hello
        self.hello_acked = False
        self.hello_sent_at = 0
        self.hello_wanted = True  # say hello at boot
        self.on_ack = None  # type: Callable[[int], object] | None  # called with each acknowledged reading's seq
        self.counters = {"sampled": 0, "acked": 0, "refused": 0, "dropped": 0, "sent": 0, "resent": 0,
                         "rewinds": 0, "damaged": 0, "hellos": 0, "stale": 0}

    # ------------------------------------------------------------ the application's side

    def now_ms(self) -> int:
        if self.wall_ms is not None:
            return int(self.wall_ms())
        ticks = self.ticks_ms()
        return ticks + self.clock_offset if self.clock_offset is not None else ticks

    def sample(self, value: object, unit: "str | None" = None) -> "int | None":
        """Queue one reading; its seq, or None if the queue is full (the bridge has been gone too long)."""
        if len(self.queue) >= self.max_queue:
            self.counters["dropped"] += 1
            return None
        seq = self.counter.next()
        t = self.now_ms()
        self.queue.append(Entry(seq, self._body(seq, t, value, unit), value, unit, t))
        self.counters["sampled"] += 1
        return seq

    def pending(self) -> int:
        return len(self.queue)

    def poll(self) -> None:
        """Read what the bridge sent, act on it, and (re)transmit: call it often (every few ms)."""
        data = self.port.read(512)
        if data:
            for frame in self.reader.feed(data):
                self._on_frame(*frame)
            self.counters["damaged"] = self.reader.damaged
        self._transmit()

    # ------------------------------------------------------------ frames in

    def _on_frame(self, type: int, seq: int, ref: int, body: bytes) -> None:
        if type == ACK:
            if self.hello is not None and seq == self.hello[0]:
                if not self.hello_acked:
                    self.hello_acked = True
                    self._rewind(False)  # the bridge may be new: send again what it has not acknowledged
                return
            for index, entry in enumerate(self.queue):
                if entry.seq == seq:
                    del self.queue[index]
                    self.counters["acked"] += 1
                    if self.on_ack is not None:
                        self.on_ack(seq)
                    return
        elif type == HELLO:
            now = cbor_decode_map(body).get("now")
            if isinstance(now, int) and self.wall_ms is None:
                self.clock_offset = now - self.ticks_ms()
            self.hello_wanted = True
        elif type == ERROR:
            code = cbor_decode_map(body).get("code")
            if code == "damaged":
                self._rewind(True)
            elif code == "gap":
                sent = self._entry(seq)
                if sent is not None and sent.gen == self.gen:
                    self._rewind(True)  # else: about a transmission from before the last rewind
            elif code == "hello":
                if self.hello_acked or self.hello is None:
                    self.hello_wanted = True
            elif code == "stale-seq":
                self.counters["stale"] += 1
                self.counter.jump_above(ref)
                self._renumber_unsent()
                self.hello_wanted = True
            elif code == "refused":
                if self.hello is not None and seq == self.hello[0]:
                    self.hello = None  # the bridge will not take us: try again after a while
                    self.hello_sent_at = self.ticks_ms()
                    return
                refused = self._entry(seq)
                if refused is not None:
                    self.queue.remove(refused)
                    self.counters["refused"] += 1

    def _entry(self, seq: int) -> "Entry | None":
        for entry in self.queue:
            if entry.seq == seq:
                return entry
        return None

    def _rewind(self, counted: bool) -> None:
        """Send again, oldest first, everything sent and not yet acknowledged."""
        self.gen += 1
        for entry in self.queue:
            entry.sent_at = None
        if counted:
            self.counters["rewinds"] += 1

    def _renumber_unsent(self) -> None:
        """After a stale-seq error: give readings never sent fresh numbers above the bridge's (re-signed)."""
        for entry in self.queue:
            if entry.prev is None:
                entry.seq = self.counter.next()
                entry.body = self._body(entry.seq, entry.t, entry.value, entry.unit)

    # ------------------------------------------------------------ frames out

    def _transmit(self) -> None:
        now = self.ticks_ms()
        if self.hello_wanted:
            self._say_hello(now)
        if self.hello is None:
            if _elapsed(now, self.hello_sent_at) > 5 * self.rto_ms:
                self.hello_wanted = True  # refused: try again
            return
        if not self.hello_acked:
            if _elapsed(now, self.hello_sent_at) > self.rto_ms:
                self._write(self.hello[1])  # the same hello again: no new signatures
                self.hello_sent_at = now
            return
        in_flight = 0
        for entry in self.queue:
            if entry.sent_at is not None:
                if _elapsed(now, entry.sent_at) > self.rto_ms:
                    self._rewind(True)  # the oldest in flight timed out: go back to it
                    in_flight = 0
                    break
                in_flight += 1
        for entry in self.queue:
            if in_flight >= self.window:
                break
            if entry.sent_at is not None:
                continue
            if entry.prev is None:
                entry.prev = self.chain_tail if self.chain_tail is not None else 0
                self.chain_tail = entry.seq
                self.sent_since_boot = True
                self.counters["sent"] += 1
            else:
                self.counters["resent"] += 1
            self._write(encode_frame(READING, entry.seq, entry.prev, entry.body))
            entry.sent_at = now
            entry.gen = self.gen
            in_flight += 1

    def _say_hello(self, now: int) -> None:
        self.hello_wanted = False
        seq = self.counter.next()
        if not self.sent_since_boot:
            self.chain_tail = seq  # nothing sent since boot: the chain starts at this hello
        body = {"device": self.device, "mode": self.mode, "fw": FIRMWARE}  # type: dict[str, object]
        if self.mode == SIGNED:
            assert self.sign is not None
            will_seq = self.counter.next()
            t = self.now_ms()
            body["join"] = seal(self.sign, self.identity, seq, t, "join", {"certificate": self.certificate})
            body["will"] = seal(self.sign, self.identity, will_seq, t, "leave", {"reason": "vanished"})
            body["password"] = self.password
        base = self.chain_tail if self.chain_tail is not None else 0
        for entry in self.queue:
            if entry.prev is not None:
                base = entry.prev  # the oldest reading sent and not acknowledged
                break
        self.hello = (seq, encode_frame(HELLO, seq, base, cbor(body)))
        self.hello_acked = False
        self.hello_sent_at = now
        self.counters["hellos"] += 1
        self._write(self.hello[1])

    def _body(self, seq: int, t: int, value: object, unit: "str | None") -> bytes:
        if self.mode == SIGNED:
            assert self.sign is not None
            body = {"value": value}  # type: dict[str, object]
            if unit is not None:
                body["unit"] = unit
            return seal(self.sign, self.identity, seq, t, "reading", body)
        fields = {"value": value}  # type: dict[str, object]
        if unit is not None:
            fields["unit"] = unit
        if self.wall_ms is not None or self.clock_offset is not None:
            fields["t"] = t
        return cbor(fields)

    def _write(self, data: bytes) -> None:
        try:
            self.port.write(data)
        except OSError:
            pass  # nobody at the other end (unplugged): what is not acknowledged goes again later


def _elapsed(now: int, then: int) -> int:
    return int(_ticks_diff(now, then)) if _ticks_diff is not None else now - then


def _default_ticks() -> int:
    if _ticks_ms is not None:
        return int(_ticks_ms())
    return int(time.monotonic() * 1000)
