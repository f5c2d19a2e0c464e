"""Commit latency of this checkout against another one, in turns, on one noisy machine.

    .venv/bin/python bench/ab.py OTHER_CHECKOUT [--a CHECKOUT] [--clusters 3] [--rounds 12] [--per-round 100]
                                 [--nodes 3] [--broker mosquitto] [--env-a KEY=VALUE] [--env-b KEY=VALUE]

A is this checkout (or `--a`), B the other one (a clone or `git worktree` with its own .venv: run
`bash scripts/bootstrap "[test]"` there first). Both clusters (a broker and N `tomq node` processes
each, on loopback, run from their checkout) are started at once and measured in rounds, A and B in
turn (ABBA...), the one not measured SIGSTOPped, as bench/cluster.py pauses tomq while it measures
etcd. A round is `--per-round` sequential records after 10 of warm-up, from the same kind of client
as bench/cluster.py's latency runs (publish on ledger/propose/n1 -> the record's audit line). This is
repeated on `--clusters` pairs of fresh clusters (each start draws its own leader and keys).

Why: this machine's speed drifts by half within minutes, so two runs of bench/cluster.py minutes
apart cannot tell a 5 % change from the weather. Here every round of A has a round of B within a
second of it, and the median of the per-round ratios A/B cancels the drift. Which cluster starts
first alternates from pair to pair: with A always first, two A/A runs (this checkout against
itself, the defaults, about 1.5 minutes each on 2 cores) gave 0.999 and 1.044; alternating, three
gave 0.990, 0.993 and 0.983. Differences under about 3 % are not resolved: run a comparison both
ways (`--a OTHER THIS`) and take both.

Printed: each round's p50 of A and B and their CPU per record (all processes of the cluster and
this client); at the end the median ratio with its quartiles, the CPU per record of each kind of
process (client, broker, leader, followers together), and p50/p90/p99 of all of each side's
records. `--env-a`/`--env-b` set environment variables for one side's broker and nodes (an
experiment's switch). Every process is stopped at the end, also on Ctrl-C; a benchmark, never a test.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.cluster import Client, LatencyProbe, TomqCluster, join_sensor, stopped_at_exit
from bench.common import Processes, log, per_record_ms, percentile, scheduler_seconds

REPO = Path(__file__).resolve().parents[1]
WARM_UP = 10


def key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, not {text!r}")
    return key, value


class Side:
    """One checkout's running cluster and its latency client."""

    def __init__(self, label: str, cluster: TomqCluster | None) -> None:
        self.label = label
        self.cluster = cluster
        self.client: Client | None = None
        self.probe: LatencyProbe | None = None
        self.p50s: list[float] = []
        self.cpu: list[float] = []
        self.cpu_by_kind: list[dict[str, float]] = []
        self.latencies: list[float] = []

    def paused(self) -> contextlib.AbstractContextManager[None]:
        assert self.cluster is not None
        return self.cluster.paused()

    def add(self, other: Side) -> None:
        """Take in another cluster's rounds (a side's totals over pairs of clusters)."""
        self.p50s += other.p50s
        self.cpu += other.cpu
        self.cpu_by_kind += other.cpu_by_kind
        self.latencies += other.latencies

    def connect(self) -> None:
        assert self.cluster is not None
        directory = self.cluster.directory
        self.client = Client(directory)
        join_sensor(self.client, directory)
        self.probe = LatencyProbe(self.client, directory)
        self.probe.measure(3 * WARM_UP)

    def round(self, count: int) -> None:
        assert self.probe is not None and self.cluster is not None
        processes = {"broker": self.cluster.broker, **self.cluster.nodes}
        self.probe.measure(WARM_UP)
        before = scheduler_seconds(processes)
        latencies = self.probe.measure(count)
        used = {name: on_cpu for name, (on_cpu, _) in
                per_record_ms(before, scheduler_seconds(processes), count, self.cluster.leader()).items()}
        self.p50s.append(statistics.median(latencies) * 1000)
        self.cpu.append(sum(used.values()))
        self.cpu_by_kind.append({"client": used.get("client", 0.0), "broker": used.get("broker", 0.0),
                                 "leader": sum(v for k, v in used.items() if k.endswith("(leader)")),
                                 "followers": sum(v for k, v in used.items() if k.startswith("n") and "(" not in k)})
        self.latencies.extend(latencies)

    def close(self) -> None:
        if self.probe is not None:
            self.probe.close()
        if self.client is not None:
            self.client.close()

    def summary(self) -> str:
        kinds = " ".join(f"{kind} {statistics.median(row[kind] for row in self.cpu_by_kind):.2f}"
                         for kind in ("client", "broker", "leader", "followers"))
        p50, p90, p99 = (percentile(self.latencies, fraction) * 1000 for fraction in (0.5, 0.9, 0.99))
        return (f"{self.label}: p50 {p50:.2f} p90 {p90:.2f} p99 {p99:.2f} ms over {len(self.latencies)} records; "
                f"CPU ms per record: {kinds} (total {statistics.median(self.cpu):.2f})")


