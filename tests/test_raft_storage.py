"""Raft storage: the same contract for MemoryStorage and FileStorage, and FileStorage's crash safety."""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from storage_writer_child import payload

from tomq.node.raft.storage import (
    CorruptLogError,
    FileStorage,
    LoadedState,
    MemoryStorage,
    Storage,
    StorageError,
)
from tomq.node.raft.types import Entry, EntryKind, HardState, Snapshot, SnapshotMeta

RECORD_HEADER = 27  # magic 2, crc 4, length 4, term 8, index 8, kind 1 (see the storage docstring)
LOG_HEADER = 8


def ents(first: int, last: int, term: int = 1, tag: bytes = b"e") -> list[Entry]:
    kinds = list(EntryKind)
    return [Entry(term, i, kinds[i % len(kinds)], tag + b"-%d" % i) for i in range(first, last + 1)]


Reopen = Callable[[Storage | None], Storage]


@pytest.fixture(params=["memory", "file"])
def reopen(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Reopen]:
    """reopen(old) closes `old` and opens the same storage again (MemoryStorage survives a close)."""
    memory = MemoryStorage()
    opened: list[Storage] = []

    def _reopen(old: Storage | None) -> Storage:
        if old is not None:
            old.close()
        storage: Storage = memory if request.param == "memory" else FileStorage(tmp_path / "raft")
        opened.append(storage)
        return storage

    yield _reopen
    for storage in opened:
        storage.close()


# -- the contract, for both implementations --------------------------------------------------------


def test_empty_storage_loads_defaults(reopen: Reopen) -> None:
    assert reopen(None).load() == LoadedState(HardState(), None, [])


def test_append_load_round_trip(reopen: Reopen) -> None:
    s = reopen(None)
    batch = [*ents(1, 3), Entry(2, 4, EntryKind.CONFIG, bytes(range(256))), Entry(2, 5, EntryKind.NOOP, b"")]
    s.append(batch[:2])
    s.append(batch[2:])
    s.append([])
    s.sync()
    assert s.load().entries == batch
    assert reopen(s).load().entries == batch


def test_conflicting_suffix_is_truncated(reopen: Reopen) -> None:
    s = reopen(None)
    s.append(ents(1, 10))
    s.append(ents(6, 7, term=2, tag=b"new"))
    expected = ents(1, 5) + ents(6, 7, term=2, tag=b"new")
    assert s.load().entries == expected
    s = reopen(s)
    assert s.load().entries == expected
    s.append(ents(8, 8, term=2))
    s.append(ents(1, 2, term=3))  # a conflict at the very first index
    assert reopen(s).load().entries == ents(1, 2, term=3)


def test_append_rejects_gaps_and_non_contiguous_batches(reopen: Reopen) -> None:
    s = reopen(None)
    with pytest.raises(StorageError, match="next index is at most 1"):
        s.append(ents(2, 3))
    s.append(ents(1, 3))
    with pytest.raises(StorageError, match="at most 4"):
        s.append(ents(5, 6))
    with pytest.raises(StorageError, match="not contiguous"):
        s.append([*ents(4, 4), *ents(6, 6)])
    assert s.load().entries == ents(1, 3)


def test_hard_state_round_trip(reopen: Reopen) -> None:
    s = reopen(None)
    s.set_hard_state(HardState(3, "n2", 7))
    s.sync()
    assert s.load().hard_state == HardState(3, "n2", 7)
    s = reopen(s)
    assert s.load().hard_state == HardState(3, "n2", 7)
    s.set_hard_state(HardState(4, None, 9))
    s.set_hard_state(HardState(5, "nœud-ü", 9))
    assert reopen(s).load().hard_state == HardState(5, "nœud-ü", 9)


def test_snapshot_compacts_and_keeps_the_matching_suffix(reopen: Reopen) -> None:
    s = reopen(None)
    s.append(ents(1, 10))
    snap = Snapshot(SnapshotMeta(6, 1, ("n1", "n2")), b"state at 6")
    s.save_snapshot(snap)
    assert s.load() == LoadedState(HardState(), snap, ents(7, 10))
    s = reopen(s)
    assert s.load() == LoadedState(HardState(), snap, ents(7, 10))
    with pytest.raises(StorageError, match="up to 6 is in the snapshot"):
        s.append(ents(6, 7, term=2))
    s.append(ents(7, 8, term=2))
    s.append(ents(9, 9, term=2))
    assert reopen(s).load().entries == ents(7, 9, term=2)


