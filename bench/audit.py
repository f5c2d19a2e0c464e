"""The auditor's toolkit on a large ledger: verify rate against raw SHA-256 + Ed25519, export and proof times.

    .venv/bin/python bench/audit.py [--records 100000] [--batch 1000] [--repeats 3] [--quick] [--keep DIR]

Builds a real ledger in a temporary directory: a cluster from `tomq.cluster.init`, real keys, a
genesis block, then blocks of `--batch` sealed records proposed by n1 and certified by n1 and n2
(readings from ten sensors recorded by the collector service, every tenth record a result the
analyser derived from the nine readings before it, every hundredth a command to an actuator), all
legal by Table II. Then, each measured in this run:

- `verify_ledger` (what `tomq ledger verify` runs): blocks and records per second, median of
  --repeats runs, file reads included;
- the raw floor for the same data: every SHA-256 and every Ed25519 verification the ledger implies
  (each record's leaf hash and envelope signature, each block's header hash, proposer signature
  and two commit signatures), done directly with hashlib and `cryptography` on bytes prepared in
  advance; the ratio tomq / raw says what decoding, certificates, Table II and bookkeeping cost;
- `tomq ledger export` of the whole ledger in each format, verified from genesis (the time an
  auditor waits) and, for PROV-JSON, unverified (the writer alone); output sizes;
- an audit bundle of the whole ledger: write, then verify; an inclusion proof of one reading:
  build (from the directory) and check.

Progress goes to stderr; the table to stdout. Everything is removed at the end unless --keep.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make `bench` importable

from bench.common import log
from tomq import canonical, cluster
from tomq.identity import SigningKey, identity_id
from tomq.node.ledger import export, proofs
from tomq.node.ledger.block import (
    BLOCK_DOMAIN,
    COMMIT_DOMAIN,
    BlockFile,
    block_file_name,
    commit_signature,
    decode_block_file,
    encode_block_file,
    header_map,
    make_block,
    sign_block,
)
from tomq.node.ledger.bundle import DirectorySource, LedgerReader, verify_bundle, write_bundle
from tomq.node.ledger.genesis import make_genesis
from tomq.node.ledger.verify import verify_ledger
from tomq.records import DATA, ID_CREATE, ORCH, Identity, Orchestrate, Provenance, Record
from tomq.wire import seal

SENSORS = [f"s{i}" for i in range(10)]
ENVELOPE_DOMAIN = b"tomq/envelope/v1\x00"


def build(root: Path, records: int, batch: int) -> tuple[Path, SigningKey, int]:
    """Write the ledger; return its directory, the operator key and the number of records."""
    now = int(time.time())
    cluster.init(root / "cluster", ["n1", "n2", "n3"], cluster_name="bench", now=now)
    for name, role in [*((s, "sensor") for s in SENSORS), ("a1", "actuator"), ("collector", "service"),
                       ("analyser", "service")]:
        cluster.add_member(root / "cluster", name, role, now=now)
    loaded = cluster.load(root / "cluster")
    operator = SigningKey.load(root / "cluster" / "operator" / "operator.key")
    keys = {member.name: loaded.signing_key(member.name) for member in loaded.members}
    certs = {member.name: loaded.certificate(member.name).encoded for member in loaded.members}
    ledger = root / "ledger"
    ledger.mkdir()
    start_ms = now * 1000
    genesis = make_genesis(loaded, operator, start_ms)
    (ledger / block_file_name(0)).write_bytes(genesis)
    prev, height = decode_block_file(genesis).block.hash, 0
    seq: Counter[str] = Counter()
    total = 3

    def write(items: list[tuple[str, Record]]) -> None:
        nonlocal prev, height
        height += 1
        envelopes = []
        for signer, record in items:
            seq[signer] += 1
            envelopes.append(seal(keys[signer], seq=seq[signer], time_ms=start_ms + height, type="record",
                                  body=record.to_map()))
        block = make_block(height=height, prev=prev, term=1, time_ms=start_ms + height, proposer=keys["n1"].id,
                           records=envelopes)
        certificate = {keys[n].id: commit_signature(keys[n], block.hash) for n in ("n1", "n2")}
        (ledger / block_file_name(height)).write_bytes(
            encode_block_file(BlockFile(block, sign_block(keys["n1"], block), certificate)))
        prev = block.hash

    members = [*((s, "device") for s in SENSORS), ("a1", "device")]
    write([("n1", Record(ID_CREATE, Identity(name, kind, certs[name]), start_ms)) for name, kind in members])
    write([("n1", Record(ID_CREATE, Identity(name, "service", certs[name]), start_ms)) for name in ("collector",
                                                                                                   "analyser")])
    total += len(members) + 2
    made = 0
    recent: list[str] = []
    while total < records:
        items: list[tuple[str, Record]] = []
        for _ in range(min(batch, records - total)):
            made += 1
            time_ms = start_ms + made
            if made % 100 == 0:
                command = f"cmd:busy.0:{made:032x}"
                items.append(("n1", Record(ORCH, Orchestrate(command, "a1", "command", {
                    "setting": {"on": made % 200 == 0}, "rule": "busy", "trigger": f"{made:032x}"}), time_ms)))
            elif made % 10 == 0:
                data = f"result:{made:032x}"
                items.append(("analyser", Record(DATA, Provenance(
                    data, hashlib.sha256(data.encode()).digest(), "analyse:analyser", "publish:analyser",
                    source="analyser", derived_from=tuple(recent)), time_ms, {"summary": {"mean": made % 7}})))
                recent = []
            else:
                device = SENSORS[made % len(SENSORS)]
                data = f"reading:{made:032x}"
                items.append(("collector", Record(DATA, Provenance(
                    data, hashlib.sha256(data.encode()).digest(), f"sample:{device}", "collect:collector",
                    source=device, source_signature=bytes(64)), time_ms)))
                recent.append(data)
            total += 1
        write(items)
        if height % 20 == 0:
            log(f"  built {height} blocks, {total} records")
    return ledger, operator, total


def raw_work(ledger: Path, operator: SigningKey) -> tuple[list[bytes], list[tuple[Ed25519PublicKey, bytes, bytes]]]:
    """Every hash input and every (key, signature, message) the ledger's verification implies."""
    keys = {operator.id: Ed25519PublicKey.from_public_bytes(operator.public_key.raw)}
    hashes: list[bytes] = []
    signatures: list[tuple[Ed25519PublicKey, bytes, bytes]] = []
    for block in LedgerReader(DirectorySource(ledger), None).blocks():
        for entry in block.entries:
            structure = entry.record.structure
            if entry.record.state == ID_CREATE and isinstance(structure, Identity) and structure.kind != "container":
                subject = canonical.decode(canonical.decode(structure.proof)[0])["subject"]
                keys[identity_id(subject)] = Ed25519PublicKey.from_public_bytes(subject)
        header = block.block_file.block
        hashes.append(canonical.encode(header_map(header)))
        for entry in block.entries:
            signed, signature = canonical.decode(entry.envelope)
            hashes.append(b"\x00" + entry.envelope)
            signatures.append((keys[entry.sender_id], signature, ENVELOPE_DOMAIN + signed))
        signatures.append((keys[header.proposer], block.block_file.proposer_signature, BLOCK_DOMAIN + block.hash))
        for signer, signature in sorted(block.block_file.commit_certificate.items()):
            signatures.append((keys[signer], signature, COMMIT_DOMAIN + block.hash))
    return hashes, signatures


