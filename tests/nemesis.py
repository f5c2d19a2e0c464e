"""Nemesis runs: a real cluster in network namespaces, faults injected from a seed, a client keeping score.

    bed = NetBed(["broker", "n1", "n2", "n3", "client"], workdir)      # tests/netbed.py
    cluster = NemesisCluster(bed, workdir, ledger_dir=mount)            # mosquitto + 3 `tomq node` + client
    result = run_nemesis(cluster, volume, seed=7, kinds=FAULT_KINDS)    # each fault once, in a seeded order

Each fault is injected, held for a few seconds, healed, and then the runner waits until a record the
client proposed after the heal is acknowledged: that wait is the fault's recovery time, and it must
stay under `RECOVERY_BOUND`. The schedule (order, targets, durations) comes from `random.Random(seed)`
alone, so a failing seed names the same faults when run again; the cluster's own timing (elections,
TCP retransmits) is real and is not replayed.

What each fault does to the real system:
    partition         one or two nodes (and half the time the client) cut both ways from the broker, so
                      from everyone: with one broker every message between nodes passes through it
    leader-isolation  the current leader cut from every other host
    one-way           a node's packets to the broker dropped, or the broker's to the node (one direction)
    kill-restart      a node SIGKILLed (the leader half of the time) and started again
    pause             a node SIGSTOPped (the leader half of the time), then SIGCONTed
    broker-restart    mosquitto SIGKILLed and started again (no persistence: every session starts over)
    slow-lossy-links  every node's link: 200 ms ± 100 ms delay and 5 % loss, both directions (netbed's
                      netem: this kernel has no sch_netem, see tests/netbed.py)
    clock-jump        one node (started under libfaketime) jumps 30 s ahead, wall and monotonic clocks,
                      and stays ahead for the rest of the run
    brick-loss        a GlusterFS brick of the shared ledger volume SIGKILLed, then started again
                      (`gluster volume start V force`) and healed

The verdict on the history is not the runner's: tests/history_checker.py reads every node's store,
the shared directory and the client's acknowledgements, with its own decoder.
"""

from __future__ import annotations

import itertools
import json
import random
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from netbed import BedProcess, NetBed
from procs import PYTHON, free_port, leader_from_logs, which
from tomq import cluster
from tomq.broker.mosquitto import write_mosquitto_config
from tomq.node.cli import write_genesis

NODES = ("n1", "n2", "n3")
HOSTS = ("broker", *NODES, "client")
FAULT_KINDS = ("partition", "leader-isolation", "one-way", "kill-restart", "pause", "broker-restart",
               "slow-lossy-links", "clock-jump", "brick-loss")
RECOVERY_BOUND = 30.0  # seconds from a heal until a record proposed after it is acknowledged
CLOCK_VICTIM = "n3"  # runs under libfaketime for the whole run; n1's identity is the client's
CLOCK_JUMP_SECONDS = 30
FAKETIME_LIBRARY = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")


@dataclass
class Fault:
    kind: str
    target: str
    injected: float  # wall clock of the runner (the client's clock too)
    healed: float = 0.0
    recovered: float | None = None  # when the first record proposed after the heal was acknowledged
    detail: str = ""
    acked_during: int = 0  # records acknowledged between injection and heal: progress through the fault
    longest_gap: float | None = None  # the longest time without an acknowledgement, injection to recovery

    @property
    def recovery(self) -> float | None:
        return None if self.recovered is None else round(self.recovered - self.healed, 2)


@dataclass
class NemesisResult:
    seed: int
    faults: list[Fault] = field(default_factory=list)
    acknowledged: int = 0
    proposed: int = 0
    unacknowledged: list[str] = field(default_factory=list)
    checker: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for fault, item in zip(self.faults, data["faults"], strict=True):
            item["recovery"] = fault.recovery
        return data


