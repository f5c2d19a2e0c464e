"""Frames on the serial line between a device and the bridge: COBS-stuffed, CRC-32-checked, CBOR inside.

On the line every frame travels as

    0x00 | COBS(frame) | 0x00

and a frame, before stuffing, is

    version (1 byte, = 1) | type (1) | seq (8, big-endian) | ref (8, big-endian) | body | crc32 (4, big-endian)

with the CRC-32 (IEEE 802.3, as zlib.crc32) over everything before it. COBS removes every 0x00 from
the frame, so 0x00 only ever delimits: a receiver that lost its place (noise, a truncated frame, a
flipped bit) finds the next frame at the next 0x00 without any help from the sender. The leading
0x00 ends whatever noise came before the frame, so noise on an idle line never spoils a good frame.
PROTOCOL.md gives the meaning of `type`, `seq`, `ref` and `body` for each frame type.

`FrameDecoder.feed` turns bytes from the line into `Frame`s and `Fault`s: every run of bytes between
two delimiters is exactly one of them. It never raises on anything the line delivers.

What this module must never do: I/O, clocks, or interpret a body. The firmware (firmware/tomqfw.py)
carries its own copy of the encoder for MicroPython; tests check that the two agree byte for byte.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

VERSION = 1
HELLO, READING, ACK, ERROR = 1, 2, 3, 4
FRAME_TYPES = {HELLO: "hello", READING: "reading", ACK: "ack", ERROR: "error"}

_HEADER = struct.Struct(">BBQQ")
HEADER_BYTES = _HEADER.size  # 18
CRC_BYTES = 4
MIN_FRAME_BYTES = HEADER_BYTES + CRC_BYTES
MAX_BODY_BYTES = 2048  # a hello with a certificate and two envelopes is about 700 bytes
MAX_FRAME_BYTES = HEADER_BYTES + MAX_BODY_BYTES + CRC_BYTES
MAX_STUFFED_BYTES = MAX_FRAME_BYTES + MAX_FRAME_BYTES // 254 + 2
MAX_SEQ = 2**64 - 1

# Fault kinds: what a run of bytes between two delimiters was, when it was not a frame.
DAMAGED = "crc"  # it unstuffs to a frame-sized run whose CRC does not match: a frame hurt on the way
GARBAGE = "garbage"  # not COBS, too short to be a frame, or too long: noise, or what is left of a frame
UNKNOWN = "unknown"  # the CRC matches but the version or type is not one this bridge speaks


@dataclass(frozen=True, slots=True)
class Frame:
    type: int
    seq: int
    ref: int
    body: bytes

    @property
    def type_name(self) -> str:
        return FRAME_TYPES.get(self.type, str(self.type))


@dataclass(frozen=True, slots=True)
class Fault:
    kind: str  # DAMAGED, GARBAGE or UNKNOWN
    size: int  # stuffed bytes in the run (for oversize runs: how many were seen before giving up)


def crc32(data: bytes) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def cobs_encode(data: bytes) -> bytes:
    """Consistent Overhead Byte Stuffing: the same bytes with no 0x00, one byte longer per 254."""
    out = bytearray()
    block = bytearray()
    for byte in data:
        if byte == 0:
            out.append(len(block) + 1)
            out += block
            block.clear()
        else:
            block.append(byte)
            if len(block) == 254:
                out.append(255)
                out += block
                block.clear()
    out.append(len(block) + 1)
    out += block
    return bytes(out)


def cobs_decode(data: bytes) -> bytes | None:
    """The bytes `cobs_encode` made `data` from, or None if `data` is not a COBS encoding."""
    out = bytearray()
    index, end = 0, len(data)
    while index < end:
        code = data[index]
        if code == 0:
            return None
        block_end = index + code
        if block_end > end:
            return None
        block = data[index + 1 : block_end]
        if 0 in block:
            return None
        out += block
        index = block_end
        if code != 255 and index < end:
            out.append(0)
    return bytes(out)


def encode_frame(type: int, seq: int, ref: int, body: bytes = b"") -> bytes:
    """One frame as it goes on the line, delimiters included."""
    if type not in FRAME_TYPES:
        raise ValueError(f"unknown frame type {type}")
    if not (0 <= seq <= MAX_SEQ and 0 <= ref <= MAX_SEQ):
        raise ValueError(f"seq {seq} and ref {ref} must fit in 64 bits")
    if len(body) > MAX_BODY_BYTES:
        raise ValueError(f"a frame body of {len(body)} bytes is over {MAX_BODY_BYTES}")
    raw = _HEADER.pack(VERSION, type, seq, ref) + body
    return b"\x00" + cobs_encode(raw + crc32(raw).to_bytes(4, "big")) + b"\x00"


def decode_run(run: bytes) -> Frame | Fault:
    """What one run of stuffed bytes between two delimiters is."""
    raw = cobs_decode(run)
    if raw is None or not MIN_FRAME_BYTES <= len(raw) <= MAX_FRAME_BYTES:
        return Fault(GARBAGE, len(run))
    if crc32(raw[:-CRC_BYTES]) != int.from_bytes(raw[-CRC_BYTES:], "big"):
        return Fault(DAMAGED, len(run))
    version, type, seq, ref = _HEADER.unpack_from(raw)
    if version != VERSION or type not in FRAME_TYPES:
        return Fault(UNKNOWN, len(run))
    return Frame(type, seq, ref, raw[HEADER_BYTES:-CRC_BYTES])


class FrameDecoder:
    """Bytes in, frames and faults out; keeps the unfinished run between calls."""

    def __init__(self) -> None:
        self._run = bytearray()
        self._overflowed = False  # discarding an over-long run until the next delimiter

    def feed(self, data: bytes) -> list[Frame | Fault]:
        out: list[Frame | Fault] = []
        start = 0
        while start <= len(data):
            end = data.find(0, start)
            piece = data[start:] if end < 0 else data[start:end]
            if not self._overflowed:
                self._run += piece
                if len(self._run) > MAX_STUFFED_BYTES:
                    out.append(Fault(GARBAGE, len(self._run)))  # counted once, when it overflows
                    self._run.clear()
                    self._overflowed = True
            if end < 0:
                break
            if self._run:
                out.append(decode_run(bytes(self._run)))
                self._run.clear()
            self._overflowed = False
            start = end + 1
        return out

    @property
    def buffered(self) -> int:
        """Bytes of an unfinished run held now."""
        return len(self._run)
