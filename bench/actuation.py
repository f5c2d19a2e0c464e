"""A contract's command, from the committed trigger to the actuator, against one record's commit.

    .venv/bin/python bench/actuation.py [--nodes 3] [--triggers 30] [--repeats 3] [--tick-ms 50]

A fresh cluster (mosquitto and N `tomq node --runtime process` on loopback) runs one service whose
executable contracts command a traffic light: green when the analyser's `density.j1.cars_mean` is
above 3, red below 2. The light (actuator `tl-j1`) joins by its own signed message and listens on its
cmd topic; node n1's key proposes the analyser results, alternately 5 and 1 cars, so every trigger
changes the setting and fires one command. For each trigger, one at a time on a quiet cluster:

  * trigger commit: publishing the result on ledger/propose/n1 -> its audit line (one commit round,
    what bench/cluster.py measures);
  * command: publishing the result -> the light receives the signed command, which its own checker
    accepts (the command record committed after the trigger, its block certified by a majority).

The command needs the trigger's commit, its own record's commit and its block's certificate, so
three commit rounds are its floor; the table prints the command latency as a ratio of the trigger's
commit latency measured in the same run. Each run's p50 and p99, medians over the runs.

Every process this script starts runs in its own session and is stopped at the end, also on Ctrl-C
or an error; nothing else is touched. A benchmark, never a test.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Processes, log, log_tails, median, percentile, which
from bench.orchestration import OrchCluster
from tomq import cluster
from tomq.identity import SigningKey
from tomq.mqtt import MqttLink
from tomq.node.orchestrator.requests import seal_deploy
from tomq.node.orchestrator.spec import spec_from_map
from tomq.records import DATA, Provenance, Record
from tomq.sensors.command import CommandChecker, quorum_from_cluster
from tomq.wire import ClockSequence, SequenceCounter, seal

LIGHT = "tl-j1"
QUIET_SECONDS = 0.5  # between triggers: each meets a cluster done with the last one
CONTRACTS = [
    {"name": "j1-busy", "kind": "executable", "on": "result", "when": {"field": "density.j1.cars_mean", "above": 3.0},
     "then": [{"command": LIGHT, "set": {"colour": "green"}}]},
    {"name": "j1-quiet", "kind": "executable", "on": "result", "when": {"field": "density.j1.cars_mean", "below": 2.0},
     "then": [{"command": LIGHT, "set": {"colour": "red"}}]},
]


class Site:
    """The light, and node n1's key proposing analyser results and reading their audit lines."""

    def __init__(self, running: OrchCluster) -> None:
        loaded = cluster.load(running.directory)
        self.service = running.services[0]
        self.loaded = loaded
        self.changed = threading.Condition()
        self.commands: list[tuple[float, bytes]] = []  # (monotonic arrival, wire)
        self.committed: dict[int, float] = {}  # seq -> monotonic arrival of its audit line
        light_key = loaded.signing_key(LIGHT)
        self.light_key = light_key
        self.light = MqttLink(host="127.0.0.1", port=running.port, username=LIGHT,
                              password=cluster.broker_password(light_key), on_message=self._on_command)
        self.light.subscribe(loaded.topics.device_cmd(LIGHT), qos=1)
        self.light.start()
        self.key = loaded.signing_key("n1")
        self.sequence = ClockSequence()
        self.proposer = MqttLink(host="127.0.0.1", port=running.port, username="n1",
                                 password=cluster.broker_password(self.key), on_message=self._on_audit)
        self.proposer.subscribe(f"{loaded.topics.root}/audit/#")
        self.proposer.start()

    def _on_command(self, topic: str, payload: bytes, retained: bool) -> None:
        with self.changed:
            self.commands.append((time.monotonic(), payload))
            self.changed.notify_all()

    def _on_audit(self, topic: str, payload: bytes, retained: bool) -> None:
        now = time.monotonic()
        try:
            line = json.loads(payload)
        except ValueError:
            return
        if isinstance(line, dict) and line.get("proposer") == self.key.id and isinstance(line.get("seq"), int):
            with self.changed:
                self.committed.setdefault(line["seq"], now)
                self.changed.notify_all()

    def join_light(self) -> None:
        wire = seal(self.light_key, seq=1, time_ms=int(time.time() * 1000), type="join",
                    body={"certificate": self.loaded.certificate(LIGHT).encoded})
        self.light.publish(self.loaded.topics.device_state(LIGHT), wire, qos=1, retain=True)

    def trigger(self, cars: float) -> tuple[float, float, bytes]:
        """Propose one analyser result; (seconds to its audit line, seconds to the command, the command)."""
        summary = {"count": 4, "density": {"j1": {"readings": 4, "cars_mean": cars, "cars_last": cars}}}
        digest = hashlib.sha256(repr((summary, time.time_ns())).encode()).digest()
        # As the service's analyser records its result (a contract fires on its own service's results).
        record = Record(DATA, Provenance(f"result:{digest.hex()[:32]}", digest, f"analyse:{self.service}",
                                         f"publish:{self.service}"), int(time.time() * 1000), {"summary": summary})
        seq = self.sequence.next()
        wire = seal(self.key, seq=seq, time_ms=int(time.time() * 1000), type="record", body=record.to_map())
        with self.changed:
            before = len(self.commands)
        started = time.monotonic()
        self.proposer.publish(self.loaded.topics.ledger_propose("n1"), wire, qos=1)
        with self.changed:
            if not self.changed.wait_for(lambda: seq in self.committed and len(self.commands) > before, 10):
                raise TimeoutError(f"trigger {seq}: audit line {'seen' if seq in self.committed else 'missing'}, "
                                   f"no command within 10 s")
            arrived, command = self.commands[before]
            return self.committed[seq] - started, arrived - started, command

    def close(self) -> None:
        self.light.stop()
        self.proposer.stop()


