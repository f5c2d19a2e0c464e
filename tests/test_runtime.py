"""The runtime contract (node/runtime/base.py), checked the same way on both runtimes.

Each scenario runs on the process runtime and on the docker runtime against the session's private
dockerd (tests/dockerd.py). Instances run the host's Python: a script that prints what it sees (its
identity, environment and files) and sleeps, or one that fails at once.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from dockerd import dockerd, runtime_image

from conftest import require
from procs import free_port, pid_alive
from tomq.errors import UsageError
from tomq.mqtt import wait_until
from tomq.node.runtime import cgroups
from tomq.node.runtime.base import Instance, InstanceFailed, InstanceSpec, Runtime, RuntimeUnavailable
from tomq.node.runtime.docker import DockerRuntime, docker_available, host_python_mounts
from tomq.node.runtime.process import ProcessRuntime

__all__ = ["dockerd", "runtime_image"]  # fixtures used by name below

PYTHON = sys.executable
CLUSTER = "rt"

# Prints one JSON line describing itself, then sleeps until stopped.
REPORT = """\
import json, os, sys, time
directory = os.environ["TOMQ_INSTANCE_DIR"]
files = {name: open(os.path.join(directory, name)).read() for name in sorted(os.listdir(directory))}
seen = {key: value for key, value in os.environ.items() if key.startswith(("TOMQ_", "GREETING"))}
print(json.dumps({"env": seen, "files": files, "cwd": os.getcwd(), "pid": os.getpid()}), flush=True)
time.sleep(120)
"""
FAIL = "import sys; print('failing', flush=True); sys.exit(1)"
CONNECT = """\
import socket, sys
with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5) as connection:
    connection.sendall(b"hello from " + sys.argv[2].encode())
