"""This node's instances: carry out the committed placement with the runtime, off the node's loop.

Starting a container takes a tenth of a second or more, stopping one up to its grace period; the node
loop must keep ticking Raft meanwhile. So the loop only hands a *desired set* (the replicas the ledger
assigns to this node, with their decision heights) to this worker thread, which reconciles the runtime
towards it (start what is missing, stop what is not desired, including instances left behind by an
earlier run of this node) and hands back what runs now. The loop turns that into ledger records
(a container's PROV-ID-create and -delete); this thread never touches the ledger or the Raft core.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from tomq.errors import TomqError
from tomq.node.runtime.base import Instance, InstanceSpec, Runtime
from tomq.wakeup import Wakeup

log = logging.getLogger("tomq.instances")


@dataclass(frozen=True, slots=True)
class Desired:
    """One replica this node must run, built by the loop from the committed state."""

    spec: InstanceSpec  # carries service, replica and the decision height
    files: Callable[[], Mapping[str, bytes]]  # read when (and only when) it is started


class InstanceWorker:
    def __init__(self, runtime: Runtime, report: Callable[[list[Instance], list[str], list[int]], None],
                 period: float = 0.5) -> None:
        self.runtime = runtime
        # Called on this thread with what runs, what failed and the instances' pids (the resource
        # monitor's input); the caller hands it to its own loop. Only this thread touches the runtime:
        # runtimes are not thread-safe.
        self.report = report
        self.period = period
        self._desired: dict[tuple[str, int], Desired] | None = None
        self._wake = Wakeup()  # not an Event: its timed wait hung when the clock jumped (tomq/wakeup.py)
        self._stopping = threading.Event()
        self._failures: dict[tuple[str, int, int], float] = {}  # start that failed -> retry after
        self.thread = threading.Thread(target=self._run, name="tomq-instances", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def want(self, desired: dict[tuple[str, int], Desired]) -> None:
        self._desired = desired
        self._wake.set()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        self.thread.join(timeout=10)
        if not self.thread.is_alive():
            self._wake.close()

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(self.period)
            if self._stopping.is_set():
                break
            try:
                self.report(*self._reconcile())
            except TomqError as exc:
                log.warning("runtime %s: %s", self.runtime.name, exc)
            except Exception:  # a runtime bug must not end reconciliation for good
                log.exception("reconciling instances failed")

    def _reconcile(self) -> tuple[list[Instance], list[str], list[int]]:
        desired = self._desired
        self.runtime.poll()
        running = {(i.service, i.replica): i for i in self.runtime.list()}
        problems: list[str] = []
        if desired is None:  # the loop has not told us yet: report only, never stop anything
            return list(running.values()), problems, self.runtime.pids()
        for key, instance in sorted(running.items()):
            want = desired.get(key)
            if want is None or want.spec.height != instance.height:
                log.info("stopping %s:%s (height %s): %s", key[0], key[1], instance.height,
                         "no longer placed here" if want is None else f"replaced by height {want.spec.height}")
                self.runtime.stop(*key)
        now = time.monotonic()
        for key, want in sorted(desired.items()):
            current = running.get(key)
            if current is not None and current.height == want.spec.height:
                continue
            failure_key = (key[0], key[1], want.spec.height)
            if self._failures.get(failure_key, 0.0) > now:
                continue
            try:
                spec = dataclasses.replace(want.spec, files=dict(want.files()))
                self.runtime.start(spec)
                log.info("started %s:%s for the decision at height %s", key[0], key[1], want.spec.height)
                self._failures.pop(failure_key, None)
            except (TomqError, OSError) as exc:
                self._failures[failure_key] = now + 5.0
                problems.append(f"{key[0]}:{key[1]}: {exc}")
                log.warning("cannot start %s:%s: %s", key[0], key[1], exc)
        return self.runtime.list(), problems, self.runtime.pids()
