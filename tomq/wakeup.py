"""A thread's wait that another thread (or a signal handler) can cut short, and that keeps time
when the clock jumps.

A socket pair: `set()` writes a byte, the waiter polls the other end. Two uses: on its own, a
periodic wait (`wait(timeout)`, the instance worker), or polled beside a broker connection by the
MQTT loops (`fileno()`, then `drain()`), so a loop blocked on the network returns when there is
something to send.

Not `threading.Event().wait(timeout)`: that waits on a lock with a deadline taken from the clock,
and under libfaketime (the nemesis's clock-jump victim runs a node under it) a jumped clock left
such a wait hanging for minutes. poll() takes a relative timeout that the kernel counts, so this
keeps its period whatever the clock says (tests/test_wakeup.py jumps a real libfaketime clock under it).
"""

from __future__ import annotations

import math
import select
import socket


class Wakeup:
    """`wait(timeout)` returns when `set()` was called since the last wait or drain, or after `timeout`.

    Like an Event that each wait also clears. For one waiting thread; `set()` is safe from any
    thread and from signal handlers (it never blocks and never raises), also after `close()`.
    """

    def __init__(self) -> None:
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)
        self._poll = select.poll()
        self._poll.register(self._reader, select.POLLIN)

    def set(self) -> None:
        try:
            self._writer.send(b"\0")
        except OSError:
            pass  # the buffer is full (a wake-up is pending anyway) or we are closed

    def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds; True if woken by `set()` (and forget the wake-ups so far)."""
        woken = bool(self._poll.poll(math.ceil(max(0.0, timeout) * 1000)))
        if woken:
            self.drain()
        return woken

    def fileno(self) -> int:
        """The end to poll for POLLIN beside other sockets; `drain()` once it is readable."""
        return self._reader.fileno()

    def drain(self) -> None:
        """Forget the wake-ups so far."""
        try:
            while self._reader.recv(4096):
                pass
        except OSError:
            pass  # drained (BlockingIOError), or closed

    def close(self) -> None:
        self._reader.close()
        self._writer.close()
