"""Raft messages on the wire: every message type survives encode/decode, and bytes from the network
can do nothing worse than raise `MalformedRaftMessage` with a one-line reason."""

from __future__ import annotations

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tomq import canonical
from tomq.node.raft.messages import _KEYS, MalformedRaftMessage, Message, MessageType, decode, encode
from tomq.node.raft.types import Entry, EntryKind, Snapshot, SnapshotMeta

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

U63 = st.integers(min_value=0, max_value=2**63)
SMALL = st.integers(min_value=0, max_value=1000)
NODE_ID = st.text(min_size=1, max_size=12)
BLOB = st.binary(max_size=64)


@st.composite
def entries(draw) -> tuple[Entry, ...]:
    """Consecutive indices and non-decreasing terms, as a leader sends them."""
    count = draw(st.integers(min_value=0, max_value=6))
    index = draw(st.one_of(SMALL, st.integers(min_value=0, max_value=2**63 - 6)))
    term = draw(SMALL)
    out = []
    for k in range(count):
        term += draw(st.integers(min_value=0, max_value=2))
        out.append(Entry(term, index + k, draw(st.sampled_from(EntryKind)), draw(BLOB)))
    return tuple(out)


SNAPSHOTS = st.builds(
    lambda index, term, voters, decided, data: Snapshot(SnapshotMeta(index, term, voters, decided), data),
    U63, U63, st.lists(NODE_ID, max_size=5).map(tuple), st.lists(BLOB, max_size=5).map(tuple), BLOB,
)
LOADS = st.one_of(st.none(), st.floats(allow_nan=False), st.floats(min_value=0, max_value=1))


ANY_TYPE = st.sampled_from(MessageType)


@st.composite
def messages(draw, kind=ANY_TYPE) -> Message:
    return Message(
        type=draw(kind), to=draw(NODE_ID), from_=draw(NODE_ID), term=draw(st.one_of(SMALL, U63)),
        log_term=draw(U63), index=draw(U63), entries=draw(entries()), commit=draw(U63),
        reject=draw(st.booleans()), hint_index=draw(U63), hint_term=draw(U63),
        snapshot=draw(st.one_of(st.none(), SNAPSHOTS)), context=draw(BLOB), read_seq=draw(U63),
        load=draw(LOADS), force=draw(st.booleans()), data=draw(BLOB),
    )


def assert_refused(data: bytes) -> MalformedRaftMessage:
    """decode must refuse with MalformedRaftMessage and nothing else, and say why on one line."""
    try:
        message = decode(data)
    except MalformedRaftMessage as exc:
        text = str(exc)
        assert text and "\n" not in text and len(text) < 300, repr(text)
        return exc
    except Exception as exc:  # the property under test: nothing else may escape
        raise AssertionError(f"decode raised {type(exc).__name__}: {exc!r} for {data!r}") from exc
    raise AssertionError(f"decode accepted {data!r} as {message!r}")


def decode_or_refuse(data: bytes) -> None:
    """Hostile bytes may decode (they may happen to be a message) or be refused; nothing else."""
    try:
        decode(data)
    except MalformedRaftMessage as exc:
        assert str(exc) and "\n" not in str(exc) and len(str(exc)) < 300, repr(str(exc))
    except Exception as exc:
        raise AssertionError(f"decode raised {type(exc).__name__}: {exc!r} for {data!r}") from exc


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("kind", list(MessageType), ids=lambda k: k.name)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_every_message_type_round_trips(kind, data):
    message = data.draw(messages(st.just(kind)))
    wire = encode(message)
    assert decode(wire) == message
    assert encode(decode(wire)) == wire  # one message, one byte string
    assert canonical.decode(wire) is not None  # the encoder's output is canonical CBOR