"""


@dataclass
class Runtimes:
    """Makes runtime objects for one node; each new object is a node process that restarted."""

    kind: str
    make: Callable[[], Runtime]
    image: str
    node: str
    opened: list[Runtime] = field(default_factory=list)

    def new(self) -> Runtime:
        for runtime in self.opened:  # the previous node process is gone
            runtime.close()
        runtime = self.make()
        self.opened.append(runtime)
        return runtime

    def spec(self, service: str, command: tuple[str, ...], **overrides: Any) -> InstanceSpec:
        fields: dict[str, Any] = dict(cluster=CLUSTER, service=service, replica=0, node=self.node, height=7,
                                      image=self.image, command=command, restart="no")
        fields.update(overrides)
        return InstanceSpec(**fields)


@pytest.fixture(params=["process", "docker"])
def runtimes(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Runtimes]:
    node = f"n{secrets.token_hex(3)}"  # the docker engine is shared by the whole session
    if request.param == "docker":
        base_url: str = request.getfixturevalue("dockerd")
        image: str = request.getfixturevalue("runtime_image")
        made = Runtimes("docker", lambda: DockerRuntime(base_url, CLUSTER, node, state_dir=tmp_path / "files"),
                        image, node)
    else:
        made = Runtimes("process", lambda: ProcessRuntime(tmp_path / "state", CLUSTER, node), "-", node)
    yield made
    # Whatever a test left running is stopped through the interface, and must then be gone.
    runtime = made.new()
    try:
        leftovers = runtime.list()
        pids = runtime.pids()
        for instance in leftovers:
            runtime.stop(instance.service, instance.replica, timeout=1)
        assert runtime.list() == []
        assert wait_until(lambda: not any(pid_alive(pid) for pid in pids), 10), f"still running: {pids}"
    finally:
        runtime.close()


def _report(runtime: Runtime, service: str, replica: int = 0) -> dict[str, Any]:
    """The JSON line REPORT printed, once it has."""
    lines: list[str] = []

    def printed() -> bool:
        lines[:] = [line for line in runtime.logs(service, replica).splitlines() if line.startswith("{")]
        return bool(lines)

    assert wait_until(printed, 15, 0.05), f"no report; log: {runtime.logs(service, replica)!r}"
    assert len(lines) == 1, f"the instance ran more than once: {lines}"
    report: dict[str, Any] = json.loads(lines[0])
    return report


def _poll_until(runtime: Runtime, predicate: Callable[[list[Instance]], bool], timeout: float) -> list[Instance]:
    """Poll as the node does until the instances satisfy `predicate`; return every change polled."""
    moved: list[Instance] = []

    def done() -> bool:
        moved.extend(runtime.poll())
        return predicate(runtime.list())

    assert wait_until(done, timeout, 0.05), f"timed out; instances: {runtime.list()}"
    return moved


def test_an_instance_runs_with_its_labels_environment_and_files(runtimes: Runtimes) -> None:
    runtime = runtimes.new()
    files = {"node.key": b"-----BEGIN PRIVATE KEY-----\nnot really\n", "node.crt": b"certificate"}
    spec = runtimes.spec("collector", (PYTHON, "-c", REPORT), replica=2, height=41, files=files,
                         env={"GREETING": "hello"}, restart="on-failure", cpu=0.5, memory_mb=256)

    instance = runtime.start(spec)

    assert instance.state == "running" and instance.pid is not None
    assert dict(instance.labels) == {"tomq.cluster": CLUSTER, "tomq.service": "collector", "tomq.replica": "2",
                                     "tomq.node": runtimes.node, "tomq.height": "41"}
    assert (instance.service, instance.replica, instance.height) == ("collector", 2, 41)
    report = _report(runtime, "collector", 2)
    assert report["files"] == {name: data.decode() for name, data in files.items()}
    assert report["cwd"] == report["env"]["TOMQ_INSTANCE_DIR"]
    assert report["env"] == {"GREETING": "hello", "TOMQ_CLUSTER": CLUSTER, "TOMQ_SERVICE": "collector",
                             "TOMQ_REPLICA": "2", "TOMQ_NODE": runtimes.node, "TOMQ_HEIGHT": "41",
                             "TOMQ_INSTANCE_DIR": report["env"]["TOMQ_INSTANCE_DIR"]}
    # The monitor's pids: the instance's processes, the Python that reported among them.
    pids = runtime.pids()
    assert instance.pid in pids and all(pid_alive(pid) for pid in pids)
    if runtimes.kind == "process":
        assert report["pid"] == instance.pid
    else:
        assert len(pids) >= 2  # docker-init, then the Python it runs (report["pid"] is in the container's namespace)
    assert [i.id for i in runtime.list()] == [instance.id]


def test_a_restarted_node_finds_its_instance_and_does_not_run_it_twice(runtimes: Runtimes) -> None:
    spec = runtimes.spec("analyser", (PYTHON, "-c", REPORT), restart="always")
    first = runtimes.new().start(spec)

    after_restart = runtimes.new()  # a fresh object: nothing remembered but what is on disk / in the engine
    found = after_restart.list()
    assert [(i.id, i.state, i.pid, dict(i.labels)) for i in found] == [
        (first.id, "running", first.pid, spec.labels())]

    again = after_restart.start(spec)  # the node reconciles: same placement, same height
    assert (again.id, again.pid) == (first.id, first.pid)
    assert len(after_restart.list()) == 1
    assert after_restart.poll() and after_restart.poll() == []  # first poll reports it, then nothing moves
    _report(after_restart, "analyser")  # printed exactly once: never launched a second time


def test_a_new_height_replaces_the_instance(runtimes: Runtimes) -> None:
    runtime = runtimes.new()
    old = runtime.start(runtimes.spec("analyser", (PYTHON, "-c", REPORT), height=3))
    assert old.pid is not None

    new = runtime.start(runtimes.spec("analyser", (PYTHON, "-c", REPORT), height=4))

    assert new.height == 4 and new.state == "running"
    assert [i.height for i in runtime.list()] == [4]
    assert _report(runtime, "analyser")["env"]["TOMQ_HEIGHT"] == "4"
    assert wait_until(lambda: not pid_alive(old.pid or 0), 10)


def test_on_failure_restarts_a_failing_command_with_back_off(runtimes: Runtimes) -> None:
    runtime = runtimes.new()
    runtime.start(runtimes.spec("flaky", (PYTHON, "-c", FAIL), restart="on-failure"))

    moved = _poll_until(runtime, lambda found: found[0].restarts >= 2, 15)

    assert moved, "poll() reported no change while the instance was failing and restarting"
    (instance,) = runtime.list()
    assert instance.state in ("running", "restarting", "exited")
    assert instance.restarts >= 2
    assert runtime.logs("flaky", 0).count("failing") >= 2


def test_no_restart_policy_leaves_a_failed_instance_exited(runtimes: Runtimes) -> None:
    runtime = runtimes.new()
    runtime.start(runtimes.spec("oneshot", (PYTHON, "-c", FAIL), restart="no"))

    moved = _poll_until(runtime, lambda found: found[0].state == "exited", 15)
    time.sleep(0.5)  # longer than the first back-off: a restart would have happened by now
    runtime.poll()

    (instance,) = runtime.list()
    assert (instance.state, instance.exit_code, instance.restarts, instance.pid) == ("exited", 1, 0, None)
    assert any(i.state == "exited" for i in moved)
    assert runtime.pids() == []
    assert runtime.start(runtimes.spec("oneshot", (PYTHON, "-c", FAIL), restart="no")).state == "exited"


def test_stop_removes_the_instance_and_its_processes(runtimes: Runtimes) -> None:
    runtime = runtimes.new()
    instance = runtime.start(runtimes.spec("sleeper", (PYTHON, "-c", REPORT), restart="always"))
    pid = _report(runtime, "sleeper")["pid"]  # a host pid only for the process runtime
    pids = runtime.pids()
    assert instance.pid in pids

    begun = time.monotonic()
    runtime.stop("sleeper", 0, timeout=5)

    assert time.monotonic() - begun < 4, "SIGTERM should have been enough"
    assert runtime.list() == [] and runtime.pids() == []
    assert wait_until(lambda: not any(pid_alive(p) for p in pids), 5)
    if runtimes.kind == "process":
        assert not pid_alive(pid)
    runtime.stop("sleeper", 0)  # absent: no error
    with pytest.raises(InstanceFailed, match="no instance sleeper/0"):
        runtime.logs("sleeper", 0)


def test_an_instance_reaches_a_tcp_server_on_loopback(runtimes: Runtimes) -> None:
    port = free_port()
    received: list[bytes] = []
    with socket.create_server(("127.0.0.1", port)) as server:
        server.settimeout(15)

        def accept() -> None:
            connection, _ = server.accept()
            with connection:
                received.append(connection.recv(100))

        thread = threading.Thread(target=accept, daemon=True)
        thread.start()
        runtime = runtimes.new()
        runtime.start(runtimes.spec("probe", (PYTHON, "-c", CONNECT, str(port), runtimes.kind)))
        thread.join(15)
    assert received == [f"hello from {runtimes.kind}".encode()], runtime.logs("probe", 0)


# Takes the MiB given as argv[1], touching every page so that it counts, then sleeps.
HOG = """\
import sys, time
block = bytearray(int(sys.argv[1]) * 1024 * 1024)
for i in range(0, len(block), 4096):
    block[i] = 1