def start_pair(processes: Processes, args: argparse.Namespace, mine: Path, other: Path, pair: int) -> list[Side]:
    """Start A's and B's cluster, [A, B]; which starts (and connects) first alternates with `pair`,
    so that whatever starting first does to a cluster falls on both sides alike."""
    specs = [("A", mine, dict(args.env_a)), ("B", other, dict(args.env_b))]
    order = (0, 1) if pair % 2 == 0 else (1, 0)
    sides: list[Side | None] = [None, None]
    for index in order:
        label, checkout, env = specs[index]
        workdir = Path(tempfile.mkdtemp(prefix=f"tomq-ab-{label}-"))
        cluster = TomqCluster(processes, workdir, args.broker, args.nodes, tuple(args.node_args.split()),
                              checkout=checkout, env=env)
        cluster.start()
        sides[index] = Side(f"{label} {checkout}", cluster)
    started = [side for side in sides if side is not None]
    for index in order:
        with started[1 - index].paused():
            started[index].connect()
    return started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("other", type=Path, help="the checkout to compare with (B)")
    parser.add_argument("--a", type=Path, default=REPO, help="the checkout measured as A (default: this one)")
    parser.add_argument("--clusters", type=int, default=3, help="pairs of fresh clusters, one after the other")
    parser.add_argument("--rounds", type=int, default=12, help="rounds (A and B) on each pair")
    parser.add_argument("--per-round", type=int, default=100)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--broker", choices=("mosquitto", "amqtt"), default="mosquitto")
    parser.add_argument("--env-a", type=key_value, action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--env-b", type=key_value, action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--node-args", default="", help="extra `tomq node` options for both sides")
    args = parser.parse_args()
    mine, other = args.a.resolve(), args.other.resolve()
    for checkout in (mine, other):
        if not (checkout / ".venv" / "bin" / "python").exists():
            raise SystemExit(f"{checkout} has no .venv: run `bash scripts/bootstrap \"[test]\"` there first")
    processes = Processes()
    totals = [Side(f"A {mine}", None), Side(f"B {other}", None)]
    with stopped_at_exit(processes):
        for pair in range(args.clusters):
            sides = start_pair(processes, args, mine, other, pair)
            log(f"clusters {pair + 1} of {args.clusters}: {args.rounds} rounds of {args.per_round} records, "
                "A and B in turn, the other paused")
            for number in range(args.rounds):
                for index in ((0, 1) if number % 2 == 0 else (1, 0)):
                    with sides[1 - index].paused():
                        sides[index].round(args.per_round)
                a, b = sides
                log(f"round {number + 1}: p50 A {a.p50s[-1]:.2f} B {b.p50s[-1]:.2f} ms (A/B {a.p50s[-1] / b.p50s[-1]:.3f}); "
                    f"CPU ms/record A {a.cpu[-1]:.2f} B {b.cpu[-1]:.2f}")
            for side, total in zip(sides, totals, strict=True):
                side.close()
                total.add(side)
            processes.stop_all()
        a, b = totals
        ratios = [x / y for x, y in zip(a.p50s, b.p50s, strict=True)]
        quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        cpu_ratio = statistics.median(x / y for x, y in zip(a.cpu, b.cpu, strict=True))
        print(a.summary())
        print(b.summary())
        print(f"p50 A/B: median of {len(ratios)} rounds on {args.clusters} pairs of clusters {statistics.median(ratios):.3f} "
              f"(quartiles {quartiles[0]:.3f}-{quartiles[2]:.3f}); CPU per record A/B {cpu_ratio:.3f}")


if __name__ == "__main__":
    main()
