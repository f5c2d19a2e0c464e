"""Block format: header hash, Merkle root, signatures with their domains, and the block file codec."""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keys import key
from tomq import canonical
from tomq.node.ledger import block as blocks
from tomq.node.ledger.block import (
    GENESIS_PREV,
    BlockFile,
    MalformedBlock,
    block_file_name,
    block_hash,
    commit_signature,
    decode_block_file,
    encode_block_file,
    height_of_file_name,
    make_block,
    merkle_root,
    sign_block,
    verify_block_signature,
    verify_commit_signature,
)

PROPOSER = key("n1")
OTHER = key("n2")
RECORDS = (b"record one", b"record two", b"record three")


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def sample_block(records: tuple[bytes, ...] = RECORDS, height: int = 5):
    return make_block(height=height, prev=sha(b"block 4"), term=3, time_ms=1_800_000_000_000,
                      proposer=PROPOSER.id, records=records)


def sample_file(records: tuple[bytes, ...] = RECORDS) -> BlockFile:
    block = sample_block(records)
    certificate = {PROPOSER.id: commit_signature(PROPOSER, block.hash), OTHER.id: commit_signature(OTHER, block.hash)}
    return BlockFile(block, sign_block(PROPOSER, block), certificate)


# --- Merkle root ---------------------------------------------------------------------------------

def test_merkle_root_by_hand():
    a, b, c = (sha(b"\x00" + leaf) for leaf in RECORDS)
    assert merkle_root([]) == sha(b"")
    assert merkle_root([b"record one"]) == a
    assert merkle_root(RECORDS[:2]) == sha(b"\x01" + a + b)
    # three leaves: the odd third is promoted unchanged to the next level
    assert merkle_root(RECORDS) == sha(b"\x01" + sha(b"\x01" + a + b) + c)


def rfc6962_root(leaves: list[bytes]) -> bytes:
    """RFC 6962 §2.1 Merkle Tree Hash, written recursively: split at the largest power of two below n."""
    if not leaves:
        return sha(b"")
    if len(leaves) == 1:
        return sha(b"\x00" + leaves[0])
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return sha(b"\x01" + rfc6962_root(leaves[:k]) + rfc6962_root(leaves[k:]))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=8), max_size=40))
def test_merkle_root_equals_rfc6962(leaves):
    assert merkle_root(leaves) == rfc6962_root(leaves)


def test_merkle_root_depends_on_order_and_count():
    assert merkle_root(RECORDS) != merkle_root(RECORDS[::-1])
    assert merkle_root(RECORDS) != merkle_root((*RECORDS, RECORDS[-1]))


# --- Header and hash -------------------------------------------------------------------------------

def test_block_hash_is_sha256_of_the_canonical_header():
    block = sample_block()
    header = {"v": 1, "height": 5, "prev": sha(b"block 4"), "term": 3, "t": 1_800_000_000_000,
              "proposer": PROPOSER.id, "records_root": merkle_root(RECORDS), "record_count": 3}
    assert block_hash(block) == block.hash == sha(canonical.encode(header))


@pytest.mark.parametrize("change", [
    {"height": 6}, {"prev": sha(b"other")}, {"term": 4}, {"time_ms": 1}, {"proposer": OTHER.id},
    {"records": (b"record one", b"record two")},
])
def test_every_header_field_and_the_records_change_the_hash(change):
    arguments = {"height": 5, "prev": sha(b"block 4"), "term": 3, "time_ms": 1_800_000_000_000,
                 "proposer": PROPOSER.id, "records": RECORDS, **change}
    assert make_block(**arguments).hash != sample_block().hash


def test_signatures_are_outside_the_hash():
    one = sample_file()
    two = BlockFile(one.block, sign_block(OTHER, one.block), {})
    assert decode_block_file(encode_block_file(one)).block.hash == decode_block_file(encode_block_file(two)).block.hash


@pytest.mark.parametrize("arguments, message", [
    ({"prev": b"short"}, "prev"),
    ({"height": -1}, "height"),
    ({"height": 10**12}, "exceeds"),
    ({"proposer": ""}, "proposer"),
    ({"records": (b"",)}, "record 0"),
])
def test_make_block_refuses_bad_arguments(arguments, message):
    defaults = {"height": 1, "prev": GENESIS_PREV, "term": 1, "time_ms": 0, "proposer": PROPOSER.id, "records": RECORDS}
    with pytest.raises(ValueError, match=message):
        make_block(**{**defaults, **arguments})


# --- Signatures ------------------------------------------------------------------------------------

def test_proposer_and_commit_signatures_verify_only_in_their_own_domain():
    block = sample_block()
    proposer_signature = sign_block(PROPOSER, block)
    commit = commit_signature(PROPOSER, block.hash)
    assert verify_block_signature(PROPOSER.public_key, block.hash, proposer_signature)
    assert verify_commit_signature(PROPOSER.public_key, block.hash, commit)
    # A proposer signature is not a commit vote, and neither is a signature on some other block.
    assert not verify_commit_signature(PROPOSER.public_key, block.hash, proposer_signature)
    assert not verify_block_signature(PROPOSER.public_key, block.hash, commit)
    assert not verify_block_signature(OTHER.public_key, block.hash, proposer_signature)
    assert not verify_commit_signature(PROPOSER.public_key, sha(b"x"), commit)


