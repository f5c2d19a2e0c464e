"""Helpers shared by the benchmarks that run real processes (bench/cluster.py, bench/orchestration.py).

Every process started through `Processes` runs in its own session and is stopped by its own handle;
nothing else is touched. Benchmarks do not import from tests/.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from tomq.ports import free_port as free_port  # the benches import it from here

PYTHON = sys.executable
SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def which(program: str) -> str | None:
    return shutil.which(program, path=os.pathsep.join([os.environ.get("PATH", ""), *SBIN]))


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listened on 127.0.0.1:{port} within {timeout} s")


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def num(value: float | None, fmt: str = ".0f") -> str:
    return "-" if value is None else format(value, fmt)


def log_tails(workdir: Path, names: Iterable[str], lines: int = 15) -> str:
    """The last lines of each `<name>.log` in `workdir` that exists, under a header each."""
    out = []
    for name in names:
        path = workdir / f"{name}.log"
        if path.exists():
            out.append(f"--- {name}.log (last lines)\n"
                       + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
    return "\n".join(out)


def interrupted(signum: int, _frame: object) -> None:
    """A signal handler: SIGTERM (or SIGINT) stops a run as Ctrl-C does, through the cleanup."""
    raise KeyboardInterrupt(f"signal {signum}")


# --------------------------------------------------------------------------- processes


class Processes:
    """Every process this bench started, and only those: each is stopped by its own handle."""

    def __init__(self) -> None:
        self.running: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], log_path: Path, *, cwd: Path | None = None,
              env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
        with open(log_path, "ab") as out:
            process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=cwd,
                                       env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})))
        self.running.append(process)
        return process

    def kill(self, process: subprocess.Popen[bytes]) -> None:
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        process.wait(10)
        self.running.remove(process)

    def stop(self, process: subprocess.Popen[bytes]) -> None:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        if process in self.running:
            self.running.remove(process)

    def stop_all(self) -> None:
        for process in reversed(list(self.running)):
            self.stop(process)


def cpu_seconds(processes: Mapping[str, subprocess.Popen[bytes] | None]) -> dict[str, float]:
    """CPU seconds (user + system) used so far by each live process, and by this one as "client"."""
    used = {"client": time.process_time()}
    for name, process in processes.items():
        if process is not None:
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{process.pid}/stat").read_text().rpartition(")")[2].split()
                used[name] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return used


def scheduler_seconds(processes: Mapping[str, subprocess.Popen[bytes] | None]) -> dict[str, tuple[float, float]]:
    """(seconds on a CPU, seconds runnable but waiting for one) so far, summed over the threads of each
    live process and of this one as "client" (/proc/<pid>/task/<tid>/schedstat). On a small machine
    the wait is where a latency goes that no process's own work explains."""
    pids = {"client": os.getpid(), **{name: p.pid for name, p in processes.items() if p is not None}}
    times: dict[str, tuple[float, float]] = {}
    for name, pid in pids.items():
        running = waiting = 0
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{pid}/task").iterdir():
                with contextlib.suppress(OSError, ValueError):
                    on_cpu, runnable, _ = (task / "schedstat").read_text().split()
                    running += int(on_cpu)
                    waiting += int(runnable)
            times[name] = (running / 1e9, waiting / 1e9)
    return times


def per_record_ms(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]], count: int,
                  leader: str | None = None) -> dict[str, tuple[float, float]]:
    """`scheduler_seconds` differences in ms per record of `count`, by process; the leader, if named, marked."""
    return {f"{name} (leader)" if name == leader else name:
            ((after[name][0] - before[name][0]) / count * 1000, (after[name][1] - before[name][1]) / count * 1000)
            for name in after if name in before}


def cpu_shares(before: dict[str, float], after: dict[str, float], elapsed: float,
               leader: str | None = None) -> dict[str, float]:
    """Each process's CPU use over `elapsed` seconds, 1.0 being one core busy; the leader, if named, marked."""
    return {(f"{name} (leader)" if leader is not None and name == leader else name): (used - before[name]) / elapsed
            for name, used in after.items() if name in before}
