"""`tomq bridge`: run a serial bridge, enrol a bridge identity, or write a board's firmware config.

    tomq bridge DIR --port /dev/ttyUSB0 [--baud 115200] [--name BRIDGE]      run (SIGTERM/Ctrl-C: stop)
    tomq bridge DIR --enrol BRIDGE --attests t1,t2                            operator: delegate attestation
    tomq bridge DIR --provision DEVICE --out tomqfw.json [--attested]         operator: a board's config
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
from pathlib import Path
from typing import Any

from tomq.errors import UsageError


def register(commands: Any) -> None:
    bridge = commands.add_parser("bridge", help="serial bridge: carry a microcontroller's readings to MQTT")
    bridge.add_argument("dir", metavar="DIR")
    action = bridge.add_mutually_exclusive_group(required=True)
    action.add_argument("--port", help="the serial device, e.g. /dev/ttyUSB0 (reopened when it comes back)")
    action.add_argument("--enrol", metavar="BRIDGE", help="enrol (or re-certify) a bridge identity; with --attests")
    action.add_argument("--provision", metavar="DEVICE", help="write the firmware config for a board; with --out")
    bridge.add_argument("--baud", type=int, default=115200)
    bridge.add_argument("--name", help="the bridge identity for bridge-attested devices (default: the enrolled "
                                       "member with its key in DIR whose certificate names the device)")
    bridge.add_argument("--data-dir", type=Path, help="outboxes, marks, counters (default DIR/bridge/<port name>)")
    bridge.add_argument("--host", help="broker host (default: cluster.toml)")
    bridge.add_argument("--broker-port", type=int, help="broker port (default: cluster.toml)")
    bridge.add_argument("--vanish-after", type=float, default=30.0,
                        help="seconds a device-signed device may be off the line before its will is published")
    bridge.add_argument("--report", type=float, default=10.0, help="seconds between counter reports")
    bridge.add_argument("--attests", help="with --enrol: comma-separated devices the bridge may attest for")
    bridge.add_argument("--out", type=Path, help="with --provision: where to write the config (JSON, mode 0600)")
    bridge.add_argument("--attested", action="store_true", help="with --provision: a board too small to sign")
    bridge.add_argument("--log-level", default="INFO")
    bridge.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    if args.enrol is not None:
        from tomq.bridge.provision import enrol_bridge

        devices = [d.strip() for d in (args.attests or "").split(",") if d.strip()]
        if not devices:
            raise UsageError("--enrol needs --attests DEVICE[,DEVICE...]")
        certificate = enrol_bridge(args.dir, args.enrol, devices)
        print(f"bridge {certificate.name} may attest for {', '.join(devices)}; publishes {', '.join(certificate.publish)}")
        return 0
    if args.provision is not None:
        from tomq.bridge.provision import write_firmware_config

        if args.out is None:
            raise UsageError("--provision needs --out FILE")
        path = write_firmware_config(args.dir, args.provision, args.out, attested=args.attested)
        print(f"wrote {path} for {args.provision} ({'bridge-attested' if args.attested else 'device-signed'}); "
              "copy it onto the board as tomqfw.json, then delete it")
        return 0
    return _serve(args)


def _serve(args: argparse.Namespace) -> int:
    from tomq.bridge.bridge import Bridge

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.baud <= 0:
        raise UsageError("--baud must be positive")
    bridge = Bridge(args.dir, args.port, baud=args.baud, data_dir=args.data_dir, name=args.name, host=args.host,
                    broker_port=args.broker_port, vanish_after=args.vanish_after, report_every=args.report)

    def on_signal(_signum: int, _frame: Any) -> None:
        bridge.stop()

    previous = {signum: signal.signal(signum, on_signal) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        bridge.run()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    print(json.dumps(bridge.counters(), sort_keys=True), flush=True)
    return 0
