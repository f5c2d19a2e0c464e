"""A device's durable FIFO of outgoing records: `Outbox`.

A device appends every sealed reading here before it publishes it, and marks it done when the
broker's PUBACK arrives; whatever is still pending after a lost connection or a restart is sent
again, oldest first. This module does file I/O only: it never touches the network, and it never
reorders, rewrites or drops a pending record except the torn tail of a write a crash interrupted.

File format (one append-only log, `path`), a sequence of frames:

    kind (1 byte: 1 = append, 2 = done) | key (8 bytes, big-endian) | length (4) | crc32 (4) | data

The CRC covers kind, key, length and data. Opening replays the frames; the first frame that is
short or whose CRC does not match ends the log: it and everything after it are cut off with one
warning. Only a crash in the middle of a write leaves such a tail, because frames are only ever
appended.

Durability: every `append` is written and fsync'd before it returns (no batching). A reading is
"taken" when `Device.publish` returns its seq, and the caller may drop its sample then; a batch
window would let a power cut lose readings the caller believes are safe. The price is one fsync
per reading, about 0.25 ms on the ext4 disk of the development machine (some 4000 readings/s),
far above what a sensor samples. Done marks are written but NOT fsync'd: losing one to a power cut
only makes the device send that reading again, and receivers drop the duplicate by its sequence
number (tomq.wire watermarks).

Keys must rise: they are the readings' sequence numbers. Pending records are held in memory too
(a reading is a few hundred bytes: 100 000 pending readings, about 28 hours of a 1 Hz sensor, are
some 20-30 MB). Whenever nothing is pending the file is truncated to nothing; when little is
pending in a file larger than `compact_bytes`, the pending records are rewritten to a new file that
replaces the old one atomically.
"""

from __future__ import annotations

import bisect
import logging
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

from tomq.durable import fsync_directory
from tomq.errors import UsageError

log = logging.getLogger("tomq.sensors.outbox")

_HEADER = struct.Struct(">BQII")  # kind, key, length, crc32
_APPEND, _DONE = 1, 2
MAX_RECORD_BYTES = 16 * 1024 * 1024  # a frame claiming more is damage, not a record
DEFAULT_COMPACT_BYTES = 256 * 1024


def _crc(kind: int, key: int, data: bytes) -> int:
    return zlib.crc32(data, zlib.crc32(struct.pack(">BQI", kind, key, len(data))))


def _frame(kind: int, key: int, data: bytes = b"") -> bytes:
    return _HEADER.pack(kind, key, len(data), _crc(kind, key, data)) + data


