"""The process runtime: service instances as plain subprocesses of the node (the embedded default, §6).

Each instance lives in STATE_DIR/tomq-<cluster>-<node>-<service>-<replica>/:

    instance.json   what was started and how it is doing: labels, command, pid, the pid's start time
    output.log      the instance's stdout and stderr (rotated once past LOG_ROTATE_BYTES at a launch)
    files/          the spec's files, read-only (0400); TOMQ_INSTANCE_DIR names this directory

The record, not this object's memory, is the truth, so a node that restarts finds its instances
again: a pid is taken as ours only if its start time (and the boot id) match the record, because
pids are reused. Instances run in their own session, so they survive the node process, and a stop
signals the whole process group.

What this runtime must never do: run an instance twice (the state directory is flock'd by one
runtime object at a time, and the record is on disk before the process is launched), or signal
a process it cannot prove it started. `cpu` and `memory_mb` are enforced with a control group per
instance (node/runtime/cgroups.py) where the node may make them (as root); elsewhere instances run
unlimited, the record's "limits" and a warning at start say so, and the monitor reports what they use.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tomq.durable import replace_file
from tomq.errors import InvalidTopic, UsageError
from tomq.node.runtime.base import (
    ENV_INSTANCE_DIR,
    LABEL_CLUSTER,
    LABEL_HEIGHT,
    LABEL_NODE,
    MAX_FAILURE_RESTARTS,
    RESTART_BACKOFF_FIRST,
    RESTART_BACKOFF_MAX,
    RESTART_RESET_AFTER,
    Instance,
    InstanceFailed,
    InstanceSpec,
    RuntimeUnavailable,
    changed,
    instance_environment,
    instance_name,
    one_line,
    private_directory,
    process_tree,
    read_stat,
)
from tomq.node.runtime.cgroups import Cgroups, detect_or_reason, joining
from tomq.topics import check_segment

log = logging.getLogger("tomq.runtime")

RECORD = "instance.json"
OUTPUT = "output.log"
FILES = "files"
LOG_ROTATE_BYTES = 1 << 20
RECORD_VERSION = 1
# What an instance inherits from the node's environment; everything else comes from its spec, so
# the node's own secrets never leak into a service.
INHERITED_ENV = ("PATH", "LANG", "LC_ALL", "TZ", "HOME")
STOP_KILL_WAIT = 5.0  # after SIGKILL the kernel needs only moments; bounded all the same


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _start_time(pid: int) -> int | None:
    """Clock ticks since boot at which `pid` started: with the boot id, what tells it from a reused pid."""
    fields = read_stat(pid)
    return int(fields[19]) if fields is not None and len(fields) > 19 else None


def _exit_code(returncode: int) -> int:
    # Popen reports death by signal N as -N; docker (and shells) say 128+N: report it the docker way.
    return 128 - returncode if returncode < 0 else returncode


class ProcessRuntime:
    """Instances of one cluster on one node as subprocesses; see the module docstring.

    Not thread-safe: the node calls it from one thread. `clock` (wall time) is injectable for tests.
    """

    name = "process"

    def __init__(self, state_dir: str | os.PathLike[str], cluster: str, node: str, *,
                 clock: Callable[[], float] = time.time, enforce_limits: bool = True) -> None:
        try:
            self.cluster = check_segment(cluster, "cluster name")
            self.node = check_segment(node, "node name")
        except InvalidTopic as exc:
            raise UsageError(str(exc)) from None
        self.state_dir = Path(state_dir)
        # Control groups are machine-wide: the tag of this state directory keeps two runtimes that
        # share cluster and node names (two clusters, parallel tests) out of each other's groups.
        self._group_tag = "." + hashlib.sha256(str(self.state_dir.resolve()).encode()).hexdigest()[:12]
        self._clock = clock  # wall time: records outlive the process, so monotonic time will not do
        self._boot_id = _boot_id()
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._seen: dict[str, Instance] = {}
        self.cgroups: Cgroups | None = None
        self.limits = "not enforced: switched off"  # how instances' cpu and memory are held (status)
        if enforce_limits:
            self.cgroups, self.limits = detect_or_reason()
            if self.cgroups is None:
                log.warning("process runtime: instances' cpu and memory limits are %s", self.limits)
        private_directory(self.state_dir, "process runtime state directory")
        try:
            self._lock_fd: int | None = os.open(self.state_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise RuntimeUnavailable(f"process runtime state directory {self.state_dir} is unusable: "
                                     f"{exc.strerror or exc}") from None
        try:
            # One runtime object per state directory: two would each launch what they think is missing.
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise RuntimeUnavailable(f"{self.state_dir} is in use by another process runtime "
                                     "(is another tomq node running with this state directory?)") from None
        if self.cgroups is not None:  # groups of instances that no longer have a record here
            self.cgroups.sweep(self._group_tag, {self._group(entry.name) for entry in os.scandir(self.state_dir)
                                                 if entry.is_dir()})

    # ------------------------------------------------------------------ the Runtime interface

    def start(self, spec: InstanceSpec) -> Instance:
        self._check_open()
        if (spec.cluster, spec.node) != (self.cluster, self.node):
            raise UsageError(f"{spec.name} belongs to cluster {spec.cluster} node {spec.node}; "
                             f"this runtime runs {self.cluster} node {self.node}")
        record = self._refreshed(spec.name)
        if record is not None:
            if record["labels"][LABEL_HEIGHT] == str(spec.height):
                return self._instance(spec.name, record)
            self.stop(spec.service, spec.replica)  # placed again at another height: replace it
        directory = self.state_dir / spec.name
        if directory.exists():
            # A directory without a (readable) record: a node that died inside start() before it
            # launched anything, or a record damaged from outside. In the second case a process
            # may still run from it; it is provably ours (its environment names our directory),
            # and it must go before another is launched.
            leftover = self._find_launched(spec.name)
            if leftover is not None:
                log.warning("stopping pid %d of %s, which has no readable record", leftover, spec.name)
                orphan = {"pid": leftover, "pid_start": _start_time(leftover), "boot_id": self._boot_id}
                self._terminate(spec.name, leftover, orphan, timeout=5)
            shutil.rmtree(directory, ignore_errors=True)
        try:
            files = directory / FILES
            files.mkdir(mode=0o700, parents=True)
            for name, data in spec.files.items():
                fd = os.open(files / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
        except OSError as exc:
            shutil.rmtree(directory, ignore_errors=True)
            raise InstanceFailed(f"cannot prepare {directory} for {spec.name}: {exc.strerror or exc}") from None
        record = {
            "version": RECORD_VERSION, "labels": spec.labels(), "image": spec.image,
            "command": list(spec.command), "env": dict(spec.env), "restart": spec.restart,
            "cpu": spec.cpu, "memory_mb": spec.memory_mb,
            "state": "created", "pid": None, "pid_start": None, "boot_id": self._boot_id,
            "started_at": None, "exit_code": None, "restarts": 0, "backoff": 0.0, "restart_at": None,
        }
        # Ordering: the record is durable before the process exists, so a node that dies in between
        # finds the "created" record and looks for the process instead of launching a second one.
        self._save(spec.name, record)
        try:
            self._launch(spec.name, record)
        except OSError as exc:
            shutil.rmtree(directory, ignore_errors=True)
            raise InstanceFailed(f"cannot run {spec.name}: {spec.command[0]}: {exc.strerror or exc}") from None
        return self._instance(spec.name, record)

    def stop(self, service: str, replica: int, timeout: float = 5) -> None:
        self._check_open()
        name = instance_name(self.cluster, self.node, service, replica)
        record = self._refreshed(name)
        if record is not None and record["state"] == "running" and record["pid"] is not None:
            self._terminate(name, int(record["pid"]), record, timeout)
        self._children.pop(name, None)
        self._seen.pop(name, None)
        if self.cgroups is not None:
            self.cgroups.release(self._group(name))
        directory = self.state_dir / name
        if directory.exists():
            shutil.rmtree(directory, ignore_errors=True)
            if directory.exists():
                raise InstanceFailed(f"stopped {name} but could not remove {directory}; remove it by hand")

    def list(self) -> builtins.list[Instance]:
        self._check_open()
        return [self._instance(name, record) for name, record in self._records()]

    def poll(self) -> builtins.list[Instance]:
        self._check_open()
        now = self._clock()
        current: dict[str, Instance] = {}
        for name, record in self._records():
            if record["state"] == "restarting" and record["restart_at"] is not None and record["restart_at"] <= now:
                record["restarts"] += 1
                try:
                    self._launch(name, record)
                except OSError as exc:
                    # The command went missing since start(): count it as a failed run, so the
                    # policy and its back-off decide, as they would for a crash.
                    self._append_output(name, f"tomq: cannot run {record['command'][0]}: {exc.strerror or exc}")
                    self._exited(name, record, 127, now)
            current[name] = self._instance(name, record)
        moved = changed(self._seen, current)
        self._seen = current
        return moved

    def pids(self) -> builtins.list[int]:
        self._check_open()
        roots = [int(record["pid"]) for _, record in self._records()
                 if record["state"] == "running" and record["pid"] is not None]
        return process_tree(roots)

    def logs(self, service: str, replica: int, tail: int = 100) -> str:
        self._check_open()
        name = instance_name(self.cluster, self.node, service, replica)
        if self._load(name) is None:
            raise InstanceFailed(f"no instance {service}/{replica} of cluster {self.cluster} on node {self.node}")
        return _tail(self.state_dir / name / OUTPUT, tail)

    def close(self) -> None:
        # Instances keep running; we only let go of the lock and of our Popen handles (a child that
        # dies later is reaped by subprocess's own bookkeeping or, once we exit, by init).
        self._children.clear()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def __enter__(self) -> ProcessRuntime:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------ records

    def _group(self, name: str) -> str:
        return name + self._group_tag

    def _check_open(self) -> None:
        if self._lock_fd is None:
            raise UsageError(f"the process runtime for {self.state_dir} is closed")

    def _load(self, name: str) -> dict[str, Any] | None:
        path = self.state_dir / name / RECORD
        try:
            record: dict[str, Any] = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            # Records are written atomically, so this is outside interference; skipping it is safer
            # than guessing, and the message says what to look at.
            log.error("ignoring unreadable instance record %s: %s", path, exc)
            return None
        labels = record.get("labels", {})
        if labels.get(LABEL_CLUSTER) != self.cluster or labels.get(LABEL_NODE) != self.node:
            return None
        return record

    def _save(self, name: str, record: dict[str, Any]) -> None:
        try:
            replace_file(self.state_dir / name / RECORD, json.dumps(record, sort_keys=True).encode())
        except OSError as exc:
            raise RuntimeUnavailable(f"cannot write the record of {name} in {self.state_dir}: "
                                     f"{exc.strerror or exc}") from None

    def _records(self) -> builtins.list[tuple[str, dict[str, Any]]]:
        prefix = f"tomq-{self.cluster}-{self.node}-"  # instance_name() up to the service
        found = []
        try:
            names = sorted(entry.name for entry in os.scandir(self.state_dir)
                           if entry.is_dir() and entry.name.startswith(prefix))
        except OSError as exc:
            raise RuntimeUnavailable(f"cannot read {self.state_dir}: {exc.strerror or exc}") from None
        for name in names:
            record = self._refreshed(name)
            if record is not None:
                found.append((name, record))
        return found

    def _instance(self, name: str, record: dict[str, Any]) -> Instance:
        running = record["state"] == "running"
        return Instance(labels=dict(record["labels"]), id=name, state=record["state"],
                        exit_code=record["exit_code"], restarts=record["restarts"],
                        pid=record["pid"] if running else None)

    # ------------------------------------------------------------------ processes

    def _refreshed(self, name: str) -> dict[str, Any] | None:
        """The record with what became of its process since it was written (saved if that changed)."""
        record = self._load(name)
        if record is None:
            return None
        if record["state"] == "created":
            # The node died between writing the record and writing the pid: find what it launched.
            pid = self._find_launched(name)
            if pid is None:
                self._exited(name, record, None, self._clock())
            else:
                record.update(state="running", pid=pid, pid_start=_start_time(pid), boot_id=self._boot_id,
                              started_at=self._clock())
                self._save(name, record)
        elif record["state"] == "running":
            alive, code = self._status(name, record)
            if not alive:
                self._exited(name, record, code, self._clock())
        return record

    def _status(self, name: str, record: dict[str, Any]) -> tuple[bool, int | None]:
        """(alive, exit code). The exit code is known only for our own children: a process started
        by an earlier node process is reaped by init, and its status is lost (None)."""
        child = self._children.get(name)
        if child is not None and child.pid == record["pid"]:
            returncode = child.poll()
            if returncode is None:
                return True, None
            del self._children[name]
            return False, _exit_code(returncode)
        return self._ours(record), None

    def _ours(self, record: dict[str, Any]) -> bool:
        """Whether the record's pid is alive and is still the process we started (not a reused pid)."""
        pid = record["pid"]
        if pid is None or record["boot_id"] != self._boot_id:
            return False
        fields = read_stat(int(pid))
        if fields is None or fields[0] in ("Z", "X"):
            return False
        return len(fields) > 19 and int(fields[19]) == record["pid_start"]

    def _find_launched(self, name: str) -> int | None:
        """A session leader whose environment names this instance's directory: what a launch that
        was never recorded left running. Read only in that rare case; it costs a /proc scan."""
        marker = f"{ENV_INSTANCE_DIR}={self.state_dir / name / FILES}".encode()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            fields = read_stat(int(entry))
            if fields is None or fields[0] in ("Z", "X") or fields[3] != entry:  # field 6: the session id
                continue
            try:
                environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if marker in environ:
                return int(entry)
        return None

    def _launch(self, name: str, record: dict[str, Any]) -> None:
        """Run the record's command in a new session, output appended to output.log; then save."""
        directory = self.state_dir / name
        output = directory / OUTPUT
        with contextlib.suppress(OSError):
            if output.stat().st_size > LOG_ROTATE_BYTES:
                os.replace(output, directory / f"{OUTPUT}.1")
        inherited = {key: os.environ[key] for key in INHERITED_ENV if key in os.environ}
        # Rebuilt from the record, so a restart after a node restart sees exactly what the first run saw.
        env = {**inherited, **instance_environment(record["labels"], record["env"], str(directory / FILES))}
        command = list(record["command"])
        limits = self.limits if record["cpu"] > 0 or record["memory_mb"] > 0 else "none asked"
        if self.cgroups is not None and limits != "none asked":
            _check_program(command[0], env, directory / FILES)  # the shell would only say exit 127
            try:
                command = joining(self.cgroups.limit(self._group(name), record["cpu"], record["memory_mb"]), command)
            except OSError as exc:
                limits = f"not enforced: cannot set up its control groups: {exc.strerror or exc}"
                log.warning("%s: cpu and memory limits %s", name, limits)
        record.update(state="created", pid=None, pid_start=None, exit_code=None, restart_at=None, limits=limits)
        self._save(name, record)
        with open(output, "ab") as sink:
            child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=sink,
                                     stderr=subprocess.STDOUT, env=env, cwd=directory / FILES,
                                     start_new_session=True, close_fds=True)
        self._children[name] = child
        record.update(state="running", pid=child.pid, pid_start=_start_time(child.pid), boot_id=self._boot_id,
                      started_at=self._clock())
        self._save(name, record)

    def _exited(self, name: str, record: dict[str, Any], code: int | None, now: float) -> None:
        """The process is gone: record how, and decide (not yet do) whether the policy restarts it."""
        started = record["started_at"]
        ran = now - started if started is not None else 0.0
        record.update(state="exited", pid=None, pid_start=None, exit_code=code, restart_at=None)
        policy = record["restart"]
        # An unknown status (the process ended while no node process was its parent) counts as a
        # failure: the services this runs are long-lived, so ending at all is the anomaly.
        again = policy == "always" or (
            policy == "on-failure" and code != 0 and record["restarts"] < MAX_FAILURE_RESTARTS)
        if again:
            previous = float(record["backoff"])
            backoff = RESTART_BACKOFF_FIRST if previous == 0 or ran >= RESTART_RESET_AFTER else min(
                previous * 2, RESTART_BACKOFF_MAX)
            record.update(state="restarting", backoff=backoff, restart_at=now + backoff)
        self._save(name, record)

    def _terminate(self, name: str, pid: int, record: dict[str, Any], timeout: float) -> None:
        """SIGTERM the instance's process group, SIGKILL it after `timeout`; only if the pid is ours."""
        def alive() -> bool:
            return self._status(name, record)[0]

        if not alive():
            return
        for signum, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, STOP_KILL_WAIT)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signum)
            deadline = time.monotonic() + wait
            while alive() and time.monotonic() < deadline:
                time.sleep(0.02)
            if not alive():
                # The leader is gone; its group may not be. Safe to signal: a group id cannot be
                # reused while any member of the group lives.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
                return
        raise InstanceFailed(f"{name} (pid {pid}) survived SIGKILL for {STOP_KILL_WAIT:.0f} s; "
                             "it is stuck in the kernel (D state?)")

    def _append_output(self, name: str, line: str) -> None:
        with contextlib.suppress(OSError), open(self.state_dir / name / OUTPUT, "a") as sink:
            sink.write(one_line(line) + "\n")


def _check_program(program: str, env: dict[str, str], cwd: Path) -> None:
    """Raise the OSError exec would raise for `program` (looked up as exec does: a path relative to
    the instance's working directory, a bare name along the instance's PATH)."""
    if "/" in program:
        path: str | None = str(cwd / program)  # an absolute program stays as it is
    else:
        path = shutil.which(program, mode=os.F_OK, path=os.pathsep.join(os.get_exec_path(env)))
    if path is None or not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), program)
    if not os.access(path, os.X_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), program)


def _tail(path: Path, lines: int) -> str:
    """The last `lines` lines of `path`, read backwards in blocks so a large log costs little."""
    if lines <= 0:
        return ""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            position = handle.tell()
            chunk = b""
            while position > 0 and chunk.count(b"\n") <= lines:
                step = min(8192, position)
                position -= step
                handle.seek(position)
                chunk = handle.read(step) + chunk
    except FileNotFoundError:
        return ""
    text = chunk.decode(errors="replace")
    kept = text.splitlines(keepends=True)[-lines:]
    return "".join(kept)
