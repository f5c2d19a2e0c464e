"""The docker runtime: service instances as containers on the docker engine of this host (DESIGN.md §6).

Containers are named tomq-<cluster>-<node>-<service>-<replica> (so the engine itself refuses a
second one) and labelled with the cluster, node, service, replica and placement height; list()
finds them by those labels, so a restarted node sees exactly what it left. They run on the host
network (a broker on 127.0.0.1 is reachable), under docker-init (signals reach the service and
zombies are reaped), with docker's own restart policy, CPU and memory limits.

The runtime image (tomq.node.runtime.image) holds no Python: containers run the host's interpreter,
virtualenv and tomq sources through read-only bind mounts at the same paths, listed by
host_python_mounts(). The engine must therefore be on this host: bind mounts name host paths.

What it must never do: let a docker-py or requests exception escape (engine_errors() translates
them at the boundary), touch a container without our cluster and node labels, or mount anything
writable but an instance's own files directory, and that one read-only too.
"""

from __future__ import annotations

import builtins
import contextlib
import importlib.util
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import docker
import docker.errors
import requests.exceptions
from docker.models.containers import Container
from docker.types import LogConfig, Mount

from tomq.errors import InvalidTopic, TomqError, UsageError
from tomq.node.runtime.base import (
    INSTANCE_LABELS,
    LABEL_CLUSTER,
    LABEL_HEIGHT,
    LABEL_NODE,
    LABEL_REPLICA,
    LABEL_SERVICE,
    MAX_FAILURE_RESTARTS,
    Instance,
    InstanceFailed,
    InstanceSpec,
    RestartPolicy,
    RuntimeUnavailable,
    changed,
    instance_name,
    one_line,
    private_directory,
    process_tree,
)
from tomq.topics import check_segment

DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"
API_TIMEOUT = 30.0
# Top-level system directories that merged-/usr hosts make symlinks into /usr. Where one is a real
# directory it is mounted; where it is a symlink the image carries the same symlink (image.py).
# /sbin is left out on purpose: docker mounts docker-init at /sbin/docker-init, which needs a
# writable directory there, and Python needs nothing from /sbin.
SYSTEM_DIRS = ("bin", "lib", "lib32", "lib64", "libx32")
# The packages a tomq service imports; in an editable install each may live in its own folder.
TOMQ_PACKAGES = ("tomq", "tomq.broker", "tomq.node", "tomq.sensors", "tomq.bridge")
LOG_CONFIG = {"max-size": "1m", "max-file": "2"}  # json-file logs must not fill an edge box's disk


def default_docker_host() -> str:
    return os.environ.get("DOCKER_HOST") or DEFAULT_DOCKER_HOST


def system_symlinks() -> dict[str, str]:
    """SYSTEM_DIRS that are symlinks on this host (merged /usr): name -> target, for the image."""
    return {name: os.readlink(f"/{name}") for name in SYSTEM_DIRS if os.path.islink(f"/{name}")}


def host_python_mounts() -> list[str]:
    """Host paths a container needs, read-only at the same path, to run this host's Python and tomq.

    - /usr, and /bin, /lib, /lib64 ... where they are real directories: the dynamic loader, libc
      and the shared libraries of Python's extension modules (ssl, ctypes, cryptography's);
    - sys.base_prefix: the interpreter and its standard library (a venv has neither);
    - sys.prefix: the virtualenv with its site-packages (docker, paho, cryptography, ...);
    - the folder of the real interpreter binary, when it is outside both;
    - the folder of each tomq package: an editable install (pip install -e) maps them into the
      source tree, outside site-packages.
    Both the path as Python sees it and its real path are mounted, so symlinks resolve inside.
    Returned sorted, without paths inside another returned path.
    """
    wanted = ["/usr"] + [f"/{name}" for name in SYSTEM_DIRS
                          if os.path.isdir(f"/{name}") and not os.path.islink(f"/{name}")]
    wanted += [sys.base_prefix, sys.prefix, os.path.dirname(os.path.realpath(sys.executable))]
    for package in TOMQ_PACKAGES:
        spec = importlib.util.find_spec(package)
        if spec is not None:
            wanted += list(spec.submodule_search_locations or [])
    paths = {os.path.abspath(path) for path in wanted} | {os.path.realpath(path) for path in wanted}
    kept: list[str] = []
    for path in sorted(p for p in paths if os.path.exists(p)):
        if not any(path == outer or path.startswith(outer.rstrip("/") + "/") for outer in kept):
            kept.append(path)
    return kept


