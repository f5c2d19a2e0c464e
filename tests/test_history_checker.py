"""The nemesis history checker (tests/history_checker.py) on real ledgers: a good history passes and
agrees with `tomq ledger verify`; every way a fault run can go wrong is reported with its own message.

Ledgers are built with tomq's own code (audit_ledger.build_city: a cluster from `tomq.cluster.init`,
sealed records, signed and certified blocks), which is fine: only the checker must not use it. Each
history is three byte-identical copies, as the nodes write them: two node stores and the shared
directory. The city ledger has heights 0..18; terms 0 (genesis), 1 (heights 1..16) and 2 (17..18).
"""

from __future__ import annotations

import ast
import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_ledger_verify import LedgerBuilder, reading

from audit_ledger import Scenario, build_city
from history_checker import Acknowledged, HistoryReport, check_history, cluster_copies, operator_key_of
from tomq import canonical
from tomq.identity import PublicKey, SigningKey
from tomq.node.ledger.block import (
    BlockFile,
    block_file_name,
    commit_signature,
    decode_block_file,
    encode_block_file,
    make_block,
    sign_block,
)
from tomq.node.ledger.verify import LedgerInvalid, verify_path
from tomq.wire import seal

TOP = 18  # the city ledger's last height
COPIES = ("n1", "n2", "shared")
READINGS_HEIGHT = 5  # the first block of readings (four, proposed by the collector)


