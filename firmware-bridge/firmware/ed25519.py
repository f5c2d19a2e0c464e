# Ed25519 signing (RFC 8032) in plain Python, for boards whose MicroPython has no Ed25519 of its own.
#
# Small rather than fast: extended twisted-Edwards coordinates and a double-and-add ladder over
# Python's arbitrary-precision integers, as in RFC 8032 section 6. A signature costs two scalar
# multiplications' worth of field arithmetic: about 2-4 ms under CPython, a few seconds under
# MicroPython on an ESP32 or RP2040 (which is why the firmware signs each reading once, when it is
# sampled, and never again on retransmission). It signs only; the board never needs to verify.
# Not constant-time: the key is the board's own and the board's timing is not observable from the
# serial line's far side in any way this protocol offers, but do not reuse this file where it is.
#
# SHA-512 comes from hashlib where the port has it, else from the small implementation below
# (MicroPython's hashlib usually has sha256 only).
#
# What this file must never do: depend on anything but MicroPython's builtins and hashlib.

try:
    from hashlib import sha512 as _hashlib_sha512
except ImportError:  # MicroPython
    _hashlib_sha512 = None  # type: ignore[assignment]

_P = 2**255 - 19
_L = 2**252 + 27742317777372353535851937790883648493


def _inv(x: int) -> int:
    return pow(x, _P - 2, _P)


_D = -121665 * _inv(121666) % _P
_GY = 4 * _inv(5) % _P