@contextlib.contextmanager
def engine_errors(base_url: str, action: str) -> Iterator[None]:
    """Translate what docker-py and requests raise into our two errors, one line each."""
    try:
        yield
    except TomqError:
        raise
    except docker.errors.ImageNotFound as exc:
        raise InstanceFailed(f"cannot {action}: {one_line(exc.explanation or exc)} on the engine at {base_url}; "
                             "build it with `tomq image build`") from None
    except docker.errors.APIError as exc:
        raise InstanceFailed(f"cannot {action}: the engine at {base_url} refused: "
                             f"{one_line(exc.explanation or exc)}") from None
    except (docker.errors.DockerException, requests.exceptions.RequestException, OSError) as exc:
        raise RuntimeUnavailable(f"cannot {action}: no docker engine answers at {base_url} ({_reason(exc)}); "
                                 "start dockerd or point --docker-host at it") from None


def _reason(exc: BaseException) -> str:
    """The OS error at the bottom of docker-py's and requests' wrapping (e.g. "Connection refused"),
    else the exception's own text: the part of a connection failure an operator can act on."""
    pending: list[object] = [exc]
    seen: set[int] = set()
    while pending:
        item = pending.pop(0)
        if not isinstance(item, BaseException) or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, OSError) and item.strerror:
            return item.strerror
        pending.extend([item.__cause__, item.__context__, *item.args, getattr(item, "reason", None)])
    return one_line(exc)


def connect(base_url: str | None = None, timeout: float = API_TIMEOUT) -> docker.DockerClient:
    """A client for the engine at `base_url` (default $DOCKER_HOST, then the standard socket).
    Negotiating the API version is a round trip, so this fails fast when nothing answers."""
    url = base_url or default_docker_host()
    with engine_errors(url, "connect"):
        return docker.DockerClient(base_url=url, version="auto", timeout=math.ceil(timeout))


def docker_available(base_url: str | None = None, timeout: float = 3.0) -> bool:
    """Whether an engine answers at `base_url` within `timeout` seconds."""
    try:
        client = connect(base_url, timeout)
    except TomqError:
        return False
    try:
        with engine_errors(base_url or default_docker_host(), "ping"):
            return bool(client.ping())
    except TomqError:
        return False
    finally:
        client.close()


def restart_policy(policy: RestartPolicy) -> dict[str, Any]:
    """Our policy in docker's terms; on-failure gives up after MAX_FAILURE_RESTARTS, like the process runtime."""
    if policy == "on-failure":
        return {"Name": "on-failure", "MaximumRetryCount": MAX_FAILURE_RESTARTS}
    return {"Name": policy}


