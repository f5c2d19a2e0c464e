"""The shared ledger directory (DESIGN §4): one file per height, put in place atomically and
exclusively by whichever node is first, checked byte for byte by everyone after it."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest

from keys import key
from tomq.errors import UsageError
from tomq.node.ledger import shared_dir
from tomq.node.ledger.block import (
    GENESIS_PREV,
    BlockFile,
    block_file_name,
    commit_signature,
    decode_block_file,
    encode_block_file,
    make_block,
    sign_block,
)
from tomq.node.ledger.shared_dir import LedgerDivergence, SharedLedgerError, put_block_file, put_block_files

N1, N2, N3 = key("n1"), key("n2"), key("n3")


def block_bytes(height: int = 7, records: tuple[bytes, ...] = (b"record",), signers=(N1, N2)) -> bytes:
    block = make_block(height=height, prev=GENESIS_PREV, term=2, time_ms=1_800_000_000_000, proposer=N1.id,
                       records=records)
    certificate = {signer.id: commit_signature(signer, block.hash) for signer in signers}
    return encode_block_file(BlockFile(block, sign_block(N1, block), certificate))


def listing(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def test_first_writer_puts_the_file_in_place_and_leaves_no_temporary(tmp_path: Path):
    data = block_bytes()
    result = put_block_file(tmp_path, data)
    assert result.written and result.height == 7 and result.path == tmp_path / "000000000007.block"
    assert result.path.read_bytes() == data
    assert listing(tmp_path) == ["000000000007.block"]
    assert os.stat(result.path).st_nlink == 1  # the temporary's name is gone


def test_a_batch_puts_what_it_can_in_order_and_names_the_first_height_it_could_not(tmp_path: Path):
    # A writer puts several heights at once (one directory fsync); it must still learn which ones it
    # created, to speak for them, when a later one in the batch diverges.
    blocks = {height: block_bytes(height) for height in range(3, 8)}
    put_block_file(tmp_path, blocks[4])  # another node was first at 4: identical, fine
    theirs = block_bytes(6, records=(b"their record",))
    put_block_file(tmp_path, theirs)  # and at 6 with other bytes: divergence
    results, failure = put_block_files(tmp_path, [blocks[h] for h in range(3, 8)])
    assert [(r.height, r.written) for r in results] == [(3, True), (4, False), (5, True)]
    assert isinstance(failure, LedgerDivergence) and failure.height == 6
    assert (tmp_path / block_file_name(6)).read_bytes() == theirs  # untouched
    assert listing(tmp_path) == [block_file_name(h) for h in (3, 4, 5, 6)]  # 7 not put, no temporary left
    assert all((tmp_path / block_file_name(h)).read_bytes() == blocks[h] for h in (3, 4, 5))
    results, failure = put_block_files(tmp_path, [blocks[7], b"not a block"])
    assert [(r.height, r.written) for r in results] == [(7, True)]
    assert isinstance(failure, UsageError) and "malformed" in str(failure)


def test_a_second_writer_with_identical_bytes_succeeds_without_writing(tmp_path: Path):
    data = block_bytes()
    put_block_file(tmp_path, data)
    before = os.stat(tmp_path / block_file_name(7))
    again = put_block_file(tmp_path, data)
    assert not again.written
    after = os.stat(tmp_path / block_file_name(7))
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert listing(tmp_path) == ["000000000007.block"]


def test_different_bytes_raise_divergence_and_leave_the_first_file_untouched(tmp_path: Path):
    first = block_bytes(records=(b"record",))
    second = block_bytes(records=(b"another record",))
    put_block_file(tmp_path, first)
    with pytest.raises(LedgerDivergence) as caught:
        put_block_file(tmp_path, second)
    message = str(caught.value)
    assert caught.value.height == 7 and "\n" not in message
    assert message.startswith("ledger divergence at height 7: ")
    assert decode_block_file(first).block.hash.hex() in message
    assert decode_block_file(second).block.hash.hex() in message
    assert (tmp_path / block_file_name(7)).read_bytes() == first
    assert listing(tmp_path) == ["000000000007.block"]


def test_same_block_with_another_certificate_is_still_refused_but_said_to_be_no_fork(tmp_path: Path):
    put_block_file(tmp_path, block_bytes(signers=(N1, N2)))
    with pytest.raises(LedgerDivergence, match="with a different commit certificate"):
        put_block_file(tmp_path, block_bytes(signers=(N1, N3)))


def test_an_undecodable_existing_file_is_divergence(tmp_path: Path):
    (tmp_path / block_file_name(7)).write_bytes(b"garbage")
    with pytest.raises(LedgerDivergence, match="holds an undecodable file"):
        put_block_file(tmp_path, block_bytes())
    assert (tmp_path / block_file_name(7)).read_bytes() == b"garbage"


def _race(tmp_path: Path, payloads: list[bytes]) -> list[object]:
    """Every payload written by its own thread, all released at once; returns results or exceptions."""
    barrier = threading.Barrier(len(payloads))
    outcomes: list[object] = [None] * len(payloads)

    def writer(index: int) -> None:
        barrier.wait()
        try:
            outcomes[index] = put_block_file(tmp_path, payloads[index])
        except LedgerDivergence as exc:
            outcomes[index] = exc

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(len(payloads))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


@pytest.mark.parametrize("round_", range(10))
def test_racing_writers_with_identical_bytes_all_succeed_and_exactly_one_writes(tmp_path: Path, round_: int):
    data = block_bytes(height=round_)
    outcomes = _race(tmp_path, [data] * 4)
    assert all(isinstance(o, shared_dir.PutResult) for o in outcomes)
    assert sum(o.written for o in outcomes if isinstance(o, shared_dir.PutResult)) == 1
    assert (tmp_path / block_file_name(round_)).read_bytes() == data
    assert listing(tmp_path) == [block_file_name(round_)]


@pytest.mark.parametrize("round_", range(10))
def test_racing_writers_with_different_bytes_one_wins_the_rest_diverge(tmp_path: Path, round_: int):
    payloads = [block_bytes(records=(f"record {i}".encode(),)) for i in range(4)]
    outcomes = _race(tmp_path, payloads)
    winners = [i for i, o in enumerate(outcomes) if isinstance(o, shared_dir.PutResult)]
    assert len(winners) == 1
    assert all(isinstance(o, LedgerDivergence) for i, o in enumerate(outcomes) if i != winners[0])
    assert (tmp_path / block_file_name(7)).read_bytes() == payloads[winners[0]]
    assert listing(tmp_path) == [block_file_name(7)]


@pytest.mark.parametrize("winner_same", [True, False])
def test_losing_the_race_at_the_link_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, winner_same: bool):
    # Another node links its file between our check for an existing file and our own link.
    ours = block_bytes()
    theirs = ours if winner_same else block_bytes(records=(b"their record",))
    real_write = shared_dir._write_temp

    def write_then_lose(path: Path, data: bytes) -> int:
        fd = real_write(path, data)
        (tmp_path / block_file_name(7)).write_bytes(theirs)
        return fd

    monkeypatch.setattr(shared_dir, "_write_temp", write_then_lose)
    if winner_same:
        assert put_block_file(tmp_path, ours).written is False
    else:
        with pytest.raises(LedgerDivergence):
            put_block_file(tmp_path, ours)
    assert (tmp_path / block_file_name(7)).read_bytes() == theirs
    assert listing(tmp_path) == [block_file_name(7)]  # our temporary is gone either way


def test_a_leftover_temporary_does_not_matter(tmp_path: Path):
    # What a writer that crashed between fsync and link leaves behind, even with the final name's prefix.
    stale = tmp_path / ".000000000007.block.4242.00ff00ff00ff00ff.tmp"
    stale.write_bytes(block_bytes(records=(b"what a crashed writer had",)))
    data = block_bytes()
    assert put_block_file(tmp_path, data).written
    assert (tmp_path / block_file_name(7)).read_bytes() == data
    assert listing(tmp_path) == ["." + block_file_name(7) + ".4242.00ff00ff00ff00ff.tmp", block_file_name(7)]


def test_the_data_is_fsynced_before_the_link_and_the_directory_after(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    events: list[str] = []
    real_fsync, real_link, real_unlink = os.fsync, os.link, os.unlink

    def fsync(fd: int) -> None:
        events.append("fsync-dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "fsync-file")
        real_fsync(fd)

    def link(source: str, target: str) -> None:
        events.append("link")
        real_link(source, target)

    def unlink(path: str) -> None:
        events.append("unlink")
        real_unlink(path)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "link", link)
    monkeypatch.setattr(os, "unlink", unlink)
    put_block_file(tmp_path, block_bytes())
    assert events == ["fsync-file", "link", "unlink", "fsync-dir"]


def test_a_failed_link_removes_the_temporary_and_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def no_links(source: str, target: str) -> None:
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    with pytest.raises(SharedLedgerError, match="support hard links"):
        put_block_file(tmp_path, block_bytes())
    assert listing(tmp_path) == []


def test_a_missing_directory_is_a_shared_ledger_error(tmp_path: Path):
    with pytest.raises(SharedLedgerError, match="cannot put block 7"):
        put_block_file(tmp_path / "not-mounted", block_bytes())


def test_malformed_bytes_are_never_published(tmp_path: Path):
    with pytest.raises(UsageError, match="malformed block file"):
        put_block_file(tmp_path, b"not a block")
    assert listing(tmp_path) == []


def test_divergence_message_names_file_hashes_when_only_signatures_differ(tmp_path: Path):
    first, second = block_bytes(signers=(N1, N2)), block_bytes(signers=(N2, N3))
    put_block_file(tmp_path, first)
    with pytest.raises(LedgerDivergence) as caught:
        put_block_file(tmp_path, second)
    assert hashlib.sha256(first).hexdigest() in str(caught.value)
    assert hashlib.sha256(second).hexdigest() in str(caught.value)


def test_a_writer_that_knows_the_heights_is_not_made_to_decode_and_one_that_only_checks_stops_at_a_gap(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    blocks = [block_bytes(height) for height in range(3)]
    put_block_file(tmp_path, blocks[1])  # another node created 1 only
    decoded = []
    real_decode = shared_dir.decode_block_file
    monkeypatch.setattr(shared_dir, "decode_block_file", lambda *a, **k: decoded.append(1) or real_decode(*a, **k))
    results, failure = put_block_files(tmp_path, blocks[1:], create=False, heights=[1, 2])
    assert failure is None and [(r.height, r.written) for r in results] == [(1, False)]  # 2: left to its creator
    assert listing(tmp_path) == [block_file_name(1)]
    results, failure = put_block_files(tmp_path, blocks, heights=[0, 1, 2])
    assert failure is None and [(r.height, r.written) for r in results] == [(0, True), (1, False), (2, True)]
    assert decoded == []
    assert [(tmp_path / block_file_name(h)).read_bytes() for h in range(3)] == blocks
    with pytest.raises(ValueError):
        put_block_files(tmp_path, blocks, heights=[0, 1])