class NemesisCluster:
    """mosquitto, three `tomq node`s and the scoring client, each in its own namespace of `bed`."""

    def __init__(self, bed: NetBed, workdir: Path, ledger_dir: Path, *, rate: float = 20.0) -> None:
        self.bed = bed
        self.workdir = workdir
        self.ledger_dir = ledger_dir
        self.directory = workdir / "cluster"
        self.port = free_port()
        broker = bed.address("broker")
        cluster.init(self.directory, list(NODES), broker=f"{broker}:{self.port}",
                     cluster_name=f"nemesis-{workdir.name[-6:]}".replace("_", "-"))
        cluster.add_member(self.directory, "s1", "sensor")
        write_genesis(self.directory)
        mosquitto = which("mosquitto")
        assert mosquitto is not None
        config = write_mosquitto_config(self.directory, workdir / "broker", self.port, host=broker)
        self.broker = BedProcess(bed, "broker", [mosquitto, "-c", str(config)], workdir / "logs" / "broker.log")
        self.clock_file = workdir / "faketime"
        self.clock_file.write_text("+0\n")
        self.clock_offset = 0
        self.nodes: dict[str, BedProcess] = {}
        for name in NODES:
            argv = [PYTHON, "-m", "tomq", "node", str(self.directory), "--id", name,
                    "--ledger-dir", str(ledger_dir), "--runtime", "process"]
            env = self._faketime_env() if name == CLOCK_VICTIM else {}
            self.nodes[name] = BedProcess(bed, name, argv, workdir / "logs" / f"{name}.log", env=env)
        self.acks_path = workdir / "acks.jsonl"
        self.stop_file = workdir / "client.stop"
        self.client = BedProcess(bed, "client", [
            PYTHON, str(Path(__file__).parent / "nemesis_client.py"), str(self.directory), "--as", "n1",
            "--rate", str(rate), "--out", str(self.acks_path), "--stop-file", str(self.stop_file)],
            workdir / "logs" / "client.log")

    def _faketime_env(self) -> dict[str, str]:
        # Both clocks jump: this libfaketime (0.9.10) cannot leave the monotonic clock alone without
        # breaking Python's time.sleep (clock_nanosleep returns EINVAL), so the victim's timers jump too.
        # And on the victim a timed wait on a lock (Condition/Event.wait(timeout)) does not return for
        # minutes, while time.sleep and select/poll timeouts work: node code that must keep time on
        # the victim sleeps (the block writer) or polls (the instance worker, tomq/wakeup.py).
        return {"LD_PRELOAD": str(FAKETIME_LIBRARY), "FAKETIME_TIMESTAMP_FILE": str(self.clock_file),
                "FAKETIME_CACHE_DURATION": "1"}

    def start(self) -> None:
        self.broker.start()
        self.bed.wait_for_port("broker", self.port, process=self.broker)
        for node in self.nodes.values():
            node.start()
        self.client.start()

    def stop(self) -> None:
        for process in (self.client, *self.nodes.values(), self.broker):
            process.stop()

    def leader(self) -> str | None:
        """The node that most recently logged becoming leader (highest term)."""
        return leader_from_logs(self.nodes)

    def acks(self) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
        """The client's acknowledgements so far, and its final line once it has exited."""
        lines: list[dict[str, Any]] = []
        final = None
        if self.acks_path.exists():
            for text in self.acks_path.read_text().splitlines():
                try:
                    item = json.loads(text)
                except ValueError:
                    continue  # a line being written
                if "unacknowledged" in item:
                    final = item
                else:
                    lines.append(item)
        return lines, final

    def jump_clock(self, seconds: int) -> None:
        self.clock_offset += seconds
        self.clock_file.write_text(f"+{self.clock_offset}s\n")

    def store(self, name: str) -> Path:
        return self.directory / "members" / name / "state" / "blocks"

    def logs(self, lines: int = 30) -> str:
        parts = [f"--- {name}\n{process.tail(lines)}" for name, process in
                 (("broker", self.broker), *self.nodes.items(), ("client", self.client))]
        return "\n".join(parts)


