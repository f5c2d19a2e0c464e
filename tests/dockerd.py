"""One private dockerd for the whole test session, and the runtime image built on it once.

    from dockerd import dockerd, runtime_image   # pytest fixtures: base_url, and the image's tag

What was found on Debian 12 / docker.io 20.10 (root, inside a VM without a registry):

* `dockerd --storage-driver=vfs --iptables=false --bridge=none` with its own --data-root,
  --exec-root, --pidfile, -H unix://SOCKET and an empty --config-file touches nothing of a system
  docker: no iptables rules, no docker0 bridge, no /var/lib/docker, no /etc/docker/daemon.json.
  Containers run with `network_mode="host"`. vfs copies each image per container, which costs
  nothing with the runtime image (a few KiB).
* dockerd starts its own containerd (`containerd --config EXEC_ROOT/containerd/containerd.toml`)
  and one `containerd-shim-runc-v2 ... -address EXEC_ROOT/containerd/containerd.sock` per running
  container; the shims are re-parented, not children. Both are recognised by EXEC_ROOT in their
  command lines, which is how teardown finds what this daemon started and only that.
* A unix socket path may be at most 107 bytes, so everything lives in a short /tmp/tqd-XXXX
  directory rather than pytest's tmp_path.

Two test modules import the fixture, which gives pytest two session-scoped fixture definitions;
the daemon is therefore kept here and counted, so there is one per session and it stops with the
last user. Every wait is bounded; teardown removes every container, stops exactly this dockerd and
its containerd and shims (by pid), unmounts what is left under the directory and deletes it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import require
from procs import pid_alive, which
from tomq.mqtt import wait_until

START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0


class DockerdError(RuntimeError):
    pass


def availability() -> tuple[bool, str]:
    """Whether a private dockerd can run here, and if not, why (for conftest.require)."""
    missing = [name for name in ("dockerd", "containerd", "runc") if which(name) is None]
    if missing:
        return False, f"{', '.join(missing)} not found; install the Debian package docker.io"
    if os.geteuid() != 0:
        return False, "dockerd needs root"
    return True, ""


def _processes_mentioning(text: str) -> dict[int, str]:
    """Live processes whose command line contains `text`: pid -> command line."""
    found: dict[int, str] = {}
    needle = text.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if needle in argv and pid_alive(int(entry)):
            found[int(entry)] = argv.replace(b"\0", b" ").decode(errors="replace").strip()
    return found


class PrivateDockerd:
    """A dockerd of our own; see the module docstring."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="tqd-", dir="/tmp"))
        self.socket = self.root / "d.sock"
        self.base_url = f"unix://{self.socket}"
        self.exec_root = self.root / "exec"
        self.log_path = self.root / "dockerd.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.timings: dict[str, float] = {}

    def start(self) -> str:
        begun = time.monotonic()
        config = self.root / "daemon.json"
        config.write_text("{}\n")  # never the system's /etc/docker/daemon.json
        dockerd = which("dockerd")
        assert dockerd is not None
        argv = [dockerd, "--storage-driver=vfs", "--iptables=false", "--ip6tables=false", "--bridge=none",
                f"--config-file={config}", f"--data-root={self.root / 'data'}", f"--exec-root={self.exec_root}",
                f"--pidfile={self.root / 'dockerd.pid'}", f"--host={self.base_url}"]
        with open(self.log_path, "ab") as log:
            # Its own session: a Ctrl-C to pytest must not reach dockerd before teardown does.
            self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        if not wait_until(self._answers, START_TIMEOUT, 0.1) or self.process.poll() is not None:
            problem = (f"exited with {self.process.returncode}" if self.process.poll() is not None
                       else f"did not answer on {self.socket} within {START_TIMEOUT:.0f} s")
            tail = self.tail()
            self.stop()
            raise DockerdError(f"dockerd {problem}\n--- dockerd.log\n{tail}")
        self.timings["start"] = time.monotonic() - begun
        return self.base_url

    def _answers(self) -> bool:
        if self.process is None or self.process.poll() is not None:
            return True  # stop waiting; start() tells why
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.settimeout(2)
                probe.connect(str(self.socket))
                probe.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
                status_line = probe.recv(1024).split(b"\r\n", 1)[0]
        except OSError:
            return False
        return b" 200 " in status_line + b" "

    def ours(self) -> dict[int, str]:
        """dockerd, its containerd and the shims: every process with our exec root in its command line."""
        found = _processes_mentioning(str(self.exec_root))
        if self.process is not None and self.process.poll() is None:
            found[self.process.pid] = "dockerd"
        return found

    def stop(self) -> None:
        """Remove every container, stop dockerd, make sure its children are gone, delete the directory.
        Raises DockerdError if something had to be killed or could not be removed."""
        begun = time.monotonic()
        problems: list[str] = []
        if self.process is not None and self.process.poll() is None:
            try:
                self._remove_containers()
            except Exception as exc:  # keep tearing down; report at the end
                problems.append(f"removing containers: {exc}")
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                problems.append(f"dockerd {self.process.pid} ignored SIGTERM for {STOP_TIMEOUT:.0f} s")
                self.process.kill()
                self.process.wait(10)
        if not wait_until(lambda: not self.ours(), 10, 0.05):
            for pid, argv in self.ours().items():
                problems.append(f"killed leftover {pid}: {argv}")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            wait_until(lambda: not self.ours(), 10, 0.05)
        for mount in self._mounts():
            subprocess.run(["umount", "-l", mount], capture_output=True, timeout=30)
        shutil.rmtree(self.root, ignore_errors=True)
        if self.root.exists():
            problems.append(f"could not remove {self.root}")
        self.timings["stop"] = time.monotonic() - begun
        if problems:
            raise DockerdError("; ".join(problems))

    def _remove_containers(self) -> None:
        import docker

        client = docker.DockerClient(base_url=self.base_url, version="auto", timeout=30)
        try:
            for container in client.containers.list(all=True):
                container.remove(force=True)
        finally:
            client.close()

    def _mounts(self) -> list[str]:
        prefix = str(self.root) + "/"
        with open("/proc/mounts") as mounts:
            points = [line.split()[1].replace("\\040", " ") for line in mounts]
        return sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True)  # innermost first

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


_daemon: PrivateDockerd | None = None
_users = 0
_image: str | None = None
TEST_IMAGE = "tomq/runtime:test"


@pytest.fixture(scope="session")
def dockerd() -> Iterator[str]:
    """The base_url (unix://...) of the session's private dockerd."""
    global _daemon, _users, _image
    available, why = availability()
    require("dockerd", available, why)
    if _daemon is None:
        daemon = PrivateDockerd()
        daemon.start()
        _daemon = daemon
    _users += 1
    try:
        yield _daemon.base_url
    finally:
        _users -= 1
        if _users == 0:
            daemon, _daemon, _image = _daemon, None, None
            daemon.stop()


@pytest.fixture(scope="session")
def runtime_image(dockerd: str) -> str:
    """The tag of the runtime image, built once per session on the private dockerd."""
    global _image
    if _image is None:
        from tomq.node.runtime.image import build_image

        build_image(dockerd, TEST_IMAGE)
        _image = TEST_IMAGE
    return _image


__all__ = ["TEST_IMAGE", "DockerdError", "PrivateDockerd", "availability", "dockerd", "runtime_image"]
