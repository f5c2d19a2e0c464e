"""The shared ledger directory on a real GlusterFS replica-3 volume, losing a brick mid-run (DESIGN §4).

Three `tomq node` processes write their certified blocks to one FUSE mount of the volume; after the
third of ten rounds of readings one brick process is SIGKILLed. Every record must still commit, the
mount must hold every block byte for byte as each node's store, and `tomq ledger verify` must pass,
with the same head, on the mount and directly on each surviving brick.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from gluster import GlusterVolume, availability, gluster_processes, mounted
from ledger_cluster import LedgerCluster, block_files, join_with_certificate, reading, readings_in

from conftest import require
from procs import PYTHON, which
from tomq.mqtt import wait_until

ROUNDS = 10
PER_ROUND = 100
KILL_AFTER_ROUND = 3
KILLED_BRICK = 1


@pytest.fixture
def gluster_volume(tmp_path):
    require("mosquitto", which("mosquitto") is not None, "install the Debian package mosquitto")
    ok, why = availability()
    require("GlusterFS", ok, why)
    volume = GlusterVolume(tmp_path)
    volume.start()
    yield volume
    volume.stop()  # a no-op when the test got that far itself


def verify(path: Path, directory: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "tomq", "ledger", "verify", str(path), "--operator-key",
                           str(directory / "operator" / "operator.pub")], capture_output=True, text=True, timeout=60)


def head_of(summary: str) -> str:
    return summary.split("; head ")[1].split(";")[0]


def test_replica3_volume_loses_a_brick_and_no_block(gluster_volume, tmp_path):
    volume = gluster_volume
    before = set(gluster_processes()) - set(volume.ours())
    mount = volume.mount
    started = time.monotonic()
    ledger = LedgerCluster(tmp_path, nodes=3, ledger_dir=mount)
    try:
        ledger.start()
        proposer = ledger.proposer()
        try:
            join, join_seq = proposer.seal(join_with_certificate(ledger.directory, "s1"))
            proposer.propose(join)
            assert not proposer.wait([join_seq], 20, {join_seq: join}), ledger.logs()
            rounds = []
            for r in range(ROUNDS):
                t = time.monotonic()
                sealed = dict(proposer.seal(reading(r * PER_ROUND + i))[::-1] for i in range(PER_ROUND))
                for wire in sealed.values():
                    proposer.propose(wire)
                if r == KILL_AFTER_ROUND:  # while the first round after it is being batched and written
                    at_kill = len(block_files(mount))
                    pid = volume.kill_brick(KILLED_BRICK)
                    assert pid not in gluster_processes()
                    online, _ = volume.status()[str(volume.brick_path(KILLED_BRICK))]
                    assert not online, volume.status()
                missing = proposer.wait(list(sealed), 20, sealed)
                assert not missing, (r, len(missing), ledger.logs())
                rounds.append(time.monotonic() - t)
        finally:
            proposer.close()
        committed = time.monotonic() - started

        # Every reading's block certified and on the mount (commit comes a tick or two before), and
        # every store as far as the mount.
        assert wait_until(lambda: readings_in(block_files(mount)) >= ROUNDS * PER_ROUND
                          and all(block_files(ledger.store(n)).keys() <= block_files(mount).keys()
                                  and len(block_files(ledger.store(n))) == len(block_files(mount))
                                  for n in ledger.names), 30, 0.2), ledger.logs()
        reference = block_files(mount)
        heights = sorted(int(name.split(".")[0]) for name in reference)
        assert heights == list(range(len(heights))), "a height is missing from the mount"
        for name in ledger.names:
            assert block_files(ledger.store(name)) == reference, name

        results = {"mount": verify(mount, ledger.directory)}
        survivors = [i for i in range(len(volume.bricks)) if i != KILLED_BRICK]
        for i in survivors:
            brick = volume.brick_path(i)
            assert block_files(brick) == reference, f"brick {i}"
            results[f"brick {i}"] = verify(brick, ledger.directory)
        for where, result in results.items():
            assert result.returncode == 0, (where, result.stdout + result.stderr)
        heads = {where: head_of(result.stdout) for where, result in results.items()}
        assert len(set(heads.values())) == 1, heads
        killed_brick_files = len(block_files(volume.brick_path(KILLED_BRICK)))
        assert killed_brick_files < len(reference), "the killed brick cannot have kept up"
        # Informative: what the dead brick kept (a prefix of the ledger, unless it died mid-link).
        killed_verify = verify(volume.brick_path(KILLED_BRICK), ledger.directory)
    finally:
        ledger.stop()

    # Tear down here rather than in the fixture, to check that nothing is left behind.
    volume.stop()
    assert not mounted(mount)
    assert not volume.ours(), volume.ours()
    assert set(gluster_processes()) - before == set(), gluster_processes()
    assert not any(brick.exists() for brick in volume.bricks)

    print(f"\n{ROUNDS * PER_ROUND + 1} records in {len(reference)} blocks committed in {committed:.1f} s "
          f"(rounds {', '.join(f'{t:.2f}' for t in rounds)} s); brick {KILLED_BRICK} (pid {pid}) SIGKILLed "
          f"after round {KILL_AFTER_ROUND} with {at_kill} blocks on the mount; it kept {killed_brick_files}")
    print(f"gluster: host {volume.host}, private glusterd {volume.private is not None}, "
          + ", ".join(f"{k} {v:.2f} s" for k, v in volume.timings.items()))
    for where, result in results.items():
        print(f"verify {where}: {result.stdout.strip()}")
    print(f"verify killed brick {KILLED_BRICK} (exit {killed_verify.returncode}): "
          f"{(killed_verify.stdout + killed_verify.stderr).strip()}")