class Nemesis:
    """Injects one fault of a kind and returns how to heal it."""

    def __init__(self, target: NemesisCluster, rng: random.Random, volume: Any = None) -> None:
        self.cluster = target
        self.bed = target.bed
        self.rng = rng
        self.volume = volume

    def _some_node(self) -> str:
        leader = self.cluster.leader()
        if leader is not None and self.rng.random() < 0.5:
            return leader
        return self.rng.choice(NODES)

    def inject(self, kind: str) -> tuple[str, Callable[[], str]]:
        """Inject a fault of `kind`; return (target, heal), where heal() undoes it and says how."""
        return getattr(self, "_" + kind.replace("-", "_"))()

    def _partition(self) -> tuple[str, Callable[[], str]]:
        cut = sorted(self.rng.sample(NODES, self.rng.choice((1, 2))))
        if self.rng.random() < 0.5:
            # The client too: its proposals in flight are lost with the link, and its re-sealed
            # retries must still commit exactly once.
            cut.append("client")
        for name in cut:
            self.bed.cut(name, "broker")
        return ",".join(cut) + " | broker", self._heal_links

    def _leader_isolation(self) -> tuple[str, Callable[[], str]]:
        leader = self.cluster.leader() or self.rng.choice(NODES)
        self.bed.cut(leader)
        return leader, self._heal_links

    def _one_way(self) -> tuple[str, Callable[[], str]]:
        name = self.rng.choice(NODES)
        if self.rng.random() < 0.5:
            self.bed.cut(name, "broker", one_way=True)
            return f"{name} -> broker dropped", self._heal_links
        self.bed.cut("broker", name, one_way=True)
        return f"broker -> {name} dropped", self._heal_links

    def _heal_links(self) -> str:
        self.bed.heal()
        return "links restored"

    def _kill_restart(self) -> tuple[str, Callable[[], str]]:
        name = self._some_node()
        node = self.cluster.nodes[name]
        node.kill()

        def heal() -> str:
            node.start()
            return f"{name} restarted"

        return name, heal

    def _pause(self) -> tuple[str, Callable[[], str]]:
        name = self._some_node()
        node = self.cluster.nodes[name]
        node.pause()

        def heal() -> str:
            node.resume()
            return f"{name} resumed"

        return name, heal

    def _broker_restart(self) -> tuple[str, Callable[[], str]]:
        self.cluster.broker.kill()

        def heal() -> str:
            self.cluster.broker.start()
            return "broker started"

        return "broker", heal

    def _slow_lossy_links(self) -> tuple[str, Callable[[], str]]:
        for name in NODES:
            self.bed.netem(name, 200, 100, 5.0)

        def heal() -> str:
            self.bed.clear_netem()
            return "netem removed"

        return "n1,n2,n3 links: 200±100 ms, 5 % loss", heal

    def _clock_jump(self) -> tuple[str, Callable[[], str]]:
        self.cluster.jump_clock(CLOCK_JUMP_SECONDS)
        return f"{CLOCK_VICTIM} +{CLOCK_JUMP_SECONDS} s", lambda: f"{CLOCK_VICTIM} stays {self.cluster.clock_offset} s ahead"

    def _brick_loss(self) -> tuple[str, Callable[[], str]]:
        if self.volume is None:
            raise RuntimeError("brick-loss needs the shared ledger on a GlusterFS volume")
        index = self.rng.randrange(len(self.volume.bricks))
        self.volume.kill_brick(index)

        def heal() -> str:
            self.volume.restart_brick(index)
            return f"brick {index} started and healing"

        return f"brick {index}", heal


