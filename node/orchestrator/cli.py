"""`tomq deploy DIR SPEC.toml` and `tomq remove DIR SERVICE`: the operator's signed requests.

Both run where the operator key is (the cluster directory). A spec is checked completely before
anything is sent, so a typo is named in one line and the cluster never sees it. `deploy` enrols the
service's identity on first use (its key and certificate go into DIR/members/<service>/, like
`tomq device add`); with --wait both commands wait until the retained placement shows the result.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path
from typing import Any

from tomq import cluster
from tomq.errors import ConfigError, TomqError, UsageError
from tomq.identity import SigningKey
from tomq.mqtt import MqttLink
from tomq.node.orchestrator.requests import seal_deploy, seal_move, seal_remove
from tomq.node.orchestrator.spec import load_spec
from tomq.wire import SequenceCounter

RESEND_SECONDS = 2.0


def register(commands: Any) -> None:
    deploy = commands.add_parser("deploy", help="deploy (or update) a service from a TOML spec")
    deploy.add_argument("dir", metavar="DIR")
    deploy.add_argument("spec", metavar="SPEC.toml", type=Path)
    deploy.add_argument("--wait", type=float, default=30.0,
                        help="seconds to wait for every replica to be placed (0: do not wait)")
    deploy.set_defaults(run=_run_deploy)

    remove = commands.add_parser("remove", help="remove a deployed service")
    remove.add_argument("dir", metavar="DIR")
    remove.add_argument("service")
    remove.add_argument("--wait", type=float, default=30.0, help="seconds to wait until no replica is placed")
    remove.set_defaults(run=_run_remove)

    move = commands.add_parser("move", help="place one replica again, away from its node (or onto --to NODE)")
    move.add_argument("dir", metavar="DIR")
    move.add_argument("replica", metavar="SERVICE:REPLICA", help="e.g. collector:0")
    move.add_argument("--to", default="", help="the node to move it to (default: placement chooses another)")
    move.add_argument("--wait", type=float, default=30.0, help="seconds to wait until it is placed elsewhere")
    move.set_defaults(run=_run_move)


def _operator(directory: Path) -> tuple[SigningKey, SequenceCounter]:
    key_path = directory / "operator" / "operator.key"
    if not key_path.exists():
        raise ConfigError(f"{key_path} is missing: deploy and remove are signed by the operator key")
    return SigningKey.load(key_path), SequenceCounter(directory / "operator" / "sequence")


class _PlacementWatch:
    """Follows the retained orch/placement/<service> document."""

    def __init__(self, loaded: cluster.Cluster, service: str) -> None:
        self.document: dict[str, Any] | None = None
        self.changed = threading.Condition()
        node = next(m.name for m in loaded.members if m.role == "node")
        # Until operators are broker users the operator tool connects as a node (broker/policy.py).
        self.link = MqttLink(host=loaded.broker_host, port=loaded.broker_port, username=node,
                             password=cluster.broker_password(loaded.signing_key(node)), on_message=self._on_message)
        self.link.subscribe(loaded.topics.orch_placement(service), qos=1)
        self.link.start()

    def _on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        try:
            document = json.loads(payload) if payload else None
        except ValueError:
            return
        with self.changed:
            self.document = document
            self.changed.notify_all()

    def wait(self, done: Any, timeout: float, resend: Any = None) -> dict[str, Any] | None:
        """Wait until `done(document)`; call `resend()` every 2 s meanwhile.

        A request published while a node was (re)starting never reaches it: MQTT keeps no copy of a
        message for a subscriber that is not there yet. Sending the same signed bytes again is safe:
        a node that has them refuses the copy as a replay, and the leader acts once per request.
        """
        deadline = time.monotonic() + timeout
        next_send = time.monotonic() + RESEND_SECONDS
        with self.changed:
            while not done(self.document):
                now = time.monotonic()
                if now >= deadline:
                    return None
                if resend is not None and now >= next_send:
                    resend()
                    next_send = now + RESEND_SECONDS
                self.changed.wait(min(deadline, next_send) - now)
            return self.document


def _run_deploy(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)  # every field checked before anything is sent
    directory = Path(args.dir)
    operator, counter = _operator(directory)
    loaded = cluster.load(directory)
    if not any(m.name == spec.name for m in loaded.members):
        cluster.add_member(directory, spec.name, "service")
        print(f"enrolled service identity {spec.name} (a mosquitto broker needs a reload: kill -HUP)")
        loaded = cluster.load(directory)
    elif loaded.member(spec.name).role != "service":
        raise ConfigError(f"{spec.name} is a {loaded.member(spec.name).role} in {directory}, not a service")
    certificate = (directory / "members" / spec.name / "cert.cbor").read_bytes()
    watch = _PlacementWatch(loaded, spec.name)
    try:
        time.sleep(0.2)  # the retained document of an earlier deployment arrives first
        before = watch.document
        request = seal_deploy(operator, counter, spec, certificate)
        watch.link.publish(loaded.topics.orch_request(), request, qos=1)
        print(f"deploy {spec.name}: {spec.replicas} replica(s) requested")
        if args.wait <= 0:
            return 0

        def placed(document: dict[str, Any] | None) -> bool:
            return (document is not None and document is not before
                    and len(document.get("replicas", {})) == spec.replicas)

        document = watch.wait(placed, args.wait,
                              lambda: watch.link.publish(loaded.topics.orch_request(), request, qos=1))
    finally:
        watch.link.stop()
    if document is None:
        raise TomqError(f"deploy {spec.name}: not every replica was placed within {args.wait:.0f} s "
                        f"(see `tomq status {directory} --json`)")
    for replica, where in sorted(document["replicas"].items(), key=lambda item: int(item[0])):
        print(f"  {spec.name}:{replica} on {where['node']} (decided at ledger height {where['height']})")
    return 0


def _run_remove(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    operator, counter = _operator(directory)
    loaded = cluster.load(directory)
    watch = _PlacementWatch(loaded, args.service)
    try:
        request = seal_remove(operator, counter, args.service)
        watch.link.publish(loaded.topics.orch_request(), request, qos=1)
        print(f"remove {args.service}: requested")
        if args.wait <= 0:
            return 0
        document = watch.wait(lambda d: d is not None and not d.get("replicas"), args.wait,
                              lambda: watch.link.publish(loaded.topics.orch_request(), request, qos=1))
    finally:
        watch.link.stop()
    if document is None:
        raise TomqError(f"remove {args.service}: replicas still placed after {args.wait:.0f} s")
    print(f"removed {args.service}")
    return 0


def _run_move(args: argparse.Namespace) -> int:
    service, _, index = args.replica.rpartition(":")
    if not service or not index.isdigit():
        raise UsageError(f"{args.replica!r} must be SERVICE:REPLICA, e.g. collector:0")
    directory = Path(args.dir)
    operator, counter = _operator(directory)
    loaded = cluster.load(directory)
    watch = _PlacementWatch(loaded, service)
    try:
        time.sleep(0.2)  # the retained placement arrives first
        before = (watch.document or {}).get("replicas", {}).get(index)
        if before is None:
            raise UsageError(f"{args.replica} is not placed (see `tomq status {directory}`)")
        request = seal_move(operator, counter, service, int(index), args.to)
        watch.link.publish(loaded.topics.orch_request(), request, qos=1)
        print(f"move {args.replica} away from {before['node']}: requested")
        if args.wait <= 0:
            return 0

        def moved(document: dict[str, Any] | None) -> bool:
            now = (document or {}).get("replicas", {}).get(index)
            return now is not None and now["height"] > before["height"]

        document = watch.wait(moved, args.wait,
                              lambda: watch.link.publish(loaded.topics.orch_request(), request, qos=1))
    finally:
        watch.link.stop()
    if document is None:
        raise TomqError(f"move {args.replica}: not placed again within {args.wait:.0f} s")
    where = document["replicas"][index]
    print(f"  {args.replica} on {where['node']} (decided at ledger height {where['height']})")
    return 0
