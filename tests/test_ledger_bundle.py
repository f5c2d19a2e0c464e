"""Audit bundles (node/ledger/bundle.py): one file that `tomq ledger verify` checks on a machine that has never
seen the cluster, with the same verdicts, at the same heights, as for the ledger directory.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from audit_ledger import Scenario, build_city
from tomq import canonical
from tomq.errors import ConfigError
from tomq.identity import PublicKey, SigningKey
from tomq.node.ledger import cli as ledger_cli
from tomq.node.ledger.block import block_file_name
from tomq.node.ledger.bundle import (
    Bundle,
    BundleSource,
    DirectorySource,
    LedgerReader,
    decode_bundle,
    encode_bundle,
    verify_bundle,
    write_bundle,
)
from tomq.node.ledger.verify import LedgerInvalid, verify_ledger, verify_path


@pytest.fixture(scope="module")
def city(tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    return build_city(tmp_path_factory.mktemp("city"))


def operator(city: Scenario) -> PublicKey:
    return PublicKey.from_hex(city.operator_pub.read_text().strip())


@pytest.fixture
def stranger_machine(city: Scenario, tmp_path: Path) -> tuple[Path, str]:
    """A bundle and the operator's public key (hex), alone in a directory, as an auditor receives them."""
    made = tmp_path / "made.bundle"
    write_bundle(DirectorySource(city.ledger), made, 5, 12, operator(city))
    machine = tmp_path / "auditor"
    machine.mkdir()
    shutil.move(made, machine / "city.bundle")
    return machine / "city.bundle", city.operator_pub.read_text().strip()


def test_a_bundle_verifies_alone_with_the_same_report_as_the_directory(city: Scenario,
                                                                        stranger_machine: tuple[Path, str]):
    path, key = stranger_machine
    assert sorted(p.name for p in path.parent.iterdir()) == ["city.bundle"]
    report, bundle = verify_bundle(path, PublicKey.from_hex(key))
    assert (bundle.first, bundle.last, len(bundle.blocks)) == (5, 12, 13)
    # The same blocks verified from the directory, up to 12, give the same report.
    partial = city.ledger.parent / "upto12"
    partial.mkdir(exist_ok=True)
    for height in range(13):
        shutil.copy(city.ledger / block_file_name(height), partial / block_file_name(height))
    assert report == verify_ledger(partial, operator(city)) == verify_path(path, operator(city))
    assert verify_path(partial, operator(city)) == report  # the directory path is verify_ledger's, unchanged
    assert [bytes(b) for b in bundle.blocks] == [(city.ledger / block_file_name(h)).read_bytes() for h in range(13)]


