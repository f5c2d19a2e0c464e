"""The demo's live view: what the cluster publishes, folded into a `ViewState` and drawn by `render`.

`ViewState` is pure: it is fed decoded messages (a node's load report, a committed record, a
placement document, a device reading, the demo's own notes) with the time they arrived, and never
reads a clock or a socket, so the tests feed it payloads built with the project's own encoders and
compare what `render(state, width, now_ms)` draws. `ClusterWatcher` is the I/O around it: one MQTT
connection (with a node's credentials, as the operator tools connect until operators are broker
users; broker/policy.py) subscribed to

    node/+/load          signed, retained load reports: role, term, leader, height, load, runtime
    ledger/head          retained {height, hash}
    ledger/block/+       retained certified blocks: every record, even one whose audit line was lost
    audit/#              one JSON line per committed record, as the leader applies it
    orch/placement/+     retained placement documents
    dev/+/data           signed readings: an actuator reports its new state as a reading

What the view shows is what was published, decoded but not verified (load reports and readings
are opened against the cluster's certificates, records are not); `tomq ledger verify` is the check.

What this module must never do: publish, or let a malformed message stop the view (each is
dropped where it is decoded).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tomq import canonical, cluster
from tomq.errors import InvalidTopic, TomqError
from tomq.mqtt import MqttLink
from tomq.node.ledger.block import decode_block_file
from tomq.node.services.readings import READING_TYPES, open_reading
from tomq.records import DATA, ID_CREATE, ID_DELETE, ORCH, RECORD_STATES
from tomq.topics import parse
from tomq.wire import EnvelopeOpener

log = logging.getLogger("tomq.demo")

STALE_MS = 3500  # a node reports once a second: three missed reports and it is shown as silent
AUDIT_LINES = 10
BLOCK_LINES = 5
EVENT_LINES = 8
ACTUATOR_NOTE_MS = 2000  # at most one event line per actuator this often
_KEPT_RECORDS = 2000  # records remembered for the audit tail and the block lines (counts are kept apart)
_ACTUATOR_KEYS = ("colour", "color", "position", "state", "open", "on")

T = TypeVar("T")


@dataclass
class NodeView:
    name: str
    reported_ms: int = 0  # when the report was made (the node's clock, in the report)
    role: str = "?"
    term: int | None = None
    leader: str | None = None
    height: int | None = None
    load: float | None = None
    cpu: float | None = None
    memory: float | None = None
    runtime: str | None = None
    instances: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RecordLine:
    height: int
    index: int
    state: str
    proposer: str  # the proposer's name when known, else its id
    text: str  # one line: what the record says


@dataclass
class ActuatorView:
    state: str | None = None
    since_ms: int = 0
    commanded: str | None = None  # the latest setting the ledger commanded, e.g. "colour=green"
    commanded_height: int | None = None
    changes: int = 0  # state changes reported
    noted_ms: int = 0  # when a change was last noted as an event
    unnoted: int = 0  # changes since then that were not


@dataclass
class ViewState:
    """What the demo knows about its cluster, from messages alone. Every method is pure bookkeeping."""

    cluster: str
    scenario: str
    nodes: dict[str, NodeView]
    actuators: dict[str, ActuatorView]
    names: dict[str, str] = field(default_factory=dict)  # identity id -> member name
    started_ms: int = 0
    duration_s: float | None = None
    head_height: int = -1
    head_hash: str = ""
    placements: dict[str, dict[str, tuple[str, int]]] = field(default_factory=dict)  # service -> replica -> (node, h)
    records: dict[tuple[int, int], RecordLine] = field(default_factory=dict)
    counts: Counter[str] = field(default_factory=Counter)
    block_types: dict[int, Counter[str]] = field(default_factory=dict)
    devices_joined: set[str] = field(default_factory=set)
    devices_left: set[str] = field(default_factory=set)
    readings: Counter[str] = field(default_factory=Counter)  # device -> readings seen on dev/<d>/data
    events: deque[tuple[int, str]] = field(default_factory=lambda: deque(maxlen=200))
    noted: int = 0  # events ever noted (the deque keeps the latest): what a printer has not shown yet
    seen: set[tuple[int, int]] = field(default_factory=set)  # (height, index) of every record counted
    agreed_leader: str | None = None
    agreed_term: int | None = None

    @classmethod
    def new(cls, cluster_name: str, scenario: str, nodes: Iterable[str], actuators: Iterable[str],
            names: Mapping[str, str] | None = None, started_ms: int = 0,
            duration_s: float | None = None) -> ViewState:
        return cls(cluster_name, scenario, {n: NodeView(n) for n in nodes}, {a: ActuatorView() for a in actuators},
                   dict(names or {}), started_ms, duration_s)

    # -- inputs ------------------------------------------------------------------------------------

    def note(self, text: str, now_ms: int) -> None:
        """An event worth a line of its own (the demo's actions, leader changes, joins, actuators acting)."""
        self.events.append((now_ms, text))
        self.noted += 1

    def on_load(self, node: str, report: Mapping[str, Any], now_ms: int) -> None:
        """A node's load report body (node/<node>/load), as node/daemon.py publishes it."""
        view = self.nodes.setdefault(node, NodeView(node))
        reported = report.get("time_ms")
        if isinstance(reported, int) and reported < view.reported_ms:
            return  # an older report than the one we show (a retained copy arriving late)
        view.reported_ms = reported if isinstance(reported, int) else now_ms
        status = report.get("status") if isinstance(report.get("status"), Mapping) else {}
        assert isinstance(status, Mapping)
        view.role = str(status.get("role", "?"))
        view.term = _int(status.get("term"))
        leader = status.get("leader")
        view.leader = leader if isinstance(leader, str) and leader else None
        view.height = _int(status.get("height"))
        view.load = _float(report.get("load"))
        view.cpu = _float(report.get("cpu"))
        view.memory = _float(report.get("memory"))
        runtime = report.get("runtime")
        view.runtime = runtime if isinstance(runtime, str) else None
        instances = report.get("instances")
        view.instances = tuple(str(i) for i in instances) if isinstance(instances, list) else ()
        self._follow_leader(now_ms)

    def on_head(self, height: int, block_hash: bytes, now_ms: int) -> None:
        if height > self.head_height:
            self.head_height = height
            self.head_hash = block_hash.hex()

    def on_placement(self, document: Mapping[str, Any], now_ms: int) -> None:
        """A retained orch/placement/<service> document (node/orchestrator/state.py placement_of)."""
        service = document.get("service")
        replicas = document.get("replicas")
        if not isinstance(service, str) or not isinstance(replicas, Mapping):
            return
        placed = {str(r): (str(p.get("node")), _int(p.get("height")) or 0)
                  for r, p in replicas.items() if isinstance(p, Mapping)}
        before = self.placements.get(service, {})
        for replica, (node, height) in sorted(placed.items()):
            if before.get(replica, ("", -1))[0] != node:
                moved = f" (was on {before[replica][0]})" if replica in before else ""
                self.note(f"{service}:{replica} placed on {node} at height {height}{moved}", now_ms)
        for replica in sorted(before.keys() - placed.keys()):
            self.note(f"{service}:{replica} removed", now_ms)
        self.placements[service] = placed

    def on_record(self, height: int, index: int, proposer: str, body: Mapping[str, Any], now_ms: int) -> None:
        """One committed record: from an audit line (its "body") or from a certified block.

        Both carry the same record map (an audit line has its bytes in hex); the first copy counts
        and the other is ignored, so a lost audit line is made good by the block.
        """
        key = (height, index)
        state = body.get("state")
        if key in self.seen or not isinstance(state, str):
            return
        self.seen.add(key)
        who = self.names.get(proposer, proposer[:12])
        self.records[key] = RecordLine(height, index, state, who, describe_record(body))
        self.counts[state] += 1
        self.block_types.setdefault(height, Counter())[state] += 1
        while len(self.records) > _KEPT_RECORDS:
            del self.records[min(self.records)]
        while len(self.block_types) > _KEPT_RECORDS:
            del self.block_types[min(self.block_types)]
        self._follow_record(height, state, body, now_ms)

    def on_reading(self, device: str, value: Any, time_ms: int, now_ms: int) -> None:
        """A reading opened from dev/<device>/data; an actuator's report says what it now does."""
        self.readings[device] += 1
        actuator = self.actuators.get(device)
        if actuator is None:
            return
        shown = actuator_state(value)
        if shown == actuator.state:
            return
        actuator.state = shown
        actuator.since_ms = now_ms
        actuator.changes += 1
        # A contract on a noisy field can flip a light every second; one line per actuator per
        # ACTUATOR_NOTE_MS keeps the narration readable (the view and the ledger have every change).
        if actuator.noted_ms and now_ms - actuator.noted_ms < ACTUATOR_NOTE_MS:
            actuator.unnoted += 1
            return
        details = []
        if isinstance(value, Mapping) and _int(value.get("height")) is not None:
            details.append(f"commanded at height {value['height']}")
        if actuator.unnoted:
            details.append(f"{actuator.unnoted} quicker change{'s' if actuator.unnoted > 1 else ''} not shown")
        self.note(f"{device} {shown}" + (f" ({'; '.join(details)})" if details else ""), now_ms)
        actuator.noted_ms, actuator.unnoted = now_ms, 0

    # -- derived -----------------------------------------------------------------------------------

    def live_nodes(self, now_ms: int) -> list[NodeView]:
        return [n for n in self.nodes.values() if n.reported_ms and now_ms - n.reported_ms <= STALE_MS]

    def leader(self, now_ms: int) -> tuple[str | None, int | None]:
        """The leader every live node names (None while they disagree) and the highest term seen."""
        live = self.live_nodes(now_ms)
        named = {n.leader for n in live if n.leader}
        terms = [n.term for n in live if n.term is not None]
        return (named.pop() if len(named) == 1 else None), (max(terms) if terms else None)

    def _follow_leader(self, now_ms: int) -> None:
        leader, term = self.leader(now_ms)
        if leader is not None and (leader, term) != (self.agreed_leader, self.agreed_term):
            if leader != self.agreed_leader:
                self.note(f"leader {leader} (term {term})", now_ms)
            self.agreed_leader, self.agreed_term = leader, term

    def _follow_record(self, height: int, state: str, body: Mapping[str, Any], now_ms: int) -> None:
        identity = body.get("identity")
        if state in (ID_CREATE, ID_DELETE) and isinstance(identity, Mapping) and identity.get("kind") == "device":
            name = str(identity.get("object"))
            if state == ID_CREATE:
                self.devices_joined.add(name)
                self.devices_left.discard(name)
                self.note(f"{name} joined (PROV-ID-create at height {height})", now_ms)
            else:
                self.devices_left.add(name)
                self.note(f"{name} left (PROV-ID-delete at height {height})", now_ms)
            return
        orchestrate = body.get("orchestrate")
        if state == ORCH and isinstance(orchestrate, Mapping) and orchestrate.get("action") == "command":
            actuator = str(orchestrate.get("location"))
            reason = orchestrate.get("reason") if isinstance(orchestrate.get("reason"), Mapping) else {}
            assert isinstance(reason, Mapping)
            setting = setting_text(reason.get("setting"))
            # Not an event of its own: the actuator's report of carrying it out is (on_reading).
            view = self.actuators.setdefault(actuator, ActuatorView())
            view.commanded, view.commanded_height = setting, height


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def setting_text(setting: Any) -> str:
    if isinstance(setting, Mapping):
        return " ".join(f"{k}={_scalar(v)}" for k, v in sorted(setting.items()))
    return "?" if setting is None else _scalar(setting)


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str | int):
        return str(value)
    return json.dumps(value, sort_keys=True, default=str)[:40]


