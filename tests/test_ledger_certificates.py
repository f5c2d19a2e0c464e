"""A certificate that arrives in a committed Raft entry is checked before the block counts as
certified: a majority of the nodes, every signature theirs and valid (node/ledger_service.py).

A real node daemon and ledger service on a real cluster directory, driven by committed entries the
way Raft applies them; no broker is needed because nothing here leaves the node."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from tomq import canonical, cluster
from tomq.mqtt import wait_until
from tomq.node.cli import write_genesis
from tomq.node.daemon import NodeDaemon
from tomq.node.ledger.block import (
    BlockFile,
    block_file_name,
    commit_signature,
    decode_block_file,
    encode_block_file,
    make_block,
    sign_block,
)
from tomq.node.ledger_service import LedgerService
from tomq.node.raft.core import Role
from tomq.node.raft.types import Entry
from tomq.records import ID_CREATE, Identity, Record
from tomq.wire import seal


def ledger_node(tmp_path: Path, name: str) -> NodeDaemon:
    """Node `name` of a fresh 3-node cluster (with sensor s1 enrolled), with its ledger service."""
    directory = tmp_path / "cluster"
    cluster.init(directory, ["n1", "n2", "n3"])
    cluster.add_member(directory, "s1", "sensor")
    write_genesis(directory)
    return NodeDaemon(directory, name, lambda n: LedgerService(n))


@pytest.fixture
def follower(tmp_path: Path):
    node = ledger_node(tmp_path, "n2")
    yield node, node.applier, cluster.load(node.cluster.directory)
    node.applier.close()


def committed_block(ledger: LedgerService, loaded: cluster.Cluster, index: int) -> tuple[bytes, Entry]:
    """Block 1 by leader n1: the sensor s1 joins. Returns its hash and the Raft entry carrying it."""
    n1 = loaded.signing_key("n1")
    proof = (loaded.directory / "members" / "s1" / "cert.cbor").read_bytes()
    now = int(time.time() * 1000)
    envelope = seal(n1, seq=1, time_ms=now, type="record",
                    body=Record(ID_CREATE, Identity("s1", "device", proof), now).to_map())
    block = make_block(height=1, prev=ledger.verifier.head_hash, term=2, time_ms=now, proposer=n1.id,
                       records=(envelope,))
    data = encode_block_file(BlockFile(block, sign_block(n1, block), {}))
    return block.hash, Entry(term=2, index=index, data=canonical.encode({"t": "block", "file": data}))


def cert_entry(index: int, digest: bytes, signatures: dict[str, bytes]) -> Entry:
    return Entry(term=2, index=index, data=canonical.encode({"t": "cert", "certs": [[1, digest, signatures]]}))


def test_forged_or_short_certificates_leave_the_block_uncertified_and_a_valid_one_certifies_it(follower, caplog):
    _node, ledger, loaded = follower
    n1, n3 = loaded.signing_key("n1"), loaded.signing_key("n3")
    digest, block_entry = committed_block(ledger, loaded, index=3)
    ledger.apply(block_entry)
    assert ledger.verifier.height == 1 and ledger.certified == 0

    good = {n1.id: commit_signature(n1, digest), n3.id: commit_signature(n3, digest)}
    forged = {n1.id: good[n1.id], n3.id: commit_signature(n1, digest)}  # n1 signing in n3's name
    outsider = {n1.id: good[n1.id], loaded.signing_key("s1").id: commit_signature(loaded.signing_key("s1"), digest)}
    short = "commit certificate has 1 valid signature(s) of the 3 node(s) joined at this height; a majority needs 2"
    refused = [({n1.id: good[n1.id]}, short),
               (forged, f"commit signature of n3 ({n3.id}) does not verify"),
               (outsider, short),  # a signature of someone who is not a node neither counts nor harms
               ({n1.id: good[n1.id], n3.id: "not bytes"}, "must map signer ids to 64-byte signatures"),
               # an extra signer that is not a node would be ignored, but its entry must still decode
               ({**good, "x" * 200: bytes(5)}, "must map signer ids to 64-byte signatures")]
    with caplog.at_level(logging.ERROR, logger="tomq.ledger"):
        for index, (signatures, reason) in enumerate(refused, start=4):
            caplog.clear()
            ledger.apply(cert_entry(index, digest, signatures))
            assert ledger.certified == 0, reason
            assert any("refusing the certificate of height 1" in r.getMessage() and reason in r.getMessage()
                       for r in caplog.records), caplog.text
    time.sleep(0.2)  # the block writer would have stored a certified block by now
    assert ledger.stored == 0 and not (ledger.store / block_file_name(1)).exists()

    ledger.apply(cert_entry(9, digest, good))
    assert ledger.certified == 1
    assert wait_until(lambda: ledger.stored == 1, 10, 0.02)
    stored = decode_block_file((ledger.store / block_file_name(1)).read_bytes())
    assert stored.block.hash == digest and stored.commit_certificate == good


def test_a_leader_certifies_with_its_followers_signatures_before_its_own(tmp_path: Path):
    # Every node checks each signature of a certificate but its own: with the followers' two, each
    # follower checks one; with the leader's and one follower's, the other follower checks two.
    node = ledger_node(tmp_path, "n1")
    ledger, loaded = node.applier, cluster.load(node.cluster.directory)
    try:
        n1, n2, n3 = (loaded.signing_key(name) for name in ("n1", "n2", "n3"))
        digest, block_entry = committed_block(ledger, loaded, index=3)
        ledger.apply(block_entry)
        node.raft.role = Role.LEADER  # what an election would have made it; only the choice is tested
        ledger.on_extras("n2", {"sigs": [[1, digest, commit_signature(n2, digest)]]})
        assert ledger._ready_certificates() == [[1, digest, {n1.id: commit_signature(n1, digest),
                                                             n2.id: commit_signature(n2, digest)}]]
        ledger.on_extras("n3", {"sigs": [[1, digest, commit_signature(n3, digest)]]})
        assert ledger._ready_certificates() == [[1, digest, {n2.id: commit_signature(n2, digest),
                                                             n3.id: commit_signature(n3, digest)}]]
    finally:
        ledger.close()
