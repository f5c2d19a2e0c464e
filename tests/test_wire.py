import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keys import NOW, OPERATOR, cert_for, key, trust_with
from tomq import canonical
from tomq.certificate import TrustStore
from tomq.errors import (
    BadSignature,
    BodyTooLarge,
    CertificateExpired,
    ConfigError,
    EnvelopeRejected,
    MalformedEnvelope,
    ReplayedEnvelope,
    UnknownEnvelopeType,
    UnknownSender,
    UnsupportedVersion,
)
from tomq.identity import signing_input
from tomq.wire import (
    ENVELOPE_TYPES,
    ClockSequence,
    EnvelopeOpener,
    FileWatermarks,
    SequenceCounter,
    seal,
    seal_shared,
)

SENSOR = key("s1")
OTHER = key("s2")

bodies = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.text(max_size=30) | st.binary(max_size=40)
    | st.floats(allow_nan=False),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=15,
)


def opener(**kwargs) -> EnvelopeOpener:
    return EnvelopeOpener(trust_with((SENSOR, "s1"), (OTHER, "s2")), **kwargs)


def reading(seq=1, body=None, signer=SENSOR, type="reading") -> bytes:
    return seal(signer, seq=seq, time_ms=NOW * 1000, type=type, body={"value": 21.5} if body is None else body)


@given(body=bodies, seq=st.integers(1, 2**63 - 1), type=st.sampled_from(sorted(ENVELOPE_TYPES)),
       time_ms=st.integers(0, 2**63))
def test_every_envelope_round_trips(body, seq, type, time_ms):
    data = seal(SENSOR, seq=seq, time_ms=time_ms, type=type, body=body)
    envelope = opener().open(data, NOW)
    assert (envelope.sender, envelope.seq, envelope.time_ms, envelope.type, envelope.body) == (
        SENSOR.id, seq, time_ms, type, body)
    assert envelope.wire == data


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(body=bodies, data=st.data())
def test_flipping_any_single_bit_is_rejected(body, data):
    wire = reading(body=body)
    index = data.draw(st.integers(0, len(wire) - 1))
    bit = data.draw(st.integers(0, 7))
    damaged = bytearray(wire)
    damaged[index] ^= 1 << bit
    with pytest.raises(EnvelopeRejected):
        opener().open(bytes(damaged), NOW)


def test_flipping_every_bit_of_one_envelope_is_rejected():
    wire = reading(body={"value": 3, "unit": "C", "hash": bytes(32)})
    fresh = opener()
    for index in range(len(wire)):
        for bit in range(8):
            damaged = bytearray(wire)
            damaged[index] ^= 1 << bit
            with pytest.raises(EnvelopeRejected):
                fresh.open(bytes(damaged), NOW)
    assert fresh.open(wire, NOW).seq == 1  # nothing above advanced the watermark


@settings(max_examples=500)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_documented_errors(data):
    try:
        opener().open(data, NOW)
    except EnvelopeRejected as exc:
        assert "\n" not in str(exc)


@settings(max_examples=300)
@given(st.data())
def test_structured_garbage_raises_only_documented_errors(data):
    # Well-formed CBOR of the right outer shape reaches the deeper checks that random bytes rarely do.
    fields = data.draw(st.dictionaries(st.sampled_from(["v", "from", "seq", "t", "type", "body", "x"]), bodies))
    signed = canonical.encode(fields)
    signature = data.draw(st.binary(min_size=0, max_size=70))
    try:
        opener().open(canonical.encode([signed, signature]), NOW)
    except EnvelopeRejected as exc:
        assert "\n" not in str(exc)


def _forge(fields: dict, signer=SENSOR) -> bytes:
    signed = canonical.encode(fields)
    return canonical.encode([signed, signer.sign(signing_input(b"tomq/envelope/v1\x00", signed))])


def _fields(**change):
    fields = {"v": 1, "from": SENSOR.id, "seq": 1, "t": NOW * 1000, "type": "reading", "body": 1}
    fields.update(change)
    return fields


@pytest.mark.parametrize(
    "data, error, message",
    [
        (b"\xff\x00", MalformedEnvelope, "array"),
        (b"\x82\x41a\x41b\x00", MalformedEnvelope, "trailing"),
        (b"\x82\x58\x01a\x40", MalformedEnvelope, "canonical"),
        (b"\x82\x45ab", MalformedEnvelope, "ends early"),
        (canonical.encode({"a": 1}), MalformedEnvelope, "array"),
        (_forge(_fields(v=2)), UnsupportedVersion, "version 2"),
        (_forge(_fields(type="teleport")), UnknownEnvelopeType, "teleport"),
        (_forge(_fields(seq=0)), MalformedEnvelope, "sequence"),
        (_forge(_fields(t=-1)), MalformedEnvelope, "negative"),
        (_forge({**_fields(), "extra": 1}), MalformedEnvelope, "exactly the fields"),
        (_forge(_fields(**{"from": key("stranger").id}), signer=key("stranger")), UnknownSender,
         "no membership certificate"),
        (canonical.encode([canonical.encode(_fields()), b""]), BadSignature, "no valid signature"),
        (_forge(_fields(), signer=OTHER), BadSignature, "does not verify"),
        (b"\x00" * 70_000, BodyTooLarge, "exceeds the limit"),
    ],
)
def test_each_refusal_has_its_own_type_and_one_line_message(data, error, message):
    with pytest.raises(error, match=message) as caught:
        opener().open(data, NOW)
    assert "\n" not in str(caught.value)


