"""The runtime image (node/runtime/image.py) and `tomq image build`, on the session's private dockerd.

The engine has no registry and no images: everything here is built from nothing.
"""

from __future__ import annotations

import argparse
import io
import secrets
import sys
import tarfile
import time
from collections.abc import Iterator

import docker
import pytest
from dockerd import dockerd

from tomq import __version__
from tomq.node.runtime import cli as runtime_cli
from tomq.node.runtime.base import RuntimeUnavailable
from tomq.node.runtime.docker import host_python_mounts
from tomq.node.runtime.image import LABEL_ROOTFS, LABEL_VERSION, build_image, image_labels, rootfs_tar

__all__ = ["dockerd"]  # a fixture, used by name below

PYTHON = sys.executable


@pytest.fixture
def client(dockerd: str) -> Iterator[docker.DockerClient]:
    engine = docker.DockerClient(base_url=dockerd, version="auto")
    yield engine
    engine.close()


@pytest.fixture
def tag(client: docker.DockerClient) -> Iterator[str]:
    name = f"tomq/runtime-build:{secrets.token_hex(4)}"  # not the session's image: this one starts from nothing
    yield name
    for container in client.containers.list(all=True, filters={"ancestor": name}):
        container.remove(force=True)
    client.images.remove(name, force=True)


def test_the_image_builds_from_nothing_carries_its_labels_and_is_idempotent(
        dockerd: str, client: docker.DockerClient, tag: str) -> None:
    assert not client.images.list(name=tag)

    first = build_image(dockerd, tag)
    again = build_image(dockerd, tag)

    assert first.built and not again.built
    assert again.id == first.id
    image = client.images.get(tag)
    assert image.labels[LABEL_VERSION] == __version__
    assert image.labels == image_labels()
    assert len(image.attrs["RootFS"]["Layers"]) == 1  # FROM scratch: one layer, the rootfs
    assert image.attrs["Size"] < 64 * 1024
    assert first.seconds < 20 and again.seconds < 5
    print(f"\nimage build from nothing {first.seconds:.2f} s, up-to-date check {again.seconds:.2f} s")


def test_a_container_from_it_runs_the_host_python_and_tomq(
        dockerd: str, client: docker.DockerClient, tag: str) -> None:
    build_image(dockerd, tag)
    mounts = [docker.types.Mount(path, path, type="bind", read_only=True) for path in host_python_mounts()]
    script = ("import os, pwd, tomq, tomq.node.runtime.base as base; "
              "print(tomq.__version__, base.__file__, oct(os.stat('/tmp').st_mode & 0o7777), pwd.getpwuid(0).pw_name)")

    begun = time.monotonic()
    container = client.containers.run(tag, [PYTHON, "-c", script], mounts=mounts, network_mode="host",
                                      init=True, detach=True)
    started = time.monotonic() - begun
    status = container.wait(timeout=30)
    finished = time.monotonic() - begun
    output = container.logs().decode()

    assert status["StatusCode"] == 0, output
    version, module, tmp_mode, user = output.split()
    assert version == __version__
    assert module == base_module_path()
    assert (tmp_mode, user) == ("0o1777", "root")
    print(f"\ncontainer start {started:.2f} s, python -c 'import tomq' done {finished:.2f} s")


def test_tomq_image_build_command(dockerd: str, tag: str, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="tomq")
    runtime_cli.register(parser.add_subparsers(dest="command", required=True))

    args = parser.parse_args(["image", "build", "--docker-host", dockerd, "--tag", tag])
    assert args.run(args) == 0
    assert f"built {tag}" in capsys.readouterr().out
    assert args.run(args) == 0
    assert f"{tag} (sha256:" in (out := capsys.readouterr().out) and "is up to date" in out

    args = parser.parse_args(["image", "build", "--docker-host", dockerd, "--tag", tag, "--force"])
    assert args.run(args) == 0
    assert f"built {tag}" in capsys.readouterr().out


def test_tomq_image_build_without_an_engine(tmp_path: object) -> None:
    parser = argparse.ArgumentParser(prog="tomq")
    runtime_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["image", "build", "--docker-host", f"unix://{tmp_path}/none.sock"])
    with pytest.raises(RuntimeUnavailable, match="no docker engine answers"):
        args.run(args)


def test_the_rootfs_is_deterministic_and_minimal() -> None:
    rootfs = rootfs_tar()
    assert rootfs == rootfs_tar()
    assert image_labels(rootfs)[LABEL_ROOTFS].startswith("sha256:")
    with tarfile.open(fileobj=io.BytesIO(rootfs)) as tar:
        members = {member.name: member for member in tar.getmembers()}
        assert members["tmp"].mode == 0o1777 and members["tmp"].isdir()
        assert members["sbin"].isdir()  # docker-init is mounted at /sbin/docker-init
        passwd = tar.extractfile("etc/passwd")
        assert passwd is not None and passwd.read().startswith(b"root:x:0:0:")
        assert {"etc/group", "etc/hosts", "etc/nsswitch.conf", "usr", "proc", "sys", "dev"} <= set(members)
        assert all(member.mtime == 0 and member.uid == 0 for member in members.values())


def base_module_path() -> str:
    import tomq.node.runtime.base as base

    return base.__file__