@pytest.fixture(scope="module")
def city(tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    scenario = build_city(tmp_path_factory.mktemp("city"))
    assert scenario.builder.height == TOP
    return scenario


@dataclass
class History:
    """Three copies of the city ledger and what a client saw acknowledged."""

    copies: dict[str, Path]
    operator_key: bytes
    keys: dict[str, SigningKey]
    acknowledged: list[Acknowledged]

    def check(self, acknowledged: list[Acknowledged] | None = None,
              node_keys: dict[str, bytes] | None = None) -> HistoryReport:
        report = check_history(self.operator_key, node_keys, self.copies,
                               self.acknowledged if acknowledged is None else acknowledged)
        assert all("\n" not in problem for problem in report.problems)
        return report

    def path(self, copy: str, height: int) -> Path:
        return self.copies[copy] / block_file_name(height)

    def block_file(self, height: int, copy: str = "n1") -> BlockFile:
        return decode_block_file(self.path(copy, height).read_bytes())

    def id(self, name: str) -> str:
        return self.keys[name].id

    def envelope_with(self, height: int, data_id: str) -> bytes:
        for envelope in self.block_file(height).block.records:
            if body_of(envelope).get("prov", {}).get("data") == data_id:
                return envelope
        raise AssertionError(f"no record of {data_id} at height {height}")

    def reseal(self, envelope: bytes, seq: int = 10**9) -> bytes:
        """The same record sealed again by its sender under a new sequence number (a client's retry)."""
        fields = canonical.decode(canonical.decode(envelope)[0])
        signer = next(key for key in self.keys.values() if key.id == fields["from"])
        return seal(signer, seq=seq, time_ms=fields["t"] + 1, type="record", body=fields["body"])

    def new_reading(self, data_id: str, seq: int = 10**9) -> bytes:
        """A reading from s1 that is not on the ledger yet, proposed by the collector."""
        record = reading(data_id, "s1")
        return seal(self.keys["collector"], seq=seq, time_ms=record.time_ms, type="record",
                    body=record.to_map())

    def make(self, height: int, envelopes: list[bytes], *, proposer: str = "n1",
             signers: tuple[str, ...] = ("n1", "n2"), term: int | None = None, prev: bytes | None = None,
             time_offset_ms: int = 1000, proposer_key: SigningKey | None = None) -> bytes:
        """A block file at `height` after n1's block height-1, signed and certified by real node keys."""
        before = self.block_file(height - 1).block
        block = make_block(height=height, prev=before.hash if prev is None else prev,
                           term=before.term if term is None else term,
                           time_ms=before.time_ms + time_offset_ms, proposer=self.id(proposer),
                           records=envelopes)
        certificate = {self.id(name): commit_signature(self.keys[name], block.hash) for name in signers}
        signature = sign_block(proposer_key or self.keys[proposer], block)
        return encode_block_file(BlockFile(block, signature, certificate))

    def write(self, height: int, data: bytes, copies: tuple[str, ...] = COPIES) -> None:
        for copy in copies:
            self.path(copy, height).write_bytes(data)

    def verify(self, copy: str = "n1") -> str:
        """`tomq ledger verify` on one copy: its summary, or its one-line refusal."""
        try:
            return verify_path(self.copies[copy], PublicKey(self.operator_key)).summary()
        except LedgerInvalid as exc:
            return str(exc)


def body_of(envelope: bytes) -> dict:
    return canonical.decode(canonical.decode(envelope)[0])["body"]


@pytest.fixture
def history(city: Scenario, tmp_path: Path) -> History:
    copies = {name: Path(shutil.copytree(city.ledger, tmp_path / name)) for name in COPIES}
    keys = dict(city.builder.keys)  # a test may add a stranger's key
    acknowledged = [Acknowledged(keys["collector"].id, data_id) for data_id in city.readings]
    acknowledged += [Acknowledged(keys["analyser"].id, data_id) for data_id in city.results]
    # Commands are acknowledged by their record (content) id, the way the audit lines name them.
    acknowledged += [Acknowledged(keys["n1"].id, record_id) for _, _, _, record_id in city.commands]
    return History(copies, operator_key_of(city.builder.cluster_dir), keys, acknowledged)


def assert_problems(report: HistoryReport, *expected: str) -> None:
    """Exactly these problems, in this order, each given in full or by a fragment it contains."""
    assert len(report.problems) == len(expected), report.problems
    for problem, fragment in zip(report.problems, expected, strict=True):
        assert fragment in problem, (fragment, report.problems)


# --- A good history --------------------------------------------------------------------------------

def test_a_good_history_passes_and_agrees_with_tomq_ledger_verify(history: History, city: Scenario):
    report = history.check()
    report.assert_ok()
    assert report.problems == []
    assert report.heights == {"n1": TOP, "n2": TOP, "shared": TOP} and report.reference == "n1"
    tomq_report = verify_path(history.copies["shared"], PublicKey(history.operator_key))
    assert (report.blocks, report.records) == (tomq_report.blocks, tomq_report.records) == (TOP + 1, 37)
    assert report.acknowledged == len(history.acknowledged) == len(city.readings) + len(city.results) + 3
    operator_id = city.builder.operator.id
    assert report.terms == {0: operator_id, 1: history.id("n1"), 2: history.id("n1")}
    assert report.summary() == (f"history ok: 19 blocks, 37 records, {report.acknowledged} acknowledged "
                                "found once, 3 terms; heights n1 18, n2 18, shared 18")


def test_given_node_keys_must_be_the_keys_the_chain_certifies(history: History):
    node_keys = {name: history.keys[name].public_key.raw for name in ("n1", "n2", "n3")}
    assert history.check(node_keys=node_keys).problems == []
    node_keys["n3"] = SigningKey.generate().public_key.raw
    node_keys["n9"] = node_keys["n1"]
    assert_problems(history.check(node_keys=node_keys),
                    "node n3: the key given (", "node n9: its key was given, but no node certificate for n9")


def test_a_copy_that_lags_behind_and_writers_temporaries_are_no_problem(history: History):
    for height in (TOP - 1, TOP):
        history.path("n2", height).unlink()  # a node that was down at the end
    (history.copies["shared"] / f".{block_file_name(TOP + 1)}.4242.abcd.tmp").write_bytes(b"half a blo")
    (history.copies["n1"] / f".{block_file_name(TOP + 1)}.tmp").write_bytes(b"")
    report = history.check()
    assert report.problems == [] and report.heights == {"n1": TOP, "n2": TOP - 2, "shared": TOP}


def test_the_checker_imports_nothing_from_tomq():
    source = (Path(__file__).parent / "history_checker.py").read_text()
    modules: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            modules.add(node.module or "")
    assert not [module for module in modules if module.split(".")[0] == "tomq"], modules
    assert {"cbor2", "cryptography.hazmat.primitives.asymmetric.ed25519", "hashlib"} <= modules


def test_cluster_copies_finds_the_node_stores_and_the_shared_directory(tmp_path: Path):
    for name in ("n1", "n2"):
        (tmp_path / "cluster" / "members" / name / "state" / "blocks").mkdir(parents=True)
    (tmp_path / "cluster" / "members" / "s1").mkdir()  # a device: no store
    assert cluster_copies(tmp_path / "cluster", tmp_path / "shared") == {
        "n1": tmp_path / "cluster" / "members" / "n1" / "state" / "blocks",
        "n2": tmp_path / "cluster" / "members" / "n2" / "state" / "blocks", "shared": tmp_path / "shared"}


# --- 1. Files: gaps, strays, torn writes ----------------------------------------------------------

def test_a_missing_block(history: History):
    history.path("n2", 5).unlink()
    report = history.check()
    assert_problems(report, "copy n2: height 5 (000000000005.block) is missing, below its top height 18")
    assert report.heights["n2"] == 4
    assert history.verify("n2").startswith(
        "ledger invalid at height 5: block file 000000000005.block is missing")


def test_a_gap_of_several_blocks(history: History):
    for height in (3, 4, 5):
        history.path("shared", height).unlink()
    report = history.check()
    assert_problems(report, "copy shared: heights 3..5 are missing (a gap below its top height 18)")
    assert report.heights["shared"] == 2


def test_a_missing_genesis(history: History):
    history.path("n1", 0).unlink()
    report = history.check()
    assert_problems(report, "copy n1: height 0 (000000000000.block) is missing, below its top height 18")
    assert report.reference == "n2" and report.heights["n1"] == -1


def test_a_stray_block_file(history: History):
    (history.copies["shared"] / "19.block").write_bytes(history.path("shared", TOP).read_bytes())
    assert_problems(history.check(),
                    "copy shared: stray file 19.block is not named <height as 12 digits>.block")


def test_a_torn_last_file(history: History):
    data = history.path("shared", TOP).read_bytes()
    history.path("shared", TOP).write_bytes(data[: len(data) // 2])
    report = history.check()
    assert_problems(report, f"copy shared: its last file, height {TOP} ({block_file_name(TOP)}), is torn: "
                            f"its {len(data) // 2} bytes end inside a CBOR item")
    assert report.problems[0].endswith("; a partial write")
    assert report.heights["shared"] == TOP - 1


def test_an_empty_file_and_a_torn_file_below_the_top(history: History):
    history.path("n2", TOP).write_bytes(b"")
    history.path("n1", 7).write_bytes(history.path("n1", 7).read_bytes()[:40])
    report = history.check()
    assert_problems(report,
                    "copy n1: height 7 (000000000007.block) is torn: its 40 bytes end inside a CBOR item",
                    f"copy n2: its last file, height {TOP} ({block_file_name(TOP)}), is torn: "
                    "its 0 bytes end inside a CBOR item (is empty)")
    assert report.heights == {"n1": 6, "n2": TOP - 1, "shared": TOP} and report.reference == "shared"


def test_a_file_under_another_height_s_name(history: History):
    history.path("n2", 6).write_bytes(history.path("n2", 7).read_bytes())
    assert_problems(history.check(), "copy n2: file 000000000006.block holds block 7")


# --- 2. Copies agree --------------------------------------------------------------------------------

def test_a_copy_that_diverges(history: History):
    # n2 holds another block 18: properly proposed by n1 and certified by n1 and n2, one record fewer.
    original = history.block_file(TOP).block
    fork = history.make(TOP, list(original.records[:1]), term=original.term)
    history.write(TOP, fork, ("n2",))
    fork_hash = decode_block_file(fork).block.hash.hex()[:16]
    assert_problems(history.check(),
                    f"copy n2 diverges from n1 at height 18: block {fork_hash}… (term 2, proposed by n1) vs "
                    f"{original.hash.hex()[:16]}… (term 2, proposed by n1)")
    assert history.verify("n2").startswith("ledger ok")  # on its own, the fork verifies


def test_a_fork_several_heights_deep_is_reported_once_per_copy(history: History):
    # The shared directory took another block 16, and blocks 17 and 18 built on it.
    for height in (16, 17, 18):
        original = history.block_file(height, "shared").block
        prev = None if height == 16 else history.block_file(height - 1, "shared").block.hash
        data = history.make(height, list(original.records), term=original.term, prev=prev,
                            time_offset_ms=1001)
        history.write(height, data, ("shared",))
    report = history.check()
    assert_problems(report, "copy shared diverges from n1 at height 16: block ")
    assert report.problems[0].endswith("; 2 later height(s) differ too")


def test_a_block_whose_copies_carry_different_certificates(history: History):
    block_file = history.block_file(7)
    recertified = BlockFile(block_file.block, block_file.proposer_signature,
                            {history.id(name): commit_signature(history.keys[name], block_file.block.hash)
                             for name in ("n1", "n3")})
    history.write(7, encode_block_file(recertified), ("n2",))
    assert_problems(history.check(), "copy n2: 1 height(s) (7) hold the same block as n1 with a different "
                                     "commit certificate (nodes write byte-identical files)")


# --- 3. The chain -------------------------------------------------------------------------------------

def test_a_flipped_byte_in_a_record(history: History):
    data = bytearray(history.path("n1", READINGS_HEIGHT).read_bytes())
    envelope = history.block_file(READINGS_HEIGHT).block.records[2]
    data[data.index(envelope) + len(envelope) - 10] ^= 0x01  # inside the envelope's signature
    history.write(READINGS_HEIGHT, bytes(data), ("n1",))
    seq = canonical.decode(canonical.decode(envelope)[0])["seq"]
    assert_problems(history.check(),
                    "height 5 (term 1) in n1: records_root does not match the records",
                    f"height 5 (term 1) in n1: record 2: envelope signature of collector "
                    f"({history.id('collector')}) (seq {seq}) does not verify",
                    "copy n1 diverges from n2 at height 5: the same header (block ")
    assert history.verify("n1").startswith("ledger invalid at height 5: records_root does not match")


def test_a_certificate_below_majority(history: History):
    block_file = history.block_file(9)
    one_signature = {history.id("n1"): block_file.commit_certificate[history.id("n1")]}
    under_majority = BlockFile(block_file.block, block_file.proposer_signature, one_signature)
    history.write(9, encode_block_file(under_majority))
    message = ("commit certificate has 1 valid signature(s) of the 3 node(s) joined at this height; "
               "a majority needs 2")
    assert_problems(history.check(), f"height 9 (term 1) in n1, n2, shared: {message}")
    assert history.verify() == f"ledger invalid at height 9: {message}"


def test_a_wrong_operator_key_refuses_genesis(history: History):
    history.operator_key = SigningKey.generate().public_key.raw
    report = history.check()
    assert report.problems[0].startswith("height 0 (term 0) in n1, n2, shared: genesis is proposed by ")
    assert "commit certificate has 0 valid signature(s) of the 1 node(s)" in report.problems[1]


@pytest.mark.parametrize("tampering, message", [
    ("proposer signed by n2", "proposer signature of n1 ({n1}) does not verify"),
    ("commit signed by a stranger for n2", "commit signature of n2 ({n2}) does not verify"),
    ("proposed by a stranger", "proposer {stranger} is not a node joined at this height (n1, n2, n3)"),
    ("record sealed by a stranger", "record 0: sender {stranger} has no certificate on the chain so far"),
    ("term goes back", "Raft term 1 is below the term 2 of block 18"),
    ("prev is wrong", "prev 0000000000000000… is not the hash of block 18"),
    ("a replayed envelope",
     "record 0: seq {seq} from collector ({collector}) is not above its previous {seq}"),
])
def test_each_chain_rule_names_its_problem_and_tomq_ledger_verify_refuses_too(history: History, tampering,
                                                                             message):
    stranger = SigningKey.generate()
    # The collector's last record: tl-j1's report at height 16.
    last_reading = history.envelope_with(16, history.acknowledged[14].record_id)
    seq = canonical.decode(canonical.decode(last_reading)[0])["seq"]
    options: dict = {}
    envelopes = [history.new_reading("reading:new")]
    if tampering == "proposer signed by n2":
        options["proposer_key"] = history.keys["n2"]
    elif tampering == "proposed by a stranger":
        history.keys["stranger"] = stranger
        options["proposer"] = "stranger"
    elif tampering == "record sealed by a stranger":
        envelopes = [seal(stranger, seq=1, time_ms=0, type="record", body=body_of(last_reading))]
    elif tampering == "term goes back":
        options["term"] = 1
    elif tampering == "prev is wrong":
        options["prev"] = bytes(32)
    elif tampering == "a replayed envelope":
        envelopes = [last_reading]
    data = history.make(TOP + 1, envelopes, **options)
    if tampering == "commit signed by a stranger for n2":
        block = decode_block_file(data)
        certificate = {history.id("n1"): commit_signature(history.keys["n1"], block.block.hash),
                       history.id("n2"): commit_signature(stranger, block.block.hash)}
        data = encode_block_file(BlockFile(block.block, block.proposer_signature, certificate))
    history.write(TOP + 1, data)
    expected = message.format(n1=history.id("n1"), n2=history.id("n2"), stranger=stranger.id, seq=seq,
                              collector=history.id("collector"))
    report = history.check()
    where = f"height 19 (term {decode_block_file(data).block.term}) in n1, n2, shared: "
    assert any(problem.startswith(where + expected) for problem in report.problems), report.problems
    assert history.verify().startswith("ledger invalid at height 19: ")


def test_every_single_byte_change_is_reported_and_tomq_ledger_verify_refuses_it_too(tmp_path: Path):
    builder = LedgerBuilder(tmp_path)
    builder.genesis()
    builder.block([builder.seal("n1", reading("reading:1", "n3")),
                   builder.seal("n2", reading("reading:2", "n3"))])
    path = builder.ledger / block_file_name(1)
    original = path.read_bytes()
    operator = builder.operator.public_key
    positions = sorted(set(range(0, 48)) | set(range(0, len(original), max(1, len(original) // 60))))
    for position in positions:
        changed = bytearray(original)
        changed[position] ^= 0x01 if position % 2 else 0x80
        path.write_bytes(bytes(changed))
        report = check_history(operator.raw, None, {"n1": builder.ledger}, [])
        assert report.problems, position
        assert all("height 1 " in problem or block_file_name(1) in problem
                   for problem in report.problems), (position, report.problems)
        with pytest.raises(LedgerInvalid):
            verify_path(builder.ledger, operator)
    path.write_bytes(original)
    assert check_history(operator.raw, None, {"n1": builder.ledger}, []).problems == []


# --- 4. One leader per term -------------------------------------------------------------------------

def test_two_proposers_in_one_term(history: History):
    # Height 19 by n2 in term 2, in which n1 proposed 17 and 18: properly signed and certified, so the
    # chain verifies (tomq ledger verify accepts it); only the one-leader-per-term rule catches it.
    history.write(TOP + 1, history.make(TOP + 1, [history.new_reading("reading:new")], proposer="n2", term=2))
    report = history.check()
    assert_problems(report,
                    f"term 2 has 2 proposers (two leaders in one term): n1 ({history.id('n1')}) at heights "
                    f"17..18 in n1, n2, shared; n2 ({history.id('n2')}) at height 19 in n1, n2, shared")
    assert history.verify().startswith("ledger ok: 20 blocks")
    assert report.terms[2] == history.id("n1")


def test_two_proposers_in_one_term_across_copies(history: History):
    # A deposed leader's block that only its own store holds, in the term of the new leader's block.
    original = history.block_file(TOP).block
    history.write(TOP, history.make(TOP, list(original.records), proposer="n3", term=2), ("n2",))
    report = history.check()
    assert "term 2 has 2 proposers (two leaders in one term): n1 " in report.problems[-1]
    assert f"n3 ({history.id('n3')}) at height 18 in n2" in report.problems[-1]
    assert report.problems[0].startswith("copy n2 diverges from n1 at height 18")


# --- 5. Exactly once ------------------------------------------------------------------------------

def test_an_acknowledged_record_is_missing(history: History):
    lost = [Acknowledged(history.id("collector"), "reading:never-committed"),
            Acknowledged(history.id("n1"), history.acknowledged[0].record_id)]  # committed, by the collector
    report = history.check(history.acknowledged + lost)
    assert_problems(report,
                    f"acknowledged record reading:never-committed from collector ({history.id('collector')}) "
                    f"is missing (not in n1, heights 0..{TOP})",
                    f"acknowledged record {history.acknowledged[0].record_id} from n1 ({history.id('n1')}) "
                    "is missing")
    assert report.acknowledged == len(history.acknowledged)


def test_a_record_duplicated_in_a_later_block(history: History):
    # The collector's retry of a reading, sealed again under a new sequence number and committed in a
    # later, properly signed and certified block: only the exactly-once rule catches it here (tomq ledger
    # verify refuses it by Table II: the datum has already left its source).
    first = history.acknowledged[0]
    retry = history.reseal(history.envelope_with(READINGS_HEIGHT, first.record_id))
    history.write(TOP + 1, history.make(TOP + 1, [retry]))
    report = history.check()
    assert_problems(report, f"acknowledged record {first.record_id} from collector ({first.proposer}) "
                            f"appears 2 times at heights {READINGS_HEIGHT}, {TOP + 1} (in n1)")
    assert report.acknowledged == len(history.acknowledged) - 1
    # Not acknowledged, the duplicate is still reported.
    assert_problems(history.check(history.acknowledged[1:]),
                    f"record {first.record_id} from collector ({first.proposer}) appears 2 times at heights "
                    f"{READINGS_HEIGHT}, {TOP + 1} (in n1)")
    assert "has already left its source" in history.verify()


def test_acknowledged_records_are_matched_by_content_id_too(history: History, city: Scenario):
    command_id = city.commands[0][3]
    height = city.commands[0][2]
    envelope = history.block_file(height).block.records[0]
    assert hashlib.sha256(canonical.encode(body_of(envelope))).hexdigest()[:32] == command_id
    history.write(TOP + 1, history.make(TOP + 1, [history.reseal(envelope)]))
    assert_problems(history.check(), f"acknowledged record {command_id} from n1 ({history.id('n1')}) appears "
                                     f"2 times at heights {height}, {TOP + 1} (in n1)")
