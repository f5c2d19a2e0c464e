"""Real processes for integration tests: a mosquitto broker and tomq node daemons on loopback.

Every process started here is stopped by the same fixture that started it, and only that process.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

from tomq.ports import free_port as free_port  # tests import it from here

PYTHON = sys.executable
_SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")


def which(program: str) -> str | None:
    return shutil.which(program, path=os.pathsep.join([os.environ.get("PATH", ""), *_SBIN]))


def wait_for_port(port: int, process: subprocess.Popen[bytes] | None = None, timeout: float = 10.0,
                  alive: Callable[[], bool] | None = None) -> None:
    """Wait until 127.0.0.1:port accepts; fail early if `process` exits or `alive()` turns false."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening on {port}")
        if alive is not None and not alive():
            raise RuntimeError(f"the server exited before it listened on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listened on 127.0.0.1:{port} within {timeout} s")


def metrics_port_in_log(path: Path, offset: int = 0, process: subprocess.Popen[bytes] | None = None,
                        timeout: float = 15.0) -> int:
    """The port a node or broker started with `--metrics-port 0` announced in its log after `offset`.

    The process picks the port itself: one found free here and passed on could be taken (by any
    outgoing connection's ephemeral port) before the process binds it, and then it refuses to start."""
    deadline = time.monotonic() + timeout
    while True:
        with open(path, "rb") as log:
            log.seek(offset)
            found = re.search(rb"metrics on http://127\.0\.0\.1:(\d+)/metrics", log.read())
        if found:
            return int(found.group(1))
        if time.monotonic() > deadline or (process is not None and process.poll() is not None):
            raise RuntimeError(f"no metrics port announced in {path}")
        time.sleep(0.05)


class HasLog(Protocol):
    def tail(self, lines: int = 30) -> str: ...


def leader_from_logs(nodes: Mapping[str, HasLog], lines: int = 4000) -> str | None:
    """The node that most recently logged becoming leader (the highest term), from the nodes' logs."""
    best: tuple[int, str] | None = None
    for name, node in nodes.items():
        for line in node.tail(lines).splitlines():
            if "became leader of term" in line:
                term = int(line.rsplit(" ", 1)[1])
                best = max(best or (term, name), (term, name))
    return best[1] if best else None


def pid_alive(pid: int) -> bool:
    """Whether `pid` is a running process (a zombie, dead but not yet reaped, is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2 :].split()[0] not in ("Z", "X")


def stop_process(process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM `process` if it still runs, and SIGKILL it if it has not exited after `timeout` s."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)


def kill_process(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL `process` if it still runs, and reap it."""
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
        process.wait(10)


class Mosquitto:
    """A real mosquitto running the cluster's policy: the files `tomq broker --mosquitto-conf` emits."""

    name = "mosquitto"

    def __init__(self, cluster_dir: Path, workdir: Path, port: int | None = None) -> None:
        from tomq.broker.mosquitto import write_mosquitto_config

        self.port = port or free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        self.cluster_dir = cluster_dir
        self.workdir = workdir
        self.config = write_mosquitto_config(cluster_dir, workdir / "conf", self.port)
        self.log = open(workdir / "mosquitto.log", "ab")
        self.process: subprocess.Popen[bytes] | None = None

    def refresh(self) -> None:
        """Write the files again (after `tomq device add`) and make mosquitto re-read them."""
        from tomq.broker.mosquitto import write_mosquitto_config

        write_mosquitto_config(self.cluster_dir, self.workdir / "conf", self.port)
        if self.process is not None:
            self.process.send_signal(signal.SIGHUP)

    def start(self) -> None:
        binary = which("mosquitto")
        assert binary is not None
        self.process = subprocess.Popen([binary, "-c", str(self.config)], stdout=self.log, stderr=subprocess.STDOUT)
        wait_for_port(self.port, self.process)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, 5)
        self.process = None

    def close(self) -> None:
        self.stop()
        self.log.close()


class AmqttBroker(Mosquitto):
    """The embedded amqtt broker as its own process: `tomq broker DIR --port P`."""

    name = "amqtt"

    def __init__(self, cluster_dir: Path, workdir: Path, port: int | None = None,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.port = port or free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        self.cluster_dir = cluster_dir
        self.workdir = workdir
        self.extra_args = extra_args
        self.log = open(workdir / "amqtt.log", "ab")
        self.process = None

    def refresh(self) -> None:
        pass  # the embedded broker reloads its policy when cluster.toml or passwd change

    def start(self) -> None:
        self.process = subprocess.Popen(
            [PYTHON, "-m", "tomq", "broker", str(self.cluster_dir), "--port", str(self.port), *self.extra_args],
            stdout=self.log, stderr=subprocess.STDOUT)
        wait_for_port(self.port, self.process, timeout=20)


BROKERS = {"mosquitto": Mosquitto, "amqtt": AmqttBroker}


class NodeProcess:
    """`tomq node` (or a test child) as a separate process, with its log kept for failures."""

    def __init__(self, argv: list[str], log_path: Path) -> None:
        self.argv = argv
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.log_offset = 0

    def start(self) -> None:
        log = open(self.log_path, "ab")
        self.log_offset = log.tell()  # where this run's lines begin (the log outlives restarts)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def kill(self) -> None:
        if self.process is not None:
            kill_process(self.process)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            stop_process(self.process)

    def metrics_port(self) -> int:
        """The port this run's `--metrics-port 0` bound, from its log."""
        return metrics_port_in_log(self.log_path, self.log_offset, self.process)

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""


