"""Canonical CBOR: one byte string for one value, and a strict decoder for bytes from outside.

Signatures and hashes are computed over these bytes, so two encoders must agree byte for byte
(RFC 8949 §4.2.1 core deterministic encoding, as cbor2's canonical mode implements it). The decoder
accepts only the plain data model tomq uses (maps with text keys, arrays, text, bytes, integers,
floats, booleans, null); tags, trailing bytes and non-canonical forms are refused. It must never
raise anything but `CanonicalDecodeError`, whatever the input.
"""

from __future__ import annotations

import io
import itertools
from typing import Any

import cbor2

from tomq.errors import TomqError

MAX_NESTING = 32  # deeper than any tomq structure; bounds the work an attacker can ask for


class CanonicalDecodeError(TomqError):
    """The bytes are not one canonical CBOR value of tomq's plain data model."""


def encode(value: Any) -> bytes:
    # Maps tomq builds are never in canonical key order (it writes their fields as they read), so a
    # plain-mode shortcut like decode's (below) misses here; rebuilding them in order in Python cost
    # more than cbor2's canonical mode (8.3 against 7.9 us for a Raft batch envelope).
    return cbor2.dumps(value, canonical=True)


def decode(data: bytes, *, check_canonical: bool = True) -> Any:
    """Decode exactly one value; refuse trailing bytes, tags, odd types and non-canonical encodings."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise CanonicalDecodeError(f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    stream = io.BytesIO(data)
    try:
        value = cbor2.CBORDecoder(stream).decode()
    except Exception as exc:  # cbor2 raises many kinds (EOF, value, overflow, recursion); all mean "malformed"
        raise CanonicalDecodeError(f"malformed CBOR: {_one_line(exc)}") from None
    if stream.tell() != len(data):
        raise CanonicalDecodeError(f"malformed CBOR: {len(data) - stream.tell()} trailing bytes after the value")
    plain_is_canonical = _check_plain(value, 0)
    if check_canonical:
        try:
            # When the keys are in order and there are no floats, the plain encoding is the canonical one.
            again = cbor2.dumps(value) if plain_is_canonical else cbor2.dumps(value, canonical=True)
        except Exception as exc:
            raise CanonicalDecodeError(f"malformed CBOR: cannot re-encode ({_one_line(exc)})") from None
        if again != data:
            raise CanonicalDecodeError("CBOR is well-formed but not in canonical (deterministic) encoding")
    return value


def _check_plain(value: Any, depth: int) -> bool:
    """Refuse what is not tomq's plain data model; True when cbor2's plain encoding of `value` is
    canonical (map keys in canonical order, no floats), so a cheap re-encoding checks the input."""
    if depth > MAX_NESTING:
        raise CanonicalDecodeError(f"CBOR nests deeper than {MAX_NESTING} levels")
    kind = type(value)
    if kind is dict:
        for key in value:
            if type(key) is not str:
                raise CanonicalDecodeError(f"CBOR map key of type {type(key).__name__}; only text keys are allowed")
        plain = _keys_in_canonical_order(value)
        items = value.values()
    elif kind is list:
        plain = True
        items = value
    else:
        return _check_leaf(value)
    if depth == MAX_NESTING and value:
        raise CanonicalDecodeError(f"CBOR nests deeper than {MAX_NESTING} levels")  # the leaves below are checked inline
    for item in items:  # leaves inline: a call per leaf cost more than it saved
        kind = type(item)
        if kind is bytes or kind is str or kind is bool or item is None:
            continue
        if kind is dict or kind is list:
            plain = _check_plain(item, depth + 1) and plain
        else:
            plain = _check_leaf(item) and plain
    return plain


def _check_leaf(value: Any) -> bool:
    kind = type(value)
    if kind is int and not -(2**64) <= value < 2**64:
        # cbor2 turns bignum tags (2, 3) into plain ints, so the tag check below never sees them. No tomq
        # field needs one, and an int of thousands of digits makes every f"{value}" in an error message
        # raise ValueError (int_max_str_digits) instead of the caller's documented error (found by fuzzing).
        raise CanonicalDecodeError("CBOR bignum (an integer beyond 64 bits, a tag) is not allowed")
    if kind in _LEAVES:
        return True
    if kind is float:
        return False  # canonical CBOR writes each float in its shortest exact form; plain cbor2 does not
    raise CanonicalDecodeError(f"CBOR value of type {kind.__name__} (a tag or undefined) is not allowed")


_LEAVES = frozenset({int, str, bytes, bool, type(None)})  # encoded alike by cbor2's plain and canonical modes
_ORDERED_KEYS: dict[tuple[Any, ...], bool] = {}  # a map's keys -> whether they are in canonical order
# tomq's maps have a few dozen key sets, met in the first seconds; once full (device attributes,
# or an attacker's odd maps) the rest are judged each time, never kept.
_ORDERED_KEYS_MAX = 1024


def _keys_in_canonical_order(mapping: dict[Any, Any]) -> bool:
    """Whether the keys are ASCII text in canonical order: shorter first, then bytewise (RFC 8949
    §4.2.1; for ASCII, bytewise is Python's string order). Anything else takes the slow path."""
    keys = tuple(mapping)
    known = _ORDERED_KEYS.get(keys)
    if known is not None:
        return known
    if not all(type(key) is str and key.isascii() for key in keys):
        return False
    ordered = all((len(before), before) < (len(after), after) for before, after in itertools.pairwise(keys))
    if len(_ORDERED_KEYS) < _ORDERED_KEYS_MAX and sum(map(len, keys)) <= 512:
        _ORDERED_KEYS[keys] = ordered
    return ordered


def _one_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]
