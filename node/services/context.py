"""The instance directory a node hands a service program, read and checked: `ServiceContext`.

A node starts a service instance with TOMQ_INSTANCE_DIR naming a read-only directory (the contract
the node side writes, node/orchestrator/service.py):

    service.json   {"cluster", "broker": {"host", "port"}, "service", "replica", "node", "height",
                    "program", "spec" (ServiceSpec.to_map()), "identity", "ledger_height"}
    key            the service identity's Ed25519 key (PKCS#8 PEM, 0400/0600)
    cert.cbor      its membership certificate
    operator.pub   the operator's public key, hex
    devices.cbor   canonical CBOR {device name: certificate bytes}: devices joined at ledger_height

and TOMQ_CLUSTER, TOMQ_SERVICE, TOMQ_REPLICA, TOMQ_NODE, TOMQ_HEIGHT beside it.

`ServiceContext.load` checks the directory (the certificate is the operator's, names the identity,
certifies the key) and builds a TrustStore of the operator key and the joined devices; a
devices.cbor entry that does not verify, or does not certify the device it is listed under, is
skipped with one log line. `inputs` and `setting` read the spec's inputs and its numeric env
settings, each checked; anything missing or inconsistent is a `ServiceConfigError`.

What this module must never do: trust a certificate the operator key did not sign, or reach the
broker or the ledger (it reads the directory and the environment, nothing else).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tomq import canonical
from tomq import certificate as certificates
from tomq.certificate import Certificate, TrustStore
from tomq.errors import ConfigError, InvalidCertificate, TomqError
from tomq.identity import PublicKey, SigningKey
from tomq.node.services.readings import DEVICE_ROLES
from tomq.topics import Topics, check_segment

log = logging.getLogger("tomq.service")

ENV_INSTANCE_DIR = "TOMQ_INSTANCE_DIR"


class ServiceConfigError(ConfigError):
    """The instance directory or environment is missing something or inconsistent."""



@dataclass(frozen=True)
class ServiceContext:
    directory: Path
    cluster: str
    broker_host: str
    broker_port: int
    service: str
    replica: int
    node: str
    height: int  # ledger height of the placement decision that started this instance
    program: str | None
    spec: Mapping[str, Any]
    identity: str  # the member name this instance connects and signs as
    key: SigningKey
    certificate: Certificate
    operator: PublicKey
    trust: TrustStore  # the operator's key and every joined device's certificate
    devices: Mapping[str, Certificate]  # joined devices according to the ledger at ledger_height
    ledger_height: int

    @property
    def topics(self) -> Topics:
        return Topics(self.cluster)

    @property
    def client_id(self) -> str:
        # The same for every instance of this replica, wherever it runs: the broker session (and what
        # it has not delivered or had acknowledged) passes from one instance to the next.
        return f"tomq-{self.cluster}-{self.service}-{self.replica}"

    @property
    def label(self) -> str:
        return f"{self.service}/{self.replica}@{self.node}:{self.height}"

    def inputs(self, kind: str) -> list[str]:
        """spec.inputs.devices | services | topics, as a list of text."""
        inputs = self.spec.get("inputs") if isinstance(self.spec, Mapping) else None
        values = inputs.get(kind, []) if isinstance(inputs, Mapping) else []
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise ServiceConfigError(f"service.json: spec.inputs.{kind} must be a list of text")
        return list(values)

    def text_setting(self, name: str) -> str | None:
        """A text value from spec.env, or None when it is not set (or empty)."""
        env = self.spec.get("env") if isinstance(self.spec, Mapping) else None
        raw = env.get(name) if isinstance(env, Mapping) else None
        return raw if isinstance(raw, str) and raw else None

    def setting(self, name: str, default: float, *, minimum: float, maximum: float) -> float:
        """A number from spec.env (e.g. WINDOW = "20"), within [minimum, maximum]."""
        env = self.spec.get("env") if isinstance(self.spec, Mapping) else None
        raw = env.get(name) if isinstance(env, Mapping) else None
        if raw is None:
            return default
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise ServiceConfigError(f"spec.env.{name} must be a number, got {raw!r}") from None
        if not (math.isfinite(value) and minimum <= value <= maximum):
            raise ServiceConfigError(f"spec.env.{name} must be from {minimum:g} to {maximum:g}, got {raw!r}")
        return value

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> ServiceContext:
        environ = os.environ if environ is None else environ
        directory = environ.get(ENV_INSTANCE_DIR)
        if not directory:
            raise ServiceConfigError(f"{ENV_INSTANCE_DIR} is not set; a node starts service programs with it")
        context = cls.load(directory)
        # The node sets these from the same placement; a mismatch means a stale or foreign directory.
        expected = {"TOMQ_CLUSTER": context.cluster, "TOMQ_SERVICE": context.service,
                    "TOMQ_REPLICA": str(context.replica), "TOMQ_NODE": context.node,
                    "TOMQ_HEIGHT": str(context.height)}
        for name, value in expected.items():
            given = environ.get(name)
            if given is not None and given != value:
                raise ServiceConfigError(f"{name}={given} but {directory}/service.json says {value}")
        return context

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> ServiceContext:
        root = Path(directory)

        def read(name: str) -> bytes:
            try:
                return (root / name).read_bytes()
            except OSError as exc:
                raise ServiceConfigError(f"cannot read {root / name}: {exc.strerror}") from None

        try:
            description = json.loads(read("service.json"))
        except ValueError as exc:
            raise ServiceConfigError(f"{root}/service.json is not JSON: {exc}") from None
        if not isinstance(description, dict):
            raise ServiceConfigError(f"{root}/service.json must hold a JSON object")

        def field_of(name: str, kind: type | tuple[type, ...]) -> Any:
            value = description.get(name)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ServiceConfigError(f"{root}/service.json: {name} is missing or not a {kind}")
            return value

        broker = field_of("broker", dict)
        host, port = broker.get("host"), broker.get("port")
        if not isinstance(host, str) or not isinstance(port, int) or not 0 < port < 65536:
            raise ServiceConfigError(f"{root}/service.json: broker must be {{host: text, port: 1-65535}}")
        cluster = field_of("cluster", str)
        service = field_of("service", str)
        identity = field_of("identity", str)
        node = field_of("node", str)
        try:
            for value, what in ((cluster, "cluster"), (service, "service"), (identity, "identity"), (node, "node")):
                check_segment(value, what)
        except TomqError as exc:
            raise ServiceConfigError(f"{root}/service.json: {exc}") from None
        program = description.get("program")
        if program is not None and not isinstance(program, str):
            raise ServiceConfigError(f"{root}/service.json: program must be text or null")
        spec = field_of("spec", dict)
        try:
            operator = PublicKey.from_hex(read("operator.pub").decode("ascii", "replace").strip())
        except ValueError as exc:
            raise ServiceConfigError(f"{root}/operator.pub: {exc}") from None
        key = SigningKey.load(root / "key")
        try:
            certificate = certificates.decode(read("cert.cbor"), operator)
        except InvalidCertificate as exc:
            raise ServiceConfigError(f"{root}/cert.cbor: {exc}") from None
        if certificate.name != identity or certificate.subject != key.public_key or certificate.cluster != cluster:
            raise ServiceConfigError(f"{root}/cert.cbor certifies {certificate.name} in {certificate.cluster} for "
                                     f"another key; this instance is {identity} in {cluster}")
        if certificate.role != "service":
            raise ServiceConfigError(f"{root}/cert.cbor certifies a {certificate.role}, not a service")
        trust = TrustStore(operator, cluster)
        devices: dict[str, Certificate] = {}
        try:
            listed = canonical.decode(read("devices.cbor"))
        except canonical.CanonicalDecodeError as exc:
            raise ServiceConfigError(f"{root}/devices.cbor is not canonical CBOR: {exc}") from None
        if not isinstance(listed, dict):
            raise ServiceConfigError(f"{root}/devices.cbor must be a map of device name to certificate")
        for name, encoded in sorted(listed.items()):
            try:
                device = trust.add(encoded)
            except InvalidCertificate as exc:
                log.warning("devices.cbor: ignoring the certificate of %s: %s", name, exc)
                continue
            if device.name != name or device.role not in DEVICE_ROLES:
                log.warning("devices.cbor: entry %s holds the certificate of %s (%s); ignored", name, device.name,
                            device.role)
                continue
            devices[name] = device
        return cls(directory=root, cluster=cluster, broker_host=host, broker_port=port, service=service,
                   replica=field_of("replica", int), node=node, height=field_of("height", int), program=program,
                   spec=spec, identity=identity, key=key, certificate=certificate, operator=operator,
                   trust=trust, devices=devices, ledger_height=field_of("ledger_height", int))
