"""A node daemon with a trivial state machine, for transport and daemon tests without the ledger.

The leader proposes every payload published on ledger/propose/<member>; every node appends each committed
entry to members/<name>/applied.txt (hex, one per line) so the test can compare them.
"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tomq.node.daemon import NodeDaemon, NodeOptions
from tomq.node.raft.core import Role
from tomq.node.raft.types import Entry


class AppendToFile:
    def __init__(self, node: NodeDaemon) -> None:
        self.node = node
        self.path = node.cluster.directory / "members" / node.name / "applied.txt"
        # The state machine restarts empty (no snapshot) and the core re-applies every committed entry.
        self.handle = open(self.path, "w")

    def apply(self, entry: Entry) -> None:
        self.handle.write(entry.data.hex() + "\n")
        self.handle.flush()

    def snapshot(self) -> bytes:
        return b""

    def compactable_index(self) -> int:
        return self.node.raft.log.applied

    def restore(self, data: bytes) -> None:
        pass

    def tick(self, node: NodeDaemon) -> None:
        pass

    def after_input(self, node: NodeDaemon) -> None:
        pass

    def has_work(self) -> bool:
        return False

    def extras_for_peers(self, peers: list[str], sending: set[str]) -> dict[str, dict[str, Any]]:
        return {}

    def on_extras(self, sender: str, extras: dict[str, Any]) -> None:
        pass

    def status(self) -> dict[str, Any]:
        return {}

    def load_report(self) -> dict[str, Any]:
        return {}

    def load_score(self) -> float | None:
        return None

    def close(self) -> None:
        pass

    def on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        if "/ledger/propose/" in topic and self.node.raft.role is Role.LEADER:
            self.node.propose(payload)


def main() -> None:
    cluster_dir, name, port, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {name} %(levelname)s %(name)s: %(message)s")
    options = NodeOptions(mode=mode, port=port, host="127.0.0.1")
    node = NodeDaemon(cluster_dir, name, AppendToFile, options)
    options.extra_subscriptions.append(node.topics.ledger_proposals())
    signal.signal(signal.SIGTERM, lambda *_: node.stop())
    node.run()


if __name__ == "__main__":
    main()
