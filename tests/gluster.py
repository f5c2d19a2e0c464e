"""A real GlusterFS volume for tests: replicated bricks on this machine, mounted with FUSE.

    volume = GlusterVolume(tmp_path)       # replica 3, a unique name tomq-<hex>
    mount = volume.start()                 # glusterd (if none runs), create, start, mount
    volume.kill_brick(1)                   # SIGKILL exactly that brick's glusterfsd
    volume.stop()                          # unmount, stop, delete, remove bricks; our glusterd only

What was found on Debian 12 / GlusterFS 10.3 (root, /dev/fuse):

* glusterd takes a private configuration: `glusterd -N -f VOLFILE` with `working-directory`,
  `run-directory` and `glusterd-sockfile` in VOLFILE keeps its state (/var/lib/glusterd), pid files
  and CLI socket under a directory of ours; the CLI follows with `--glusterd-sock`. It still listens
  on TCP 24007 (bricks and clients fetch their volfiles there), so only one glusterd per machine:
  when one already runs, this helper uses it (and its socket) and never stops it.
* Not private whatever the options: bricks' and the self-heal daemon's unix sockets
  (/var/run/gluster/<hash>.socket, left behind by glusterd) and brick logs
  (/var/log/glusterfs/bricks/<path>.log). Both are read off the processes' command lines; at stop the
  sockets are removed and the logs moved under tmp_path (gluster-logs/).
* Bricks under /tmp (pytest's tmp_path) are accepted; `force` is needed because three bricks of one
  replica set sit on one server (and on the root filesystem).
* The CLI refuses `localhost`, `127.0.0.1` and 0.x as brick hosts, but any other loopback address
  works: the host name when it resolves to an address of this machine, else 127.0.0.2.

Every wait is bounded; every process stopped here is one this volume started or owns by name.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from procs import pid_alive, which
from tomq.mqtt import wait_until

GLUSTER_COMMANDS = ("glusterd", "gluster", "glusterfs", "glusterfsd", "mount.glusterfs")
PROCESS_NAMES = frozenset({"glusterd", "glusterfs", "glusterfsd"})
DEFAULT_VOLFILE = Path("/etc/glusterfs/glusterd.vol")
DEFAULT_CLI_SOCKET = Path("/var/run/glusterd.socket")
CLI_TIMEOUT = 30.0


class GlusterError(RuntimeError):
    pass


def availability() -> tuple[bool, str]:
    """Whether a volume can be made here, and if not, why (for conftest.require)."""
    missing = [name for name in GLUSTER_COMMANDS if which(name) is None]
    if missing:
        return False, f"{', '.join(missing)} not found; install the Debian package glusterfs-server"
    if os.geteuid() != 0:
        return False, "glusterd, bricks and FUSE mounts need root"
    if not os.path.exists("/dev/fuse"):
        return False, "/dev/fuse is missing"
    return True, ""


@dataclass(frozen=True)
class Proc:
    pid: int
    name: str
    argv: tuple[str, ...]


def gluster_processes() -> dict[int, Proc]:
    """Live (non-zombie) glusterd / glusterfs / glusterfsd processes on this machine."""
    found: dict[int, Proc] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        name, state = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()[0]
        if name in PROCESS_NAMES and state not in ("Z", "X"):
            found[int(entry)] = Proc(int(entry), name, tuple(a.decode(errors="replace") for a in argv if a))
    return found


def mounted(path: Path) -> bool:
    target = str(path)
    with open("/proc/mounts") as mounts:
        return any(line.split()[1].replace("\\040", " ") == target for line in mounts)


def _option(argv: tuple[str, ...], *names: str) -> str | None:
    """The value of `-x VALUE`, `--long VALUE` or `--long=VALUE` in argv."""
    for i, arg in enumerate(argv):
        for name in names:
            if arg == name and i + 1 < len(argv):
                return argv[i + 1]
            if name.startswith("--") and arg.startswith(name + "="):
                return arg[len(name) + 1 :]
    return None


def _brick_host() -> str:
    """A name for this machine that glusterd accepts as a brick host (see the module docstring)."""
    def local(address: str) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((address, 0))
            except OSError:
                return False
        return True

    hostname = socket.gethostname()
    with contextlib.suppress(OSError):
        if hostname not in ("localhost", "") and local(socket.gethostbyname(hostname)):
            return hostname
    return "127.0.0.2"


class GlusterVolume:
    def __init__(self, tmp_path: Path, replica: int = 3, name: str | None = None) -> None:
        self.name = name or f"tomq-{secrets.token_hex(4)}"
        self.tmp_path = tmp_path
        self.root = tmp_path / "gluster"
        self.bricks = [self.root / "bricks" / f"b{i}" for i in range(replica)]
        self.mount = self.root / "mnt"
        self.host = _brick_host()
        self.private: Path | None = None  # our glusterd's directory, when we started one
        self.glusterd: subprocess.Popen[bytes] | None = None
        self.cli_socket = DEFAULT_CLI_SOCKET
        self.cli_log = self.root / "cli.log"
        self.created = False
        self.started = False
        self.is_mounted = False
        self.owned: dict[int, Proc] = {}  # bricks, self-heal daemon and FUSE client this volume started
        self.killed: list[int] = []
        self.killed_pidfiles: dict[int, Path] = {}  # brick index -> the pid file its killed process left
        self.timings: dict[str, float] = {}
        self.stopped = False

    # ------------------------------------------------------------------ queries

    def brick_path(self, index: int) -> Path:
        return self.bricks[index]

    def gluster(self, *args: str, check: bool = True, timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess[str]:
        argv = [which("gluster") or "gluster", "--mode=script", f"--glusterd-sock={self.cli_socket}",
                f"--log-file={self.cli_log}", *args]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if check and result.returncode != 0:
            raise GlusterError(f"gluster {' '.join(args)} exited {result.returncode}: "
                               f"{(result.stdout + result.stderr).strip()}{self._glusterd_tail()}")
        return result

    def status(self) -> dict[str, tuple[bool, int | None]]:
        """Brick path -> (online, pid) from `volume status --xml`; the self-heal daemon under "shd"."""
        out = self.gluster("volume", "status", self.name, "--xml").stdout
        root = ET.fromstring(out)
        result: dict[str, tuple[bool, int | None]] = {}
        for node in root.iter("node"):
            host, path = node.findtext("hostname", ""), node.findtext("path", "")
            online = node.findtext("status") == "1"
            pid_text = node.findtext("pid", "")
            pid = int(pid_text) if pid_text.isdigit() and int(pid_text) > 0 else None
            result["shd" if host == "Self-heal Daemon" else path] = (online, pid)
        return result

    def brick_pid(self, index: int) -> int | None:
        online, pid = self.status().get(str(self.bricks[index]), (False, None))
        return pid if online else None

    def volumes(self) -> list[str]:
        out = self.gluster("volume", "list").stdout
        return [line.strip() for line in out.splitlines() if line.strip() and "No volumes" not in line]

    def ours(self) -> dict[int, Proc]:
        """Live processes that belong to this volume: by name in their command line, or recorded at start."""
        mine = {}
        for pid, proc in gluster_processes().items():
            argv = " ".join(proc.argv)
            if pid == (self.glusterd.pid if self.glusterd else None) or pid in self.owned or (
                    proc.name in ("glusterfs", "glusterfsd") and re.search(rf"(^|[\s/=.]){re.escape(self.name)}([\s.]|$)", argv)):
                mine[pid] = proc
        return mine

    # ------------------------------------------------------------------ start

    def start(self) -> Path:
        begun = time.monotonic()
        for brick in self.bricks:
            brick.mkdir(parents=True)
        self.mount.mkdir(parents=True)
        try:
            self._ensure_glusterd()
            t = time.monotonic()
            self.gluster("volume", "create", self.name, "replica", str(len(self.bricks)),
                         *(f"{self.host}:{brick}" for brick in self.bricks), "force")
            self.created = True
            self.gluster("volume", "start", self.name)
            self.started = True
            if not wait_until(lambda: all(self.status().get(str(b), (False, None))[0] for b in self.bricks), 20, 0.2):
                raise GlusterError(f"bricks not online within 20 s: {self.status()}")
            self.timings["create+start"] = time.monotonic() - t
            self._record_processes()
            t = time.monotonic()
            self._mount()
            self.timings["mount"] = time.monotonic() - t
        except BaseException:
            self.stop()
            raise
        self.timings["start"] = time.monotonic() - begun
        return self.mount

    def _ensure_glusterd(self) -> None:
        running = [p for p in gluster_processes().values() if p.name == "glusterd"]
        if running:
            # Somebody else's glusterd: talk to it on its own socket, and leave it running.
            volfile = Path(_option(running[0].argv, "-f", "--volfile") or DEFAULT_VOLFILE)
            self.cli_socket = DEFAULT_CLI_SOCKET
            with contextlib.suppress(OSError):
                match = re.search(r"^\s*option\s+glusterd-sockfile\s+(\S+)", volfile.read_text(), re.M)
                if match:
                    self.cli_socket = Path(match.group(1))
            self.gluster("volume", "list")  # fails loudly if we cannot talk to it
            return
        t = time.monotonic()
        # A short path: glusterd's unix sockets live under run-directory (108-byte limit).
        self.private = Path(tempfile.mkdtemp(prefix="tomq-gd-"))
        work, run = self.private / "work", self.private / "run"
        work.mkdir()
        run.mkdir()
        volfile = self.private / "glusterd.vol"
        volfile.write_text(
            "volume management\n"
            "    type mgmt/glusterd\n"
            f"    option working-directory {work}\n"
            f"    option run-directory {run}\n"
            f"    option glusterd-sockfile {run / 'glusterd.socket'}\n"
            "    option transport-type socket\n"
            "    option transport.socket.listen-port 24007\n"
            "    option ping-timeout 0\n"
            "    option event-threads 1\n"
            "    option max-port 60999\n"
            "end-volume\n")
        self.cli_socket = run / "glusterd.socket"
        self.cli_log = self.private / "cli.log"
        with open(self.private / "glusterd.out", "wb") as out:
            self.glusterd = subprocess.Popen(
                [which("glusterd") or "glusterd", "-N", "-f", str(volfile), "-p", str(self.private / "glusterd.pid"),
                 "-l", str(self.private / "glusterd.log"), "-L", "INFO"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

        def ready() -> bool:
            if self.glusterd is None or self.glusterd.poll() is not None:
                raise GlusterError(f"glusterd exited with {self.glusterd and self.glusterd.returncode}"
                                   f"{self._glusterd_tail()}")
            return self.cli_socket.exists() and self.gluster("volume", "list", check=False, timeout=10).returncode == 0

        if not wait_until(ready, 20, 0.1):
            raise GlusterError(f"glusterd did not answer on {self.cli_socket} within 20 s{self._glusterd_tail()}")
        self.timings["glusterd"] = time.monotonic() - t

    def _record_processes(self) -> None:
        """Remember our bricks and self-heal daemon by pid, with the files they leave outside tmp_path."""
        for key, (online, pid) in self.status().items():
            if key == "shd" and self.glusterd is None:
                continue  # the self-heal daemon of somebody else's glusterd may serve other volumes too
            if online and pid is not None and pid_alive(pid):
                for proc in gluster_processes().values():
                    if proc.pid == pid:
                        self.owned[pid] = proc

    def _mount(self) -> None:
        log = self.root / "mount.log"
        result = subprocess.run(
            ["mount", "-t", "glusterfs", "-o", f"log-file={log}", f"{self.host}:/{self.name}", str(self.mount)],
            capture_output=True, text=True, timeout=CLI_TIMEOUT, stdin=subprocess.DEVNULL)
        if result.returncode != 0 or not mounted(self.mount):
            raise GlusterError(f"mount failed ({result.returncode}): {result.stdout}{result.stderr}")
        self.is_mounted = True
        for pid, proc in gluster_processes().items():
            if proc.name == "glusterfs" and str(self.mount) in proc.argv:
                self.owned[pid] = proc
        probe = self.mount / f".tomq-probe-{secrets.token_hex(4)}"

        def writable() -> bool:
            try:
                probe.write_bytes(b"probe")
                ok = probe.read_bytes() == b"probe"
                probe.unlink()
                return ok
            except OSError:
                return False

        if not wait_until(writable, 20, 0.2):
            raise GlusterError(f"{self.mount} is not writable within 20 s")

    # ------------------------------------------------------------------ faults

    def kill_brick(self, index: int) -> int:
        """SIGKILL the brick process of brick `index`; return its pid once it is gone and glusterd says so."""
        pid = self.brick_pid(index)
        if pid is None or not pid_alive(pid):
            raise GlusterError(f"brick {index} ({self.bricks[index]}) is not online: {self.status()}")
        process_argv = gluster_processes()[pid].argv
        argv = " ".join(process_argv)
        if str(self.bricks[index]) not in argv:  # never kill anything but that very brick
            raise GlusterError(f"pid {pid} is not brick {self.bricks[index]}: {argv}")
        pidfile = _option(process_argv, "-p", "--pid-file")
        if pidfile:
            self.killed_pidfiles[index] = Path(pidfile)
        os.kill(pid, signal.SIGKILL)
        self.killed.append(pid)
        if not wait_until(lambda: not pid_alive(pid), 10, 0.1):
            raise GlusterError(f"brick pid {pid} still alive 10 s after SIGKILL")
        if not wait_until(lambda: not self.status().get(str(self.bricks[index]), (True, None))[0], 20, 0.2):
            raise GlusterError(f"glusterd still reports brick {index} online 20 s after SIGKILL: {self.status()}")
        return pid

    def restart_brick(self, index: int) -> int:
        """Start a killed brick again (`volume start V force` starts only bricks that are down) and ask for
        a heal; return its new pid once glusterd reports it online."""
        # The killed brick's pid file stays behind; once its pid is reused by another process (this
        # machine starts many), glusterd "discovers an already-running brick" and starts nothing.
        pidfile = self.killed_pidfiles.pop(index, None)
        if pidfile is not None:
            pidfile.unlink(missing_ok=True)
        self.gluster("volume", "start", self.name, "force")
        if not wait_until(lambda: self.brick_pid(index) is not None, 20, 0.2):
            raise GlusterError(f"brick {index} not online 20 s after `volume start force`: {self.status()}")
        self._record_processes()
        # `volume heal` reports failure with a private glusterd ("brick op 'Heal' failed") and `heal info`
        # cannot fetch its volfile, yet the self-heal daemon copies what the brick missed within seconds
        # of it coming back: callers wait for the brick's files instead.
        self.gluster("volume", "heal", self.name, check=False)
        pid = self.brick_pid(index)
        assert pid is not None
        return pid

    # ------------------------------------------------------------------ stop

    def stop(self) -> None:
        """Undo start(), whatever state it reached. Raises GlusterError if something was left behind."""
        if self.stopped:
            return
        self.stopped = True
        begun = time.monotonic()
        problems: list[str] = []

        def attempt(what: str, action: Callable[[], object]) -> None:
            try:
                action()
            except Exception as exc:  # keep tearing down; report at the end
                problems.append(f"{what}: {exc}")

        if self.is_mounted or mounted(self.mount):
            attempt("unmount", self._unmount)
        if self.started:
            def stop_volume() -> None:
                if self.gluster("volume", "stop", self.name, check=False).returncode != 0:
                    self.gluster("volume", "stop", self.name, "force")
            attempt("volume stop", stop_volume)
        if self.created:
            attempt("volume delete", lambda: self.gluster("volume", "delete", self.name))
            if self.glusterd is None or self.glusterd.poll() is None:
                attempt("volume list", lambda: self._check_deleted())
        # Our bricks and FUSE client must be gone by now; anything left is killed, by pid, and reported.
        if not wait_until(lambda: not self._leftovers(), 10, 0.1):
            for pid, proc in self._leftovers().items():
                problems.append(f"killed leftover {proc.name} {pid}: {' '.join(proc.argv)}")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            wait_until(lambda: not self._leftovers(), 10, 0.1)
        if self.glusterd is not None:
            attempt("stop glusterd", self._stop_glusterd)
        if not wait_until(lambda: not self.ours(), 10, 0.1):
            problems.append(f"processes left: {self.ours()}")
        self._remove_outside_files()
        attempt("remove bricks", self._remove_bricks)
        if self.private is not None:
            with contextlib.suppress(OSError):
                logs = self.root / "gluster-logs"
                logs.mkdir(parents=True, exist_ok=True)
                for name in ("glusterd.log", "glusterd.out", "cli.log"):
                    if (self.private / name).exists():
                        shutil.copy(self.private / name, logs / name)
            shutil.rmtree(self.private, ignore_errors=True)
        self.timings["stop"] = time.monotonic() - begun
        if problems:
            raise GlusterError("; ".join(problems))

    def _leftovers(self) -> dict[int, Proc]:
        # The self-heal daemon of a glusterd we do not own may serve other volumes: not ours to kill.
        return {pid: p for pid, p in self.ours().items()
                if p.name != "glusterd" and (self.glusterd is not None or "glustershd" not in p.argv)}

    def _unmount(self) -> None:
        client = [pid for pid, p in self.owned.items() if p.name == "glusterfs" and str(self.mount) in p.argv]
        result = subprocess.run(["umount", str(self.mount)], capture_output=True, text=True, timeout=CLI_TIMEOUT)
        if result.returncode != 0 and mounted(self.mount):
            subprocess.run(["umount", "-l", str(self.mount)], capture_output=True, text=True, timeout=CLI_TIMEOUT)
        if mounted(self.mount):
            raise GlusterError(f"{self.mount} is still mounted: {result.stderr.strip()}")
        self.is_mounted = False
        if not wait_until(lambda: not any(pid_alive(pid) for pid in client), 10, 0.1):
            raise GlusterError(f"FUSE client {client} still running 10 s after unmount")

    def _check_deleted(self) -> None:
        if self.name in self.volumes():
            raise GlusterError(f"{self.name} still listed by `gluster volume list` after delete")

    def _stop_glusterd(self) -> None:
        assert self.glusterd is not None
        if self.glusterd.poll() is None:
            self.glusterd.terminate()
            try:
                self.glusterd.wait(15)
            except subprocess.TimeoutExpired:
                self.glusterd.kill()
                self.glusterd.wait(10)

    def _remove_outside_files(self) -> None:
        """The unix sockets and brick logs glusterd puts outside our directories (see the docstring)."""
        logs = self.root / "gluster-logs"
        for proc in self.owned.values():
            sock = _option(proc.argv, "-S", "--socket-file")
            if sock and sock.startswith("/var/run/gluster/") and sock.endswith(".socket"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(sock)
            log = _option(proc.argv, "-l", "--log-file")
            if log and log.startswith("/var/log/glusterfs/bricks/") and os.path.exists(log):
                with contextlib.suppress(OSError):
                    logs.mkdir(parents=True, exist_ok=True)
                    shutil.move(log, logs / os.path.basename(log))

    def _remove_bricks(self) -> None:
        if mounted(self.mount):
            raise GlusterError(f"not removing bricks: {self.mount} is still mounted")
        for brick in self.bricks:
            shutil.rmtree(brick, ignore_errors=True)
            if brick.exists():
                raise GlusterError(f"could not remove brick {brick}")

    def _glusterd_tail(self) -> str:
        if self.private is None:
            return ""
        try:
            lines = (self.private / "glusterd.log").read_text(errors="replace").splitlines()[-15:]
        except OSError:
            return ""
        return "\n--- glusterd.log\n" + "\n".join(lines)


__all__ = ["GlusterError", "GlusterVolume", "availability", "gluster_processes", "mounted"]
