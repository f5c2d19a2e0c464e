"""A cluster directory on disk: the operator key, every member's key and certificate, cluster.toml.

    DIR/cluster.toml                  cluster name, operator public key, broker address, members
    DIR/operator/operator.key         the operator's private key (0600); keep it offline in production
    DIR/operator/operator.pub         the operator's public key in hex: all an auditor or node needs
    DIR/members/<name>/key            each member's private key (0600)
    DIR/members/<name>/cert.cbor      its membership certificate, signed by the operator
    DIR/broker/passwd                 broker credentials in mosquitto's PBKDF2-SHA512 format

A member's broker password is derived from its own private key, so the broker file holds only
salted hashes and no password is ever written down. `init` never overwrites an existing cluster.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from tomq import certificate as certificates
from tomq.certificate import Certificate, TrustStore
from tomq.errors import ClusterExistsError, ConfigError, InvalidTopic
from tomq.identity import PublicKey, SigningKey
from tomq.topics import ROLES, Topics, check_segment, default_publish_rights

DEFAULT_VALID_DAYS = 365
CLOCK_SKEW_SECONDS = 300  # a certificate is valid a little before it was issued: clocks on edge boxes drift
BROKER_PASSWORD_PURPOSE = b"broker-password"
PBKDF2_ITERATIONS = 101  # mosquitto_passwd's own default for $7$ hashes
DEVICE_ROLES = ("sensor", "actuator")


@dataclass(frozen=True)
class Member:
    name: str
    role: str
    id: str


@dataclass(frozen=True)
class Cluster:
    directory: Path
    name: str
    operator: PublicKey
    broker_host: str
    broker_port: int
    members: tuple[Member, ...]

    @property
    def topics(self) -> Topics:
        return Topics(self.name)

    def member(self, name: str) -> Member:
        for member in self.members:
            if member.name == name or member.id == name:
                return member
        raise ConfigError(f"no member named {name!r} in cluster {self.name} ({self.directory})")

    def member_dir(self, name: str) -> Path:
        return self.directory / "members" / self.member(name).name

    def signing_key(self, name: str) -> SigningKey:
        return SigningKey.load(self.member_dir(name) / "key")

    def certificate(self, name: str) -> Certificate:
        path = self.member_dir(name) / "cert.cbor"
        return certificates.decode(path.read_bytes(), self.operator)

    def trust_store(self) -> TrustStore:
        """Every member's certificate, each verified against the operator key."""
        trust = TrustStore(self.operator, self.name)
        for member in self.members:
            trust.add((self.directory / "members" / member.name / "cert.cbor").read_bytes())
        return trust


def broker_password(key: SigningKey) -> str:
    return base64.urlsafe_b64encode(key.derive_secret(BROKER_PASSWORD_PURPOSE)[:24]).decode("ascii")


def mosquitto_password_hash(password: str, salt: bytes, iterations: int = PBKDF2_ITERATIONS) -> str:
    """The `$7$` line format of mosquitto 2 (PBKDF2-HMAC-SHA512); amqtt's tomq plugin reads it too."""
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def check_mosquitto_password(line_hash: str, password: str) -> bool:
    parts = line_hash.split("$")
    if len(parts) != 5 or parts[1] != "7" or not parts[2].isdigit():
        return False
    try:
        salt = base64.b64decode(parts[3], validate=True)
    except ValueError:
        return False
    return hmac.compare_digest(mosquitto_password_hash(password, salt, int(parts[2])), line_hash)


def init(
    directory: str | os.PathLike[str],
    nodes: list[str],
    *,
    cluster_name: str | None = None,
    broker: str = "127.0.0.1:1883",
    valid_days: int = DEFAULT_VALID_DAYS,
    now: float | None = None,
) -> Cluster:
    """Create a new cluster in `directory`; refuse if one is already there."""
    root = Path(directory)
    if (root / "cluster.toml").exists() or (root / "operator").exists():
        raise ClusterExistsError(f"{root} already holds a cluster; refusing to overwrite its keys")
    if not nodes:
        raise ConfigError("a cluster needs at least one node (--nodes n1,n2,n3)")
    if len(set(nodes)) != len(nodes):
        raise ConfigError(f"node names repeat: {','.join(nodes)}")
    name = cluster_name if cluster_name is not None else _name_from_directory(root)
    host, port = _parse_broker(broker)
    try:
        check_segment(name, "cluster name")
        for node in nodes:
            check_segment(node, "node name")
    except InvalidTopic as exc:
        raise ConfigError(str(exc)) from None
    root.mkdir(parents=True, exist_ok=True)
    operator = SigningKey.generate()
    operator.save(root / "operator" / "operator.key")
    (root / "operator" / "operator.pub").write_text(operator.public_key.hex() + "\n")
    config: dict[str, Any] = {
        "cluster": {"name": name, "operator_id": operator.id, "operator_public_key": operator.public_key.hex()},
        "broker": {"host": host, "port": port},
        "members": [],
    }
    _write_config(root, config)
    for node in nodes:
        _enrol(root, config, operator, node, "node", valid_days, now)
    return load(root)