print("allocated", flush=True)
time.sleep(120)
"""
SPIN = "print('spinning', flush=True)\nwhile True:\n    pass\n"


def _require_limits(runtimes: Runtimes, runtime: Runtime) -> None:
    if isinstance(runtime, ProcessRuntime):
        require("cgroups for the process runtime", runtime.cgroups is not None, runtime.limits)


def _cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime + stime, in clock ticks
    return total / os.sysconf("SC_CLK_TCK")


def test_an_instance_past_its_memory_limit_is_killed_and_one_within_it_runs(runtimes: Runtimes) -> None:
    runtime = runtimes.new()
    _require_limits(runtimes, runtime)
    runtime.start(runtimes.spec("hog", (PYTHON, "-c", HOG, "256"), memory_mb=64, restart="no"))
    runtime.start(runtimes.spec("fits", (PYTHON, "-c", HOG, "16"), memory_mb=128, restart="no"))

    _poll_until(runtime, lambda found: any(i.service == "hog" and i.state == "exited" for i in found), 60)

    states = {i.service: (i.state, i.exit_code) for i in runtime.list()}
    assert states["hog"] == ("exited", 137), runtime.logs("hog", 0)  # SIGKILLed by the kernel, as docker says it
    assert "allocated" not in runtime.logs("hog", 0)
    assert wait_until(lambda: "allocated" in runtime.logs("fits", 0), 30), runtime.logs("fits", 0)
    assert {i.service: i.state for i in runtime.list()}["fits"] == "running"
    if isinstance(runtime, ProcessRuntime):
        (record,) = [json.loads(path.read_text()) for path in runtime.state_dir.glob("*hog*/instance.json")]
        assert record["limits"] == f"cgroup v{runtime.cgroups.version}"  # type: ignore[union-attr]


def test_a_busy_instance_gets_no_more_cpu_than_its_spec_gives_it(runtimes: Runtimes) -> None:
    runtime = runtimes.new()
    _require_limits(runtimes, runtime)
    runtime.start(runtimes.spec("spin", (PYTHON, "-c", SPIN), cpu=0.2))
    assert wait_until(lambda: "spinning" in runtime.logs("spin", 0), 30), runtime.logs("spin", 0)
    pids = runtime.pids()
    before, started = _cpu_seconds(pids), time.monotonic()
    time.sleep(3)
    share = (_cpu_seconds(pids) - before) / (time.monotonic() - started)
    # Unlimited it would take a whole core; the quota is 0.2 of one per 100 ms period.
    assert 0.02 < share < 0.3, f"the spinning instance used {share:.2f} cores"
    runtime.stop("spin", 0, timeout=1)
    if isinstance(runtime, ProcessRuntime):
        assert runtime.cgroups is not None
        assert not [g for root in {runtime.cgroups.cpu_root, runtime.cgroups.memory_root}
                    for g in root.glob(f"tomq-{CLUSTER}-{runtimes.node}-*")], "stop leaves no control group behind"


def test_spec_is_checked_and_labels_are_strings() -> None:
    spec = InstanceSpec(cluster="c", service="s", replica=1, node="n", height=9, image="i", command=("x",))
    assert spec.labels() == {"tomq.cluster": "c", "tomq.service": "s", "tomq.replica": "1",
                             "tomq.node": "n", "tomq.height": "9"}
    assert spec.name == "tomq-c-n-s-1"
    for bad in ({"service": "a/b"}, {"replica": -1}, {"restart": "sometimes"}, {"command": ()},
                {"files": {"../key": b""}}, {"env": {"TOMQ_INSTANCE_DIR": "/"}}, {"cpu": -1}):
        fields: dict[str, Any] = dict(cluster="c", service="s", replica=1, node="n", height=9, image="i",
                                      command=("x",))
        fields.update(bad)
        with pytest.raises(UsageError):
            InstanceSpec(**fields)


# ---------------------------------------------------------------------- process runtime only


def test_process_runtime_takes_its_state_directory_for_itself(tmp_path: Path) -> None:
    with ProcessRuntime(tmp_path, CLUSTER, "n1"):
        with pytest.raises(RuntimeUnavailable, match="in use by another process runtime"):
            ProcessRuntime(tmp_path, CLUSTER, "n1")
    ProcessRuntime(tmp_path, CLUSTER, "n1").close()  # released on close


@pytest.mark.parametrize("limits", [{}, {"cpu": 0.5, "memory_mb": 64}], ids=["unlimited", "limited"])
def test_process_runtime_reports_a_missing_command(tmp_path: Path, limits: dict[str, Any]) -> None:
    with ProcessRuntime(tmp_path, CLUSTER, "n1") as runtime:
        spec = InstanceSpec(cluster=CLUSTER, service="s", replica=0, node="n1", height=1, image="-",
                            command=("/nonexistent/tomq-service",), **limits)
        with pytest.raises(InstanceFailed, match="cannot run tomq-rt-n1-s-0: /nonexistent/tomq-service"):
            runtime.start(spec)
        assert runtime.list() == []


# Starts a grandchild in a session of its own (out of the instance's process group), prints its pid.
ESCAPE = """\
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
print(child.pid, flush=True)
time.sleep(120)
"""


def test_stop_also_kills_what_left_the_instance_s_process_group(tmp_path: Path) -> None:
    with ProcessRuntime(tmp_path, CLUSTER, "n1") as runtime:
        require("cgroups for the process runtime", runtime.cgroups is not None, runtime.limits)
        runtime.start(InstanceSpec(cluster=CLUSTER, service="esc", replica=0, node="n1", height=1, image="-",
                                   command=(PYTHON, "-c", ESCAPE), cpu=0.5, memory_mb=128))
        assert wait_until(lambda: runtime.logs("esc", 0).strip().isdigit(), 30), runtime.logs("esc", 0)
        escaped = int(runtime.logs("esc", 0).strip())
        assert pid_alive(escaped)
        assert runtime.cgroups is not None
        roots = {runtime.cgroups.cpu_root, runtime.cgroups.memory_root}
        assert all(len(list(root.glob(f"tomq-{CLUSTER}-n1-esc-0.*"))) == 1 for root in roots)
        runtime.stop("esc", 0, timeout=2)
        assert wait_until(lambda: not pid_alive(escaped), 10), "a process that called setsid outlived stop()"
        assert not any(list(root.glob(f"tomq-{CLUSTER}-n1-esc-0.*")) for root in roots)


def test_a_listed_pid_that_now_names_an_outsider_is_never_killed(tmp_path: Path) -> None:
    """Without cgroup.kill (cgroup v1) a group is emptied pid by pid from cgroup.procs; a pid read
    there may have been reused by an unrelated process before the kill. Here the list names a live
    process outside the group outright: it must survive (and count as nothing killed)."""
    import subprocess

    group = tmp_path / "tomq" / f"tomq-{CLUSTER}-n1-gone-0.x"  # shaped like an instance's group, no cgroup.kill
    group.mkdir(parents=True)
    outsider = subprocess.Popen(["sleep", "30"])
    try:
        (group / "cgroup.procs").write_text(f"{outsider.pid}\n")
        assert cgroups._empty(group, timeout=0.3) == 0
        assert outsider.poll() is None, "a process outside the group was killed"
    finally:
        outsider.kill()
        outsider.wait()


def test_two_runtimes_with_the_same_names_keep_out_of_each_other_s_groups(tmp_path: Path) -> None:
    """Two clusters on one machine may both have node n1 and service s: neither runtime may kill or
    reuse the other's instances through the machine-wide control groups."""
    spec = InstanceSpec(cluster=CLUSTER, service="twin", replica=0, node="n1", height=1, image="-",
                        command=(PYTHON, "-c", REPORT), cpu=0.5, memory_mb=128)
    with ProcessRuntime(tmp_path / "a", CLUSTER, "n1") as first, ProcessRuntime(tmp_path / "b", CLUSTER, "n1") as second:
        require("cgroups for the process runtime", first.cgroups is not None, first.limits)
        one = first.start(spec)
        two = second.start(spec)
        assert one.pid is not None and two.pid is not None and one.pid != two.pid
        second.stop("twin", 0, timeout=2)
        assert wait_until(lambda: not pid_alive(two.pid or 0), 10)
        time.sleep(0.3)
        assert pid_alive(one.pid), "stopping one runtime's instance killed the other's"
        assert [i.state for i in first.list()] == ["running"]