def test_signature_from_another_domain_does_not_verify():
    # A certificate-domain signature over the same bytes must not pass as an envelope signature.
    signed = canonical.encode(_fields())
    wrong_domain = SENSOR.sign(signing_input(b"tomq/certificate/v1\x00", signed))
    with pytest.raises(BadSignature):
        opener().open(canonical.encode([signed, wrong_domain]), NOW)


def test_expired_and_not_yet_valid_certificates():
    trust = TrustStore(OPERATOR.public_key, "test")
    trust.add(cert_for(SENSOR, "s1", not_before=NOW - 100, not_after=NOW + 100).encoded)
    checker = EnvelopeOpener(trust)
    with pytest.raises(CertificateExpired, match="valid only in") as caught:
        checker.open(reading(seq=1), NOW + 100)
    assert caught.value.sender == SENSOR.id
    with pytest.raises(CertificateExpired):
        checker.open(reading(seq=1), NOW - 101)
    assert checker.open(reading(seq=1), NOW + 99).seq == 1


def test_replayed_and_out_of_order_sequences_are_refused():
    checker = opener()
    assert checker.open(reading(seq=5), NOW).seq == 5
    with pytest.raises(ReplayedEnvelope, match="high-water mark 5"):
        checker.open(reading(seq=5), NOW)
    with pytest.raises(ReplayedEnvelope):
        checker.open(reading(seq=3), NOW)
    assert checker.open(reading(seq=6), NOW).seq == 6
    # Marks are per sender: another sender's low numbers are fine.
    assert checker.open(reading(seq=1, signer=OTHER), NOW).seq == 1


def test_rejected_envelopes_do_not_advance_the_watermark():
    checker = opener()
    forged = _forge(_fields(seq=100), signer=OTHER)
    with pytest.raises(BadSignature):
        checker.open(forged, NOW)
    assert checker.open(reading(seq=2), NOW).seq == 2


def test_high_water_mark_survives_a_restart(tmp_path):
    path = tmp_path / "marks"
    first = opener(watermarks=FileWatermarks(path))
    for seq in (1, 2, 7):
        first.open(reading(seq=seq), NOW)
    first.watermarks.close()  # type: ignore[attr-defined]
    # A crash can tear the last line: it must be ignored, not break the file.
    with open(path, "ab") as handle:
        handle.write(SENSOR.id.encode() + b" 9")
    restarted = opener(watermarks=FileWatermarks(path))
    with pytest.raises(ReplayedEnvelope, match="high-water mark 7"):
        restarted.open(reading(seq=7), NOW)
    assert restarted.open(reading(seq=8), NOW).seq == 8
    restarted.watermarks.close()  # type: ignore[attr-defined]
    assert FileWatermarks(path).get(SENSOR.id) == 8  # the torn line did not swallow the next one


def test_watermark_file_compacts_without_losing_marks(tmp_path):
    path = tmp_path / "marks"
    marks = FileWatermarks(path, compact_after=50)
    checker = opener(watermarks=marks)
    for seq in range(1, 201):
        checker.open(reading(seq=seq), NOW)
    marks.flush()
    assert len(path.read_bytes().splitlines()) < 60
    assert FileWatermarks(path).get(SENSOR.id) == 200


def test_sequence_counter_never_repeats_across_restarts(tmp_path):
    path = tmp_path / "seq"
    first = SequenceCounter(path, block=10)
    used = [first.next() for _ in range(15)]
    assert used == list(range(1, 16))
    # A crash loses the unused rest of the reserved block, never hands out a number twice.
    second = SequenceCounter(path, block=10)
    assert second.next() > max(used)
    # Processes that each take one number (the operator's `tomq deploy`, one run after another):
    # every one of them must reserve before using, or the next would hand out the same number.
    singles = [SequenceCounter(path, block=10).next() for _ in range(3)]
    assert singles == sorted(set(singles)) and singles[0] > max(used)
    path.write_text("garbage")
    with pytest.raises(ConfigError, match="damaged"):
        SequenceCounter(path)


def test_clock_sequences_rise_within_a_process_and_start_above_an_earlier_one():
    clock = iter([1000, 1000, 999, 5000])
    first = ClockSequence(lambda: next(clock))
    assert [first.next(), first.next(), first.next()] == [1000, 1001, 1002]  # a stalled or stepped-back clock
    later = ClockSequence()  # a process started later: the real clock is far above these
    assert later.next() > first.last


