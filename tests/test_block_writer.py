"""The node's block writer: certified blocks reach the store and the shared directory off the loop,
in order, with failures retried and divergence stopping the shared writes (node/ledger/block_writer.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from keys import key
from tomq.node.ledger import block_writer
from tomq.node.ledger.block import (
    GENESIS_PREV,
    BlockFile,
    block_file_name,
    commit_signature,
    encode_block_file,
    make_block,
    sign_block,
)
from tomq.node.ledger.block_writer import DIVERGENCE_STRIKES, BlockWriter

N1, N2 = key("n1"), key("n2")


def block_bytes(height: int, record: bytes = b"record") -> bytes:
    block = make_block(height=height, prev=GENESIS_PREV, term=2, time_ms=1_800_000_000_000, proposer=N1.id,
                       records=(record,))
    certificate = {signer.id: commit_signature(signer, block.hash) for signer in (N1, N2)}
    return encode_block_file(BlockFile(block, sign_block(N1, block), certificate))


def wait_until(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


class Spoken:
    def __init__(self) -> None:
        self.heights: list[int] = []
        self.threads: set[str] = set()

    def __call__(self, created: list[tuple[int, bytes]]) -> None:
        self.heights.extend(height for height, _ in created)
        self.threads.add(threading.current_thread().name)


@pytest.fixture
def dirs(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    store, shared = tmp_path / "store", tmp_path / "shared"
    store.mkdir()
    shared.mkdir()
    yield store, shared


def test_blocks_reach_store_and_shared_directory_in_order_and_the_creator_speaks(dirs):
    store, shared = dirs
    spoken = Spoken()
    writer = BlockWriter(store, shared, stored=-1, speak=spoken)
    writer.start()
    blocks = {h: block_bytes(h) for h in range(5)}
    for height, data in blocks.items():
        writer.put(height, data)
    assert writer.flush()
    assert wait_until(lambda: writer.shared_next == 5)
    writer.stop()
    for height, data in blocks.items():
        assert (store / block_file_name(height)).read_bytes() == data
        assert (shared / block_file_name(height)).read_bytes() == data
    assert writer.stored == 4
    assert spoken.heights == [0, 1, 2, 3, 4]
    assert spoken.threads == {"tomq-block-writer"}  # the daemon marshals it back to its loop
    assert not [p for p in store.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_a_height_another_node_already_put_is_not_spoken_for(dirs):
    store, shared = dirs
    (shared / block_file_name(0)).write_bytes(block_bytes(0))
    spoken = Spoken()
    writer = BlockWriter(store, shared, stored=-1, speak=spoken)
    writer.start()
    writer.put(0, block_bytes(0))
    writer.put(1, block_bytes(1))
    assert wait_until(lambda: writer.shared_next == 2)
    writer.stop()
    assert spoken.heights == [1]


def test_a_shared_directory_that_fails_is_retried_until_it_works(dirs, caplog):
    store, _ = dirs
    shared = store.parent / "not-mounted-yet"
    (store.parent / "not-mounted-yet").write_bytes(b"a file where the directory should be")
    writer = BlockWriter(store, shared, stored=-1, speak=Spoken())
    writer.start()
    try:
        writer.put(0, block_bytes(0))
        writer.put(1, block_bytes(1))
        assert writer.flush()
        assert writer.stored == 1  # the store does not wait for the shared directory
        time.sleep(0.3)
        assert writer.shared_next == 0
        assert "shared ledger directory" in caplog.text and "will retry" in caplog.text
        shared.unlink()
        shared.mkdir()
        assert wait_until(lambda: writer.shared_next == 2)
        assert sorted(p.name for p in shared.iterdir()) == [block_file_name(0), block_file_name(1)]
    finally:
        writer.stop()


def test_blocks_held_for_a_failing_shared_directory_are_bounded_in_bytes_and_read_back_later(
        dirs, monkeypatch: pytest.MonkeyPatch):
    # The writer keeps stored blocks in memory for the shared directory (no read-back); a Gluster
    # volume without quorum must not make that grow without end.
    store, _ = dirs
    blocks = [block_bytes(height) for height in range(10)]
    monkeypatch.setattr(block_writer, "KEPT_FOR_SHARED_BYTES", 3 * len(blocks[0]))
    shared = store.parent / "not-mounted-yet"
    shared.write_bytes(b"a file where the directory should be")
    writer = BlockWriter(store, shared, stored=-1, speak=Spoken())
    writer.start()
    try:
        for height, data in enumerate(blocks):
            writer.put(height, data)
        assert writer.flush()
        assert writer.stored == 9 and writer.shared_next == 0
        assert len(writer._unshared) == 3 and writer._unshared_bytes <= 3 * len(blocks[0])
        shared.unlink()
        shared.mkdir()
        assert wait_until(lambda: writer.shared_next == 10)
        assert [(shared / block_file_name(h)).read_bytes() for h in range(10)] == blocks  # the rest from the store
        assert writer._unshared == {} and writer._unshared_bytes == 0
    finally:
        writer.stop()


def test_different_bytes_in_the_shared_directory_stop_this_node_writing_there(dirs, caplog):
    store, shared = dirs
    theirs = block_bytes(0, record=b"another record")
    (shared / block_file_name(0)).write_bytes(theirs)
    writer = BlockWriter(store, shared, stored=-1, speak=Spoken())
    writer.start()
    try:
        writer.put(0, block_bytes(0))
        writer.put(1, block_bytes(1))
        assert wait_until(lambda: writer.divergent)
        assert "LEDGER DIVERGENCE" in caplog.text
        assert writer.shared_next == 0 and not (shared / block_file_name(1)).exists()
        assert (shared / block_file_name(0)).read_bytes() == theirs  # never overwritten
        assert writer.stored == 1  # the node's own store still holds its blocks
    finally:
        writer.stop()
    assert DIVERGENCE_STRIKES > 1  # one odd read (a brick healing) is not yet divergence


def test_stop_writes_what_is_queued(dirs):
    store, _ = dirs
    writer = BlockWriter(store, None, stored=-1, speak=Spoken())
    writer.start()
    for height in range(50):
        writer.put(height, block_bytes(height))
    writer.stop()
    assert writer.stored == 49
    assert len(list(store.glob("*.block"))) == 50


def test_a_store_that_cannot_be_written_keeps_the_blocks_queued_and_stored_behind(dirs, caplog):
    store, _ = dirs
    writer = BlockWriter(store / "missing", None, stored=3, speak=Spoken())
    writer.start()
    try:
        writer.put(4, block_bytes(4))
        assert not writer.flush(timeout=0.3)
        assert writer.stored == 3  # nothing may be compacted past it
        assert "cannot write block 4" in caplog.text
        (store / "missing").mkdir()
        assert writer.flush()
        assert writer.stored == 4
    finally:
        writer.stop()


def test_replace_files_leaves_no_temporary_when_a_rename_fails(tmp_path: Path):
    from tomq.durable import replace_files

    (tmp_path / "b").mkdir()  # a directory where the second file should go: its rename fails
    with pytest.raises(OSError):
        replace_files(tmp_path, [("a", b"first"), ("b", b"second"), ("c", b"third")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # no .tmp left; a was put in place
    assert (tmp_path / "a").read_bytes() == b"first"
    replace_files(tmp_path, [("a", b"again"), ("c", b"third")])
    assert (tmp_path / "a").read_bytes() == b"again" and (tmp_path / "c").read_bytes() == b"third"


def test_a_writer_whose_directory_fsync_failed_still_speaks_for_the_files_it_linked(
        dirs, monkeypatch: pytest.MonkeyPatch, caplog):
    # The links were made, the directory fsync failed: a retry finds the names already there, but
    # no other node created them, so unless this writer speaks for them nobody publishes them.
    from tomq.node.ledger import shared_dir

    store, shared = dirs
    real_fsync = shared_dir.fsync_directory
    failures = [OSError(5, "Input/output error")]

    def fsync_once_failing(directory: Path) -> None:
        if failures:
            raise failures.pop()
        real_fsync(directory)

    monkeypatch.setattr(shared_dir, "fsync_directory", fsync_once_failing)
    spoken = Spoken()
    writer = BlockWriter(store, shared, stored=-1, speak=spoken)
    writer.start()
    try:
        writer.put(0, block_bytes(0))
        writer.put(1, block_bytes(1))
        assert wait_until(lambda: writer.shared_next == 2)
        assert "durable" in caplog.text and not failures  # the failure happened, and was retried
        assert spoken.heights == [0, 1]
    finally:
        writer.stop()


def test_a_block_after_a_quiet_spell_is_written_at_once_and_a_stream_in_few_rounds(
        dirs, monkeypatch: pytest.MonkeyPatch):
    store, shared = dirs
    rounds = []
    real_replace_files = block_writer.replace_files

    def counted(directory, files):
        rounds.append([name for name, _ in files])
        return real_replace_files(directory, files)

    monkeypatch.setattr(block_writer, "replace_files", counted)
    monkeypatch.setattr(block_writer, "ROUND_SECONDS", 0.5)  # "at once" and "a round later" far apart
    writer = BlockWriter(store, shared, stored=-1, speak=Spoken())
    writer.start()
    try:
        started = time.monotonic()
        writer.put(0, block_bytes(0))
        assert wait_until(lambda: writer.stored == 0, timeout=block_writer.ROUND_SECONDS * 0.75)
        first_took = time.monotonic() - started
        # A stream: a block every 5 ms for 2.5 rounds.
        stream_ends = time.monotonic() + 2.5 * block_writer.ROUND_SECONDS
        height = 0
        while time.monotonic() < stream_ends:
            height += 1
            writer.put(height, block_bytes(height))
            time.sleep(0.005)
        assert writer.flush()
        assert wait_until(lambda: writer.shared_next == height + 1)
    finally:
        writer.stop()
    assert first_took < block_writer.ROUND_SECONDS / 2
    assert [name for batch in rounds for name in batch] == [block_file_name(h) for h in range(height + 1)]
    assert height >= 50 and len(rounds) <= 5, (height, [len(batch) for batch in rounds])
    assert [(shared / block_file_name(h)).read_bytes() for h in range(height + 1)] == [
        block_bytes(h) for h in range(height + 1)]


def test_a_node_that_leaves_creating_to_the_leader_checks_its_files_and_creates_only_after_a_grace(
        dirs, monkeypatch: pytest.MonkeyPatch):
    store, shared = dirs
    monkeypatch.setattr(block_writer, "SHARED_GRACE_SECONDS", 0.6)
    leader_store = store.parent / "leader-store"
    leader_store.mkdir()
    leading = threading.Event()
    leading.set()
    leader_spoke, follower_spoke = Spoken(), Spoken()
    leader = BlockWriter(leader_store, shared, stored=-1, speak=leader_spoke, creates_first=leading.is_set)
    follower = BlockWriter(store, shared, stored=-1, speak=follower_spoke, creates_first=lambda: False)
    leader.start()
    follower.start()
    try:
        for height in range(3):  # the follower has them first: it still waits for the leader's files
            follower.put(height, block_bytes(height))
        assert follower.flush()
        time.sleep(0.3)
        assert follower.shared_next == 0 and not list(shared.iterdir())
        for height in range(3):
            leader.put(height, block_bytes(height))
        assert wait_until(lambda: leader.shared_next == 3 and follower.shared_next == 3)
        assert leader_spoke.heights == [0, 1, 2] and follower_spoke.heights == []
        # The leader is gone: the follower creates what nobody created, once the grace is over.
        leading.clear()
        leader.stop()
        put_at = time.monotonic()
        follower.put(3, block_bytes(3))
        assert wait_until(lambda: follower.shared_next == 4)
        assert time.monotonic() - put_at >= 0.6
        assert follower_spoke.heights == [3]
        # A different file from "the leader" is still divergence for a node that only checks.
        (shared / block_file_name(4)).write_bytes(block_bytes(4, b"forged"))
        follower.put(4, block_bytes(4))
        assert wait_until(lambda: follower.divergent, timeout=5)
        assert follower.shared_next == 4
    finally:
        leader.stop()
        follower.stop()
    assert [(shared / block_file_name(h)).read_bytes() for h in range(4)] == [block_bytes(h) for h in range(4)]
