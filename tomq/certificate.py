"""Membership certificates: the operator's signed statement that a key belongs to a named member.

A certificate binds a subject public key to a name, a role, a validity window and the topics it may
publish to, within one cluster. Nodes check everyone against the operator's public key and nothing
else. Decoding never trusts a field before the operator's signature over all of them has verified.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from tomq import canonical
from tomq.errors import InvalidCertificate, InvalidTopic
from tomq.identity import SIGNATURE_BYTES, PublicKey, SigningKey, signing_input
from tomq.topics import ROLES, check_segment, filter_matches

CERTIFICATE_VERSION = 1
_DOMAIN = b"tomq/certificate/v1\x00"
MAX_CERTIFICATE_BYTES = 8192
_FIELDS = frozenset({"v", "cluster", "subject", "name", "role", "nb", "na", "publish", "issuer"})


@dataclass(frozen=True, slots=True)
class Certificate:
    cluster: str
    subject: PublicKey
    name: str
    role: str
    not_before: int  # unix seconds, inclusive
    not_after: int  # unix seconds, exclusive
    publish: tuple[str, ...]  # topic filters below tomq/<cluster>/
    issuer: str  # the operator's identity id
    encoded: bytes  # the exact bytes the operator signed, wrapped with the signature

    @property
    def subject_id(self) -> str:
        return self.subject.id

    def is_valid_at(self, now: float) -> bool:
        return self.not_before <= now < self.not_after

    def may_publish(self, topic_below_root: str) -> bool:
        return any(filter_matches(pattern, topic_below_root) for pattern in self.publish)


def issue(
    operator: SigningKey,
    *,
    cluster: str,
    subject: PublicKey,
    name: str,
    role: str,
    not_before: int,
    not_after: int,
    publish: tuple[str, ...],
) -> Certificate:
    """Sign a certificate for `subject`. Raises InvalidCertificate if any field is out of bounds."""
    fields = {
        "v": CERTIFICATE_VERSION,
        "cluster": cluster,
        "subject": subject.raw,
        "name": name,
        "role": role,
        "nb": not_before,
        "na": not_after,
        "publish": list(publish),
        "issuer": operator.id,
    }
    _check_fields(fields)
    signed = canonical.encode(fields)
    signature = operator.sign(signing_input(_DOMAIN, signed))
    return decode(canonical.encode([signed, signature]), operator.public_key)


def decode(data: bytes, operator: PublicKey) -> Certificate:
    """Verify and decode a certificate issued by `operator`; any defect raises InvalidCertificate."""
    if not isinstance(data, bytes) or len(data) > MAX_CERTIFICATE_BYTES:
        raise InvalidCertificate(f"certificate must be bytes of at most {MAX_CERTIFICATE_BYTES}")
    try:
        outer = canonical.decode(data)
    except canonical.CanonicalDecodeError as exc:
        raise InvalidCertificate(f"certificate is not canonical CBOR: {exc}") from None
    if not (isinstance(outer, list) and len(outer) == 2 and all(isinstance(x, bytes) for x in outer)):
        raise InvalidCertificate("certificate must be a CBOR array [signed bytes, signature]")
    signed, signature = outer
    if len(signature) != SIGNATURE_BYTES or not operator.verify(signature, signing_input(_DOMAIN, signed)):
        raise InvalidCertificate(f"certificate signature does not verify under operator {operator.id}")
    try:
        fields = canonical.decode(signed)
    except canonical.CanonicalDecodeError as exc:
        raise InvalidCertificate(f"certificate body is not canonical CBOR: {exc}") from None
    _check_fields(fields)
    if fields["issuer"] != operator.id:
        raise InvalidCertificate(f"certificate names issuer {fields['issuer']}, not operator {operator.id}")
    return Certificate(
        cluster=fields["cluster"],
        subject=PublicKey(fields["subject"]),
        name=fields["name"],
        role=fields["role"],
        not_before=fields["nb"],
        not_after=fields["na"],
        publish=tuple(fields["publish"]),
        issuer=fields["issuer"],
        encoded=data,
    )


def _check_fields(fields: object) -> None:
    if not isinstance(fields, dict) or set(fields) != _FIELDS:
        raise InvalidCertificate(f"certificate fields must be exactly {sorted(_FIELDS)}")
    if type(fields["v"]) is not int or fields["v"] != CERTIFICATE_VERSION:  # not True or 1.0 (fuzzing)
        raise InvalidCertificate(f"certificate version {fields['v']!r} is not {CERTIFICATE_VERSION}")
    if not isinstance(fields["subject"], bytes) or len(fields["subject"]) != 32:
        raise InvalidCertificate("certificate subject must be a 32-byte Ed25519 public key")
    if fields["role"] not in ROLES:
        raise InvalidCertificate(f"certificate role {fields['role']!r} is not one of {', '.join(ROLES)}")
    for key in ("nb", "na"):
        if not isinstance(fields[key], int) or isinstance(fields[key], bool) or fields[key] < 0:
            raise InvalidCertificate(f"certificate validity bound {key} must be a non-negative integer")
    if fields["nb"] >= fields["na"]:
        raise InvalidCertificate("certificate validity window is empty (not_before >= not_after)")
    publish = fields["publish"]
    if not isinstance(publish, list) or not all(isinstance(p, str) and 0 < len(p) <= 256 for p in publish):
        raise InvalidCertificate("certificate publish rights must be a list of topic filters")
    try:
        check_segment(fields["cluster"], "cluster name")
        check_segment(fields["name"], "certificate name")
    except InvalidTopic as exc:
        raise InvalidCertificate(str(exc)) from None
    if not isinstance(fields["issuer"], str) or not fields["issuer"].isprintable():  # quoted in refusals
        raise InvalidCertificate("certificate issuer must be an identity id")


class TrustStore:
    """Every certificate a receiver knows, checked against the operator key as it is added."""

    def __init__(self, operator: PublicKey, cluster: str) -> None:
        self.operator = operator
        self.cluster = cluster
        self._by_id: dict[str, Certificate] = {}
        self._by_name: dict[str, Certificate] = {}

    def add(self, data: bytes) -> Certificate:
        certificate = decode(data, self.operator)
        if certificate.cluster != self.cluster:
            raise InvalidCertificate(
                f"certificate for {certificate.name} belongs to cluster {certificate.cluster!r}, not {self.cluster!r}"
            )
        current = self._by_name.get(certificate.name)
        if current is not None and current.subject != certificate.subject:
            if current.not_before >= certificate.not_before:
                raise InvalidCertificate(
                    f"name {certificate.name} is already certified for key {current.subject_id}; "
                    "a replacement must be issued later than the certificate it replaces"
                )
            self._by_id.pop(current.subject_id, None)
        self._by_id[certificate.subject_id] = certificate
        self._by_name[certificate.name] = certificate
        return certificate

    def by_id(self, identity: str) -> Certificate | None:
        return self._by_id.get(identity)

    def by_name(self, name: str) -> Certificate | None:
        return self._by_name.get(name)

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[Certificate]:
        return iter(list(self._by_id.values()))