def test_replicas_sealing_in_the_same_microsecond_never_share_a_sequence_number():
    # Two replicas of one service, their clocks stalled on the same microsecond, then stepping back.
    ticks = [7_000, 7_000, 7_000, 6_999]
    replicas = [ClockSequence(lambda: ticks[0], lane=lane, lanes=4) for lane in (0, 3)]
    issued = {lane: [] for lane in (0, 3)}
    for tick in ticks:
        ticks[0] = tick
        for replica in replicas:
            issued[replica.lane].append(replica.next())
    assert issued[0] == [28_000, 28_004, 28_008, 28_012] and issued[3] == [28_003, 28_007, 28_011, 28_015]
    assert not set(issued[0]) & set(issued[3])
    assert all(b > a for a, b in zip(issued[0], issued[0][1:], strict=False))
    slow_start = ClockSequence(lambda: 0, lane=2, lanes=4)  # even a clock at zero stays in its lane
    assert [slow_start.next(), slow_start.next()] == [2, 6]
    with pytest.raises(ValueError, match=r"lane 4 is not in 0\.\.3"):
        ClockSequence(lane=4, lanes=4)


def test_size_limit_is_configurable():
    big = reading(body=b"x" * 2000)
    with pytest.raises(BodyTooLarge):
        opener(max_bytes=1000).open(big, NOW)
    assert opener(max_bytes=4000).open(big, NOW).body == b"x" * 2000


def test_receiver_can_narrow_accepted_types():
    with pytest.raises(UnknownEnvelopeType):
        opener(accepted_types=frozenset({"raft"})).open(reading(), NOW)


def test_seal_refuses_bad_arguments():
    with pytest.raises(ValueError):
        seal(SENSOR, seq=0, time_ms=0, type="reading", body=None)
    with pytest.raises(ValueError):
        seal(SENSOR, seq=1, time_ms=0, type="nope", body=None)


def test_reopening_bytes_already_opened_still_runs_every_check_that_depends_on_the_opener_or_time():
    # The ledger leader opens a proposal on arrival and again when its block is applied; the second
    # time reuses the decoding and signature, nothing else.
    data = reading(seq=5)
    first = opener().open(data, NOW)
    later = opener()
    assert later.open(data, NOW, opened=first) is first
    with pytest.raises(ReplayedEnvelope):
        later.open(data, NOW, opened=first)
    with pytest.raises(CertificateExpired):
        opener().open(data, NOW + 10 * 365 * 86400, opened=first)
    with pytest.raises(BodyTooLarge):
        opener(max_bytes=len(data) - 1).open(data, NOW, opened=first)
    with pytest.raises(UnknownEnvelopeType):
        opener(accepted_types=frozenset({"record"})).open(data, NOW, opened=first)
    with pytest.raises(UnknownSender):
        EnvelopeOpener(trust_with((OTHER, "s2"))).open(data, NOW, opened=first)


def test_an_opened_envelope_of_other_bytes_is_no_shortcut():
    good = reading(seq=6)
    forged = bytearray(reading(seq=7))
    forged[-1] ^= 1  # a signature that does not verify
    with pytest.raises(BadSignature):
        opener().open(bytes(forged), NOW, opened=opener().open(good, NOW))


def test_an_envelope_between_two_nodes_carries_a_mac_any_bit_flip_of_which_is_refused():
    shared = SENSOR.shared_key(OTHER.public_key, b"test")
    data = seal_shared(shared, SENSOR.id, seq=3, time_ms=NOW * 1000, type="raft", body={"m": [b"x"]})
    envelope = opener().open_shared(data, NOW, lambda certificate: shared if certificate.name == "s1" else None)
    assert (envelope.sender, envelope.seq, envelope.body) == (SENSOR.id, 3, {"m": [b"x"]})
    for index in range(len(data)):
        damaged = bytearray(data)
        damaged[index] ^= 0x10
        with pytest.raises(EnvelopeRejected):
            opener().open_shared(bytes(damaged), NOW, lambda certificate: shared)
    with pytest.raises(BadSignature, match="shares no key"):
        opener().open_shared(data, NOW, lambda certificate: None)
    with pytest.raises(BadSignature, match="does not verify"):
        opener().open_shared(data, NOW, lambda certificate: OTHER.shared_key(SENSOR.public_key, b"other"))
    with pytest.raises(BadSignature, match="no 32-byte MAC"):  # a signed envelope is not a MAC'd one
        opener().open_shared(reading(), NOW, lambda certificate: shared)
    stranger = key("s9")
    with pytest.raises(UnknownSender):
        opener().open_shared(seal_shared(shared, stranger.id, seq=1, time_ms=0, type="raft", body={}), NOW,
                             lambda certificate: shared)
