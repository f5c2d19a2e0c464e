"""Merkle inclusion proofs: that one record envelope is in a block, shown with the header alone.

The tree is exactly `block.merkle_root`'s: leaf hash = SHA-256(0x00 || leaf), interior = SHA-256(0x01
|| left || right), built level by level, and an odd node at the end of a level is promoted unchanged
to the next level (it gets no sibling and no hash). The path for leaf `index` is the list of
siblings met on the way up, lowest level first, skipping the levels where the node was promoted. The
promotion rule gives the same tree as RFC 6962's split at the largest power of two, so these paths
are RFC 6962 audit paths too; tests/test_ledger_proof.py checks both against `merkle_root`.

An actuator (sensors/command.py) uses this to check that the record authorising a command is in a
certified block, and `tomq ledger prove` will print such paths.

What this module must never do: I/O, or accept a path whose length does not fit the index and the
leaf count (a verifier that tolerated extra or missing steps could be shown a different tree).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from tomq.node.ledger.block import HASH_BYTES

# The prefixes of block.merkle_root: a leaf can never be read as an interior node.
_LEAF = b"\x00"
_NODE = b"\x01"


def leaf_hash(leaf: bytes) -> bytes:
    return hashlib.sha256(_LEAF + leaf).digest()


def _interior(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(_NODE + left + right).digest()


def inclusion_path(leaves: Sequence[bytes], index: int) -> list[bytes]:
    """The sibling hashes from leaf `index` up to the root of `leaves`, lowest first.

    Raises ValueError when `index` is not the position of a leaf.
    """
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(leaves):
        raise ValueError(f"leaf index {index!r} is outside 0..{len(leaves) - 1} ({len(leaves)} leaves)")
    level = [leaf_hash(bytes(leaf)) for leaf in leaves]
    path: list[bytes] = []
    while len(level) > 1:
        if not (index == len(level) - 1 and len(level) % 2):  # a promoted node has no sibling here
            path.append(level[index ^ 1])
        paired = [_interior(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            paired.append(level[-1])
        level = paired
        index //= 2
    return path


def path_length(index: int, count: int) -> int:
    """How many siblings the path of leaf `index` among `count` leaves has. Raises ValueError."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"leaf count {count!r} must be a positive integer")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
        raise ValueError(f"leaf index {index!r} is outside 0..{count - 1} ({count} leaves)")
    steps = 0
    while count > 1:
        if not (index == count - 1 and count % 2):
            steps += 1
        index //= 2
        count = (count + 1) // 2
    return steps


def root_from_path(leaf: bytes, index: int, count: int, path: Sequence[bytes]) -> bytes:
    """The root a tree of `count` leaves has if `leaf` is at `index` with these siblings.

    Compare it with the header's records_root: equal means included. Raises ValueError when the
    index, the count or the path's length cannot be right, or a sibling is not a SHA-256 hash.
    """
    if not isinstance(leaf, bytes | bytearray | memoryview):
        raise ValueError(f"leaf must be bytes, not {type(leaf).__name__}")
    expected = path_length(index, count)
    if len(path) != expected:
        raise ValueError(f"leaf {index} of {count} has a path of {expected} hashes, not {len(path)}")
    for step, sibling in enumerate(path):
        if not isinstance(sibling, bytes) or len(sibling) != HASH_BYTES:
            raise ValueError(f"path step {step} is not a {HASH_BYTES}-byte hash")
    node = leaf_hash(bytes(leaf))
    siblings = iter(path)
    while count > 1:
        if not (index == count - 1 and count % 2):
            sibling = next(siblings)
            node = _interior(node, sibling) if index % 2 == 0 else _interior(sibling, node)
        index //= 2
        count = (count + 1) // 2
    return node
