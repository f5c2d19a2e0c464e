"""The replicated ledger with real processes: `tomq node` x3 on a real mosquitto (issue 4)."""

from __future__ import annotations

import subprocess
import time

import pytest
from ledger_cluster import LedgerCluster, block_files, join_with_certificate, reading, readings_in

from conftest import require
from procs import PYTHON, which
from tomq.mqtt import wait_until


@pytest.fixture(params=[("amqtt", 3, "stable"), ("amqtt", 5, "stable"), ("mosquitto", 3, "stable"),
                        ("mosquitto", 5, "stable"), ("mosquitto", 3, "on-demand")],
                ids=lambda p: f"{p[0]}-{p[1]}nodes-{p[2]}")
def ledger_cluster(request, tmp_path):
    broker, nodes, mode = request.param
    if broker == "mosquitto":
        require("mosquitto", which("mosquitto") is not None, "install the Debian package mosquitto")
    running = LedgerCluster(tmp_path, nodes=nodes, broker=broker, mode=mode)
    running.start()
    yield running
    running.stop()


def verify(path, directory) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "tomq", "ledger", "verify", str(path), "--operator-key",
                           str(directory / "operator" / "operator.pub")], capture_output=True, text=True, timeout=120)


def test_a_thousand_records_identical_everywhere_and_verified(ledger_cluster):
    proposer = ledger_cluster.proposer()
    try:
        join, join_seq = proposer.seal(join_with_certificate(ledger_cluster.directory, "s1"))
        proposer.propose(join)
        assert not proposer.wait([join_seq], 20, {join_seq: join}), ledger_cluster.logs()
        sealed = dict(proposer.seal(reading(i))[::-1] for i in range(1000))
        started = time.monotonic()
        for wire in sealed.values():
            proposer.propose(wire)
        missing = proposer.wait(list(sealed), 60, sealed)
        elapsed = time.monotonic() - started
        assert not missing, (len(missing), ledger_cluster.logs())
    finally:
        proposer.close()
    shared = ledger_cluster.ledger_dir
    # Blocks are certified shortly after they commit; wait until every copy holds the certified bytes of
    # every block, the last one included (the proposer saw it commit, maybe before it was certified).
    assert wait_until(lambda: readings_in(block_files(shared)) >= 1000 and all(
        block_files(ledger_cluster.store(n)) == block_files(shared) for n in ledger_cluster.names), 30, 0.2), \
        ledger_cluster.logs()
    reference = block_files(shared)
    for name in ledger_cluster.names:
        assert block_files(ledger_cluster.store(name)) == reference, name
    result = verify(shared, ledger_cluster.directory)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1001" in result.stdout or "records" in result.stdout
    print(f"1000 records committed in {elapsed:.2f} s ({1000 / elapsed:.0f}/s); {result.stdout.strip()}")
