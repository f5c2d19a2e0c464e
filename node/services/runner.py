"""Where every built-in service program starts and runs: `run_program` and the `ServiceRunner` loop.

`python -m tomq.node.services.<name>` calls `run_program`, which loads the instance's
ServiceContext (context.py) from the environment and runs a ServiceRunner: the loop that owns, on
one thread, the broker session (link.py), the proposer (proposer.py), the device registry
(devices.py) and a `ServiceProgram` (collector.py, analyser.py), and stops cleanly on SIGTERM.
paho's thread only enqueues, except for one decision it takes itself: a placement that fences this
instance (fencing.py) stops all acknowledging and proposing at once, and the instance exits 0.

Ordering rules, where they matter: an input is acknowledged after the output it produced is
published (QoS 1), so a crash between the two repeats the output rather than losing it; inputs
that arrive before the instance has its placement and the retained ledger blocks are held, so a
fenced instance never proposes and a restarted one knows what its predecessor already committed.

What this module must never do: acknowledge an input whose record is neither committed nor given
up, or acknowledge or propose anything after it is fenced.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from tomq.cluster import broker_password
from tomq.errors import ConfigError, PeerError, TomqError
from tomq.node.ledger.block import decode_block_file
from tomq.node.services.context import ServiceContext
from tomq.node.services.devices import DeviceRegistry
from tomq.node.services.fencing import placement_verdict
from tomq.node.services.link import Inbound, ServiceLink
from tomq.node.services.proposer import LedgerProposer
from tomq.records import DATA, ID_CREATE, ID_DELETE

log = logging.getLogger("tomq.service")

EXIT_OK = 0
EXIT_CONFIG = 2


class ServiceProgram(Protocol):
    """A built-in service program, driven by ServiceRunner on one thread."""

    def input_filters(self) -> list[str]:
        """Full topic filters to receive as inputs (QoS 1, acknowledged by the program)."""
        ...

    def on_input(self, message: Inbound, now: float) -> None: ...

    def tick(self, now: float) -> None: ...


class ServiceRunner:
    """The instance's loop: one thread owns the proposer, the registry and the program.

    paho's thread only enqueues, except for one decision it takes itself: a placement that fences
    this instance sets `fenced` at once, and from then on nothing is acknowledged or proposed.
    """

    TICK_SECONDS = 0.05
    SETTLE_SECONDS = 0.3  # after the first subscription grant: retained placement and blocks arrive

    def __init__(self, context: ServiceContext, program: Callable[[ServiceRunner], ServiceProgram]) -> None:
        self.context = context
        self.topics = context.topics
        self._inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.fenced = threading.Event()
        self.fence_reason = ""
        self._stopping = threading.Event()
        self.stop_reason = ""
        self.link = ServiceLink(host=context.broker_host, port=context.broker_port, username=context.identity,
                                password=broker_password(context.key), client_id=context.client_id,
                                on_message=self._on_message, on_ready=self._on_ready)
        self.proposer = LedgerProposer(context.key, self.topics, self.publish, member=context.identity,
                                       replica=context.replica)
        self.devices = DeviceRegistry(context.trust, context.devices, context.ledger_height)
        self._placement_topic = self.topics.orch_placement(context.service)
        self._audit_prefix = f"{self.topics.root}/audit/"
        self._block_prefix = f"{self.topics.root}/ledger/block/"
        self._settled_at: float | None = None
        self._held: list[Inbound] = []
        self.program = program(self)
        # Ledger and placement first: the broker sends their retained messages before any input
        # it queued for us, as far as one connection's order goes.
        self.link.subscribe(self._placement_topic, 0)
        self.link.subscribe(f"{self.topics.root}/ledger/block/+", 0)
        self.link.subscribe(f"{self.topics.root}/audit/{ID_CREATE}", 0)
        self.link.subscribe(f"{self.topics.root}/audit/{ID_DELETE}", 0)
        self.link.subscribe(f"{self.topics.root}/audit/{DATA}", 0)
        for topic_filter in self.program.input_filters():
            self.link.subscribe(topic_filter, 1)

    # called by the program --------------------------------------------------------------------

    def ack(self, message: Inbound) -> bool:
        """Acknowledge an input for good; refused (False) once fenced or stopping."""
        if self.fenced.is_set() or self._stopping.is_set():
            return False
        self.link.ack(message)
        return True

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> object:
        if self.fenced.is_set():
            return False
        return self.link.publish(topic, payload, qos)

    def stop(self, why: str) -> None:
        """Ask the loop to end (within one tick). Safe in a signal handler: it only sets an Event,
        whose lock the loop's thread never holds, where a queue put could deadlock on the queue's."""
        if not self._stopping.is_set():
            self.stop_reason = why
        self._stopping.set()

    # paho's thread ----------------------------------------------------------------------------

    def _on_message(self, message: Inbound) -> None:
        if message.topic == self._placement_topic:
            c = self.context
            reason = placement_verdict(message.payload, service=c.service, replica=c.replica, node=c.node,
                                       height=c.height)
            if reason is not None and not self.fenced.is_set():
                self.fence_reason = reason
                self.fenced.set()
                self._inbox.put(("wake", None))
            return
        self._inbox.put(("message", message))

    def _on_ready(self, session_present: bool) -> None:
        self._inbox.put(("ready", session_present))

    # the loop ---------------------------------------------------------------------------------

    def run(self) -> int:
        log.info("%s starting as %s (program %s, %d devices joined at height %s)", self.context.label,
                 self.context.identity, self.context.program, len(self.context.devices), self.context.ledger_height)
        self.link.start()
        next_tick = 0.0
        try:
            while not self._stopping.is_set() and not self.fenced.is_set():
                try:
                    kind, item = self._inbox.get(timeout=self.TICK_SECONDS)
                except queue.Empty:
                    kind, item = "idle", None
                now = time.time()
                if self._held and self._settled() and not self.fenced.is_set():
                    # Before anything newer: a device's readings must reach the program in the order
                    # they came, or the later one's seq makes the earlier ones look replayed.
                    held, self._held = self._held, []
                    for message in held:
                        self._input(message, now)
                if kind == "message":
                    self._dispatch(item, now)
                elif kind == "ready" and self._settled_at is None:
                    self._settled_at = time.monotonic() + self.SETTLE_SECONDS
                    log.info("subscribed (session %s); taking inputs in %.1f s", "resumed" if item else "new",
                             self.SETTLE_SECONDS)
                if now >= next_tick and not self.fenced.is_set():
                    next_tick = now + self.TICK_SECONDS
                    self.proposer.tick(now)
                    self.program.tick(now)
        finally:
            if self.fenced.is_set():
                log.warning("fenced: %s; exiting without acknowledging further input", self.fence_reason)
            elif self._stopping.is_set():
                log.info("stopping (%s); %d records not yet committed stay unacknowledged for the next instance",
                         self.stop_reason, self.proposer.outstanding)
            self.link.stop()
        return EXIT_OK

    def _input(self, message: Inbound, now: float) -> None:
        try:
            self.program.on_input(message, now)
        except TomqError as exc:
            # Our own refusal to build something from this input (e.g. a record that does not
            # validate): say so and let it go, rather than stall the replica on it forever.
            log.error("dropped the input on %s: %s", message.topic, exc)
            self.ack(message)

    def _settled(self) -> bool:
        return self._settled_at is not None and time.monotonic() >= self._settled_at

    def _dispatch(self, message: Inbound, now: float) -> None:
        topic = message.topic
        if topic.startswith(self._audit_prefix):
            try:
                line = json.loads(message.payload)
            except ValueError:
                return
            if isinstance(line, dict):
                self.devices.on_audit_line(line)
                self.proposer.on_audit_line(line)
            return
        if topic.startswith(self._block_prefix):
            if not message.payload:
                return  # a height that left the retained window
            try:
                block = decode_block_file(message.payload).block
            except PeerError:
                return
            self.devices.on_block(block.height, block)
            self.proposer.on_block(block.height, block)
            return
        if self._held or not self._settled() or self.fenced.is_set():
            self._held.append(message)
            return
        self._input(message, now)


def run_program(program: Callable[[ServiceRunner], ServiceProgram], name: str) -> int:
    """`python -m tomq.node.services.<name>`: load the context from the environment and run."""
    logging.basicConfig(level=os.environ.get("TOMQ_LOG_LEVEL", "INFO").upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    try:
        context = ServiceContext.from_environment()
        logging.getLogger().handlers[0].setFormatter(logging.Formatter(
            f"%(asctime)s {context.service}/{context.replica} %(levelname)s %(name)s: %(message)s"))
        runner = ServiceRunner(context, program)
    except ConfigError as exc:
        log.error("%s cannot start: %s", name, exc)
        return EXIT_CONFIG
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda number, _: runner.stop(signal.Signals(number).name))
    return runner.run()