@pytest.mark.parametrize(
    "meta", [SnapshotMeta(6, 2), SnapshotMeta(15, 3)], ids=["term-mismatch", "beyond-log"]
)
def test_snapshot_that_disagrees_with_the_log_replaces_it(reopen: Reopen, meta: SnapshotMeta) -> None:
    s = reopen(None)
    s.append(ents(1, 10))
    s.save_snapshot(Snapshot(meta, b"x"))
    assert s.load().entries == []
    with pytest.raises(StorageError, match=f"at most {meta.index + 1}"):
        s.append(ents(meta.index + 2, meta.index + 2))
    s.append(ents(meta.index + 1, meta.index + 1, term=meta.term))
    loaded = reopen(s).load()
    assert loaded.snapshot == Snapshot(meta, b"x")
    assert loaded.entries == ents(meta.index + 1, meta.index + 1, term=meta.term)


def test_older_snapshot_is_ignored(reopen: Reopen) -> None:
    s = reopen(None)
    s.append(ents(1, 10))
    current = Snapshot(SnapshotMeta(6, 1, ("a",)), b"six")
    s.save_snapshot(current)
    s.save_snapshot(Snapshot(SnapshotMeta(4, 1), b"four"))
    s.save_snapshot(Snapshot(SnapshotMeta(6, 1), b"six again"))
    assert s.load() == LoadedState(HardState(), current, ents(7, 10))
    assert reopen(s).load() == LoadedState(HardState(), current, ents(7, 10))


def test_reopen_after_close_preserves_everything(reopen: Reopen) -> None:
    s = reopen(None)
    s.append(ents(1, 20))
    s.save_snapshot(Snapshot(SnapshotMeta(12, 1, ("n1", "n2", "n3")), b"\x00snap\xff"))
    s.append(ents(18, 25, term=2))
    s.set_hard_state(HardState(2, "n3", 15))
    before = s.load()
    s = reopen(s)
    assert s.load() == before
    assert reopen(s).load() == before
    assert before.entries == ents(13, 17) + ents(18, 25, term=2)


# -- FileStorage only --------------------------------------------------------------------------------


def record_offsets(entries: list[Entry]) -> list[int]:
    offsets, pos = [], LOG_HEADER
    for e in entries:
        offsets.append(pos)
        pos += RECORD_HEADER + len(e.data)
    return [*offsets, pos]


def write_log(directory: Path, entries: list[Entry]) -> tuple[bytes, list[int]]:
    s = FileStorage(directory)
    s.append(entries)
    s.close()
    raw = (directory / "raft.log").read_bytes()
    offsets = record_offsets(entries)
    assert len(raw) == offsets[-1]
    return raw, offsets


def test_torn_tail_at_every_offset_is_repaired_and_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    entries = ents(1, 5)
    raw, offsets = write_log(tmp_path / "orig", entries)
    for cut in range(offsets[-2] + 1, offsets[-1]):
        d = tmp_path / f"cut{cut}"
        d.mkdir()
        (d / "raft.log").write_bytes(raw[:cut])
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="tomq.raft.storage"):
            s = FileStorage(d)
        warnings = [r.getMessage() for r in caplog.records if r.name == "tomq.raft.storage"]
        assert len(warnings) == 1 and "\n" not in warnings[0]
        assert str(d / "raft.log") in warnings[0] and f"offset {offsets[-2]}" in warnings[0]
        assert s.recovered_tail == warnings[0]
        assert s.load().entries == entries[:4]
        assert (d / "raft.log").stat().st_size == offsets[-2]
        s.append(ents(5, 6, term=2))
        s.close()
        s = FileStorage(d)
        assert s.recovered_tail is None
        assert s.load().entries == entries[:4] + ents(5, 6, term=2)
        s.close()


