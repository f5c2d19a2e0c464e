"""The `tomq` command line (DESIGN.md §7). Commands exist here only once they work end to end."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from tomq import __version__, cluster
from tomq.cluster import DEFAULT_VALID_DAYS, DEVICE_ROLES
from tomq.errors import TomqError


def _cmd_init(args: argparse.Namespace) -> int:
    nodes = [n.strip() for n in args.nodes.split(",") if n.strip()]
    created = cluster.init(args.dir, nodes, cluster_name=args.cluster, broker=args.broker, valid_days=args.valid_days)
    from tomq.node.cli import write_genesis

    write_genesis(created.directory)  # block 0: the operator's statement of who the first nodes are
    print(f"cluster {created.name} created in {created.directory}")
    print(f"operator {created.operator.id} (public key in {created.directory}/operator/operator.pub)")
    for member in created.members:
        print(f"  {member.role:<8} {member.name:<16} {member.id}")
    print(f"keep {created.directory}/operator/operator.key offline: it can enrol anyone")
    return 0


def _cmd_device_add(args: argparse.Namespace) -> int:
    member = cluster.add_member(args.dir, args.name, args.role, valid_days=args.valid_days)
    print(f"{member.role} {member.name} enrolled as {member.id}")
    print(f"key and certificate in {args.dir}/members/{member.name}/")
    return 0


def _cmd_members(args: argparse.Namespace) -> int:
    loaded = cluster.load(args.dir)
    rows: list[dict[str, Any]] = []
    for member in loaded.members:
        cert = loaded.certificate(member.name)
        rows.append({"name": member.name, "role": member.role, "id": member.id,
                     "not_before": cert.not_before, "not_after": cert.not_after, "publish": list(cert.publish)})
    if args.json:
        print(json.dumps({"cluster": loaded.name, "operator": loaded.operator.id, "members": rows}, indent=2))
    else:
        print(f"cluster {loaded.name}, operator {loaded.operator.id}")
        for row in rows:
            print(f"  {row['role']:<8} {row['name']:<16} {row['id']}  publishes {', '.join(row['publish']) or '-'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tomq",
        description="Trusted Orchestration Management over MQTT: signed sensor data, a Raft-replicated "
        "W3C-PROV ledger, and container placement on edge clusters.",
    )
    parser.add_argument("--version", action="version", version=f"tomq {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    init = commands.add_parser("init", help="create a cluster: operator key, node identities, cluster.toml, broker credentials")
    init.add_argument("dir", metavar="DIR")
    init.add_argument("--nodes", required=True, help="comma-separated node names, e.g. n1,n2,n3")
    init.add_argument("--cluster", help="cluster name (default: the directory's name)")
    init.add_argument("--broker", default="127.0.0.1:1883", help="broker HOST:PORT the members connect to")
    init.add_argument("--valid-days", type=int, default=DEFAULT_VALID_DAYS, help="certificate validity")
    init.set_defaults(run=_cmd_init)

    device = commands.add_parser("device", help="enrol devices")
    device_commands = device.add_subparsers(dest="device_command", metavar="ACTION", required=True)
    add = device_commands.add_parser("add", help="create a sensor or actuator identity with its certificate")
    add.add_argument("dir", metavar="DIR")
    add.add_argument("--name", required=True)
    add.add_argument("--role", required=True, choices=DEVICE_ROLES)
    add.add_argument("--valid-days", type=int, default=DEFAULT_VALID_DAYS)
    add.set_defaults(run=_cmd_device_add)

    members = commands.add_parser("members", help="list the cluster's members and their certificates")
    members.add_argument("dir", metavar="DIR")
    members.add_argument("--json", action="store_true")
    members.set_defaults(run=_cmd_members)

    # Component commands register themselves; imported here so that `import tomq` stays light.
    from tomq.bridge import cli as bridge_cli
    from tomq.broker import cli as broker_cli
    from tomq.node import cli as node_cli
    from tomq.node import status as node_status
    from tomq.node.demo import cli as demo_cli
    from tomq.node.ledger import cli as ledger_cli
    from tomq.node.orchestrator import cli as orchestrator_cli
    from tomq.node.runtime import cli as runtime_cli
    from tomq.sensors import actuator_cli
    from tomq.sensors import cli as sensor_cli

    broker_cli.register(commands)
    node_cli.register(commands)
    node_status.register(commands)
    node_cli.register_ledger(ledger_cli.register(commands))
    runtime_cli.register(commands)
    orchestrator_cli.register(commands)
    sensor_cli.register(commands)
    demo_cli.register(commands)
    actuator_cli.register(commands)
    bridge_cli.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except TomqError as exc:
        print(f"tomq: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
