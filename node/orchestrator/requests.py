"""Operator requests on `orch/request`: deploy a service, remove one. Sealed by the operator key.

    deploy  {"op": "deploy", "spec": <ServiceSpec.to_map()>, "certificate": <the service's certificate>}
    remove  {"op": "remove", "service": <name>}
    move    {"op": "move", "service": <name>, "replica": <index>, "to": <node name, or "" for any other>}

The operator key is the root of trust, so a request needs no certificate of its own: nodes check the
signature against the operator public key they already hold, and a per-operator sequence watermark
refuses replays. The request's exact bytes go into the ledger record they cause (the service's
PROV-ID-create or -delete), so an auditor can check that the operator asked for what was done.

What this module must never do: touch the network. `tomq deploy` publishes what `seal_*` returns.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any

from tomq import certificate as certificates
from tomq.errors import EnvelopeRejected, InvalidCertificate, MalformedEnvelope, TomqError
from tomq.identity import PublicKey, SigningKey
from tomq.node.orchestrator.spec import ServiceSpec, spec_from_map
from tomq.wire import SequenceCounter, SequenceWatermarks, open_signed_by, seal

REQUEST_TYPE = "orch-request"


class InvalidRequest(EnvelopeRejected):
    """A correctly signed operator request whose content cannot be carried out."""


@dataclass(frozen=True, slots=True)
class OrchRequest:
    op: str  # "deploy" | "remove" | "move"
    service: str
    spec: ServiceSpec | None  # deploy only
    certificate: bytes  # deploy only: the service identity's membership certificate
    wire: bytes  # the signed envelope, recorded in the ledger
    time_ms: int  # when the operator sealed it (operator's clock)
    seq: int
    replica: int = 0  # move only
    to: str = ""  # move only: the node to move to; "" lets placement choose among the others

    @property
    def digest(self) -> bytes:
        return hashlib.sha256(self.wire).digest()


def seal_deploy(operator: SigningKey, counter: SequenceCounter, spec: ServiceSpec, certificate: bytes) -> bytes:
    body = {"op": "deploy", "spec": spec.to_map(), "certificate": certificate}
    return seal(operator, seq=counter.next(), time_ms=int(time.time() * 1000), type=REQUEST_TYPE, body=body)


def seal_remove(operator: SigningKey, counter: SequenceCounter, service: str) -> bytes:
    body = {"op": "remove", "service": service}
    return seal(operator, seq=counter.next(), time_ms=int(time.time() * 1000), type=REQUEST_TYPE, body=body)


def seal_move(operator: SigningKey, counter: SequenceCounter, service: str, replica: int, to: str = "") -> bytes:
    body = {"op": "move", "service": service, "replica": replica, "to": to}
    return seal(operator, seq=counter.next(), time_ms=int(time.time() * 1000), type=REQUEST_TYPE, body=body)


def open_request(data: bytes, operator: PublicKey, cluster: str, watermarks: SequenceWatermarks) -> OrchRequest:
    """Check signature, freshness and content; raises an EnvelopeRejected subclass naming the problem."""
    envelope = open_signed_by(data, operator, name="the operator", accepted_types=frozenset({REQUEST_TYPE}),
                              watermarks=watermarks)
    body = envelope.body
    if not isinstance(body, dict) or body.get("op") not in ("deploy", "remove", "move"):
        raise MalformedEnvelope("request body must be a map with op deploy, remove or move", envelope.sender)
    if body["op"] == "move":
        _only(body, {"op", "service", "replica", "to"}, envelope.sender)
        service, replica, to = body["service"], body["replica"], body["to"]
        if not isinstance(service, str) or not service or type(replica) is not int or replica < 0 \
                or not isinstance(to, str):
            raise InvalidRequest("move request needs a service, a replica index and a node name (or \"\")",
                                 envelope.sender)
        return OrchRequest("move", service, None, b"", envelope.wire, envelope.time_ms, envelope.seq, replica, to)
    if body["op"] == "remove":
        _only(body, {"op", "service"}, envelope.sender)
        service = body["service"]
        if not isinstance(service, str) or not service:
            raise InvalidRequest("remove request names no service", envelope.sender)
        return OrchRequest("remove", service, None, b"", envelope.wire, envelope.time_ms, envelope.seq)
    _only(body, {"op", "spec", "certificate"}, envelope.sender)
    try:
        spec = spec_from_map(body["spec"], source="deploy request")
    except TomqError as exc:
        raise InvalidRequest(str(exc), envelope.sender) from None
    cert_bytes = body["certificate"]
    try:
        cert = certificates.decode(cert_bytes, operator) if isinstance(cert_bytes, bytes) else None
    except InvalidCertificate as exc:
        raise InvalidRequest(f"deploy {spec.name}: {exc}", envelope.sender) from None
    if cert is None or cert.name != spec.name or cert.role != "service" or cert.cluster != cluster:
        raise InvalidRequest(f"deploy {spec.name}: the request must carry the service certificate of {spec.name} "
                             f"in cluster {cluster}", envelope.sender)
    return OrchRequest("deploy", spec.name, spec, cert_bytes, envelope.wire, envelope.time_ms, envelope.seq)


def _only(body: dict[str, Any], keys: set[str], sender: str) -> None:
    if set(body) != keys:
        raise MalformedEnvelope(f"request fields must be exactly {sorted(keys)}, not {sorted(body)}", sender)
