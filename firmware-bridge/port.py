"""The serial line as the bridge sees it: a small interface, pyserial behind it, and an in-memory twin.

`SerialLine` is all the bridge needs: read what has arrived (waiting at most `timeout`), write, close.
A line that is gone (the device was unplugged, the pty's other end closed) raises `LineGone` from
read or write; the bridge then closes it and opens the path again with back-off. pyserial's and the
OS's exceptions never leave this module.

What this module must never do: interpret bytes, or retry on its own (the bridge owns back-off).
"""

from __future__ import annotations

import select
import threading
from collections.abc import Callable
from typing import Protocol

import serial

from tomq.errors import TomqError

WRITE_TIMEOUT = 2.0  # a device that stops reading must not stall the bridge forever


class LineGone(TomqError):
    """The serial device is gone (unplugged, or the other end closed); open it again later."""


class SerialLine(Protocol):
    def read(self, timeout: float) -> bytes: ...

    def write(self, data: bytes) -> None: ...

    def close(self) -> None: ...


Opener = Callable[[str, int], SerialLine]


class PySerialLine:
    """A real port (or a pty's slave end) through pyserial, opened exclusively, raw, 8N1."""

    def __init__(self, path: str, baud: int) -> None:
        try:
            self._serial = serial.Serial(port=path, baudrate=baud, timeout=0, write_timeout=WRITE_TIMEOUT,
                                         exclusive=True)
        except (serial.SerialException, OSError, ValueError) as exc:
            raise LineGone(f"cannot open {path} at {baud} baud: {exc}") from None
        self.path = path
        self.write_timeouts = 0

    def read(self, timeout: float) -> bytes:
        # pyserial's timeout is fixed at 0 (setting it reconfigures the port): wait with select here.
        try:
            ready, _, _ = select.select([self._serial.fileno()], [], [], timeout)
            if not ready:
                return b""
            return bytes(self._serial.read(max(1, self._serial.in_waiting)))
        except (serial.SerialException, OSError, TypeError, ValueError) as exc:
            # pyserial reports a vanished pty or USB device as "readiness to read but returned no data"
            raise LineGone(f"{self.path}: {exc}") from None

    def write(self, data: bytes) -> None:
        try:
            self._serial.write(data)
        except serial.SerialTimeoutException:
            self.write_timeouts += 1  # the device is not reading; what it missed it asks for again
        except (serial.SerialException, OSError) as exc:
            raise LineGone(f"{self.path}: {exc}") from None

    def close(self) -> None:
        try:
            self._serial.close()
        except (serial.SerialException, OSError):
            pass


def open_pyserial(path: str, baud: int) -> SerialLine:
    return PySerialLine(path, baud)


class MemoryLine:
    """One end of an in-memory serial line (see `memory_pair`): for protocol tests and benchmarks."""

    def __init__(self, incoming: bytearray, outgoing: bytearray, condition: threading.Condition) -> None:
        self._incoming, self._outgoing, self._condition = incoming, outgoing, condition
        self.closed = False
        self.peer: MemoryLine | None = None

    def read(self, timeout: float) -> bytes:
        with self._condition:
            if not self._incoming and not self.closed:
                self._condition.wait(timeout)
            if self.closed or (self.peer is not None and self.peer.closed and not self._incoming):
                raise LineGone("the memory line is closed")
            data = bytes(self._incoming)
            self._incoming.clear()
            return data

    def write(self, data: bytes) -> None:
        with self._condition:
            if self.closed or (self.peer is not None and self.peer.closed):
                raise LineGone("the memory line is closed")
            self._outgoing += data
            self._condition.notify_all()

    def close(self) -> None:
        with self._condition:
            self.closed = True
            self._condition.notify_all()


def memory_pair() -> tuple[MemoryLine, MemoryLine]:
    condition = threading.Condition()
    a_to_b, b_to_a = bytearray(), bytearray()
    a, b = MemoryLine(b_to_a, a_to_b, condition), MemoryLine(a_to_b, b_to_a, condition)
    a.peer, b.peer = b, a
    return a, b