def test_flipped_byte_in_last_record_is_a_torn_tail(tmp_path: Path) -> None:
    entries = ents(1, 5)
    raw, offsets = write_log(tmp_path / "orig", entries)
    for pos in range(offsets[-2], offsets[-1]):
        d = tmp_path / f"flip{pos}"
        d.mkdir()
        (d / "raft.log").write_bytes(raw[:pos] + bytes([raw[pos] ^ 0x40]) + raw[pos + 1 :])
        s = FileStorage(d)
        assert s.recovered_tail is not None and f"offset {offsets[-2]}" in s.recovered_tail
        assert s.load().entries == entries[:4]
        s.close()


def test_flipped_byte_in_a_middle_record_refuses_to_start(tmp_path: Path) -> None:
    entries = ents(1, 5)
    raw, offsets = write_log(tmp_path / "orig", entries)
    for pos in range(offsets[1], offsets[2]):
        d = tmp_path / f"flip{pos}"
        d.mkdir()
        (d / "raft.log").write_bytes(raw[:pos] + bytes([raw[pos] ^ 0x01]) + raw[pos + 1 :])
        with pytest.raises(CorruptLogError) as info:
            FileStorage(d)
        message = str(info.value)
        assert (
            "\n" not in message and str(d / "raft.log") in message and f"byte offset {offsets[1]}," in message
        )
        (d / "raft.log").write_bytes(raw)
        with FileStorage(d) as s:  # the failed open let go of the directory lock
            assert s.load().entries == entries


def test_missing_record_in_the_middle_refuses_to_start(tmp_path: Path) -> None:
    raw, offsets = write_log(tmp_path, ents(1, 5))
    (tmp_path / "raft.log").write_bytes(raw[: offsets[2]] + raw[offsets[3] :])
    with pytest.raises(CorruptLogError, match=f"byte offset {offsets[2]} has index 4, expected 3"):
        FileStorage(tmp_path)


def test_io_error_stops_the_storage_until_restart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = FileStorage(tmp_path)
    s.append(ents(1, 3))
    s.sync()
    with monkeypatch.context() as m:
        m.setattr(os, "pwrite", lambda *_: (_ for _ in ()).throw(OSError(28, "No space left on device")))
        with pytest.raises(StorageError, match=r"append failed .*No space left on device.*restart the node"):
            s.append(ents(4, 4))
    with pytest.raises(StorageError, match="append failed"):
        s.append(ents(4, 4))  # even though the disk works again: memory and disk may disagree now
    s.close()
    with FileStorage(tmp_path) as s:
        assert s.load().entries == ents(1, 3)


def test_torn_hard_state_write_keeps_the_previous_value(tmp_path: Path) -> None:
    orig = tmp_path / "orig"
    s = FileStorage(orig)
    s.set_hard_state(HardState(3, "n1", 5))
    s.sync()
    synced = (orig / "hardstate").stat().st_size
    s.set_hard_state(HardState(4, "n2", 6))
    s.close()
    raw = (orig / "hardstate").read_bytes()
    for cut in range(synced + 1, len(raw)):
        d = tmp_path / f"cut{cut}"
        d.mkdir()
        (d / "hardstate").write_bytes(raw[:cut])
        (d / "hardstate.tmp").write_bytes(b"half a rewrite")
        s = FileStorage(d)
        assert s.load().hard_state == HardState(3, "n1", 5)
        assert s.recovered_tail is not None and "hardstate" in s.recovered_tail
        assert not (d / "hardstate.tmp").exists()
        s.set_hard_state(HardState(4, None, 7))
        s.close()
        with FileStorage(d) as s:
            assert s.load().hard_state == HardState(4, None, 7)


def test_hard_state_file_stays_small(tmp_path: Path) -> None:
    s = FileStorage(tmp_path)
    for commit in range(5000):
        s.set_hard_state(HardState(1, "n1", commit))
    s.close()
    assert (tmp_path / "hardstate").stat().st_size <= 64 * 1024
    with FileStorage(tmp_path) as s:
        assert s.load().hard_state == HardState(1, "n1", 4999)


