"""`tomq demo [--scenario S] [--duration S] [--chaos] [--keep DIR] [--no-view]` (DESIGN.md §7)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tomq.errors import UsageError


def register(commands: Any) -> None:
    from tomq.node.demo.scenarios import DEFAULT_SCENARIO, SCENARIOS

    demo = commands.add_parser(
        "demo", help="run a whole cluster on this machine: broker, 3 nodes, services, devices, live view, verify",
        description="Everything tomq does, on the embedded broker, in one command: a new cluster with three "
        "nodes, the scenario's services deployed with their contracts, simulated sensors and actuators, a live "
        "view, and at the end an offline check of the ledger. Nothing to set up beyond installing tomq.")
    demo.add_argument("--scenario", choices=sorted(SCENARIOS), default=DEFAULT_SCENARIO,
                      help=f"what the devices are (default {DEFAULT_SCENARIO})")
    demo.add_argument("--duration", type=float, default=60.0, metavar="S",
                      help="seconds the devices run once the services are deployed (default 60)")
    demo.add_argument("--chaos", action="store_true",
                      help="half-way, SIGKILL a node (the leader) and restart it 5 s later")
    demo.add_argument("--keep", type=Path, metavar="DIR",
                      help="build the cluster in DIR (new or empty) and keep it, with its ledger and logs; "
                      "by default a temporary directory is used and removed when all went well")
    demo.add_argument("--no-view", dest="view", action="store_false",
                      help="no live view: print only events (joins and leaves, actuators acting, leader changes, chaos)")
    demo.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    from tomq.node.demo.run import DemoOptions, run_demo, scenario_named

    if not args.duration > 0:
        raise UsageError(f"--duration must be a positive number of seconds, got {args.duration:g}")
    options = DemoOptions(scenario=scenario_named(args.scenario), duration=args.duration, chaos=args.chaos,
                          keep=args.keep, view=args.view)
    return run_demo(options)