def test_cli_verify_accepts_a_bundle_file(stranger_machine: tuple[Path, str], capsys: pytest.CaptureFixture[str]):
    path, key = stranger_machine
    assert ledger_cli.main(["verify", str(path), "--operator-key", key]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("ledger ok: 13 blocks (heights 0..12)")
    assert lines[1] == "bundle ok: audited heights 5..12, verified from genesis"


def test_a_changed_byte_in_a_bundled_block_fails_at_its_height(stranger_machine: tuple[Path, str],
                                                               capsys: pytest.CaptureFixture[str]):
    path, key = stranger_machine
    bundle = decode_bundle(path.read_bytes())
    for height in (0, 3, 7, 12):
        blocks = list(bundle.blocks)
        changed = bytearray(blocks[height])
        changed[len(changed) // 2] ^= 0x01
        blocks[height] = bytes(changed)
        tampered = path.with_name(f"tampered-{height}.bundle")
        tampered.write_bytes(encode_bundle(Bundle(bundle.operator_id, bundle.first, bundle.last, tuple(blocks))))
        assert ledger_cli.main(["verify", str(tampered), "--operator-key", key]) == 1
        assert capsys.readouterr().out.startswith(f"ledger invalid at height {height}: ")


@pytest.mark.parametrize("edit, message", [
    (lambda raw: raw.update(blocks=raw["blocks"][:-1]), "must carry 13 block files"),
    (lambda raw: raw.update(format="tar"), "not an audit bundle"),
    (lambda raw: raw.update({"from": 13}), "0 <= from <= to"),
    (lambda raw: raw.update(extra=1), "exactly"),
])
def test_a_malformed_bundle_is_refused(stranger_machine: tuple[Path, str], edit, message):
    path, key = stranger_machine
    raw = canonical.decode(path.read_bytes())
    edit(raw)
    path.write_bytes(canonical.encode(raw))
    with pytest.raises(LedgerInvalid, match=message):
        verify_bundle(path, PublicKey.from_hex(key))


def test_framing_bytes_of_a_bundle_are_covered_too(stranger_machine: tuple[Path, str]):
    path, key = stranger_machine
    data = path.read_bytes()
    report, bundle = verify_bundle(path, PublicKey.from_hex(key))
    relabelled = []
    for position in range(0, 60):  # the map header, field names, operator id, range
        changed = bytearray(data)
        changed[position] ^= 0x01
        path.write_bytes(bytes(changed))
        try:
            again, other = verify_bundle(path, PublicKey.from_hex(key))
        except LedgerInvalid:
            continue
        # `from` is a label for the audited range, not evidence: every block is verified from genesis anyway.
        assert again == report and other.blocks == bundle.blocks and other.first != bundle.first
        relabelled.append(position)
    assert len(relabelled) == 1


def test_another_operator_key_is_named_plainly(stranger_machine: tuple[Path, str]):
    path, _ = stranger_machine
    other = SigningKey.generate().public_key
    with pytest.raises(LedgerInvalid, match=f"ledger of operator .* the key given is operator {other.id}"):
        verify_bundle(path, other)


def test_a_bundle_is_never_written_over_a_file_and_refuses_a_bad_range(city: Scenario, tmp_path: Path):
    out = tmp_path / "b.bundle"
    out.write_text("precious")
    with pytest.raises(ConfigError, match="never written over"):
        write_bundle(DirectorySource(city.ledger), out, 0, None)
    assert out.read_text() == "precious"
    with pytest.raises(ConfigError, match="need 0 <= from <= to"):
        write_bundle(DirectorySource(city.ledger), tmp_path / "c.bundle", 9, 4)
    with pytest.raises(ConfigError, match="above the head"):
        write_bundle(DirectorySource(city.ledger), tmp_path / "c.bundle", 0, 99)
    assert not (tmp_path / "c.bundle").exists() and not list(tmp_path.glob(".*"))


def test_bundling_with_the_key_refuses_a_ledger_that_does_not_verify(city: Scenario, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]):
    ledger = tmp_path / "ledger"
    shutil.copytree(city.ledger, ledger)
    path = ledger / block_file_name(6)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # a commit signature
    path.write_bytes(bytes(data))
    out = tmp_path / "b.bundle"
    assert ledger_cli.main(["bundle", str(ledger), str(out), "--operator-key", str(city.operator_pub)]) == 1
    assert capsys.readouterr().out.startswith("ledger invalid at height 6")
    assert not out.exists()
    # Without the key the bundle is made (its reader checks no signature) and the auditor's verify catches it.
    assert ledger_cli.main(["bundle", str(ledger), str(out)]) == 0
    assert "not verified" in capsys.readouterr().out
    assert ledger_cli.main(["verify", str(out), "--operator-key", str(city.operator_pub)]) == 1
    assert capsys.readouterr().out.startswith("ledger invalid at height 6")


def test_a_reader_walks_a_bundle_like_its_directory(city: Scenario, stranger_machine: tuple[Path, str]):
    path, key = stranger_machine
    from_bundle = [(e.height, e.index, e.record_id, e.sender) for e in
                   LedgerReader(BundleSource(path), PublicKey.from_hex(key)).entries()]
    from_dir = [(e.height, e.index, e.record_id, e.sender) for e in
                LedgerReader(DirectorySource(city.ledger), operator(city)).entries(0, 12)]
    unverified = [(e.height, e.index, e.record_id, e.sender) for e in LedgerReader(BundleSource(path), None).entries()]
    assert from_bundle == from_dir == unverified
    assert ("collector" in {sender for *_, sender in from_bundle}) and ("<operator>" in {s for *_, s in from_bundle})
