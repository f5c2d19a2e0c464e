"""Who may connect to the broker, publish where, and subscribe to what: tomq's access policy, pure.

One table (`RULES`) says, per role, which topics below `tomq/<cluster>/` a member may publish to
and subscribe to; `{name}` stands for the member's own name. Both brokers are driven from it: the
amqtt plugin asks a `Policy` object at run time, the mosquitto emitter writes the same table out as
an ACL file. `Policy` reads no files, sockets or clock beyond the `clock` it is given; the one
loader at the bottom (`load_policy`) reads the cluster directory through tomq.cluster and is kept
apart so that everything above it can be tested with no disk at all.

How a decision is made:
- connect: the username is a member's name, its certificate is valid now and names this cluster,
  this name and a known role, and the password matches its `$7$` hash from DIR/broker/passwd;
- publish: the topic is concrete, lies below `tomq/<cluster>/`, is allowed by the role's row of the
  table AND by the publish rights in the member's certificate (the operator may narrow a role, never
  widen it beyond the table), or is one of the role's `relay` topics, whose payload is signed by
  the operator and which no certificate lists;
- subscribe: the filter can match only topics the member may read: it must be contained in one of
  its read patterns, so a sensor asking for `tomq/#` is refused rather than filtered;
- receive: a message is delivered only if its topic matches one of the member's read patterns.

It must never grant anything outside `tomq/<cluster>/`, never trust the unsigned role in
cluster.toml over the signed certificate, and never let one member act under another's name.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from tomq import cluster as clusters
from tomq.certificate import Certificate
from tomq.cluster import Cluster, check_mosquitto_password, mosquitto_password_hash
from tomq.errors import TomqError
from tomq.topics import ROLES, ROOT, filter_matches


@dataclass(frozen=True)
class Rule:
    """Topic filters below tomq/<cluster>/ for one role; `{name}` is replaced by the member's name."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    # Published on someone else's authority: the payload carries that signer's signature (the
    # operator's), so the member's own certificate is not consulted for these.
    relay: tuple[str, ...] = ()


# Read by every authenticated member whatever its role: the public face of the ledger.
EVERYONE_SUBSCRIBES: tuple[str, ...] = ("audit/#", "ledger/block/+", "ledger/head", "orch/placement/+")

# The whole policy. Publishing is further narrowed by each member's certificate; subscribing is
# this row plus EVERYONE_SUBSCRIBES.
RULES: dict[str, Rule] = {
    "sensor": Rule(
        publish=("dev/{name}/data", "dev/{name}/state"),
        subscribe=("dev/{name}/cmd",),  # the cluster's acknowledgements (passive contracts)
    ),
    "actuator": Rule(
        publish=("dev/{name}/data", "dev/{name}/state"),
        subscribe=("dev/{name}/cmd",),
    ),
    "node": Rule(
        publish=(
            "node/+/raft/{name}",  # a Raft message names its sender last: no node can speak for another
            "node/{name}/load",
            "ledger/propose/{name}",
            "ledger/block/+",
            "ledger/head",
            "orch/placement/+",
            "dev/+/cmd",
            "audit/+",
            "svc/+/in",
        ),
        subscribe=("#",),  # everything below the cluster root, nothing outside it
        # The operator tool connects as a node until operators are broker users; node certificates
        # (tomq.topics.default_publish_rights) do not list orch/request, the request is operator-signed.
        relay=("orch/request",),
    ),
    "service": Rule(
        publish=("svc/{name}/out", "ledger/propose/{name}"),  # a service's output proves who wrote it
        subscribe=("dev/+/data", "svc/+/in", "svc/+/out"),
    ),
    "auditor": Rule(
        publish=(),
        subscribe=(),
    ),
}

if set(RULES) != set(ROLES):  # a role without a row would silently get no rights, or an unknown one some
    raise RuntimeError(f"broker/policy.py RULES has roles {sorted(RULES)}, tomq.topics has {sorted(ROLES)}")


def parse_passwd(text: str) -> dict[str, str]:
    """`name:$7$...` lines (mosquitto's password file) as {name: hash}; blank and # lines skipped."""
    hashes: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, line_hash = line.partition(":")
        if sep:
            hashes[name] = line_hash
    return hashes


