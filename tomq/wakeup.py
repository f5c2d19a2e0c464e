"""A thread's periodic wait that another thread can cut short, and that keeps time when the clock jumps.

`threading.Event().wait(timeout)` waits on a lock with a deadline taken from the clock. Under
libfaketime (the nemesis's clock-jump victim runs a node under it) a jumped clock left such a
wait hanging for minutes, and with it the node's instance worker. poll() takes a relative timeout
that the kernel counts, so a wait built on a socket pair keeps its period whatever the clock
says (tests/test_wakeup.py jumps a real libfaketime clock under it).
"""

from __future__ import annotations

import select
import socket


class Wakeup:
    """`wait(timeout)` returns when `set()` was called since the last wait, or after `timeout` seconds.

    Like an Event that each wait also clears. For one waiting thread; `set()` is safe from any
    thread and from signal handlers (it never blocks and never raises).
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
        woken = bool(self._poll.poll(max(0.0, timeout) * 1000))
        if woken:
            try:
                while self._reader.recv(4096):
                    pass
            except (BlockingIOError, OSError):
                pass  # drained
        return woken

    def close(self) -> None:
        self._reader.close()
        self._writer.close()
