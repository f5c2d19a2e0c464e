"""The resource monitor: how loaded this node is, as placement needs it (DESIGN.md §6).

A node's load is what *its* processes use, not what the machine does: tests and small sites run
several nodes on one box, and the machine's load average would make them all look equally busy. So
the monitor accounts a set of process trees (the node's own process and its descendants, the pids
its runtime reports for containers, and the pids listed in an optional load file) and reports

    cpu    = CPU seconds those processes used since the last sample / wall seconds / os.cpu_count()
    memory = their resident set size / MemTotal

each smoothed by a time-weighted exponential moving average with a configurable half-life, so one
busy second does not send the next placement elsewhere. `NodeView.cpu` and `.memory` in
node/orchestrator/placement.py are these two numbers; `cores` and `memory_total_mb` are its size.

The math is pure and tested with explicit inputs: `Ewma` (the smoothing), `parse_stat`,
`process_trees` and `CpuAccount` (which CPU time falls in an interval). `ResourceMonitor` is the thin
adapter that reads /proc and feeds them. The load file is the test suite's load source: a test
starts a real CPU burner and writes its pid there, and the node's load rises as a real one would.

Known approximations, all on the side of simplicity: CPU a process uses between its last sample and
its exit is not counted; RSS counts pages shared by two accounted processes twice; a container's
cgroup limit is not the machine's size (os.cpu_count() is what we divide by).

What this module must never do: read a clock (callers pass `now`), raise because an accounted
process vanished between listing and reading, or touch anything but /proc and the load file.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from tomq.errors import ConfigError, UsageError


@dataclass(frozen=True, slots=True)
class LoadSample:
    """Smoothed load as fractions of the machine: `cpu` of all its cores, `memory` of MemTotal."""

    cpu: float
    memory: float


class Ewma:
    """A time-weighted exponential moving average: the weight of the past halves every half-life.

    A sample that stands for the last `dt` seconds moves the average by `1 - 2**(-dt/half_life)` of
    the way towards it, so the result does not depend on how often one samples: two steps of 1 s
    towards the same value land where one step of 2 s does. The first sample seeds the average.
    """

    def __init__(self, half_life_s: float) -> None:
        if not half_life_s > 0:
            raise UsageError(f"the smoothing half-life must be a positive number of seconds, not {half_life_s!r}")
        self.half_life_s = float(half_life_s)
        self.value: float | None = None
        self._last_time: float | None = None

    def update(self, sample: float, now: float) -> float:
        if self.value is None or self._last_time is None:
            self.value = float(sample)
        else:
            elapsed = now - self._last_time
            if elapsed <= 0:
                return self.value  # no time has passed (or the caller's clock stepped back): nothing to weigh
            weight = 1.0 - 0.5 ** (elapsed / self.half_life_s)
            self.value += weight * (sample - self.value)
        self._last_time = now
        return self.value


@dataclass(frozen=True, slots=True)
class ProcStat:
    """The fields of /proc/<pid>/stat the monitor uses; times are in clock ticks."""

    pid: int
    parent: int
    start_ticks: int  # when it started, in ticks since boot: with pid, identifies one process
    cpu_ticks: int  # user + system time of all its threads (not of reaped children)


def parse_stat(text: str) -> ProcStat:
    """Parse one /proc/<pid>/stat line. The command name may hold spaces and parentheses."""
    pid_text, _, rest = text.partition(" (")
    after_name = rest[rest.rindex(")") + 2:].split()
    # after_name[0] is field 3 (state); proc(5): ppid 4, utime 14, stime 15, starttime 22
    return ProcStat(pid=int(pid_text), parent=int(after_name[1]), start_ticks=int(after_name[19]),
                    cpu_ticks=int(after_name[11]) + int(after_name[12]))


def process_trees(roots: Iterable[int], parents: Mapping[int, int]) -> set[int]:
    """Every pid in `parents` that is one of `roots` or descends from one; unknown roots are dropped."""
    children: dict[int, list[int]] = {}
    for pid, parent in parents.items():
        children.setdefault(parent, []).append(pid)
    found: set[int] = set()
    stack = [pid for pid in roots if pid in parents]
    while stack:
        pid = stack.pop()
        if pid in found:
            continue
        found.add(pid)
        stack.extend(children.get(pid, ()))
    return found


class CpuAccount:
    """CPU ticks an accounted set of processes used between two samples.

    A process is known by (pid, start time), so a reused pid is a new process. A process seen in the
    previous sample counts what it used since; one that started after the previous sample counts all
    it used; one that merely joined the set (a pid newly written to the load file, a container the
    runtime just reported) is primed: its time before this sample belongs to no interval we measure.
    Processes that vanished are forgotten.
    """

    def __init__(self) -> None:
        self._last_uptime_ticks: int | None = None
        self._cpu_ticks: dict[tuple[int, int], int] = {}

    def consumed(self, processes: Iterable[ProcStat], uptime_ticks: int) -> int | None:
        """Ticks used since the previous call, or None on the first call (which only primes)."""
        previous = self._cpu_ticks
        priming = self._last_uptime_ticks is None
        total = 0
        seen: dict[tuple[int, int], int] = {}
        for process in processes:
            key = (process.pid, process.start_ticks)
            seen[key] = process.cpu_ticks
            if key in previous:
                total += max(0, process.cpu_ticks - previous[key])
            elif self._last_uptime_ticks is not None and process.start_ticks >= self._last_uptime_ticks:
                total += process.cpu_ticks
        self._cpu_ticks = seen
        self._last_uptime_ticks = uptime_ticks
        return None if priming else total


class ResourceMonitor:
    """Samples this node's smoothed load from /proc. One caller at a time (the node's report loop).

    `root_pid` is the node's own process (None: account only the other sources); `extra_pids`
    returns further pids whose trees are accounted (the runtime's containers); errors it raises are
    the runtime's and pass through. `load_pids_file`, if the file exists, holds one pid per line
    (blank lines, `#` comments and lines that are not a pid are ignored) whose trees are accounted too.
    """

    def __init__(self, root_pid: int | None, extra_pids: Callable[[], Iterable[int]] | None = None,
                 load_pids_file: Path | None = None, half_life_s: float = 5.0,
                 proc_root: Path = Path("/proc")) -> None:
        self.root_pid = root_pid
        self.extra_pids = extra_pids
        self.load_pids_file = load_pids_file
        self.proc_root = proc_root
        self.cores = os.cpu_count() or 1
        self.memory_total_mb = _mem_total_kib(proc_root) / 1024
        self._clock_ticks = os.sysconf("SC_CLK_TCK")
        self._page_size = os.sysconf("SC_PAGE_SIZE")
        self._cpu_account = CpuAccount()
        self._cpu = Ewma(half_life_s)
        self._memory = Ewma(half_life_s)
        self._last_now: float | None = None

    def sample(self, now: float) -> LoadSample:
        """Measure since the last call and return the smoothed load; the first call returns zeros.

        `now` is the caller's monotonic time in seconds; the interval between calls is the wall time
        the CPU time is divided by, and what the half-life is measured in.
        """
        processes = self._read_processes()
        uptime_ticks = self._read_uptime_ticks()
        accounted = process_trees(self._roots(), {pid: stat.parent for pid, stat in processes.items()})
        used_ticks = self._cpu_account.consumed((processes[pid] for pid in sorted(accounted)), uptime_ticks)
        resident_bytes = sum(self._read_rss_pages(pid) for pid in accounted) * self._page_size
        last_now, self._last_now = self._last_now, now
        if used_ticks is None or last_now is None:
            return LoadSample(0.0, 0.0)
        wall_s = now - last_now
        if wall_s <= 0:
            return self.current()
        cpu = min(1.0, used_ticks / self._clock_ticks / wall_s / self.cores)
        memory = min(1.0, resident_bytes / (self.memory_total_mb * 1024 * 1024))
        return LoadSample(self._cpu.update(cpu, now), self._memory.update(memory, now))

    def current(self) -> LoadSample:
        """The last smoothed load without measuring; zeros before the second sample."""
        return LoadSample(self._cpu.value or 0.0, self._memory.value or 0.0)

    def _roots(self) -> list[int]:
        roots = [] if self.root_pid is None else [self.root_pid]
        if self.extra_pids is not None:
            roots.extend(int(pid) for pid in self.extra_pids())
        if self.load_pids_file is not None:
            roots.extend(_read_pid_file(self.load_pids_file))
        return roots

    def _read_processes(self) -> dict[int, ProcStat]:
        processes: dict[int, ProcStat] = {}
        with os.scandir(self.proc_root) as entries:
            for entry in entries:
                if not entry.name.isdigit():
                    continue
                try:
                    processes[int(entry.name)] = parse_stat(Path(entry.path, "stat").read_text())
                except (OSError, ValueError, IndexError):
                    continue  # it exited between listing and reading (or is a stat line we cannot parse)
        return processes

    def _read_uptime_ticks(self) -> int:
        uptime_s = float((self.proc_root / "uptime").read_text().split()[0])
        return int(uptime_s * self._clock_ticks)

    def _read_rss_pages(self, pid: int) -> int:
        try:
            return int((self.proc_root / str(pid) / "statm").read_text().split()[1])
        except (OSError, ValueError, IndexError):
            return 0  # vanished


def _read_pid_file(path: Path) -> list[int]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise ConfigError(f"cannot read the load pid file {path}: {exc.strerror or exc}") from None
    pids = []
    for line in text.splitlines():
        word = line.split("#", 1)[0].strip()
        if word.isdigit():
            pids.append(int(word))
    return pids


def _mem_total_kib(proc_root: Path) -> int:
    try:
        for line in (proc_root / "meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError) as exc:
        raise ConfigError(f"cannot read MemTotal from {proc_root / 'meminfo'}: {exc}") from None
    raise ConfigError(f"{proc_root / 'meminfo'} has no MemTotal line; is {proc_root} a Linux /proc?")
