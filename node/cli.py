"""`tomq node` and the ledger commands that talk to a running cluster (propose, tail, genesis)."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tomq import canonical, cluster, records
from tomq.errors import ConfigError, PeerError, UsageError
from tomq.mqtt import MqttLink
from tomq.node.ledger.block import decode_block_file
from tomq.wire import ClockSequence, seal


def register(commands: Any) -> None:
    node = commands.add_parser("node", help="run one node daemon (Raft over MQTT, the ledger)")
    node.add_argument("dir", metavar="DIR")
    node.add_argument("--id", required=True, help="the node's name, as in cluster.toml (e.g. n1)")
    node.add_argument("--mode", choices=("stable", "on-demand"), default="stable")
    node.add_argument("--ledger-dir", type=Path, help="shared ledger directory (a GlusterFS mount in production)")
    node.add_argument("--data-dir", type=Path, help="this node's own state (default DIR/members/<id>/state)")
    node.add_argument("--host", help="broker host (default: cluster.toml)")
    node.add_argument("--port", type=int, help="broker port (default: cluster.toml)")
    node.add_argument("--metrics-port", type=int,
                      help="serve Prometheus metrics on 127.0.0.1:PORT (0 picks a free port and logs it)")
    node.add_argument("--tick-ms", type=float, default=50.0, help="Raft tick; elections after 10-20 ticks")
    node.add_argument("--max-batch", type=int, default=1000, help="records per block at most")
    node.add_argument("--retained-blocks", type=int, default=100, help="blocks kept retained on ledger/block/<h>")
    node.add_argument("--snapshot-every", type=int, default=2000, help="Raft entries applied between log compactions")
    node.add_argument("--runtime", choices=("auto", "docker", "process"), default="auto",
                      help="how service instances run (auto: docker if an engine answers, else process)")
    node.add_argument("--docker-host", help="docker engine URL (default: DOCKER_HOST or the local socket)")
    node.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                      help="a node label that placement constraints can ask for (repeatable)")
    node.add_argument("--dead-after", type=float, default=2.5,
                      help="seconds without load reports and Raft contact before a node's replicas move")
    node.add_argument("--load-pids-file", type=Path,
                      help="processes listed here (one pid per line) count as this node's load (tests)")
    node.add_argument("--log-level", default="INFO")
    node.set_defaults(run=_run_node)


def register_ledger(actions: Any) -> None:
    """Add propose, tail and genesis to the `tomq ledger` group."""
    propose = actions.add_parser("propose", help="propose records to the running cluster (operators, tests)")
    propose.add_argument("dir", metavar="DIR")
    propose.add_argument("--as", dest="as_name", help="proposing member (default: the first node)")
    propose.add_argument("--json", dest="records_json", required=True,
                         help="a record map or a list of them, e.g. "
                              '\'{"state":"PROV-ORCH","t":0,"orchestrate":{"deployed":"svc-1","location":"n1",'
                              '"action":"place","reason":{}},"attrs":{}}\' (byte fields in hex)')
    propose.add_argument("--wait", type=float, default=10.0, help="seconds to wait until committed (0: do not wait)")
    propose.set_defaults(run=_run_propose)

    tail = actions.add_parser("tail", help="print committed blocks (retained) and, with --follow, new ones")
    tail.add_argument("dir", metavar="DIR")
    tail.add_argument("--follow", action="store_true")
    tail.add_argument("--json", action="store_true", help="one JSON object per record")
    tail.add_argument("--as", dest="as_name")
    tail.set_defaults(run=_run_tail)

    genesis = actions.add_parser("genesis", help="write DIR/genesis.block (done by tomq init)")
    genesis.add_argument("dir", metavar="DIR")
    genesis.set_defaults(run=_run_genesis)


def write_genesis(directory: str | Path) -> Path:
    from tomq.identity import SigningKey
    from tomq.node.ledger.genesis import make_genesis

    loaded = cluster.load(directory)
    path = loaded.directory / "genesis.block"
    if path.exists():
        raise ConfigError(f"{path} exists; the genesis block is never rewritten")
    operator = SigningKey.load(loaded.directory / "operator" / "operator.key")
    path.write_bytes(make_genesis(loaded, operator, int(time.time() * 1000)))
    return path


def _run_genesis(args: argparse.Namespace) -> int:
    print(f"wrote {write_genesis(args.dir)}")
    return 0


def _run_node(args: argparse.Namespace) -> int:
    from tomq.node.applier import NodeApplier
    from tomq.node.daemon import NodeDaemon, NodeOptions
    from tomq.node.ledger_service import LedgerService
    from tomq.node.orchestrator.service import Orchestrator

    if args.metrics_port is not None and not 0 <= args.metrics_port < 65536:
        raise ConfigError(f"--metrics-port {args.metrics_port} is not between 0 and 65535")
    logging.basicConfig(level=args.log_level.upper(),
                        format=f"%(asctime)s {args.id} %(levelname)s %(name)s: %(message)s")
    options = NodeOptions(mode=args.mode, tick_seconds=args.tick_ms / 1000, data_dir=args.data_dir,
                          host=args.host, port=args.port, metrics_port=args.metrics_port,
                          snapshot_every=args.snapshot_every)
    labels = _labels(args.label)

    def services(n: NodeDaemon) -> NodeApplier:
        orchestrator = Orchestrator(n, _runtime(args, n), labels=labels, dead_after=args.dead_after,
                                    load_pids_file=args.load_pids_file)
        ledger = LedgerService(n, ledger_dir=args.ledger_dir, max_batch=args.max_batch,
                               retained_window=args.retained_blocks, listeners=[orchestrator.on_records])
        orchestrator.attach(ledger)
        return NodeApplier(ledger, orchestrator)

    node = NodeDaemon(args.dir, args.id, services, options)
    assert isinstance(node.applier, NodeApplier)
    options.extra_subscriptions.extend(node.applier.subscriptions())
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: node.stop())
    node.run()
    return 0


def _labels(items: list[str]) -> dict[str, str]:
    labels = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--label {item!r} must be KEY=VALUE")
        labels[key] = value
    return labels


def _runtime(args: argparse.Namespace, node: Any) -> Any:
    """The runtime for this node's instances: docker when asked (or when one answers), else processes."""
    from tomq.node.runtime.docker import DockerRuntime, docker_available
    from tomq.node.runtime.image import build_image
    from tomq.node.runtime.process import ProcessRuntime

    log = logging.getLogger("tomq.node")
    if args.runtime == "docker" or (args.runtime == "auto" and docker_available(args.docker_host)):
        runtime = DockerRuntime(args.docker_host, node.cluster.name, node.name, state_dir=node.data_dir / "instances")
        build = build_image(args.docker_host)  # local, no registry; a no-op when it is current
        log.info("runtime docker (%s); image %s %s", args.docker_host or "default engine", build.tag,
                 "built" if build.built else "up to date")
        return runtime
    log.info("runtime process%s", " (no docker engine answers)" if args.runtime == "auto" else "")
    return ProcessRuntime(node.data_dir / "runtime", node.cluster.name, node.name)