def actuator_state(value: Any) -> str:
    """What an actuator's report reading says it does now, in a word or two ("green", "open")."""
    if isinstance(value, Mapping):
        for key in _ACTUATOR_KEYS:
            if key in value:
                shown = value[key]
                if key == "open" and isinstance(shown, bool):
                    return "open" if shown else "closed"
                if isinstance(shown, bool):
                    return f"{key}" if shown else f"not {key}"
                return _scalar(shown)
        return " ".join(f"{k}={_scalar(v)}" for k, v in sorted(value.items())
                        if isinstance(v, str | int | float | bool))[:40] or "?"
    return _scalar(value)


def describe_record(body: Mapping[str, Any]) -> str:
    """One line for a record map (raw, or as an audit line's jsonable body)."""
    state = body.get("state")
    identity, prov, orchestrate = body.get("identity"), body.get("prov"), body.get("orchestrate")
    if state in (ID_CREATE, ID_DELETE) and isinstance(identity, Mapping):
        text = f"{identity.get('kind', '?')} {identity.get('object', '?')}"
        if identity.get("attributed_to"):
            text += f" on {identity['attributed_to']}"
        return text
    if state == DATA and isinstance(prov, Mapping):
        data = str(prov.get("data", "?"))
        data = data if len(data) <= 22 else data[:21] + "…"
        source = prov.get("source") or prov.get("origin", "?")
        derived = prov.get("derived_from")
        tail = f", from {len(derived)} inputs" if isinstance(derived, list) and derived else ""
        attrs = body.get("attrs")
        if isinstance(attrs, Mapping) and isinstance(attrs.get("device"), str):
            tail += f" of {attrs['device']}"  # an analyser result names the device its window is about
        return f"{data} by {source} → {prov.get('receiver', '?')}{tail}"
    if state == ORCH and isinstance(orchestrate, Mapping):
        action = orchestrate.get("action", "?")
        reason = orchestrate.get("reason") if isinstance(orchestrate.get("reason"), Mapping) else {}
        assert isinstance(reason, Mapping)
        if action == "command":
            rule = f" (rule {reason['rule']})" if reason.get("rule") else ""
            return f"command {orchestrate.get('location', '?')} {setting_text(reason.get('setting'))}{rule}"
        return f"{action} {orchestrate.get('deployed', '?')} on {orchestrate.get('location', '?')}"
    return "?"


