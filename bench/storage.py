"""How close FileStorage gets to the disk: durable appends per second against a bare write+fsync loop.

Both loops write the same bytes per fsync (a ~200-byte entry is a 227-byte record) to a fresh file in
the same directory, interleaved so that both see the same disk weather. Not a test: run it by hand,
    python bench/storage.py [--entries 2000] [--dir /var/lib/tomq]
and point --dir at the disk the node will really use (a tmpfs makes fsync free and the ratio moot).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tomq.node.raft.storage import FileStorage
from tomq.node.raft.types import Entry

PAYLOAD = 200
RECORD = 27 + PAYLOAD  # the storage's record header plus the payload
REPEATS = 5


def storage_rate(directory: Path, entries: int, batch: int) -> float:
    data = os.urandom(PAYLOAD)
    # The Raft core builds the entries; only what the storage does with them is timed.
    all_entries = [Entry(1, i, data=data) for i in range(1, entries + 1)]
    batches = [all_entries[k : k + batch] for k in range(0, entries, batch)]
    with FileStorage(directory) as storage:
        start = time.perf_counter()
        for entry_batch in batches:
            storage.append(entry_batch)
            storage.sync()
        return entries / (time.perf_counter() - start)


def bare_rate(directory: Path, entries: int, batch: int) -> float:
    chunk = os.urandom(RECORD * batch)
    fd = os.open(directory / "bare", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        start = time.perf_counter()
        for _ in range(entries // batch):
            os.write(fd, chunk)
            os.fsync(fd)
        return entries / (time.perf_counter() - start)
    finally:
        os.close(fd)


def median_rates(root: Path, entries: int, batch: int) -> tuple[float, float]:
    runs: dict[str, list[float]] = {"storage": [], "bare": []}
    benches: dict[str, Callable[[Path, int, int], float]] = {"storage": storage_rate, "bare": bare_rate}
    for _ in range(REPEATS):
        for name, bench in benches.items():
            with tempfile.TemporaryDirectory(dir=root) as directory:
                runs[name].append(bench(Path(directory), entries, batch))
    return statistics.median(runs["storage"]), statistics.median(runs["bare"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=2000, help="entries per run with one sync each")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()), help="where to write")
    args = parser.parse_args()
    print(f"{args.entries} entries of {PAYLOAD} bytes, in {args.dir}, median of {REPEATS} runs each")
    storage, bare = median_rates(args.dir, args.entries, 1)
    print(f"storage append+fsync: {storage:.0f}/s (median of {REPEATS})")
    print(f"bare os.write+fsync: {bare:.0f}/s")
    print(f"ratio: {storage / bare:.2f}")
    storage, bare = median_rates(args.dir, args.entries * 10, 100)
    print(f"storage batched, 100 entries per sync: {storage:.0f}/s (median of {REPEATS})")
    print(f"bare batched, 100 records per fsync: {bare:.0f}/s")
    print(f"ratio: {storage / bare:.2f}")


if __name__ == "__main__":
    main()
