"""The genesis block: how the ledger learns the cluster's first nodes from the operator alone.

Block 0 holds one PROV-ID-create record per initial node (IDENTITY object = the node's name, kind
"node", id-proof = its membership certificate), each sealed by the operator key with sequence numbers
1..n. The operator proposes the block and is its whole commit certificate. An auditor holding only the
operator public key can therefore check block 0 and, from the certificates in it, every node key that
signs later blocks.

`genesis_block` is pure. `make_genesis` reads the nodes' certificates through `tomq.cluster.Cluster`
and nothing else. Neither may write anything: putting the block in place is the caller's business
(shared_dir.py for the shared ledger directory).
"""

from __future__ import annotations

from collections.abc import Sequence

from tomq import certificate as certificates
from tomq.cluster import Cluster
from tomq.errors import ConfigError, InvalidCertificate
from tomq.identity import SigningKey
from tomq.node.ledger.block import (
    GENESIS_PREV,
    BlockFile,
    commit_signature,
    encode_block_file,
    make_block,
    sign_block,
)
from tomq.records import ID_CREATE, Identity, Record
from tomq.wire import seal

GENESIS_TERM = 0  # before any Raft election: the operator, not a leader, made this block


def genesis_block(operator: SigningKey, node_certificates: Sequence[bytes], time_ms: int) -> bytes:
    """Block 0 for the nodes whose certificates (issued by `operator`) are given, in that order."""
    if not node_certificates:
        raise ConfigError("a genesis block needs at least one node certificate")
    envelopes: list[bytes] = []
    for seq, encoded in enumerate(node_certificates, start=1):
        try:
            cert = certificates.decode(encoded, operator.public_key)
        except InvalidCertificate as exc:
            raise ConfigError(f"genesis: {exc}") from None
        if cert.role != "node":
            raise ConfigError(f"genesis: {cert.name} is certified as {cert.role}, not as a node")
        record = Record(ID_CREATE, Identity(cert.name, "node", encoded), time_ms)
        envelopes.append(seal(operator, seq=seq, time_ms=time_ms, type="record", body=record.to_map()))
    block = make_block(height=0, prev=GENESIS_PREV, term=GENESIS_TERM, time_ms=time_ms, proposer=operator.id,
                       records=envelopes)
    certificate = {operator.id: commit_signature(operator, block.hash)}
    return encode_block_file(BlockFile(block, sign_block(operator, block), certificate))


def make_genesis(cluster: Cluster, operator: SigningKey, time_ms: int) -> bytes:
    """Block 0 for every member of `cluster` whose role is node, in cluster.toml order."""
    if operator.public_key != cluster.operator:
        raise ConfigError(f"key {operator.id} is not the operator of cluster {cluster.name} ({cluster.operator.id})")
    nodes = [member.name for member in cluster.members if member.role == "node"]
    return genesis_block(operator, [cluster.certificate(name).encoded for name in nodes], time_ms)