def test_compaction_reclaims_space(tmp_path: Path) -> None:
    s = FileStorage(tmp_path)
    s.append(ents(1, 1000, tag=b"x" * 100))
    s.sync()
    full = (tmp_path / "raft.log").stat().st_size
    s.save_snapshot(Snapshot(SnapshotMeta(950, 1), b"s"))
    assert (tmp_path / "raft.log").stat().st_size < full / 10
    s.append(ents(1001, 1010, tag=b"x" * 100))
    s.close()
    with FileStorage(tmp_path) as s:
        assert s.load().entries == ents(951, 1010, tag=b"x" * 100)


def test_compaction_waits_until_the_dead_prefix_outweighs_the_live_log(tmp_path: Path) -> None:
    s = FileStorage(tmp_path)
    s.append(ents(1, 10))
    s.save_snapshot(Snapshot(SnapshotMeta(3, 1), b"s"))
    size = (tmp_path / "raft.log").stat().st_size
    assert size == record_offsets(ents(1, 10))[-1]  # entries 1..3 are still in the file, dead
    assert s.load().entries == ents(4, 10)
    s.close()
    s = FileStorage(tmp_path)
    assert s.load().entries == ents(4, 10)
    s.save_snapshot(Snapshot(SnapshotMeta(6, 1), b"s"))
    assert (tmp_path / "raft.log").stat().st_size == record_offsets(ents(7, 10))[-1]
    assert s.load().entries == ents(7, 10)
    s.close()


def test_crash_between_snapshot_and_log_drop_is_finished_on_open(tmp_path: Path) -> None:
    other = FileStorage(tmp_path / "other")
    other.save_snapshot(Snapshot(SnapshotMeta(6, 2), b"from the leader"))
    other.close()
    s = FileStorage(tmp_path / "node")
    s.append(ents(1, 10))
    s.close()
    shutil.copy(tmp_path / "other" / "snapshot", tmp_path / "node" / "snapshot")
    s = FileStorage(tmp_path / "node")
    assert s.load() == LoadedState(HardState(), Snapshot(SnapshotMeta(6, 2), b"from the leader"), [])
    s.append(ents(7, 7, term=2))
    s.close()


def test_missing_snapshot_is_detected(tmp_path: Path) -> None:
    s = FileStorage(tmp_path)
    s.append(ents(1, 10))
    s.save_snapshot(Snapshot(SnapshotMeta(8, 1), b"s"))
    s.close()
    (tmp_path / "snapshot").unlink()
    with pytest.raises(CorruptLogError, match="starts at index 9 but the snapshot ends at 0"):
        FileStorage(tmp_path)


def test_one_process_per_directory_and_no_use_after_close(tmp_path: Path) -> None:
    s = FileStorage(tmp_path)
    with pytest.raises(StorageError, match="in use by another tomq process"):
        FileStorage(tmp_path)
    s.close()
    with pytest.raises(StorageError, match="closed"):
        s.append(ents(1, 1))
    FileStorage(tmp_path).close()


def test_sync_each_write_fsyncs_by_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        calls.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    for each, expected in ((False, 0), (True, 2)):
        s = FileStorage(tmp_path / str(each), sync_each_write=each)
        calls.clear()
        s.append(ents(1, 3))
        s.set_hard_state(HardState(1, "n1", 3))
        assert len(calls) == expected
        s.sync()
        assert len(calls) == 2  # sync() fsyncs exactly what is still unsynced
        s.close()


# -- FileStorage against MemoryStorage as its model ---------------------------------------------------


