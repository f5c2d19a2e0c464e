"""Metrics on `--metrics-port 0`: any free port, but never one the process is about to listen on.

The embedded broker serves its metrics before its MQTT listener binds; once the kernel handed the
metrics server the very port the listener was given (free until then), and the broker could not
start (a CI run). Real sockets here: the kernel's own choices, not a stand-in."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from tomq.errors import ConfigError
from tomq.node import metrics


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def ephemeral_ports() -> range:
    low, high = (int(v) for v in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    return range(low, high + 1)


def test_when_every_free_port_is_to_be_avoided_it_says_so_and_keeps_no_socket(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(metrics, "MAX_PORT_TRIES", 3)
    before = open_descriptors()
    with pytest.raises(ConfigError, match="no free metrics port outside"):
        metrics.serve_metrics(0, CollectorRegistry(), avoid=set(ephemeral_ports()))
    assert open_descriptors() == before  # the three picks were closed again
