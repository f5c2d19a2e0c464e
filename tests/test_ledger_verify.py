"""`tomq ledger verify` against real small ledgers: a cluster from `tomq.cluster.init`, its genesis
block, then blocks proposed by n1 and certified by n1 and n2, with the records a day of a smart-city
cluster produces (DESIGN §4; the pattern's §VI scenario: a car joins, sends data, a collector runs).
Every way of breaking a ledger must be caught at the height where it happens.
"""

from __future__ import annotations

import hashlib
import shutil
from collections import Counter
from pathlib import Path

import pytest

from keys import NOW
from tomq import canonical, cluster
from tomq.cluster import Cluster
from tomq.errors import ConfigError
from tomq.identity import SigningKey
from tomq.node.ledger import cli as ledger_cli
from tomq.node.ledger.block import (
    BlockFile,
    block_file_name,
    commit_signature,
    decode_block_file,
    encode_block_file,
    make_block,
    sign_block,
)
from tomq.node.ledger.genesis import genesis_block, make_genesis
from tomq.node.ledger.verify import ChainVerifier, LedgerInvalid, verify_ledger
from tomq.records import DATA, ID_CREATE, ID_DELETE, ORCH, Identity, Orchestrate, Provenance, Record
from tomq.wire import seal

NODES = ["n1", "n2", "n3"]
DAY_MS = 86_400_000
START_MS = NOW * 1000  # certificates are issued at NOW; blocks follow one second apart


class LedgerBuilder:
    """Writes a ledger the way the cluster would: sealed records, signed blocks, commit certificates."""

    def __init__(self, root: Path) -> None:
        self.cluster_dir = root / "cluster"
        cluster.init(self.cluster_dir, NODES, cluster_name="city", now=NOW)
        cluster.add_member(self.cluster_dir, "s1", "sensor", now=NOW)
        self.cluster: Cluster = cluster.load(self.cluster_dir)
        self.operator = SigningKey.load(self.cluster_dir / "operator" / "operator.key")
        self.keys = {member.name: self.cluster.signing_key(member.name) for member in self.cluster.members}
        self.ledger = root / "ledger"
        self.ledger.mkdir()
        self.seq: Counter[str] = Counter()
        self.height = -1
        self.prev = b""
        self.term = 1  # the term of the last block written; later blocks keep it unless told otherwise

    def cert(self, name: str) -> bytes:
        return (self.cluster_dir / "members" / name / "cert.cbor").read_bytes()

    def genesis(self) -> bytes:
        data = make_genesis(self.cluster, self.operator, START_MS)
        self.seq["<operator>"] = len(NODES)
        written = self._write(0, data)
        self.term = 1
        return written

    def seal(self, signer: str, record: Record, *, seq: int | None = None, key: SigningKey | None = None) -> bytes:
        if seq is None:
            self.seq[signer] += 1
            seq = self.seq[signer]
        key = key or (self.operator if signer == "<operator>" else self.keys[signer])
        return seal(key, seq=seq, time_ms=START_MS + self.height * 1000, type="record", body=record.to_map())

    def block(self, envelopes: list[bytes], *, proposer: str = "n1", signers: tuple[str, ...] = ("n1", "n2"),
              term: int | None = None, time_ms: int | None = None, proposer_key: SigningKey | None = None,
              extra_signatures: dict[str, bytes] | None = None) -> bytes:
        height = self.height + 1
        key = proposer_key or self.keys[proposer]
        block = make_block(height=height, prev=self.prev, term=self.term if term is None else term,
                           time_ms=START_MS + height * 1000 if time_ms is None else time_ms,
                           proposer=key.id, records=envelopes)
        certificate = {self.keys[name].id: commit_signature(self.keys[name], block.hash) for name in signers}
        certificate.update(extra_signatures or {})
        return self._write(height, encode_block_file(BlockFile(block, sign_block(key, block), certificate)))

    def _write(self, height: int, data: bytes) -> bytes:
        (self.ledger / block_file_name(height)).write_bytes(data)
        self.height = height
        block = decode_block_file(data).block
        self.prev, self.term = block.hash, block.term
        return data