def _recover_x(y: int, sign: int) -> int:
    xx = (y * y - 1) * _inv(_D * y * y + 1) % _P
    x = pow(xx, (_P + 3) // 8, _P)
    if (x * x - xx) % _P != 0:
        x = x * pow(2, (_P - 1) // 4, _P) % _P
    if x & 1 != sign:
        x = _P - x
    return x


_GX = _recover_x(_GY, 0)
_G = (_GX, _GY, 1, _GX * _GY % _P)


def _add(p: tuple, q: tuple) -> tuple:
    a = (p[1] - p[0]) * (q[1] - q[0]) % _P
    b = (p[1] + p[0]) * (q[1] + q[0]) % _P
    c = 2 * p[3] * q[3] * _D % _P
    d = 2 * p[2] * q[2] % _P
    e, f, g, h = b - a, d - c, d + c, b + a
    return (e * f % _P, g * h % _P, f * g % _P, e * h % _P)


def _mul(s: int, p: tuple) -> tuple:
    q = (0, 1, 1, 0)
    while s > 0:
        if s & 1:
            q = _add(q, p)
        p = _add(p, p)
        s >>= 1
    return q


def _compress(p: tuple) -> bytes:
    zinv = _inv(p[2])
    x = p[0] * zinv % _P
    y = p[1] * zinv % _P
    return (y | ((x & 1) << 255)).to_bytes(32, "little")


def _int_le(data: bytes) -> int:
    return int.from_bytes(data, "little")


def _expand(seed: bytes) -> tuple:
    if len(seed) != 32:
        raise ValueError("an Ed25519 seed has 32 bytes")
    h = sha512(seed)
    a = _int_le(h[:32])
    a &= (1 << 254) - 8
    a |= 1 << 254
    return a, h[32:]


def public_key(seed: bytes) -> bytes:
    a, _prefix = _expand(seed)
    return _compress(_mul(a, _G))


class Signer:
    """Signs with one key; the key's expansion and public key are computed once."""

    def __init__(self, seed: bytes) -> None:
        self._a, self._prefix = _expand(seed)
        self.public = _compress(_mul(self._a, _G))

    def sign(self, message: bytes) -> bytes:
        r = _int_le(sha512(self._prefix + message)) % _L
        big_r = _compress(_mul(r, _G))
        k = _int_le(sha512(big_r + self.public + message)) % _L
        s = (r + k * self._a) % _L
        return big_r + s.to_bytes(32, "little")


# ---------------------------------------------------------------- SHA-512 (FIPS 180-4), for ports without it

_K = [
    0x428A2F98D728AE22, 0x7137449123EF65CD, 0xB5C0FBCFEC4D3B2F, 0xE9B5DBA58189DBBC, 0x3956C25BF348B538,
    0x59F111F1B605D019, 0x923F82A4AF194F9B, 0xAB1C5ED5DA6D8118, 0xD807AA98A3030242, 0x12835B0145706FBE,
    0x243185BE4EE4B28C, 0x550C7DC3D5FFB4E2, 0x72BE5D74F27B896F, 0x80DEB1FE3B1696B1, 0x9BDC06A725C71235,
    0xC19BF174CF692694, 0xE49B69C19EF14AD2, 0xEFBE4786384F25E3, 0x0FC19DC68B8CD5B5, 0x240CA1CC77AC9C65,
    0x2DE92C6F592B0275, 0x4A7484AA6EA6E483, 0x5CB0A9DCBD41FBD4, 0x76F988DA831153B5, 0x983E5152EE66DFAB,
    0xA831C66D2DB43210, 0xB00327C898FB213F, 0xBF597FC7BEEF0EE4, 0xC6E00BF33DA88FC2, 0xD5A79147930AA725,
    0x06CA6351E003826F, 0x142929670A0E6E70, 0x27B70A8546D22FFC, 0x2E1B21385C26C926, 0x4D2C6DFC5AC42AED,
    0x53380D139D95B3DF, 0x650A73548BAF63DE, 0x766A0ABB3C77B2A8, 0x81C2C92E47EDAEE6, 0x92722C851482353B,
    0xA2BFE8A14CF10364, 0xA81A664BBC423001, 0xC24B8B70D0F89791, 0xC76C51A30654BE30, 0xD192E819D6EF5218,
    0xD69906245565A910, 0xF40E35855771202A, 0x106AA07032BBD1B8, 0x19A4C116B8D2D0C8, 0x1E376C085141AB53,
    0x2748774CDF8EEB99, 0x34B0BCB5E19B48A8, 0x391C0CB3C5C95A63, 0x4ED8AA4AE3418ACB, 0x5B9CCA4F7763E373,
    0x682E6FF3D6B2B8A3, 0x748F82EE5DEFB2FC, 0x78A5636F43172F60, 0x84C87814A1F0AB72, 0x8CC702081A6439EC,
    0x90BEFFFA23631E28, 0xA4506CEBDE82BDE9, 0xBEF9A3F7B2C67915, 0xC67178F2E372532B, 0xCA273ECEEA26619C,
    0xD186B8C721C0C207, 0xEADA7DD6CDE0EB1E, 0xF57D4F7FEE6ED178, 0x06F067AA72176FBA, 0x0A637DC5A2C898A6,
    0x113F9804BEF90DAE, 0x1B710B35131C471B, 0x28DB77F523047D84, 0x32CAAB7B40C72493, 0x3C9EBE0A15C9BEBC,
    0x431D67C49C100D4C, 0x4CC5D4BECB3E42B6, 0x597F299CFC657E2A, 0x5FCB6FAB3AD6FAEC, 0x6C44198C4A475817,
]
_H0 = [
    0x6A09E667F3BCC908, 0xBB67AE8584CAA73B, 0x3C6EF372FE94F82B, 0xA54FF53A5F1D36F1,
    0x510E527FADE682D1, 0x9B05688C2B3E6C1F, 0x1F83D9ABFB41BD6B, 0x5BE0CD19137E2179,
]
_M64 = 0xFFFFFFFFFFFFFFFF


def _rotr(x: int, n: int) -> int:
    return ((x >> n) | (x << (64 - n))) & _M64


def sha512_pure(data: bytes) -> bytes:
    h = list(_H0)
    bits = len(data) * 8
    data = bytes(data) + b"\x80" + b"\x00" * ((111 - len(data)) % 128) + bits.to_bytes(16, "big")
    for start in range(0, len(data), 128):
        w = [int.from_bytes(data[start + 8 * i : start + 8 * i + 8], "big") for i in range(16)]
        for i in range(16, 80):
            s0 = _rotr(w[i - 15], 1) ^ _rotr(w[i - 15], 8) ^ (w[i - 15] >> 7)
            s1 = _rotr(w[i - 2], 19) ^ _rotr(w[i - 2], 61) ^ (w[i - 2] >> 6)
            w.append((w[i - 16] + s0 + w[i - 7] + s1) & _M64)
        a, b, c, d, e, f, g, hh = h
        for i in range(80):
            t1 = (hh + (_rotr(e, 14) ^ _rotr(e, 18) ^ _rotr(e, 41)) + ((e & f) ^ ((e ^ _M64) & g)) + _K[i] + w[i]) & _M64
            t2 = ((_rotr(a, 28) ^ _rotr(a, 34) ^ _rotr(a, 39)) + ((a & b) ^ (a & c) ^ (b & c))) & _M64
            a, b, c, d, e, f, g, hh = (t1 + t2) & _M64, a, b, c, (d + t1) & _M64, e, f, g
        h = [(x + y) & _M64 for x, y in zip(h, [a, b, c, d, e, f, g, hh])]  # noqa: B905 (MicroPython has no strict=)
    return b"".join(x.to_bytes(8, "big") for x in h)


def sha512(data: bytes) -> bytes:
    if _hashlib_sha512 is not None:
        return _hashlib_sha512(data).digest()
    return sha512_pure(data)
