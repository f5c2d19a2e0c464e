"""`tomq actuator DIR --name tl1 --sim traffic-light|valve`: a simulated actuator, until SIGTERM.

It prints one line per state change (`tl1 green (command X, height 42)`) and per refusal
(`tl1 refused: replayed command ...`). On SIGTERM or SIGINT it leaves the cluster gracefully (a
retained signed leave) and prints how many commands it carried out and refused.
"""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path
from typing import Any

from tomq.sensors.actuators import SIMULATORS, Actuator
from tomq.sensors.command import DEFAULT_MAX_AGE_S


def register(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "actuator", help="run a simulated actuator that acts only on commands backed by a certified ledger record")
    parser.add_argument("dir", metavar="DIR")
    parser.add_argument("--name", required=True, help="the actuator's name, as enrolled with `tomq device add`")
    parser.add_argument("--sim", required=True, choices=sorted(SIMULATORS), help="which device to simulate")
    parser.add_argument("--data-dir", type=Path,
                        help="sequence numbers and the last accepted command (default DIR/members/<name>/state)")
    parser.add_argument("--host", help="broker host (default: cluster.toml)")
    parser.add_argument("--port", type=int, help="broker port (default: cluster.toml)")
    parser.add_argument("--max-age", type=float, default=DEFAULT_MAX_AGE_S,
                        help="refuse commands whose ledger record is older than this many seconds")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    hardware = SIMULATORS[args.sim](args.name)
    actuator = Actuator.from_cluster(args.dir, args.name, hardware, data_dir=args.data_dir, host=args.host,
                                     port=args.port, max_age_s=args.max_age,
                                     on_event=lambda line: print(line, flush=True))
    stopping = threading.Event()
    previous = {signum: signal.signal(signum, lambda *_: stopping.set()) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        actuator.start()
        assert actuator.device is not None  # from_cluster made it
        print(f"{actuator.name} {hardware.describe()} ({hardware.kind}, listening on {actuator.device.cmd_topic})",
              flush=True)
        while not stopping.wait(1.0):
            pass
        left = actuator.stop()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    refused = ", ".join(f"{reason} {count}" for reason, count in sorted(actuator.refused.items())) or "none"
    print(f"{actuator.name} {'left' if left else 'vanished (leave not acknowledged)'}: {len(actuator.history)} "
          f"command(s) carried out, refused: {refused}", flush=True)
    return 0
