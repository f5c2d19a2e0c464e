"""Ed25519 keys, identity ids and private key files.

An identity id is a short, stable fingerprint of a public key, safe to use in topics and file names.
Private keys never leave their file except to sign; a key file that others can read is refused,
because a leaked device or node key lets anyone speak as that device or node.

Signing and verifying go through libsodium (PyNaCl): on this project's machines it verifies about
twice as fast as OpenSSL (18,400 against 9,600 verifications per second, one core; bench/wire.py),
and every node verifies every record. Ed25519 signatures are deterministic, so both libraries sign
the same bytes, and each verifies the other's (tests/test_identity.py). libsodium's verify is the
stricter one: it refuses small-order public keys (with which OpenSSL lets one forged signature pass
for every message) and signatures whose R is a small-order point (which any key holder can make and
OpenSSL takes). So every node of a cluster must verify with the same library: upgrade them together,
and verify an older chain (`tomq ledger verify`) before a node built on it starts with this one.
Key files stay PKCS#8 PEM, read and written with OpenSSL.
"""

from __future__ import annotations

import base64
import hashlib
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nacl.bindings import (
    crypto_scalarmult,
    crypto_sign,
    crypto_sign_ed25519_pk_to_curve25519,
    crypto_sign_ed25519_sk_to_curve25519,
    crypto_sign_open,
    crypto_sign_seed_keypair,
)
from nacl.exceptions import BadSignatureError, CryptoError

from tomq.errors import ConfigError, KeyFilePermissionError

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
_ID_DOMAIN = b"tomq/id/v1\x00"
ID_LENGTH = 16  # base32 characters = 80 bits: collisions need ~2^40 keys in one cluster


def identity_id(public_key: bytes) -> str:
    """The id of the holder of `public_key`: lowercase base32 of a domain-separated SHA-256."""
    if len(public_key) != PUBLIC_KEY_BYTES:
        raise ValueError(f"an Ed25519 public key has {PUBLIC_KEY_BYTES} bytes, not {len(public_key)}")
    digest = hashlib.sha256(_ID_DOMAIN + public_key).digest()
    return base64.b32encode(digest).decode("ascii").lower()[:ID_LENGTH]


def signing_input(domain: bytes, payload: bytes) -> bytes:
    """Prefix every signed payload with its kind so a signature on one kind never verifies as another."""
    return domain + payload


@dataclass(frozen=True, slots=True)
class PublicKey:
    raw: bytes
    id: str = field(init=False, repr=False, compare=False)  # computed once: it is on every hot path

    def __post_init__(self) -> None:
        if len(self.raw) != PUBLIC_KEY_BYTES:
            raise ValueError(f"an Ed25519 public key has {PUBLIC_KEY_BYTES} bytes, not {len(self.raw)}")
        object.__setattr__(self, "id", identity_id(self.raw))

    def verify(self, signature: bytes, message: bytes) -> bool:
        if len(signature) != SIGNATURE_BYTES:
            return False
        try:
            crypto_sign_open(bytes(signature) + bytes(message), self.raw)
        except (BadSignatureError, TypeError, ValueError):  # whatever the input, a refusal is False
            return False
        return True

    def hex(self) -> str:
        return self.raw.hex()

    @classmethod
    def from_hex(cls, text: str) -> PublicKey:
        try:
            return cls(bytes.fromhex(text))
        except ValueError as exc:
            raise ConfigError(f"not an Ed25519 public key in hex: {text[:20]}… ({exc})") from None


class SigningKey:
    """An Ed25519 private key. Construct with `generate()` or `load()`."""

    __slots__ = ("_key", "_secret", "public_key")

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key  # OpenSSL's object: for the PEM file and derived secrets
        seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                 serialization.NoEncryption())
        public, self._secret = crypto_sign_seed_keypair(seed)  # libsodium's form: for signing
        self.public_key = PublicKey(public)

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> SigningKey:
        """Deterministic key from 32 bytes: for tests and simulators only, never for real identities."""
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    @property
    def id(self) -> str:
        return self.public_key.id

    def sign(self, message: bytes) -> bytes:
        return crypto_sign(message, self._secret)[:SIGNATURE_BYTES]  # libsodium returns signature + message

    def shared_key(self, peer: PublicKey, purpose: bytes) -> bytes:
        """A 32-byte key that only this key's holder and `peer`'s can compute, one per `purpose`.

        X25519 between the two Ed25519 keys' Montgomery forms (libsodium converts them), hashed with
        both public keys and the purpose. Either side gets the same key. ValueError for a peer key
        that is not a valid point or is of small order (the exchange would give a known secret)."""
        try:
            shared = crypto_scalarmult(crypto_sign_ed25519_sk_to_curve25519(self._secret),
                                       crypto_sign_ed25519_pk_to_curve25519(peer.raw))
        except (CryptoError, ValueError, TypeError) as exc:
            raise ValueError(f"no key can be shared with {peer.id}: {exc}") from None
        low, high = sorted((self.public_key.raw, peer.raw))
        return hashlib.blake2b(b"tomq/shared/v1\x00" + purpose + b"\x00" + low + high, key=shared,
                               digest_size=32).digest()

    def derive_secret(self, purpose: bytes) -> bytes:
        """A secret only the key holder can compute, e.g. its broker password; one-way from the key."""
        seed = self._key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        return hashlib.sha256(b"tomq/derived/v1\x00" + purpose + b"\x00" + seed).digest()

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the key as PKCS#8 PEM, mode 0600, refusing to overwrite an existing file."""
        pem = self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        path = Path(path)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            # O_EXCL with mode 0600 at creation: the key is never readable by others, not even briefly.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise ConfigError(f"refusing to overwrite existing key file {path}") from None
        try:
            os.write(fd, pem)
            os.fsync(fd)
        finally:
            os.close(fd)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SigningKey:
        path = Path(path)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise ConfigError(f"cannot open key file {path}: {exc.strerror}") from None
        try:
            mode = os.fstat(fd).st_mode
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise KeyFilePermissionError(
                    f"key file {path} is accessible by group or others (mode {stat.S_IMODE(mode):04o}); "
                    f"run: chmod 600 {path}"
                )
            with os.fdopen(os.dup(fd), "rb") as handle:
                pem = handle.read()
        finally:
            os.close(fd)
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"key file {path} is not a PEM private key: {exc}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"key file {path} holds a {type(key).__name__}, not an Ed25519 key")
        return cls(key)
