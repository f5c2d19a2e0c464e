"""Real processes for integration tests: a mosquitto broker and tomq node daemons on loopback.

Every process started here is stopped by the same fixture that started it, and only that process.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

_SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")


def which(program: str) -> str | None:
    return shutil.which(program, path=os.pathsep.join([os.environ.get("PATH", ""), *_SBIN]))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[bytes] | None = None, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listened on 127.0.0.1:{port} within {timeout} s")


class Mosquitto:
    """A real mosquitto with the cluster's password file (authentication only; ACLs are tested elsewhere)."""

    def __init__(self, cluster_dir: Path, workdir: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        passwd = workdir / "passwd"
        shutil.copyfile(cluster_dir / "broker" / "passwd", passwd)
        os.chmod(passwd, 0o600)
        self.config = workdir / "mosquitto.conf"
        self.config.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous false\npassword_file {passwd}\n"
            f"persistence false\nuser {pwd.getpwuid(os.getuid()).pw_name}\nmax_queued_messages 100000\n"
        )
        self.log = open(workdir / "mosquitto.log", "wb")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = which("mosquitto")
        assert binary is not None
        self.process = subprocess.Popen([binary, "-c", str(self.config)], stdout=self.log, stderr=subprocess.STDOUT)
        wait_for_port(self.port, self.process)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None

    def close(self) -> None:
        self.stop()
        self.log.close()


class NodeProcess:
    """`tomq node` (or a test child) as a separate process, with its log kept for failures."""

    def __init__(self, argv: list[str], log_path: Path) -> None:
        self.argv = argv
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.log_path, "ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""


PYTHON = sys.executable
