"""Frames per second through the serial bridge, against the frame rate the line itself allows.

    .venv/bin/python bench/bridge.py [--quick] [--bauds 115200,921600] [--seconds S] [--repeats R]

For each baud rate: the reference firmware (firmware-bridge/firmware/tomqfw.py, device-signed, in
this process) sends readings as fast as its window allows through a pair of pseudo-terminals; a
relay between them paces both directions at the baud rate (8N1: 10 bits per byte, as a UART sends
them; a pty by itself does not); `tomq bridge` (its own process) takes each reading, makes it
durable, acknowledges it and publishes it to mosquitto (or to the embedded broker if mosquitto is
missing). Measured: readings acknowledged per second, from the first byte sent to the last ack.
Baseline, measured in the same run: the line's theoretical frame rate, (baud / 10) / the mean
bytes one reading frame occupies on the line (delimiters included). Ratio = measured / theoretical:
1.00 means the bridge keeps the line full. A last row runs the pty unpaced: the bridge's own ceiling.

A benchmark, never a test. Every process it starts is stopped at the end; the cluster is temporary.
"""

from __future__ import annotations

import argparse
import os
import select
import statistics
import sys
import tempfile
import threading
import time
import tty
from pathlib import Path

from common import PYTHON, Processes, free_port, log, wait_for_port, which

from tomq import cluster as clusters
from tomq.bridge.provision import firmware_config

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "firmware-bridge" / "firmware"))

import tomqfw
from host import FdPort

BAUDS = (115_200, 921_600)


class PacedRelay:
    """Copies between two pty masters, each direction at most baud/10 bytes per second (None: unpaced)."""

    def __init__(self, device_master: int, bridge_master: int, baud: int | None) -> None:
        self.ends = (device_master, bridge_master)
        self.rate = baud / 10 if baud else None
        self.queues = (bytearray(), bytearray())  # towards the bridge, towards the device
        self.sent = [0, 0]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        budget = [0.0, 0.0]
        last = time.monotonic()
        while not self.stop.is_set():
            readable, _, _ = select.select(list(self.ends), [], [], 0.0005)
            for index, end in enumerate(self.ends):
                if end in readable:
                    try:
                        self.queues[index].extend(os.read(end, 65536))
                    except OSError:
                        pass
            now = time.monotonic()
            for index in (0, 1):
                budget[index] = (min(budget[index] + (now - last) * self.rate, self.rate * 0.002)
                                 if self.rate else float(len(self.queues[index])))
                queue = self.queues[index]
                take = min(len(queue), int(budget[index]))
                if take:
                    target = self.ends[1 - index]
                    try:
                        written = os.write(target, queue[:take])
                    except (BlockingIOError, OSError):
                        written = 0
                    del queue[:written]
                    budget[index] -= written
                    if index == 0:
                        self.sent[0] += written
            last = now


def open_pty() -> tuple[int, str, int]:
    master, slave = os.openpty()
    tty.setraw(master)
    tty.setraw(slave)
    os.set_blocking(master, False)
    return master, os.ttyname(slave), slave


