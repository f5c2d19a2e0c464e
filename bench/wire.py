"""How close sealing and opening envelopes come to the raw Ed25519 operations they are built on.

    .venv/bin/python bench/wire.py [--quick] [-n N] [--repeats R]

Measures, interleaved so drift hits all four alike: envelopes sealed per second, envelopes opened
per second (signature check, canonical decoding and every other check of EnvelopeOpener.open), and
raw Ed25519 sign and verify per second over a message of the same size as an envelope's signing
input: with libsodium, which tomq uses (tomq/identity.py), and with OpenSSL (`cryptography`) beside
it. Each is repeated and the median reported. A benchmark, never a test.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tomq import canonical, certificate, wire
from tomq.certificate import TrustStore
from tomq.identity import SigningKey
from tomq.topics import default_publish_rights

CLUSTER = "bench"
OPEN_TARGET = 0.8  # open/raw-verify: opening should cost little more than its one signature check


def _rate(count: int, run: Callable[[], object]) -> float:
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        run()
        elapsed = time.perf_counter() - start
    finally:
        gc.enable()
    return count / elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a short run (fewer operations per measurement)")
    parser.add_argument("-n", type=int, help="operations per measurement (default 5000, 500 with --quick)")
    parser.add_argument("--repeats", type=int, default=7, help="measurements of each kind; the median is reported")
    args = parser.parse_args(argv)
    n: int = args.n if args.n is not None else (500 if args.quick else 5000)
    repeats: int = args.repeats
    if n < 1 or repeats < 1:
        parser.error("-n and --repeats must be positive")

    now = int(time.time())
    operator = SigningKey.generate()
    sender = SigningKey.generate()
    cert = certificate.issue(
        operator, cluster=CLUSTER, subject=sender.public_key, name="s1", role="sensor",
        not_before=now - 60, not_after=now + 86400, publish=default_publish_rights("sensor", "s1"),
    )
    trust = TrustStore(operator.public_key, CLUSTER)
    trust.add(cert.encoded)
    body = {"value": 21.5, "unit": "C", "hash": os.urandom(32)}
    time_ms = now * 1000

    # Pre-sealed envelopes with increasing sequence numbers, opened by a fresh opener each round.
    envelopes = [wire.seal(sender, seq=seq, time_ms=time_ms + seq, type="reading", body=body) for seq in range(1, n + 1)]
    signed, _signature = canonical.decode(envelopes[0])
    message = b"tomq/envelope/v1\x00" + signed  # the same size as an envelope's signing input
    raw_key = SigningKey.generate()
    raw_signature = raw_key.sign(message)
    openssl_key = Ed25519PrivateKey.generate()
    openssl_public = openssl_key.public_key()
    openssl_signature = openssl_key.sign(message)

    def seal_all() -> None:
        for seq in range(1, n + 1):
            wire.seal(sender, seq=seq, time_ms=time_ms + seq, type="reading", body=body)

    def raw_sign_all() -> None:
        for _ in range(n):
            raw_key.sign(message)

    def raw_verify_all() -> None:
        for _ in range(n):
            raw_key.public_key.verify(raw_signature, message)

    def openssl_sign_all() -> None:
        for _ in range(n):
            openssl_key.sign(message)

    def openssl_verify_all() -> None:
        for _ in range(n):
            openssl_public.verify(openssl_signature, message)

    results: dict[str, list[float]] = {"seal": [], "open": [], "sign": [], "verify": [], "openssl sign": [],
                                       "openssl verify": []}
    for _ in range(repeats):
        opener = wire.EnvelopeOpener(trust)

        def open_all(opener: wire.EnvelopeOpener = opener) -> None:
            for data in envelopes:
                opener.open(data, now)

        results["seal"].append(_rate(n, seal_all))
        results["sign"].append(_rate(n, raw_sign_all))
        results["open"].append(_rate(n, open_all))
        results["verify"].append(_rate(n, raw_verify_all))
        results["openssl sign"].append(_rate(n, openssl_sign_all))
        results["openssl verify"].append(_rate(n, openssl_verify_all))

    median = {kind: statistics.median(rates) for kind, rates in results.items()}
    print(f"tomq wire bench: {n} operations x {repeats} repeats, envelope {len(envelopes[0])} bytes, "
          f"signed message {len(message)} bytes, Python {sys.version.split()[0]}")
    seal_ratio = median["seal"] / median["sign"]
    open_ratio = median["open"] / median["verify"]
    print(f"raw ed25519 sign (libsodium):   {median['sign']:.0f}/s  seal (encode+sign):   {median['seal']:.0f}/s  "
          f"ratio {seal_ratio:.2f}")
    print(f"raw ed25519 verify (libsodium): {median['verify']:.0f}/s  open (verify+decode): {median['open']:.0f}/s  "
          f"ratio {open_ratio:.2f} (target >= {OPEN_TARGET})")
    print(f"OpenSSL for comparison: sign {median['openssl sign']:.0f}/s, verify {median['openssl verify']:.0f}/s; "
          f"libsodium/OpenSSL verify {median['verify'] / median['openssl verify']:.2f}x")
    spread = {kind: (min(rates), max(rates)) for kind, rates in results.items()}
    print("spread (min..max /s): " + "  ".join(f"{kind} {lo:.0f}..{hi:.0f}" for kind, (lo, hi) in spread.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
