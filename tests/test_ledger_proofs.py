"""Inclusion and consistency proofs (node/ledger/proofs.py): made from a ledger or a bundle, checked with the
operator key alone; any changed byte of a proof, of the record in it or of its certificate fails.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_ledger_verify import LedgerBuilder, identity, reading

from audit_ledger import Scenario, at, build_city
from keys import NOW
from tomq import canonical, cluster
from tomq.identity import PublicKey, SigningKey
from tomq.node.ledger import cli as ledger_cli
from tomq.node.ledger import proofs
from tomq.node.ledger.block import commit_signature, decode_block_file, header_map
from tomq.node.ledger.bundle import BundleSource, DirectorySource, write_bundle
from tomq.node.ledger.proofs import ProofRejected
from tomq.records import ID_CREATE, ID_DELETE


@pytest.fixture(scope="module")
def city(tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    return build_city(tmp_path_factory.mktemp("city"))


@pytest.fixture(scope="module")
def bundle_path(city: Scenario, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "city.bundle"
    write_bundle(DirectorySource(city.ledger), out, 5, None, operator(city))
    return out


def operator(city: Scenario) -> PublicKey:
    return PublicKey.from_hex(city.operator_pub.read_text().strip())


def first_reading(city: Scenario) -> tuple[str, int, str]:
    data, (_, height, record_id) = next(iter(city.readings.items()))
    return data, height, record_id


def test_a_reading_s_proof_made_from_a_bundle_checks_with_the_operator_key_alone(city: Scenario, bundle_path: Path):
    data, height, record_id = first_reading(city)
    proof = proofs.build_inclusion(BundleSource(bundle_path).read, height, 0)
    report = proofs.check(proof, operator(city))
    assert (report.kind, report.height, report.index, report.record_id) == (proofs.INCLUSION, height, 0, record_id)
    assert report.proposer == "collector" and report.signed_by == ("n1", "n2")
    assert report.electorate == ("n1", "n2", "n3") and report.membership_changes == 0
    assert data in report.summary() and report.to_json()["object"] == data
    assert report.block_hash == decode_block_file(DirectorySource(city.ledger).read(height)).block.hash
    # The same proof, armored as text, checks the same.
    assert proofs.check(proofs.armor(proof), operator(city)) == report


def test_changing_any_byte_of_a_proof_fails_it(city: Scenario):
    _, height, _ = first_reading(city)
    proof = proofs.build_inclusion(DirectorySource(city.ledger).read, height, 0)
    key = operator(city)
    survivors = []
    for position in range(len(proof)):
        for flip in ((0x01, 0x80) if position % 7 == 0 else (0x01,)):
            changed = bytearray(proof)
            changed[position] ^= flip
            try:
                proofs.check(bytes(changed), key)
            except ProofRejected:
                continue
            survivors.append((position, flip))
    assert survivors == []


def _proof_map(city: Scenario, height: int, index: int = 0) -> dict:
    return canonical.decode(proofs.build_inclusion(DirectorySource(city.ledger).read, height, index))


def _rejected(raw: dict, key: PublicKey) -> str:
    with pytest.raises(ProofRejected) as caught:
        proofs.check(canonical.encode(raw), key)
    assert "\n" not in str(caught.value)
    return str(caught.value)


def test_another_record_of_the_same_block_or_a_changed_record_fails(city: Scenario):
    _, height, _ = first_reading(city)
    raw = _proof_map(city, height, 0)
    other = _proof_map(city, height, 1)
    raw["target"]["record"] = other["target"]["record"]  # a real record of that block, at the wrong place
    assert "leads to another root" in _rejected(raw, operator(city))
    raw = _proof_map(city, height, 0)
    record = bytearray(raw["target"]["record"])
    record[-1] ^= 0x01  # its signature byte: the leaf is another one
    raw["target"]["record"] = bytes(record)
    assert "leads to another root" in _rejected(raw, operator(city))


def test_a_changed_commit_certificate_fails(city: Scenario):
    _, height, _ = first_reading(city)
    raw = _proof_map(city, height)
    certificate = raw["target"]["certificate"]
    signer = sorted(certificate)[0]
    del certificate[signer]
    assert "a majority needs 2" in _rejected(raw, operator(city))
    raw = _proof_map(city, height)
    certificate = raw["target"]["certificate"]
    signer = sorted(certificate)[0]
    certificate[signer] = bytes(64)
    assert "does not verify" in _rejected(raw, operator(city))
    raw = _proof_map(city, height)
    stranger = SigningKey.generate()
    raw["target"]["certificate"][stranger.id] = commit_signature(stranger, b"\0" * 32)
    assert "is not a node" in _rejected(raw, operator(city))


def test_a_proof_fails_under_another_operator_and_with_another_block_s_header(city: Scenario):
    _, height, _ = first_reading(city)
    proof = proofs.build_inclusion(DirectorySource(city.ledger).read, height, 0)
    with pytest.raises(ProofRejected, match="not proposed and signed by operator"):
        proofs.check(proof, SigningKey.generate().public_key)
    raw = canonical.decode(proof)
    raw["target"]["header"] = header_map(decode_block_file(DirectorySource(city.ledger).read(height + 4)).block)
    assert "another root" in _rejected(raw, operator(city))


def test_a_genesis_record_is_proven_by_the_operator_alone(city: Scenario):
    report = proofs.check(proofs.build_inclusion(DirectorySource(city.ledger).read, 0, 2), operator(city))
    assert report.height == 0 and report.proposer == "operator" and report.signed_by == ("operator",)
    assert report.record is not None and report.record.state == ID_CREATE
    assert "certified by the operator (genesis)" in report.summary()


# --- Membership changes ------------------------------------------------------------------------------


@pytest.fixture
def changing(tmp_path: Path) -> LedgerBuilder:
    """n4 joins at 2 (3 of 4 certify from 3 on), n3 leaves at 4 (2 of 3 from 5 on)."""
    builder = LedgerBuilder(tmp_path)
    cluster.add_member(builder.cluster_dir, "n4", "node", now=NOW)
    builder.keys["n4"] = cluster.load(builder.cluster_dir).signing_key("n4")
    builder.genesis()
    builder.block([builder.seal("n1", identity(ID_CREATE, "s1", "device", builder.cert("s1")))])
    builder.block([builder.seal("n1", identity(ID_CREATE, "n4", "node", builder.cert("n4")))])
    builder.block([builder.seal("n4", reading("reading:1"))], proposer="n4", signers=("n1", "n2", "n4"))
    builder.block([builder.seal("n1", identity(ID_DELETE, "n3", "node", builder.cert("n3")))],
                  signers=("n1", "n2", "n4"))
    builder.block([builder.seal("n2", reading("reading:2"))], signers=("n2", "n4"))
    return builder


def test_membership_changes_in_the_proof_set_the_quorum(changing: LedgerBuilder):
    key = changing.operator.public_key
    read = DirectorySource(changing.ledger).read
    at3 = proofs.check(proofs.build_inclusion(read, 3, 0), key)
    assert at3.electorate == ("n1", "n2", "n3", "n4") and at3.signed_by == ("n1", "n2", "n4")
    assert at3.membership_changes == 1 and at3.proposer == "n4"
    at5 = proofs.check(proofs.build_inclusion(read, 5, 0), key)
    assert at5.electorate == ("n1", "n2", "n4") and at5.signed_by == ("n2", "n4") and at5.membership_changes == 2
    raw = canonical.decode(proofs.build_inclusion(read, 5, 0))
    assert [(step["header"]["height"], step["index"]) for step in raw["membership"]] == [(2, 0), (4, 0)]


@pytest.mark.parametrize("edit, message", [
    (lambda steps: steps.pop(0), "is not a node"),  # hide n4's join: its signatures have no node behind them
    (lambda steps: steps.pop(1), "a majority needs 3"),  # hide n3's leave: 2 of 4 is not a majority
    (lambda steps: steps.reverse(), "is not a node"),  # n3's leave first: n4, who signed it, has not joined yet
    (lambda steps: steps.append(steps[0]), "strictly"),
])
def test_a_tampered_membership_list_fails(changing: LedgerBuilder, edit, message):
    raw = canonical.decode(proofs.build_inclusion(DirectorySource(changing.ledger).read, 5, 0))
    edit(raw["membership"])
    assert message in _rejected(raw, changing.operator.public_key)


def test_a_membership_step_that_changes_nothing_fails(changing: LedgerBuilder):
    read = DirectorySource(changing.ledger).read
    raw = canonical.decode(proofs.build_inclusion(read, 5, 0))
    # s1's join is a real, certified record, but not a node's.
    not_a_node = canonical.decode(proofs.build_inclusion(read, 1, 0))["target"]
    raw["membership"].insert(0, not_a_node)
    assert "not a node's join or leave" in _rejected(raw, changing.operator.public_key)


# --- Consistency -------------------------------------------------------------------------------------


def test_a_consistency_proof_shows_the_later_ledger_extends_the_earlier(city: Scenario):
    read = DirectorySource(city.ledger).read
    old_head = decode_block_file(read(4)).block.hash
    top = DirectorySource(city.ledger).top
    report = proofs.check(proofs.build_consistency(read, 4, top), operator(city), old_head=old_head)
    assert (report.kind, report.from_height, report.from_hash, report.height) == (proofs.CONSISTENCY, 4, old_head, top)
    assert report.block_hash == decode_block_file(read(top)).block.hash
    with pytest.raises(ProofRejected, match=r"not the .* you hold"):
        proofs.check(proofs.build_consistency(read, 4, top), operator(city), old_head=bytes(32))


def test_a_consistency_proof_with_a_broken_link_or_no_majority_fails(city: Scenario):
    read = DirectorySource(city.ledger).read
    raw = canonical.decode(proofs.build_consistency(read, 4, 9))
    raw["headers"][2]["t"] += 1  # one header rewritten: the next one no longer names its hash
    assert "does not follow block 6" in _rejected(raw, operator(city))
    raw = canonical.decode(proofs.build_consistency(read, 4, 9))
    del raw["headers"][3]
    assert "does not follow" in _rejected(raw, operator(city))
    raw = canonical.decode(proofs.build_consistency(read, 4, 9))
    raw["certificate"] = dict(list(raw["certificate"].items())[:1])
    assert "majority needs 2" in _rejected(raw, operator(city))


# --- The command line ------------------------------------------------------------------------------------


def test_cli_prove_from_a_bundle_then_check_proof(city: Scenario, bundle_path: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]):
    data, _, record_id = first_reading(city)
    out = tmp_path / "reading.proof"
    assert ledger_cli.main(["prove", str(bundle_path), "--record", data, "--output", str(out),
                            "--operator-key", str(city.operator_pub)]) == 0
    assert out.read_text().startswith("-----BEGIN TOMQ INCLUSION PROOF-----\n")
    capsys.readouterr()
    assert ledger_cli.main(["check-proof", str(out), "--operator-key", str(city.operator_pub)]) == 0
    assert capsys.readouterr().out.startswith(f"inclusion proof ok: record {record_id} (PROV-DATA {data}")
    text = out.read_text()
    body = text.splitlines()
    body[3] = body[3][:10] + ("A" if body[3][10] != "A" else "B") + body[3][11:]
    out.write_text("\n".join(body) + "\n")
    assert ledger_cli.main(["check-proof", str(out), "--operator-key", str(city.operator_pub), "--json"]) == 1
    assert '"ok": false' in capsys.readouterr().out


def test_cli_prove_names_a_record_by_position_and_refuses_an_ambiguous_name(city: Scenario,
                                                                             capsys: pytest.CaptureFixture[str]):
    assert ledger_cli.main(["prove", str(city.ledger), "--record", "n1"]) == 0  # genesis record of n1: one record
    assert "BEGIN TOMQ INCLUSION PROOF" in capsys.readouterr().out
    assert ledger_cli.main(["prove", str(city.ledger), "--record", "s2"]) == 2  # joined, then left: two records
    assert "names 2 records" in capsys.readouterr().err
    assert ledger_cli.main(["prove", str(city.ledger), "--from", "3", "--to", "7",
                            "--operator-key", str(city.operator_pub)]) == 0
    captured = capsys.readouterr()
    assert "BEGIN TOMQ CONSISTENCY PROOF" in captured.out and "extends block 3" in captured.err


def test_record_times_in_the_scenario_are_the_ones_proofs_report(city: Scenario):
    _, height, _ = first_reading(city)
    report = proofs.check(proofs.build_inclusion(DirectorySource(city.ledger).read, height, 0), operator(city))
    assert report.record is not None and report.record.time_ms == at(height, 0)