def expand(pattern: str, name: str) -> str:
    return pattern.replace("{name}", name)


def is_valid_filter(topic_filter: str) -> bool:
    """MQTT's rules for a subscription filter: wildcards fill whole levels, `#` only last."""
    if not topic_filter or "\x00" in topic_filter:
        return False
    levels = topic_filter.split("/")
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
    return True


def filter_contains(outer: str, inner: str) -> bool:
    """True if every topic that filter `inner` can match is also matched by filter `outer`."""
    o_levels = outer.split("/")
    i_levels = inner.split("/")
    for index, level in enumerate(o_levels):
        if level == "#":
            return True  # `#` also matches the parent level itself, so inner may end here too
        if index >= len(i_levels):
            return False
        got = i_levels[index]
        if got == "#":
            return False  # inner reaches arbitrarily deep where outer stops or stays specific
        if level != "+" and level != got:
            return False  # a literal in outer admits only that literal, not a `+`
    return len(o_levels) == len(i_levels)


def filter_intersection(a: str, b: str) -> str | None:
    """The filter matching exactly the topics both `a` and `b` match, or None if they share none.

    MQTT filters are closed under intersection, which is what lets the mosquitto ACL state
    "the role's table AND the certificate" as plain `topic write` lines.
    """
    a_levels = a.split("/")
    b_levels = b.split("/")
    out: list[str] = []
    for index in range(max(len(a_levels), len(b_levels))):
        x = a_levels[index] if index < len(a_levels) else None
        y = b_levels[index] if index < len(b_levels) else None
        if x == "#":
            return _join_tail(out, b_levels[index:])
        if y == "#":
            return _join_tail(out, a_levels[index:])
        if x is None or y is None:
            return None  # different depths and no `#` to absorb the difference
        if x == "+":
            out.append(y)
        elif y == "+" or x == y:
            out.append(x)
        else:
            return None
    return "/".join(out)


def _without_covered(patterns: list[str]) -> list[str]:
    """Drop patterns another one already covers (a node's `#` makes the everyone-rows redundant)."""
    kept: list[str] = []
    for pattern in patterns:
        if any(filter_contains(k, pattern) for k in kept):
            continue
        kept = [k for k in kept if not filter_contains(pattern, k)]
        kept.append(pattern)
    return kept


def _join_tail(head: list[str], tail: list[str]) -> str | None:
    # `x/#` matches `x` itself, so an empty tail leaves just the head.
    if not tail:
        return "/".join(head) if head else None
    return "/".join(head + tail)


@dataclass(frozen=True)
class Grant:
    """What one member may do, fully expanded to absolute topic filters."""

    name: str
    role: str
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]


