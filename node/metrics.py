"""Prometheus metrics of one node, served on a loopback port.

Gauges are read from the daemon when Prometheus scrapes (no bookkeeping on the hot path); the
commit-latency histogram is fed by the ledger as records commit.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from tomq.errors import ConfigError

ROLE_CODES = {"follower": 0, "pre-candidate": 1, "candidate": 2, "leader": 3}


class NodeMetrics:
    def __init__(self, status: Callable[[], dict[str, Any]], transport_counts: Callable[[], dict[str, int]]) -> None:
        self.registry = CollectorRegistry()
        self._status = status
        self._counts = transport_counts
        gauge = self._gauge
        gauge("tomq_raft_term", "current Raft term", lambda s: s["term"])
        gauge("tomq_raft_role", "0 follower, 1 pre-candidate, 2 candidate, 3 leader", lambda s: ROLE_CODES[s["role"]])
        gauge("tomq_raft_commit_index", "highest committed log index", lambda s: s["commit"])
        gauge("tomq_raft_applied_index", "highest applied log index", lambda s: s["applied"])
        gauge("tomq_raft_apply_lag", "committed but not yet applied entries", lambda s: s["commit"] - s["applied"])
        gauge("tomq_raft_last_index", "last log index", lambda s: s["last_index"])
        gauge("tomq_ledger_height", "height of the last block applied", lambda s: s.get("height", -1))
        for name, key in (("tomq_raft_batches_sent", "sent"), ("tomq_raft_batches_received", "received"),
                          ("tomq_raft_batches_refused", "refused")):
            metric = Gauge(name, f"Raft message batches {key} (total)", registry=self.registry)
            metric.set_function(self._count_reader(key))
        self.commit_latency = Histogram(
            "tomq_ledger_commit_latency_seconds", "record proposal to majority commit",
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5), registry=self.registry)
        self.records_committed = Counter("tomq_ledger_records_committed", "records committed",
                                         registry=self.registry)
        # Senders are names the broker authenticated (from the topic), so the label set stays bounded.
        self.refused = Counter("tomq_refused", "inputs refused, by kind, sender and reason",
                               ["what", "sender", "reason"], registry=self.registry)

    def _count_reader(self, key: str) -> Callable[[], float]:
        return lambda: float(self._counts().get(key, 0))

    def _gauge(self, name: str, help: str, read: Callable[[dict[str, Any]], float]) -> None:
        metric = Gauge(name, help, registry=self.registry)
        metric.set_function(lambda: float(read(self._status())))

    def serve(self, port: int) -> int:
        """Serve /metrics on 127.0.0.1 only: metrics are for the operator's scraper, not the field.

        Port 0 lets the system pick a free one; the port actually bound is returned so it can be logged.
        A port already in use is a ConfigError naming it, not a traceback."""
        return serve_metrics(port, self.registry)


MAX_PORT_TRIES = 8


def serve_metrics(port: int, registry: CollectorRegistry, avoid: Collection[int] = ()) -> int:
    """Serve `registry` on 127.0.0.1:`port` (0: any free port) and return the port.

    `avoid`: ports this process is about to listen on. With port 0 the kernel may pick one of them,
    free until then: the embedded broker's metrics once took the port its MQTT listener was started
    on, which then could not bind (a CI run). Such a pick is held while another is made, then let go.
    """
    picked_wrong = []
    try:
        for _ in range(MAX_PORT_TRIES):
            try:
                server, _ = start_http_server(port, addr="127.0.0.1", registry=registry)
            except OSError as exc:
                raise ConfigError(f"cannot serve metrics on 127.0.0.1:{port}: {exc.strerror}") from None
            if port != 0 or server.server_port not in avoid:
                return int(server.server_port)
            picked_wrong.append(server)
        raise ConfigError(f"no free metrics port outside {sorted(avoid)[:8]} in {MAX_PORT_TRIES} tries")
    finally:
        for server in picked_wrong:
            server.shutdown()
            server.server_close()
