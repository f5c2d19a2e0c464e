"""The fencing rule: `placement_verdict`, whether a service instance must stop because it was placed elsewhere.

Nodes publish retained JSON on orch/placement/<service>:
{"service", "height", "replicas": {"<r>": {"node", "height"}}}. An instance whose replica is now
on another node, placed at a higher height than its own, gone from the document, or whose
service's placement is cleared (empty payload), stops at once with exit code 0 and acknowledges
nothing more (ServiceRunner sees to that), so an instance left running on a node declared dead
never runs beside its successor.

Pure apart from log lines: a placement payload and the instance's own placement in, a reason or
None out.

What this module must never do: act on its verdict (stop, acknowledge or publish), or fence on a
placement older than the instance's own, which is only a stale retained message.
"""

from __future__ import annotations

import json
import logging

log = logging.getLogger("tomq.service")


def placement_verdict(payload: bytes, *, service: str, replica: int, node: str, height: int) -> str | None:
    """Why an instance (service, replica) started on `node` at `height` must stop, or None to go on.

    A placement older than ours (a lower height) is a stale retained message and changes nothing;
    an unreadable one is ignored, because only nodes may publish there and a node that cannot
    write JSON should not stop the cluster's services.
    """
    if not payload:
        return f"the placement of {service} was cleared"
    try:
        document = json.loads(payload)
    except ValueError:
        log.warning("ignoring an unreadable placement of %s (%d bytes)", service, len(payload))
        return None
    if not isinstance(document, dict) or not isinstance(document.get("replicas"), dict):
        log.warning("ignoring a placement of %s without a replicas map", service)
        return None
    placed_height = document.get("height")
    entry = document["replicas"].get(str(replica))
    if entry is None:
        if isinstance(placed_height, int) and placed_height < height:
            return None  # published before our own placement was decided
        return f"replica {replica} of {service} is no longer placed (placement at height {placed_height})"
    if not isinstance(entry, dict) or not isinstance(entry.get("height"), int):
        log.warning("ignoring a placement of %s whose replica %s entry is malformed", service, replica)
        return None
    if entry["height"] < height:
        return None
    if entry.get("node") != node:
        return f"replica {replica} of {service} now runs on {entry.get('node')} (placed at height {entry['height']})"
    if entry["height"] > height:
        return f"replica {replica} of {service} was placed again at height {entry['height']} (this instance: {height})"
    return None
