import pytest

from keys import CLUSTER, NOW, OPERATOR, cert_for, key
from tomq import canonical, certificate
from tomq.certificate import TrustStore
from tomq.errors import InvalidCertificate


def test_issue_and_decode_round_trip():
    member = key("s1")
    cert = cert_for(member, "s1")
    again = certificate.decode(cert.encoded, OPERATOR.public_key)
    assert again == cert
    assert again.subject_id == member.id
    assert again.role == "sensor" and again.name == "s1" and again.cluster == CLUSTER
    assert again.is_valid_at(NOW) and not again.is_valid_at(NOW + 86400) and not again.is_valid_at(NOW - 101)
    assert again.may_publish("dev/s1/data") and not again.may_publish("dev/s2/data")


def test_certificate_from_another_operator_is_refused():
    cert = cert_for(key("s1"), "s1", operator=key("rogue operator"))
    with pytest.raises(InvalidCertificate, match="does not verify"):
        certificate.decode(cert.encoded, OPERATOR.public_key)


def test_every_single_bit_flip_is_refused():
    cert = cert_for(key("s1"), "s1")
    for index in range(len(cert.encoded)):
        for bit in range(8):
            damaged = bytearray(cert.encoded)
            damaged[index] ^= 1 << bit
            with pytest.raises(InvalidCertificate):
                certificate.decode(bytes(damaged), OPERATOR.public_key)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"role": "king"}, "role"),
        ({"not_before": NOW, "not_after": NOW}, "empty"),
        ({"name": "a/b"}, "topic segment"),
        ({"name": "s+"}, "topic segment"),
        ({"cluster": "#"}, "topic segment"),
    ],
)
def test_out_of_bounds_fields_are_refused_at_issue(change, message):
    kwargs = dict(cluster=CLUSTER, subject=key("x").public_key, name="x", role="sensor", not_before=NOW,
                  not_after=NOW + 10, publish=())
    kwargs.update(change)
    with pytest.raises(InvalidCertificate, match=message):
        certificate.issue(OPERATOR, **kwargs)


def test_validly_signed_but_malformed_body_is_refused():
    # The operator signed something that is not a certificate: the signature alone must not be enough.
    signed = canonical.encode({"v": 1, "name": "x"})
    from tomq.identity import signing_input

    signature = OPERATOR.sign(signing_input(b"tomq/certificate/v1\x00", signed))
    with pytest.raises(InvalidCertificate, match="fields"):
        certificate.decode(canonical.encode([signed, signature]), OPERATOR.public_key)


def test_trust_store_checks_cluster_and_name_takeover():
    trust = TrustStore(OPERATOR.public_key, CLUSTER)
    first = trust.add(cert_for(key("s1"), "s1", not_before=NOW - 100).encoded)
    assert trust.by_id(first.subject_id) is first and trust.by_name("s1") is first
    with pytest.raises(InvalidCertificate, match="cluster"):
        trust.add(cert_for(key("s9"), "s9", cluster="other").encoded)
    # A second key for the same name must be issued later (a re-key), never alongside.
    with pytest.raises(InvalidCertificate, match="already certified"):
        trust.add(cert_for(key("impostor"), "s1", not_before=NOW - 100).encoded)
    rekeyed = trust.add(cert_for(key("s1 new"), "s1", not_before=NOW).encoded)
    assert trust.by_name("s1") is rekeyed
    assert trust.by_id(first.subject_id) is None
    assert len(trust) == 1