def wait_for_progress(target: NemesisCluster, since: float, timeout: float) -> float | None:
    """When the first record first proposed at or after `since` was acknowledged, or None at the timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        acked = [item["acked"] for item in target.acks()[0] if item["sent"] >= since]
        if acked:
            return min(acked)
        time.sleep(0.2)
    return None


def run_nemesis(target: NemesisCluster, seed: int, kinds: tuple[str, ...] = FAULT_KINDS, *, volume: Any = None,
                hold: tuple[float, float] = (3.0, 6.0), log: Callable[[str], None] = print) -> NemesisResult:
    """Each kind once, in an order drawn from `seed`; returns the faults with their recovery times."""
    rng = random.Random(seed)
    order = list(kinds)
    rng.shuffle(order)
    nemesis = Nemesis(target, rng, volume)
    result = NemesisResult(seed)
    started = time.monotonic()
    first = wait_for_progress(target, 0.0, 60)
    if first is None:
        raise AssertionError(f"the cluster never acknowledged a record before any fault\n{target.logs()}")
    for kind in order:
        injected = time.time()
        what, heal = nemesis.inject(kind)
        fault = Fault(kind, what, round(injected, 3))
        result.faults.append(fault)
        log(f"nemesis seed {seed}: {kind} on {what}")
        time.sleep(rng.uniform(*hold))
        fault.detail = heal()
        fault.healed = round(time.time(), 3)
        fault.recovered = wait_for_progress(target, fault.healed, RECOVERY_BOUND)
        log(f"nemesis seed {seed}: {fault.detail}; recovered in {fault.recovery} s")
        time.sleep(rng.uniform(0.5, 1.5))
    target.stop_file.touch()
    assert target.client.process is not None
    try:
        target.client.process.wait(120)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the client did not finish within 120 s\n{target.logs()}") from None
    acks, final = target.acks()
    assert final is not None, f"the client ended without its summary line\n{target.logs()}"
    acked_times = sorted(item["acked"] for item in acks)
    for fault in result.faults:
        fault.acked_during = sum(1 for t in acked_times if fault.injected <= t <= fault.healed)
        end = fault.recovered if fault.recovered is not None else fault.healed
        window = [fault.injected, *(t for t in acked_times if fault.injected < t < end), end]
        fault.longest_gap = round(max(b - a for a, b in itertools.pairwise(window)), 2)
    result.acknowledged = sum(1 for item in acks if item["id"].startswith("reading:"))
    result.proposed = final["proposed"]
    result.unacknowledged = final["unacknowledged"]
    result.seconds = round(time.monotonic() - started, 1)
    return result


def summary_rows(results: list[NemesisResult]) -> list[str]:
    """The figures table of RELIABILITY.md: one row per fault kind over every run given."""
    by_kind: dict[str, list[Fault]] = {}
    for result in results:
        for fault in result.faults:
            by_kind.setdefault(fault.kind, []).append(fault)
    rows = ["| fault | injected | recovered within bound | recovery median (s) | recovery max (s) | "
            "longest time without a commit (s) | commits during the fault |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for kind in FAULT_KINDS:
        faults = by_kind.get(kind, [])
        if not faults:
            continue
        times = [f.recovery for f in faults if f.recovery is not None]
        median = f"{statistics.median(times):.2f}" if times else "-"
        worst = f"{max(times):.2f}" if times else "-"
        gaps = [f.longest_gap for f in faults if f.longest_gap is not None]
        gap = f"{max(gaps):.2f}" if gaps else "-"
        during = sum(f.acked_during for f in faults)
        rows.append(f"| {kind} | {len(faults)} | {len(times)} | {median} | {worst} | {gap} | {during} |")
    return rows


def write_results(path: Path, result: NemesisResult) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.to_json(), indent=1) + "\n")


def load_results(directory: Path) -> list[NemesisResult]:
    results = []
    for path in sorted(directory.glob("seed-*.json")):
        data = json.loads(path.read_text())
        faults = [Fault(**{k: v for k, v in item.items() if k != "recovery"}) for item in data.pop("faults")]
        results.append(NemesisResult(**data, faults=faults))
    return results


def faketime_available() -> bool:
    return FAKETIME_LIBRARY.exists()


def runs_table(results: list[NemesisResult]) -> list[str]:
    rows = ["| seed | faults | run (s) | readings proposed | acknowledged | acknowledged but lost | checker |",
            "|---:|---:|---:|---:|---:|---:|---|"]
    for result in results:
        problems = result.checker.get("problems", [])
        lost = sum(1 for p in problems if p.startswith("acknowledged record") and "missing" in p)
        verdict = "ok" if not problems else f"{len(problems)} problems"
        rows.append(f"| {result.seed} | {len(result.faults)} | {result.seconds:.0f} | {result.proposed} | "
                    f"{result.acknowledged} | {lost} | {verdict}: {result.checker.get('summary', '')} |")
    return rows


BEGIN, END = "<!-- figures:begin -->", "<!-- figures:end -->"


def render(results_dir: Path, document: Path) -> None:
    """Rewrite the figures between BEGIN and END in `document` from the runs in `results_dir`."""
    results = load_results(results_dir)
    if not results:
        raise SystemExit(f"no seed-*.json in {results_dir}")
    text = document.read_text()
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    when = time.strftime("%Y-%m-%d", time.gmtime(max(f.injected for r in results for f in r.faults)))
    table = [f"Latest run: {when}, seeds {', '.join(str(r.seed) for r in results)} "
             f"(`bash scripts/nemesis {','.join(str(r.seed) for r in results)}`).", "",
             *runs_table(results), "", *summary_rows(results)]
    document.write_text(head + BEGIN + "\n" + "\n".join(table) + "\n" + END + tail)


if __name__ == "__main__":
    import sys

    render(Path(sys.argv[1]), Path(sys.argv[2]))