def _link(directory: str, as_name: str | None, on_message: Any = None) -> tuple[cluster.Cluster, str, MqttLink]:
    loaded = cluster.load(directory)
    name = as_name or next(m.name for m in loaded.members if m.role == "node")
    link = MqttLink(host=loaded.broker_host, port=loaded.broker_port, username=name,
                    password=cluster.broker_password(loaded.signing_key(name)), on_message=on_message)
    return loaded, name, link


def _from_json(value: Any, key: str = "") -> Any:
    if isinstance(value, dict):
        return {k: _from_json(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    if isinstance(value, str) and key in ("proof", "hash", "source_sig"):
        return bytes.fromhex(value)
    return value


class Proposer:
    """Seals record maps as the given member and publishes them on ledger/propose/<member>; waits for commit."""

    def __init__(self, directory: str, as_name: str | None = None) -> None:
        self.committed: set[tuple[str, int]] = set()
        self.aliases: dict[int, list[int]] = {}  # original seq -> every seq it was sealed with
        self._changed = threading.Condition()
        self.cluster, self.name, self.link = _link(directory, as_name, self._on_message)
        self.key = self.cluster.signing_key(self.name)
        self._sequence = ClockSequence()  # successive proposers under one identity keep increasing
        self.link.subscribe(f"{self.cluster.topics.root}/ledger/block/+", qos=1)
        self.link.subscribe(f"{self.cluster.topics.root}/audit/#")
        self.link.start()

    def _on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        # A certified block on ledger/block/<h> is the acknowledgement: every node publishes it, so it
        # survives a leader change that an audit line (published by one node) might not.
        if not payload:
            return
        if "/audit/" in topic:
            try:
                line = json.loads(payload)
            except ValueError:
                return
            if isinstance(line, dict) and line.get("proposer") == self.key.id:
                with self._changed:
                    self.committed.add((line["proposer"], line["seq"]))
                    self._changed.notify_all()
            return
        try:
            block = decode_block_file(payload).block
        except PeerError:
            return
        mine = []
        for envelope in block.records:
            fields = canonical.decode(canonical.decode(envelope)[0], check_canonical=False)
            if fields["from"] == self.key.id:
                mine.append((fields["from"], fields["seq"]))
        if mine:
            with self._changed:
                self.committed.update(mine)
                self._changed.notify_all()

    def seal(self, record_map: dict[str, Any]) -> tuple[bytes, int]:
        records.from_map(record_map)  # refuse a malformed record before anything is sent
        seq = self._sequence.next()
        wire = seal(self.key, seq=seq, time_ms=int(time.time() * 1000), type="record", body=record_map)
        return wire, seq

    def propose(self, wire: bytes) -> None:
        self.link.publish(self.cluster.topics.ledger_propose(self.name), wire, qos=1)

    def wait(self, seqs: list[int], timeout: float, resend: dict[int, bytes] | None = None) -> list[int]:
        """Wait until every record is committed; returns the seqs still missing at the timeout.

        With `resend` (seq -> envelope), a record not committed within a second (then 2, 4, 8) is sealed again with
        a new sequence number and proposed again: the ledger accepts a proposer's records only in
        rising sequence order, so re-sending the old envelope after a later one was taken would be
        refused. A record sealed twice can in rare cases commit twice; Table II refuses a second
        PROV-DATA for the same datum, so readings are never counted twice.
        """
        aliases = self.aliases
        for seq in seqs:
            aliases.setdefault(seq, [seq])
        deadline = time.monotonic() + timeout
        # The interval doubles (1, 2, 4, 8 s): resending everything still missing every second fed a
        # broker that had fallen behind (the embedded one with five nodes) more than it could deliver.
        interval = 1.0
        next_resend = time.monotonic() + interval
        while True:
            with self._changed:
                missing = [s for s in seqs if not any((self.key.id, a) in self.committed for a in aliases[s])]
                if not missing or time.monotonic() >= deadline:
                    return missing
                self._changed.wait(0.05)
            if resend and time.monotonic() >= next_resend:
                interval = min(interval * 2, 8.0)
                next_resend = time.monotonic() + interval
                for seq in missing:
                    signed, _ = canonical.decode(resend[seq])
                    body = canonical.decode(signed, check_canonical=False)["body"]
                    wire, new_seq = self.seal(body)
                    aliases[seq].append(new_seq)
                    self.propose(wire)

    def close(self) -> None:
        self.link.stop()


def _run_propose(args: argparse.Namespace) -> int:
    try:
        parsed = json.loads(args.records_json)
    except ValueError as exc:
        raise UsageError(f"--json is not JSON: {exc}") from None
    maps = [_from_json(m) for m in (parsed if isinstance(parsed, list) else [parsed])]
    proposer = Proposer(args.dir, args.as_name)
    try:
        sealed = {seq: wire for wire, seq in (proposer.seal(m) for m in maps)}
        for wire in sealed.values():
            proposer.propose(wire)
        if args.wait <= 0:
            print(f"proposed {len(sealed)} record(s) as {proposer.name}")
            return 0
        missing = proposer.wait(list(sealed), args.wait, sealed)
    finally:
        proposer.close()
    if missing:
        print(f"{len(missing)} of {len(sealed)} record(s) not committed within {args.wait:.0f} s", file=sys.stderr)
        return 1
    print(f"committed {len(sealed)} record(s) as {proposer.name}")
    return 0


def _run_tail(args: argparse.Namespace) -> int:
    seen: set[int] = set()
    lock = threading.Lock()

    def show(topic: str, payload: bytes, retained: bool) -> None:
        if not payload:
            return
        try:
            block_file = decode_block_file(payload)
        except Exception:
            return
        block = block_file.block
        with lock:
            if block.height in seen:
                return
            seen.add(block.height)
            for index, envelope in enumerate(block.records):
                signed, _ = canonical.decode(envelope)
                fields = canonical.decode(signed, check_canonical=False)
                body = fields["body"]
                if args.json:
                    from tomq.node.ledger_service import jsonable

                    print(json.dumps({"height": block.height, "index": index, "proposer": fields["from"],
                                      "seq": fields["seq"], "record": jsonable(body)}, sort_keys=True), flush=True)
                else:
                    print(f"{block.height:>6} {index:>4} {body.get('state', '?'):<15} from {fields['from']} "
                          f"seq {fields['seq']}", flush=True)

    loaded, _, link = _link(args.dir, args.as_name, show)
    link.subscribe(f"{loaded.topics.root}/ledger/block/+", qos=1)
    link.start()
    try:
        if args.follow:
            while True:
                time.sleep(3600)
        else:
            time.sleep(1.5)  # retained blocks arrive at once; give the broker a moment
    except KeyboardInterrupt:
        pass
    finally:
        link.stop()
    return 0