@SETTINGS
@given(messages())
def test_defaults_are_left_off_the_wire(message):
    raw = canonical.decode(encode(message))
    assert raw.keys() <= set(_KEYS)
    for key, default in (("log_term", 0), ("index", 0), ("commit", 0), ("reject", False), ("hint_index", 0),
                         ("hint_term", 0), ("context", b""), ("read_seq", 0), ("load", None), ("force", False),
                         ("data", b"")):
        field = "from_" if key == "from" else key
        assert (key in raw) == (getattr(message, field) != default), key
    assert ("entries" in raw) == bool(message.entries)
    assert ("snapshot" in raw) == (message.snapshot is not None)


def test_a_minimal_message_is_small():
    wire = encode(Message(MessageType.HEARTBEAT, "n2", "n1", 3))
    assert decode(wire) == Message(MessageType.HEARTBEAT, "n2", "n1", 3)
    assert len(wire) < 40


# --------------------------------------------------------------------------- hostile bytes


@SETTINGS
@given(st.binary(max_size=200))
def test_arbitrary_bytes_raise_only_malformed(data):
    decode_or_refuse(data)


@SETTINGS
@given(messages(), st.data())
def test_corrupted_messages_raise_only_malformed(message, data):
    wire = bytearray(encode(message))
    for _ in range(data.draw(st.integers(min_value=1, max_value=4))):
        position = data.draw(st.integers(min_value=0, max_value=len(wire) - 1))
        wire[position] = data.draw(st.integers(min_value=0, max_value=255))
    cut = data.draw(st.integers(min_value=0, max_value=len(wire)))
    decode_or_refuse(bytes(wire[:cut]))
    decode_or_refuse(bytes(wire))


# Any value of the CBOR data model tomq accepts, and some it should not like: negatives, NaN and
# bignums (tag 2/3, which cbor2 turns into plain Python ints beyond 64 bits).
def cbor_values(bignums: bool = True):
    limit = 2**80 if bignums else 2**64 - 1
    scalars = st.one_of(
        st.none(), st.booleans(), st.integers(min_value=-limit, max_value=limit),
        st.floats(allow_nan=True), st.text(max_size=8), st.binary(max_size=8),
    )
    return st.recursive(
        scalars,
        lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=6), inner, max_size=4)),
        max_leaves=12,
    )


CBOR_VALUES = cbor_values()
# "load" gets bignums too: decoding must refuse them rather than overflow in float().
# Drop this once that test passes.
LOAD_VALUES = cbor_values(bignums=True)


def plausible(field: str):
    """Values of roughly the right shape for `field`, and wrong ones."""
    if field == "entries":
        entry = st.lists(CBOR_VALUES, min_size=3, max_size=5).map(lambda e: e[:4])
        return st.one_of(CBOR_VALUES, st.lists(entry, max_size=3),
                         st.lists(st.tuples(SMALL, SMALL, SMALL, BLOB).map(list), max_size=4))
    if field == "snapshot":
        return st.one_of(CBOR_VALUES, st.lists(CBOR_VALUES, min_size=4, max_size=6),
                         st.tuples(U63, U63, st.lists(CBOR_VALUES, max_size=3), BLOB,
                                   st.lists(CBOR_VALUES, max_size=3)).map(list))
    if field == "load":
        return LOAD_VALUES
    return CBOR_VALUES


@st.composite
def garbage_maps(draw) -> dict:
    real = draw(messages())
    raw = canonical.decode(encode(real))
    required, optional = _KEYS[:4], _KEYS[4:]  # type, to, from, term; damage those only now and then
    keys = draw(st.lists(st.sampled_from(optional), unique=True, min_size=1, max_size=3))
    if draw(st.integers(min_value=0, max_value=4)) == 0:
        keys.append(draw(st.sampled_from(required)))
    for key in keys:
        if draw(st.booleans()) or key not in raw:
            raw[key] = draw(plausible(key))
        else:
            del raw[key]
    return raw


@SETTINGS
@given(garbage_maps())
def test_real_keys_with_wrong_types_raise_only_malformed(raw):
    decode_or_refuse(cbor2.dumps(raw, canonical=True))
    decode_or_refuse(cbor2.dumps(raw))  # and not canonical: decode does not insist on canonical form


