"""Orchestration with real processes: a broker, three `tomq node`s, and both runtimes (DESIGN.md §6).

The same scenarios run on the process runtime and on a private dockerd: deploying places every
replica on the least-loaded eligible node through committed PROV-ORCH records, the instances that
run (found by their labels, in /proc or through the docker engine) agree with the retained
`orch/placement/*` and with the ledger; killing a node moves its replicas within 5 s and the ledger
says why; a node that comes back stops what no longer belongs to it; a loaded node is avoided; a
malformed spec is refused before anything is sent; removing a service stops everything it ran.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dockerd import dockerd, runtime_image  # noqa: F401  (pytest fixtures)
from ledger_cluster import TOMQ, LedgerCluster

from tomq import cluster, records
from tomq.mqtt import MqttLink, wait_until
from tomq.node.ledger.block import decode_block_file
from tomq.node.runtime.cgroups import detect_or_reason
from tomq.records import ID_CREATE, ID_DELETE, ORCH

_NAMES = itertools.count()
SLEEPER = [sys.executable, "-c", "import time; time.sleep(1e6)"]


class OrchestratedCluster(LedgerCluster):
    """A LedgerCluster whose nodes run instances with `runtime`; each node has its own load-pids file."""

    def __init__(self, tmp_path: Path, runtime: str, docker_host: str | None, mode: str = "stable") -> None:
        self.runtime = runtime
        self.docker_host = docker_host
        self.load_files = {f"n{i}": tmp_path / f"n{i}.load-pids" for i in range(1, 4)}
        args = ["--runtime", runtime, "--dead-after", "2.0"]
        if docker_host:
            args += ["--docker-host", docker_host]
        # A name of its own: instances are found by their cluster label, and an earlier test's must not count.
        super().__init__(tmp_path, 3, "mosquitto", extra_args=tuple(args), mode=mode,
                         cluster_name=f"orch{os.getpid()}{next(_NAMES)}")

    def _argv(self, name: str) -> list[str]:
        return [*super()._argv(name), "--load-pids-file", str(self.load_files[name])]

    # -- what runs, seen from outside the nodes --------------------------------------------------

    def running(self) -> dict[tuple[str, int], tuple[str, int]]:
        """(service, replica) -> (node, height) of every live instance of this cluster."""
        found: dict[tuple[str, int], tuple[str, int]] = {}
        for labels in self._instance_labels():
            key = (labels["tomq.service"], int(labels["tomq.replica"]))
            if key in found:
                raise AssertionError(f"{key} runs twice: {found[key]} and {labels}")
            found[key] = (labels["tomq.node"], int(labels["tomq.height"]))
        return found

    def _instance_labels(self) -> list[dict[str, str]]:
        if self.runtime == "docker":
            import docker

            client = docker.DockerClient(base_url=self.docker_host)
            try:
                containers = client.containers.list(filters={"label": f"tomq.cluster={self.cluster.name}"})
                return [c.labels for c in containers]
            finally:
                client.close()
        out = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if stat[stat.rindex(")") + 2] in "ZX":
                continue
            env = dict(item.decode(errors="replace").partition("=")[::2] for item in environ if b"=" in item)
            if env.get("TOMQ_CLUSTER") == self.cluster.name and "TOMQ_SERVICE" in env and os.getpgid(int(entry)) == int(entry):
                out.append({"tomq.service": env["TOMQ_SERVICE"], "tomq.replica": env["TOMQ_REPLICA"],
                            "tomq.node": env["TOMQ_NODE"], "tomq.height": env["TOMQ_HEIGHT"]})
        return out

    def kill_instances(self, node: str | None = None) -> None:
        """Kill this cluster's instances (on `node` only, if given): teardown, or a machine dying.

        The nodes never stop their instances when they exit; instances outlive them, as on a real host.
        """
        if self.runtime == "docker":
            import docker

            client = docker.DockerClient(base_url=self.docker_host)
            try:
                for container in client.containers.list(all=True, filters={"label": f"tomq.cluster={self.cluster.name}"}):
                    if node is None or container.labels.get("tomq.node") == node:
                        container.remove(force=True)
            finally:
                client.close()
            return
        wanted = [f"TOMQ_CLUSTER={self.cluster.name}".encode()] + ([f"TOMQ_NODE={node}".encode()] if node else [])
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
                except OSError:
                    continue
                if all(item in environ for item in wanted):
                    try:
                        os.killpg(int(entry), 9)
                    except OSError:
                        pass

    # -- what the cluster says ------------------------------------------------------------------

    def ledger_records(self) -> list[tuple[int, records.Record, str]]:
        """(height, record, proposer id) of every record in the shared ledger directory."""
        from tomq import canonical

        out = []
        for path in sorted(self.ledger_dir.glob("*.block")):
            block = decode_block_file(path.read_bytes()).block
            for envelope in block.records:
                fields = canonical.decode(canonical.decode(envelope)[0], check_canonical=False)
                out.append((block.height, records.from_map(fields["body"]), fields["from"]))
        return out

    def placements(self) -> dict[str, dict[str, Any]]:
        """The retained orch/placement/* documents, read with a fresh client."""
        documents: dict[str, dict[str, Any]] = {}
        done = threading.Event()

        def on_message(topic: str, payload: bytes, retained: bool) -> None:
            if payload:
                document = json.loads(payload)
                documents[document["service"]] = document

        link = MqttLink(host="127.0.0.1", port=self.broker.port, username="n1",
                        password=cluster.broker_password(self.cluster.signing_key("n1")), on_message=on_message)
        link.subscribe(f"{self.cluster.topics.root}/orch/placement/+")
        link.start()
        done.wait(0.5)
        link.stop()
        return documents

    def tomq(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*TOMQ, *args], capture_output=True, text=True, timeout=timeout)

    def status(self) -> dict[str, Any]:
        result = self.tomq("status", str(self.directory), "--json")  # exits 1 while no leader is agreed
        assert result.stdout, result.stderr
        return json.loads(result.stdout)


def write_spec(path: Path, name: str, replicas: int = 1, extra: str = "") -> Path:
    path.write_text(f'[service]\nname = "{name}"\ncommand = {json.dumps(SLEEPER)}\nreplicas = {replicas}\n{extra}')
    return path


@pytest.fixture(params=["process", "docker"])
def orchestrated(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OrchestratedCluster]:
    docker_host = request.getfixturevalue("dockerd") if request.param == "docker" else None
    if docker_host:
        from tomq.node.runtime.image import build_image

        build_image(docker_host)  # the default image the specs name; the nodes then find it current
    running = OrchestratedCluster(tmp_path, request.param, docker_host)
    running.start()
    proposer = running.proposer()  # points cluster.toml at the test broker, which `tomq deploy` reads
    proposer.close()
    assert wait_until(lambda: running.status()["leader"] is not None, 30, 0.5), running.logs()
    try:
        yield running
    finally:
        running.stop()
        running.kill_instances()


def placed_by_ledger(running: OrchestratedCluster) -> dict[tuple[str, int], tuple[str, int]]:
    """(service, replica) -> (node, height): replaying the ledger's PROV-ORCH records."""
    placed: dict[tuple[str, int], tuple[str, int]] = {}
    for height, record, _ in running.ledger_records():
        structure = record.structure
        if record.state == ORCH and isinstance(structure, records.Orchestrate):
            service, _, replica = structure.deployed.rpartition(":")
            if structure.action == "place":
                placed[(service, int(replica))] = (structure.location, height)
            elif structure.action == "remove":
                placed.pop((service, int(replica)), None)
    return placed


def test_deploy_places_replicas_that_run_where_the_ledger_says(orchestrated: OrchestratedCluster, tmp_path: Path):
    spec = write_spec(tmp_path / "sleeper.toml", "sleeper", replicas=3)
    result = orchestrated.tomq("deploy", str(orchestrated.directory), str(spec), "--wait", "30")
    assert result.returncode == 0, result.stdout + result.stderr + orchestrated.logs()
    assert "sleeper:2 on n" in result.stdout
    assert wait_until(lambda: len(orchestrated.running()) == 3, 20), orchestrated.logs()
    running = orchestrated.running()
    # spread (the default): three replicas on three different nodes
    assert {node for node, _ in running.values()} == {"n1", "n2", "n3"}
    # the ledger, the retained placement and what runs agree
    assert wait_until(lambda: placed_by_ledger(orchestrated) == running, 10), (placed_by_ledger(orchestrated), running)
    document = orchestrated.placements()["sleeper"]
    assert {("sleeper", int(r)): (p["node"], p["height"]) for r, p in document["replicas"].items()} == running
    states = [(r.state, getattr(r.structure, "kind", getattr(r.structure, "action", None)))
              for _, r, _ in orchestrated.ledger_records()]
    assert (ID_CREATE, "service") in states
    assert states.count((ORCH, "place")) == 3
    # one ledger round per deployment: the service joins and is placed in the same block, in that order
    joined_and_placed = [(height, r.state) for height, r, _ in orchestrated.ledger_records()
                         if r.state == ORCH or getattr(r.structure, "kind", None) == "service"]
    assert len({height for height, _ in joined_and_placed}) == 1, joined_and_placed
    assert [state for _, state in joined_and_placed] == [ID_CREATE, ORCH, ORCH, ORCH], joined_and_placed
    assert wait_until(lambda: [(r.state, getattr(r.structure, "kind", None)) for _, r, _ in
                               orchestrated.ledger_records()].count((ID_CREATE, "container")) == 3, 10)
    # every placement says what it saw: the loads of all three nodes
    place = next(r for _, r, _ in orchestrated.ledger_records() if r.state == ORCH)
    assert set(place.structure.reason["loads"]) == {"n1", "n2", "n3"}  # type: ignore[union-attr]
    # the container identity is attributed to the node that runs it
    containers = [r.structure for _, r, _ in orchestrated.ledger_records()
                  if r.state == ID_CREATE and getattr(r.structure, "kind", None) == "container"]
    assert all(c.attributed_to == c.object.split(":")[2] for c in containers)  # type: ignore[union-attr]
    # the phases of each placement are reported
    def timings() -> list[dict[str, Any]]:
        nodes = orchestrated.status()["nodes"].values()
        return [t for n in nodes for t in n.get("orchestration", {}).get("placement_timings", [])]

    assert wait_until(lambda: len(timings()) == 3, 10, 0.5)  # reports go out once a second
    # how each node holds its instances' cpu and memory, as operators see it in `tomq status`
    limits = {row.get("limits") for row in orchestrated.status()["nodes"].values()}
    assert limits == {"docker" if orchestrated.runtime == "docker" else detect_or_reason()[1]}, limits
    assert all(t["phases_ms"]["total"] > 0 and t["trigger"] == "request" for t in timings()), timings()
    verify = orchestrated.tomq("ledger", "verify", str(orchestrated.ledger_dir), "--operator-key",
                               str(orchestrated.directory / "operator" / "operator.pub"))
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_a_killed_node_s_replica_runs_elsewhere_within_5_s_and_never_twice(orchestrated: OrchestratedCluster,
                                                                            tmp_path: Path):
    spec = write_spec(tmp_path / "analyser.toml", "analyser")
    result = orchestrated.tomq("deploy", str(orchestrated.directory), str(spec), "--wait", "30")
    assert result.returncode == 0, result.stdout + result.stderr + orchestrated.logs()
    assert wait_until(lambda: ("analyser", 0) in orchestrated.running(), 20), orchestrated.logs()
    victim, first_height = orchestrated.running()[("analyser", 0)]
    assert wait_until(lambda: any(r.state == ID_CREATE and getattr(r.structure, "object", "") ==
                                  f"analyser:0:{victim}:{first_height}" for _, r, _ in orchestrated.ledger_records()), 10)
    orchestrated.nodes[victim].kill()
    # A node's machine dying takes its instances with it; the node process alone dying would not.
    # Simulate the machine: kill what the victim ran, as its host going away would.
    killed_at = time.monotonic()
    orchestrated.kill_instances(victim)

    def moved() -> bool:
        where = orchestrated.running().get(("analyser", 0))
        return where is not None and where[0] != victim

    assert wait_until(moved, 15, 0.1), orchestrated.logs()
    took = time.monotonic() - killed_at
    print(f"analyser running again on {orchestrated.running()[('analyser', 0)][0]} {took:.2f} s after the kill")
    assert took < 5.0
    new_node, new_height = orchestrated.running()[("analyser", 0)]
    assert new_height > first_height
    # the ledger says why: the new placement replaces the dead node
    assert wait_until(lambda: any(r.state == ORCH and r.structure.reason.get("replaces", {}).get("node") == victim  # type: ignore[union-attr]
                                  for _, r, _ in orchestrated.ledger_records()), 10)
    assert wait_until(lambda: any(r.state == ID_DELETE and getattr(r.structure, "kind", None) == "container"
                                  and r.structure.object.endswith(f":{victim}:{first_height}")  # type: ignore[union-attr]
                                  for _, r, _ in orchestrated.ledger_records()), 10)
    # the victim returns: nothing runs twice, the replica stays where it was moved
    orchestrated.nodes[victim].start()
    time.sleep(4)
    assert orchestrated.running()[("analyser", 0)] == (new_node, new_height)


def test_a_node_that_comes_back_stops_what_was_moved_away(orchestrated: OrchestratedCluster, tmp_path: Path):
    """The node process dies but its instance survives (a daemon crash, not a machine loss)."""
    spec = write_spec(tmp_path / "c.toml", "collector")
    assert orchestrated.tomq("deploy", str(orchestrated.directory), str(spec)).returncode == 0, orchestrated.logs()
    assert wait_until(lambda: ("collector", 0) in orchestrated.running(), 20)
    victim, _ = orchestrated.running()[("collector", 0)]
    orchestrated.nodes[victim].kill()
    # The replica is placed elsewhere; until the victim returns, its orphan is still running (a
    # plain command cannot fence itself; the built-in services do, see tests/test_services.py).
    assert wait_until(lambda: any(labels["tomq.node"] != victim and labels["tomq.service"] == "collector"
                                  for labels in orchestrated._instance_labels()), 15, 0.1)
    orchestrated.nodes[victim].start()
    assert wait_until(lambda: all(labels["tomq.node"] != victim for labels in orchestrated._instance_labels()),
                      15, 0.2), orchestrated.nodes[victim].tail()
    assert orchestrated.running()[("collector", 0)][0] != victim


@pytest.mark.parametrize("orchestrated", ["process"], indirect=True)
def test_new_replicas_avoid_a_loaded_node(orchestrated: OrchestratedCluster, tmp_path: Path):
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        orchestrated.load_files["n2"].write_text(f"{burner.pid}\n")

        def only_n2_is_loaded() -> bool:
            # The premise, as the nodes report it: the burner shows on n2, and the others have
            # settled after starting up (a node's own start-up work is load too, for a few seconds).
            cpu = {name: row.get("cpu", 1.0) for name, row in orchestrated.status()["nodes"].items()}
            return cpu["n2"] > 0.3 and cpu["n1"] < 0.15 and cpu["n3"] < 0.15

        assert wait_until(only_n2_is_loaded, 30, 0.5), orchestrated.status()["nodes"]
        spec = write_spec(tmp_path / "two.toml", "pair", replicas=2)
        result = orchestrated.tomq("deploy", str(orchestrated.directory), str(spec), "--wait", "30")
        assert result.returncode == 0, result.stdout + result.stderr
        assert wait_until(lambda: len(orchestrated.running()) == 2, 20)
        # The shared directory holds certified blocks: a placement is there a moment after it runs.
        assert wait_until(lambda: any(r.state == ORCH for _, r, _ in orchestrated.ledger_records()), 10)
        place = next(r for _, r, _ in orchestrated.ledger_records() if r.state == ORCH)
        assert {node for node, _ in orchestrated.running().values()} == {"n1", "n3"}, place.structure.reason  # type: ignore[union-attr]
        loads = place.structure.reason["loads"]  # type: ignore[union-attr]
        assert loads["n2"]["cpu"] > loads["n1"]["cpu"], loads
    finally:
        burner.kill()
        burner.wait()


@pytest.mark.parametrize("orchestrated", ["process"], indirect=True)
def test_malformed_spec_is_refused_before_anything_is_sent_and_remove_stops_everything(
        orchestrated: OrchestratedCluster, tmp_path: Path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[service]\nname = "svc"\ncommand = ["true"]\nreplica = 2\n')
    result = orchestrated.tomq("deploy", str(orchestrated.directory), str(bad))
    assert result.returncode != 0
    assert "service.replica: unknown field (did you mean replicas?)" in result.stderr
    assert not (orchestrated.directory / "members" / "svc").exists()  # nothing enrolled, nothing sent
    spec = write_spec(tmp_path / "svc.toml", "svc", replicas=2)
    assert orchestrated.tomq("deploy", str(orchestrated.directory), str(spec)).returncode == 0
    assert wait_until(lambda: len(orchestrated.running()) == 2, 20)
    result = orchestrated.tomq("remove", str(orchestrated.directory), "svc", "--wait", "30")
    assert result.returncode == 0, result.stdout + result.stderr + orchestrated.logs()
    assert wait_until(lambda: not orchestrated.running(), 20)
    def states() -> list[tuple[str, object]]:
        return [(r.state, getattr(r.structure, "kind", getattr(r.structure, "action", None)))
                for _, r, _ in orchestrated.ledger_records()]

    # Certified (in the shared directory) a moment after the placement document said so.
    assert wait_until(lambda: states().count((ORCH, "remove")) == 2 and (ID_DELETE, "service") in states(), 10), \
        states()
    assert wait_until(lambda: [(r.state, getattr(r.structure, "kind", None)) for _, r, _ in
                               orchestrated.ledger_records()].count((ID_DELETE, "container")) == 2, 10)
    assert orchestrated.placements()["svc"]["replicas"] == {}


@pytest.mark.parametrize("orchestrated", ["process"], indirect=True)
def test_an_operator_moves_a_replica_and_the_ledger_names_the_node_it_left(orchestrated: OrchestratedCluster,
                                                                           tmp_path: Path):
    spec = write_spec(tmp_path / "m.toml", "mover")
    assert orchestrated.tomq("deploy", str(orchestrated.directory), str(spec)).returncode == 0
    assert wait_until(lambda: ("mover", 0) in orchestrated.running(), 20)
    before, _ = orchestrated.running()[("mover", 0)]
    target = next(n for n in ("n1", "n2", "n3") if n != before)
    result = orchestrated.tomq("move", str(orchestrated.directory), "mover:0", "--to", target)
    assert result.returncode == 0, result.stdout + result.stderr + orchestrated.logs()
    assert f"mover:0 on {target}" in result.stdout
    assert wait_until(lambda: orchestrated.running().get(("mover", 0), ("", 0))[0] == target, 15)
    def moves() -> list[object]:
        return [r.structure.reason["replaces"] for _, r, _ in orchestrated.ledger_records()  # type: ignore[union-attr]
                if r.state == ORCH and "replaces" in r.structure.reason]  # type: ignore[union-attr]

    assert wait_until(lambda: moves() == [{"node": before, "why": "moved by the operator"}], 10), moves()

    # Break before make, on the ledger: the old node's container is recorded as gone before the new one starts.
    def containers() -> list[tuple[str, str]]:
        return [(r.state, r.structure.object) for _, r, _ in orchestrated.ledger_records()
                if isinstance(r.structure, records.Identity) and r.structure.kind == "container"]

    assert wait_until(lambda: any(state == ID_CREATE and name.startswith(f"mover:0:{target}:")
                                  for state, name in containers()), 10), containers()
    events = containers()
    old_gone = next(i for i, (state, name) in enumerate(events)
                    if state == ID_DELETE and name.startswith(f"mover:0:{before}:"))
    new_made = next(i for i, (state, name) in enumerate(events)
                    if state == ID_CREATE and name.startswith(f"mover:0:{target}:"))
    assert old_gone < new_made, events
    bad = orchestrated.tomq("move", str(orchestrated.directory), "mover")
    assert bad.returncode != 0 and "must be SERVICE:REPLICA" in bad.stderr


@pytest.mark.parametrize("orchestrated", ["docker"], indirect=True)
def test_built_in_services_in_containers_and_the_analyser_s_node_killed(orchestrated: OrchestratedCluster,
                                                                         tmp_path: Path):
    """The issue's scene: collector and analyser as containers; the analyser's node is SIGKILLed.

    Its container outlives the node process (dockerd owns it); the analyser sees the retained
    placement name another node and exits (fencing), so it never runs twice.
    """
    for service in ("collector", "analyser"):
        cluster.add_member(orchestrated.directory, service, "service")
    orchestrated.broker.refresh()
    time.sleep(0.5)
    (tmp_path / "collector.toml").write_text('[service]\nname = "collector"\nprogram = "collector"\n'
                                             '[service.inputs]\ntopics = ["dev/+/data"]\n')
    (tmp_path / "analyser.toml").write_text('[service]\nname = "analyser"\nprogram = "analyser"\n'
                                            '[service.inputs]\nservices = ["collector"]\n'
                                            '[service.constraints]\nanti_affinity = ["collector"]\n')
    for name in ("collector", "analyser"):
        result = orchestrated.tomq("deploy", str(orchestrated.directory), str(tmp_path / f"{name}.toml"))
        assert result.returncode == 0, result.stdout + result.stderr + orchestrated.logs()
    assert wait_until(lambda: {("collector", 0), ("analyser", 0)} <= orchestrated.running().keys(), 20)
    running = orchestrated.running()
    assert running[("collector", 0)][0] != running[("analyser", 0)][0]  # anti-affinity
    assert wait_until(lambda: placed_by_ledger(orchestrated) == orchestrated.running(), 10)
    time.sleep(2)
    assert orchestrated.running() == running  # the programs stay up in their containers (no crash loop)
    victim, _ = running[("analyser", 0)]
    orchestrated.nodes[victim].kill()
    killed_at = time.monotonic()

    def analysers() -> list[str]:
        return [labels["tomq.node"] for labels in orchestrated._instance_labels() if labels["tomq.service"] == "analyser"]

    assert wait_until(lambda: any(node != victim for node in analysers()), 15, 0.1), orchestrated.logs()
    took = time.monotonic() - killed_at
    # The container on the dead node's machine is fenced: it sees the retained placement name another
    # node and exits. (Meanwhile the broker has handed its persistent session to the new instance.)
    assert wait_until(lambda: victim not in analysers(), 10, 0.1), analysers()
    fenced = time.monotonic() - killed_at
    print(f"analyser container running on {analysers()} {took:.2f} s after the kill; the old one gone at {fenced:.2f} s")
    assert took < 5.0
    assert wait_until(lambda: any(
        r.state == ORCH and r.structure.reason.get("replaces", {}).get("node") == victim  # type: ignore[union-attr]
        for _, r, _ in orchestrated.ledger_records()), 10)


def test_on_demand_each_request_elects_a_leader_that_places_it_then_pauses(tmp_path: Path):
    """The consensus paper's mode: no leader while idle; a request makes a node stand for election."""
    running = OrchestratedCluster(tmp_path, "process", None, mode="on-demand")
    running.start()
    running.proposer().close()  # points cluster.toml at the test broker
    published: list[str] = []  # services of the placement documents the leaders published

    def on_placement(topic: str, payload: bytes, retained: bool) -> None:
        if not retained and payload:
            published.append(json.loads(payload)["service"])

    watcher = MqttLink(host="127.0.0.1", port=running.broker.port, username="n1",
                       password=cluster.broker_password(running.cluster.signing_key("n1")), on_message=on_placement)
    watcher.subscribe(f"{running.cluster.topics.root}/orch/placement/+")
    watcher.start()
    try:
        for name in ("first", "second"):
            # Each request finds the cluster paused, so each is placed by a leader elected for it.
            assert wait_until(lambda: running.status()["leader"] is None, 15, 0.5), running.logs()
            spec = write_spec(tmp_path / f"{name}.toml", name)
            result = running.tomq("deploy", str(running.directory), str(spec), "--wait", "30")
            assert result.returncode == 0, result.stdout + result.stderr + running.logs()
        assert wait_until(lambda: {("first", 0), ("second", 0)} <= running.running().keys(), 20)
        assert wait_until(lambda: placed_by_ledger(running) == running.running(), 10)
        # Every placement waited for an election: its phases say how long the votes took.
        def timings() -> list[dict[str, Any]]:
            nodes = running.status()["nodes"].values()
            return [t for n in nodes for t in n.get("orchestration", {}).get("placement_timings", [])]

        assert wait_until(lambda: len(timings()) == 2, 10, 0.5), timings()
        assert all(t["mode"] == "on-demand" and t["trigger"] == "request" for t in timings())
        assert all(t["phases_ms"]["election_network"] is not None for t in timings()), timings()
        # ...and once the work is done (certificates included) the leader pauses again.
        assert wait_until(lambda: running.status()["leader"] is None, 15, 0.5)
        # The second election's leader found "first" retained as committed: it did not publish it again.
        assert sorted(published) == ["first", "second"], published
        verify = running.tomq("ledger", "verify", str(running.ledger_dir), "--operator-key",
                              str(running.directory / "operator" / "operator.pub"))
        assert verify.returncode == 0, verify.stdout + verify.stderr
    finally:
        watcher.stop()
        running.stop()
        running.kill_instances()


@pytest.fixture
def web_deployed(tmp_path: Path) -> Iterator[OrchestratedCluster]:
    """A stable 3-node cluster (process runtime) with one service, "web", deployed and placed."""
    running = OrchestratedCluster(tmp_path, "process", None)
    running.start()
    running.proposer().close()  # points cluster.toml at the test broker
    try:
        assert wait_until(lambda: running.status()["leader"] is not None, 30, 0.5), running.logs()
        spec = write_spec(tmp_path / "web.toml", "web")
        result = running.tomq("deploy", str(running.directory), str(spec), "--wait", "30")
        assert result.returncode == 0, result.stdout + result.stderr + running.logs()
        yield running
    finally:
        running.stop()
        running.kill_instances()


def test_the_leader_puts_back_a_retained_placement_that_someone_overwrote(web_deployed: OrchestratedCluster):
    """Only nodes may publish placements, but a broken or hostile one could: services fence on them."""
    running = web_deployed
    assert wait_until(lambda: len(placed_by_ledger(running)) == 1, 10)  # the block reaches the shared dir
    [(node, height)] = placed_by_ledger(running).values()
    committed = {"0": {"node": node, "height": height}}
    assert wait_until(lambda: running.placements().get("web", {}).get("replicas") == committed, 10)
    elsewhere = next(n for n in ("n1", "n2", "n3") if n != node)
    forger = MqttLink(host="127.0.0.1", port=running.broker.port, username=elsewhere,
                      password=cluster.broker_password(running.cluster.signing_key(elsewhere)))
    forger.start()
    try:
        forged = {"service": "web", "height": height, "replicas": {"0": {"node": elsewhere, "height": height}}}
        forger.publish(running.cluster.topics.orch_placement("web"), json.dumps(forged).encode(), qos=1,
                       retain=True)
    finally:
        forger.stop()
    assert wait_until(lambda: running.placements().get("web", {}).get("replicas") == committed, 10), \
        running.placements()


def test_placements_are_retained_again_after_the_broker_restarts_empty(web_deployed: OrchestratedCluster):
    """The test's mosquitto keeps nothing across a restart (persistence off): the nodes publish again."""
    running = web_deployed
    assert wait_until(lambda: "web" in running.placements(), 10)
    running.broker.stop()
    running.broker.start()
    assert running.placements() == {}  # the broker came back without them
    assert wait_until(lambda: "web" in running.placements(), 30, 0.5), running.logs()
