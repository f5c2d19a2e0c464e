"""`tomq sensor DIR --name s1 --sim temperature`: a simulated sensor on the cluster's broker.

It joins, publishes one signed reading per 1/rate seconds until --count readings or SIGTERM /
SIGINT, then leaves gracefully (waiting up to --drain seconds for the outbox to empty) and prints
its counters. Simulated time is the local time of day, so daily curves follow the clock.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any

from tomq.errors import UsageError
from tomq.sensors.device import Device
from tomq.sensors.simulators import SIMULATORS, make_simulator


def register(commands: Any) -> None:
    sensor = commands.add_parser("sensor", help="run a simulated sensor: join, publish signed readings, leave")
    sensor.add_argument("dir", metavar="DIR")
    sensor.add_argument("--name", required=True, help="the sensor's member name (tomq device add DIR --name ...)")
    sensor.add_argument("--sim", required=True, choices=sorted(SIMULATORS), help="what it measures")
    sensor.add_argument("--rate", type=float, default=1.0, help="readings per second (default 1)")
    sensor.add_argument("--count", type=int, help="stop after this many readings (default: until signalled)")
    sensor.add_argument("--seed", type=int, default=0, help="the simulator's seed")
    sensor.add_argument("--data-dir", type=Path, help="outbox and sequence counter (default DIR/members/<name>/device)")
    sensor.add_argument("--host", help="broker host (default: cluster.toml)")
    sensor.add_argument("--port", type=int, help="broker port (default: cluster.toml)")
    sensor.add_argument("--wait", type=float, default=10.0, help="seconds to wait for the broker at start")
    sensor.add_argument("--drain", type=float, default=10.0,
                        help="seconds to wait for unacknowledged readings before leaving")
    sensor.add_argument("--log-level", default="WARNING")
    sensor.set_defaults(run=_run_sensor)


def _time_of_day(now: float) -> float:
    local = time.localtime(now)
    return local.tm_hour * 3600 + local.tm_min * 60 + local.tm_sec + (now % 1.0)


def _run_sensor(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.rate <= 0:
        raise UsageError("--rate must be above 0 readings per second")
    if args.count is not None and args.count < 0:
        raise UsageError("--count must not be negative")
    simulator = make_simulator(args.sim, args.seed)
    device = Device.from_cluster_dir(args.dir, args.name, args.data_dir, host=args.host, port=args.port)
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        stop.set()

    previous = {signum: signal.signal(signum, on_signal) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        device.start(wait=args.wait)
        print(f"sensor {device.name} joined {device.cluster} at {device.host}:{device.port} "
              f"({args.sim}, {args.rate:g}/s)", flush=True)
        started = time.monotonic()
        sent = 0
        while not stop.is_set() and (args.count is None or sent < args.count):
            now = time.time()
            value, unit = simulator.next(_time_of_day(now))
            device.publish(value, unit)
            sent += 1
            stop.wait(max(0.0, started + sent / args.rate - time.monotonic()))
        left = device.leave(timeout=args.drain)
    except BaseException:
        device.stop()
        raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    counters = device.counters()
    print(f"sensor {device.name} {'left' if left else 'vanished (leave not acknowledged)'}: "
          f"published {counters.published}, acked {counters.acked}, resent {counters.resent}, "
          f"outbox {counters.outbox}", flush=True)
    return 0 if left else 1
