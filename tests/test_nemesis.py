"""Nemesis runs (issue 9): a real cluster in network namespaces under every kind of fault, judged by an
independent checker. RELIABILITY.md's figures come from here (`bash scripts/nemesis` regenerates them).

mosquitto, three `tomq node`s and a client, each in its own namespace of tests/netbed.py, the shared
ledger directory on a real GlusterFS replica-3 volume. The client proposes 20 readings a second
throughout; tests/nemesis.py injects every fault kind once in an order drawn from the seed, and
measures how long after each heal the cluster commits again. Then tests/history_checker.py, with its
own CBOR reader and signature checks, reads every node's store, the shared directory and every
brick, and must find: each acknowledged record exactly once, identical prefixes, a valid chain with
majority certificates, one proposer per term.

Seeds: TOMQ_NEMESIS_SEEDS="1,2,3" (default "1" in CI); TOMQ_NEMESIS_RESULTS=DIR writes each run's
figures as DIR/seed-<n>.json.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from gluster import GlusterVolume
from gluster import availability as gluster_availability

from conftest import require
from history_checker import Acknowledged, check_history, operator_key_of
from nemesis import (
    FAULT_KINDS,
    HOSTS,
    NODES,
    RECOVERY_BOUND,
    NemesisCluster,
    faketime_available,
    run_nemesis,
    write_results,
)
from netbed import NetBed
from netbed import availability as netbed_availability
from procs import which
from tomq.mqtt import wait_until

SEEDS = [int(s) for s in os.environ.get("TOMQ_NEMESIS_SEEDS", "1").split(",") if s.strip()]
RESULTS = os.environ.get("TOMQ_NEMESIS_RESULTS")


def block_count(directory: Path) -> int:
    return sum(1 for _ in directory.glob("*.block"))


@pytest.mark.parametrize("seed", SEEDS)
def test_every_fault_kind_loses_no_acknowledged_record(seed, tmp_path):
    require("network namespaces", *netbed_availability())
    require("GlusterFS", *gluster_availability())
    require("mosquitto", which("mosquitto") is not None, "install the Debian package mosquitto")
    require("libfaketime", faketime_available(), "install the Debian package faketime")
    volume = GlusterVolume(tmp_path)
    bed = NetBed(list(HOSTS), tmp_path / "bed")
    target = None
    try:
        mount = volume.start()
        bed.start()
        (tmp_path / "logs").mkdir()
        target = NemesisCluster(bed, tmp_path, mount)
        target.start()
        result = run_nemesis(target, seed, FAULT_KINDS, volume=volume)

        # Every copy catches up with the longest before the checker reads them: a record is
        # acknowledged when its block is certified, a moment before every store has the file.
        def converged() -> bool:
            counts = [block_count(target.store(n)) for n in NODES] + [block_count(mount)]
            return len(set(counts)) == 1
        assert wait_until(converged, 60, 0.5), ({n: block_count(target.store(n)) for n in NODES},
                                                block_count(mount), target.logs())
        # The self-heal daemon copies to a returned brick what it missed; then every brick is a copy too.
        reference = {p.name: p.read_bytes() for p in mount.glob("*.block")}
        bricks_healed = wait_until(lambda: all({p.name: p.read_bytes() for p in volume.brick_path(i).glob("*.block")}
                                               == reference for i in range(len(volume.bricks))), 60, 1.0)
        acks, _ = target.acks()
        acknowledged = [Acknowledged(item["proposer"], item["id"]) for item in acks
                        if item["id"].startswith("reading:")]
        copies = {name: target.store(name) for name in NODES}
        copies["shared"] = mount
        copies.update({f"brick{i}": volume.brick_path(i) for i in range(len(volume.bricks))})
        report = check_history(operator_key_of(target.directory), None, copies, acknowledged)
    finally:
        if target is not None:
            target.stop()
        bed.stop()
        volume.stop()

    recoveries = {f.kind: f.recovery for f in result.faults}
    result.checker = {"summary": report.summary(), "problems": report.problems, "blocks": report.blocks,
                      "records": report.records, "bricks_healed": bricks_healed}
    print(f"\nnemesis seed {seed}: {len(result.faults)} faults in {result.seconds} s; "
          f"{result.acknowledged} of {result.proposed} readings acknowledged, "
          f"{len(result.unacknowledged)} not; recovery (s) {recoveries}; checker: {report.summary()}")
    if RESULTS:
        write_results(Path(RESULTS) / f"seed-{seed}.json", result)
    report.assert_ok()
    assert bricks_healed, "a brick never got back what it missed while it was down"
    assert report.acknowledged == len(acknowledged) > 0
    slow = {f.kind: f.recovery for f in result.faults if f.recovery is None or f.recovery > RECOVERY_BOUND}
    assert not slow, f"no commit within {RECOVERY_BOUND} s after healing: {slow}"
    assert sorted(f.kind for f in result.faults) == sorted(FAULT_KINDS)
