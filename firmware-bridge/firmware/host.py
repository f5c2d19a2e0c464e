"""Run the reference firmware (tomqfw.py) under CPython against a serial port or a pseudo-terminal.

    python firmware-bridge/firmware/host.py --port /dev/pts/7 --config tomqfw.json --store ./fw-state \
        --count 100 --rate 20

It samples a simulated temperature, frames, signs (device-signed) and retransmits exactly as a board
does; the tests drive the same `Firmware` class in-process through `FdPort` on a pty. It prints the
firmware's counters as JSON when it has sent --count readings and seen them acknowledged (or when
interrupted). This file is for PCs only (it uses pyserial when given a --baud); boards run main.py.
"""

import argparse
import json
import math
import os
import select
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tomqfw


class FdPort:
    """A non-blocking file descriptor (a pty's end) as the firmware's port."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        os.set_blocking(fd, False)

    def read(self, size: int) -> bytes:
        try:
            return os.read(self.fd, size)
        except (BlockingIOError, InterruptedError):
            return b""
        except OSError:
            return b""  # nothing at the other end (unplugged): a board's UART just hears nothing

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        deadline = time.monotonic() + 1.0
        while view and time.monotonic() < deadline:
            try:
                view = view[os.write(self.fd, view) :]
            except BlockingIOError:
                select.select([], [self.fd], [], 0.01)

    def wait(self, seconds: float) -> None:
        select.select([self.fd], [], [], seconds)


class SerialPort:
    """A real serial port through pyserial (a USB-serial adapter wired to a board running main.py)."""

    def __init__(self, path: str, baud: int) -> None:
        import serial

        self.serial = serial.Serial(path, baud, timeout=0, write_timeout=1)

    def read(self, size: int) -> bytes:
        return bytes(self.serial.read(size))

    def write(self, data: bytes) -> None:
        self.serial.write(data)

    def wait(self, seconds: float) -> None:
        select.select([self.serial.fileno()], [], [], seconds)


def run(firmware: tomqfw.Firmware, port: FdPort | SerialPort, count: int, rate: float, stop: threading.Event,
        values: object = None) -> None:
    """Sample `count` readings at `rate` per second (0: as fast as the queue allows) until all are acknowledged."""
    started = time.monotonic()
    sampled = 0
    while not stop.is_set():
        if sampled < count and (rate <= 0 or time.monotonic() - started >= sampled / rate):
            value = values(sampled) if callable(values) else round(20 + 5 * math.sin(sampled / 50), 2)
            if firmware.sample(value, "degC") is not None:
                sampled += 1
        firmware.poll()
        if sampled >= count and firmware.pending() == 0:
            return
        if rate > 0 or sampled >= count or firmware.pending() >= firmware.max_queue:
            port.wait(0.002)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", required=True, help="serial device or pty slave")
    parser.add_argument("--baud", type=int, help="open through pyserial at this speed (default: raw fd)")
    parser.add_argument("--config", required=True, help="tomqfw.json (tomq bridge DIR --provision DEVICE)")
    parser.add_argument("--store", default=".", help="where the sequence counter lives")
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--rate", type=float, default=10.0)
    args = parser.parse_args()
    with open(args.config) as handle:
        config = json.load(handle)
    for key in ("seed", "certificate"):
        if key in config:
            config[key] = bytes.fromhex(config[key])
    os.makedirs(args.store, exist_ok=True)
    port: FdPort | SerialPort
    if args.baud:
        port = SerialPort(args.port, args.baud)
    else:
        port = FdPort(os.open(args.port, os.O_RDWR | os.O_NOCTTY))
    firmware = tomqfw.Firmware(port, config, store=args.store, wall_ms=lambda: time.time() * 1000)
    stop = threading.Event()
    try:
        run(firmware, port, args.count, args.rate, stop)
    except KeyboardInterrupt:
        pass
    print(json.dumps(firmware.counters, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
