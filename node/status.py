"""`tomq status`: the cluster as its nodes last reported it (retained, signed load reports)."""

from __future__ import annotations

import argparse
import json
import threading
import time
from typing import Any

from tomq import cluster
from tomq.errors import EnvelopeRejected
from tomq.mqtt import MqttLink
from tomq.wire import EnvelopeOpener


def collect(cluster_dir: str, as_name: str | None = None, wait: float = 1.5) -> dict[str, Any]:
    loaded = cluster.load(cluster_dir)
    nodes = [m.name for m in loaded.members if m.role == "node"]
    name = as_name or nodes[0]
    key = loaded.signing_key(name)
    opener = EnvelopeOpener(loaded.trust_store(), accepted_types=frozenset({"load"}))
    reports: dict[str, dict[str, Any]] = {}
    lock = threading.Lock()
    done = threading.Event()

    def on_message(topic: str, payload: bytes, retained: bool) -> None:
        node = topic.split("/")[-2]
        try:
            envelope = opener.open(payload, time.time())
        except EnvelopeRejected:
            return
        certificate = loaded.trust_store().by_id(envelope.sender)
        if certificate is None or certificate.name != node:
            return
        with lock:
            reports[node] = envelope.body if isinstance(envelope.body, dict) else {}
            if set(nodes) <= reports.keys():
                done.set()

    link = MqttLink(host=loaded.broker_host, port=loaded.broker_port, username=name,
                    password=cluster.broker_password(key), on_message=on_message)
    link.subscribe(f"{loaded.topics.root}/node/+/load")
    link.start(timeout=10)
    try:
        done.wait(wait)
    finally:
        link.stop()
    now_ms = int(time.time() * 1000)
    rows: dict[str, dict[str, Any]] = {}
    for node in nodes:
        report = reports.get(node)
        if report is None:
            rows[node] = {"reported": False}
            continue
        status = report.get("status", {})
        rows[node] = {"reported": True, "last_contact_s": round((now_ms - report.get("time_ms", 0)) / 1000, 1),
                      "load": report.get("load"), **status,
                      **{key: report[key] for key in ("cpu", "memory", "labels", "runtime", "limits", "instances")
                         if key in report}}
    live = [r for r in rows.values() if r.get("reported") and r.get("last_contact_s", 99) < 10]
    leaders = {str(r["leader"]) for r in live if r.get("leader")}
    terms = [r.get("term", 0) for r in live]
    # Placements as the most advanced node knows them (every node folds the same committed records).
    newest = max(live, key=lambda r: r.get("height", -1), default={})
    orchestration = newest.get("orchestration", {}) if isinstance(newest, dict) else {}
    return {"cluster": loaded.name, "leader": sorted(leaders)[0] if len(leaders) == 1 else None,
            "term": max(terms) if terms else None, "height": max((r.get("height", -1) for r in live), default=-1),
            "nodes": rows, "services": orchestration.get("services", {}),
            "placements": orchestration.get("placements", [])}


def print_status(view: dict[str, Any]) -> None:
    print(f"cluster {view['cluster']}: leader {view['leader'] or '(none agreed)'}, term {view['term']}, "
          f"ledger height {view['height']}")
    for node, row in view["nodes"].items():
        if not row.get("reported"):
            print(f"  {node:<10} no report")
            continue
        print(f"  {node:<10} {row.get('role', '?'):<13} term {row.get('term')} commit {row.get('commit')} "
              f"applied {row.get('applied')} load {row.get('load', 0):.2f} last contact {row.get('last_contact_s')} s"
              + (f" commit p50 {row['commit_p50_ms']} ms" if row.get("commit_p50_ms") is not None else "")
              + (f" cpu {row['cpu']:.2f} mem {row['memory']:.2f}" if isinstance(row.get("cpu"), float) else "")
              + (f" runtime {row['runtime']}" if row.get("runtime") else "")
              + (f" (limits: {row['limits']})" if row.get("runtime") and row.get("limits") else ""))
    for placement in view.get("placements", []):
        print(f"  {placement['service']}:{placement['replica']:<4} on {placement['node']} "
              f"(decided at height {placement['height']})")


def register(commands: Any) -> None:
    status = commands.add_parser("status", help="leader, term, nodes and loads, ledger height (from the nodes' reports)")
    status.add_argument("dir", metavar="DIR")
    status.add_argument("--json", action="store_true")
    status.add_argument("--as", dest="as_name", help="member whose credentials to use (default: the first node)")
    status.add_argument("--wait", type=float, default=1.5, help="seconds to wait for every node's report")
    status.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    view = collect(args.dir, args.as_name, args.wait)
    if args.json:
        print(json.dumps(view, indent=2, sort_keys=True))
    else:
        print_status(view)
    return 0 if view["leader"] else 1