def reading(data_id: str, source: str = "s1") -> Record:
    payload_hash = hashlib.sha256(data_id.encode()).digest()
    return Record(DATA, Provenance(data_id, payload_hash, f"sample:{source}", "collect:collector-0", source=source,
                                   source_signature=b"\x07" * 64), START_MS)


def identity(state: str, name: str, kind: str, proof: bytes, attributed_to: str | None = None) -> Record:
    return Record(state, Identity(name, kind, proof, attributed_to), START_MS)


def orchestrate(action: str, deployed: str, location: str) -> Record:
    return Record(ORCH, Orchestrate(deployed, location, action, {"n1": 0.5, "n2": 0.1}), START_MS)


def build_standard(builder: LedgerBuilder) -> None:
    """Six blocks: genesis; s1 joins; two readings; a collector is placed and uses a reading; the
    collector leaves and is removed; s1 leaves."""
    b = builder
    b.genesis()
    b.block([b.seal("n1", identity(ID_CREATE, "s1", "device", b.cert("s1")))])
    b.block([b.seal("n1", reading("reading:1")), b.seal("n2", reading("reading:2"))])
    b.block([
        b.seal("n1", identity(ID_CREATE, "collector-0", "container", b"sha256:image-digest", attributed_to="n2")),
        b.seal("n1", orchestrate("place", "collector-0", "n2")),
        b.seal("n1", orchestrate("execute", "reading:1", "collect:collector-0")),
    ], term=2)
    b.block([
        b.seal("n2", identity(ID_DELETE, "collector-0", "container", b"sha256:image-digest")),
        b.seal("n1", orchestrate("remove", "collector-0", "n2")),
    ], term=2)
    b.block([b.seal("n1", identity(ID_DELETE, "s1", "device", b.cert("s1")))], proposer="n1", signers=("n2", "n3"),
            term=3)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("standard")
    build_standard(LedgerBuilder(root))
    return root


@pytest.fixture
def standard(template: Path, tmp_path: Path) -> Path:
    """A private copy of the standard ledger; returns the ledger directory."""
    shutil.copytree(template, tmp_path / "copy")
    return tmp_path / "copy" / "ledger"


@pytest.fixture
def builder(tmp_path: Path) -> LedgerBuilder:
    return LedgerBuilder(tmp_path)


def operator_of(ledger: Path) -> SigningKey:
    return SigningKey.load(ledger.parent / "cluster" / "operator" / "operator.key")


def fails_at(ledger: Path, operator: SigningKey | None = None) -> LedgerInvalid:
    with pytest.raises(LedgerInvalid) as caught:
        verify_ledger(ledger, (operator or operator_of(ledger)).public_key)
    assert "\n" not in str(caught.value)
    return caught.value


# --- The valid ledger ------------------------------------------------------------------------------

def test_a_valid_ledger_verifies_with_counts(standard: Path):
    report = verify_ledger(standard, operator_of(standard).public_key)
    assert report.blocks == 6 and report.head_height == 5
    assert report.records == 12
    assert report.records_by_state == {ID_CREATE: 5, ID_DELETE: 2, DATA: 2, ORCH: 3}
    assert report.head_hash == decode_block_file((standard / block_file_name(5)).read_bytes()).block.hash
    assert report.nodes == ("n1", "n2", "n3")
    assert report.members == 3 and report.data_left == 2
    assert report.summary().startswith("ledger ok: 6 blocks (heights 0..5), 12 records (PROV-ID-create 5, ")


def test_genesis_holds_the_operator_sealed_node_certificates(builder: LedgerBuilder):
    data = builder.genesis()
    block_file = decode_block_file(data)
    block = block_file.block
    assert (block.height, block.prev, block.term, block.proposer) == (0, bytes(32), 0, builder.operator.id)
    assert list(block_file.commit_certificate) == [builder.operator.id]
    # The operator has no membership certificate, so read the envelopes' fields directly.
    outer = [canonical.decode(canonical.decode(envelope)[0]) for envelope in block.records]
    assert [(fields["from"], fields["seq"], fields["type"]) for fields in outer] == [
        (builder.operator.id, 1, "record"), (builder.operator.id, 2, "record"), (builder.operator.id, 3, "record")]
    bodies = [fields["body"] for fields in outer]
    assert [(b["state"], b["identity"]["object"], b["identity"]["kind"]) for b in bodies] == [
        (ID_CREATE, name, "node") for name in NODES]
    assert [b["identity"]["proof"] for b in bodies] == [builder.cert(name) for name in NODES]
    report = verify_ledger(builder.ledger, builder.operator.public_key)
    assert report.blocks == 1 and report.nodes == tuple(NODES)