class FileMatchesMemory(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="tomq-storage-")
        self.file = FileStorage(self.dir)
        self.model = MemoryStorage()

    def bounds(self) -> tuple[int, int, LoadedState]:
        state = self.model.load()
        snap = state.snapshot.meta.index if state.snapshot else 0
        return snap, (state.entries[-1].index if state.entries else snap), state

    @rule(data=st.data(), n=st.integers(1, 6), term=st.integers(1, 4), size=st.integers(0, 40))
    def append(self, data: st.DataObject, n: int, term: int, size: int) -> None:
        snap, last, _ = self.bounds()
        start = data.draw(st.integers(snap + 1, last + 1), label="start")
        batch = [Entry(term, i, EntryKind(i % 3), bytes([i % 256]) * size) for i in range(start, start + n)]
        self.file.append(batch)
        self.model.append(batch)

    @rule(
        term=st.integers(0, 5), vote=st.none() | st.sampled_from(["n1", "n2", "ü"]), commit=st.integers(0, 60)
    )
    def set_hard_state(self, term: int, vote: str | None, commit: int) -> None:
        self.file.set_hard_state(HardState(term, vote, commit))
        self.model.set_hard_state(HardState(term, vote, commit))

    @rule(data=st.data(), matching=st.booleans(), blob=st.binary(max_size=20))
    def save_snapshot(self, data: st.DataObject, matching: bool, blob: bytes) -> None:
        snap, last, state = self.bounds()
        index = data.draw(st.integers(max(0, snap - 2), last + 3), label="index")
        terms = {e.index: e.term for e in state.entries}
        term = terms[index] if matching and index in terms else data.draw(st.integers(1, 4), label="term")
        snapshot = Snapshot(SnapshotMeta(index, term, ("n1", "n2")), blob)
        self.file.save_snapshot(snapshot)
        self.model.save_snapshot(snapshot)

    @rule()
    def sync(self) -> None:
        self.file.sync()

    @rule()
    def reopen(self) -> None:
        self.file.close()
        self.file = FileStorage(self.dir)
        assert self.file.recovered_tail is None

    @invariant()
    def same_state(self) -> None:
        assert self.file.load() == self.model.load()

    def teardown(self) -> None:
        self.file.close()
        shutil.rmtree(self.dir)


TestFileMatchesMemory = FileMatchesMemory.TestCase
TestFileMatchesMemory.settings = settings(
    max_examples=40, stateful_step_count=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


# -- crash safety with a real SIGKILL -----------------------------------------------------------------


def check_entry(e: Entry) -> None:
    body, crc = e.data[:-4], struct.unpack("<I", e.data[-4:])[0]
    assert zlib.crc32(body) == crc, f"entry {e.index} fails its embedded checksum"
    assert struct.unpack("<Q", body[:8])[0] == e.index


def test_sigkill_loses_no_acknowledged_entry(tmp_path: Path) -> None:
    rng = random.Random(20240611)
    directory, child = tmp_path / "raft", Path(__file__).with_name("storage_writer_child.py")
    acked_last = acked_commit = 0
    acked_crc: int | None = None
    acked_size = LOG_HEADER
    tails_repaired = 0
    for _ in range(32):
        proc = subprocess.Popen(
            [sys.executable, str(child), str(directory), str(rng.randrange(2**32))],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        assert proc.stdout.readline() == "READY\n"
        try:
            proc.wait(timeout=rng.uniform(0.0, 0.08))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
        out = proc.stdout.read()
        assert proc.wait() == -signal.SIGKILL
        for line in out.split("\n")[:-1]:  # a line cut by the kill is no acknowledgement
            acked_last, acked_size, acked_commit, acked_crc = map(int, line.split()[1:])

        # A SIGKILL keeps the page cache; a power loss may also drop any unsynced tail. Simulate that,
        # unless a snapshot rewrote the log after the last acknowledgement (the file then shrank).
        log_path = directory / "raft.log"
        size = log_path.stat().st_size
        if size > acked_size:
            os.truncate(log_path, rng.randint(acked_size, size))

        s = FileStorage(directory)
        tails_repaired += s.recovered_tail is not None
        state = s.load()
        snap = state.snapshot.meta.index if state.snapshot else 0
        assert [e.index for e in state.entries] == list(range(snap + 1, snap + 1 + len(state.entries)))
        for e in state.entries:
            check_entry(e)
        last = state.entries[-1].index if state.entries else snap
        assert last >= acked_last
        assert state.hard_state.commit >= acked_commit
        if acked_crc is not None and acked_last > snap:
            assert zlib.crc32(state.entries[acked_last - snap - 1].data) == acked_crc
        s.append([Entry(1, last + 1, EntryKind.NORMAL, payload(last + 1, rng))])
        s.set_hard_state(HardState(1, "n1", last + 1))
        s.close()
        with FileStorage(directory) as s:
            assert s.load().entries[-1].index == last + 1
        acked_last, acked_commit, acked_crc, acked_size = last + 1, last + 1, None, log_path.stat().st_size
    assert acked_last > 100, "the child never got far enough to test anything"
    assert tails_repaired > 0, "no iteration exercised torn-tail recovery"
