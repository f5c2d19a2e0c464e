import pytest
from hypothesis import given
from hypothesis import strategies as st

from tomq import canonical
from tomq.canonical import CanonicalDecodeError

plain = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=20) | st.binary(max_size=20)
    | st.floats(allow_nan=False),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@given(plain)
def test_round_trip_is_exact(value):
    data = canonical.encode(value)
    assert canonical.decode(data) == value
    assert canonical.encode(canonical.decode(data)) == data


@given(st.binary(max_size=200))
def test_arbitrary_bytes_raise_only_the_documented_error(data):
    try:
        canonical.decode(data)
    except CanonicalDecodeError as exc:
        assert "\n" not in str(exc)


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"\x01\x02", "trailing"),
        (b"\xc1\x1a\x00\x00\x00\x01", "tag"),  # epoch datetime: a tag, not plain data
        (b"\x18\x01", "canonical"),  # 1 in two bytes
        (b"\xa2\x61b\x01\x61a\x02", "canonical"),  # map keys out of order
        (b"\x9f\x01\xff", "canonical"),  # indefinite-length array
        (b"\xa1\x01\x02", "text keys"),
        (b"\x5b\xff\xff\xff\xff\xff\xff\xff\xff", "malformed"),  # claims 2^64 bytes
        (b"\x81" * 40 + b"\x01", "nests deeper"),
        (b"\x9f" * 100000, "malformed"),
        (b"", "malformed"),
        (b"\xf7", "not allowed"),  # undefined
    ],
)
def test_refusals_name_the_reason(data, reason):
    with pytest.raises(CanonicalDecodeError, match=reason):
        canonical.decode(data)


def test_non_bytes_input_is_refused():
    with pytest.raises(CanonicalDecodeError):
        canonical.decode("text")  # type: ignore[arg-type]
