"""What a certified ledger block committed, as records: `block_records`.

The proposer (is my record committed? is this datum?) and the device registry (who joined, who
left?) both read the blocks the ledger publishes on ledger/block/<height>; this is where their
envelopes are opened. An envelope is only decoded, not verified again: the ledger checked it
before committing the block.

What this module must never do: raise on a malformed record (one bad record must not hide the rest
of the block), or decide what a record means (its callers do).
"""

from __future__ import annotations

from tomq import canonical
from tomq.errors import InvalidRecord
from tomq.node.ledger.block import Block
from tomq.records import Record, from_map


def block_records(block: Block) -> list[tuple[int, str, int, Record]]:
    """(index, proposer id, seq, record) for every well-formed record of a committed block."""
    out = []
    for index, envelope in enumerate(block.records):
        try:
            signed, _ = canonical.decode(envelope, check_canonical=False)
            fields = canonical.decode(signed, check_canonical=False)
            out.append((index, str(fields["from"]), int(fields["seq"]), from_map(fields["body"])))
        except (canonical.CanonicalDecodeError, InvalidRecord, KeyError, TypeError, ValueError):
            continue
    return out