# --- Block file ------------------------------------------------------------------------------------

def test_block_file_round_trips():
    original = sample_file()
    data = encode_block_file(original)
    decoded = decode_block_file(data)
    assert decoded == original
    assert encode_block_file(decoded) == data
    assert set(canonical.decode(data)) == {"header", "records", "proposer_sig", "certificate"}


def test_empty_block_round_trips():
    original = sample_file(records=())
    decoded = decode_block_file(encode_block_file(original))
    assert decoded.block.records == () and decoded.block.records_root == sha(b"")


def _file_map() -> dict:
    return canonical.decode(encode_block_file(sample_file()))


def _with(path: tuple[str, ...], value: object) -> bytes:
    raw = _file_map()
    target = raw
    for part in path[:-1]:
        target = target[part]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return canonical.encode(raw)


_DELETE = object()


@pytest.mark.parametrize("data, message", [
    (b"", "malformed CBOR"),
    (b"\xff\x00", "malformed CBOR"),
    (canonical.encode([1, 2]), "exactly"),
    (b"\xa1\x61a\x01\x00", "trailing"),
    (_with(("header", "v"), "1"), "v must be an integer"),
    (_with(("header", "height"), -1), "height must be an integer"),
    (_with(("header", "height"), True), "height must be an integer"),
    (_with(("header", "height"), 2**64 - 1), "height must be an integer"),
    (_with(("header", "term"), 1.5), "term must be an integer"),
    (_with(("header", "prev"), b"\x00" * 31), "prev must be a 32-byte"),
    (_with(("header", "records_root"), "root"), "records_root must be a 32-byte"),
    (_with(("header", "proposer"), b"n1"), "proposer must be an identity id"),
    (_with(("header", "proposer"), "x" * 65), "proposer must be an identity id"),
    (_with(("header", "extra"), 1), "header must be a map of exactly"),
    (_with(("header", "t"), _DELETE), "header must be a map of exactly"),
    (_with(("records",), {"a": b"x"}), "records must be a list"),
    (_with(("records",), ["text"]), "record 0"),
    (_with(("records",), [b""]), "record 0"),
    (_with(("records",), [b"x" * (64 * 1024 + 1)]), "record 0"),
    (_with(("proposer_sig",), b"\x00" * 63), "proposer signature"),
    (_with(("certificate",), [b"\x00" * 64]), "commit certificate"),
    (_with(("certificate",), {"n1": b"\x00" * 10}), "commit certificate"),
    (_with(("certificate",), {"": b"\x00" * 64}), "commit certificate"),
    (_with(("certificate",), {f"s{i}": b"\x00" * 64 for i in range(1025)}), "at most 1024"),
    (_with(("signatures",), {}), "exactly"),
])
def test_malformed_block_files_are_refused_in_one_line(data, message):
    with pytest.raises(MalformedBlock) as caught:
        decode_block_file(data)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_non_canonical_encoding_is_refused():
    import cbor2

    raw = _file_map()
    raw["header"] = dict(reversed(raw["header"].items()))
    loose = cbor2.dumps(dict(reversed(raw.items())), canonical=False)  # keys out of order: same value, other bytes
    assert loose != encode_block_file(sample_file())
    with pytest.raises(MalformedBlock, match="canonical"):
        decode_block_file(loose)


def test_oversized_input_is_refused_before_decoding(monkeypatch):
    monkeypatch.setattr(blocks, "MAX_BLOCK_FILE_BYTES", 100)
    with pytest.raises(MalformedBlock, match="exceeds 100"):
        decode_block_file(encode_block_file(sample_file()))


def test_non_bytes_input_is_refused():
    with pytest.raises(MalformedBlock, match="must be bytes"):
        decode_block_file("text")  # type: ignore[arg-type]


VALID = encode_block_file(sample_file())


@settings(max_examples=400, deadline=None)
@given(st.one_of(
    st.binary(max_size=300),
    st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)).map(
        lambda change: VALID[:change[0]] + bytes([change[1]]) + VALID[change[0] + 1:]),
    st.integers(0, len(VALID)).map(lambda cut: VALID[:cut]),
))
def test_decoding_raises_only_malformed_block_whatever_the_bytes(data):
    try:
        decoded = decode_block_file(data)
    except MalformedBlock as exc:
        assert "\n" not in str(exc)
    else:
        assert encode_block_file(decoded) == data  # anything accepted is canonical and complete


# --- File names ------------------------------------------------------------------------------------

def test_file_names_have_twelve_digits():
    assert block_file_name(0) == "000000000000.block"
    assert block_file_name(42) == "000000000042.block"
    assert height_of_file_name("000000000042.block") == 42
    for name in ("42.block", "0000000000042.block", "000000000042.block.tmp", ".000000000042.block.1.tmp",
                 "00000000004x.block", "000000000042.blocks"):
        assert height_of_file_name(name) is None
    with pytest.raises(ValueError):
        block_file_name(10**12)


def test_the_block_module_does_no_io():
    tree = ast.parse(Path(blocks.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert not imported & {"os", "io", "time", "random", "pathlib", "socket", "subprocess", "shutil"}
