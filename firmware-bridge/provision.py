"""Operator-side set-up for serial devices: enrol a bridge that may attest, write a board's config.

`enrol_bridge` makes (or re-certifies) a sensor-role member whose certificate also lists
`dev/<device>/data` for every device it may attest for. That list is the operator's signed
delegation, carried to the ledger in the bridge's join; the broker never lets a sensor-role member
publish outside its own topics whatever its certificate says (broker/policy.py intersects the
certificate with the role's row), so it widens no broker right. Delegate before the bridge first
joins: the collector trusts the certificate the ledger recorded at the join.

`firmware_config` is the JSON a board is flashed with (firmware/README.md): its name, mode and, for
a device-signed board, its Ed25519 seed and certificate. That file holds the device's private key:
write it only onto the board and delete it afterwards.

What this module must never do: widen a role's broker rights, or change a certificate's key, name,
role or validity when it adds delegations.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tomq import certificate as certificates
from tomq import cluster as clusters
from tomq.certificate import Certificate
from tomq.durable import replace_file
from tomq.errors import ConfigError, InvalidTopic
from tomq.identity import SigningKey
from tomq.topics import check_segment


def enrol_bridge(directory: str | os.PathLike[str], name: str, devices: list[str]) -> Certificate:
    """Enrol `name` as a bridge (a sensor-role member) allowed to attest for `devices`; return its certificate."""
    try:
        for device in devices:
            check_segment(device, "device name")
    except InvalidTopic as exc:
        raise ConfigError(str(exc)) from None
    if name in devices:
        raise ConfigError(f"bridge {name} cannot attest for itself")
    loaded = clusters.load(directory)
    if not any(m.name == name for m in loaded.members):
        clusters.add_member(directory, name, "sensor")
        loaded = clusters.load(directory)
    member = loaded.member(name)
    if member.role != "sensor":
        raise ConfigError(f"{name} is a {member.role}; a bridge is a sensor-role member")
    current = loaded.certificate(name)
    operator = SigningKey.load(loaded.directory / "operator" / "operator.key")
    if operator.id != loaded.operator.id:
        raise ConfigError(f"{loaded.directory}/operator/operator.key is not the key named in cluster.toml")
    rights = list(current.publish)
    for device in devices:
        if f"dev/{device}/data" not in rights:
            rights.append(f"dev/{device}/data")
    renewed = certificates.issue(operator, cluster=current.cluster, subject=current.subject, name=current.name,
                                 role=current.role, not_before=current.not_before, not_after=current.not_after,
                                 publish=tuple(rights))
    replace_file(loaded.member_dir(name) / "cert.cbor", renewed.encoded)
    return renewed


def firmware_config(directory: str | os.PathLike[str], device: str, *, attested: bool = False) -> dict[str, Any]:
    """The config a board runs with (firmware/main.py reads it as tomqfw.json)."""
    loaded = clusters.load(directory)
    if attested:
        check_segment(device, "device name")
        return {"device": device, "mode": "attested", "cluster": loaded.name}
    member = loaded.member(device)
    if member.role not in clusters.DEVICE_ROLES:
        raise ConfigError(f"{device} is a {member.role}, not a device")
    seed = _seed(loaded.member_dir(device) / "key")
    certificate = loaded.certificate(device)
    return {"device": member.name, "mode": "signed", "cluster": loaded.name, "seed": seed.hex(),
            "certificate": certificate.encoded.hex()}


def write_firmware_config(directory: str | os.PathLike[str], device: str, out: str | os.PathLike[str], *,
                          attested: bool = False) -> Path:
    config = firmware_config(directory, device, attested=attested)
    path = Path(out)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it may hold a private key
    with os.fdopen(fd, "w") as handle:
        json.dump(config, handle, indent=1)
        handle.write("\n")
    return path


def _seed(path: Path) -> bytes:
    SigningKey.load(path)  # refuses a key file others can read
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path} is not an Ed25519 key")
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())
