import os
import stat

import pytest

from keys import key
from tomq.errors import ConfigError, KeyFilePermissionError
from tomq.identity import ID_LENGTH, PublicKey, SigningKey, identity_id


def test_id_is_a_stable_short_fingerprint():
    signer = key("a")
    assert signer.id == identity_id(signer.public_key.raw)
    assert len(signer.id) == ID_LENGTH
    assert signer.id.isalnum() and signer.id == signer.id.lower()
    # Stable across processes and versions: pinned for one fixed key. Changing the derivation
    # would orphan every certificate and topic in the field.
    assert SigningKey.from_seed(bytes(32)).id == identity_id(SigningKey.from_seed(bytes(32)).public_key.raw)
    assert SigningKey.from_seed(bytes(32)).id == "vm5htixohfi3dyqy"


def test_distinct_keys_have_distinct_ids():
    ids = {key(str(i)).id for i in range(500)}
    assert len(ids) == 500


def test_sign_and_verify():
    signer = key("a")
    signature = signer.sign(b"hello")
    assert signer.public_key.verify(signature, b"hello")
    assert not signer.public_key.verify(signature, b"hellp")
    assert not key("b").public_key.verify(signature, b"hello")
    assert not signer.public_key.verify(signature[:-1], b"hello")
    assert signer.public_key.verify(bytearray(signature), memoryview(b"hello"))  # any bytes-like input
    assert not signer.public_key.verify("x" * 64, b"hello")  # type: ignore[arg-type]  # refused, not raised


def test_key_file_round_trip_is_0600(tmp_path):
    signer = SigningKey.generate()
    path = tmp_path / "sub" / "key"
    signer.save(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert SigningKey.load(path).id == signer.id


def test_existing_key_file_is_never_overwritten(tmp_path):
    path = tmp_path / "key"
    first = SigningKey.generate()
    first.save(path)
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        SigningKey.generate().save(path)
    assert SigningKey.load(path).id == first.id


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o601])
def test_key_readable_by_others_is_refused_in_one_line(tmp_path, mode):
    path = tmp_path / "key"
    SigningKey.generate().save(path)
    os.chmod(path, mode)
    with pytest.raises(KeyFilePermissionError) as caught:
        SigningKey.load(path)
    message = str(caught.value)
    assert "\n" not in message
    assert str(path) in message and f"{mode:04o}" in message and "chmod 600" in message


def test_garbage_and_missing_key_files_are_config_errors(tmp_path):
    path = tmp_path / "key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"not a key")
    os.close(fd)
    with pytest.raises(ConfigError, match="not a PEM private key"):
        SigningKey.load(path)
    with pytest.raises(ConfigError, match="cannot open key file"):
        SigningKey.load(tmp_path / "absent")


def test_public_key_length_is_checked():
    with pytest.raises(ValueError):
        PublicKey(b"\x00" * 31)
    with pytest.raises(ConfigError):
        PublicKey.from_hex("zz")


def test_derived_secret_depends_on_key_and_purpose():
    a, b = key("a"), key("b")
    assert a.derive_secret(b"x") == a.derive_secret(b"x")
    assert a.derive_secret(b"x") != a.derive_secret(b"y")
    assert a.derive_secret(b"x") != b.derive_secret(b"x")


def _openssl_verifies(public: bytes, signature: bytes, message: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
    except InvalidSignature:
        return False
    return True


def test_libsodium_signs_the_bytes_openssl_signs_and_both_accept_them():
    # tomq signs and verifies with libsodium; auditors' tools (tests/history_checker.py) use OpenSSL.
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    for i in range(20):
        seed = bytes([i]) * 32
        ours = SigningKey.from_seed(seed)
        theirs = Ed25519PrivateKey.from_private_bytes(seed)
        message = os.urandom(i * 37)
        signature = ours.sign(message)
        assert signature == theirs.sign(message)
        assert _openssl_verifies(ours.public_key.raw, signature, message)
        assert ours.public_key.verify(theirs.sign(message), message)


def test_libsodium_refuses_mangled_signatures_and_what_openssl_wrongly_takes():
    # Every third single-bit change of a signature, and a signature with S + L (the same point, a
    # non-canonical scalar): refused.
    signer = key("strict")
    message = b"the reading"
    signature = signer.sign(message)
    order = 2**252 + 27742317777372353535851937790883648493
    s = int.from_bytes(signature[32:], "little")
    candidates = [signature[:32] + (s + order).to_bytes(32, "little")]
    for bit in range(0, 512, 3):
        mangled = bytearray(signature)
        mangled[bit // 8] ^= 1 << (bit % 8)
        candidates.append(bytes(mangled))
    for candidate in candidates:
        assert not signer.public_key.verify(candidate, message)
    # The identity point as public key, R = identity, S = 0 "signs" every message: OpenSSL takes it,
    # libsodium refuses small-order keys. So switching to libsodium narrowed what verifies.
    identity_point = (1).to_bytes(32, "little")
    forged = identity_point + bytes(32)
    assert _openssl_verifies(identity_point, forged, b"anything")
    assert not PublicKey(identity_point).verify(forged, b"anything")
