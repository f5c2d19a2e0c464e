"""The ledger cluster under process faults, and what operators see (issue 4's Show list).

Real `tomq node` processes on a real mosquitto with the emitted ACL: a leader SIGKILLed while
records stream, a follower SIGSTOPped for 10 s, a node restarted after the log was compacted
(it catches up from a snapshot and the shared directory), the audit stream read by the Debian
`mosquitto_sub`, Prometheus metrics, `tomq status`, and tampering caught by `tomq ledger verify`.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from ledger_cluster import LedgerCluster, block_files, join_with_certificate, reading

from conftest import require
from procs import PYTHON, which
from tomq import cluster
from tomq.mqtt import wait_until
from tomq.node.cli import write_genesis
from tomq.node.ledger.block import block_file_name, decode_block_file
from tomq.node.ledger_service import audit_lines


@pytest.fixture
def running(tmp_path):
    require("mosquitto", which("mosquitto") is not None, "install the Debian package mosquitto")
    ledger = LedgerCluster(tmp_path, nodes=3, broker="mosquitto", extra_args=("--snapshot-every", "4"))
    ledger.start()
    yield ledger
    ledger.stop()


def verify(path: Path, directory: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "tomq", "ledger", "verify", str(path), "--operator-key",
                           str(directory / "operator" / "operator.pub")], capture_output=True, text=True, timeout=120)


def start_proposing(ledger: LedgerCluster):
    proposer = ledger.proposer()
    join, seq = proposer.seal(join_with_certificate(ledger.directory, "s1"))
    proposer.propose(join)
    assert not proposer.wait([seq], 30, {seq: join}), ledger.logs()
    return proposer


def stores_match_shared(ledger: LedgerCluster, names: list[str]) -> bool:
    shared = block_files(ledger.ledger_dir)
    return all(block_files(ledger.store(n)) == shared for n in names)


def test_leader_killed_while_records_stream_then_it_restarts_and_catches_up(running):
    proposer = start_proposing(running)
    try:
        sealed: dict[int, bytes] = {}
        for i in range(200):
            wire, seq = proposer.seal(reading(i))
            sealed[seq] = wire
            proposer.propose(wire)
        assert not proposer.wait(list(sealed), 30, sealed)
        victim = running.leader()
        assert victim is not None
        running.nodes[victim].kill()
        killed_at = time.monotonic()
        survivors = [n for n in running.names if n != victim]
        after_kill: dict[int, bytes] = {}
        failover = None
        for round_start in range(200, 600, 50):
            # Rounds that each wait for their commit: at least a block and a certificate entry per
            # round, so the log is compacted (every 4 entries here) while the victim is down.
            batch: dict[int, bytes] = {}
            for i in range(round_start, round_start + 50):
                wire, seq = proposer.seal(reading(i))
                batch[seq] = wire
                proposer.propose(wire)
            after_kill.update(batch)
            assert not proposer.wait(list(batch), 30, after_kill), running.logs()
            if failover is None:
                failover = time.monotonic() - killed_at
        assert failover is not None
        new_leader = running.leader()
        assert new_leader in survivors
        # Every acknowledged record is in the ledger exactly once, on every survivor.
        assert wait_until(lambda: stores_match_shared(running, survivors), 30, 0.2), running.logs()
        # The killed node comes back; the log was compacted meanwhile, so it catches up from a snapshot.
        running.nodes[victim].start()
        assert wait_until(lambda: stores_match_shared(running, running.names), 60, 0.3), running.nodes[victim].tail()
        result = verify(running.ledger_dir, running.directory)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "604 records" in result.stdout and "PROV-DATA 600" in result.stdout  # 3 nodes + s1 + 600, once each
        assert "caught up to ledger height" in running.nodes[victim].tail(400)  # via a snapshot, not the log
        print(f"failover (kill to first commit after it): {failover:.2f} s; {result.stdout.strip()}")
        assert failover < 3.0  # bench/cluster.py reports the median; 0.7-1.0 s on this machine
    finally:
        proposer.close()


def test_a_follower_stopped_for_ten_seconds_catches_up(running):
    proposer = start_proposing(running)
    try:
        leader = running.leader()
        follower = next(n for n in running.names if n != leader)
        running.nodes[follower].signal(signal.SIGSTOP)
        try:
            sealed = {}
            for i in range(300):
                wire, seq = proposer.seal(reading(i))
                sealed[seq] = wire
                proposer.propose(wire)
            assert not proposer.wait(list(sealed), 30, sealed)
            time.sleep(10)
        finally:
            running.nodes[follower].signal(signal.SIGCONT)
        assert wait_until(lambda: stores_match_shared(running, running.names), 30, 0.2), running.logs()
    finally:
        proposer.close()


def test_audit_stream_status_metrics_and_tampering(running, tmp_path):
    proposer = start_proposing(running)
    loaded = cluster.load(running.directory)
    password = cluster.broker_password(loaded.signing_key("n2"))
    sub = subprocess.Popen([which("mosquitto_sub") or "mosquitto_sub", "-h", "127.0.0.1", "-p", str(running.broker.port),
                            "-u", "n2", "-P", password, "-t", "tomq/+/audit/#", "-v"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)  # let the subscription settle
        sealed = {}
        for i in range(50):
            wire, seq = proposer.seal(reading(i))
            sealed[seq] = wire
            proposer.propose(wire)
        assert not proposer.wait(list(sealed), 30, sealed)
        time.sleep(0.5)
    finally:
        proposer.close()
        sub.terminate()
        out, err = sub.communicate(timeout=10)
    lines = [line for line in out.splitlines() if "/audit/PROV-DATA " in line]
    assert len(lines) == 50, (out[-2000:], err)
    topic, payload = lines[0].split(" ", 1)
    assert topic == f"tomq/{loaded.name}/audit/PROV-DATA"
    line = json.loads(payload)
    assert line["state"] == "PROV-DATA" and line["body"]["prov"]["source"] == "s1"
    # Every line the leader sent is the one an auditor derives from the block file it names.
    for received in lines:
        topic, payload = received.split(" ", 1)
        line = json.loads(payload)
        stored = running.store(running.names[0]) / block_file_name(line["height"])
        assert wait_until(stored.exists, 10), stored
        expected = [json.loads(text) for t, text in audit_lines(loaded.topics, line["height"],
                                                                 decode_block_file(stored.read_bytes()))
                    if t == topic and json.loads(text)["index"] == line["index"]]
        assert expected == [line]

    # Prometheus metrics on the loopback port of each node.
    for name in running.names:
        text = urllib.request.urlopen(running.metrics_url(name), timeout=5).read().decode()
        assert "tomq_raft_term" in text and "tomq_ledger_records_committed" in text
    leader = running.leader()
    assert leader is not None
    text = urllib.request.urlopen(running.metrics_url(leader), timeout=5).read().decode()
    assert "tomq_raft_role 3.0" in text
    committed = [float(line.split()[-1]) for line in text.splitlines() if line.startswith("tomq_ledger_records_committed_total")]
    assert committed and committed[0] >= 51

    # tomq status, as an operator runs it.
    status = subprocess.run([PYTHON, "-m", "tomq", "status", str(running.directory), "--json"],
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    view = json.loads(status.stdout)
    assert view["leader"] == leader and all(view["nodes"][n]["reported"] for n in running.names)
    assert view["height"] >= 1

    # Tampering: one changed byte, or one deleted file, is named by height.
    assert wait_until(lambda: stores_match_shared(running, running.names), 30, 0.2)
    copy = tmp_path / "tampered"
    shutil.copytree(running.ledger_dir, copy)
    files = sorted(copy.glob("*.block"))
    assert len(files) >= 3
    target = files[len(files) // 2]
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    height = int(target.stem)
    result = verify(copy, running.directory)
    assert result.returncode == 1 and f"height {height}" in result.stdout, result.stdout
    target.write_bytes((running.ledger_dir / target.name).read_bytes())
    files[1].unlink()
    result = verify(copy, running.directory)
    assert result.returncode == 1 and f"height {int(files[1].stem)}" in result.stdout, result.stdout


def test_a_node_whose_metrics_port_is_taken_says_so_in_one_line_and_starts_nothing(tmp_path):
    directory = tmp_path / "cluster"
    cluster.init(directory, ["n1", "n2", "n3"])
    write_genesis(directory)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        # No broker runs: a node that got past its metrics would wait for one instead of exiting.
        done = subprocess.run([PYTHON, "-m", "tomq", "node", str(directory), "--id", "n1", "--port", "1",
                               "--metrics-port", str(port)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    errors = done.stderr.strip().splitlines()
    assert errors[-1] == f"tomq: ConfigError: cannot serve metrics on 127.0.0.1:{port}: Address already in use"
    assert "Traceback" not in done.stderr
    refused = subprocess.run([PYTHON, "-m", "tomq", "node", str(directory), "--id", "n1", "--metrics-port", "70000"],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "--metrics-port 70000 is not between 0 and 65535" in refused.stderr
