"""Small durable-write helpers shared by every adapter that puts state on disk.

What must never happen: a file that is visible under its final name before its bytes are on disk,
or a rename that a power cut can undo.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Sequence
from pathlib import Path


def fsync_directory(directory: str | os.PathLike[str]) -> None:
    """Make a rename, link or unlink inside `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(path: str | os.PathLike[str], data: bytes) -> None:
    """Atomically put `data` at `path`: write a hidden temp file, fsync it, rename, fsync the directory."""
    final = Path(path)
    replace_files(final.parent, [(final.name, data)])


def replace_files(directory: str | os.PathLike[str], files: Sequence[tuple[str, bytes]]) -> None:
    """`replace_file` for several files in one directory, with one directory fsync for all of them.

    Every temp file is written before any is fsynced: on ext4 (data=ordered) the first fsync's
    journal commit carries all their data, so the others find little left to do. Each file is
    still fsynced and renamed on its own, so each is atomic and durable on any filesystem.
    """
    root = Path(directory)
    temps = [(root / f".{name}.tmp", root / name) for name, _ in files]  # dot-files: never mistaken for the real thing
    handles = []
    renamed = 0
    try:
        try:
            for (temp, _), (_, data) in zip(temps, files, strict=True):
                handle = open(temp, "wb")
                handles.append(handle)
                handle.write(data)
                handle.flush()
            for handle in handles:
                os.fsync(handle.fileno())
        finally:
            for handle in handles:
                handle.close()
        for temp, final in temps:
            os.replace(temp, final)
            renamed += 1
    except BaseException:
        for temp, _ in temps[renamed:]:
            try:
                os.unlink(temp)
            except OSError:
                pass  # never created, or already gone
        raise
    fsync_directory(root)


def lock_directory(directory: str | os.PathLike[str]) -> int | None:
    """Hold an exclusive lock on `directory` (its `lock` file) for this process's lifetime: the fd,
    or None when another process holds it. Two processes sharing one outbox would corrupt it."""
    fd = os.open(Path(directory) / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd
