"""Deterministic keys and a small in-memory cluster for unit tests (never for real identities)."""

from __future__ import annotations

import hashlib

from tomq import certificate
from tomq.certificate import Certificate, TrustStore
from tomq.identity import SigningKey
from tomq.topics import default_publish_rights

NOW = 1_800_000_000  # a fixed "now" so validity windows do not depend on the wall clock
CLUSTER = "test"


def key(label: str) -> SigningKey:
    return SigningKey.from_seed(hashlib.sha256(label.encode()).digest())


OPERATOR = key("operator")


def cert_for(member: SigningKey, name: str, role: str = "sensor", *, not_before: int = NOW - 100,
             not_after: int = NOW + 86400, operator: SigningKey = OPERATOR, cluster: str = CLUSTER) -> Certificate:
    return certificate.issue(operator, cluster=cluster, subject=member.public_key, name=name, role=role,
                             not_before=not_before, not_after=not_after,
                             publish=default_publish_rights(role, name))


def trust_with(*members: tuple[SigningKey, str]) -> TrustStore:
    trust = TrustStore(OPERATOR.public_key, CLUSTER)
    for member, name in members:
        trust.add(cert_for(member, name).encoded)
    return trust
