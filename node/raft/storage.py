"""Durable Raft storage: one node's hard state, entry log and latest snapshot.

The sans-IO Raft core keeps its log in memory and hands this module "persist these entries / this
hard state / this snapshot"; on start the adapter calls `load()` and gives the result to the core.
`FileStorage` puts it on disk, `MemoryStorage` is the same contract without a disk for unit tests
and the simulator.

What this module must never do:
- return from `sync()` (or a self-syncing call) before everything handed to it is fsynced, because
  Raft grants votes and acknowledges entries on the strength of that return;
- silently drop a record that has valid records after it: a torn tail left by a crash is repaired
  and reported, anything else is disk damage and stops the node with `CorruptLogError`;
- lose the previous hard state or snapshot to a write that is cut short;
- know Raft beyond the shape of a log (no elections, no network, no clock).

Directory layout (all integers little-endian, every checksum is zlib CRC32):
- `raft.log`: b"TOMQLOG1", then entry records: magic b"\\xc3\\x9e", crc u32, data length u32,
  term u64, index u64, kind u8, data. The crc covers everything after itself. Indices in the file are
  contiguous; records at or below the snapshot index are dead until the file is rewritten.
- `hardstate`: b"TOMQHS01", then records: magic b"\\xc3\\x48", crc u32, length u32, payload
  (term u64, commit u64, has-vote u8, vote utf-8). The last valid record is the hard state.
- `snapshot`: magic b"TOMQSNP2", crc u32, index u64, term u64, meta length u32, data length u64,
  meta (canonical CBOR {"voters": [...], "decided": [...]}), data. Replaced atomically, so never torn.
- `lock`: flock'd while open, so two processes can never write one log.
"""

from __future__ import annotations

import fcntl
import functools
import itertools
import logging
import os
import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Concatenate, ParamSpec, Protocol, TypeVar

from tomq import canonical
from tomq.durable import fsync_directory
from tomq.errors import TomqError
from tomq.node.raft.types import Entry, EntryKind, HardState, Snapshot, SnapshotMeta

log = logging.getLogger("tomq.raft.storage")

_T = TypeVar("_T")
_R = TypeVar("_R")
_P = ParamSpec("_P")

_LOG_HEADER = b"TOMQLOG1"
_HS_HEADER = b"TOMQHS01"
_FILE_HEADER_LEN = 8
_ENTRY_MAGIC = b"\xc3\x9e"
_ENTRY = struct.Struct("<2sIIQQB")  # magic, crc, data length, term, index, kind
_ENTRY_TAIL = struct.Struct("<IQQB")  # the part of the header the crc covers
_U32 = struct.Struct("<I")
_HS_MAGIC = b"\xc3\x48"
_HS = struct.Struct("<2sII")  # magic, crc, payload length
_HS_PAYLOAD = struct.Struct("<QQB")  # term, commit, has vote
_SNAP = struct.Struct("<8sIQQIQ")  # magic, crc, index, term, voters length, data length
_SNAP_MAGIC = b"TOMQSNP2"
# The hard-state file is rewritten to a single record past this size; small enough to read at start
# in no time, large enough that the rewrite (two extra fsyncs) is rare.
_HS_REWRITE_BYTES = 64 * 1024
_RESTORE = "restore this node's data directory from a peer"


class StorageError(TomqError):
    """The Raft storage cannot do what was asked; the message says what to do about it."""


class CorruptLogError(StorageError):
    """Data on disk is damaged in a way a crash cannot explain; the node must not start on it."""


@dataclass(frozen=True, slots=True)
class LoadedState:
    hard_state: HardState
    snapshot: Snapshot | None
    entries: list[Entry]  # the entries after the snapshot, contiguous


class Storage(Protocol):
    def load(self) -> LoadedState: ...
    def append(self, entries: Sequence[Entry]) -> None: ...
    def set_hard_state(self, hs: HardState, *, durable: bool = True) -> None:
        """`durable=False`: only the commit index moved (volatile in Raft); sync() need not cover it."""
    def save_snapshot(self, snapshot: Snapshot) -> None: ...
    def sync(self) -> None: ...
    def close(self) -> None: ...


def _check_append(entries: Sequence[Entry], snap_index: int, last_index: int) -> None:
    first = entries[0].index
    if any(e.index != first + k for k, e in enumerate(entries)):
        raise StorageError(f"entries to append are not contiguous from index {first}")
    if first <= snap_index:
        raise StorageError(f"cannot append at index {first}: up to {snap_index} is in the snapshot")
    if first > last_index + 1:
        raise StorageError(f"cannot append at index {first}: the next index is at most {last_index + 1}")


