"""The runtime interface: what a node asks of whatever runs its service instances (DESIGN.md §6).

The orchestrator decides (which service replica runs on which node, committed at a ledger height);
a Runtime only carries that decision out on this node: start, stop, list, poll, logs. Two adapters
implement it, `process` (subprocesses) and `docker` (containers), and the same tests run on both.

What a runtime must never do: run one (service, replica) twice on a node, or forget what it started
when the node process restarts. Instances are therefore found again by their labels (the cluster,
node, service, replica and placement height), never by what a runtime object remembers in memory.
It must also never let a docker, OS or subprocess exception escape: every adapter translates them
at the boundary into RuntimeUnavailable (no engine answers) or InstanceFailed (the engine answered no).
"""

from __future__ import annotations

import builtins
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from tomq.errors import InvalidTopic, TomqError, UsageError
from tomq.topics import check_segment

RestartPolicy = Literal["no", "on-failure", "always"]
RESTART_POLICIES: tuple[RestartPolicy, ...] = ("no", "on-failure", "always")

# Both runtimes give up on an instance that keeps failing after this many restarts (docker's
# MaximumRetryCount); "always" has no limit, like docker's.
MAX_FAILURE_RESTARTS = 10
# Back-off between restarts, as docker does it: 0.1 s doubling up to a minute, and back to 0.1 s once
# an instance has stayed up for RESTART_RESET_AFTER seconds.
RESTART_BACKOFF_FIRST = 0.1
RESTART_BACKOFF_MAX = 60.0
RESTART_RESET_AFTER = 10.0

# The labels every instance carries; list() finds instances by these alone.
LABEL_CLUSTER = "tomq.cluster"
LABEL_SERVICE = "tomq.service"
LABEL_REPLICA = "tomq.replica"
LABEL_NODE = "tomq.node"
LABEL_HEIGHT = "tomq.height"
INSTANCE_LABELS = (LABEL_CLUSTER, LABEL_SERVICE, LABEL_REPLICA, LABEL_NODE, LABEL_HEIGHT)

# The environment every instance gets besides its spec's: where its files are, and who it is.
ENV_INSTANCE_DIR = "TOMQ_INSTANCE_DIR"
IDENTITY_ENV = {LABEL_CLUSTER: "TOMQ_CLUSTER", LABEL_SERVICE: "TOMQ_SERVICE", LABEL_REPLICA: "TOMQ_REPLICA",
                LABEL_NODE: "TOMQ_NODE", LABEL_HEIGHT: "TOMQ_HEIGHT"}

# Docker's vocabulary, which the process runtime shares; "removed" is only ever reported by poll().
InstanceState = Literal["created", "running", "restarting", "paused", "exited", "dead", "removing", "removed"]


class RuntimeUnavailable(TomqError):
    """No engine answers: dockerd is not running or its socket is wrong, or the state directory is unusable."""


class InstanceFailed(TomqError):
    """The engine answered but would not do it: image missing, name taken, bad limits, command not found."""


def instance_environment(labels: Mapping[str, str], env: Mapping[str, str], instance_dir: str) -> dict[str, str]:
    """A spec's environment plus what every instance is told about itself: who it is, where its files are."""
    identity = {IDENTITY_ENV[key]: value for key, value in labels.items() if key in IDENTITY_ENV}
    return {**env, **identity, ENV_INSTANCE_DIR: instance_dir}