def test_genesis_refuses_a_key_that_is_not_the_operator(builder: LedgerBuilder):
    with pytest.raises(ConfigError, match="is not the operator"):
        make_genesis(builder.cluster, builder.keys["n1"], START_MS)


def test_genesis_refuses_a_certificate_that_is_not_a_node(builder: LedgerBuilder):
    with pytest.raises(ConfigError, match="s1 is certified as sensor"):
        genesis_block(builder.operator, [builder.cert("n1"), builder.cert("s1")], START_MS)


# --- Tampering -------------------------------------------------------------------------------------

def test_changing_any_single_byte_fails_at_that_height(standard: Path):
    operator = operator_of(standard)
    for height in range(6):
        path = standard / block_file_name(height)
        original = path.read_bytes()
        # Every byte of the small genesis header region, then an even spread over the rest of the file.
        positions = sorted(set(range(0, min(40, len(original)))) | set(range(0, len(original), max(1, len(original) // 40)))
                           | {len(original) - 1})
        for position in positions:
            for flip in (0x01, 0x80):
                changed = bytearray(original)
                changed[position] ^= flip
                path.write_bytes(bytes(changed))
                failure = fails_at(standard, operator)
                assert failure.height == height, (height, position, str(failure))
        path.write_bytes(original)
    assert verify_ledger(standard, operator.public_key).blocks == 6  # and the restored ledger is fine again


def test_deleting_a_middle_block_fails_naming_it(standard: Path):
    (standard / block_file_name(3)).unlink()
    failure = fails_at(standard)
    assert failure.height == 3
    assert str(failure) == "ledger invalid at height 3: block file 000000000003.block is missing (blocks up to 5 exist)"


def test_a_block_under_another_height_s_name_fails(standard: Path):
    (standard / block_file_name(2)).write_bytes((standard / block_file_name(3)).read_bytes())
    failure = fails_at(standard)
    assert failure.height == 2 and "000000000002.block holds block 3" in str(failure)


def test_swapping_a_block_for_a_validly_signed_fork_breaks_the_link_after_it(standard: Path):
    # A node with a key rewrites block 2 and certifies it itself: block 2 verifies in isolation (it
    # has n1+n2 signatures), but block 3's prev no longer matches.
    builder_keys = {name: cluster.load(standard.parent / "cluster").signing_key(name) for name in ("n1", "n2")}
    original = decode_block_file((standard / block_file_name(2)).read_bytes()).block
    forged = make_block(height=2, prev=original.prev, term=original.term, time_ms=original.time_ms,
                        proposer=original.proposer, records=original.records[:1])
    certificate = {key.id: commit_signature(key, forged.hash) for key in builder_keys.values()}
    (standard / block_file_name(2)).write_bytes(
        encode_block_file(BlockFile(forged, sign_block(builder_keys["n1"], forged), certificate)))
    failure = fails_at(standard)
    assert failure.height == 3 and "prev" in str(failure)


def test_wrong_operator_key_fails_at_height_0(standard: Path):
    failure = fails_at(standard, SigningKey.generate())
    assert failure.height == 0 and "genesis must be proposed by the operator" in str(failure)


def test_empty_directory_has_no_genesis(tmp_path: Path):
    failure = fails_at(tmp_path, SigningKey.generate())
    assert failure.height == 0 and "no genesis block" in str(failure)


def test_temporaries_and_other_files_are_ignored_but_misnamed_blocks_are_not(standard: Path):
    (standard / ".000000000006.block.123.abcd.tmp").write_bytes(b"half a block")
    (standard / "blobs").mkdir()
    (standard / "README").write_text("ledger")
    assert verify_ledger(standard, operator_of(standard).public_key).blocks == 6
    (standard / "6.block").write_bytes(b"")
    failure = fails_at(standard)
    assert failure.height is None and str(failure) == "ledger invalid: 6.block is not named <height as 12 digits>.block"


# --- Commit certificates and proposers ----------------------------------------------------------------

def test_a_certificate_from_one_of_three_nodes_fails(builder: LedgerBuilder):
    build_standard(builder)
    builder.block([builder.seal("n1", reading("reading:3", "n3"))], signers=("n1",))
    failure = fails_at(builder.ledger, builder.operator)
    assert str(failure) == ("ledger invalid at height 6: commit certificate has 1 valid signature(s) of the 3 "
                            "node(s) joined at this height; a majority needs 2")


def test_unknown_signers_are_ignored_and_do_not_make_a_majority(builder: LedgerBuilder):
    builder.genesis()
    stranger = SigningKey.generate()
    fake = {stranger.id: b"\x01" * 64}
    builder.block([], signers=("n1", "n2"), extra_signatures=fake)  # ignored: still n1 + n2
    assert verify_ledger(builder.ledger, builder.operator.public_key).blocks == 2
    builder.block([], signers=("n1",), extra_signatures={stranger.id: b"\x01" * 64})
    failure = fails_at(builder.ledger, builder.operator)
    assert failure.height == 2 and "1 valid signature(s)" in str(failure)


def test_a_commit_signature_by_an_unknown_key_under_a_node_s_id_fails(builder: LedgerBuilder):
    builder.genesis()
    stranger = SigningKey.generate()
    block = make_block(height=1, prev=builder.prev, term=1, time_ms=START_MS + 1000, proposer=builder.keys["n1"].id,
                       records=[])
    certificate = {builder.keys["n1"].id: commit_signature(builder.keys["n1"], block.hash),
                   builder.keys["n2"].id: commit_signature(stranger, block.hash)}
    builder._write(1, encode_block_file(BlockFile(block, sign_block(builder.keys["n1"], block), certificate)))
    failure = fails_at(builder.ledger, builder.operator)
    assert str(failure) == f"ledger invalid at height 1: commit signature of n2 ({builder.keys['n2'].id}) does not verify"


def test_a_block_proposed_by_an_unknown_key_fails(builder: LedgerBuilder):
    builder.genesis()
    stranger = SigningKey.generate()
    builder.block([], proposer_key=stranger)
    failure = fails_at(builder.ledger, builder.operator)
    assert failure.height == 1 and f"proposer {stranger.id} is not a node joined at this height (n1, n2, n3)" in str(failure)


def test_a_record_sealed_by_an_unknown_key_fails(builder: LedgerBuilder):
    builder.genesis()
    stranger = SigningKey.generate()
    builder.block([builder.seal("n1", identity(ID_CREATE, "s1", "device", builder.cert("s1")), key=stranger)])
    failure = fails_at(builder.ledger, builder.operator)
    assert failure.height == 1 and f"record 0: sender {stranger.id} has no membership certificate" in str(failure)


def test_a_forged_proposer_signature_fails(builder: LedgerBuilder):
    builder.genesis()
    block = make_block(height=1, prev=builder.prev, term=1, time_ms=START_MS + 1000, proposer=builder.keys["n1"].id,
                       records=[])
    certificate = {builder.keys[n].id: commit_signature(builder.keys[n], block.hash) for n in ("n1", "n2")}
    builder._write(1, encode_block_file(BlockFile(block, sign_block(builder.keys["n2"], block), certificate)))
    failure = fails_at(builder.ledger, builder.operator)
    assert failure.height == 1 and "proposer signature of n1" in str(failure)


def test_membership_changes_take_effect_from_the_next_block(builder: LedgerBuilder):
    cluster.add_member(builder.cluster_dir, "n4", "node", now=NOW)
    builder.keys["n4"] = cluster.load(builder.cluster_dir).signing_key("n4")
    builder.genesis()
    builder.block([builder.seal("n1", identity(ID_CREATE, "n4", "node", builder.cert("n4")))])  # 2 of 3 suffice
    builder.block([], proposer="n4", signers=("n1", "n2", "n4"))  # now 3 of 4 are needed, and n4 may propose
    assert verify_ledger(builder.ledger, builder.operator.public_key).nodes == ("n1", "n2", "n3", "n4")
    builder.block([], signers=("n1", "n2"))
    failure = fails_at(builder.ledger, builder.operator)
    assert failure.height == 3 and "2 valid signature(s) of the 4 node(s)" in str(failure)


def test_a_node_that_left_can_neither_propose_nor_count(builder: LedgerBuilder):
    builder.genesis()
    builder.block([builder.seal("n1", identity(ID_DELETE, "n3", "node", builder.cert("n3")))])
    builder.block([], signers=("n1", "n2"))  # 2 of the remaining 2
    assert verify_ledger(builder.ledger, builder.operator.public_key).nodes == ("n1", "n2")
    builder.block([], proposer="n3", signers=("n1", "n2", "n3"))
    failure = fails_at(builder.ledger, builder.operator)
    assert failure.height == 3 and "is not a node joined at this height (n1, n2)" in str(failure)


def test_a_proposer_whose_certificate_expired_fails(builder: LedgerBuilder):
    builder.genesis()
    builder.block([], time_ms=START_MS + 400 * DAY_MS)
    failure = fails_at(builder.ledger, builder.operator)
    assert failure.height == 1 and "certificate of proposer n1 is not valid at the block's time" in str(failure)


def test_a_decreasing_raft_term_fails(builder: LedgerBuilder):
    builder.genesis()
    builder.block([], term=5)
    builder.block([], term=4)
    failure = fails_at(builder.ledger, builder.operator)
    assert failure.height == 2 and "term 4 is below" in str(failure)


# --- Records -------------------------------------------------------------------------------------------

def test_a_record_illegal_by_table_ii_fails_naming_the_rule(standard: Path):
    builder_cluster = cluster.load(standard.parent / "cluster")
    keys = {n: builder_cluster.signing_key(n) for n in ("n1", "n2")}
    head = decode_block_file((standard / block_file_name(5)).read_bytes()).block
    # s1 left at height 5; a reading from it at height 6 is illegal.
    envelope = seal(keys["n1"], seq=100, time_ms=START_MS, type="record", body=reading("reading:9").to_map())
    block = make_block(height=6, prev=head.hash, term=3, time_ms=START_MS + 6000, proposer=keys["n1"].id,
                       records=[envelope])
    certificate = {key.id: commit_signature(key, block.hash) for key in keys.values()}
    (standard / block_file_name(6)).write_bytes(encode_block_file(BlockFile(block, sign_block(keys["n1"], block), certificate)))
    failure = fails_at(standard)
    assert str(failure) == ("ledger invalid at height 6: record 0: from n1: cannot leave-data reading:9: "
                            "source s1 has not joined")


def test_a_replayed_record_fails(builder: LedgerBuilder):
    build_standard(builder)
    placement = builder.seal("n1", orchestrate("place", "collector-1", "n3"))
    builder.block([placement])
    assert verify_ledger(builder.ledger, builder.operator.public_key).blocks == 7
    builder.block([placement])  # the same envelope again: legal by Table II, but a replay
    failure = fails_at(builder.ledger, builder.operator)
    assert failure.height == 7 and "record 0: envelope" in str(failure) and "high-water mark" in str(failure)


def test_sequence_numbers_must_increase_within_a_block_too(builder: LedgerBuilder):
    builder.genesis()
    later = builder.seal("n1", orchestrate("place", "collector-0", "n2"), seq=5)
    earlier = builder.seal("n1", orchestrate("place", "collector-1", "n2"), seq=4)
    builder.block([later, earlier])
    failure = fails_at(builder.ledger, builder.operator)
    assert failure.height == 1 and failure.reason.startswith("record 1: envelope 4 from n1")


def test_a_record_proposed_by_a_sensor_fails(builder: LedgerBuilder):
    builder.genesis()
    builder.block([builder.seal("n1", identity(ID_CREATE, "s1", "device", builder.cert("s1")))])
    builder.block([builder.seal("s1", reading("reading:1"))])
    failure = fails_at(builder.ledger, builder.operator)
    assert failure.height == 2 and "proposer s1 is a device" in str(failure)


@pytest.mark.parametrize("record, message", [
    (lambda b: identity(ID_CREATE, "s2", "device", b.cert("s1")), "id-proof of s2 certifies s1"),
    (lambda b: identity(ID_CREATE, "s1", "node", b.cert("s1")), "id-proof of s1 certifies a sensor, not a node"),
    (lambda b: identity(ID_CREATE, "s1", "device", b"not a certificate"), "id-proof of s1 is not a certificate"),
])
def test_an_identity_must_carry_its_own_certificate(builder: LedgerBuilder, record, message):
    builder.genesis()
    builder.block([builder.seal("n1", record(builder))])
    failure = fails_at(builder.ledger, builder.operator)
    assert failure.height == 1 and message in str(failure)


def test_a_malformed_record_body_fails(builder: LedgerBuilder):
    builder.genesis()
    envelope = seal(builder.keys["n1"], seq=1, time_ms=START_MS, type="record", body={"state": "PROV-MAGIC"})
    builder.block([envelope])
    failure = fails_at(builder.ledger, builder.operator)
    assert failure.height == 1 and "record 0: from n1: record needs a state" in str(failure)


def test_an_envelope_of_another_type_is_not_a_record(builder: LedgerBuilder):
    builder.genesis()
    body = identity(ID_CREATE, "s1", "device", builder.cert("s1")).to_map()
    builder.block([seal(builder.keys["n1"], seq=1, time_ms=START_MS, type="reading", body=body)])
    failure = fails_at(builder.ledger, builder.operator)
    assert failure.height == 1 and "envelope type 'reading' is not accepted" in str(failure)


def test_the_verifier_stays_failed(builder: LedgerBuilder):
    data = builder.genesis()
    verifier = ChainVerifier(SigningKey.generate().public_key)
    with pytest.raises(LedgerInvalid) as first:
        verifier.add(0, data)
    with pytest.raises(LedgerInvalid) as second:
        verifier.add(0, data)
    assert second.value is first.value


def test_a_node_checks_a_block_before_its_certificate_exists(builder: LedgerBuilder):
    genesis = builder.genesis()
    uncertified = builder.block([builder.seal("n1", identity(ID_CREATE, "s1", "device", builder.cert("s1")))], signers=())
    verifier = ChainVerifier(builder.operator.public_key)
    verifier.add(0, genesis)
    assert verifier.add(1, uncertified, require_certificate=False).block.height == 1
    auditor = ChainVerifier(builder.operator.public_key)
    auditor.add(0, genesis)
    with pytest.raises(LedgerInvalid, match="0 valid signature"):
        auditor.add(1, uncertified)


def test_a_failed_block_changes_nothing_and_a_node_can_go_on_after_it(builder: LedgerBuilder):
    cluster.add_member(builder.cluster_dir, "svc", "service", now=NOW)
    builder.keys["svc"] = cluster.load(builder.cluster_dir).signing_key("svc")
    genesis = builder.genesis()
    join_service = builder.seal("n1", identity(ID_CREATE, "svc", "service", builder.cert("svc")))
    from_service = builder.seal("svc", orchestrate("place", "collector-0", "n2"))
    illegal = builder.seal("n1", identity(ID_DELETE, "ghost", "device", b"proof"))
    bad = builder.block([join_service, from_service, illegal])
    verifier = ChainVerifier(builder.operator.public_key)
    verifier.add(0, genesis)
    before = (verifier.report(), verifier.high_water(builder.keys["n1"].id), verifier.trust.by_name("svc"))
    with pytest.raises(LedgerInvalid, match="record 2: from n1: cannot leave-device ghost"):
        verifier.add(1, bad)
    with pytest.raises(LedgerInvalid):
        verifier.add(1, bad)  # sticky until reset
    assert verifier.reset_failure() is verifier
    assert (verifier.report(), verifier.high_water(builder.keys["n1"].id), verifier.trust.by_name("svc")) == before
    # The same two good envelopes (same sequence numbers) in another block at the same height now pass.
    builder.height, builder.prev = 0, decode_block_file(genesis).block.hash
    good = builder.block([join_service, from_service])
    verifier.add(1, good)
    assert verifier.state.member("svc") is not None and verifier.report().records_by_state[ORCH] == 1
    assert verifier.high_water(builder.keys["svc"].id) == 1


def test_a_node_can_check_blocks_as_they_arrive(standard: Path):
    verifier = ChainVerifier(operator_of(standard).public_key)
    for height in range(6):
        verifier.add(height, (standard / block_file_name(height)).read_bytes())
        assert verifier.height == height
    assert verifier.report() == verify_ledger(standard, operator_of(standard).public_key)
    assert not verifier.state.joined("s1") and verifier.state.has_left("reading:2")


# --- The command line --------------------------------------------------------------------------------

def test_cli_verifies_with_a_hex_key(standard: Path, capsys: pytest.CaptureFixture[str]):
    key = operator_of(standard).public_key.hex()
    assert ledger_cli.main(["verify", str(standard), "--operator-key", key]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ledger ok: 6 blocks") and out.count("\n") == 1


def test_cli_reads_the_key_from_operator_pub(standard: Path, capsys: pytest.CaptureFixture[str]):
    pub = standard.parent / "cluster" / "operator" / "operator.pub"
    assert ledger_cli.main(["verify", str(standard), "--operator-key", str(pub)]) == 0
    assert "12 records" in capsys.readouterr().out


def test_cli_reports_the_first_problem_and_exits_1(standard: Path, capsys: pytest.CaptureFixture[str]):
    (standard / block_file_name(3)).unlink()
    pub = standard.parent / "cluster" / "operator" / "operator.pub"
    assert ledger_cli.main(["verify", str(standard), "--operator-key", str(pub)]) == 1
    assert capsys.readouterr().out == (
        "ledger invalid at height 3: block file 000000000003.block is missing (blocks up to 5 exist)\n")


def test_cli_refuses_a_key_that_is_neither_hex_nor_a_file(standard: Path, capsys: pytest.CaptureFixture[str]):
    assert ledger_cli.main(["verify", str(standard), "--operator-key", "nope"]) == 2
    assert "neither 64 hex digits nor a readable file" in capsys.readouterr().err


def test_cli_registers_under_an_existing_parser():
    import argparse

    parser = argparse.ArgumentParser(prog="tomq")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("init")
    ledger_actions = ledger_cli.register(commands)
    ledger_actions.add_parser("tail")  # other ledger commands can join the same group
    args = parser.parse_args(["ledger", "verify", "some/dir", "--operator-key", "ab" * 32])
    assert (args.command, args.ledger_command, args.path) == ("ledger", "verify", "some/dir")
    assert callable(args.run)
    assert parser.parse_args(["ledger", "tail"]).ledger_command == "tail"


def test_only_a_block_made_here_skips_the_proposer_signature_check(builder: LedgerBuilder):
    """A leader applying its own block (signed_here with its decoded copy) does not check its own
    signature again; bytes from anywhere else always are checked, whatever the caller claims."""
    genesis = builder.genesis()
    n1, n2 = builder.keys["n1"], builder.keys["n2"]
    block = make_block(height=1, prev=builder.prev, term=1, time_ms=START_MS + 1000, proposer=n1.id,
                       records=[builder.seal("n1", identity(ID_CREATE, "s1", "device", builder.cert("s1")))])
    forged = BlockFile(block, sign_block(n2, block), {})  # n1's block, n2's signature
    data = encode_block_file(forged)

    def verifier() -> ChainVerifier:
        chain = ChainVerifier(builder.cluster.operator)
        chain.add(0, genesis)
        return chain

    with pytest.raises(LedgerInvalid, match=r"proposer signature of n1 .* does not verify"):
        verifier().add(1, data, require_certificate=False)
    with pytest.raises(LedgerInvalid, match=r"proposer signature of n1 .* does not verify"):
        verifier().add(1, data, require_certificate=False, signed_here=True)  # no decoded copy: checked
    assert verifier().add(1, data, require_certificate=False, decoded=forged, signed_here=True).block.height == 1
    with pytest.raises(LedgerInvalid, match="prev"):  # everything but our own signature is still checked
        wrong_prev = make_block(height=1, prev=b"\1" * 32, term=1, time_ms=START_MS + 1000, proposer=n1.id,
                                records=block.records)
        mine = BlockFile(wrong_prev, sign_block(n1, wrong_prev), {})
        verifier().add(1, encode_block_file(mine), require_certificate=False, decoded=mine, signed_here=True)
