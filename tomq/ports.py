"""A free loopback port for a server that another process will bind a moment later.

The usual trick, bind port 0 and hand the number on, leaves the port free until the server binds
it, and meanwhile any outgoing connection on the machine may get it as its source port: the kernel
hands out ports for `bind(0)` and for `connect()` from the same ephemeral range. A test suite or a
demo opens thousands of connections, so now and then a broker could not bind (EADDRINUSE). Ports
below that range are never given to outgoing connections, so pick there, at random, and check that
nothing listens on the one picked.
"""

from __future__ import annotations

import secrets
import socket
from pathlib import Path

EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
DEFAULT_EPHEMERAL_LOW = 32768  # Linux's default when the file cannot be read
PICK_BELOW = 10_000  # how many ports under the ephemeral range to pick from
FIRST_UNPRIVILEGED = 1024
ATTEMPTS = 200

_handed_out: set[int] = set()


def ephemeral_low() -> int:
    """The first port of the range the kernel gives outgoing connections."""
    try:
        return int(EPHEMERAL_RANGE_FILE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return DEFAULT_EPHEMERAL_LOW


def free_port() -> int:
    """A loopback port nothing is bound to now, outside the ephemeral range when there is room below
    it, and never one this process has handed out before (one handed out may not be bound yet by the
    server it was picked for)."""
    high = ephemeral_low()
    low = max(FIRST_UNPRIVILEGED, high - PICK_BELOW)
    if high - low >= ATTEMPTS:
        for _ in range(ATTEMPTS):
            port = low + secrets.randbelow(high - low)
            if port not in _handed_out and _bindable(port):
                _handed_out.add(port)
                return port
    while True:  # no room below the range (or all taken): let the kernel choose
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