def run_once(directory: Path, processes: Processes, work: Path, baud: int | None, count: int,
             broker_port: int) -> tuple[float, float]:
    """(readings acknowledged per second, mean bytes per reading frame on the line)."""
    work.mkdir(parents=True)
    device_master, _device_path, device_slave = open_pty()
    bridge_master, bridge_path, bridge_slave = open_pty()
    relay = PacedRelay(device_master, bridge_master, baud)
    bridge = processes.start([PYTHON, "-m", "tomq", "bridge", str(directory), "--port", bridge_path,
                              "--baud", str(baud or 921_600), "--data-dir", str(work / "bridge"),
                              "--broker-port", str(broker_port), "--log-level", "WARNING"], work / "bridge.log")
    config = firmware_config(directory, "t1")
    config["seed"], config["certificate"] = bytes.fromhex(config["seed"]), bytes.fromhex(config["certificate"])
    port = FdPort(os.dup(device_slave))
    firmware = tomqfw.Firmware(port, config, store=str(work), window=8, rto_ms=2000, max_queue=64,
                               wall_ms=lambda: time.time() * 1000)
    try:
        deadline = time.monotonic() + 30
        while not firmware.hello_acked:  # wait for the bridge: the clock starts with the readings
            firmware.poll()
            port.wait(0.002)
            if time.monotonic() > deadline:
                raise TimeoutError(f"the bridge did not answer; see {work / 'bridge.log'}")
        sent_before = relay.sent[0]
        sampled = 0
        started = time.monotonic()
        while sampled < count or firmware.pending():
            while sampled < count and firmware.pending() < firmware.max_queue:
                firmware.sample(20.0 + sampled % 50 / 4, "degC")
                sampled += 1
            firmware.poll()
            port.wait(0.0005)
            if time.monotonic() - started > 300:
                raise TimeoutError("the run took over 300 s")
        elapsed = time.monotonic() - started
        if firmware.counters["resent"]:
            log(f"  ({firmware.counters['resent']} readings were resent: the ratio counts them as lost time)")
        frame_bytes = (relay.sent[0] - sent_before) / (count + firmware.counters["resent"])
        return count / elapsed, frame_bytes
    finally:
        processes.stop(bridge)
        relay.stop.set()
        relay.thread.join(2)
        for fd in (device_master, device_slave, bridge_master, bridge_slave, port.fd):
            os.close(fd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter runs, one repeat")
    parser.add_argument("--bauds", default=",".join(map(str, BAUDS)), help="comma-separated baud rates")
    parser.add_argument("--seconds", type=float, help="line time per run (default 8, 3 with --quick)")
    parser.add_argument("--repeats", type=int, help="runs per baud rate; the median is reported (default 3)")
    args = parser.parse_args(argv)
    seconds = args.seconds if args.seconds is not None else (3.0 if args.quick else 8.0)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    bauds = [int(b) for b in args.bauds.split(",") if b.strip()]

    processes = Processes()
    with tempfile.TemporaryDirectory(prefix="tomq-bench-bridge-") as temp:
        root = Path(temp)
        broker_port = free_port()
        directory = root / "cluster"
        clusters.init(directory, ["n1"], cluster_name="benchbridge", broker=f"127.0.0.1:{broker_port}")
        clusters.add_member(directory, "t1", "sensor")
        try:
            mosquitto = which("mosquitto")
            if mosquitto is not None:
                from tomq.broker.mosquitto import write_mosquitto_config

                config = write_mosquitto_config(directory, root / "mosquitto", broker_port)
                broker = processes.start([mosquitto, "-c", str(config)], root / "broker.log")
                broker_name = "mosquitto"
            else:
                broker = processes.start([PYTHON, "-m", "tomq", "broker", str(directory), "--port", str(broker_port)],
                                         root / "broker.log")
                broker_name = "amqtt (mosquitto not installed)"
            wait_for_port(broker_port, broker)
            log(f"broker: {broker_name}; {repeats} run(s) of ~{seconds:g} s of line time per baud rate")
            rows = []
            for baud in [*bauds, None]:
                rates, sizes = [], []
                for repeat in range(repeats):
                    # size the run from a first estimate of the frame: ~175 bytes for a device-signed reading
                    count = 3000 if baud is None else max(50, int(baud / 10 / 175 * seconds))
                    rate, size = run_once(directory, processes, root / f"run-{baud}-{repeat}", baud, count,
                                          broker_port)
                    rates.append(rate)
                    sizes.append(size)
                    log(f"  {baud or 'unpaced'} baud, run {repeat + 1}: {count} readings, {rate:.0f}/s")
                rows.append((baud, statistics.median(rates), statistics.median(sizes)))
        finally:
            processes.stop_all()

    print(f"{'line':>12} {'frame bytes':>11} {'theoretical/s':>13} {'measured/s':>10} {'ratio':>6}")
    for baud, rate, size in rows:
        if baud is None:
            print(f"{'pty unpaced':>12} {size:>11.1f} {'-':>13} {rate:>10.0f} {'-':>6}")
            continue
        theoretical = baud / 10 / size
        print(f"{baud:>12,} {size:>11.1f} {theoretical:>13.1f} {rate:>10.1f} {rate / theoretical:>6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