class DockerRuntime:
    """Instances of one cluster on one node as containers; see the module docstring.

    `state_dir` holds each instance's files (bind-mounted read-only at the same path); the default
    is a private directory under the system's temp dir. `python_mounts` replaces host_python_mounts().
    """

    name = "docker"
    limits = "docker"  # the engine's own cpu and memory limits

    def __init__(self, base_url: str | None, cluster: str, node: str, *,
                 state_dir: str | os.PathLike[str] | None = None,
                 python_mounts: Sequence[str] | None = None, timeout: float = API_TIMEOUT) -> None:
        try:
            self.cluster = check_segment(cluster, "cluster name")
            self.node = check_segment(node, "node name")
        except InvalidTopic as exc:
            raise UsageError(str(exc)) from None
        self.base_url = base_url or default_docker_host()
        self.state_dir = Path(state_dir) if state_dir is not None else (
            Path(tempfile.gettempdir()) / f"tomq-docker-{cluster}-{node}")
        self.python_mounts = list(host_python_mounts() if python_mounts is None else python_mounts)
        self._client = connect(self.base_url, timeout)  # first: a runtime that cannot connect leaves nothing behind
        try:
            private_directory(self.state_dir, "docker runtime state directory")
        except RuntimeUnavailable:
            self._client.close()
            raise
        self._seen: dict[str, Instance] = {}

    # ------------------------------------------------------------------ the Runtime interface

    def start(self, spec: InstanceSpec) -> Instance:
        if (spec.cluster, spec.node) != (self.cluster, self.node):
            raise UsageError(f"{spec.name} belongs to cluster {spec.cluster} node {spec.node}; "
                             f"this runtime runs {self.cluster} node {self.node}")
        with engine_errors(self.base_url, f"start {spec.name}"):
            existing = self._containers(spec.service, spec.replica)
            for container in existing:
                if container.labels.get(LABEL_HEIGHT) == str(spec.height):
                    return self._instance(container)
            if existing:
                self.stop(spec.service, spec.replica)  # placed again at another height: replace it
            files = self._write_files(spec)
            try:
                container = self._create(spec, files)
            except docker.errors.APIError as exc:
                if exc.status_code == 409:
                    # The name is taken: either another start() of the same placement won the race
                    # (then it is ours to return) or a container without our labels holds the name.
                    for container in self._containers(spec.service, spec.replica):
                        if container.labels.get(LABEL_HEIGHT) == str(spec.height):
                            return self._instance(container)
                shutil.rmtree(files, ignore_errors=True)
                raise
            return self._instance(container)

    def stop(self, service: str, replica: int, timeout: float = 5) -> None:
        name = instance_name(self.cluster, self.node, service, replica)
        with engine_errors(self.base_url, f"stop {name}"):
            for container in self._containers(service, replica):
                # stop() first so the service gets SIGTERM and its grace period; remove(force) alone
                # would SIGKILL it.
                with contextlib.suppress(docker.errors.NotFound):
                    container.stop(timeout=max(0, math.ceil(timeout)))
                with contextlib.suppress(docker.errors.NotFound):
                    container.remove(force=True)
        self._seen.pop(name, None)
        shutil.rmtree(self.state_dir / name, ignore_errors=True)

    def list(self) -> builtins.list[Instance]:
        with engine_errors(self.base_url, "list containers"):
            return [self._instance(container) for container in self._containers()]

    def poll(self) -> builtins.list[Instance]:
        # The engine applies the restart policy itself; we only report what moved.
        current = {instance.id: instance for instance in self.list()}
        moved = changed(self._seen, current)
        self._seen = current
        return moved

    def pids(self) -> builtins.list[int]:
        roots = [instance.pid for instance in self.list() if instance.running and instance.pid]
        return process_tree([pid for pid in roots if pid is not None])

    def logs(self, service: str, replica: int, tail: int = 100) -> str:
        name = instance_name(self.cluster, self.node, service, replica)
        with engine_errors(self.base_url, f"read the logs of {name}"):
            for container in self._containers(service, replica):
                output: bytes = container.logs(stdout=True, stderr=True, tail=max(0, tail))
                return output.decode(errors="replace")
        raise InstanceFailed(f"no instance {service}/{replica} of cluster {self.cluster} on node {self.node}")

    def close(self) -> None:
        self._client.close()  # containers keep running: they are the engine's, not this object's

    def __enter__(self) -> DockerRuntime:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------ helpers

    def _containers(self, service: str | None = None, replica: int | None = None) -> builtins.list[Container]:
        labels = [f"{LABEL_CLUSTER}={self.cluster}", f"{LABEL_NODE}={self.node}"]
        if service is not None:
            labels.append(f"{LABEL_SERVICE}={service}")
        if replica is not None:
            labels.append(f"{LABEL_REPLICA}={replica}")
        # ignore_removed: a container removed between listing and inspecting is simply not there.
        found: builtins.list[Container] = self._client.containers.list(all=True, filters={"label": labels},
                                                              ignore_removed=True)
        return found

    def _write_files(self, spec: InstanceSpec) -> Path:
        directory = self.state_dir / spec.name
        try:
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir(mode=0o700)
            for name, data in spec.files.items():
                fd = os.open(directory / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
        except OSError as exc:
            raise InstanceFailed(f"cannot prepare {directory} for {spec.name}: {exc.strerror or exc}") from None
        return directory

    def _create(self, spec: InstanceSpec, files: Path) -> Container:
        mounts = [Mount(target=path, source=path, type="bind", read_only=True)
                  for path in [*self.python_mounts, str(files)]]
        options: dict[str, Any] = {}
        if spec.cpu > 0:
            options["nano_cpus"] = int(spec.cpu * 1e9)
        if spec.memory_mb > 0:
            options["mem_limit"] = f"{spec.memory_mb}m"
        container: Container = self._client.containers.create(
            spec.image, list(spec.command), name=spec.name, labels=spec.labels(),
            environment=spec.environment(str(files)), working_dir=str(files), network_mode="host",
            init=True, restart_policy=restart_policy(spec.restart), mounts=mounts,
            log_config=LogConfig(type=LogConfig.types.JSON, config=LOG_CONFIG), **options)
        try:
            container.start()
        except Exception:
            # A container that was created but cannot start would hold the name: never leave it.
            with contextlib.suppress(docker.errors.DockerException, requests.exceptions.RequestException):
                container.remove(force=True)
            raise
        container.reload()
        return container

    def _instance(self, container: Container) -> Instance:
        attrs = container.attrs
        state = attrs.get("State", {})
        status = str(state.get("Status") or container.status)
        # Docker says ExitCode 0 for a container that is running or never ran; we say "none yet".
        exit_code = None if status in ("created", "running") else state.get("ExitCode")
        pid = state.get("Pid") or None
        # Only the instance's labels: a container also carries its image's (tomq.version, tomq.rootfs).
        labels = {key: value for key, value in container.labels.items() if key in INSTANCE_LABELS}
        return Instance(labels=labels, id=str(container.id), state=status,
                        exit_code=exit_code, restarts=int(attrs.get("RestartCount", 0)),
                        pid=pid if status == "running" else None)
