"""Certified blocks to disk on a thread of their own: the node's store, then the shared directory.

A certified block costs every node two fsyncs in its store and two in the shared directory, and on
one disk the fsyncs of several nodes queue behind each other: about 5 ms a block here (traced with
bench/cluster.py), which the node's loop used to spend not handling the next record's Raft messages.
fsync releases the GIL, so on this thread the waiting overlaps with the loop's work.

What it promises the loop:
- the store is written in the order blocks are handed over (height order), each file atomically;
  `stored` is the highest height whose file is durable, so nothing that only the store would keep
  (the Raft log behind a compaction) may be dropped beyond it;
- the shared directory gets heights in order, each only once the store holds it; a failing write
  (no quorum, ENOTCONN, disk full) is retried every RETRY_SECONDS, so a gap never stays;
- a height whose shared file holds different bytes three times, RETRY_SECONDS apart, is divergence:
  this node stops writing there for good and says so (a read racing a brick's self-heal can look
  different once);
- `speak([(height, data), ...])` is called (on this thread) once per batch with the heights whose
  shared files this node created, in order: exactly one node creates each, and it publishes it;
- while `creates_first()` says another node creates the shared files (the leader does: it holds
  every block first), this one only checks theirs against its own, and creates a height itself
  once it has waited SHARED_GRACE_SECONDS for it (the leader died, or has no shared directory).
  Otherwise every node wrote, fsynced and tried to link every shared file at the same moment
  (their rounds follow the same commits), two of them only to find the name taken (strace).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from tomq.durable import replace_files
from tomq.node.ledger.block import block_file_name
from tomq.node.ledger.shared_dir import LedgerDivergence, SharedLedgerError, put_block_files

log = logging.getLogger("tomq.ledger")

RETRY_SECONDS = 0.05
# A stream of records commits a block every few milliseconds. Rounds of writing start at most this
# often: a block after a quiet spell is written at once, a stream's blocks are gathered into one
# round, so each directory costs one fsync, the journal a few commits and the loop one wake-up per
# round, not per block. On two cores every node's writer competes with the Raft path for CPU and
# disk: rounds every 20 ms cost 0.5-0.8 ms of each sequential commit's 3.5 ms (interleaved runs of
# bench/cluster.py's classes); every 200 ms, about a fifth of that. Only the certified copies on
# disk wait; commits, audit lines and actuator commands do not.
ROUND_SECONDS = 0.2
MAX_BATCH = 256
SHARED_GRACE_SECONDS = 1.0  # a node that leaves creating to the leader creates a file itself after this
KEPT_FOR_SHARED_BYTES = 16 * 1024 * 1024  # kept in memory for the shared directory; beyond, read back from the store
DIVERGENCE_STRIKES = 3
STOP_SECONDS = 5.0  # how long stop() waits for queued blocks to reach the disk


class BlockWriter:
    def __init__(self, store: Path, ledger_dir: Path | None, *, stored: int,
                 speak: Callable[[list[tuple[int, bytes]]], None],
                 creates_first: Callable[[], bool] = lambda: True) -> None:
        self.store = store
        self.ledger_dir = ledger_dir
        self.speak = speak
        self.creates_first = creates_first  # called on the writer's thread: must be cheap and thread-safe
        self._missing: tuple[int, float] | None = None  # (height, since): left to another node to create
        self.stored = stored  # highest height durable in the store
        self.shared_next = 0  # lowest height not yet confirmed in the shared directory
        self.divergent = False
        self._strikes: dict[int, int] = {}
        self._last_error_logged = 0.0
        self._queue: deque[tuple[int, bytes]] = deque()
        self._unshared: dict[int, bytes] = {}  # stored, not yet in the shared directory: no read-back
        self._unshared_bytes = 0
        self._struck_at: dict[int, float] = {}  # height -> when it last counted a divergence strike
        self._linked_unconfirmed: set[int] = set()  # linked by us, directory fsync failed: ours to speak for
        self._changed = threading.Condition()
        self._stopping = False
        self._idle = False  # the thread waits for blocks (not for its next round): put() wakes it
        self._store_failing = False
        self._thread = threading.Thread(target=self._run, name="tomq-block-writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def put(self, height: int, data: bytes) -> None:
        """Write this certified block file (the next height after those handed over before)."""
        with self._changed:
            self._queue.append((height, data))
            if self._idle:  # between rounds the thread waits for its time, not for each block
                self._changed.notify()

    def stop(self) -> None:
        """Write what is queued (waiting at most STOP_SECONDS), then end the thread."""
        with self._changed:
            self._stopping = True
            self._changed.notify()
        if self._thread.is_alive():
            self._thread.join(STOP_SECONDS)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything handed over is in the store (for tests and shutdown paths)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self._queue and time.monotonic() < deadline:
                self._changed.wait(0.01)
            return not self._queue

    # ------------------------------------------------------------------ the thread

    def _shared_behind(self) -> bool:
        return self.ledger_dir is not None and not self.divergent and self.shared_next <= self.stored

    def _run(self) -> None:
        next_round = 0.0
        while True:
            with self._changed:
                self._idle = True
                while not self._queue and not self._stopping and not self._shared_behind():
                    self._changed.wait()  # put() and stop() notify
                self._idle = False
                retrying = not self._queue and not self._stopping  # only the shared directory is behind
            # No timed waits on a lock here: under libfaketime (the nemesis's clock jumps) a
            # Condition.wait(timeout) did not return for minutes; a relative sleep does. A stop waits
            # for the rest of a round at most.
            pause = max(RETRY_SECONDS if retrying else 0.0, min(next_round - time.monotonic(), ROUND_SECONDS))
            if pause > 0 and not self._stopping:
                time.sleep(pause)
            with self._changed:
                stopping = self._stopping
            next_round = time.monotonic() + ROUND_SECONDS
            self._write_store()
            self._sync_shared()
            with self._changed:
                if stopping and (not self._queue or self._store_failing):
                    return

    def _write_store(self) -> None:
        with self._changed:
            this_round = len(self._queue)  # blocks put while this round writes wait for the next one
        while True:
            with self._changed:
                if not self._queue or this_round <= 0:
                    self._changed.notify_all()  # flush() waiters
                    return
                batch = list(itertools.islice(self._queue, min(MAX_BATCH, this_round)))
                this_round -= len(batch)
            try:
                replace_files(self.store, [(block_file_name(height), data) for height, data in batch])
            except OSError as exc:
                # Disk full or gone: the blocks stay in the Raft log (never compacted past `stored`).
                self._store_failing = True
                heights = f" {batch[0][0]}" if len(batch) == 1 else f"s {batch[0][0]}..{batch[-1][0]}"
                self._log_error(f"cannot write block{heights} to the store {self.store}: {exc} (will retry)")
                time.sleep(RETRY_SECONDS)
                return
            self._store_failing = False
            with self._changed:
                for _ in batch:
                    self._queue.popleft()
            for height, data in batch:  # a failing shared directory (Gluster without quorum) stops this
                if self.ledger_dir is None or self.divergent or self._unshared_bytes + len(data) > KEPT_FOR_SHARED_BYTES:
                    break
                self._unshared[height] = data
                self._unshared_bytes += len(data)
            self.stored = max(self.stored, batch[-1][0])

    def _sync_shared(self) -> None:
        if self.ledger_dir is None:
            return
        while self._shared_behind():
            heights = range(self.shared_next, min(self.stored, self.shared_next + MAX_BATCH - 1) + 1)
            made_here = all(height in self._unshared for height in heights)  # else read back: heights from the files
            try:
                files = [self._unshared.get(height) or (self.store / block_file_name(height)).read_bytes()
                         for height in heights]
            except OSError as exc:
                self._log_error(f"cannot read block {self.shared_next}.. back from the store {self.store}: {exc} "
                                "(will retry)")
                return
            results, failure = put_block_files(self.ledger_dir, files, create=self._may_create(heights[0]),
                                               heights=list(heights) if made_here else None)
            created = []
            for height, data, result in zip(heights, files, results, strict=False):
                if result.height != height:  # the store's file is not what we wrote: stop here
                    failure = failure or LedgerDivergence(height, f"the store's file {block_file_name(height)} holds "
                                                                  f"block {result.height}")
                    break
                self._strikes.pop(height, None)
                self._struck_at.pop(height, None)
                self._unshared_bytes -= len(self._unshared.pop(height, b""))
                self.shared_next = height + 1
                if result.written or height in self._linked_unconfirmed:
                    self._linked_unconfirmed.discard(height)
                    created.append((height, data))
            if created:
                self.speak(created)
            if failure is None:
                if self.shared_next <= heights[-1]:  # stopped before a height another node is to create
                    return
                continue
            if isinstance(failure, LedgerDivergence):
                now = time.monotonic()
                if now - self._struck_at.get(failure.height, -RETRY_SECONDS) < RETRY_SECONDS:
                    return  # strikes count RETRY_SECONDS apart, however often new blocks wake us
                self._struck_at[failure.height] = now
                strikes = self._strikes[failure.height] = self._strikes.get(failure.height, 0) + 1
                if strikes >= DIVERGENCE_STRIKES:
                    self.divergent = True
                    self._unshared.clear()
                    self._unshared_bytes = 0
                    log.error("LEDGER DIVERGENCE: %s; this node stops writing to %s", failure, self.ledger_dir)
            else:
                if isinstance(failure, SharedLedgerError):
                    self._linked_unconfirmed.update(failure.linked)
                self._log_error(f"shared ledger directory: {failure} (will retry)")
            return

    def _may_create(self, height: int) -> bool:
        """Whether to create missing shared files from `height` on, or only check existing ones."""
        if self.creates_first():
            self._missing = None
            return True
        now = time.monotonic()
        if self._missing is None or self._missing[0] != height:
            self._missing = (height, now)
        return now - self._missing[1] >= SHARED_GRACE_SECONDS

    def _log_error(self, message: str) -> None:
        if time.monotonic() - self._last_error_logged > 10:
            self._last_error_logged = time.monotonic()
            log.error("%s", message)
