"""The `tomq broker DIR` command: run the embedded broker, or write the same policy for mosquitto.

`register(subparsers)` adds the command to tomq's top-level parser (tomq/cli.py wires it in);
the handler returns an exit status like every other tomq command and lets TomqError reach
tomq.cli.main, which prints it as one line. It must never start a broker when asked only for
mosquitto files, and never bind anything but loopback unless --host says so.
"""

from __future__ import annotations

import argparse
from typing import Any

from tomq.errors import ConfigError


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add `broker` to the `subparsers` of an argparse parser; returns the new sub-parser."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "broker",
        help="run the embedded MQTT broker with tomq's authentication and ACL, or write them for mosquitto",
        description="Run the embedded amqtt broker for the cluster in DIR (members log in with their "
        "broker passwords; each may publish and subscribe only where broker/policy.py allows). "
        "With --mosquitto-conf, write mosquitto.conf, passwd and acl for the same policy instead.",
    )
    parser.add_argument("dir", metavar="DIR", help="cluster directory made by `tomq init`")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (default: cluster.toml [broker] port)")
    parser.add_argument("--tls", action="store_true",
                        help="also listen with TLS; CA and server certificate are issued into DIR/broker/tls/")
    parser.add_argument("--tls-port", type=int, help="port of the TLS listener (default: --port + 1)")
    parser.add_argument("--metrics-port", type=int, metavar="PORT",
                        help="serve Prometheus metrics (tomq_broker_refused_total by member) on 127.0.0.1:PORT")
    parser.add_argument("--mosquitto-conf", metavar="OUT",
                        help="write OUT/mosquitto.conf, OUT/passwd and OUT/acl and exit; starts no broker")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    for name in ("port", "tls_port", "metrics_port"):
        value = getattr(args, name)
        lowest = 0 if name == "metrics_port" else 1  # metrics on 0: any free port, announced
        if value is not None and not lowest <= value < 65536:
            raise ConfigError(f"--{name.replace('_', '-')} {value} is not between {lowest} and 65535")
    if args.mosquitto_conf is not None:
        if args.tls:
            raise ConfigError("--tls applies to the embedded broker; configure mosquitto's TLS listener yourself")
        from tomq.broker.mosquitto import write_mosquitto_config

        conf = write_mosquitto_config(args.dir, args.mosquitto_conf, args.port, host=args.host)
        print(f"wrote {conf}, {conf.parent / 'passwd'} and {conf.parent / 'acl'}")
        print(f"run:  mosquitto -c {conf}")
        print("write them again after `tomq device add` or renewing certificates: mosquitto does not read DIR")
        return 0

    from tomq.broker.embedded import EmbeddedBroker

    broker = EmbeddedBroker(args.dir, host=args.host, port=args.port, tls=args.tls, tls_port=args.tls_port)
    metrics_port = None
    if args.metrics_port is not None:
        from tomq.broker.amqtt_plugins import METRICS
        from tomq.node.metrics import serve_metrics

        # Loopback: the operator's scraper only. Not on a port the listeners are about to take.
        listening = {port for port in (broker.port, broker.tls_port) if port is not None}
        metrics_port = serve_metrics(args.metrics_port, METRICS, avoid=listening)

    def announce() -> None:
        print(f"tomq broker for cluster {broker.cluster} on mqtt://{broker.host}:{broker.port}", flush=True)
        if broker.tls is not None:
            print(f"  TLS on {broker.host}:{broker.tls_port}; clients trust {broker.tls.ca}", flush=True)
        if metrics_port is not None:
            print(f"  metrics on http://127.0.0.1:{metrics_port}/metrics", flush=True)
        print("  Ctrl-C stops it", flush=True)

    broker.run_forever(on_started=announce)
    return 0
