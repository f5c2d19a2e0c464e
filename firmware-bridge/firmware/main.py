# MicroPython entry point for a board (ESP32 or RP2040): sample a DS18B20 (or the RP2040's own
# temperature sensor), hand each reading to tomqfw.Firmware, talk to the bridge over a UART or USB.
#
# Copy onto the board together with tomqfw.py, ed25519.py and tomqfw.json (README.md says how).
# tomqfw.json holds, besides what `tomq bridge DIR --provision` wrote, the board settings:
#   "link": "usb" (the USB CDC port that also carries the REPL) or "uart"
#   "uart": 2, "tx": 17, "rx": 16, "baud": 115200     (for "link": "uart"; a Pico: "uart": 0, "tx": 0, "rx": 1)
#   "sensor": "ds18b20" | "rp2040-internal",  "pin": 4 (DS18B20 data pin),  "interval_ms": 10000

import json

import machine
import tomqfw

try:
    from typing import Any  # noqa: F401 (used in a type comment; for type checkers only)
except ImportError:
    pass

time = __import__("time")  # type: Any  # MicroPython's: ticks_ms, ticks_diff, ticks_add, sleep_ms


def open_link(config):
    if config.get("link", "usb") == "uart":
        uart = machine.UART(config.get("uart", 2), baudrate=config.get("baud", 115200),
                            tx=machine.Pin(config.get("tx", 17)), rx=machine.Pin(config.get("rx", 16)),
                            timeout=0, rxbuf=1024)
        return uart
    return UsbLink()


class UsbLink:
    """The USB CDC serial port: stdin/stdout in binary, with Ctrl-C (0x03) no longer an interrupt,
    since frames carry arbitrary bytes. The REPL is unreachable while this runs: hold the BOOT button
    (ESP32) or re-flash to get it back, or use a UART link instead."""

    def __init__(self):
        import select
        import sys

        import micropython

        micropython.kbd_intr(-1)
        self.stdin = sys.stdin.buffer
        self.stdout = sys.stdout.buffer
        self.poll = select.poll()
        self.poll.register(sys.stdin, select.POLLIN)

    def read(self, size):
        out = bytearray()
        while len(out) < size and self.poll.poll(0):
            out.extend(self.stdin.read(1))
        return bytes(out)

    def write(self, data):
        self.stdout.write(data)


def open_sensor(config):
    kind = config.get("sensor", "ds18b20")
    if kind == "rp2040-internal":
        adc = machine.ADC(4)

        def read_internal():
            volts = adc.read_u16() * 3.3 / 65535
            return round(27 - (volts - 0.706) / 0.001721, 2)

        return read_internal
    import ds18x20
    import onewire

    bus = ds18x20.DS18X20(onewire.OneWire(machine.Pin(config.get("pin", 4))))
    roms = bus.scan()
    if not roms:
        raise OSError("no DS18B20 on pin " + str(config.get("pin", 4)) + ": check the wiring and the pull-up")

    def read_ds18b20():
        bus.convert_temp()
        time.sleep_ms(750)
        return round(bus.read_temp(roms[0]), 2)

    return read_ds18b20


def main():
    with open("tomqfw.json") as handle:
        config = json.load(handle)
    if "seed" in config:
        config["seed"] = bytes.fromhex(config["seed"])
        config["certificate"] = bytes.fromhex(config["certificate"])
    link = open_link(config)
    read_sensor = open_sensor(config)
    firmware = tomqfw.Firmware(link, config, store="/", window=4, rto_ms=1000, max_queue=32,
                               ticks_ms=time.ticks_ms)
    interval = config.get("interval_ms", 10000)
    next_sample = time.ticks_ms()
    while True:
        if time.ticks_diff(time.ticks_ms(), next_sample) >= 0:
            next_sample = time.ticks_add(next_sample, interval)
            try:
                firmware.sample(read_sensor(), "degC")  # signs here in device-signed mode (seconds on a board)
            except OSError:
                pass  # a sensor that did not answer this time: no reading, no seq used
        firmware.poll()
        time.sleep_ms(5)


main()