def deploy(running: OrchCluster) -> None:
    operator = SigningKey.load(running.directory / "operator" / "operator.key")
    counter = SequenceCounter(running.directory / "operator" / "sequence")
    service = running.services[0]
    spec = spec_from_map({"name": service, "command": ["/usr/bin/sleep", "1000000"], "replicas": 1,
                          "contracts": CONTRACTS}, source="bench")
    certificate = (running.directory / "members" / service / "cert.cbor").read_bytes()
    placed = threading.Event()

    def on_placement(topic: str, payload: bytes, retained: bool) -> None:
        if payload:
            placed.set()

    link = MqttLink(host="127.0.0.1", port=running.port, username="n1",
                    password=cluster.broker_password(running.loaded.signing_key("n1")), on_message=on_placement)
    link.subscribe(running.loaded.topics.orch_placement(service), qos=1)
    link.start()
    try:
        wire = seal_deploy(operator, counter, spec, certificate)
        deadline = time.monotonic() + 60
        while not placed.is_set():  # sent again every 2 s, as `tomq deploy` does, until placed
            if time.monotonic() > deadline:
                raise TimeoutError(f"{service} not placed within 60 s")
            link.publish(running.loaded.topics.orch_request(), wire, qos=1)
            placed.wait(2.0)
    finally:
        link.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--triggers", type=int, default=30, help="commands per run (default 30)")
    parser.add_argument("--repeats", type=int, default=3, help="runs (default 3)")
    parser.add_argument("--tick-ms", type=float, default=50.0, help="the nodes' Raft tick (default 50)")
    parser.add_argument("--keep", action="store_true", help="keep the cluster directory and logs")
    args = parser.parse_args(argv)
    if which("mosquitto") is None:
        log("needs mosquitto: apt-get install -y mosquitto")
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    processes = Processes()
    workdir = Path(tempfile.mkdtemp(prefix="tomq-bench-actuation-"))
    running = OrchCluster(processes, workdir, "stable", args.nodes, 1, ("--tick-ms", str(args.tick_ms)))
    cluster.add_member(running.directory, LIGHT, "actuator")
    running.loaded = cluster.load(running.directory)
    site: Site | None = None
    keep = args.keep
    commits: list[list[float]] = []
    commands: list[list[float]] = []
    try:
        running.start()
        deploy(running)
        site = Site(running)
        site.join_light()
        loaded = site.loaded
        checker = CommandChecker(loaded.operator, loaded.name, LIGHT, quorum_from_cluster(loaded))
        site.trigger(5.0)  # warm-up; also waits until the light's join is on the ledger and commands flow
        cars = 1.0
        for run in range(args.repeats):
            commit_run, command_run = [], []
            for _ in range(args.triggers):
                time.sleep(QUIET_SECONDS)
                commit, command, wire = site.trigger(cars)
                checked = checker.check(wire, time.time())  # what the light itself would accept
                wanted = "green" if cars > 3 else "red"
                if checked.setting != {"colour": wanted}:
                    raise AssertionError(f"the light was told {checked.setting}, not {wanted}")
                cars = 6.0 - cars  # 1 <-> 5: every trigger changes the setting
                commit_run.append(commit)
                command_run.append(command)
            commits.append(commit_run)
            commands.append(command_run)
            log(f"run {run + 1}: trigger commit p50 {percentile(commit_run, 0.5) * 1000:.1f} ms, "
                f"command p50 {percentile(command_run, 0.5) * 1000:.1f} ms, "
                f"p99 {percentile(command_run, 0.99) * 1000:.1f} ms")
    except Exception:
        keep = True
        log(log_tails(workdir, running.names))
        raise
    finally:
        if site is not None:
            site.close()
        running.stop()
        if keep:
            log(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    def med(runs: list[list[float]], fraction: float) -> float:
        value = median([percentile(run, fraction) for run in runs])
        assert value is not None
        return value * 1000

    print(f"Medians of {args.repeats} run(s) of {args.triggers} triggers, one at a time ({QUIET_SECONDS} s apart), "
          f"{args.nodes} nodes, mosquitto, --tick-ms {args.tick_ms:g}")
    print(f"{'':28s}{'p50 ms':>8s}{'p99 ms':>8s}")
    print(f"{'trigger commit':28s}{med(commits, 0.5):8.1f}{med(commits, 0.99):8.1f}")
    print(f"{'trigger -> command':28s}{med(commands, 0.5):8.1f}{med(commands, 0.99):8.1f}")
    print(f"command / trigger commit (p50): {med(commands, 0.5) / med(commits, 0.5):.1f}x "
          "(floor: 3 commit rounds - the trigger, the command record, its certificate)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