def add_member(
    directory: str | os.PathLike[str], name: str, role: str, *, valid_days: int = DEFAULT_VALID_DAYS,
    now: float | None = None,
) -> Member:
    """Enrol a new member (device, service, auditor) with a fresh key and certificate."""
    root = Path(directory)
    if role not in ROLES:
        raise ConfigError(f"role {role!r} is not one of {', '.join(ROLES)}")
    config = _read_config(root)
    operator = SigningKey.load(root / "operator" / "operator.key")
    if operator.id != config["cluster"]["operator_id"]:
        raise ConfigError(f"{root}/operator/operator.key is not the key named in cluster.toml")
    try:
        check_segment(name, f"{role} name")
    except InvalidTopic as exc:
        raise ConfigError(str(exc)) from None
    return _enrol(root, config, operator, name, role, valid_days, now)


def load(directory: str | os.PathLike[str]) -> Cluster:
    root = Path(directory)
    config = _read_config(root)
    try:
        members = tuple(Member(m["name"], m["role"], m["id"]) for m in config.get("members", []))
        return Cluster(
            directory=root,
            name=config["cluster"]["name"],
            operator=PublicKey.from_hex(config["cluster"]["operator_public_key"]),
            broker_host=config["broker"]["host"],
            broker_port=int(config["broker"]["port"]),
            members=members,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{root}/cluster.toml is incomplete or damaged: {exc!r}") from None


def _enrol(root: Path, config: dict[str, Any], operator: SigningKey, name: str, role: str, valid_days: int,
           now: float | None) -> Member:
    if any(m["name"] == name for m in config["members"]):
        raise ConfigError(f"a member named {name!r} already exists in {root}")
    if valid_days <= 0:
        raise ConfigError("certificate validity must be at least one day")
    issued = int(time.time() if now is None else now)
    key = SigningKey.generate()
    member_dir = root / "members" / name
    key.save(member_dir / "key")
    cert = certificates.issue(
        operator,
        cluster=config["cluster"]["name"],
        subject=key.public_key,
        name=name,
        role=role,
        not_before=issued - CLOCK_SKEW_SECONDS,
        not_after=issued + valid_days * 86400,
        publish=default_publish_rights(role, name),
    )
    (member_dir / "cert.cbor").write_bytes(cert.encoded)
    _append_password(root, name, broker_password(key))
    config["members"].append({"name": name, "role": role, "id": key.id})
    _write_config(root, config)
    return Member(name, role, key.id)


def _append_password(root: Path, username: str, password: str) -> None:
    path = root / "broker" / "passwd"
    path.parent.mkdir(parents=True, exist_ok=True)
    line = f"{username}:{mosquitto_password_hash(password, os.urandom(12))}\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, line.encode("ascii"))
    finally:
        os.close(fd)


def _read_config(root: Path) -> dict[str, Any]:
    path = root / "cluster.toml"
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{root} is not a cluster directory (no cluster.toml); run: tomq init {root} --nodes n1,n2,n3") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None


def _write_config(root: Path, config: dict[str, Any]) -> None:
    path = root / "cluster.toml"
    temp = path.with_suffix(".toml.tmp")
    with open(temp, "wb") as handle:
        handle.write(b"# Written by tomq. Members are added with `tomq device add`; edit broker settings freely.\n")
        tomli_w.dump(config, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)


def _name_from_directory(root: Path) -> str:
    candidate = "".join(ch if ch.isalnum() or ch in "._-" else "-" for ch in root.resolve().name).strip("-._")
    return candidate[:64] or "cluster"


def _parse_broker(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"broker address {text!r} must be HOST:PORT")
    return host, int(port)
