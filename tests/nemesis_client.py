"""The nemesis runs' client: proposes readings at a steady rate and writes down what was acknowledged.

    python tests/nemesis_client.py CLUSTER_DIR --as n1 --rate 20 --out acks.jsonl --stop-file STOP

It runs as its own process (in its own network namespace in the test bed), so faults cut it off the
way they would cut off a real client. One line per acknowledged record goes to `--out` as soon as
the client sees the certified block that holds it (`ledger/block/<h>`, which every node publishes):

    {"id": "reading:17", "proposer": "<identity id>", "sent": 1764090000.12, "acked": 1764090000.31, "seals": 1}

`sent` is when the record was first proposed, `acked` when its commit was seen (this machine's
clock; the client never runs under a faked clock). A record not acknowledged within 1 s is sealed
again with a new sequence number and proposed again (then after 2, 4, 8 s): the ledger takes a
proposer's records only in rising sequence order, so the old envelope cannot be re-sent, and Table
II refuses a second PROV-DATA for one datum, so a record never commits twice. Once STOP exists the
client stops proposing new records, keeps retrying the outstanding ones for `--drain` seconds, then
writes {"unacknowledged": [...], "proposed": N} as its last line and exits.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tomq import canonical
from tomq.node.cli import Proposer
from tomq.records import DATA, ID_CREATE, Identity, Provenance, Record


def reading(i: int, sensor: str) -> dict:
    digest = hashlib.sha256(f"nemesis reading {i}".encode()).digest()
    return Record(DATA, Provenance(f"reading:{i}", digest, f"sample:{sensor}", "collect:c1", source=sensor),
                  int(time.time() * 1000)).to_map()


class Outstanding:
    """One proposed record: every sequence number it was sealed with, and when to try again."""

    def __init__(self, record_id: str, body: dict, seq: int, now: float) -> None:
        self.record_id = record_id
        self.body = body
        self.seqs = [seq]
        self.sent = now
        self.interval = 1.0
        self.retry_at = now + self.interval


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("directory")
    parser.add_argument("--as", dest="as_name", default="n1")
    parser.add_argument("--sensor", default="s1")
    parser.add_argument("--rate", type=float, default=20.0, help="records proposed per second")
    parser.add_argument("--out", required=True)
    parser.add_argument("--stop-file", required=True)
    parser.add_argument("--drain", type=float, default=60.0)
    args = parser.parse_args(argv)

    proposer = Proposer(args.directory, args.as_name)
    stop_file = Path(args.stop_file)
    out = open(args.out, "a", buffering=1)
    outstanding: dict[int, Outstanding] = {}  # first seq -> record
    proposed = 0

    def propose(record_id: str, body: dict) -> None:
        wire, seq = proposer.seal(body)
        outstanding[seq] = Outstanding(record_id, body, seq, time.time())
        proposer.propose(wire)

    def settle(now: float) -> None:
        with proposer._changed:
            committed = set(proposer.committed)
        for first, item in list(outstanding.items()):
            if any((proposer.key.id, seq) in committed for seq in item.seqs):
                out.write(json.dumps({"id": item.record_id, "proposer": proposer.key.id, "sent": round(item.sent, 3),
                                      "acked": round(now, 3), "seals": len(item.seqs)}) + "\n")
                del outstanding[first]
            elif now >= item.retry_at:
                item.interval = min(item.interval * 2, 8.0)
                item.retry_at = now + item.interval
                wire, seq = proposer.seal(item.body)
                item.seqs.append(seq)
                proposer.propose(wire)

    certificate = (Path(args.directory) / "members" / args.sensor / "cert.cbor").read_bytes()
    canonical.decode(certificate, check_canonical=False)  # a broken cluster directory fails here, loudly
    propose(f"join:{args.sensor}",
            Record(ID_CREATE, Identity(args.sensor, "device", certificate), int(time.time() * 1000)).to_map())
    started = time.monotonic()
    while not stop_file.exists():
        due = int((time.monotonic() - started) * args.rate)
        joined = not any(item.record_id.startswith("join:") for item in outstanding.values())
        while joined and proposed < due:  # readings only once the sensor's join is committed
            propose(f"reading:{proposed}", reading(proposed, args.sensor))
            proposed += 1
        settle(time.time())
        time.sleep(0.02)
    deadline = time.monotonic() + args.drain
    while outstanding and time.monotonic() < deadline:
        settle(time.time())
        time.sleep(0.05)
    out.write(json.dumps({"unacknowledged": sorted(item.record_id for item in outstanding.values()),
                          "proposed": proposed}) + "\n")
    out.close()
    proposer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