@SETTINGS
@given(st.lists(st.sampled_from(_KEYS), unique=True, max_size=len(_KEYS)), st.data())
def test_maps_of_anything_raise_only_malformed(keys, data):
    raw = {key: data.draw(LOAD_VALUES if key == "load" else CBOR_VALUES, label=key) for key in keys}
    decode_or_refuse(cbor2.dumps(raw))


@pytest.mark.parametrize("value", [True, 1.5, -1, 2**63 + 1, "3", b"3", None, [1]])
def test_wrong_integer_fields_are_refused(value):
    for field in ("type", "term", "log_term", "index", "commit", "hint_index", "hint_term", "read_seq"):
        raw = {"type": 5, "to": "n2", "from": "n1", "term": 1, field: value}
        assert_refused(cbor2.dumps(raw))


def test_a_load_too_large_for_a_float_is_refused():
    # A CBOR bignum decodes to a Python int; float() of it overflows. The result must still be a refusal
    # (tomq.canonical now refuses every bignum before the load field is looked at).
    raw = {"type": 3, "to": "n2", "from": "n1", "term": 1, "load": 2**2000}
    with pytest.raises(MalformedRaftMessage, match=r"load|bignum"):
        decode(cbor2.dumps(raw))


# --------------------------------------------------------------------------- explicit refusals


def base(**extra) -> bytes:
    return canonical.encode({"type": int(MessageType.APPEND), "to": "n2", "from": "n1", "term": 2, **extra})


@pytest.mark.parametrize(
    ("wire", "reason"),
    [
        (base(color="red"), "unknown fields"),
        (base(entries=[[2, 5, 0, b"a"], [2, 7, 0, b"b"]]), "consecutive"),  # an index skipped
        (base(entries=[[2, 5, 0, b"a"], [2, 5, 0, b"b"]]), "consecutive"),  # an index repeated
        (base(entries=[[3, 5, 0, b"a"], [2, 6, 0, b"b"]]), "non-decreasing terms"),
        (base(entries=[[2, 5, 0]]), "entry must be"),
        (base(entries=[[2, 5, 0, "text"]]), "entry must be"),
        (base(entries=[[2, 5, 99, b""]]), "bad field"),  # no such entry kind
        (base(entries=[[-1, 5, 0, b""]]), "non-negative"),
        (canonical.encode({"type": 5, "to": "n2", "from": "n1", "term": -1}), "term must be a non-negative"),
        (canonical.encode({"type": 99, "to": "n2", "from": "n1", "term": 1}), "bad field"),
        (canonical.encode({"type": 5, "to": "", "from": "n1", "term": 1}), "node id"),
        (canonical.encode({"type": 5, "from": "n1", "term": 1}), "bad field"),  # no recipient
        (base(snapshot=[1, 1, ["n1"], b""]), "snapshot must be"),  # the old four-element shape
        (base(snapshot={"index": 1}), "snapshot must be"),
        (base(snapshot=[1, 1, "n1", b"", []]), "snapshot must be"),
        (base(snapshot=[1, 1, ["n1", 2], b"", []]), "voters must be"),
        (base(snapshot=[1, 1, ["n1"], b"", ["not bytes"]]), "decided ids bytes"),
        (base(snapshot=[-1, 1, ["n1"], b"", []]), "snapshot index"),
        (base(load="high"), "load must be a number"),
        (base(load=True), "load must be a number"),
        (base(reject=1), "reject must be a boolean"),
        (base(context="ctx"), "context must be bytes"),
        (canonical.encode([5, "n2", "n1", 2]), "must be a CBOR map"),
        (base()[:-1], "raft message"),  # truncated
        (base() + b"\x00", "trailing"),
        (b"", "raft message"),
    ],
)
def test_explicit_refusals(wire, reason):
    exc = assert_refused(wire)
    assert reason in str(exc)