def private_directory(path: Path, what: str) -> Path:
    """Create `path` (0700) or make an existing one ours alone: it will hold instances' keys.
    RuntimeUnavailable if it cannot be made, or belongs to another user (a planted directory)."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = path.stat()
        if info.st_uid != os.geteuid():
            raise RuntimeUnavailable(f"{what} {path} belongs to uid {info.st_uid}, not to us; "
                                     "remove it or choose another directory")
        if info.st_mode & 0o077:
            path.chmod(0o700)
    except OSError as exc:
        raise RuntimeUnavailable(f"{what} {path} is unusable: {exc.strerror or exc}") from None
    return path


def one_line(text: object) -> str:
    """Engines reply with multi-line explanations; an operator reads one line."""
    return " ".join(str(text).split())


def instance_name(cluster: str, node: str, service: str, replica: int) -> str:
    """The instance's name on this node: the container name, and the process runtime's directory."""
    return f"tomq-{cluster}-{node}-{service}-{replica}"


@dataclass(frozen=True)
class InstanceSpec:
    """One replica of a service as placed on one node by the ledger entry at `height`.

    `files` are small files the instance must see (its key, its certificate): each runtime puts them
    in a per-instance directory, read-only to the instance, and passes its path in TOMQ_INSTANCE_DIR.
    `cpu` is in cores and `memory_mb` in MiB; 0 means no limit.
    """

    cluster: str
    service: str
    replica: int
    node: str
    height: int
    image: str
    command: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict, hash=False)
    files: Mapping[str, bytes] = field(default_factory=dict, hash=False)
    restart: RestartPolicy = "on-failure"
    cpu: float = 0.0
    memory_mb: int = 0

    def __post_init__(self) -> None:
        try:
            for what, value in (("cluster", self.cluster), ("node", self.node), ("service", self.service)):
                check_segment(value, f"{what} name")
        except InvalidTopic as exc:
            raise UsageError(str(exc)) from None
        for what, number in (("replica", self.replica), ("height", self.height), ("memory_mb", self.memory_mb)):
            if isinstance(number, bool) or not isinstance(number, int) or number < 0:
                raise UsageError(f"{self.service}: {what} must be a non-negative integer, not {number!r}")
        if not isinstance(self.cpu, int | float) or self.cpu < 0:
            raise UsageError(f"{self.service}: cpu must be a non-negative number of cores, not {self.cpu!r}")
        if self.restart not in RESTART_POLICIES:
            raise UsageError(f"{self.service}: restart policy {self.restart!r} is not one of {', '.join(RESTART_POLICIES)}")
        if not self.command or not all(isinstance(arg, str) for arg in self.command):
            raise UsageError(f"{self.service}: command must be a non-empty sequence of strings")
        for name in self.files:
            # Flat names only: a name must not climb out of the instance directory.
            if not name or "/" in name or name in (".", "..") or "\0" in name:
                raise UsageError(f"{self.service}: instance file name {name!r} must be a plain file name")
        for key in self.env:
            if not key or "=" in key or key == ENV_INSTANCE_DIR or key in IDENTITY_ENV.values():
                raise UsageError(f"{self.service}: environment variable {key!r} is reserved or malformed")

    @property
    def name(self) -> str:
        return instance_name(self.cluster, self.node, self.service, self.replica)

    def labels(self) -> dict[str, str]:
        return {LABEL_CLUSTER: self.cluster, LABEL_SERVICE: self.service, LABEL_REPLICA: str(self.replica),
                LABEL_NODE: self.node, LABEL_HEIGHT: str(self.height)}

    def environment(self, instance_dir: str) -> dict[str, str]:
        return instance_environment(self.labels(), self.env, instance_dir)


@dataclass(frozen=True)
class Instance:
    """What a runtime reports about one instance. `pid` is a host pid when known (for the monitor)."""

    labels: Mapping[str, str] = field(hash=False)
    id: str
    state: str
    exit_code: int | None = None
    restarts: int = 0
    pid: int | None = None

    @property
    def service(self) -> str:
        return self.labels[LABEL_SERVICE]

    @property
    def replica(self) -> int:
        return int(self.labels[LABEL_REPLICA])

    @property
    def height(self) -> int:
        return int(self.labels[LABEL_HEIGHT])

    @property
    def running(self) -> bool:
        return self.state == "running"


class Runtime(Protocol):
    """Runs this node's instances of one cluster. Every method may raise RuntimeUnavailable.

    (Annotations say builtins.list because the method list() shadows the builtin in class scope.)"""

    name: str
    limits: str  # how a spec's cpu and memory are held ("docker", "cgroup v1", "not enforced: <why>")

    def start(self, spec: InstanceSpec) -> Instance:
        """Run `spec` unless it already exists. Idempotent per (service, replica, height): an instance
        with the same height is returned as it is, whatever its state (a stopped one is started again
        only after stop()); one with another height is stopped, removed and replaced."""
        ...

    def stop(self, service: str, replica: int, timeout: float = 5) -> None:
        """Stop (SIGTERM, then SIGKILL after `timeout` s) and remove the instance; no error if absent."""
        ...

    def list(self) -> builtins.list[Instance]:
        """This node's instances of this cluster, found by their labels (works after a node restart)."""
        ...

    def poll(self) -> builtins.list[Instance]:
        """Apply the restart policy where the runtime does it itself; return the instances whose state,
        exit code or restart count changed since the last poll (state "removed" for ones that vanished)."""
        ...

    def pids(self) -> builtins.list[int]:
        """Host pids of every process of every running instance, for the resource monitor."""
        ...

    def logs(self, service: str, replica: int, tail: int = 100) -> str:
        """The last `tail` lines of the instance's stdout and stderr; InstanceFailed if it does not exist."""
        ...

    def close(self) -> None:
        """Release connections and handles. Never stops instances: they outlive the node process."""
        ...


def changed(before: Mapping[str, Instance], after: Mapping[str, Instance]) -> list[Instance]:
    """poll()'s answer: instances whose state, exit code or restart count moved between two snapshots."""
    moved = [now for key, now in after.items()
             if key not in before or (before[key].state, before[key].exit_code, before[key].restarts)
             != (now.state, now.exit_code, now.restarts)]
    gone = [Instance(old.labels, old.id, "removed", old.exit_code, old.restarts, None)
            for key, old in before.items() if key not in after]
    return moved + gone


def process_tree(roots: Sequence[int], proc: Path = Path("/proc")) -> list[int]:
    """`roots` and all their live descendants, roots first. One scan of /proc: this kernel may lack
    /proc/PID/task/TID/children, so parenthood is read from each process's stat line."""
    if not roots:
        return []  # a node running nothing scans nothing (its reconciler asks every period)
    parents: dict[int, list[int]] = {}
    alive: set[int] = set()
    for entry in os.listdir(proc):
        if not entry.isdigit():
            continue
        fields = read_stat(int(entry), proc)
        if fields is None or fields[0] in ("Z", "X"):
            continue
        alive.add(int(entry))
        parents.setdefault(int(fields[1]), []).append(int(entry))
    found: list[int] = []
    queue = [pid for pid in roots if pid in alive]
    while queue:
        pid = queue.pop(0)
        if pid not in found:
            found.append(pid)
            queue.extend(parents.get(pid, []))
    return found


def read_stat(pid: int, proc: Path = Path("/proc")) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first, then ppid, ...), or None.

    The name is skipped by its last ')' because it may itself contain spaces and parentheses."""
    try:
        stat = (proc / str(pid) / "stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()
