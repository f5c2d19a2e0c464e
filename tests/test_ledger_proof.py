"""Merkle inclusion proofs (node/ledger/proof.py) against the tree block.merkle_root builds.

Every leaf count from 1 to 70 and every index: the path leads to merkle_root; a changed leaf, a
changed byte anywhere in the path, another index, a path one step too long or too short does not.
`merkle_root` is also checked against a deliberately naive RFC 6962 Merkle Tree Hash (split at the
largest power of two), the claim its docstring makes and the proofs rely on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tomq.node.ledger.block import merkle_root
from tomq.node.ledger.proof import inclusion_path, leaf_hash, path_length, root_from_path

MAX_LEAVES = 70


def _leaves(count: int, salt: str = "") -> list[bytes]:
    # distinct leaves of varied lengths, so no two positions are interchangeable
    return [f"{salt}record-{i}".encode() * (1 + i % 3) for i in range(count)]


def _rfc6962_root(leaves: Sequence[bytes]) -> bytes:
    """RFC 6962 §2.1 MTH, written from the RFC's definition and nothing else."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return hashlib.sha256(b"\x00" + leaves[0]).digest()
    split = 1
    while split * 2 < len(leaves):
        split *= 2
    return hashlib.sha256(b"\x01" + _rfc6962_root(leaves[:split]) + _rfc6962_root(leaves[split:])).digest()


def test_every_index_of_every_count_up_to_70_proves_against_merkle_root() -> None:
    checked = 0
    for count in range(1, MAX_LEAVES + 1):
        leaves = _leaves(count)
        root = merkle_root(leaves)
        assert root == _rfc6962_root(leaves), f"merkle_root differs from RFC 6962 at {count} leaves"
        for index in range(count):
            path = inclusion_path(leaves, index)
            assert len(path) == path_length(index, count)
            assert root_from_path(leaves[index], index, count, path) == root, (count, index)
            checked += 1
    assert checked == MAX_LEAVES * (MAX_LEAVES + 1) // 2


def test_a_changed_leaf_path_byte_or_index_never_proves() -> None:
    for count in range(1, MAX_LEAVES + 1):
        leaves = _leaves(count)
        root = merkle_root(leaves)
        for index in range(count):
            path = inclusion_path(leaves, index)
            assert root_from_path(leaves[index] + b"x", index, count, path) != root
            for step in range(len(path)):
                for byte in (0, 31):
                    forged = list(path)
                    forged[step] = forged[step][:byte] + bytes([forged[step][byte] ^ 1]) + forged[step][byte + 1 :]
                    assert root_from_path(leaves[index], index, count, forged) != root
            for other in range(count):
                if other == index:
                    continue
                try:
                    assert root_from_path(leaves[index], other, count, path) != root, (count, index, other)
                except ValueError:
                    pass  # a path of the wrong length for that index: refused outright, also fine


@settings(max_examples=200, deadline=None)
@given(leaves=st.lists(st.binary(min_size=0, max_size=40), min_size=1, max_size=MAX_LEAVES), data=st.data())
def test_property_any_leaves_any_index(leaves: list[bytes], data: st.DataObject) -> None:
    index = data.draw(st.integers(0, len(leaves) - 1))
    path = inclusion_path(leaves, index)
    root = merkle_root(leaves)
    assert root == _rfc6962_root(leaves)
    assert root_from_path(leaves[index], index, len(leaves), path) == root
    # The same leaf at another position proves only if the leaves there are equal too.
    replaced = data.draw(st.binary(max_size=40))
    if replaced != leaves[index]:
        assert root_from_path(replaced, index, len(leaves), path) != root


@pytest.mark.parametrize("count", [2, 3, 5, 8, 13, 70])
def test_a_path_with_a_step_added_or_removed_is_refused(count: int) -> None:
    leaves = _leaves(count)
    for index in range(count):
        path = inclusion_path(leaves, index)
        with pytest.raises(ValueError, match="path of"):
            root_from_path(leaves[index], index, count, [*path, bytes(32)])
        if path:
            with pytest.raises(ValueError, match="path of"):
                root_from_path(leaves[index], index, count, path[:-1])


def test_a_claimed_count_that_differs_from_the_tree_does_not_prove() -> None:
    # A header lying about record_count (with the same path) must not still verify.
    leaves = _leaves(6)
    root = merkle_root(leaves)
    path = inclusion_path(leaves, 5)
    for count in (7, 8):
        try:
            assert root_from_path(leaves[5], 5, count, path) != root
        except ValueError:
            pass


@pytest.mark.parametrize(
    ("index", "count", "path", "message"),
    [
        (0, 0, [], "count"),
        (-1, 3, [], "index"),
        (3, 3, [], "index"),
        (True, 3, [], "index"),
        (0, 2, [b"short"], "32-byte"),
        (0, 2, ["text" * 8], "32-byte"),
    ],
)
def test_impossible_arguments_raise_value_error(index: int, count: int, path: list[bytes], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        root_from_path(b"leaf", index, count, path)


def test_inclusion_path_refuses_an_index_outside_the_leaves() -> None:
    with pytest.raises(ValueError, match="outside"):
        inclusion_path([b"a", b"b"], 2)
    with pytest.raises(ValueError, match="outside"):
        inclusion_path([], 0)


def test_a_single_leaf_is_its_own_root_with_an_empty_path() -> None:
    assert inclusion_path([b"only"], 0) == []
    assert root_from_path(b"only", 0, 1, []) == merkle_root([b"only"]) == leaf_hash(b"only")


def test_an_interior_node_cannot_be_passed_off_as_a_leaf() -> None:
    # Second preimage: the concatenation of two leaf hashes, offered as a leaf of a one-leaf tree.
    leaves = [b"a", b"b"]
    interior = leaf_hash(b"a") + leaf_hash(b"b")
    assert root_from_path(interior, 0, 1, []) != merkle_root(leaves)
