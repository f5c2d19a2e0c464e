"""Canonical CBOR: one byte string for one value, and a strict decoder for bytes from outside.

Signatures and hashes are computed over these bytes, so two encoders must agree byte for byte
(RFC 8949 §4.2.1 core deterministic encoding, as cbor2's canonical mode implements it). The decoder
accepts only the plain data model tomq uses (maps with text keys, arrays, text, bytes, integers,
floats, booleans, null); tags, trailing bytes and non-canonical forms are refused. It must never
raise anything but `CanonicalDecodeError`, whatever the input.
"""

from __future__ import annotations

import io
from typing import Any

import cbor2

from tomq.errors import TomqError

MAX_NESTING = 32  # deeper than any tomq structure; bounds the work an attacker can ask for


class CanonicalDecodeError(TomqError):
    """The bytes are not one canonical CBOR value of tomq's plain data model."""


def encode(value: Any) -> bytes:
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
    _check_plain(value, 0)
    if check_canonical:
        try:
            again = encode(value)
        except Exception as exc:
            raise CanonicalDecodeError(f"malformed CBOR: cannot re-encode ({_one_line(exc)})") from None
        if again != data:
            raise CanonicalDecodeError("CBOR is well-formed but not in canonical (deterministic) encoding")
    return value


def _check_plain(value: Any, depth: int) -> None:
    if depth > MAX_NESTING:
        raise CanonicalDecodeError(f"CBOR nests deeper than {MAX_NESTING} levels")
    kind = type(value)
    if kind is int and not -(2**64) <= value < 2**64:
        # cbor2 turns bignum tags (2, 3) into plain ints, so the tag check below never sees them. No tomq
        # field needs one, and an int of thousands of digits makes every f"{value}" in an error message
        # raise ValueError (int_max_str_digits) instead of the caller's documented error (found by fuzzing).
        raise CanonicalDecodeError("CBOR bignum (an integer beyond 64 bits, a tag) is not allowed")
    if kind in (int, str, bytes, float, bool) or value is None:
        return
    if kind is list:
        for item in value:
            _check_plain(item, depth + 1)
        return
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str:
                raise CanonicalDecodeError(f"CBOR map key of type {type(key).__name__}; only text keys are allowed")
            _check_plain(item, depth + 1)
        return
    raise CanonicalDecodeError(f"CBOR value of type {kind.__name__} (a tag or undefined) is not allowed")


def _one_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]
