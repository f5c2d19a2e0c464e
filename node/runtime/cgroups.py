"""CPU and memory limits for the process runtime's instances, through the kernel's cgroups.

Docker enforces a spec's `cpu` and `memory_mb` with cgroups; the process runtime does the same when
this node may make control groups (as root, or with a delegated hierarchy): one group per instance,
`<hierarchy>/tomq/<instance name>`, holding a CFS quota of `cpu` cores per 100 ms and a memory limit
of `memory_mb` MiB, past which the kernel kills the instance (exit code 137, as under docker).
Both cgroup v2 (the unified hierarchy) and v1 (a hierarchy per controller) are handled.

An instance joins its groups before its own program starts: the launch goes through a two-line
shell that writes its pid into each group and then execs the command (same pid, same session),
so nothing the program forks can start outside the limits.

Where no writable hierarchy is found, `detect` says why and instances run unlimited; the runtime
records that in the instance record and logs it once, so an operator is not left believing limits hold.

The groups sit in tomq's own tree at the top of each hierarchy, as docker keeps its containers in
`docker/`: instances outlive the node process by design (a restarted node finds them), so they are
not placed inside the node's own group, which its supervisor may empty when it stops the node.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CPU_PERIOD_US = 100_000
MIN_CPU_QUOTA_US = 1_000  # the kernel's floor for a CFS quota
GROUP = "tomq"  # below each hierarchy's root: tomq's instances, one group each

# Joins every group named before "--", then becomes the command: $$ is the pid the command keeps.
_JOIN = 'while [ "$1" != -- ]; do echo $$ > "$1/cgroup.procs" || exit 125; shift; done; shift; exec "$@"'


class CgroupsUnavailable(Exception):
    """No hierarchy with the cpu and memory controllers that this process may write."""


@dataclass(frozen=True)
class Cgroups:
    """Where instance groups go: tomq's tree in the cpu and the memory hierarchy (on cgroup v2 the
    same directory twice, on v1 one per controller)."""

    version: int
    cpu_root: Path
    memory_root: Path

    @classmethod
    def detect(cls, mounts: Path = Path("/proc/self/mounts")) -> Cgroups:
        """The hierarchies of this machine, made ready for tomq's groups; CgroupsUnavailable says why not."""
        v1: dict[str, Path] = {}
        v2: Path | None = None
        try:
            lines = mounts.read_text().splitlines()
        except OSError as exc:
            raise CgroupsUnavailable(f"cannot read {mounts}: {exc.strerror}") from None
        for line in lines:
            fields = line.split()
            if len(fields) < 4:
                continue
            point, kind, options = Path(fields[1]), fields[2], set(fields[3].split(","))
            if kind == "cgroup2" and v2 is None:
                controllers = _read(point / "cgroup.controllers").split()
                if {"cpu", "memory"} <= set(controllers):
                    v2 = point
            elif kind == "cgroup":
                for controller in ("cpu", "memory"):
                    if controller in options:
                        v1.setdefault(controller, point)
        if v2 is not None:
            found = cls(2, v2 / GROUP, v2 / GROUP)
        elif "cpu" in v1 and "memory" in v1:
            found = cls(1, v1["cpu"] / GROUP, v1["memory"] / GROUP)
        else:
            raise CgroupsUnavailable("no cgroup hierarchy with the cpu and memory controllers is mounted")
        try:
            found._prepare_roots()
        except OSError as exc:
            raise CgroupsUnavailable(f"cannot make control groups under {found.cpu_root.parent}: "
                                     f"{exc.strerror or exc} (run the node as root or delegate a hierarchy)") from None
        return found

    def _prepare_roots(self) -> None:
        for root in {self.cpu_root, self.memory_root}:
            root.mkdir(exist_ok=True)
        if self.version == 2:
            # Controllers reach a group only if every ancestor delegates them.
            for parent in (self.cpu_root.parent, self.cpu_root):
                enabled = set(_read(parent / "cgroup.subtree_control").split())
                if not {"cpu", "memory"} <= enabled:
                    (parent / "cgroup.subtree_control").write_text("+cpu +memory")

    def limit(self, name: str, cpu: float, memory_mb: int) -> list[Path]:
        """Make (or reset) the groups called `name` with these limits (0: none); the groups to join.

        `name` must be this runtime's alone (the process runtime adds a tag of its state directory):
        what is found inside is what an earlier run of the instance left behind, killed here so that
        it does not share the new run's limits."""
        groups = sorted({self.cpu_root / name, self.memory_root / name})
        for group in groups:
            group.mkdir(exist_ok=True)
            leftovers = _empty(group, timeout=2.0)
            if leftovers:
                log.warning("killed %d leftover process(es) in %s", leftovers, group)
        quota = max(MIN_CPU_QUOTA_US, round(cpu * CPU_PERIOD_US)) if cpu > 0 else None
        memory = memory_mb * 1024 * 1024 if memory_mb > 0 else None
        cpu_group, memory_group = self.cpu_root / name, self.memory_root / name
        if self.version == 2:
            (cpu_group / "cpu.max").write_text(f"{quota if quota else 'max'} {CPU_PERIOD_US}")
            (memory_group / "memory.max").write_text(str(memory) if memory else "max")
            with contextlib.suppress(FileNotFoundError):  # absent without swap accounting
                (memory_group / "memory.swap.max").write_text("0" if memory else "max")
        else:
            (cpu_group / "cpu.cfs_period_us").write_text(str(CPU_PERIOD_US))
            (cpu_group / "cpu.cfs_quota_us").write_text(str(quota if quota else -1))
            (memory_group / "memory.limit_in_bytes").write_text(str(memory) if memory else "-1")
        return groups

    def release(self, name: str, timeout: float = 2.0) -> None:
        """Remove the groups called `name`, killing what is left in them first: a process that left
        the instance's process group (setsid) is still inside its control group."""
        deadline = time.monotonic() + timeout
        for group in sorted({self.cpu_root / name, self.memory_root / name}):
            while group.exists():
                _empty(group, timeout=max(0.0, deadline - time.monotonic()))
                try:
                    group.rmdir()
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if time.monotonic() > deadline:
                        log.warning("cannot remove control group %s: %s", group, exc.strerror or exc)
                        break
                    time.sleep(0.02)  # a killed process leaves its group a moment after it is reaped

    def sweep(self, suffix: str, keep: set[str]) -> None:
        """Remove the empty groups whose names end in `suffix` (one runtime's tag) and are not in
        `keep` (a node that died between launching and stopping left them); busy ones stay."""
        for root in {self.cpu_root, self.memory_root}:
            with contextlib.suppress(OSError):
                for group in root.iterdir():
                    if group.is_dir() and group.name.endswith(suffix) and group.name not in keep \
                            and not _read(group / "cgroup.procs").split():
                        with contextlib.suppress(OSError):
                            group.rmdir()


