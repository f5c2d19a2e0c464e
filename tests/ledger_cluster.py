"""A running cluster for ledger tests: a broker, N `tomq node` processes, and a proposer."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

from procs import BROKERS, PYTHON, NodeProcess, leader_from_logs
from tomq import cluster, records
from tomq.node.cli import Proposer, write_genesis
from tomq.node.ledger.block import decode_block_file
from tomq.records import DATA, ID_CREATE, Identity, Provenance, Record

TOMQ = [PYTHON, "-m", "tomq"]


class LedgerCluster:
    def __init__(self, tmp_path: Path, nodes: int = 3, broker: str = "mosquitto", ledger_dir: Path | None = None,
                 mode: str = "stable", extra_args: tuple[str, ...] = (), cluster_name: str | None = None) -> None:
        self.extra_args = extra_args
        self.directory = tmp_path / "cluster"
        self.names = [f"n{i}" for i in range(1, nodes + 1)]
        cluster.init(self.directory, self.names, cluster_name=cluster_name)
        cluster.add_member(self.directory, "s1", "sensor")
        write_genesis(self.directory)
        self.cluster = cluster.load(self.directory)
        self.broker = BROKERS[broker](self.directory, tmp_path / "broker")
        self.ledger_dir = ledger_dir if ledger_dir is not None else tmp_path / "shared-ledger"
        self.tmp_path = tmp_path
        self.mode = mode
        self.nodes = {name: NodeProcess(self._argv(name), tmp_path / f"{name}.log") for name in self.names}

    def _argv(self, name: str) -> list[str]:
        return [*TOMQ, "node", str(self.directory), "--id", name, "--host", "127.0.0.1",
                "--port", str(self.broker.port), "--ledger-dir", str(self.ledger_dir), "--mode", self.mode,
                "--metrics-port", "0", *self.extra_args]

    def start(self) -> None:
        self.broker.start()
        for node in self.nodes.values():
            node.start()

    def stop(self) -> None:
        for node in self.nodes.values():
            node.stop()
        self.broker.close()

    def proposer(self) -> Proposer:
        # The proposer reads the broker address from cluster.toml; point it at the test broker.
        self.cluster = cluster.load(self.directory)
        text = (self.directory / "cluster.toml").read_text()
        if f"port = {self.broker.port}" not in text:
            import re

            text = re.sub(r"port = \d+", f"port = {self.broker.port}", text)
            (self.directory / "cluster.toml").write_text(text)
        return Proposer(str(self.directory), "n1")

    def metrics_url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.nodes[name].metrics_port()}/metrics"

    def store(self, name: str) -> Path:
        return self.directory / "members" / name / "state" / "blocks"

    def leader(self) -> str | None:
        """The node that most recently logged becoming leader (highest term), from the nodes' logs."""
        return leader_from_logs(self.nodes, 5000)

    def logs(self) -> str:
        return "\n".join(f"--- {name}\n{node.tail(40)}" for name, node in self.nodes.items())


def sensor_join() -> dict[str, Any]:
    return Record(ID_CREATE, Identity("s1", "device", b"placeholder"), int(time.time() * 1000)).to_map()


def reading(i: int) -> dict[str, Any]:
    digest = hashlib.sha256(f"reading {i}".encode()).digest()
    return Record(DATA, Provenance(f"reading:{i}", digest, "sample:s1", "collect:c1", source="s1"),
                  int(time.time() * 1000)).to_map()


def join_with_certificate(directory: Path, name: str) -> dict[str, Any]:
    proof = (directory / "members" / name / "cert.cbor").read_bytes()
    return Record(ID_CREATE, Identity(name, "device", proof), int(time.time() * 1000)).to_map()


def block_files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.block"))}


def readings_in(files: dict[str, bytes]) -> int:
    """PROV-DATA records in these block files. A record's audit line leaves at commit, its block file
    a tick or two later (certified): wait on this, not on the files agreeing at some moment."""
    return sum(1 for data in files.values() for envelope in decode_block_file(data).block.records
               if b"PROV-DATA" in envelope)


__all__ = ["LedgerCluster", "block_files", "join_with_certificate", "reading", "readings_in", "records"]