# -- drawing ---------------------------------------------------------------------------------------

def _clock(ms: int) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ms / 1000))


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60:02d}:{seconds % 60:02d}"


def _counts_text(counts: Mapping[str, int]) -> str:
    ordered = [s for s in RECORD_STATES if counts.get(s)] + sorted(s for s in counts if s not in RECORD_STATES)
    return ", ".join(f"{s} {counts[s]}" for s in ordered) or "none yet"


def render(state: ViewState, width: int, now_ms: int, height: int | None = None) -> str:
    """The whole view as text: every line at most `width` characters and, given a `height`, at most
    that many lines (the lists at the bottom shrink first: blocks, then audit lines, then events)."""
    lines: list[str] = []
    elapsed = (now_ms - state.started_ms) / 1000 if state.started_ms else 0
    of = f" of {_duration(state.duration_s)}" if state.duration_s else ""
    lines.append(f"tomq demo · {state.scenario} · cluster {state.cluster} · {_duration(elapsed)}{of}")
    leader, term = state.leader(now_ms)
    head = f" (head {state.head_hash[:12]})" if state.head_hash else ""
    lines.append(f"leader {leader or '(none agreed)'} · term {term if term is not None else '-'} · "
                 f"ledger height {state.head_height if state.head_height >= 0 else '-'}{head}")
    lines.append("")
    lines.append("nodes")
    for name in sorted(state.nodes):
        node = state.nodes[name]
        if not node.reported_ms:
            lines.append(f"  {name:<6} no report yet")
            continue
        silent = (now_ms - node.reported_ms) / 1000
        if silent * 1000 > STALE_MS:
            lines.append(f"  {name:<6} silent for {silent:.0f} s (last seen as {node.role}, term {node.term})")
            continue
        load = f"load {node.load:.2f}" if node.load is not None else "load -"
        usage = (f" cpu {node.cpu:.2f} mem {node.memory:.2f}"
                 if node.cpu is not None and node.memory is not None else "")
        running = ", ".join(i.split("@")[0] for i in node.instances)
        lines.append(f"  {name:<6} {node.role:<10} term {node.term} height {node.height} {load}{usage}"
                     f" {node.runtime or ''}" + (f"  runs {running}" if running else ""))
    lines.append("services")
    if not state.placements:
        lines.append("  none placed yet")
    for service in sorted(state.placements):
        replicas = state.placements[service]
        placed = ", ".join(f"{service}:{r} on {n} (height {h})" for r, (n, h) in sorted(replicas.items()))
        lines.append(f"  {service:<12} {placed or 'removed'}")
    if state.actuators:
        lines.append("actuators")
        for name in sorted(state.actuators):
            actuator = state.actuators[name]
            reported = (f"{actuator.state} since {_clock(actuator.since_ms)}" if actuator.state
                        else "no report yet")
            changes = (f" · {actuator.changes} change{'s' if actuator.changes != 1 else ''}"
                       if actuator.changes else "")
            commanded = (f" · last command {actuator.commanded} at height {actuator.commanded_height}"
                         if actuator.commanded else "")
            lines.append(f"  {name:<12} {reported}{changes}{commanded}")
    lines.append(f"devices {len(state.devices_joined)} joined, {len(state.devices_left)} left · readings seen "
                 f"{sum(state.readings.values())}")
    lines.append(f"records {_counts_text(state.counts)}")

    blocks = [f"  {h:>6}  {sum(types.values()):>4} records  {_counts_text(types)}"
              for h, types in sorted(state.block_types.items(), reverse=True)[:BLOCK_LINES]]
    audit = [f"  {r.height:>6}.{r.index:<4} {r.state:<15} {r.text}  [{r.proposer}]"
             for r in (state.records[key] for key in sorted(state.records)[-AUDIT_LINES:])]
    events = [f"  {_clock(at)} {text}" for at, text in list(state.events)[-EVENT_LINES:]]
    if height is not None:
        room = max(0, height - len(lines) - 3)  # three headings
        events = events[len(events) - min(len(events), room):]
        room -= len(events)
        audit = audit[len(audit) - min(len(audit), room):]
        room -= len(audit)
        blocks = blocks[: max(0, room)]
    lines += ["latest blocks", *blocks, f"audit (last {len(audit)})", *audit, "events", *events]
    if height is not None:
        lines = lines[:height]
    return "\n".join(_fit(line, width) for line in lines)