def _empty(group: Path, timeout: float) -> int:
    """SIGKILL every process in `group` until none is left (or `timeout`); how many there were.
    Read and kill again: a process may fork between reading the list and the kill."""
    deadline = time.monotonic() + timeout
    killed: set[int] = set()
    while True:
        pids = [int(pid) for pid in _read(group / "cgroup.procs").split() if pid.isdigit()]
        if not pids:
            return len(killed)
        if (group / "cgroup.kill").exists():  # cgroup v2 (5.14+): the kernel kills them all at once
            with contextlib.suppress(OSError):
                (group / "cgroup.kill").write_text("1")
            killed.update(pids)
        else:
            killed.update(pid for pid in pids if _kill_if_inside(pid, group))
        if time.monotonic() >= deadline:
            return len(killed)
        time.sleep(0.01)


def _kill_if_inside(pid: int, group: Path) -> bool:
    """SIGKILL `pid` if it is a process inside `group`; whether it was signalled.

    Without cgroup.kill the pids read from cgroup.procs are killed one by one, and one that exited
    since may already name an unrelated process (pids are reused; this runs as root). A pidfd pins
    the process the pid names when it is opened: it is killed only if, after that, the pid is still
    inside the group. (If that process died meanwhile and its pid was reused, the check sees the new
    one, and the signal goes to the dead one's pidfd: an outsider is never hit.)"""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    except OSError:  # no pidfds (before Linux 5.3): check, then kill, with the small window that leaves
        if not _inside(pid, group):
            return False
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return False
        return True
    try:
        if not _inside(pid, group):
            return False
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        return True
    except ProcessLookupError:
        return False
    finally:
        os.close(pidfd)


def _inside(pid: int, group: Path) -> bool:
    """Whether the process `pid` names now is in `group` (`<hierarchy>/tomq/<name>`) of any hierarchy:
    /proc/<pid>/cgroup lists its group per hierarchy, relative to that hierarchy's root."""
    suffix = f"/{group.parent.name}/{group.name}"
    return any(line.rpartition(":")[2].rstrip("/").endswith(suffix)
               for line in _read(Path(f"/proc/{pid}/cgroup")).splitlines())


def joining(groups: list[Path], command: list[str]) -> list[str]:
    """`command`, run so that it is inside `groups` before its first instruction."""
    return ["/bin/sh", "-c", _JOIN, "tomq-join", *[str(g) for g in groups], "--", *command]


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def detect_or_reason() -> tuple[Cgroups | None, str]:
    """The machine's cgroups and "cgroup vN", or None and why instances will run unlimited."""
    try:
        found = Cgroups.detect()
    except CgroupsUnavailable as exc:
        return None, f"not enforced: {exc}"
    return found, f"cgroup v{found.version}"