class MemoryStorage:
    """The storage contract without a disk. close() keeps the state: the simulator "restarts" a node
    by calling load() again on the same object."""

    def __init__(self) -> None:
        self._hs = HardState()
        self._snapshot: Snapshot | None = None
        self._entries: list[Entry] = []

    def _snap_index(self) -> int:
        return self._snapshot.meta.index if self._snapshot else 0

    def load(self) -> LoadedState:
        return LoadedState(self._hs, self._snapshot, list(self._entries))

    def append(self, entries: Sequence[Entry]) -> None:
        if not entries:
            return
        snap = self._snap_index()
        _check_append(entries, snap, snap + len(self._entries))
        del self._entries[entries[0].index - snap - 1 :]
        self._entries.extend(entries)

    def set_hard_state(self, hs: HardState, *, durable: bool = True) -> None:
        self._hs = hs

    def save_snapshot(self, snapshot: Snapshot) -> None:
        meta, snap = snapshot.meta, self._snap_index()
        if meta.index <= snap:
            return
        k = meta.index - snap - 1
        # Raft's rule: the entries after the snapshot survive only if the log agrees with it there.
        if k < len(self._entries) and self._entries[k].term == meta.term:
            self._entries = self._entries[k + 1 :]
        else:
            self._entries = []
        self._snapshot = snapshot

    def sync(self) -> None:
        pass

    def close(self) -> None:
        pass


def _encode_entry(e: Entry) -> bytes:
    tail = _ENTRY_TAIL.pack(len(e.data), e.term, e.index, e.kind)
    return b"".join((_ENTRY_MAGIC, _U32.pack(zlib.crc32(e.data, zlib.crc32(tail))), tail, e.data))


def _parse_entry(buf: bytes | memoryview, pos: int) -> tuple[Entry, int] | None:
    """The entry at `pos` and the offset after it, or None if it is incomplete or fails its crc."""
    if pos + _ENTRY.size > len(buf):
        return None
    magic, crc, length, term, index, kind = _ENTRY.unpack_from(buf, pos)
    end = pos + _ENTRY.size + length
    if magic != _ENTRY_MAGIC or end > len(buf) or zlib.crc32(buf[pos + 6 : end]) != crc:
        return None
    try:
        return Entry(term, index, EntryKind(kind), bytes(buf[pos + _ENTRY.size : end])), end
    except ValueError:  # a kind this version does not know: refuse rather than guess
        return None


def _entry_follows(last: Entry | None, candidate: Entry) -> bool:
    # Indices in the file only grow, so a stray byte pattern with an older index is no later record.
    return last is None or candidate.index > last.index


def _encode_hs(hs: HardState) -> bytes:
    vote = b"" if hs.vote is None else hs.vote.encode()
    payload = _HS_PAYLOAD.pack(hs.term, hs.commit, hs.vote is not None) + vote
    body = struct.pack("<I", len(payload)) + payload
    return _HS_MAGIC + struct.pack("<I", zlib.crc32(body)) + body


def _parse_hs(buf: bytes | memoryview, pos: int) -> tuple[HardState, int] | None:
    if pos + _HS.size > len(buf):
        return None
    magic, crc, length = _HS.unpack_from(buf, pos)
    end = pos + _HS.size + length
    if magic != _HS_MAGIC or length < _HS_PAYLOAD.size or end > len(buf):
        return None
    if zlib.crc32(buf[pos + 6 : end]) != crc:
        return None
    term, commit, has_vote = _HS_PAYLOAD.unpack_from(buf, pos + _HS.size)
    try:
        vote = bytes(buf[pos + _HS.size + _HS_PAYLOAD.size : end]).decode() if has_vote else None
    except UnicodeDecodeError:  # a vote we never wrote, whatever its crc says: refuse it like a bad crc
        return None
    return HardState(term, vote, commit), end


def _encode_snapshot(s: Snapshot) -> bytes:
    meta = canonical.encode({"voters": list(s.meta.voters), "decided": list(s.meta.decided)})
    rest = _SNAP.pack(_SNAP_MAGIC, 0, s.meta.index, s.meta.term, len(meta), len(s.data))[12:]
    crc = zlib.crc32(s.data, zlib.crc32(meta, zlib.crc32(rest)))
    return _SNAP_MAGIC + struct.pack("<I", crc) + rest + meta + s.data