class Policy:
    """The access decisions for one cluster, from its members' verified certificates.

    `certificates` maps member name to the certificate that tomq.cluster.Cluster.certificate()
    returned (already verified against the operator key). A member whose certificate does not
    match its cluster.toml entry gets no rights; the reason is kept in `rejected`.
    """

    def __init__(
        self,
        cluster: Cluster,
        certificates: Mapping[str, Certificate],
        password_hashes: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cluster = cluster.name
        self.root = f"{ROOT}/{cluster.name}"
        self._clock = clock
        self._hashes = dict(password_hashes or {})
        self._certs: dict[str, Certificate] = {}
        self.rejected: dict[str, str] = {}
        for member in cluster.members:
            cert = certificates.get(member.name)
            problem = self._problem(member.name, member.role, member.id, cert)
            if problem is not None:
                self.rejected[member.name] = problem
            elif cert is not None:
                self._certs[member.name] = cert
        self._grants = {name: self._grant(cert) for name, cert in self._certs.items()}

    def _problem(self, name: str, role: str, identity: str, cert: Certificate | None) -> str | None:
        if cert is None:
            return "no certificate"
        if cert.cluster != self.cluster:
            return f"certificate is for cluster {cert.cluster!r}"
        if cert.name != name:
            return f"certificate names {cert.name!r}"
        if cert.role != role or cert.role not in RULES:
            return f"certificate role {cert.role!r} differs from cluster.toml role {role!r}"
        if cert.subject_id != identity:
            return f"certificate key {cert.subject_id} differs from cluster.toml id {identity}"
        return None

    def _grant(self, cert: Certificate) -> Grant:
        rule = RULES[cert.role]
        publish: list[str] = []
        for pattern in rule.publish:
            for right in cert.publish:
                both = filter_intersection(expand(pattern, cert.name), right)
                if both is not None and f"{self.root}/{both}" not in publish:
                    publish.append(f"{self.root}/{both}")
        for pattern in rule.relay:
            if f"{self.root}/{expand(pattern, cert.name)}" not in publish:
                publish.append(f"{self.root}/{expand(pattern, cert.name)}")
        subscribe = _without_covered(
            [f"{self.root}/{expand(p, cert.name)}" for p in (*rule.subscribe, *EVERYONE_SUBSCRIBES)]
        )
        return Grant(cert.name, cert.role, tuple(_without_covered(publish)), tuple(subscribe))

    # --- queries -------------------------------------------------------------------------------

    def grant(self, username: str | None) -> Grant | None:
        """The member's expanded rights, or None if it may do nothing right now."""
        if username is None:
            return None
        grant = self._grants.get(username)
        if grant is None or not self._certs[username].is_valid_at(self._clock()):
            return None
        return grant

    def grants(self) -> Iterable[Grant]:
        """Every member's rights (ignoring validity windows): what the mosquitto emitter writes."""
        return list(self._grants.values())

    def may_connect(self, username: str | None, password: str | None) -> bool:
        if username is None or password is None:
            return False
        line_hash = self._hashes.get(username)
        if line_hash is None:
            # Spend the same work as a real check so a refusal does not reveal which names exist.
            check_mosquitto_password(_DUMMY_HASH, password)
            return False
        if not check_mosquitto_password(line_hash, password):
            return False
        return self.grant(username) is not None

    def may_publish(self, username: str | None, topic: str) -> bool:
        grant = self.grant(username)
        if grant is None or not topic or "+" in topic or "#" in topic or "\x00" in topic:
            return False
        if not topic.startswith(self.root + "/"):
            return False
        return any(filter_matches(pattern, topic) for pattern in grant.publish)

    def may_subscribe(self, username: str | None, topic_filter: str) -> bool:
        grant = self.grant(username)
        if grant is None or not is_valid_filter(topic_filter):
            return False
        levels = topic_filter.split("/")
        if len(levels) > 2 and levels[0] == "tomq" and levels[1] == "+":
            # `tomq/+/audit/#` (DESIGN.md §3, for mosquitto_sub): one broker serves one cluster, and
            # every delivery is checked by may_receive, so read the wildcard as this cluster.
            topic_filter = "/".join([self.root, *levels[2:]])
        return any(filter_contains(pattern, topic_filter) for pattern in grant.subscribe)

    def may_receive(self, username: str | None, topic: str) -> bool:
        """Checked at every delivery, so a session taken over by another user cannot read on."""
        grant = self.grant(username)
        if grant is None or not topic.startswith(self.root + "/"):
            return False
        return any(filter_matches(pattern, topic) for pattern in grant.subscribe)


_DUMMY_HASH = mosquitto_password_hash("not-a-member", b"\x00" * 12)


# --- loading: the only function in this module that touches the disk -----------------------------


def load_policy(directory: str | os.PathLike[str], clock: Callable[[], float] = time.time) -> Policy:
    """The policy of the cluster in `directory`: cluster.toml, every certificate, broker/passwd.

    A certificate that cannot be read or does not verify leaves that member without rights (and
    named in `rejected`) instead of stopping the broker for everyone else.
    """
    cluster = clusters.load(directory)
    certificates: dict[str, Certificate] = {}
    problems: dict[str, str] = {}
    for member in cluster.members:
        try:
            certificates[member.name] = cluster.certificate(member.name)
        except (TomqError, OSError) as exc:
            problems[member.name] = f"certificate unreadable: {exc}"
    passwd = cluster.directory / "broker" / "passwd"
    hashes = parse_passwd(passwd.read_text("utf-8")) if passwd.exists() else {}
    policy = Policy(cluster, certificates, hashes, clock)
    policy.rejected.update(problems)
    return policy
