"""The runtime image: the container root file system the docker runtime starts services in.

It is made locally, from nothing, so an edge box needs no registry: a rootfs made here with tarfile
(/etc/passwd, group, hosts, nsswitch.conf; /tmp with 1777; mount points for the host paths the
docker runtime bind-mounts; the host's merged-/usr symlinks) is imported as the image's only layer
(`docker import` with ENV and LABEL changes: the equivalent of `FROM scratch` + `COPY rootfs/ /`).
The image holds no Python and no tomq: containers borrow the host's through read-only bind mounts
(docker.host_python_mounts()).

The build is idempotent: the rootfs tar is deterministic and its digest is a label, so an image
whose tomq version and digest already match is left alone. What it must never do: contact a
registry (nothing here pulls), or remove an image other than the one its own tag used to name.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import tarfile
import time
from dataclasses import dataclass

import docker.errors
from docker.utils import parse_repository_tag

from tomq import __version__
from tomq.errors import TomqError
from tomq.node.runtime.base import one_line
from tomq.node.runtime.docker import connect, default_docker_host, engine_errors, system_symlinks

RUNTIME_IMAGE = "tomq/runtime:latest"
LABEL_VERSION = "tomq.version"
LABEL_ROOTFS = "tomq.rootfs"  # sha256 of the rootfs tar: what tells an up-to-date image from a stale one
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Directories in the image: the kernel's and docker's mount points, root's home, and /sbin, where
# docker puts docker-init (see docker.SYSTEM_DIRS). Host paths deeper than these (/work/..., the
# venv) are created by the engine when it mounts them.
DIRECTORIES = {"dev": 0o755, "etc": 0o755, "proc": 0o555, "root": 0o700, "sbin": 0o755, "sys": 0o555,
               "tmp": 0o1777, "usr": 0o755, "var": 0o755, "var/tmp": 0o1777}
FILES = {
    "etc/passwd": b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
    "etc/group": b"root:x:0:\nnogroup:x:65534:\n",
    # Docker replaces /etc/hosts (and resolv.conf, hostname) in a host-network container; this copy
    # is for anything that runs the image otherwise.
    "etc/hosts": b"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
    "etc/nsswitch.conf": b"passwd: files\ngroup: files\nshadow: files\nhosts: files dns\nnetworks: files\n"
                         b"protocols: files\nservices: files\n",
}


class ImageBuildFailed(TomqError):
    """The engine answered but could not build the runtime image."""


@dataclass(frozen=True)
class ImageBuild:
    """The outcome of build_image: `built` is False when the image was already up to date."""

    tag: str
    id: str
    built: bool
    seconds: float


def rootfs_tar() -> bytes:
    """The image's root file system as a tar; the same bytes every time on the same host."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        entries: list[tuple[str, tarfile.TarInfo, bytes | None]] = []
        for name, mode in DIRECTORIES.items():
            entries.append((name, _entry(name, tarfile.DIRTYPE, mode), None))
        for name, target in system_symlinks().items():
            entries.append((name, _entry(name, tarfile.SYMTYPE, 0o777, target), None))
        for name, data in FILES.items():
            info = _entry(name, tarfile.REGTYPE, 0o644)
            info.size = len(data)
            entries.append((name, info, data))
        for _, info, content in sorted(entries, key=lambda entry: entry[0]):  # parents before children
            tar.addfile(info, io.BytesIO(content) if content is not None else None)
    return buffer.getvalue()


def image_labels(rootfs: bytes | None = None) -> dict[str, str]:
    """The labels an up-to-date runtime image carries."""
    data = rootfs_tar() if rootfs is None else rootfs
    return {LABEL_VERSION: __version__, LABEL_ROOTFS: f"sha256:{hashlib.sha256(data).hexdigest()}"}


def build_image(base_url: str | None = None, tag: str = RUNTIME_IMAGE, *, force: bool = False) -> ImageBuild:
    """Build the runtime image as `tag` on the engine at `base_url` unless it is already up to date."""
    begun = time.monotonic()
    url = base_url or default_docker_host()
    rootfs = rootfs_tar()
    wanted = image_labels(rootfs)
    client = connect(url)
    try:
        with engine_errors(url, f"build {tag}"):
            try:
                existing = client.images.get(tag)
            except docker.errors.ImageNotFound:
                existing = None
            if existing is not None and not force and all(
                    existing.labels.get(key) == value for key, value in wanted.items()):
                return ImageBuild(tag, str(existing.id), False, time.monotonic() - begun)
            repository, version = parse_repository_tag(tag)
            changes = [f"ENV PATH={PATH}", *(f'LABEL {key}="{value}"' for key, value in wanted.items())]
            # `docker import` rather than a Dockerfile build: one API call, the tar's bytes as they
            # are, and no intermediate containers (each costs up to a second to remove on vfs).
            reply = client.api.import_image_from_data(rootfs, repository=repository, tag=version or "latest",
                                                      changes=changes)
            for line in str(reply).splitlines():
                message = json.loads(line) if line.strip().startswith("{") else {}
                if "error" in message:
                    raise ImageBuildFailed(f"cannot import {tag} on the engine at {url}: {one_line(message['error'])}")
            image = client.images.get(tag)
            if existing is not None and existing.id != image.id:
                # The tag moved on; the old image is ours and now dangling. A container may still
                # use it, in which case the engine keeps it and so do we.
                with contextlib.suppress(docker.errors.APIError):
                    client.images.remove(str(existing.id))
            return ImageBuild(tag, str(image.id), True, time.monotonic() - begun)
    finally:
        client.close()


def _entry(name: str, kind: bytes, mode: int, target: str = "") -> tarfile.TarInfo:
    # Fixed owner and time: the tar's bytes, and so the digest label, depend on content alone.
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.linkname = target
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    info.mtime = 0
    return info