def timed(function: Callable[[], object], repeats: int) -> float:
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        runs.append(time.perf_counter() - started)
    return statistics.median(runs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=1000, help="records per block")
    parser.add_argument("--repeats", type=int, default=3, help="runs of verify and of the raw floor (median)")
    parser.add_argument("--quick", action="store_true", help="10,000 records, one run each")
    parser.add_argument("--keep", type=Path, help="build in this (new) directory and keep it")
    args = parser.parse_args()
    if args.quick:
        args.records, args.repeats = 10_000, 1
    root = args.keep if args.keep else Path(tempfile.mkdtemp(prefix="tomq-bench-audit-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        log(f"building a ledger of {args.records} records in blocks of {args.batch} under {root}")
        started = time.perf_counter()
        ledger, operator, records = build(root, args.records, args.batch)
        blocks = len(list(ledger.glob("*.block")))
        size = sum(p.stat().st_size for p in ledger.glob("*.block"))
        log(f"built {blocks} blocks, {records} records, {size / 1e6:.1f} MB in {time.perf_counter() - started:.1f} s")
        key = operator.public_key

        log("verify_ledger ...")
        verify_s = timed(lambda: verify_ledger(ledger, key), args.repeats)
        log("raw SHA-256 + Ed25519 floor ...")
        hashes, signatures = raw_work(ledger, operator)

        def raw() -> None:
            for block in sorted(ledger.glob("*.block")):
                block.read_bytes()  # the same file reads verify_ledger makes
            for data in hashes:
                hashlib.sha256(data).digest()
            for public, signature, message in signatures:
                public.verify(signature, message)

        raw_s = timed(raw, args.repeats)

        rows: list[tuple[str, str, str]] = [
            ("ledger", f"{blocks} blocks, {records} records", f"{size / 1e6:.1f} MB"),
            ("verify_ledger", f"{verify_s:.2f} s", f"{blocks / verify_s:,.0f} blocks/s, {records / verify_s:,.0f} records/s"),
            ("raw SHA-256 + Ed25519", f"{raw_s:.2f} s", f"{len(hashes):,} hashes + {len(signatures):,} verifications: "
                                                         f"{records / raw_s:,.0f} records/s"),
            ("ratio verify / raw", f"{verify_s / raw_s:.2f}x", "1.00x would be verification at the crypto floor"),
        ]
        out_dir = root / "exports"
        out_dir.mkdir(exist_ok=True)
        for fmt in export.FORMATS:
            log(f"export {fmt} ...")
            target = out_dir / f"ledger.{fmt}"
            started = time.perf_counter()
            with open(target, "w", encoding="utf-8") as out:
                report = export.export(LedgerReader(DirectorySource(ledger), key), fmt, out)
            seconds = time.perf_counter() - started
            statements = sum(report.counts.values())
            rows.append((f"export {fmt} (verified)", f"{seconds:.2f} s",
                         f"{statements:,} statements, {target.stat().st_size / 1e6:.1f} MB, "
                         f"{records / seconds:,.0f} records/s"))
        started = time.perf_counter()
        with open(out_dir / "unverified.json", "w", encoding="utf-8") as out:
            export.export(LedgerReader(DirectorySource(ledger), None), "prov-json", out)
        seconds = time.perf_counter() - started
        rows.append(("export prov-json (writer only)", f"{seconds:.2f} s", f"{records / seconds:,.0f} records/s"))

        log("bundle ...")
        bundle = root / "ledger.bundle"
        started = time.perf_counter()
        write_bundle(DirectorySource(ledger), bundle, 0, None)
        write_s = time.perf_counter() - started
        started = time.perf_counter()
        verify_bundle(bundle, key)
        rows.append(("bundle write / verify", f"{write_s:.2f} s / {time.perf_counter() - started:.2f} s",
                     f"{bundle.stat().st_size / 1e6:.1f} MB, one file"))
        middle = blocks // 2
        started = time.perf_counter()
        proof = proofs.build_inclusion(DirectorySource(ledger).read, middle, 1)
        build_s = time.perf_counter() - started
        started = time.perf_counter()
        checked = proofs.check(proof, key)
        check_s = time.perf_counter() - started
        rows.append(("inclusion proof build / check", f"{build_s:.2f} s / {check_s * 1000:.1f} ms",
                     f"{len(proof):,} bytes, record {checked.index} of block {checked.height}"))
        width = max(len(r[0]) for r in rows)
        print(f"tomq ledger audit benchmark ({os.cpu_count()} cores, repeats {args.repeats})")
        for name, value, note in rows:
            print(f"  {name:<{width}}  {value:>14}  {note}")
        return 0
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
