"""What `bash scripts/demo` runs until `tomq demo` exists: a real cluster on this machine, end to end.

It creates a cluster in ./demo-cluster (or the directory given), starts the embedded broker and
three `tomq node` processes, enrols a sensor, commits its join and 200 signed readings through
Raft, shows `tomq status` and the tail of the ledger, verifies the shared ledger directory offline
with only the operator's public key, and stops everything it started.
"""

from __future__ import annotations

import hashlib
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from tomq.node.cli import Proposer, write_genesis
from tomq.records import DATA, ID_CREATE, Identity, Provenance, Record

TOMQ = [sys.executable, "-m", "tomq"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"the broker did not listen on {port}")


def main() -> int:
    directory = Path(sys.argv[1] if len(sys.argv) > 1 else "demo-cluster").resolve()
    if directory.exists():
        shutil.rmtree(directory)  # a demo starts from scratch every time
    port = free_port()
    print(f"== tomq init {directory} --nodes n1,n2,n3 --broker 127.0.0.1:{port}")
    subprocess.run([*TOMQ, "init", str(directory), "--nodes", "n1,n2,n3", "--broker", f"127.0.0.1:{port}"], check=True)
    subprocess.run([*TOMQ, "device", "add", str(directory), "--name", "temp1", "--role", "sensor"], check=True)
    if not (directory / "genesis.block").exists():
        write_genesis(directory)
    ledger_dir = directory / "shared-ledger"
    logs = directory / "logs"
    logs.mkdir()
    processes = []
    try:
        print("== tomq broker (embedded amqtt with tomq's ACL) and three tomq node processes")
        broker_log = open(logs / "broker.log", "wb")
        processes.append(subprocess.Popen([*TOMQ, "broker", str(directory)], stdout=broker_log, stderr=subprocess.STDOUT))
        wait_for_port(port)
        for name in ("n1", "n2", "n3"):
            log = open(logs / f"{name}.log", "wb")
            processes.append(subprocess.Popen([*TOMQ, "node", str(directory), "--id", name, "--ledger-dir",
                                               str(ledger_dir)], stdout=log, stderr=subprocess.STDOUT))
        proposer = Proposer(str(directory), "n1")
        try:
            proof = (directory / "members" / "temp1" / "cert.cbor").read_bytes()
            join, seq = proposer.seal(Record(ID_CREATE, Identity("temp1", "device", proof), int(time.time() * 1000)).to_map())
            proposer.propose(join)
            if proposer.wait([seq], 30, {seq: join}):
                raise SystemExit("the sensor's join was not committed; see " + str(logs))
            sealed = {}
            for i in range(200):
                reading = f"temp1 reading {i}: {20 + i % 7}.5 C".encode()
                record = Record(DATA, Provenance(f"reading:{i}", hashlib.sha256(reading).digest(), "sample:temp1",
                                                 "collect:demo", source="temp1"), int(time.time() * 1000))
                wire, seq = proposer.seal(record.to_map())
                sealed[seq] = wire
            started = time.monotonic()
            for wire in sealed.values():
                proposer.propose(wire)
            missing = proposer.wait(list(sealed), 30, sealed)
            print(f"== 200 signed readings committed in {time.monotonic() - started:.2f} s"
                  f"{'' if not missing else f' ({len(missing)} missing!)'}")
        finally:
            proposer.close()
        time.sleep(1.5)  # status reports are published once a second
        print("== tomq status")
        subprocess.run([*TOMQ, "status", str(directory)])
        print("== tomq ledger tail (last lines)")
        tail = subprocess.run([*TOMQ, "ledger", "tail", str(directory)], capture_output=True, text=True)
        print("\n".join(tail.stdout.splitlines()[-5:]))
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
    print(f"== tomq ledger verify {ledger_dir} --operator-key {directory}/operator/operator.pub")
    result = subprocess.run([*TOMQ, "ledger", "verify", str(ledger_dir), "--operator-key",
                             str(directory / "operator" / "operator.pub")])
    print(f"cluster directory: {directory}; node logs in {logs}")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
