"""The MQTT topic scheme of DESIGN.md §3: build topics, parse them back, and say who may publish what.

Every variable segment (cluster, device, node, service, record type) is checked so that no id can
smuggle in a level separator or a wildcard: a device named `a/+` could otherwise publish for others.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tomq.errors import InvalidTopic

ROOT = "tomq"
_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_HEIGHT = re.compile(r"0|[1-9][0-9]{0,18}")
MAX_TOPIC_BYTES = 65535  # MQTT's own limit on a topic name

ROLES = ("node", "sensor", "actuator", "service", "auditor")


def check_segment(value: str, what: str = "id") -> str:
    """Return `value` if it can stand alone as one topic level, else raise InvalidTopic naming it."""
    if not isinstance(value, str) or _SEGMENT.fullmatch(value) is None:
        raise InvalidTopic(
            f"{what} {value!r} is not a valid topic segment: use 1-64 of A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit (no '/', '+', '#')"
        )
    return value


def is_segment(value: str) -> bool:
    """Whether `value` can stand alone as one topic level (`check_segment` without the exception)."""
    return _SEGMENT.fullmatch(value) is not None


@dataclass(frozen=True, slots=True)
class ParsedTopic:
    cluster: str
    kind: str  # one of the keys of _PATTERNS, e.g. "device-data", "raft", "ledger-block"
    params: dict[str, str]


# kind -> topic levels below tomq/<cluster>/; "<x>" is a variable segment named x.
_PATTERNS: dict[str, tuple[str, ...]] = {
    "device-data": ("dev", "<device>", "data"),
    "device-cmd": ("dev", "<device>", "cmd"),
    "device-state": ("dev", "<device>", "state"),
    "raft": ("node", "<to>", "raft", "<from>"),
    "node-load": ("node", "<node>", "load"),
    "orch-request": ("orch", "request"),
    "orch-placement": ("orch", "placement", "<service>"),
    "service-in": ("svc", "<service>", "in"),
    "service-out": ("svc", "<service>", "out"),
    "ledger-propose": ("ledger", "propose", "<member>"),
    "ledger-block": ("ledger", "block", "<height>"),
    "ledger-head": ("ledger", "head"),
    "audit": ("audit", "<record_type>"),
}


class Topics:
    """Topic names of one cluster."""

    def __init__(self, cluster: str) -> None:
        self.cluster = check_segment(cluster, "cluster name")
        self.root = f"{ROOT}/{self.cluster}"

    def _join(self, *levels: str) -> str:
        return "/".join((self.root, *levels))

    def device_data(self, device: str) -> str:
        return self._join("dev", check_segment(device, "device"), "data")

    def device_cmd(self, device: str) -> str:
        return self._join("dev", check_segment(device, "device"), "cmd")

    def device_state(self, device: str) -> str:
        return self._join("dev", check_segment(device, "device"), "state")

    def raft(self, to: str, from_: str) -> str:
        return self._join("node", check_segment(to, "node"), "raft", check_segment(from_, "node"))

    def raft_inbox(self, node: str) -> str:
        """The subscription filter for every Raft message addressed to `node`."""
        return self._join("node", check_segment(node, "node"), "raft", "+")

    def raft_inbox_prefix(self, node: str) -> str:
        """What every topic in `node`'s inbox starts with; the sender's name follows."""
        return self._join("node", check_segment(node, "node"), "raft", "")

    def node_load(self, node: str) -> str:
        return self._join("node", check_segment(node, "node"), "load")

    def orch_request(self) -> str:
        return self._join("orch", "request")

    def orch_placement(self, service: str) -> str:
        return self._join("orch", "placement", check_segment(service, "service"))

    def service_in(self, service: str) -> str:
        return self._join("svc", check_segment(service, "service"), "in")

    def service_out(self, service: str) -> str:
        return self._join("svc", check_segment(service, "service"), "out")

    def ledger_propose(self, member: str) -> str:
        """Where `member` publishes its record proposals: the broker lets it publish only here, so the
        topic names the sender of a flood or a forgery whatever the payload claims."""
        return self._join("ledger", "propose", check_segment(member, "member"))

    def ledger_proposals(self) -> str:
        """The subscription filter for every member's proposals."""
        return self._join("ledger", "propose", "+")

    def ledger_block(self, height: int) -> str:
        if not isinstance(height, int) or isinstance(height, bool) or height < 0:
            raise InvalidTopic(f"block height {height!r} must be a non-negative integer")
        return self._join("ledger", "block", str(height))

    def ledger_head(self) -> str:
        return self._join("ledger", "head")

    def audit(self, record_type: str) -> str:
        return self._join("audit", check_segment(record_type, "record type"))

    def audit_all(self) -> str:
        return self._join("audit", "#")


def parse(topic: str) -> ParsedTopic:
    """Parse a concrete topic name (never a filter) into its kind and variable segments."""
    if not isinstance(topic, str):
        raise InvalidTopic(f"topic must be text, not {type(topic).__name__}")
    if len(topic.encode("utf-8", "surrogatepass")) > MAX_TOPIC_BYTES:
        raise InvalidTopic("topic is longer than MQTT's 65535 bytes")
    if "+" in topic or "#" in topic:
        raise InvalidTopic(f"topic {topic[:80]!r} contains a wildcard; a published topic must be concrete")
    levels = topic.split("/")
    if len(levels) < 3 or levels[0] != ROOT:
        raise InvalidTopic(f"topic {topic[:80]!r} is not under {ROOT}/<cluster>/")
    cluster = check_segment(levels[1], "cluster name")
    rest = levels[2:]
    for kind, pattern in _PATTERNS.items():
        if len(pattern) != len(rest):
            continue
        params: dict[str, str] = {}
        for want, got in zip(pattern, rest, strict=True):
            if want.startswith("<"):
                name = want[1:-1]
                if name == "height":
                    if _HEIGHT.fullmatch(got) is None:
                        break
                else:
                    check_segment(got, name.replace("_", " "))
                params[name] = got
            elif want != got:
                break
        else:
            return ParsedTopic(cluster, kind, params)
    raise InvalidTopic(f"topic {topic[:80]!r} matches no tomq topic of DESIGN.md §3")


def default_publish_rights(role: str, name: str) -> tuple[str, ...]:
    """Topic filters (below tomq/<cluster>/) that an identity of `role` named `name` may publish to.

    They go into its membership certificate; the broker ACL and the node's checks both derive from it.
    """
    check_segment(name, f"{role} name")
    if role == "sensor":
        return (f"dev/{name}/data", f"dev/{name}/state")
    if role == "actuator":
        # an actuator reports what it did as data, and announces itself like any device
        return (f"dev/{name}/data", f"dev/{name}/state")
    if role == "node":
        return (
            f"node/+/raft/{name}",
            f"node/{name}/load",
            "ledger/#",
            "orch/placement/+",
            "dev/+/cmd",
            "audit/#",
            "svc/+/in",
        )
    if role == "service":
        return (f"svc/{name}/out", f"ledger/propose/{name}")
    if role == "auditor":
        return ()
    raise InvalidTopic(f"role {role!r} is not one of {', '.join(ROLES)}")


def filter_matches(topic_filter: str, topic: str) -> bool:
    """MQTT filter matching (`+` one level, `#` the rest), used to check publish rights."""
    f_levels = topic_filter.split("/")
    t_levels = topic.split("/")
    for index, level in enumerate(f_levels):
        if level == "#":
            return index == len(f_levels) - 1
        if index >= len(t_levels):
            return False
        if level != "+" and level != t_levels[index]:
            return False
    return len(f_levels) == len(t_levels)
