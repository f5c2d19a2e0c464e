"""Ports picked for servers that bind them later (tomq/ports.py): outside the ephemeral range, where
no outgoing connection can take them meanwhile, never twice, never one something is bound to."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tomq import ports


def test_ports_come_from_below_the_ephemeral_range_and_are_never_handed_out_twice():
    low = ports.ephemeral_low()
    picked = [ports.free_port() for _ in range(300)]
    assert len(set(picked)) == len(picked)
    assert low - max(1024, low - ports.PICK_BELOW) >= ports.ATTEMPTS, "this machine leaves room below its range"
    assert all(max(1024, low - ports.PICK_BELOW) <= port < low for port in picked), (low, sorted(picked)[:5])


def test_a_port_something_is_bound_to_is_not_bindable():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        assert not ports._bindable(taken)
    assert ports._bindable(taken)


def test_without_room_below_the_range_the_kernel_chooses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    real_low = ports.ephemeral_low()
    squeezed = tmp_path / "ip_local_port_range"
    squeezed.write_text("1100\t60999\n")  # fewer free ports below than attempts: no picking there
    monkeypatch.setattr(ports, "EPHEMERAL_RANGE_FILE", squeezed)
    assert ports.ephemeral_low() == 1100
    port = ports.free_port()
    assert port >= real_low and ports._bindable(port)


def test_an_unreadable_range_file_means_linux_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(ports, "EPHEMERAL_RANGE_FILE", tmp_path / "missing")
    assert ports.ephemeral_low() == ports.DEFAULT_EPHEMERAL_LOW
    (tmp_path / "garbage").write_text("not ports")
    monkeypatch.setattr(ports, "EPHEMERAL_RANGE_FILE", tmp_path / "garbage")
    assert ports.ephemeral_low() == ports.DEFAULT_EPHEMERAL_LOW