def status_line(state: ViewState, now_ms: int) -> str:
    """One compact line for logs and transcripts (stdout not a terminal)."""
    elapsed = (now_ms - state.started_ms) / 1000 if state.started_ms else 0
    leader, term = state.leader(now_ms)
    live = len(state.live_nodes(now_ms))
    actuators = " ".join(f"{n}={a.state or '?'}" for n, a in sorted(state.actuators.items()))
    return (f"[{_duration(elapsed)}] leader {leader or '-'} term {term if term is not None else '-'} · "
            f"{live}/{len(state.nodes)} nodes · height {state.head_height} · {_counts_text(state.counts)}"
            + (f" · {actuators}" if actuators else ""))


def _fit(line: str, width: int) -> str:
    return line if len(line) <= width else line[: max(1, width - 1)] + "…"


# -- the MQTT side -----------------------------------------------------------------------------------

class ClusterWatcher:
    """Feeds a ViewState from the cluster's topics; `locked` runs a function on it under the lock."""

    def __init__(self, directory: str | Path, state: ViewState, as_name: str | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.directory = Path(directory)
        self.state = state
        self.clock = clock
        self._lock = threading.Lock()
        self._loaded = cluster.load(self.directory)
        self.state.names.update({m.id: m.name for m in self._loaded.members})
        self._names_at = time.monotonic()
        self._load_opener = EnvelopeOpener(self._loaded.trust_store(), accepted_types=frozenset({"load"}))
        self._reading_openers: dict[str, EnvelopeOpener] = {}
        name = as_name or next(m.name for m in self._loaded.members if m.role == "node")
        # Until operators are broker users the operator tools connect as a node (broker/policy.py).
        self.link = MqttLink(host=self._loaded.broker_host, port=self._loaded.broker_port, username=name,
                             password=cluster.broker_password(self._loaded.signing_key(name)),
                             on_message=self._on_message)
        root = self._loaded.topics.root
        for topic_filter, qos in ((f"{root}/node/+/load", 0), (f"{root}/ledger/head", 1),
                                  (f"{root}/ledger/block/+", 1), (f"{root}/audit/#", 0),
                                  (f"{root}/orch/placement/+", 1), (f"{root}/dev/+/data", 0)):
            self.link.subscribe(topic_filter, qos)

    def start(self, timeout: float = 10.0) -> None:
        self.link.start(timeout)

    def stop(self) -> None:
        self.link.stop()

    def locked(self, function: Callable[[ViewState], T]) -> T:
        with self._lock:
            return function(self.state)

    def note(self, text: str) -> None:
        with self._lock:
            self.state.note(text, int(self.clock() * 1000))

    def _on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        if not payload:
            return
        try:
            self._handle(topic, payload)
        except (TomqError, ValueError, KeyError, TypeError, IndexError) as exc:
            log.debug("view dropped a message on %s: %s", topic, exc)

    def _handle(self, topic: str, payload: bytes) -> None:
        try:
            parsed = parse(topic)
        except InvalidTopic:
            return
        now = self.clock()
        now_ms = int(now * 1000)
        if parsed.kind == "node-load":
            envelope = self._load_opener.open(payload, now)
            certificate = self._load_opener.trust.by_id(envelope.sender)
            if certificate is None or certificate.name != parsed.params["node"] or not isinstance(envelope.body, dict):
                return
            with self._lock:
                self.state.on_load(parsed.params["node"], envelope.body, now_ms)
        elif parsed.kind == "ledger-head":
            head = canonical.decode(payload, check_canonical=False)
            with self._lock:
                self.state.on_head(int(head["height"]), bytes(head["hash"]), now_ms)
        elif parsed.kind == "ledger-block":
            block = decode_block_file(payload).block
            decoded = []
            for index, envelope_bytes in enumerate(block.records):
                fields = canonical.decode(canonical.decode(envelope_bytes)[0], check_canonical=False)
                decoded.append((index, str(fields["from"]), fields["body"]))
            self._names_for(sender for _, sender, _ in decoded)
            with self._lock:
                for index, sender, body in decoded:
                    if isinstance(body, dict):
                        self.state.on_record(block.height, index, sender, body, now_ms)
        elif parsed.kind == "audit":
            line = json.loads(payload)
            self._names_for([str(line["proposer"])])
            with self._lock:
                self.state.on_record(int(line["height"]), int(line["index"]), str(line["proposer"]),
                                     line["body"], now_ms)
        elif parsed.kind == "orch-placement":
            document = json.loads(payload)
            if isinstance(document, dict):
                with self._lock:
                    self.state.on_placement(document, now_ms)
        elif parsed.kind == "device-data":
            device = parsed.params["device"]
            opener = self._reading_openers.get(device)
            if opener is None:
                opener = self._reading_openers[device] = EnvelopeOpener(self._loaded.trust_store(),
                                                                        accepted_types=READING_TYPES)
            reading = open_reading(opener, payload, device=device, now=now)
            with self._lock:
                self.state.on_reading(device, reading.value, reading.time_ms, now_ms)

    def _names_for(self, senders: Iterable[str]) -> None:
        """Members enrolled after we started (services, on deploy) are shown by name, too."""
        with self._lock:
            unknown = any(s not in self.state.names for s in senders)
        if unknown and time.monotonic() - self._names_at > 1.0:
            self._names_at = time.monotonic()
            loaded = cluster.load(self.directory)
            with self._lock:
                self.state.names.update({m.id: m.name for m in loaded.members})
