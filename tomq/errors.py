"""The one family of errors tomq raises, split by whose fault they are.

Every message is one line an operator can act on. Adapters (MQTT, Docker, serial, disk) translate
library exceptions into these at the boundary, so callers never catch paho, docker or cbor2 errors.
"""

from __future__ import annotations


class TomqError(Exception):
    """Base of everything tomq raises on purpose."""


class UsageError(TomqError):
    """We (the local caller or operator) asked for something that cannot be done."""


class ConfigError(UsageError):
    """A cluster directory, key file or setting is missing, unsafe or inconsistent."""


class KeyFilePermissionError(ConfigError):
    """A private key file can be read by someone other than its owner."""


class ClusterExistsError(ConfigError):
    """`tomq init` was pointed at a directory that already holds a cluster."""


class InvalidTopic(TomqError):
    """A topic or topic segment does not follow DESIGN.md §3."""


class InvalidRecord(TomqError):
    """A ledger record is not well-formed (wrong fields, types or pairing of state and structure)."""


class InvalidCertificate(TomqError):
    """A membership certificate is malformed, not issued by this cluster's operator, or forged."""


class PeerError(TomqError):
    """Someone else sent us something we refuse; the remote is at fault, not us."""


class EnvelopeRejected(PeerError):
    """Base of every reason a signed envelope is refused. `sender` is set when it could be read."""

    sender: str | None = None

    def __init__(self, message: str, sender: str | None = None) -> None:
        super().__init__(message)
        self.sender = sender


class MalformedEnvelope(EnvelopeRejected):
    """The bytes are not a well-formed, canonical tomq envelope in CBOR."""


class UnsupportedVersion(EnvelopeRejected):
    """The envelope declares a format version this node does not speak."""


class UnknownEnvelopeType(EnvelopeRejected):
    """The envelope's type is not one this receiver accepts."""


class BadSignature(EnvelopeRejected):
    """The signature is missing or does not verify under the sender's certified key."""


class UnknownSender(EnvelopeRejected):
    """No valid membership certificate is known for the sender."""


class CertificateExpired(EnvelopeRejected):
    """The sender's certificate is outside its validity window at the time of receipt."""


class ReplayedEnvelope(EnvelopeRejected):
    """The sequence number is not above the sender's high-water mark: a replay or reordering."""


class BodyTooLarge(EnvelopeRejected):
    """The envelope exceeds the receiver's configured size limit."""