def _decode_snapshot(path: Path, buf: bytes) -> Snapshot:
    _, crc, index, term, meta_len, data_len = _SNAP.unpack_from(buf.ljust(_SNAP.size, b"\0"))
    intact = buf[:8] == _SNAP_MAGIC and _SNAP.size + meta_len + data_len == len(buf)
    if not intact or zlib.crc32(buf[12:]) != crc:
        raise CorruptLogError(f"{path}: snapshot is not intact; {_RESTORE}")
    # The crc only says the bytes are as written; meta we did not write (a bug, an edit) must still stop the
    # node with CorruptLogError, not a CanonicalDecodeError or KeyError from the middle of startup (fuzzing).
    try:
        meta = canonical.decode(buf[_SNAP.size : _SNAP.size + meta_len])
        voters, decided = meta["voters"], meta["decided"]
    except (canonical.CanonicalDecodeError, KeyError, TypeError, IndexError):
        voters = decided = None
    if (type(voters) is not list or type(decided) is not list or not all(type(v) is str for v in voters)
            or not all(type(d) is bytes for d in decided)):
        raise CorruptLogError(f"{path}: snapshot meta is not {{voters: [text], decided: [bytes]}}; "
                              f"{_RESTORE}")
    return Snapshot(SnapshotMeta(index, term, tuple(voters), tuple(decided)), buf[_SNAP.size + meta_len :])


def _scan(
    path: Path,
    buf: bytes,
    magic: bytes,
    parse: Callable[[bytes, int], tuple[_T, int] | None],
    follows: Callable[[_T | None, _T], bool],
) -> tuple[list[tuple[int, _T]], int]:
    """The valid records with their offsets, and the offset where valid data ends.

    A crash can only tear the tail, so a bad record with a valid successor anywhere after it is
    damage: raise rather than drop committed data. Probing every magic occurrence (not just the bad
    record's claimed end) is what catches a corrupted length field."""
    records: list[tuple[int, _T]] = []
    pos = _FILE_HEADER_LEN
    while (parsed := parse(buf, pos)) is not None:
        records.append((pos, parsed[0]))
        pos = parsed[1]
    last = records[-1][1] if records else None
    probe = buf.find(magic, pos + 1)
    while pos < len(buf) and probe != -1:
        later = parse(buf, probe)
        if later is not None and follows(last, later[0]):
            msg = f"{path}: corrupt record at byte offset {pos}, valid record after it at offset {probe}"
            raise CorruptLogError(f"{msg}; refusing to start: {_RESTORE}")
        probe = buf.find(magic, probe + 1)
    return records, pos


def _write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n



