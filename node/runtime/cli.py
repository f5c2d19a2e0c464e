"""The `tomq image build` command: build the docker runtime's image on this host's engine, no registry.

`register(subparsers)` adds `image` to tomq's top-level parser; handlers return an exit status and
let TomqError reach tomq.cli.main, which prints it as one line. It must never pull or push an image.
"""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add `image` (with its `build` action) to the `subparsers` of an argparse parser."""
    from tomq.node.runtime.image import RUNTIME_IMAGE

    parser: argparse.ArgumentParser = subparsers.add_parser(
        "image",
        help="manage the container image the docker runtime runs services in",
        description="The runtime image is a minimal root file system built locally (FROM scratch); "
        "containers run the host's Python and tomq through read-only bind mounts.",
    )
    actions = parser.add_subparsers(dest="image_command", metavar="ACTION", required=True)
    build = actions.add_parser(
        "build",
        help="build the runtime image on the local docker engine (idempotent; needs no registry)",
        description="Build the runtime image from nothing on the docker engine. An image with the same "
        "tomq version and root file system is left as it is unless --force is given.",
    )
    build.add_argument("--docker-host", metavar="URL",
                       help="docker engine to build on (default: $DOCKER_HOST, else unix:///var/run/docker.sock)")
    build.add_argument("--tag", default=RUNTIME_IMAGE, help=f"image name and tag (default: {RUNTIME_IMAGE})")
    build.add_argument("--force", action="store_true", help="build even when an up-to-date image exists")
    build.set_defaults(run=run_build)
    return parser


def run_build(args: argparse.Namespace) -> int:
    from tomq.node.runtime.docker import default_docker_host, host_python_mounts
    from tomq.node.runtime.image import build_image

    result = build_image(args.docker_host, args.tag, force=args.force)
    engine = args.docker_host or default_docker_host()
    if result.built:
        print(f"built {result.tag} ({result.id}) on {engine} in {result.seconds:.1f} s")
    else:
        print(f"{result.tag} ({result.id}) on {engine} is up to date")
    print(f"containers from it run this host's Python with read-only mounts of: {', '.join(host_python_mounts())}")
    return 0
