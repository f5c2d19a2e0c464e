"""What a node runs behind its Raft log: the ledger, and what acts on what it commits.

The daemon drives one `Applier`; this is it. The ledger owns the log's entries (blocks and their
certificates) and its snapshots. The orchestrator (placements), device presence (devices' own join
and leave messages) and actuation (contracts, actuator commands) only listen to the records the
ledger applies and to their topics, so none of them holds Raft state of its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tomq.node.actuation import Actuation
from tomq.node.ledger_service import LedgerService
from tomq.node.orchestrator.service import Orchestrator
from tomq.node.presence import DevicePresence
from tomq.node.raft.types import Entry

if TYPE_CHECKING:
    from tomq.node.daemon import NodeDaemon


class NodeApplier:
    def __init__(self, ledger: LedgerService, orchestrator: Orchestrator) -> None:
        self.ledger = ledger
        self.orchestrator = orchestrator
        self.presence = DevicePresence(ledger)
        self.actuation = Actuation(ledger, orchestrator)
        ledger.listeners.append(self.actuation.on_records)  # after the orchestrator: it reads its specs
        self.request_topic = ledger.node.topics.orch_request()

    def subscriptions(self) -> list[str]:
        """What the node must subscribe to for these parts, beyond Raft and the ledger."""
        return [self.request_topic, self.orchestrator.placement_prefix + "+", *self.presence.subscriptions()]

    def apply(self, entry: Entry) -> None:
        self.ledger.apply(entry)

    def snapshot(self) -> bytes:
        return self.ledger.snapshot()

    def compactable_index(self) -> int:
        return self.ledger.compactable_index()

    def restore(self, data: bytes) -> None:
        self.ledger.restore(data)

    def tick(self, node: NodeDaemon) -> None:
        self.ledger.tick(node)
        self.orchestrator.tick()
        self.presence.tick()
        self.actuation.tick()
        self.ledger.cut_block()  # what they proposed goes out now, not at the next input or tick
        self._hold(node)

    def after_input(self, node: NodeDaemon) -> None:
        self.ledger.after_input(node)
        self.orchestrator.after_input()  # cuts the block of what it proposed itself
        if self.actuation.has_work():
            # A command's trigger committed, or its certificate did: act now, not at the next tick
            # (ticks made a trigger -> actuator take 100-150 ms on an idle cluster).
            self.actuation.act()
            self.ledger.cut_block()
        self._hold(node)

    def has_work(self) -> bool:
        return self.orchestrator.has_work() or self.actuation.has_work()

    def _hold(self, node: NodeDaemon) -> None:
        # On-demand mode: a leader that paused now would leave committed work unfinished (a block
        # without its certificate, a registered service without its placement).
        node.raft.hold(self.ledger.has_leader_work() or self.orchestrator.has_leader_work()
                       or self.actuation.has_leader_work())

    def extras_for_peers(self, peers: list[str], sending: set[str]) -> dict[str, dict[str, Any]]:
        return self.ledger.extras_for_peers(peers, sending)

    def on_extras(self, sender: str, extras: dict[str, Any]) -> None:
        self.ledger.on_extras(sender, extras)

    def on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        if topic == self.request_topic:
            self.orchestrator.on_request(payload)
        elif topic.startswith(self.orchestrator.placement_prefix):
            self.orchestrator.on_placement(topic, payload)
        elif self.presence.handles(topic):
            self.presence.on_message(topic, payload)
        else:
            self.ledger.on_message(topic, payload, retained)

    def status(self) -> dict[str, Any]:
        return {**self.ledger.status(), "orchestration": self.orchestrator.status(),
                "presence": self.presence.status(), "actuation": self.actuation.status()}

    def load_report(self) -> dict[str, Any]:
        return self.orchestrator.load_report()

    def load_score(self) -> float | None:
        return self.orchestrator.load_score()

    def close(self) -> None:
        self.orchestrator.close()
        self.ledger.close()
