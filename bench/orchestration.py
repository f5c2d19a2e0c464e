"""Placement latency of the orchestrator on real processes, stable leader against on-demand Raft.

    .venv/bin/python bench/orchestration.py [--quick] [--modes stable,on-demand] [--nodes 3,5,7]
                                            [--rates seq,2,5] [--requests N] [--repeats R]

The consensus paper's experiment (seeds/consensus-orchestration-edge.txt, "Performance analysis"),
on this machine: for each mode (`stable`, `on-demand`), cluster size and request rate, a fresh
cluster of real `tomq node --runtime process` processes behind a mosquitto broker on 127.0.0.1
receives many small deployments, each a distinct service (replicas = 1, a sleeper command). They
are sent as `tomq deploy` sends them (an operator-signed request on `orch/request`, sealed here with
node/orchestrator/requests.py) but from this process, and the client notes:

  * latency: request published -> the retained `orch/placement/<service>` naming a node arrives,
    i.e. the decision is committed (p50, p99 per run);
  * the phases of the same placements as the deciding node reports them (`placement_timings` in
    the retained, signed `node/<id>/load` reports, the data behind `tomq status --json`): request
    transfer, election network, vote processing, registration (waiting for an earlier planning round:
    a service's identity and its placement normally share one block), choosing, log write, consensus network, consensus processing and
    total (request received -> decision committed), the median of each per run.

Rates: `seq` sends one request at a time (the next QUIET_SECONDS after the previous one's instance
is recorded as running, so every placement meets a quiet cluster); a number sends that many requests per second
on a fixed schedule, whatever the cluster does. Each mode, size and rate gets a fresh cluster, and
its runs follow one another on it. Every figure printed is the median over the runs. A placement
the client has not seen `--give-up` seconds after the last progress is given up on (counted late if
it still arrives during its run, lost if never: infinitely late in the percentiles), and the
nodes' reports say where it is.

The floor of on-demand placement is one election round trip plus one replication round trip. It is
measured twice on every cluster: "raw" = 2 x (MQTT round trip between two clients of this process
through the same broker + one fsync of a small write in the cluster directory), measured while the
cluster idles; "phases" = median(election network + vote processing) + median(consensus network +
log write) from the on-demand nodes' own reports. The targets of issue 5 are judged against them.

Every process this script starts runs in its own session and is stopped at the end, also on Ctrl-C
or an error; the service instances the nodes started (their own sessions, marked TOMQ_CLUSTER=<this
run's unique cluster name>) are killed by process group; the temporary directories are removed
unless --keep. A benchmark, never a test.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Run as a script, bench/ is on sys.path, the repository is not: make bench.common importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    PYTHON,
    Processes,
    cpu_seconds,
    cpu_shares,
    free_port,
    interrupted,
    log,
    log_tails,
    median,
    num,
    percentile,
    wait_for_port,
    wait_until,
    which,
)
from tomq import cluster
from tomq.errors import EnvelopeRejected
from tomq.identity import SigningKey
from tomq.mqtt import MqttLink
from tomq.node.cli import write_genesis
from tomq.node.orchestrator.requests import seal_deploy
from tomq.node.orchestrator.spec import ServiceSpec, spec_from_map
from tomq.wire import EnvelopeOpener, SequenceCounter

PHASES = ("request_transfer", "election_network", "vote_processing", "registration", "choosing",
          "log_write", "consensus_network", "consensus_processing", "total", "unaccounted")
# The phases that make up `total` (request received here -> decision committed); what they leave of
# the total is printed as "unaccounted" (e.g. an on-demand node's wait before it stands for election).
INSIDE_TOTAL = ("election_network", "vote_processing", "registration", "choosing", "log_write",
                "consensus_network", "consensus_processing")
SHORT = {"request_transfer": "xfer", "election_network": "el-net", "vote_processing": "vote",
         "registration": "regist", "choosing": "choose", "log_write": "logw", "consensus_network": "co-net",
         "consensus_processing": "co-proc", "total": "total", "unaccounted": "other"}
RESEND_SECONDS = 2.0  # as `tomq deploy`: a request not placed by then is sent again (same bytes)
RUNNING_WAIT = 2.0  # how long to wait for a placed instance's container record before going on
# After that record's audit line the nodes are still applying, certifying and writing its block, and
# an on-demand leader has not paused yet: a request sent then measured that work, not a placement
# (and in on-demand mode often found a leader still in office, so no election at all).
QUIET_SECONDS = 0.5
# Targets of issue 5.
TARGET_STABLE_SPEEDUP = 5.0  # stable places at least this much faster than on-demand, at 5 nodes
TARGET_SPEEDUP_NODES = 5
TARGET_FLOOR_RATIO = 2.0  # on-demand within this factor of one election + one replication round trip


# --------------------------------------------------------------------------- processes


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy (all but idle and iowait), from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


class CpuWindow:
    """CPU shares of our processes over a window, and of everything else on the machine."""

    def __init__(self, processes: dict[str, subprocess.Popen[bytes]]) -> None:
        self.processes = processes
        self.before = cpu_seconds(processes)
        self.machine = machine_busy_seconds()
        self.started = time.monotonic()

    def shares(self) -> dict[str, float]:
        elapsed = time.monotonic() - self.started
        shares = cpu_shares(self.before, cpu_seconds(self.processes), elapsed)
        shares["others"] = max(0.0, (machine_busy_seconds() - self.machine) / elapsed - sum(shares.values()))
        return shares


def instance_pids(cluster_name: str) -> list[int]:
    """Pids of the service instances of `cluster_name`: they carry TOMQ_CLUSTER=<name> in their
    environment (the process runtime sets it), a name no other cluster on this machine has."""
    marker = f"TOMQ_CLUSTER={cluster_name}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        if marker in environ.split(b"\0"):
            found.append(int(entry))
    return found


def kill_instances(cluster_name: str) -> int:
    """SIGKILL every instance of `cluster_name` with its process group (each runs in its own session)."""
    killed = 0
    for _ in range(3):  # a group leader's child found in the same scan is gone with its group
        pids = instance_pids(cluster_name)
        if not pids:
            break
        for pid in pids:
            try:
                if os.getpgid(pid) == pid:
                    os.killpg(pid, signal.SIGKILL)
                else:
                    os.kill(pid, signal.SIGKILL)
                killed += 1
            except OSError:
                pass
        time.sleep(0.2)
    return killed


# --------------------------------------------------------------------------- the cluster


class OrchCluster:
    """mosquitto and N `tomq node --runtime process` processes on loopback, in a fresh directory."""

    def __init__(self, processes: Processes, workdir: Path, mode: str, nodes: int, services: int,
                 node_args: tuple[str, ...]) -> None:
        self.processes = processes
        self.workdir = workdir
        self.mode = mode
        self.node_args = node_args
        self.port = free_port()
        self.directory = workdir / "cluster"
        self.names = [f"n{i}" for i in range(1, nodes + 1)]
        # Unique on this machine: instances are found (and killed) by it.
        self.name = f"orchbench{os.getpid()}{secrets.token_hex(3)}"
        cluster.init(self.directory, self.names, cluster_name=self.name, broker=f"127.0.0.1:{self.port}")
        # Every service identity up front, as `tomq deploy` would enrol it, before the broker reads
        # the password file (a running mosquitto would need a reload).
        self.services = [f"svc{i:04d}" for i in range(services)]
        for service in self.services:
            cluster.add_member(self.directory, service, "service")
        write_genesis(self.directory)
        self.loaded = cluster.load(self.directory)
        self.nodes: dict[str, subprocess.Popen[bytes]] = {}
        self.broker: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        from tomq.broker.mosquitto import write_mosquitto_config

        binary = which("mosquitto")
        assert binary is not None
        config = write_mosquitto_config(self.directory, self.workdir / "mosquitto", self.port)
        self.broker = self.processes.start([binary, "-c", str(config)], self.workdir / "mosquitto.log")
        wait_for_port(self.port, self.broker)
        for name in self.names:
            argv = [PYTHON, "-m", "tomq", "node", str(self.directory), "--id", name, "--host", "127.0.0.1",
                    "--port", str(self.port), "--ledger-dir", str(self.workdir / "shared-ledger"),
                    "--mode", self.mode, "--runtime", "process", *self.node_args]
            self.nodes[name] = self.processes.start(argv, self.workdir / f"{name}.log")

    def all_processes(self) -> dict[str, subprocess.Popen[bytes]]:
        out = dict(self.nodes)
        if self.broker is not None:
            out["broker"] = self.broker
        return out

    def stop(self) -> None:
        for process in self.nodes.values():
            self.processes.stop(process)  # first: a live node would restart what is killed below
        kill_instances(self.name)
        if self.broker is not None:
            self.processes.stop(self.broker)

    def log_tails(self, lines: int = 15) -> str:
        return log_tails(self.workdir, self.names, lines)


# --------------------------------------------------------------------------- the client


@dataclass
class Sent:
    service: str
    wire: bytes
    at: float  # monotonic, just before the first publish
    resends: int = 0
    last_sent: float = 0.0


class Client:
    """The operator's side: seals deployments, publishes them on orch/request, and watches the
    retained placements, the audit lines and the nodes' signed load reports (as node n1, like
    `tomq deploy` and `tomq status` do until operators are broker users)."""

    def __init__(self, running: OrchCluster, sleeper: list[str]) -> None:
        loaded = running.loaded
        self.topics = loaded.topics
        self.sleeper = sleeper
        self.operator = SigningKey.load(running.directory / "operator" / "operator.key")
        self.counter = SequenceCounter(running.directory / "operator" / "sequence")
        self.certificates = {s: (running.directory / "members" / s / "cert.cbor").read_bytes()
                             for s in running.services}
        self.opener = EnvelopeOpener(loaded.trust_store(), accepted_types=frozenset({"load"}))
        self.node_ids = {m.id: m.name for m in loaded.members if m.role == "node"}
        self.changed = threading.Condition()
        self.sent: dict[str, Sent] = {}
        self.placed: dict[str, float] = {}  # service -> monotonic time its placement arrived
        self.registered: dict[str, float] = {}  # service -> its PROV-ID-create audit line
        self.decided: dict[str, float] = {}  # service -> its PROV-ORCH place audit line
        self.running: dict[str, float] = {}  # service -> its container's PROV-ID-create audit line
        self.timings: dict[str, dict[str, Any]] = {}  # service -> placement timing, as reported
        self.reports: dict[str, dict[str, Any]] = {}  # node -> its last load report
        self.request_topic = self.topics.orch_request()
        key = loaded.signing_key("n1")
        self.link = MqttLink(host="127.0.0.1", port=running.port, username="n1",
                             password=cluster.broker_password(key), on_message=self._on_message)
        self.link.subscribe(f"{self.topics.root}/orch/placement/+", qos=1)
        self.link.subscribe(f"{self.topics.root}/audit/#", qos=1)
        self.link.subscribe(f"{self.topics.root}/node/+/load")
        self.link.start()
        self.rtt_link: MqttLink | None = None

    # -- inputs ------------------------------------------------------------------------------------

    def _on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        now = time.monotonic()
        root = self.topics.root
        if topic.startswith(f"{root}/orch/placement/"):
            try:
                document = json.loads(payload) if payload else None
            except ValueError:
                return
            if isinstance(document, dict) and document.get("replicas"):
                with self.changed:
                    self.placed.setdefault(str(document.get("service")), now)
                    self.changed.notify_all()
        elif topic.startswith(f"{root}/audit/"):
            self._on_audit(payload, now)
        elif topic.startswith(f"{root}/node/") and topic.endswith("/load"):
            self._on_report(topic.split("/")[-2], payload)

    def _on_audit(self, payload: bytes, now: float) -> None:
        try:
            line = json.loads(payload)
            body = line["body"]
        except (ValueError, KeyError, TypeError):
            return
        if not isinstance(body, dict):
            return
        identity, orchestrate = body.get("identity"), body.get("orchestrate")
        with self.changed:
            if line.get("state") == "PROV-ID-create" and isinstance(identity, dict):
                name = str(identity.get("object", ""))
                if identity.get("kind") == "service":
                    self.registered.setdefault(name, now)
                elif identity.get("kind") == "container":
                    self.running.setdefault(name.split(":", 1)[0], now)
            elif line.get("state") == "PROV-ORCH" and isinstance(orchestrate, dict):
                if orchestrate.get("action") == "place":
                    self.decided.setdefault(str(orchestrate.get("deployed", "")).rsplit(":", 1)[0], now)
            self.changed.notify_all()

    def _on_report(self, node: str, payload: bytes) -> None:
        try:
            envelope = self.opener.open(payload, time.time())
        except EnvelopeRejected:
            return
        if self.node_ids.get(envelope.sender) != node or not isinstance(envelope.body, dict):
            return
        body: dict[str, Any] = envelope.body
        status = body.get("status")
        status = status if isinstance(status, dict) else {}
        orchestration = status.get("orchestration")
        orchestration = orchestration if isinstance(orchestration, dict) else {}
        with self.changed:
            self.reports[node] = body
            for timing in orchestration.get("placement_timings", []) or []:
                if isinstance(timing, dict) and timing.get("trigger") == "request":
                    entry = {**timing, "reported_by": node}
                    self.timings.setdefault(str(timing.get("service")), entry)
            self.changed.notify_all()

    # -- requests ----------------------------------------------------------------------------------

    def spec(self, service: str) -> ServiceSpec:
        return spec_from_map({"name": service, "command": self.sleeper, "replicas": 1}, source="bench")

    def deploy(self, service: str) -> None:
        """Seal (now: the request carries its sending time) and publish one deployment."""
        wire = seal_deploy(self.operator, self.counter, self.spec(service), self.certificates[service])
        at = time.monotonic()
        self.sent[service] = Sent(service, wire, at, last_sent=at)
        self.link.publish(self.request_topic, wire, qos=1)

    def resend_late(self) -> None:
        now = time.monotonic()
        for sent in list(self.sent.values()):
            if sent.service not in self.placed and now - sent.last_sent >= RESEND_SECONDS:
                sent.resends += 1
                sent.last_sent = now
                self.link.publish(self.request_topic, sent.wire, qos=1)

    def wait_placed(self, services: list[str], give_up: float) -> list[str]:
        """Until every one is placed, resending as `tomq deploy` does, or until `give_up` seconds
        pass without a new placement; returns those whose placement never arrived."""
        progress_at, last = time.monotonic(), -1
        while True:
            with self.changed:
                done = sum(1 for s in services if s in self.placed)
                if done == len(services):
                    return []
                if done != last:
                    progress_at, last = time.monotonic(), done
                self.changed.wait(0.05)
            self.resend_late()
            if time.monotonic() - progress_at > give_up:
                return [s for s in services if s not in self.placed]

    def fate(self, services: list[str]) -> dict[str, int]:
        """Where deployments whose placement never arrived stand, by the nodes' latest reports:
        placed (committed, yet orch/placement/<service> never published), registered only (the
        service's identity committed, no placement), or not even registered."""
        placed: set[str] = set()
        registered: set[str] = set()
        with self.changed:
            for report in self.reports.values():
                orchestration = (report.get("status") or {}).get("orchestration") or {}
                placed.update(str(p.get("service")) for p in orchestration.get("placements", []) or []
                              if isinstance(p, dict))
                registered.update(str(name) for name in orchestration.get("services", {}) or {})
        out = {"placed, not published": 0, "registered only": 0, "not registered": 0}
        for service in services:
            if service in placed:
                out["placed, not published"] += 1
            elif service in registered:
                out["registered only"] += 1
            else:
                out["not registered"] += 1
        return {k: v for k, v in out.items() if v}

    def wait_for(self, table: dict[str, Any], services: list[str], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self.changed:
            while not all(s in table for s in services):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self.changed.wait(min(remaining, 0.1))
        return True

    # -- views -------------------------------------------------------------------------------------

    def leader(self) -> str | None:
        with self.changed:
            leaders = {str(r["status"].get("leader")) for r in self.reports.values()
                       if isinstance(r.get("status"), dict) and r["status"].get("leader")}
        return leaders.pop() if len(leaders) == 1 else None

    def describe(self) -> str:
        rows = []
        with self.changed:
            reports = dict(self.reports)
        for node, report in sorted(reports.items()):
            status = report.get("status", {})
            orchestration = status.get("orchestration", {})
            rows.append(f"{node} {status.get('role')} term {status.get('term')} leader {status.get('leader')} "
                        f"commit {status.get('commit')} height {status.get('height')} "
                        f"pending requests {orchestration.get('pending_requests')} "
                        f"unplaceable {orchestration.get('unplaceable')} problems {orchestration.get('problems')}")
        return "; ".join(rows) or "no load reports"

    # -- the raw floor -----------------------------------------------------------------------------

    def mqtt_rtt(self, running: OrchCluster, count: int, size: int = 300) -> float:
        """Median seconds of a round trip between two clients of this process through the broker:
        n1 publishes on svc/<x>/in, an n2 client echoes it on svc/<y>/in (no node listens there).
        Both ends hand messages between paho's thread and ours, so this is, if anything, high."""
        ping = self.topics.service_in(f"rttping{secrets.token_hex(3)}")
        pong = self.topics.service_in(f"rttpong{secrets.token_hex(3)}")
        back = threading.Event()
        holder: dict[str, MqttLink] = {}

        def echo(topic: str, payload: bytes, retained: bool) -> None:
            if topic == ping:
                holder["echo"].publish(pong, payload)

        key = running.loaded.signing_key("n2")
        holder["echo"] = MqttLink(host="127.0.0.1", port=running.port, username="n2",
                                  password=cluster.broker_password(key), on_message=echo)
        holder["echo"].subscribe(ping)
        holder["echo"].start()
        previous = self.link.on_message

        def on_message(topic: str, payload: bytes, retained: bool) -> None:
            if topic == pong:
                back.set()
            elif previous is not None:
                previous(topic, payload, retained)

        self.link.on_message = on_message
        self.link.subscribe(pong)
        try:
            time.sleep(0.3)  # both subscriptions in place
            samples = []
            payload = os.urandom(size)
            for i in range(count + 5):
                back.clear()
                started = time.perf_counter()
                self.link.publish(ping, payload)
                if not back.wait(2.0):
                    continue
                if i >= 5:  # the first few warm the path up
                    samples.append(time.perf_counter() - started)
        finally:
            self.link.on_message = previous
            holder["echo"].stop()
        if not samples:
            raise TimeoutError("no MQTT round trip completed")
        return statistics.median(samples)

    def close(self) -> None:
        self.link.stop()


def fsync_seconds(directory: Path, count: int = 40) -> float:
    """Median seconds of appending ~200 bytes and fsyncing, in `directory` (where the nodes write)."""
    path = directory / f"fsync-probe-{os.getpid()}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    samples = []
    try:
        for _ in range(count):
            started = time.perf_counter()
            os.write(fd, os.urandom(200))
            os.fsync(fd)
            samples.append(time.perf_counter() - started)
    finally:
        os.close(fd)
        path.unlink()
    return statistics.median(samples)


# --------------------------------------------------------------------------- results


@dataclass
class RunResult:
    requests: int
    latencies: list[float]  # seconds, publish -> placement, one per request whose placement arrived
    phases: dict[str, float | None]  # phase -> median ms over the run's reported timings
    registered: float | None  # median seconds publish -> the service's PROV-ID-create audit line
    decided: float | None  # ... -> its PROV-ORCH audit line
    running: float | None  # ... -> its container's PROV-ID-create audit line
    reported: int  # requests whose timing a node reported
    resends: int
    unseen: list[str]  # services whose placement never arrived
    fate: dict[str, int]  # what the nodes report about those
    late: int  # placements that arrived only after the client had given up waiting for them

    @property
    def p50(self) -> float:
        """A placement that never arrived counts as infinitely late."""
        return percentile(self.latencies + [math.inf] * len(self.unseen), 0.5)

    @property
    def p99(self) -> float:
        return percentile(self.latencies + [math.inf] * len(self.unseen), 0.99)


@dataclass
class Cell:
    mode: str
    nodes: int
    rate: str
    runs: list[RunResult] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.mode} {self.nodes} nodes {rate_label(self.rate)}"

    def p50(self) -> float | None:
        return median([r.p50 for r in self.runs])

    def p99(self) -> float | None:
        return median([r.p99 for r in self.runs])

    def seen(self) -> str:
        return f"{sum(len(r.latencies) for r in self.runs)}/{sum(r.requests for r in self.runs)}"

    def fate(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for run in self.runs:
            for key, count in run.fate.items():
                out[key] = out.get(key, 0) + count
        return out

    def phase(self, name: str) -> float | None:
        return median([v for r in self.runs if (v := r.phases.get(name)) is not None])

    def client(self, attribute: str) -> float | None:
        return median([v for r in self.runs if (v := getattr(r, attribute)) is not None])


@dataclass
class ClusterResult:
    mode: str
    nodes: int
    rate: str
    rtt: list[float] = field(default_factory=list)  # seconds, MQTT round trip
    fsync: list[float] = field(default_factory=list)  # seconds
    cells: dict[str, Cell] = field(default_factory=dict)
    cpu_idle_start: dict[str, float] = field(default_factory=dict)
    cpu_busy: dict[str, float] = field(default_factory=dict)
    cpu_idle_end: dict[str, float] = field(default_factory=dict)
    instances_end: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.mode} {self.nodes} nodes {rate_label(self.rate)}"

    def raw_floor(self) -> float | None:
        rtt, fsync = median(self.rtt), median(self.fsync)
        return None if rtt is None or fsync is None else 2 * (rtt + fsync)


def rate_label(rate: str) -> str:
    return "1 at a time" if rate == "seq" else f"{rate}/s"


# --------------------------------------------------------------------------- the measurements


def run_once(client: Client, services: list[str], rate: str, give_up: float) -> RunResult:
    given_up: list[str] = []
    if rate == "seq":
        for service in services:
            client.deploy(service)
            if client.wait_placed([service], give_up):
                given_up.append(service)
            else:
                client.wait_for(client.running, [service], RUNNING_WAIT)
                time.sleep(QUIET_SECONDS)  # a quiet cluster for the next one
    else:
        every = 1.0 / float(rate)
        start = time.monotonic()
        for i, service in enumerate(services):
            delay = start + i * every - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            client.deploy(service)
            client.resend_late()
        given_up = client.wait_placed(services, give_up)
        client.wait_for(client.running, [s for s in services if s not in given_up], RUNNING_WAIT)
    client.wait_for(client.timings, services, 2.5)  # load reports go out once a second
    with client.changed:
        # Given up on, yet arrived by now: late, and its latency counts; never arrived: lost.
        unseen = [s for s in services if s not in client.placed]
    fate = client.fate(unseen) if unseen else {}
    with client.changed:
        sent = {s: client.sent[s] for s in services}
        latencies = [client.placed[s] - sent[s].at for s in services if s in client.placed]
        timings = [client.timings[s] for s in services if s in client.timings]

        def since(table: dict[str, float]) -> float | None:
            return median([table[s] - sent[s].at for s in services if s in table])

        registered, decided, running = since(client.registered), since(client.decided), since(client.running)
    reported = [dict(t.get("phases_ms") or {}) for t in timings]
    for row in reported:
        if isinstance(row.get("total"), int | float):
            row["unaccounted"] = row["total"] - sum(v for p in INSIDE_TOTAL if isinstance(v := row.get(p), int | float))
    phases: dict[str, float | None] = {}
    for name in PHASES:
        phases[name] = median([float(v) for row in reported if isinstance(v := row.get(name), int | float)])
    return RunResult(len(services), latencies, phases, registered, decided, running, len(timings),
                     sum(sent[s].resends for s in services), unseen, fate, len(given_up) - len(unseen))


def bench_cluster(processes: Processes, mode: str, nodes: int, rate: str, args: argparse.Namespace,
                  sleeper: list[str], cluster_names: list[str]) -> ClusterResult:
    """A fresh cluster for one mode, size and rate: every run of a rate meets the same start (the
    runs of it follow one another on that cluster, so the services they deploy accumulate)."""
    result = ClusterResult(mode, nodes, rate)
    warmup = 1 if args.quick else 2
    needed = warmup + args.repeats * args.requests
    workdir = Path(tempfile.mkdtemp(prefix=f"tomq-bench-orch-{mode}-{nodes}-", dir=args.workdir))
    node_args = ("--tick-ms", str(args.tick_ms), *args.node_args.split())
    running: OrchCluster | None = None
    client: Client | None = None
    phase, keep = "start", args.keep
    try:
        running = OrchCluster(processes, workdir, mode, nodes, needed, node_args)
        cluster_names.append(running.name)
        running.start()
        client = Client(running, sleeper)
        wait_until(lambda: client is not None and set(client.reports) >= set(running.names), 60,
                   "a load report from every node")
        if mode == "stable":
            wait_until(lambda: client is not None and client.leader() is not None, 30, "an agreed leader")
        pool = iter(running.services)
        phase = "warm-up"
        for service in [next(pool) for _ in range(warmup)]:
            client.deploy(service)
            if client.wait_placed([service], 3 * args.give_up):
                log(f"  {result.label}: warm-up deployment {service} never showed a placement; going on")
            else:
                client.wait_for(client.running, [service], RUNNING_WAIT)
        time.sleep(1.0)
        phase = "floor"
        for _ in range(3):
            result.rtt.append(client.mqtt_rtt(running, args.rtt_count))
            result.fsync.append(fsync_seconds(running.directory))
        everything = running.all_processes()
        window = CpuWindow(everything)
        time.sleep(args.idle_seconds)
        result.cpu_idle_start = window.shares()
        window = CpuWindow(everything)
        cell = result.cells.setdefault(rate, Cell(mode, nodes, rate))
        for run in range(args.repeats):
            phase = f"run {run + 1}"
            services = [next(pool) for _ in range(args.requests)]
            outcome = run_once(client, services, rate, args.give_up)
            cell.runs.append(outcome)
            log(f"  {cell.label}: run {run + 1}: p50 {ms(outcome.p50)} ms, p99 {ms(outcome.p99)} ms, "
                f"node total p50 {num(outcome.phases.get('total'))} ms "
                f"({len(outcome.latencies)}/{len(services)} placements seen"
                + (f", {outcome.late} of them after {args.give_up:g} s" if outcome.late else "")
                + f", {outcome.reported}/{len(services)} timings reported"
                + (f", {outcome.resends} resent" if outcome.resends else "")
                + (f"; never seen: {outcome.fate}" if outcome.unseen else "") + ")")
        result.cpu_busy = window.shares()
        phase = "idle at the end"
        time.sleep(1.0)
        window = CpuWindow(everything)
        time.sleep(args.idle_seconds)
        result.cpu_idle_end = window.shares()
        result.instances_end = len(instance_pids(running.name))
    except (TimeoutError, RuntimeError) as exc:
        where = client.describe() if client is not None else "no client"
        result.notes.append(f"{phase}: {exc}; nodes: {where}; logs kept in {workdir}")
        log(f"  {result.label}: {result.notes[-1]}; the rest of this cluster is skipped")
        if running is not None:
            log(running.log_tails())
        keep = True
    finally:
        with signals_held():
            if client is not None:
                client.close()
            if running is not None:
                running.stop()
            if not keep:
                shutil.rmtree(workdir, ignore_errors=True)
    return result


# --------------------------------------------------------------------------- the table


def ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return "lost" if math.isinf(seconds) else f"{seconds * 1000:.0f}"


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b <= 0 or math.isinf(b):
        return "-"
    return "inf" if math.isinf(a) else f"{a / b:.1f}x"


def print_tables(results: list[ClusterResult], rates: list[str], args: argparse.Namespace) -> None:
    cells = [(r, cell) for r in results for rate in rates if (cell := r.cells.get(rate)) is not None and cell.runs]
    by_key = {(r.mode, r.nodes, cell.rate): cell for r, cell in cells}
    print()
    print(f"Placement latency: medians of {args.repeats} runs of {args.requests} deployments each "
          f"(replicas = 1, `{' '.join(args.sleeper_argv)}`), mosquitto, process runtime, "
          f"--tick-ms {args.tick_ms:g}; {os.cpu_count()} CPU(s).")
    print("client: publish on orch/request -> retained orch/placement/<service> arrives (p50, p99 of a run;")
    print("        'lost' = the placement never arrived in its run); a fresh cluster for each mode, size and rate,")
    print("        its runs one after another (the p50 of each run, in order, is at the end of the row)")
    print("phases: the deciding node's placement_timings (ms, median of a run), see node/orchestrator/service.py")
    print()
    phase_heads = "".join(f"{SHORT[p]:>8}" for p in PHASES)
    header = f"{'mode':<10}{'nodes':>6} {'rate':<12}{'seen':>8}{'p50':>7}{'p99':>7} |{phase_heads} | p50 of each run"
    print(f"{'':<44}client ms | node phases, median ms")
    print(header)
    print("-" * len(header))
    for r, cell in cells:
        phases = "".join(f"{num(cell.phase(p)):>8}" for p in PHASES)
        print(f"{r.mode:<10}{r.nodes:>6} {rate_label(cell.rate):<12}{cell.seen():>8}{ms(cell.p50()):>7}"
              f"{ms(cell.p99()):>7} |{phases} | {'/'.join(ms(run.p50) for run in cell.runs)}")
    lost = [(r, cell) for r, cell in cells if cell.fate()]
    if lost:
        print("Placements that never arrived, by the nodes' own reports afterwards:")
        for _, cell in lost:
            print(f"  {cell.label}: " + ", ".join(f"{count} {what}" for what, count in cell.fate().items()))
    print()
    print("Seen by the client on the audit lines, median ms after publishing: service identity committed "
          "(reg), decision committed (orch), instance recorded running (run)")
    print(f"{'mode':<10}{'nodes':>6} {'rate':<12}{'reg':>7}{'orch':>7}{'placed':>8}{'run':>7}")
    for r, cell in cells:
        print(f"{r.mode:<10}{r.nodes:>6} {rate_label(cell.rate):<12}{ms(cell.client('registered')):>7}"
              f"{ms(cell.client('decided')):>7}{ms(cell.p50()):>8}{ms(cell.client('running')):>7}")
    print()
    print("Ratio on-demand / stable")
    print(f"{'nodes':>6} {'rate':<12}{'p50':>7}{'p99':>7} |" + "".join(f"{SHORT[p]:>8}" for p in PHASES))
    for nodes in sorted({r.nodes for r in results}):
        for rate in rates:
            stable, demand = by_key.get(("stable", nodes, rate)), by_key.get(("on-demand", nodes, rate))
            if stable is None or demand is None:
                continue
            phases = "".join(f"{ratio(demand.phase(p), stable.phase(p)):>8}" for p in PHASES)
            print(f"{nodes:>6} {rate_label(rate):<12}{ratio(demand.p50(), stable.p50()):>7}"
                  f"{ratio(demand.p99(), stable.p99()):>7} |{phases}")
    print()
    print("The fastest on-demand could be: one election round trip + one replication round trip")
    print("  raw = 2 x (MQTT round trip, 300 B: this process -> broker -> an echo client of this process ->")
    print("         broker -> back, same broker, cluster idle; + one fsync of a 200-byte append in the cluster")
    print("         directory), medians of 3 measurements per cluster")
    print("  phases = median(election network + vote processing) + median(consensus network + log write),")
    print("         from the on-demand nodes' own reports in the same runs")
    print(f"{'cluster':<22}{'rtt ms':>8}{'fsync ms':>9}{'raw ms':>8} {'rate':<12}{'phases ms':>10}"
          f"{'p50 ms':>8}{'p50/raw':>9}{'p50/phases':>11}{'node total/raw':>15}")
    for r, cell in cells:
        if r.mode != "on-demand":
            continue
        election = _sum(cell.phase("election_network"), cell.phase("vote_processing"))
        replication = _sum(cell.phase("consensus_network"), cell.phase("log_write"))
        phases_floor = _sum(election, replication)
        print(f"{f'{r.mode} {r.nodes} nodes':<22}{num(_ms(median(r.rtt)), '.2f'):>8}{num(_ms(median(r.fsync)), '.2f'):>9}"
              f"{num(_ms(r.raw_floor()), '.1f'):>8} {rate_label(cell.rate):<12}{num(phases_floor, '.1f'):>10}"
              f"{ms(cell.p50()):>8}{ratio(cell.p50(), r.raw_floor()):>9}"
              f"{ratio(_ms(cell.p50()), phases_floor):>11}{ratio(cell.phase('total'), _ms(r.raw_floor())):>15}")
    print()
    print("CPU per process (1.00 = one core busy): idle after warm-up / during the runs / idle at the end;")
    print("  'others' = every other process on this machine (its load moves every figure above)")
    for r in results:
        if r.cpu_busy:
            print(f"  {r.label} ({r.instances_end} instances running at the end): "
                  + ", ".join(f"{n} {r.cpu_idle_start.get(n, 0):.2f}/{share:.2f}/{r.cpu_idle_end.get(n, 0):.2f}"
                              for n, share in r.cpu_busy.items()))
    print()
    print("Targets (issue 5):")
    judged = False
    for rate in rates:
        stable = by_key.get(("stable", TARGET_SPEEDUP_NODES, rate))
        demand = by_key.get(("on-demand", TARGET_SPEEDUP_NODES, rate))
        if stable is None or demand is None:
            continue
        judged = True
        s, d = stable.p50(), demand.p50()
        assert s is not None and d is not None
        where = f"  {TARGET_SPEEDUP_NODES} nodes, {rate_label(rate)}: stable >= {TARGET_STABLE_SPEEDUP:.0f}x faster"
        node_view = (f" (by the deciding nodes' totals: stable {num(stable.phase('total'))} ms, on-demand "
                     f"{num(demand.phase('total'))} ms, {ratio(demand.phase('total'), stable.phase('total'))})")
        missing = {mode: sum(len(r.unseen) for r in c.runs) for mode, c in (("stable", stable), ("on-demand", demand))}
        if any(missing.values()):
            # A lost placement has no latency; those that arrived late may have been carried by
            # something else (a retry): the medians do not compare the two protocols.
            print(f"{where}: MISSED: no valid comparison, placements never arrived ("
                  + ", ".join(f"{mode} {count} of {sum(r.requests for r in c.runs)}" for (mode, count), c
                              in zip(missing.items(), (stable, demand), strict=True) if count)
                  + f"); medians stable {ms(s)} ms, on-demand {ms(d)} ms{node_view}")
        else:
            verdict = "met" if d >= TARGET_STABLE_SPEEDUP * s else "MISSED"
            print(f"{where}: stable {ms(s)} ms, on-demand {ms(d)} ms = {d / s:.1f}x: {verdict}{node_view}")
    if not judged:
        print(f"  stable >= {TARGET_STABLE_SPEEDUP:.0f}x faster than on-demand at {TARGET_SPEEDUP_NODES} nodes: not "
              f"judged (this run has not both modes at {TARGET_SPEEDUP_NODES} nodes)")
    for r, cell in cells:
        floor = r.raw_floor()
        p50 = cell.p50()
        if r.mode != "on-demand" or floor is None or p50 is None:
            continue
        where = f"  on-demand {r.nodes} nodes, {rate_label(cell.rate)}: within {TARGET_FLOOR_RATIO:.0f}x of the raw floor"
        if math.isinf(p50):
            print(f"{where}: MISSED: the client saw no placement for most requests (deciding nodes' total "
                  f"{num(cell.phase('total'))} ms = {ratio(cell.phase('total'), _ms(floor))} the floor)")
        else:
            verdict = "met" if p50 <= TARGET_FLOOR_RATIO * floor else "MISSED"
            print(f"{where}: p50 {ms(p50)} ms / {floor * 1000:.1f} ms = {p50 / floor:.1f}x: {verdict}")
    notes = [f"  {r.label}, {note}" for r in results for note in r.notes]
    if notes:
        print("\nClusters that did not complete (the rest of that cluster was skipped):")
        print("\n".join(notes))


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def _sum(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a + b


# --------------------------------------------------------------------------- main


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Cleaning up: a second Ctrl-C must not leave half of it undone."""
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def cleaned_up(processes: Processes, cluster_names: list[str]) -> Iterator[None]:
    # SIGINT explicitly too: started in the background by a shell, a process inherits it ignored.
    previous = {s: signal.signal(s, interrupted) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        with signals_held():
            processes.stop_all()
            for name in cluster_names:
                kill_instances(name)
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one rate (seq), 3 and 5 nodes, few requests")
    parser.add_argument("--modes", default="stable,on-demand", help="comma-separated: stable, on-demand")
    parser.add_argument("--nodes", help="comma-separated cluster sizes (default 3,5,7; 3,5 with --quick)")
    parser.add_argument("--rates", help="comma-separated: seq (one at a time) or requests per second "
                                        "(default seq,2,5; seq with --quick)")
    parser.add_argument("--requests", type=int, help="deployments per run (default 20; 6 with --quick)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per mode, size and rate (default 3)")
    parser.add_argument("--give-up", type=float,
                        help="seconds without a new placement after which a request counts as lost "
                             "(default 5; 2 with --quick)")
    parser.add_argument("--tick-ms", type=float, default=50.0, help="the nodes' Raft tick (default 50)")
    parser.add_argument("--sleeper", choices=("sleep", "python"), default="sleep",
                        help="the instances' command: coreutils sleep (default) or a python sleeper")
    parser.add_argument("--rtt-count", type=int, default=100, help="MQTT round trips per floor measurement")
    parser.add_argument("--idle-seconds", type=float, help="length of each idle CPU measurement (default 3; 2 with --quick)")
    parser.add_argument("--node-args", default="", help="extra `tomq node` options")
    parser.add_argument("--workdir", help="where the temporary cluster directories go (default: the system's)")
    parser.add_argument("--keep", action="store_true", help="keep the cluster directories and logs")
    args = parser.parse_args(argv)
    if args.repeats < 2:
        parser.error("--repeats must be at least 2: the figures are medians of several runs")
    args.requests = args.requests or (6 if args.quick else 20)
    args.give_up = args.give_up or (2.0 if args.quick else 5.0)
    args.idle_seconds = args.idle_seconds or (2.0 if args.quick else 3.0)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for mode in modes:
        if mode not in ("stable", "on-demand"):
            parser.error(f"unknown mode {mode!r}")
    sizes = [int(n) for n in (args.nodes or ("3,5" if args.quick else "3,5,7")).split(",")]
    rates = [r.strip() for r in (args.rates or ("seq" if args.quick else "seq,2,5")).split(",") if r.strip()]
    for rate in rates:
        if rate != "seq":
            try:
                if float(rate) <= 0:
                    raise ValueError
            except ValueError:
                parser.error(f"rate {rate!r} is neither seq nor a positive number")
    if which("mosquitto") is None:
        parser.error("mosquitto is not installed (apt-get install -y mosquitto)")
    if args.sleeper == "sleep":
        binary = shutil.which("sleep")
        if binary is None:
            parser.error("no sleep binary on PATH; use --sleeper python")
        args.sleeper_argv = [binary, "1000000"]
    else:
        args.sleeper_argv = [PYTHON, "-c", "import time; time.sleep(1e6)"]
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)

    processes = Processes()
    cluster_names: list[str] = []
    results: list[ClusterResult] = []
    started = time.monotonic()
    try:
        with cleaned_up(processes, cluster_names):
            for nodes in sizes:
                for rate in rates:
                    for mode in modes:
                        log(f"{mode} {nodes} nodes {rate_label(rate)}")
                        results.append(bench_cluster(processes, mode, nodes, rate, args, args.sleeper_argv,
                                                     cluster_names))
    except KeyboardInterrupt:
        log("interrupted: every process and directory this run started is gone")
        return 130
    print_tables(results, rates, args)
    print(f"\n({time.monotonic() - started:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
