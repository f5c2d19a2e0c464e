"""Putting committed block files into the shared ledger directory (GlusterFS in production, DESIGN §4).

Every node writes every committed block it holds, so the directory fills even when some nodes are
down; the first writer of a height wins and everyone else checks they agree with it:

1. write the bytes to a temporary file in the same directory (a dot-file, so `tomq ledger verify`
   and anyone listing `*.block` ignores it) and fsync it;
2. `os.link` it to `<height as 12 digits>.block`. A hard link either creates the name, pointing at
   complete and durable bytes, or fails because the name exists: unlike rename, it never replaces a
   file, so no reader ever sees a partial block and no writer ever overwrites another's;
3. unlink the temporary and fsync the directory, so the new name survives a power cut. A writer
   that puts several heights at once (`put_block_files`) fsyncs every temporary before the first
   link and the directory once after the last.

If the name exists, another node wrote that height first: identical bytes are fine; different bytes
mean divergence or tampering and raise `LedgerDivergence` loudly, leaving the existing file untouched.
A temporary left by a crash is harmless: its name is unique to its writer and nothing reads it.

What this module must never do: overwrite or delete a block file, rename over one, or judge a block
(signatures and legality are verify.py's job; it only reads the height and hash to name the file).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tomq.durable import fsync_directory
from tomq.errors import PeerError, TomqError, UsageError
from tomq.node.ledger.block import (
    MAX_BLOCK_FILE_BYTES,
    MalformedBlock,
    block_file_name,
    decode_block_file,
)


class LedgerDivergence(PeerError):
    """The shared directory already holds a different block file for this height."""

    def __init__(self, height: int, message: str) -> None:
        super().__init__(message)
        self.height = height


class SharedLedgerError(TomqError):
    """The shared ledger directory could not be written (disk full, unmounted, no hard links...).

    `linked`: heights whose names this call did create before it failed (their directory was not
    fsynced): found again on a retry, they are still this writer's to speak for."""

    def __init__(self, message: str, linked: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.linked = linked


@dataclass(frozen=True, slots=True)
class PutResult:
    path: Path
    height: int
    written: bool  # False: identical bytes were already there, written by another node (or earlier by us)


def put_block_file(directory: str | os.PathLike[str], data: bytes) -> PutResult:
    """Put the block file `data` in place under its height's name, atomically and exclusively."""
    results, failure = put_block_files(directory, [data])
    if failure is not None:
        raise failure
    return results[0]


def put_block_files(directory: str | os.PathLike[str], files: Sequence[bytes], *, create: bool = True,
                    heights: Sequence[int] | None = None) -> tuple[list[PutResult], TomqError | None]:
    """`put_block_file` for several block files in height order, with one directory fsync for all.

    Returns what was put (or found identical), in order, up to the first file that could not be,
    and why that one could not (None when all were): a writer learns which heights it created, and
    must speak for, even when a later one diverges. Each file is still written to a temporary,
    fsynced and linked on its own; the temporaries are all written before the first fsync, so on
    ext4 that fsync's journal commit carries them all.

    `create=False` only checks: it stops, with no failure, before the first height nobody has put
    yet (a node that leaves creating to another checks the other's files and waits for the rest).
    `heights`: the files' heights, when the caller made the files itself and knows them (decoding
    every block only to name its file was a tenth of a follower's writer); else read from each file.
    """
    root = Path(directory)
    planned: list[tuple[int, Path, bytes, PutResult | Path]] = []  # height, final, data, found | temp
    descriptors: list[int] = []
    results: list[PutResult] = []
    failure: TomqError | None = None
    linked = False
    height = -1
    try:
        if heights is not None and len(heights) != len(files):
            raise ValueError(f"{len(heights)} heights for {len(files)} block files")
        for index, data in enumerate(files):
            try:
                # Only to name the file: whatever is put is compared byte for byte, and judged by verify.
                height = heights[index] if heights is not None else decode_block_file(
                    data, check_canonical=False).block.height
            except MalformedBlock as exc:
                failure = UsageError(f"refusing to publish a malformed block file: {exc}")
                break
            final = root / block_file_name(height)
            existing = _read_if_exists(final)
            if existing is not None:  # the common case for all but the fastest node: skip writing a copy
                try:
                    planned.append((height, final, data, _agree(height, final, existing, data)))
                except LedgerDivergence as exc:
                    failure = exc
                    break
                continue
            if not create:
                break
            temp = root / f".{final.name}.{os.getpid()}.{os.urandom(8).hex()}.tmp"
            planned.append((height, final, data, temp))
            descriptors.append(_write_temp(temp, data))
        for fd in descriptors:
            os.fsync(fd)  # before the links: a final name must never point at bytes a crash could lose
        for height, final, data, found in planned:
            if isinstance(found, PutResult):
                results.append(found)
                continue
            try:
                os.link(found, final)
                linked = True
                results.append(PutResult(final, height, True))
            except FileExistsError:
                existing = _read_if_exists(final)
                assert existing is not None  # block files are never deleted
                try:
                    results.append(_agree(height, final, existing, data))
                except LedgerDivergence as exc:
                    failure = exc
                    break
    except OSError as exc:
        failure = SharedLedgerError(
            f"cannot put block {height} into {root}: {exc.strerror or exc} (the directory must be writable "
            "and support hard links)")
    finally:
        for fd in descriptors:
            os.close(fd)
        for _, _, _, found in planned:
            if isinstance(found, Path):
                _unlink_quietly(found)
    if linked:
        try:
            fsync_directory(root)  # the new names survive a power cut
        except OSError as exc:
            created = tuple(result.height for result in results if result.written)
            return [], SharedLedgerError(f"cannot make the new block files in {root} durable: {exc.strerror or exc}",
                                         linked=created)
    return results, failure


def _agree(height: int, path: Path, existing: bytes, ours: bytes) -> PutResult:
    if existing == ours:
        return PutResult(path, height, False)
    ours_hash = decode_block_file(ours).block.hash.hex()
    try:
        theirs_hash = decode_block_file(existing).block.hash.hex()
    except MalformedBlock:
        theirs_hash = None
    if theirs_hash == ours_hash:
        # Same block, other bytes: the certificates differ. Still refused, because every copy of the
        # ledger must be byte-identical; the message says it is not a fork so nobody chases one.
        raise LedgerDivergence(height, (
            f"ledger divergence at height {height}: {path} holds block {theirs_hash} with a different commit "
            f"certificate (file sha256 {_sha256(existing)} vs ours {_sha256(ours)})"))
    theirs = f"block {theirs_hash}" if theirs_hash else f"an undecodable file (sha256 {_sha256(existing)})"
    raise LedgerDivergence(height, (
        f"ledger divergence at height {height}: {path} holds {theirs} but this node committed block {ours_hash}"))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_if_exists(path: Path) -> bytes | None:
    try:
        with open(path, "rb") as handle:
            return handle.read(MAX_BLOCK_FILE_BYTES + 1)
    except FileNotFoundError:
        return None


def _write_temp(path: Path, data: bytes) -> int:
    """Write `data` to a new file and return its open descriptor (the caller fsyncs and closes it)."""
    # O_EXCL: the name is random, but never write through a file someone else created.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except BaseException:
        os.close(fd)
        _unlink_quietly(path)
        raise
    return fd


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass  # a leftover temporary is harmless (see the module docstring)


