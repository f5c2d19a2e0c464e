"""tomq/wakeup.py: a periodic wait another thread cuts short, and that keeps its period when the
clock jumps (a real libfaketime jump, as the nemesis's clock-jump victim gets)."""

from __future__ import annotations

import select
import subprocess
import sys
import threading
import time
from pathlib import Path

from conftest import require
from nemesis import FAKETIME_LIBRARY, faketime_available
from tomq.wakeup import Wakeup


def test_a_wait_nobody_cuts_short_lasts_its_timeout_and_says_so():
    wakeup = Wakeup()
    started = time.monotonic()
    assert wakeup.wait(0.1) is False
    assert 0.09 <= time.monotonic() - started < 2.0
    wakeup.close()


def test_wake_ups_before_a_wait_end_that_wait_at_once_and_only_that_one():
    wakeup = Wakeup()
    for _ in range(5):
        wakeup.set()
    started = time.monotonic()
    assert wakeup.wait(10) is True
    assert time.monotonic() - started < 1.0
    assert wakeup.wait(0.05) is False  # the five were one wake-up
    wakeup.close()


def test_another_thread_cuts_a_long_wait_short():
    wakeup = Wakeup()
    threading.Timer(0.1, wakeup.set).start()
    started = time.monotonic()
    assert wakeup.wait(30) is True
    assert time.monotonic() - started < 5.0
    wakeup.close()
    wakeup.set()  # closed: never raises (a signal handler may call it during shutdown)


def test_polled_beside_other_sockets_it_shows_readable_until_drained():
    wakeup = Wakeup()
    poller = select.poll()
    poller.register(wakeup, select.POLLIN)  # as the MQTT loops poll it beside the broker connection
    assert poller.poll(0) == []
    wakeup.set()
    assert [fd for fd, _ in poller.poll(1000)] == [wakeup.fileno()]
    wakeup.drain()
    assert poller.poll(0) == []
    wakeup.close()


# The child: an instance worker over a real process runtime, whose clock jumps 30 s ahead mid-run.
_CHILD = """
import sys, time
from pathlib import Path
from tomq.node.orchestrator.instances import InstanceWorker
from tomq.node.runtime.process import ProcessRuntime
clock, state = Path(sys.argv[1]), Path(sys.argv[2])
reports = []
runtime = ProcessRuntime(state, "c", "n1")
worker = InstanceWorker(runtime, lambda *report: reports.append(1), period=0.2)
worker.start()
time.sleep(0.5)
clock.write_text("+30s\\n")
time.sleep(1.5)  # FAKETIME_CACHE_DURATION=1: the jump is in effect by now
before = len(reports)
time.sleep(1.0)  # a relative sleep: unaffected by the jump
print(before, len(reports), flush=True)
worker.stop()
runtime.close()
"""


def test_the_instance_worker_keeps_its_period_when_the_clock_jumps(tmp_path: Path):
    require("libfaketime", faketime_available(), "install the Debian package faketime")
    clock = tmp_path / "faketime"
    clock.write_text("+0\n")
    env = {"LD_PRELOAD": str(FAKETIME_LIBRARY), "FAKETIME_TIMESTAMP_FILE": str(clock),
           "FAKETIME_CACHE_DURATION": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", _CHILD, str(clock), str(tmp_path / "state")], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    before, after = map(int, done.stdout.split())
    assert before >= 2, done.stdout  # it reported before the jump took effect
    # Every 0.2 s for a second after the jump: about five passes. A wait on a lock's deadline made none.
    assert after - before >= 3, (before, after)
