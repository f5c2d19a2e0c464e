"""The consensus paper's phases of one placement, as the leader measured them.

The paper (seeds/consensus-orchestration-edge.txt, its evaluation) splits the time from a request to
a committed placement into: request transfer, election network, vote processing, choosing, consensus
network, consensus processing and log write. tomq measures them on the leader, from wall-clock
stamps of its own steps and the Raft core's phase events:

    request_transfer      operator sealed the request -> this node received it (two clocks: on one
                          machine they agree; across machines read it with their skew in mind)
    election_network      campaign started -> first vote answer back (on-demand mode only)
    vote_processing       first vote answer -> elected
    registration          request -> planning: 0 when the service's identity and its placements go
                          in one block (the usual case); a round when planning had to wait
    choosing              planning (the pure placement function) for this decision
    log_write             the leader's fsync of the entry holding the decision
    consensus_processing  checking and applying the block on the leader
    consensus_network     the rest of proposal -> committed: replication round trips
    total                 received (or node declared dead) -> committed on the leader
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class PlacementTiming:
    """The consensus paper's phases of one placement, in milliseconds, as the leader saw them."""

    service: str
    replica: int
    node: str
    mode: str
    trigger: str  # "request" (an operator's) or "heal" (a node stopped answering) or "plan"
    received: float  # wall clock: request received here, or node declared dead
    sent_ms: int | None = None  # operator's clock when it sealed the request
    campaign: float | None = None
    first_vote: float | None = None
    elected: float | None = None
    planning: float = 0.0  # when the plan that chose it started
    chosen: float = 0.0
    committed: float | None = None
    log_write_s: float = 0.0
    apply_s: float = 0.0

    def phases_ms(self) -> dict[str, float | None]:
        def span(a: float | None, b: float | None) -> float | None:
            return round((b - a) * 1000, 3) if a is not None and b is not None else None

        start = self.elected if self.elected is not None else self.received
        consensus = span(self.chosen, self.committed)
        return {
            "request_transfer": (round(self.received * 1000 - self.sent_ms, 3) if self.sent_ms is not None else None),
            "election_network": span(self.campaign, self.first_vote),
            "vote_processing": span(self.first_vote, self.elected),
            # A deployment first commits the service's identity (its spec), then places: that round.
            "registration": span(start, self.planning) if self.planning > start else 0.0,
            "choosing": span(self.planning, self.chosen),
            "log_write": round(self.log_write_s * 1000, 3),
            "consensus_network": (round(max(0.0, consensus - self.log_write_s * 1000 - self.apply_s * 1000), 3)
                                  if consensus is not None else None),
            "consensus_processing": round(self.apply_s * 1000, 3),
            "total": span(self.received, self.committed),
        }

    def to_map(self) -> dict[str, Any]:
        return {"service": self.service, "replica": self.replica, "node": self.node, "mode": self.mode,
                "trigger": self.trigger, "phases_ms": self.phases_ms()}
