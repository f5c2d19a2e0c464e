"""The resource monitor (node/monitor.py): the pure smoothing and accounting with explicit inputs, then
real processes read through /proc: a CPU burner counts for a node only when it is in the node's trees."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tomq.errors import UsageError
from tomq.node.monitor import (
    CpuAccount,
    Ewma,
    LoadSample,
    ProcStat,
    ResourceMonitor,
    parse_stat,
    process_trees,
)

# --- smoothing ---------------------------------------------------------------------------------------


def test_the_first_sample_seeds_the_average_and_a_half_life_halves_the_gap():
    average = Ewma(half_life_s=5.0)
    assert average.value is None
    assert average.update(0.2, now=100.0) == 0.2
    assert average.update(1.0, now=105.0) == pytest.approx(0.6)  # half way from 0.2 to 1.0
    assert average.update(1.0, now=115.0) == pytest.approx(0.9)  # two half-lives: a quarter of the gap is left


def test_no_elapsed_time_changes_nothing():
    average = Ewma(half_life_s=5.0)
    average.update(0.5, now=10.0)
    assert average.update(1.0, now=10.0) == 0.5
    assert average.update(1.0, now=9.0) == 0.5  # a clock that stepped back weighs nothing
    assert average.update(1.0, now=15.0) == pytest.approx(0.75)  # measured from 10, the last real step


@pytest.mark.parametrize("half_life", [0, -1.0, float("nan")])
def test_the_half_life_must_be_positive(half_life):
    with pytest.raises(UsageError, match="half-life must be a positive number"):
        Ewma(half_life)


@settings(max_examples=200, deadline=None)
@given(st.floats(0, 1), st.floats(0, 1), st.floats(0.01, 30), st.floats(0.01, 30), st.floats(0.1, 20))
def test_the_average_does_not_depend_on_how_often_one_samples(start, level, first_step, second_step, half_life):
    once = Ewma(half_life)
    once.update(start, 0.0)
    twice = Ewma(half_life)
    twice.update(start, 0.0)
    twice.update(level, first_step)
    assert twice.update(level, first_step + second_step) == pytest.approx(
        once.update(level, first_step + second_step), abs=1e-9)
    assert min(start, level) - 1e-12 <= once.value <= max(start, level) + 1e-12


# --- reading /proc, and which CPU time falls in an interval -------------------------------------------


def test_parse_stat_reads_the_fields_even_when_the_name_has_parentheses_and_spaces():
    fields_after_name = ["S", "42"] + ["0"] * 9 + ["700", "45"] + ["0"] * 6 + ["123456"] + ["0"] * 30
    line = "4711 (evil) (name 9) " + " ".join(fields_after_name) + "\n"
    assert parse_stat(line) == ProcStat(pid=4711, parent=42, start_ticks=123456, cpu_ticks=745)
    assert parse_stat(Path(f"/proc/{os.getpid()}/stat").read_text()).pid == os.getpid()


def test_process_trees_are_the_roots_and_their_descendants():
    parents = {1: 0, 10: 1, 11: 10, 12: 10, 13: 12, 20: 1, 21: 20, 30: 1}
    assert process_trees([10], parents) == {10, 11, 12, 13}
    assert process_trees([12, 21, 99], parents) == {12, 13, 21}  # 99 is not running: dropped quietly
    assert process_trees([10, 11], parents) == {10, 11, 12, 13}
    assert process_trees([], parents) == set()


def test_cpu_account_counts_each_process_only_in_intervals_it_was_watched():
    account = CpuAccount()
    assert account.consumed([ProcStat(10, 1, start_ticks=50, cpu_ticks=500)], uptime_ticks=1000) is None
    # 10 used 30 ticks; 11 started after the last sample (at 1100 > 1000) so all its 20 ticks count;
    # 12 joined the set (say, written into the load file) but ran before: it only primes.
    assert account.consumed([ProcStat(10, 1, 50, 530), ProcStat(11, 10, 1100, 20),
                             ProcStat(12, 1, 900, 9000)], uptime_ticks=1200) == 30 + 20
    # 11 vanished; 12 now counts its 5 new ticks; pid 10 was reused by a new process (other start).
    assert account.consumed([ProcStat(10, 1, 1250, 7), ProcStat(12, 1, 900, 9005)], uptime_ticks=1300) == 7 + 5
    # A counter that goes backwards (cannot happen for one process, but never count it negative).
    assert account.consumed([ProcStat(12, 1, 900, 9000)], uptime_ticks=1400) == 0


# --- real processes ------------------------------------------------------------------------------------

BURNER = "while True: pass"


def start(code: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", code])


def children_of(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if parse_stat(stat.read_text()).parent == pid:
                found.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


@pytest.fixture(scope="module")
def sampled(tmp_path_factory):
    """One burner (the child of `parent`), an idle process, and three monitors sampled over one second.

    `listed` accounts the idle process plus the burner through the load file; `unlisted` the idle
    process, an extra pid and a load file that name no running process; `tree` the burner's parent.
    A single burner, so that on a small box it has a core to itself.
    """
    directory = tmp_path_factory.mktemp("monitor")
    idle = start("import time; time.sleep(60)")
    parent = start(f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {BURNER!r}]).wait()")
    children: list[int] = []
    try:
        deadline = time.monotonic() + 5
        while not children and time.monotonic() < deadline:
            children = children_of(parent.pid)
            time.sleep(0.02)
        assert len(children) == 1, "the parent never started its burner child"
        burner = children[0]
        listed_file = directory / "listed.pids"
        listed_file.write_text(f"# the test's load\n{burner}\n\nnot-a-pid\n")
        unlisted_file = directory / "unlisted.pids"
        unlisted_file.write_text("4194999\n")  # above the kernel's pid limit: never running
        monitors = {
            "listed": ResourceMonitor(idle.pid, load_pids_file=listed_file, half_life_s=5.0),
            "unlisted": ResourceMonitor(idle.pid, extra_pids=lambda: [4194998], load_pids_file=unlisted_file),
            "tree": ResourceMonitor(parent.pid, load_pids_file=directory / "absent.pids"),
        }
        first = {name: monitor.sample(time.monotonic()) for name, monitor in monitors.items()}
        time.sleep(1.0)
        second = {name: monitor.sample(time.monotonic()) for name, monitor in monitors.items()}
        os.kill(burner, signal.SIGKILL)
        time.sleep(0.1)
        after_exit = monitors["listed"].sample(time.monotonic())
        yield {"first": first, "second": second, "after_exit": after_exit, "monitors": monitors}
    finally:
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for process in (idle, parent):
            process.kill()
            process.wait()


def test_the_first_sample_only_primes(sampled):
    assert set(sampled["first"].values()) == {LoadSample(0.0, 0.0)}


def test_a_burner_in_the_load_file_loads_the_node(sampled):
    cores = os.cpu_count() or 1
    # The burner spins one core flat out; allow for a machine busy with other work.
    assert sampled["second"]["listed"].cpu > 0.35 / cores, sampled["second"]
    assert sampled["second"]["listed"].cpu <= 1.0


def test_a_burner_elsewhere_does_not_load_the_node(sampled):
    cores = os.cpu_count() or 1
    assert sampled["second"]["unlisted"].cpu < 0.05 / cores, sampled["second"]


def test_a_child_of_the_node_counts_as_the_node(sampled):
    cores = os.cpu_count() or 1
    assert sampled["second"]["tree"].cpu > 0.35 / cores, sampled["second"]


def test_memory_is_a_sane_fraction(sampled):
    for name in ("listed", "unlisted", "tree"):
        memory = sampled["second"][name].memory
        assert 0 < memory < 0.5, (name, memory)  # a few small Python processes, not half the machine
    monitor = sampled["monitors"]["listed"]
    assert monitor.memory_total_mb > 16 and monitor.cores == os.cpu_count()


def test_a_vanished_pid_is_ignored_quietly(sampled):
    # The burner was killed between samples (and is a zombie until its parent reaps it): no error, and the average has not jumped up.
    assert sampled["after_exit"].cpu <= sampled["second"]["listed"].cpu
    assert sampled["monitors"]["listed"].current() == sampled["after_exit"]


def test_an_unreadable_load_file_is_a_config_error(tmp_path):
    from tomq.errors import ConfigError

    monitor = ResourceMonitor(os.getpid(), load_pids_file=tmp_path)  # a directory, not a file
    with pytest.raises(ConfigError, match="cannot read the load pid file"):
        monitor.sample(0.0)