def test_process_runtime_never_signals_a_reused_pid(tmp_path: Path) -> None:
    """The record names a pid that now belongs to someone else: it is not ours to stop."""
    runtime = ProcessRuntime(tmp_path, CLUSTER, "n1")
    spec = InstanceSpec(cluster=CLUSTER, service="s", replica=0, node="n1", height=1, image="-",
                        command=(PYTHON, "-c", "import time; time.sleep(60)"), restart="no")
    instance = runtime.start(spec)
    runtime.close()
    time.sleep(0.05)  # start times are in clock ticks (10 ms): a real reuse comes a pid-space wrap later
    stranger = os.posix_spawn("/bin/sleep", ["sleep", "60"], {})
    try:
        record_path = tmp_path / spec.name / "instance.json"
        record = json.loads(record_path.read_text())
        record["pid"] = stranger  # as if the instance died and its pid was handed to `sleep`
        record_path.write_text(json.dumps(record))

        with ProcessRuntime(tmp_path, CLUSTER, "n1") as after:
            (found,) = after.list()
            assert (found.state, found.exit_code, found.pid) == ("exited", None, None)
            after.stop("s", 0, timeout=0.2)
        assert pid_alive(stranger)
    finally:
        os.kill(stranger, 9)
        os.waitpid(stranger, 0)
        if instance.pid is not None and pid_alive(instance.pid):
            os.kill(instance.pid, 9)


