"""The questions an auditor asks of a ledger (`tomq ledger query PATH ...`), answered from its records alone.

    lineage RESULT     a result (or any datum, or a command) back to the readings and the devices it came
                       from: each datum's record, who generated it, who recorded it, what it was derived
                       from; for a device, its join; for a service, the containers that ran it then
    device NAME        everything a member did between two times: joins and leaves, the data it was
                       the source of, the commands it received, the containers and placements on it
    placements         every placement (and removal) decision with the loads it was based on, and
                       whether the node chosen is the one the recorded rule picks from those loads
    commands ACTUATOR  every command recorded for an actuator: its setting, the contract (rule) that
                       issued it with the rule's text from the deployment on the ledger, and the record
                       that fired it

Each answer is plain data (`dict`s and lists of JSON types) for `--json`, and `render_*` turns it into
text for a person. `LedgerIndex` holds every record once; answers never read a clock or the disk.

What this module must never do: answer from anything but the records it was given, or guess: a
datum or record that is not on the ledger (or not in the range read) is reported as missing.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from tomq import canonical
from tomq.errors import UsageError
from tomq.node.ledger.bundle import LedgerEntry
from tomq.node.ledger.export import iso_time
from tomq.node.ledger.pattern import OPERATOR, event_object
from tomq.records import ID_CREATE, ID_DELETE, ORCH, Identity, Orchestrate, Provenance

_RECORD_ID = re.compile(r"[0-9a-f]{8,32}")
_POSITION = re.compile(r"([0-9]+)/([0-9]+)")
MAX_LINEAGE_NODES = 100_000


class QueryError(UsageError):
    """The question cannot be answered as asked (no such record, an ambiguous name)."""


class LedgerIndex:
    """Every record of a ledger, indexed by what the questions look up."""

    def __init__(self, entries: Iterable[LedgerEntry], *, verified: bool) -> None:
        self.verified = verified
        self.entries: list[LedgerEntry] = list(entries)
        self.by_record: dict[str, LedgerEntry] = {}
        self.data: dict[str, LedgerEntry] = {}  # data id -> its PROV-DATA record
        self.identities: dict[str, list[LedgerEntry]] = defaultdict(list)  # name -> its ID records, in order
        self.containers: dict[str, list[LedgerEntry]] = defaultdict(list)  # service -> its containers' ID records
        for entry in self.entries:
            self.by_record[entry.record_id] = entry
            structure = entry.record.structure
            if isinstance(structure, Provenance):
                self.data.setdefault(structure.data, entry)
            elif isinstance(structure, Identity):
                self.identities[structure.object].append(entry)
                if structure.kind == "container":
                    self.containers[structure.object.split(":", 1)[0]].append(entry)

    def find(self, text: str) -> list[LedgerEntry]:
        """Records named by `text`: a record id (or a prefix of 8+ hex digits), HEIGHT/INDEX, a data id (its
        PROV-DATA record), or the name of what records are about (a member, a replica, a command id)."""
        text = text.strip()
        position = _POSITION.fullmatch(text)
        if position is not None:
            height, index = int(position.group(1)), int(position.group(2))
            return [e for e in self.entries if e.height == height and e.index == index]
        if text in self.by_record:
            return [self.by_record[text]]
        if _RECORD_ID.fullmatch(text):
            found = [e for e in self.entries if e.record_id.startswith(text)]
            if found:
                return found
        if text in self.data:
            return [self.data[text]]  # a data id names its own PROV-DATA record (not later records using it)
        return [e for e in self.entries if event_object(e.record) == text]

    def one(self, text: str, what: str = "record") -> LedgerEntry:
        found = self.find(text)
        if not found:
            raise QueryError(f"no {what} {text!r} on this ledger (give a record id, HEIGHT/INDEX or a name)")
        if len(found) > 1:
            listed = "; ".join(f"{e.record_id} at {e.where} ({e.record.state})" for e in found[:8])
            raise QueryError(f"{text!r} names {len(found)} records: {listed}; give one record id")
        return found[0]

    def identity_at(self, name: str, height: int) -> dict[str, Any] | None:
        """The join of `name` in force at `height` (else its first join) and the leave that ended it, if any."""
        entries = self.identities.get(name, [])
        creates = [e for e in entries if e.record.state == ID_CREATE]
        if not creates:
            return None
        before = [e for e in creates if e.height <= height]
        joined = before[-1] if before else creates[0]
        left = next((e for e in entries if e.record.state == ID_DELETE
                     and (e.height, e.index) > (joined.height, joined.index)), None)
        identity = joined.record.structure
        assert isinstance(identity, Identity)
        return {"name": name, "kind": identity.kind, "joined": joined.where, "joined_record": joined.record_id,
                "joined_time": iso_time(joined.record.time_ms), "proposed_by": joined.sender,
                "left": left.where if left is not None else None}

    def containers_at(self, service: str, height: int) -> list[dict[str, Any]]:
        """Containers of `service` that had joined and not left at `height`."""
        alive: dict[str, LedgerEntry] = {}
        for entry in self.containers.get(service, ()):
            if entry.height > height:
                break
            name = event_object(entry.record)
            if entry.record.state == ID_CREATE:
                alive[name] = entry
            else:
                alive.pop(name, None)
        out = []
        for name, entry in sorted(alive.items()):
            identity = entry.record.structure
            assert isinstance(identity, Identity)
            out.append({"container": name, "node": identity.attributed_to, "joined": entry.where})
        return out


def _base(entry: LedgerEntry) -> dict[str, Any]:
    return {"height": entry.height, "index": entry.index, "record": entry.record_id,
            "block": entry.block_hash.hex(), "time": iso_time(entry.record.time_ms), "time_ms": entry.record.time_ms,
            "proposer": "operator" if entry.sender == OPERATOR else entry.sender}


def _kind_of(provenance: Provenance) -> str:
    if provenance.origin.startswith("sample:"):
        return "reading"
    if provenance.origin.startswith("analyse:"):
        return "result"
    return "data"


# --- lineage ---------------------------------------------------------------------------------------


def lineage(index: LedgerIndex, target: str) -> dict[str, Any]:
    """The derivation tree of a datum (by data id or record id), or of a command (through its trigger)."""
    root_command: dict[str, Any] | None = None
    entry = index.data.get(target)
    if entry is None:
        entry = index.one(target, "datum")
        structure = entry.record.structure
        if isinstance(structure, Orchestrate) and structure.action == "command":
            trigger = structure.reason.get("trigger")
            trigger_entry = index.by_record.get(trigger) if isinstance(trigger, str) else None
            root_command = {**_base(entry), "command": structure.deployed, "actuator": structure.location,
                            "rule": structure.reason.get("rule"), "setting": structure.reason.get("setting")}
            if trigger_entry is None or not isinstance(trigger_entry.record.structure, Provenance):
                return {"command": root_command, "lineage": None, "readings": [], "devices": [], "results": [],
                        "missing": [str(trigger)], "verified": index.verified}
            entry = trigger_entry
        elif not isinstance(structure, Provenance):
            raise QueryError(f"{target!r} is a {entry.record.state} record, not a datum or a command")
    provenance = entry.record.structure
    assert isinstance(provenance, Provenance)
    expanded: set[str] = set()
    readings: set[str] = set()
    devices: set[str] = set()
    results: set[str] = set()
    missing: set[str] = set()

    def node(data: str, height: int, depth: int) -> dict[str, Any]:
        found = index.data.get(data)
        if found is None:
            missing.add(data)
            return {"data": data, "missing": True}
        if data in expanded:
            return {"data": data, "see_above": True}
        if len(expanded) >= MAX_LINEAGE_NODES:
            raise QueryError(f"the lineage of {target} has more than {MAX_LINEAGE_NODES} data; ask about a part of it")
        expanded.add(data)
        structure = found.record.structure
        assert isinstance(structure, Provenance)
        kind = _kind_of(structure)
        out: dict[str, Any] = {"data": data, "kind": kind, **_base(found), "sha256": structure.data_hash.hex(),
                               "origin": structure.origin, "receiver": structure.receiver, "source": structure.source}
        if structure.on_behalf_of is not None:
            out["on_behalf_of"] = structure.on_behalf_of
        if kind == "reading":
            readings.add(data)
        elif kind == "result":
            results.add(data)
        if structure.source is not None:
            member = index.identity_at(structure.source, found.height)
            out["source_identity"] = member
            if member is not None and member["kind"] == "device":
                devices.add(structure.source)
            elif member is not None and member["kind"] == "service":
                out["ran_on"] = index.containers_at(structure.source, found.height)
        out["derived_from"] = [node(parent, found.height, depth + 1) for parent in structure.derived_from]
        return out

    tree = node(provenance.data, entry.height, 0)
    answer: dict[str, Any] = {"lineage": tree, "readings": sorted(readings), "devices": sorted(devices),
                              "results": sorted(results), "missing": sorted(missing), "verified": index.verified}
    if root_command is not None:
        answer = {"command": root_command, **answer}
    return answer


def render_lineage(answer: dict[str, Any]) -> str:
    lines: list[str] = []
    command = answer.get("command")
    if command is not None:
        lines.append(f"command {command['command']} to {command['actuator']} (setting {_json(command['setting'])}, "
                     f"rule {command['rule']}), recorded at {command['height']}/{command['index']} "
                     f"{command['time']} by {command['proposer']}; fired by:")

    def walk(node: dict[str, Any], depth: int) -> None:
        pad = "  " * depth
        if node.get("missing"):
            lines.append(f"{pad}{node['data']}  NOT ON THIS LEDGER (or outside the range read)")
            return
        if node.get("see_above"):
            lines.append(f"{pad}{node['data']}  (see above)")
            return
        source = node.get("source")
        member = node.get("source_identity")
        by = ""
        if source is not None:
            joined = f", joined {member['joined']}" if member else ", never joined"
            by = f" from {member['kind'] if member else 'member'} {source}{joined}"
        lines.append(f"{pad}{node['kind']} {node['data']}{by}; {node['origin']} -> {node['receiver']}; "
                     f"record {node['record']} at {node['height']}/{node['index']} {node['time']}, "
                     f"recorded by {node['proposer']}")
        for container in node.get("ran_on", ()):
            lines.append(f"{pad}  ran on {container['node']} as {container['container']} (since {container['joined']})")
        for child in node["derived_from"]:
            walk(child, depth + 1)

    if answer["lineage"] is not None:
        walk(answer["lineage"], 1 if command is not None else 0)
    lines.append(f"{len(answer['readings'])} reading(s) from {len(answer['devices'])} device(s) "
                 f"({', '.join(answer['devices']) or '-'}), {len(answer['results'])} result(s)"
                 + (f"; missing: {', '.join(answer['missing'])}" if answer["missing"] else ""))
    return "\n".join(lines)


# --- device ----------------------------------------------------------------------------------------


def device_activity(index: LedgerIndex, name: str, since_ms: int | None = None,
                    until_ms: int | None = None) -> dict[str, Any]:
    """Every record about member `name` whose time is within [since, until] (both optional, inclusive)."""
    if name not in index.identities:
        raise QueryError(f"{name!r} never joined this ledger (no PROV-ID record names it)")
    events: list[dict[str, Any]] = []
    for entry in index.entries:
        time_ms = entry.record.time_ms
        if (since_ms is not None and time_ms < since_ms) or (until_ms is not None and time_ms > until_ms):
            continue
        event = _device_event(entry, name)
        if event is not None:
            events.append({**_base(entry), **event})
    kinds: dict[str, int] = defaultdict(int)
    for event in events:
        kinds[event["event"]] += 1
    return {"member": name, "since": iso_time(since_ms) if since_ms is not None else None,
            "until": iso_time(until_ms) if until_ms is not None else None, "events": events,
            "counts": dict(sorted(kinds.items())), "verified": index.verified}


def _device_event(entry: LedgerEntry, name: str) -> dict[str, Any] | None:
    structure = entry.record.structure
    if isinstance(structure, Identity):
        joined = entry.record.state == ID_CREATE
        if structure.object == name:
            return {"event": "joined" if joined else "left", "as": structure.kind,
                    "attributes": _plain(entry.record.attributes)}
        if structure.attributed_to == name:
            return {"event": "container started" if joined else "container stopped", "container": structure.object}
        return None
    if isinstance(structure, Provenance):
        if structure.source == name:
            return {"event": "data", "data": structure.data, "kind": _kind_of(structure),
                    "receiver": structure.receiver, "sha256": structure.data_hash.hex()}
        if structure.on_behalf_of == name:
            return {"event": "data relayed", "data": structure.data, "source": structure.source}
        return None
    if structure.location == name:
        if structure.action == "command":
            return {"event": "command", "command": structure.deployed, "setting": _plain(structure.reason.get("setting")),
                    "rule": structure.reason.get("rule")}
        return {"event": structure.action, "deployed": structure.deployed}
    return None


def render_device(answer: dict[str, Any]) -> str:
    window = f" from {answer['since'] or 'the start'} to {answer['until'] or 'the head'}"
    lines = [f"{answer['member']}{window}: {len(answer['events'])} record(s)"
             + (f" ({', '.join(f'{k} {v}' for k, v in answer['counts'].items())})" if answer["counts"] else "")]
    for event in answer["events"]:
        detail = {k: v for k, v in event.items() if k not in _BASE_KEYS and k != "event" and v not in (None, {}, [])}
        text = ", ".join(f"{k} {_json(v) if not isinstance(v, str) else v}" for k, v in detail.items())
        lines.append(f"  {event['time']}  {event['height']}/{event['index']}  {event['event']:<17} {text}")
    return "\n".join(lines)


_BASE_KEYS = frozenset({"height", "index", "record", "block", "time", "time_ms", "proposer"})


# --- placements --------------------------------------------------------------------------------------


def placements(index: LedgerIndex, service: str | None = None) -> dict[str, Any]:
    """Every place and remove decision (of `service`), with the loads it recorded and a check of the rule."""
    decisions = []
    for entry in index.entries:
        structure = entry.record.structure
        if entry.record.state != ORCH or not isinstance(structure, Orchestrate) \
                or structure.action not in ("place", "remove"):
            continue
        replica = structure.deployed
        if service is not None and replica.rsplit(":", 1)[0] != service:
            continue
        reason = structure.reason
        decision: dict[str, Any] = {**_base(entry), "action": structure.action, "replica": replica,
                                    "node": structure.location}
        for key in ("loads", "eligible", "excluded", "requests", "rule", "replaces", "why"):
            if key in reason:
                decision[key] = _plain(reason[key])
        if structure.action == "place":
            decision["least_loaded"] = _least_loaded(reason)
            decision["chosen_is_least_loaded"] = (decision["least_loaded"] == structure.location
                                                  if decision["least_loaded"] is not None else None)
        decisions.append(decision)
    return {"service": service, "decisions": decisions, "verified": index.verified}


def _least_loaded(reason: dict[str, Any]) -> str | None:
    """The eligible node with the lowest recorded score, ties by name (placement.RULE), or None if unknown."""
    loads, eligible = reason.get("loads"), reason.get("eligible")
    if not isinstance(loads, dict) or not isinstance(eligible, list) or not eligible:
        return None
    scored = []
    for node in eligible:
        score = loads.get(node, {}).get("score") if isinstance(loads.get(node), dict) else None
        if isinstance(score, bool) or not isinstance(score, int | float):
            return None
        scored.append((float(score), str(node)))
    return min(scored)[1]


def render_placements(answer: dict[str, Any]) -> str:
    decisions = answer["decisions"]
    what = f"service {answer['service']}" if answer["service"] else "all services"
    lines = [f"{len(decisions)} placement decision(s) for {what}"]
    for d in decisions:
        head = f"  {d['time']}  {d['height']}/{d['index']}  {d['action']} {d['replica']} on {d['node']} (by {d['proposer']})"
        if d.get("replaces"):
            head += f", replacing {d['replaces'].get('node')}: {d['replaces'].get('why')}"
        if d.get("why"):
            head += f": {d['why']}"
        lines.append(head)
        loads = d.get("loads")
        if isinstance(loads, dict):
            for node, load in sorted(loads.items()):
                marks = []
                if node == d["node"]:
                    marks.append("chosen")
                if node in d.get("excluded", {}):
                    marks.append(f"excluded: {d['excluded'][node]}")
                elif node not in d.get("eligible", [node]):
                    marks.append("not eligible")
                lines.append(f"      {node:<10} cpu {_number(load.get('cpu'))}  memory {_number(load.get('memory'))}  "
                             f"score {_number(load.get('score'))}  {'; '.join(marks)}".rstrip())
        if d["action"] == "place":
            verdict = d.get("chosen_is_least_loaded")
            lines.append("      rule check: " + ("the least-loaded eligible node was chosen" if verdict else
                                                 f"NOT the least-loaded eligible node ({d['least_loaded']})" if verdict is False
                                                 else "the loads recorded do not say"))
    return "\n".join(lines)


# --- commands ----------------------------------------------------------------------------------------


def commands(index: LedgerIndex, actuator: str) -> dict[str, Any]:
    """Every command recorded for `actuator`, the rule that issued it and the record that fired it."""
    found = []
    for entry in index.entries:
        structure = entry.record.structure
        if not isinstance(structure, Orchestrate) or structure.action != "command" or structure.location != actuator:
            continue
        reason = structure.reason
        trigger = reason.get("trigger")
        item: dict[str, Any] = {**_base(entry), "command": structure.deployed, "setting": _plain(reason.get("setting")),
                                "rule": reason.get("rule"), "trigger": trigger,
                                "trigger_height": reason.get("trigger_height")}
        trigger_entry = index.by_record.get(trigger) if isinstance(trigger, str) else None
        if trigger_entry is not None:
            fired = trigger_entry.record.structure
            item["fired_by"] = {"record": trigger_entry.record_id, "where": trigger_entry.where,
                                "state": trigger_entry.record.state, "object": event_object(trigger_entry.record),
                                "time": iso_time(trigger_entry.record.time_ms)}
            if isinstance(fired, Provenance):
                item["fired_by"]["summary"] = _plain(trigger_entry.record.attributes.get("summary"))
                service = fired.origin.split(":", 1)[1] if fired.origin.startswith("analyse:") else None
                if service is not None and isinstance(item["rule"], str):
                    item["contract"] = _contract(index, service, item["rule"], entry.height)
        else:
            item["fired_by"] = None
        found.append(item)
    if not found and actuator not in index.identities:
        raise QueryError(f"{actuator!r} never joined this ledger and no command names it")
    return {"actuator": actuator, "commands": found, "verified": index.verified}


def _contract(index: LedgerIndex, service: str, rule: str, height: int) -> dict[str, Any] | None:
    """The contract `rule` as declared in the deployment of `service` in force at `height`, if recorded."""
    deployment = None
    for entry in index.identities.get(service, ()):
        if entry.height > height:
            break
        if entry.record.state == ID_CREATE:
            deployment = entry
    if deployment is None:
        return None
    request = deployment.record.attributes.get("request")
    try:
        outer = canonical.decode(request) if isinstance(request, bytes) else None
        fields = canonical.decode(outer[0]) if isinstance(outer, list) and outer and isinstance(outer[0], bytes) else None
    except canonical.CanonicalDecodeError:
        fields = None
    spec = fields.get("body", {}).get("spec") if isinstance(fields, dict) and isinstance(fields.get("body"), dict) else None
    for contract in spec.get("contracts", []) if isinstance(spec, dict) else []:
        if isinstance(contract, dict) and contract.get("name") == rule:
            return {"service": service, "deployed": deployment.where, "definition": _plain(contract)}
    return None


def render_commands(answer: dict[str, Any]) -> str:
    items = answer["commands"]
    lines = [f"{len(items)} command(s) recorded for {answer['actuator']}"]
    for item in items:
        lines.append(f"  {item['time']}  {item['height']}/{item['index']}  {item['command']}: set "
                     f"{_json(item['setting'])} by rule {item['rule']} (proposed by {item['proposer']})")
        fired = item.get("fired_by")
        if fired is None:
            lines.append(f"      fired by record {item['trigger']}: NOT ON THIS LEDGER (or outside the range read)")
        else:
            summary = f", summary {_json(fired['summary'])}" if fired.get("summary") is not None else ""
            lines.append(f"      fired by {fired['state']} {fired['object']} at {fired['where']} {fired['time']}{summary}")
        contract = item.get("contract")
        if contract is not None:
            lines.append(f"      rule as deployed with {contract['service']} at {contract['deployed']}: "
                         f"{_json(contract['definition'])}")
    return "\n".join(lines)


# --- helpers -----------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """A record value as JSON-able data: bytes as hex (a long one as its SHA-256)."""
    if isinstance(value, bytes):
        if len(value) > 64:
            return "sha256:" + hashlib.sha256(value).hexdigest()
        return value.hex()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(", ", ": "))


def _number(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, int | float) and not isinstance(value, bool) else "?"


def parse_time(text: str) -> int:
    """Unix milliseconds from ISO 8601 (UTC unless it names a zone) or a number of unix seconds."""
    text = text.strip()
    try:
        return round(float(text) * 1000)
    except ValueError:
        pass
    try:
        moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise QueryError(f"time {text!r} is neither ISO 8601 (2027-01-15T08:00:00Z) nor unix seconds") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return round(moment.timestamp() * 1000)
