"""`tomq bridge DIR --port PATH`: carries a serial device's readings to MQTT without forging or losing them.

The shell around `Session` (the pure protocol core): it opens the port (again and again, with
back-off, when the device is unplugged), feeds the session what the line brings, makes each reading
durable in the outbox of the identity it goes out as (uplink.py), acknowledges it, and publishes it.

    device-signed:   the device's envelope, byte for byte, on dev/<device>/data, as the device
                     (its broker password and its signed join and will come in its hello)
    bridge-attested: the bridge's own envelope for the reading, on dev/<bridge>/data, naming the
                     device ("attested": {"device", "seq"}); the bridge must be enrolled for it
                     (`tomq bridge DIR --enrol BRIDGE --attests DEVICE`)

Ordering rules:
- A reading is acknowledged on the line, and released for publishing, only after it is in its
  uplink's outbox (fsync'd) and the device's high-water mark (`marks`, the last device seq taken) is
  fsync'd too. A restart takes the high-water mark as the larger of `marks` and the readings still
  pending in the outboxes (and writes that back before publishing anything), so a reading stored
  just before a crash is never taken twice.
- Nothing is written to the line from a batch until every reading taken from that batch is durable
  (Session's ordering rule).
- A device-signed uplink leaves the broker without DISCONNECT (its will, "vanished", is published)
  only when its device has been off the line for `vanish_after` seconds and its outbox is empty.

Data directory (default DIR/bridge/<port name>), locked against a second bridge:

    marks                    device high-water marks (tomq.wire.FileWatermarks)
    uplinks/<name>/          one per identity: outbox.log, identity.json, and for the bridge's own seq
    counters.json            per-device counters, rewritten every `report_every` seconds and at exit

What this module must never do: acknowledge a reading that is not durable, alter a device-signed
envelope, or sign as anyone but the bridge identity enrolled for the device.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tomq import cluster as clusters
from tomq.bridge.port import LineGone, Opener, SerialLine, open_pyserial
from tomq.bridge.session import Introduce, Send, Session, Take
from tomq.bridge.uplink import DevicePresence, SelfPresence, Uplink, pack, unpack
from tomq.certificate import Certificate
from tomq.cluster import broker_password
from tomq.durable import lock_directory, replace_file
from tomq.errors import ConfigError, TomqError
from tomq.node.services.readings import BRIDGE_ATTESTED, seal_attested_reading
from tomq.sensors.outbox import Outbox
from tomq.wire import FileWatermarks, SequenceCounter

log = logging.getLogger("tomq.bridge")

REOPEN_MIN_DELAY, REOPEN_MAX_DELAY = 0.1, 2.0  # seconds, doubling while the port is missing
READ_TIMEOUT = 0.05
HELLO_REQUEST_EVERY = 1.0  # at most this often, when an uplink needs a fresh join from its device
DEFAULT_VANISH_AFTER = 30.0
DEFAULT_REPORT_EVERY = 10.0


class BridgeError(TomqError):
    """The bridge cannot run as asked (its data directory is in use, its identity is missing)."""


class Bridge:
    def __init__(self, directory: str | os.PathLike[str], port: str, *, baud: int = 115200,
                 data_dir: str | os.PathLike[str] | None = None, name: str | None = None,
                 host: str | None = None, broker_port: int | None = None,
                 vanish_after: float = DEFAULT_VANISH_AFTER, report_every: float = DEFAULT_REPORT_EVERY,
                 open_line: Opener = open_pyserial, clock: Callable[[], float] = time.time) -> None:
        self.cluster = clusters.load(directory)
        self.port_path, self.baud = port, baud
        self.name = name
        self.host = host if host is not None else self.cluster.broker_host
        self.broker_port = broker_port if broker_port is not None else self.cluster.broker_port
        self.vanish_after, self.report_every = vanish_after, report_every
        self.open_line, self.clock = open_line, clock
        default = self.cluster.directory / "bridge" / "".join(c if c.isalnum() or c in "._-" else "_"
                                                               for c in Path(port).name)
        self.data_dir = Path(data_dir) if data_dir is not None else default
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock_fd = lock_directory(self.data_dir)
        if lock_fd is None:
            raise BridgeError(f"{self.data_dir} is in use by another bridge")
        self._lock_fd = lock_fd
        self.marks = FileWatermarks(self.data_dir / "marks")
        self.uplinks: dict[str, Uplink] = {}
        self._presences: dict[str, DevicePresence] = {}
        self._self_presences: dict[str, SelfPresence] = {}
        self._attester_certificates: dict[str, Certificate] = {}
        self._last_heard: dict[str, float] = {}
        self.line: SerialLine | None = None
        self.line_counters = {"opens": 0, "losses": 0}
        self.session = Session(operator=self.cluster.operator, cluster=self.cluster.name,
                               high_water=self._recover(), attester_for=self._attester_for)
        self._stop = threading.Event()
        self._last_hello_request = 0.0
        self._last_report = time.monotonic()

    # ------------------------------------------------------------------ start-up

    def _recover(self) -> dict[str, int]:
        """High-water marks: the marks file, raised by whatever is still pending in the outboxes."""
        high: dict[str, int] = {}
        root = self.data_dir / "uplinks"
        for directory in sorted(root.iterdir()) if root.exists() else []:
            identity = _read_identity(directory)
            outbox = Outbox(directory / "outbox.log")
            pending = list(outbox.pending())
            outbox.close()
            for _, record in pending:
                device, device_seq, _ = unpack(record)
                high[device] = max(high.get(device, 0), device_seq)
            if pending and identity.get("mode") == BRIDGE_ATTESTED:
                self._attested_uplink(str(identity["name"]))  # drain what the last run left, device or not
        for line in (self.data_dir / "marks").read_text().splitlines() if (self.data_dir / "marks").exists() else []:
            device = line.split(" ")[0]
            high[device] = max(high.get(device, 0), self.marks.get(device))
        for device, seq in high.items():
            if seq > self.marks.get(device):
                self.marks.advance(device, seq)  # taken by the last run, stored, not yet marked
        self.marks.flush()  # before anything the outboxes hold is published (uplink.py: release)
        return high

    def _attester_for(self, device: str) -> str | None:
        """The bridge identity (with its key in DIR) whose certificate lets it speak for `device`."""
        names = [self.name] if self.name is not None else [m.name for m in self.cluster.members if m.role == "sensor"]
        for name in names:
            if name == device:
                continue
            certificate = self._attester_certificates.get(name)
            if certificate is None:
                if not (self.cluster.directory / "members" / name / "key").exists():
                    continue
                try:
                    certificate = self._attester_certificates[name] = self.cluster.certificate(name)
                except (TomqError, OSError):
                    continue
            if certificate.may_publish(f"dev/{device}/data"):
                return name
        return None

    # ------------------------------------------------------------------ running

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        """Serve the port until `stop()`; then drain briefly, disconnect cleanly and write the counters."""
        delay = REOPEN_MIN_DELAY
        log.info("bridge on %s at %d baud, data in %s", self.port_path, self.baud, self.data_dir)
        try:
            while not self._stop.is_set():
                if self.line is None:
                    if self._open():
                        delay = REOPEN_MIN_DELAY
                    else:
                        self._stop.wait(delay)
                        delay = min(delay * 2, REOPEN_MAX_DELAY)
                    self._housekeeping()
                    continue
                try:
                    data = self.line.read(READ_TIMEOUT)
                    if data:
                        self._receive(data)
                except LineGone as exc:
                    self._lose_line(str(exc))
                self._housekeeping()
        finally:
            self._shutdown()

    def _open(self) -> bool:
        try:
            self.line = self.open_line(self.port_path, self.baud)
        except LineGone as exc:
            log.debug("%s", exc)
            return False
        self.line_counters["opens"] += 1
        log.info("%s open (%s)", self.port_path, "first time" if self.line_counters["opens"] == 1 else "again")
        try:
            self.line.write(self.session.line_up(self.clock()))
        except LineGone as exc:
            self._lose_line(str(exc))
            return False
        return True

    def _lose_line(self, reason: str) -> None:
        log.warning("lost %s (%s); opening it again with back-off", self.port_path, reason)
        self.line_counters["losses"] += 1
        self.session.line_down()
        if self.line is not None:
            self.line.close()
        self.line = None

    def _receive(self, data: bytes) -> None:
        now = self.clock()
        actions = self.session.receive(data, now)
        if self.session.device is not None:
            self._last_heard[self.session.device] = time.monotonic()
        takes: list[Take] = []
        stored: dict[str, int] = {}  # uplink -> the highest outbox key stored from this batch
        for action in actions:
            if isinstance(action, Introduce):
                self._introduce(action)
            elif isinstance(action, Take):
                uplink, key = self._store(action, now)
                stored[uplink] = key
                takes.append(action)
        if takes:
            self.marks.flush()  # the high-water marks are durable before any ack leaves or any record goes out
            for name, key in stored.items():
                self.uplinks[name].release(key)
        out = b"".join(a.data for a in actions if isinstance(a, Send)) + b"".join(self.session.taken(takes))
        if out and self.line is not None:
            self.line.write(out)

    def _introduce(self, hello: Introduce) -> None:
        log.info("%s said hello (%s, seq %d)", hello.device, hello.mode, hello.hello_seq)
        if hello.mode == BRIDGE_ATTESTED:
            assert hello.attester is not None
            self._attested_uplink(hello.attester)
            return
        assert hello.join is not None and hello.will is not None and hello.password is not None
        presence = self._presences.get(hello.device)
        if presence is None:
            presence = self._presences[hello.device] = DevicePresence()
        presence.offer(hello.hello_seq, hello.join, hello.will)
        uplink = self.uplinks.get(hello.device)
        if uplink is None:
            directory = self._uplink_dir(hello.device, "device-signed")
            uplink = self.uplinks[hello.device] = Uplink(
                name=hello.device, cluster=self.cluster.name, host=self.host, port=self.broker_port,
                password=hello.password, directory=directory, presence=presence,
                client_id=f"tomq-{self.cluster.name}-bridge-{hello.device}")
            uplink.start()
        else:
            uplink.password = hello.password
            uplink.resume()
            uplink.wake()

    def _attested_uplink(self, bridge: str) -> Uplink:
        uplink = self.uplinks.get(bridge)
        if uplink is not None:
            return uplink
        key = self.cluster.signing_key(bridge)
        certificate = self.cluster.certificate(bridge)
        if certificate.subject.raw != key.public_key.raw:
            raise ConfigError(f"the certificate of {bridge} does not certify its key")
        directory = self._uplink_dir(bridge, BRIDGE_ATTESTED)
        presence = self._self_presences[bridge] = SelfPresence(key, certificate.encoded,
                                                               SequenceCounter(directory / "seq"), self.clock)
        uplink = self.uplinks[bridge] = Uplink(
            name=bridge, cluster=self.cluster.name, host=self.host, port=self.broker_port,
            password=broker_password(key), directory=directory, presence=presence,
            client_id=f"tomq-{self.cluster.name}-bridge-{bridge}")
        uplink.start()
        return uplink

    def _uplink_dir(self, name: str, mode: str) -> Path:
        directory = self.data_dir / "uplinks" / name
        directory.mkdir(parents=True, exist_ok=True)
        if not (directory / "identity.json").exists():
            replace_file(directory / "identity.json", json.dumps({"name": name, "mode": mode}).encode())
        return directory

    def _store(self, take: Take, now: float) -> tuple[str, int]:
        """Make one reading durable in its uplink's outbox and advance the device's high-water mark;
        return the uplink and the outbox key (released once the marks are flushed)."""
        if take.mode == BRIDGE_ATTESTED:
            assert take.attester is not None
            uplink = self._attested_uplink(take.attester)
            presence = self._self_presences[take.attester]
            with presence.lock:
                key = presence.counter.next()  # the bridge's own seq: sealed once per device reading
            wire = seal_attested_reading(presence.key, seq=key, time_ms=take.time_ms if take.time_ms is not None
                                         else int(now * 1000), device=take.device, device_seq=take.seq,
                                         value=take.value, unit=take.unit)
            uplink.store(key, pack(take.device, take.seq, wire))
        else:
            assert take.envelope is not None
            uplink = self.uplinks[take.device]
            self.store_signed(uplink, take)
            key = take.seq
        self.marks.advance(take.device, take.seq)
        return uplink.name, key

    def store_signed(self, uplink: Uplink, take: Take) -> None:
        """The device's envelope goes out exactly as it came (a test bridge overrides this to cheat)."""
        assert take.envelope is not None
        uplink.store(take.seq, pack(take.device, take.seq, take.envelope))

    # ------------------------------------------------------------------ periodic work

    def _housekeeping(self) -> None:
        now = time.monotonic()
        wanted = any(p.wanted for p in self._presences.values())
        if wanted and self.line is not None and now - self._last_hello_request >= HELLO_REQUEST_EVERY:
            self._last_hello_request = now
            for presence in self._presences.values():
                presence.wanted = False
            try:
                self.line.write(self.session.hello_request(self.clock(), "rejoin"))
            except LineGone as exc:
                self._lose_line(str(exc))
        if self.vanish_after > 0:
            for device, uplink in self.uplinks.items():
                if device not in self._presences or uplink.counters().outbox:
                    continue
                heard = self._last_heard.get(device, now)
                if self.session.device != device and now - heard > self.vanish_after and uplink.connected.is_set():
                    log.info("%s has been off the line for %.0f s: leaving the broker so its will speaks",
                             device, now - heard)
                    uplink.vanish()
        if now - self._last_report >= self.report_every:
            self._last_report = now
            self._report()

    def counters(self) -> dict[str, Any]:
        devices: dict[str, Any] = {name: c.as_dict() for name, c in self.session.counters.items()}
        uplinks = {name: {k: getattr(u.counters(), k) for k in ("stored", "published", "resent", "outbox",
                                                                  "connects")} for name, u in self.uplinks.items()}
        return {"port": self.port_path, "line": dict(self.line_counters), "devices": devices, "uplinks": uplinks}

    def _report(self) -> None:
        counters = self.counters()
        for name, c in counters["devices"].items():
            log.info("%s: frames %d, crc errors %d, resyncs %d, duplicates %d, taken %d, gaps %d, refused %d",
                     name, c["frames"], c["crc_errors"], c["resyncs"], c["duplicates"], c["taken"], c["gaps"],
                     c["refused"])
        replace_file(self.data_dir / "counters.json", json.dumps(counters, indent=1, sort_keys=True).encode())

    def _shutdown(self, drain: float = 5.0) -> None:
        if self.line is not None:
            self.line.close()
            self.line = None
        deadline = time.monotonic() + drain
        for uplink in self.uplinks.values():
            uplink.wait_drained(max(0.0, deadline - time.monotonic()))
        for uplink in self.uplinks.values():
            uplink.stop()
        self._report()
        self.marks.close()
        os.close(self._lock_fd)


def _read_identity(directory: Path) -> dict[str, Any]:
    try:
        value = json.loads((directory / "identity.json").read_text())
    except (OSError, ValueError):
        return {"name": directory.name, "mode": "device-signed"}
    return value if isinstance(value, dict) else {}