class Outbox:
    """Durable FIFO of byte records keyed by rising integers. Not thread-safe: the caller locks."""

    def __init__(self, path: str | os.PathLike[str], *, compact_bytes: int = DEFAULT_COMPACT_BYTES) -> None:
        self.path = Path(path)
        self.compact_bytes = compact_bytes
        self._records: dict[int, bytes] = {}  # pending, in key order (insertion order = key order)
        self._order: list[int] = []  # keys ever appended since the last compaction, rising
        self._head = 0  # index in _order before which every key is done
        self._last_key = 0
        self._size = 0
        self.truncated_bytes = 0  # how much of a torn tail opening cut off (0: none)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._replay()
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    # -------------------------------------------------------------------- reading the log

    def _replay(self) -> None:
        try:
            content = self.path.read_bytes()
        except FileNotFoundError:
            return
        offset = 0
        while offset < len(content):
            frame_end = self._replay_frame(content, offset)
            if frame_end is None:
                break
            offset = frame_end
        if offset < len(content):
            self.truncated_bytes = len(content) - offset
            log.warning("outbox %s: cut off %d bytes of a torn or damaged record at offset %d "
                        "(a crash interrupted a write); %d records pending",
                        self.path, self.truncated_bytes, offset, len(self._records))
            os.truncate(self.path, offset)
        self._size = offset

    def _replay_frame(self, content: bytes, offset: int) -> int | None:
        """Apply the frame at `offset`; return where the next one starts, or None if it is not whole."""
        if offset + _HEADER.size > len(content):
            return None
        kind, key, length, crc = _HEADER.unpack_from(content, offset)
        start = offset + _HEADER.size
        end = start + length
        if kind not in (_APPEND, _DONE) or length > MAX_RECORD_BYTES or end > len(content):
            return None
        data = content[start:end]
        if _crc(kind, key, data) != crc:
            return None
        if kind == _APPEND:
            if key <= self._last_key:
                return None  # keys only rise; a frame that says otherwise is not one we wrote
            self._records[key] = data
            self._order.append(key)
            self._last_key = key
        else:
            self._records.pop(key, None)
        self._advance_head()
        return end

    # -------------------------------------------------------------------- the FIFO

    def append(self, key: int, data: bytes) -> None:
        """Add a record under `key` (above every key so far); on disk (fsync'd) when this returns."""
        if key <= self._last_key:
            raise UsageError(f"outbox {self.path}: key {key} is not above the last key {self._last_key}")
        if len(data) > MAX_RECORD_BYTES:
            raise UsageError(f"outbox {self.path}: a record of {len(data)} bytes is over {MAX_RECORD_BYTES}")
        frame = _frame(_APPEND, key, data)
        fd = self._writable()
        _write_all(fd, frame)
        os.fsync(fd)
        self._size += len(frame)
        self._records[key] = data
        self._order.append(key)
        self._last_key = key

    def mark_done(self, key: int) -> bool:
        """Forget the record under `key` (it was delivered); False if it was not pending."""
        if key not in self._records:
            return False
        frame = _frame(_DONE, key)
        _write_all(self._writable(), frame)  # not fsync'd: losing it only causes a resend
        self._size += len(frame)
        del self._records[key]
        self._advance_head()
        self._maybe_compact()
        return True

    def pending(self, after: int = 0, limit: int | None = None) -> Iterator[tuple[int, bytes]]:
        """Pending (key, record) pairs with key > `after`, oldest first, at most `limit` of them."""
        index = bisect.bisect_right(self._order, after, lo=self._head)
        given = 0
        while index < len(self._order) and (limit is None or given < limit):
            key = self._order[index]
            index += 1
            data = self._records.get(key)
            if data is not None:
                given += 1
                yield key, data

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, key: object) -> bool:
        return key in self._records

    @property
    def last_key(self) -> int:
        return self._last_key

    @property
    def size(self) -> int:
        """Bytes in the log file now."""
        return self._size

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # -------------------------------------------------------------------- housekeeping

    def _writable(self) -> int:
        if self._fd is None:
            raise UsageError(f"outbox {self.path} is closed")
        return self._fd

    def _advance_head(self) -> None:
        while self._head < len(self._order) and self._order[self._head] not in self._records:
            self._head += 1
        if self._head > 1024 and self._head * 2 > len(self._order):
            del self._order[: self._head]
            self._head = 0

    def _maybe_compact(self) -> None:
        fd = self._writable()
        if not self._records:
            # Everything is delivered: the log starts again from nothing. Not fsync'd, for the same
            # reason as the done marks; the next append's fsync makes the truncation durable too.
            if self._size:
                os.ftruncate(fd, 0)
                self._size = 0
            self._order.clear()
            self._head = 0
            return
        if self._size < self.compact_bytes:
            return
        live = sum(len(data) + _HEADER.size for data in self._records.values())
        if live * 4 > self._size:
            return
        # Little is pending in a large file: write the pending records to a new file, put it in place.
        temp = self.path.with_name(f".{self.path.name}.tmp")
        with open(temp, "wb") as handle:
            for key, data in self._records.items():
                handle.write(_frame(_APPEND, key, data))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, self.path)
        fsync_directory(self.path.parent)
        os.close(fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self._size = live
        self._order = list(self._records)
        self._head = 0


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