# ---------------------------------------------------------------------- docker runtime only


def test_docker_runtime_without_an_engine_says_so(tmp_path: Path) -> None:
    url = f"unix://{tmp_path}/nothing.sock"
    assert docker_available(url) is False
    with pytest.raises(RuntimeUnavailable, match=r"no docker engine answers at unix://.*\(No such file or directory\)"):
        DockerRuntime(url, CLUSTER, "n1", state_dir=tmp_path / "files")
    assert not (tmp_path / "files").exists()


def test_docker_runtime_names_a_missing_image(dockerd: str, tmp_path: Path) -> None:
    assert docker_available(dockerd)
    with DockerRuntime(dockerd, CLUSTER, "n1", state_dir=tmp_path) as runtime:
        spec = InstanceSpec(cluster=CLUSTER, service="s", replica=0, node="n1", height=1,
                            image="tomq/absent:1", command=(PYTHON,))
        with pytest.raises(InstanceFailed, match=r"tomq/absent:1.*tomq image build") as failure:
            runtime.start(spec)
        assert "\n" not in str(failure.value)
        assert runtime.list() == []


def test_host_python_mounts_cover_the_interpreter_venv_and_sources() -> None:
    import tomq

    mounts = host_python_mounts()

    def covered(path: str) -> bool:
        return any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts)

    for path in (sys.prefix, sys.base_prefix, os.path.realpath(sys.executable), tomq.__file__, "/usr/lib"):
        assert covered(os.path.realpath(path)), path
    assert not any(a != b and b.startswith(a + "/") for a in mounts for b in mounts), "nested mounts"


def test_process_runtime_adopts_what_a_node_launched_but_never_recorded(tmp_path: Path) -> None:
    """The node died between launching and writing the pid: the record still says "created"."""
    runtime = ProcessRuntime(tmp_path, CLUSTER, "n1")
    spec = InstanceSpec(cluster=CLUSTER, service="s", replica=0, node="n1", height=1, image="-",
                        command=(PYTHON, "-c", "import time; time.sleep(60)"), restart="on-failure")
    instance = runtime.start(spec)
    runtime.close()
    record_path = tmp_path / spec.name / "instance.json"
    record = json.loads(record_path.read_text())
    record.update(state="created", pid=None, pid_start=None)
    record_path.write_text(json.dumps(record))

    with ProcessRuntime(tmp_path, CLUSTER, "n1") as after:
        assert [(i.state, i.pid) for i in after.list()] == [("running", instance.pid)]
        assert after.start(spec).pid == instance.pid  # adopted, not launched again
        after.stop("s", 0, timeout=1)
        assert instance.pid is not None and not pid_alive(instance.pid)