def _write_atomic(path: Path, data: bytes) -> int:
    """Replace `path` by `data` so that a crash leaves either the old or the new file, never a mix.
    Returns a read-write fd on the new file."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        _write_all(fd, data, 0)
        os.fsync(fd)
        os.replace(tmp, path)
        fsync_directory(path.parent)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _fatal_on_oserror(
    method: Callable[Concatenate[FileStorage, _P], _R],
) -> Callable[Concatenate[FileStorage, _P], _R]:
    """An I/O error half way through a write leaves memory and disk out of step, and after a failed
    fsync the kernel may have dropped the dirty pages, so a retry could "succeed" without the data.
    Refuse everything from then on; a restart recovers from what is on disk."""

    @functools.wraps(method)
    def wrapper(self: FileStorage, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return method(self, *args, **kwargs)
        except OSError as exc:
            self._failed = f"{self._dir}: {method.__name__} failed ({exc}); restart the node to recover"
            raise StorageError(self._failed) from exc

    return wrapper


class FileStorage:
    """Raft storage in one directory. With sync_each_write=True, append() and set_hard_state() fsync
    by themselves; by default the caller batches them and calls sync() once before sending."""

    def __init__(self, directory: str | os.PathLike[str], *, sync_each_write: bool = False) -> None:
        self._dir = Path(directory)
        self._sync_each = sync_each_write
        self.recovered_tail: str | None = None
        self._failed: str | None = None
        self._fds: dict[str, int] = {}
        try:
            if not self._dir.is_dir():
                self._dir.mkdir(parents=True)
                fsync_directory(self._dir.parent)  # else a power loss could take the new directory, files and all
            self._fds["lock"] = os.open(self._dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(self._fds["lock"], fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StorageError(f"{self._dir} is in use by another tomq process; stop it") from None
            for name in ("raft.log.tmp", "hardstate.tmp", "snapshot.tmp"):
                (self._dir / name).unlink(missing_ok=True)  # an interrupted atomic write; the original stands
            snap_path = self._dir / "snapshot"
            snap = _decode_snapshot(snap_path, snap_path.read_bytes()) if snap_path.exists() else None
            self._snap_meta = snap.meta if snap else SnapshotMeta(0, 0)
            self._open_hard_state()
            self._open_log()
        except BaseException as exc:
            self._close_fds()
            if isinstance(exc, OSError):
                raise StorageError(f"{self._dir}: cannot open ({exc}); check its permissions") from exc
            raise
        self._log_dirty = self._hs_dirty = False

    # -- opening -------------------------------------------------------------------------------------

    def _open(self, name: str, header: bytes) -> tuple[Path, bytes]:
        path = self._dir / name
        if not path.exists():
            os.close(_write_atomic(path, header))
        self._fds[name] = os.open(path, os.O_RDWR)
        buf = path.read_bytes()
        if buf[:_FILE_HEADER_LEN] != header:
            raise StorageError(f"{path}: not a tomq {name} file; point the node at its own data directory")
        return path, buf

    def _repair_tail(self, path: Path, name: str, size: int, good_end: int, kept: str) -> None:
        os.ftruncate(self._fds[name], good_end)
        os.fsync(self._fds[name])
        msg = f"{path}: discarded a torn tail of {size - good_end} bytes at byte offset {good_end} ({kept})"
        log.warning(msg)
        self.recovered_tail = msg if self.recovered_tail is None else f"{self.recovered_tail}; {msg}"

    def _open_hard_state(self) -> None:
        path, buf = self._open("hardstate", _HS_HEADER)
        records, end = _scan(path, buf, _HS_MAGIC, _parse_hs, lambda _last, _hs: True)
        self._hs = records[-1][1] if records else HardState()
        if end < len(buf):
            self._repair_tail(path, "hardstate", len(buf), end, f"kept term {self._hs.term}")
        self._hs_end = end

    def _open_log(self) -> None:
        path, buf = self._open("raft.log", _LOG_HEADER)
        records, end = _scan(path, buf, _ENTRY_MAGIC, _parse_entry, _entry_follows)
        for (_, prev), (offset, entry) in itertools.pairwise(records):
            if entry.index != prev.index + 1:
                msg = f"{path}: record at byte offset {offset} has index {entry.index}, expected {prev.index + 1}"
                raise CorruptLogError(f"{msg}; {_RESTORE}")
        if end < len(buf):
            self._repair_tail(path, "raft.log", len(buf), end, f"kept {len(records)} records")
        self._offsets, self._end = [offset for offset, _ in records], end
        snap = self._snap_meta
        self._first = records[0][1].index if records else snap.index + 1
        if self._first > snap.index + 1:
            msg = f"{path}: log starts at index {self._first} but the snapshot ends at {snap.index}"
            raise CorruptLogError(f"{msg}; is the snapshot file missing? {_RESTORE}")
        if self._last_index() < snap.index or self._term_at(snap.index) != snap.term:
            # A crash between writing a snapshot and dropping the log it replaces: finish the job.
            self._truncate_from(self._first, snap.index + 1)

    # -- helpers -------------------------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._failed:
            raise StorageError(self._failed)
        if "raft.log" not in self._fds:
            raise StorageError(f"{self._dir}: storage is closed")

    def _last_index(self) -> int:
        return self._first + len(self._offsets) - 1

    def _term_at(self, index: int) -> int:
        if index < self._first:  # the snapshot itself, or index 0 before any snapshot
            return self._snap_meta.term
        head = os.pread(self._fds["raft.log"], _ENTRY.size, self._offsets[index - self._first])
        return int(_ENTRY.unpack(head)[3])

    def _truncate_from(self, index: int, first_if_empty: int) -> None:
        """Drop the records at `index` and after, durably before anything is written in their place:
        otherwise new records could land in front of stale ones and look like mid-log damage."""
        k = index - self._first
        self._end = self._offsets[k] if k < len(self._offsets) else self._end
        if k <= 0:
            self._end, self._first = _FILE_HEADER_LEN, first_if_empty
        del self._offsets[max(k, 0) :]
        os.ftruncate(self._fds["raft.log"], self._end)
        os.fsync(self._fds["raft.log"])

    def _compact_if_worth_it(self) -> None:
        """Rewrite the log without its dead prefix once that prefix is at least as big as the live part:
        the copy is then paid for by the space it frees, and the file stays under twice the live log."""
        dead = self._snap_meta.index + 1 - self._first
        if dead <= 0:
            return
        cut = self._offsets[dead] if dead < len(self._offsets) else self._end
        if cut - _FILE_HEADER_LEN < self._end - cut:
            return
        live = os.pread(self._fds["raft.log"], self._end - cut, cut)
        new_fd = _write_atomic(self._dir / "raft.log", _LOG_HEADER + live)
        os.close(self._fds["raft.log"])
        self._fds["raft.log"] = new_fd
        shift = cut - _FILE_HEADER_LEN
        self._offsets = [offset - shift for offset in self._offsets[dead:]]
        self._first, self._end, self._log_dirty = self._snap_meta.index + 1, self._end - shift, False

    def _close_fds(self) -> None:
        for fd in self._fds.values():
            os.close(fd)  # closing the lock fd releases the flock
        self._fds.clear()

    # -- the storage contract ------------------------------------------------------------------------

    @_fatal_on_oserror
    def load(self) -> LoadedState:
        self._check_usable()
        snapshot = None
        if self._snap_meta.index:
            snapshot = _decode_snapshot(self._dir / "snapshot", (self._dir / "snapshot").read_bytes())
        entries: list[Entry] = []
        k = max(0, self._snap_meta.index + 1 - self._first)
        if k < len(self._offsets):
            start = self._offsets[k]
            buf = os.pread(self._fds["raft.log"], self._end - start, start)
            pos = 0
            while pos < len(buf):
                parsed = _parse_entry(buf, pos)
                if parsed is None:
                    msg = f"{self._dir / 'raft.log'}: record at byte offset {start + pos} changed since start"
                    raise CorruptLogError(f"{msg}; {_RESTORE}")
                entries.append(parsed[0])
                pos = parsed[1]
        return LoadedState(self._hs, snapshot, entries)

    @_fatal_on_oserror
    def append(self, entries: Sequence[Entry]) -> None:
        self._check_usable()
        if not entries:
            return
        _check_append(entries, self._snap_meta.index, self._last_index())
        if entries[0].index <= self._last_index():
            self._truncate_from(entries[0].index, entries[0].index)
        records = [_encode_entry(e) for e in entries]
        offsets, pos = [], self._end
        for record in records:
            offsets.append(pos)
            pos += len(record)
        _write_all(self._fds["raft.log"], b"".join(records), self._end)
        self._offsets.extend(offsets)
        self._end, self._log_dirty = pos, True
        if self._sync_each:
            self.sync()

    @_fatal_on_oserror
    def set_hard_state(self, hs: HardState, *, durable: bool = True) -> None:
        self._check_usable()
        if hs == self._hs:
            return
        record = _encode_hs(hs)
        if self._hs_end + len(record) > _HS_REWRITE_BYTES:
            new_fd = _write_atomic(self._dir / "hardstate", _HS_HEADER + record)
            os.close(self._fds["hardstate"])
            self._fds["hardstate"], self._hs_dirty = new_fd, False
            self._hs_end = _FILE_HEADER_LEN + len(record)
        else:
            # Appending, never overwriting: a torn write leaves the previous record intact before it.
            _write_all(self._fds["hardstate"], record, self._hs_end)
            self._hs_end += len(record)
            # A commit-index-only record is left to the page cache (the next durable record's fsync
            # takes it along): a second fsync beside every log append, on a follower's path to its
            # acknowledgement, bought nothing Raft needs. A power cut may lose it, or tear it as the
            # file's tail, which opening repairs; the commit index then briefly goes back, as Raft allows.
            self._hs_dirty = self._hs_dirty or durable
        self._hs = hs
        if self._sync_each and durable:
            self.sync()

    @_fatal_on_oserror
    def save_snapshot(self, snapshot: Snapshot) -> None:
        self._check_usable()
        meta = snapshot.meta
        if meta.index <= self._snap_meta.index:
            return
        # The snapshot is durable before any entry is dropped; a crash in between is finished on open.
        os.close(_write_atomic(self._dir / "snapshot", _encode_snapshot(snapshot)))
        keep = self._last_index() >= meta.index and self._term_at(meta.index) == meta.term
        self._snap_meta = meta
        if keep:
            self._compact_if_worth_it()
        else:
            self._truncate_from(self._first, meta.index + 1)

    @_fatal_on_oserror
    def sync(self) -> None:
        self._check_usable()
        if self._log_dirty:
            os.fsync(self._fds["raft.log"])
            self._log_dirty = False
        if self._hs_dirty:
            os.fsync(self._fds["hardstate"])
            self._hs_dirty = False

    def close(self) -> None:
        if not self._fds:
            return
        try:
            if not self._failed:
                self.sync()
        finally:
            self._close_fds()

    def __enter__(self) -> FileStorage:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
