"""Helper for tests/test_raft_storage.py: appends to a FileStorage until it is killed.

Usage: storage_writer_child.py DIRECTORY SEED. Prints `READY` once the storage is open, then after
every sync() (and every snapshot) one line `ACK <last index> <raft.log size> <commit> <crc of the last
entry's data>`; a printed line is an acknowledgement the parent holds the storage to.
"""

from __future__ import annotations

import os
import random
import struct
import sys
import zlib

from tomq.node.raft.storage import FileStorage
from tomq.node.raft.types import Entry, EntryKind, HardState, Snapshot, SnapshotMeta


def payload(index: int, rng: random.Random) -> bytes:
    """Entry data that checks itself: the index, random bytes, and a CRC32 of both."""
    body = struct.pack("<Q", index) + rng.randbytes(rng.randint(0, 300))
    return body + struct.pack("<I", zlib.crc32(body))


def main() -> None:
    directory, seed = sys.argv[1], int(sys.argv[2])
    rng = random.Random(seed)
    storage = FileStorage(directory)
    state = storage.load()
    snap = state.snapshot.meta.index if state.snapshot else 0
    last = state.entries[-1].index if state.entries else snap
    log_path = os.path.join(directory, "raft.log")
    print("READY", flush=True)
    while True:
        entries = [
            Entry(1, i, EntryKind.NORMAL, payload(i, rng))
            for i in range(last + 1, last + rng.randint(1, 20) + 1)
        ]
        storage.append(entries)
        last = entries[-1].index
        storage.set_hard_state(HardState(1, "n1", last))
        storage.sync()
        crc = zlib.crc32(entries[-1].data)
        print(f"ACK {last} {os.path.getsize(log_path)} {last} {crc}", flush=True)
        if rng.random() < 0.1:
            snap = max(snap + 1, last - rng.randint(0, 10))
            storage.save_snapshot(Snapshot(SnapshotMeta(snap, 1, ("n1",)), b"snap %d" % snap))
            print(f"ACK {last} {os.path.getsize(log_path)} {last} {crc}", flush=True)


if __name__ == "__main__":
    main()
