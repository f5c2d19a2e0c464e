"""The serial bridge's pure parts, with no line, disk or broker: framing, the firmware's encoders
against tomq's own, the bridge's session as scenarios, attested readings and their PROV mapping,
and the firmware and the session together over an in-memory line that loses and damages frames.

The firmware (firmware-bridge/firmware/tomqfw.py) is MicroPython code with its own copies of COBS,
CRC-32, canonical CBOR, envelope sealing, identity ids and the broker password: each is checked
here byte for byte against the code the cluster uses (tomq.bridge.framing, tomq.canonical,
tomq.wire, tomq.identity, tomq.cluster), and its pure-Python Ed25519 and SHA-512 against
`cryptography` and hashlib.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import require
from tomq import canonical, wire
from tomq import certificate as certificates
from tomq.bridge import framing
from tomq.bridge.framing import ACK, ERROR, HELLO, READING, Fault, Frame, FrameDecoder
from tomq.bridge.session import Introduce, Send, Session, Take
from tomq.certificate import TrustStore
from tomq.cluster import broker_password
from tomq.errors import MalformedEnvelope
from tomq.identity import SigningKey
from tomq.node.services.readings import (
    BRIDGE_ATTESTED,
    DEVICE_SIGNED,
    MalformedReading,
    WrongDevice,
    open_reading,
    seal_attested_reading,
    seal_reading,
)
from tomq.records import DATA, Provenance, Record, prov_statements
from tomq.topics import default_publish_rights
from tomq.wire import EnvelopeOpener

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "firmware-bridge" / "firmware"))

import ed25519
import tomqfw

CLUSTER = "proto"
NOW = 1_800_000_000.0


# ------------------------------------------------------------------------------------------ framing


@given(st.binary(max_size=1200))
def test_cobs_round_trips_without_zeros_and_the_firmware_agrees(data: bytes) -> None:
    stuffed = framing.cobs_encode(data)
    assert 0 not in stuffed and len(stuffed) <= len(data) + len(data) // 254 + 1
    assert framing.cobs_decode(stuffed) == data
    assert tomqfw.cobs_encode(data) == stuffed and tomqfw.cobs_decode(stuffed) == data


@given(st.sampled_from([HELLO, READING, ACK, ERROR]), st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1),
       st.binary(max_size=600))
def test_a_frame_is_the_same_bytes_from_bridge_and_firmware_and_decodes_back(type: int, seq: int, ref: int,
                                                                            body: bytes) -> None:
    line = framing.encode_frame(type, seq, ref, body)
    assert line == tomqfw.encode_frame(type, seq, ref, body)
    assert line[0] == 0 and line[-1] == 0 and 0 not in line[1:-1]
    assert FrameDecoder().feed(line) == [Frame(type, seq, ref, body)]
    assert tomqfw.FrameReader().feed(line) == [(type, seq, ref, body)]


def test_the_firmware_crc_table_matches_zlib() -> None:
    data = bytes(range(256)) * 3
    builtin = tomqfw._crc32_builtin
    try:
        tomqfw._crc32_builtin = None  # as on a MicroPython port without binascii.crc32
        assert tomqfw.crc32(data) == framing.crc32(data) and tomqfw.crc32(b"") == 0
    finally:
        tomqfw._crc32_builtin = builtin


def test_the_decoder_resynchronises_and_names_every_run() -> None:
    good = [framing.encode_frame(READING, n, n - 1, bytes([n]) * n) for n in range(1, 6)]
    raw = framing.cobs_decode(good[1][1:-1])
    assert raw is not None
    damaged = b"\x00" + framing.cobs_encode(raw[:-1] + bytes([raw[-1] ^ 0x40])) + b"\x00"  # the CRC is off
    runs = (b"\x13\x37noise" + good[0] + damaged + good[2][: len(good[2]) // 2] + good[3]
            + b"\x01" * 5000 + good[4])
    items = FrameDecoder().feed(runs)
    kinds = [item.seq if isinstance(item, Frame) else item.kind for item in items]
    # noise, 1, 2 damaged (CRC), 3 cut short (its tail ends at 4's leading delimiter), 4, overflow, 5
    assert kinds == [framing.GARBAGE, 1, framing.DAMAGED, framing.GARBAGE, 4, framing.GARBAGE, 5]


@settings(max_examples=50)
@given(st.lists(st.integers(1, 97), max_size=12), st.randoms(use_true_random=False))
def test_the_decoder_gives_the_same_answer_however_the_bytes_are_split(sizes: list[int], rng: random.Random) -> None:
    stream = b"".join(framing.encode_frame(READING, n + 1, n, bytes(rng.randrange(256) for _ in range(size)))
                      for n, size in enumerate(sizes))
    stream = b"garbage\x00" + stream + b"\x05\x05"
    whole = FrameDecoder().feed(stream)
    decoder = FrameDecoder()
    pieces: list[Frame | Fault] = []
    index = 0
    while index < len(stream):
        step = rng.randrange(1, 40)
        pieces += decoder.feed(stream[index : index + step])
        index += step
    assert pieces == whole and [f.seq for f in whole if isinstance(f, Frame)] == list(range(1, len(sizes) + 1))
    assert decoder.buffered == 2  # the trailing bytes wait for their delimiter


# ------------------------------------------------------------------------------------------ the firmware's crypto and CBOR

_plain = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64) + 1, 2**64 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=30) | st.binary(max_size=30),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20,
)


@settings(max_examples=300)
@given(_plain)
def test_the_firmware_cbor_is_canonical_cbor(value: Any) -> None:
    assert tomqfw.cbor(value) == canonical.encode(value)


@given(st.floats(width=16) | st.floats(width=32) | st.floats())
def test_the_firmware_writes_each_float_in_its_shortest_exact_form(value: float) -> None:
    assert tomqfw.cbor(value) == canonical.encode(value)


def test_the_firmware_seals_the_envelope_tomq_seals() -> None:
    seed = bytes(range(32))
    key = SigningKey.from_seed(seed)
    for pure in (False, True):
        sign, public = tomqfw.make_signer(seed, pure)
        assert public == key.public_key.raw and tomqfw.identity_id(public) == key.id
        body = {"value": {"junction": "j1", "cars": 3}, "unit": "cars"}
        assert tomqfw.seal(sign, key.id, 7, 1234, "reading", body) == wire.seal(key, seq=7, time_ms=1234,
                                                                                 type="reading", body=body)
    assert tomqfw.broker_password(seed) == broker_password(key)


@settings(max_examples=20, deadline=None)
@given(st.binary(min_size=32, max_size=32), st.binary(max_size=300))
def test_the_pure_ed25519_and_sha512_match_cryptography_and_hashlib(seed: bytes, message: bytes) -> None:
    key = SigningKey.from_seed(seed)
    signer = ed25519.Signer(seed)
    assert signer.public == key.public_key.raw
    assert signer.sign(message) == key.sign(message)
    assert ed25519.sha512_pure(message) == hashlib.sha512(message).digest()


# ------------------------------------------------------------------------------------------ the session

class Cluster:
    """An operator, its trust store, and devices with certificates: enough to check hellos and readings."""

    def __init__(self) -> None:
        self.operator = SigningKey.generate()
        self.keys: dict[str, SigningKey] = {}
        self.certificates: dict[str, bytes] = {}
        self.trust = TrustStore(self.operator.public_key, CLUSTER)
        for name in ("t1", "t9"):
            self.enrol(name, default_publish_rights("sensor", name))
        self.enrol("b1", (*default_publish_rights("sensor", "b1"), "dev/t2/data"))

    def enrol(self, name: str, publish: tuple[str, ...]) -> None:
        key = self.keys[name] = SigningKey.generate()
        cert = certificates.issue(self.operator, cluster=CLUSTER, subject=key.public_key, name=name, role="sensor",
                                  not_before=0, not_after=2**40, publish=publish)
        self.certificates[name] = cert.encoded
        self.trust.add(cert.encoded)

    def session(self, high_water: dict[str, int] | None = None) -> Session:
        return Session(operator=self.operator.public_key, cluster=CLUSTER, high_water=high_water,
                       attester_for=lambda device: "b1" if device == "t2" else None)

    def signed_hello(self, device: str, seq: int, base: int, *, will_seq: int | None = None) -> bytes:
        key = self.keys[device]
        join = wire.seal(key, seq=seq, time_ms=1, type="join", body={"certificate": self.certificates[device]})
        will = wire.seal(key, seq=will_seq or seq + 1, time_ms=1, type="leave", body={"reason": "vanished"})
        body = canonical.encode({"device": device, "mode": "signed", "join": join, "will": will,
                                 "password": broker_password(key), "fw": "test"})
        return framing.encode_frame(HELLO, seq, base, body)

    def reading(self, device: str, seq: int, ref: int, value: Any = 1.5) -> tuple[bytes, bytes]:
        envelope = seal_reading(self.keys[device], seq=seq, time_ms=5, value=value)
        return framing.encode_frame(READING, seq, ref, envelope), envelope


def replies(actions: list[Any]) -> list[tuple[str, int, str]]:
    """Each Send as (frame type, seq, error code or '')."""
    out = []
    for action in actions:
        if isinstance(action, Send):
            for item in FrameDecoder().feed(action.data):
                assert isinstance(item, Frame)
                code = canonical.decode(item.body)["code"] if item.type == ERROR else ""
                out.append((item.type_name, item.seq, code))
    return out


def test_session_takes_a_signed_devices_readings_in_its_order_once_each() -> None:
    site = Cluster()
    session = site.session()
    hello_request = FrameDecoder().feed(session.line_up(NOW))
    assert [f.type for f in hello_request if isinstance(f, Frame)] == [HELLO]

    first, _ = site.reading("t1", 12, 10)
    assert replies(session.receive(first, NOW)) == [("error", 12, "hello")]  # no hello yet

    actions = session.receive(site.signed_hello("t1", 10, 10), NOW)
    (introduce,) = [a for a in actions if isinstance(a, Introduce)]
    assert introduce.device == "t1" and introduce.mode == DEVICE_SIGNED and introduce.password
    assert replies(actions) == [("ack", 10, "")]
    assert replies(session.receive(site.signed_hello("t1", 10, 10), NOW)) == [("ack", 10, "")]  # again: re-acked

    frame12, envelope12 = site.reading("t1", 12, 10)
    frame13, _ = site.reading("t1", 13, 12)
    frame14, _ = site.reading("t1", 14, 13)
    actions = session.receive(frame12 + frame14, NOW)  # 13 was lost on the line
    takes = [a for a in actions if isinstance(a, Take)]
    assert [t.seq for t in takes] == [12] and takes[0].envelope == envelope12  # unchanged bytes
    assert replies(actions) == [("error", 14, "gap")]
    assert [f.seq for f in FrameDecoder().feed(b"".join(session.taken(takes)))] == [12]
    assert replies(session.receive(frame14, NOW)) == []  # the same gap is reported once

    actions = session.receive(frame12 + frame13 + frame14, NOW)  # the device went back
    assert [t.seq for t in actions if isinstance(t, Take)] == [13, 14]
    assert replies(actions) == [("ack", 12, "")]  # the duplicate is acked again; 13 and 14 after storing

    forged = bytearray(site.reading("t1", 15, 14, value=99.0)[1])
    forged[-1] ^= 1
    refused = framing.encode_frame(READING, 15, 14, bytes(forged))
    assert replies(session.receive(refused, NOW)) == [("error", 15, "refused")]
    assert replies(session.receive(refused, NOW)) == [("error", 15, "refused")]  # never a bare ack
    after, _ = site.reading("t1", 16, 15)
    assert [t.seq for t in session.receive(after, NOW) if isinstance(t, Take)] == [16]  # the chain moved past 15

    stolen, _ = site.reading("t9", 17, 16)  # another device's envelope on t1's line
    assert replies(session.receive(stolen, NOW)) == [("error", 17, "refused")]
    damaged = bytearray(site.reading("t1", 18, 17)[0])
    damaged[20] ^= 0x10
    assert replies(session.receive(bytes(damaged) * 2, NOW)) == [("error", 0, "damaged")]  # once per batch

    counters = session.counters["t1"]
    assert (counters.taken, counters.duplicates, counters.gaps, counters.refused, counters.crc_errors) == (4, 1, 2, 3, 2)
    assert session.high_water("t1") == 16


def test_session_after_a_restart_and_a_reflashed_device() -> None:
    site = Cluster()
    session = site.session(high_water={"t1": 40})  # what a restarted bridge recovers from disk
    session.line_up(NOW)
    # The device was re-flashed: its counter starts low again.
    assert replies(session.receive(site.signed_hello("t1", 3, 3), NOW)) == [("error", 3, "stale-seq")]
    actions = session.receive(site.signed_hello("t1", 50, 50), NOW)
    assert replies(actions) == [("ack", 50, "")]
    old, _ = site.reading("t1", 39, 38)
    assert replies(session.receive(old, NOW)) == [("ack", 39, "")]  # below the high-water mark: a duplicate
    fresh, _ = site.reading("t1", 52, 50)
    assert [t.seq for t in session.receive(fresh, NOW) if isinstance(t, Take)] == [52]

    # A hello whose will is not seq + 1, or whose join another device signed, is refused.
    bad = Cluster()
    other = bad.session()
    assert replies(other.receive(bad.signed_hello("t1", 5, 5, will_seq=9), NOW)) == [("error", 5, "refused")]
    body = canonical.decode(FrameDecoder().feed(bad.signed_hello("t1", 5, 5))[0].body)  # type: ignore[union-attr]
    body["device"] = "t9"  # names t9 but carries t1's join, certificate and signature
    impostor = framing.encode_frame(HELLO, 5, 5, canonical.encode(body))
    assert replies(other.receive(impostor, NOW)) == [("error", 5, "refused")]
    assert other.device is None  # nobody was introduced


def test_session_attests_only_for_devices_the_bridge_is_enrolled_for() -> None:
    site = Cluster()
    session = site.session()
    hello = framing.encode_frame(HELLO, 7, 7, canonical.encode({"device": "t3", "mode": "attested"}))
    assert replies(session.receive(hello, NOW)) == [("error", 7, "refused")]
    hello = framing.encode_frame(HELLO, 7, 7, canonical.encode({"device": "t2", "mode": "attested"}))
    actions = session.receive(hello, NOW)
    assert [a for a in actions if isinstance(a, Introduce)] == [Introduce("t2", BRIDGE_ATTESTED, 7, attester="b1")]
    reading = framing.encode_frame(READING, 8, 7, canonical.encode({"value": 21.5, "unit": "degC"}))
    (take,) = [a for a in session.receive(reading, NOW) if isinstance(a, Take)]
    assert (take.value, take.unit, take.attester, take.time_ms) == (21.5, "degC", "b1", None)
    bad = framing.encode_frame(READING, 9, 8, canonical.encode({"value": [1, 2]}))
    assert replies(session.receive(bad, NOW)) == [("error", 9, "refused")]


# ------------------------------------------------------------------------------------------ attested readings


def test_an_attested_reading_needs_the_operators_delegation_and_maps_to_acted_on_behalf_of() -> None:
    site = Cluster()
    opener = EnvelopeOpener(site.trust, accepted_types=frozenset({"reading"}))
    wire_bytes = seal_attested_reading(site.keys["b1"], seq=1, time_ms=5, device="t2", device_seq=41, value=3.5)
    reading = open_reading(opener, wire_bytes, device="b1", now=NOW)
    assert (reading.attested_device, reading.device_seq, reading.mode) == ("t2", 41, BRIDGE_ATTESTED)
    with pytest.raises(WrongDevice, match="attests for t9"):  # b1's certificate does not name t9
        open_reading(opener, seal_attested_reading(site.keys["b1"], seq=2, time_ms=5, device="t9", device_seq=1,
                                                   value=1), device="b1", now=NOW)
    with pytest.raises(WrongDevice):  # a plain sensor cannot attest for anyone
        open_reading(opener, seal_attested_reading(site.keys["t1"], seq=1, time_ms=5, device="t2", device_seq=1,
                                                   value=1), device="t1", now=NOW)
    malformed = wire.seal(site.keys["b1"], seq=3, time_ms=5, type="reading",
                          body={"value": 1, "attested": {"device": "t2"}})
    with pytest.raises(MalformedReading):
        open_reading(opener, malformed, device="b1", now=NOW)
    with pytest.raises(MalformedEnvelope):
        open_reading(opener, wire.seal(site.keys["b1"], seq=4, time_ms=5, type="reading",
                                       body={"value": 1, "attested": {"device": "a/+", "seq": 1}}), device="b1", now=NOW)
    with pytest.raises(ValueError):
        seal_attested_reading(site.keys["b1"], seq=5, time_ms=5, device="t2", device_seq=0, value=1)

    record = Record(DATA, Provenance(reading.data_id, reading.data_hash, "sample:t2", "collect:c", source="b1",
                                     source_signature=reading.signature, on_behalf_of="t2"), 5,
                    {"mode": BRIDGE_ATTESTED, "device_seq": 41})
    statements = {(s.relation, s.subject, s.object) for s in prov_statements(record)}
    assert ("actedOnBehalfOf", "b1", "t2") in statements  # the bridge acted on behalf of the device
    assert ("wasAttributedTo", reading.data_id, "b1") in statements


# ------------------------------------------------------------------------------------------ firmware and session together


class LossyLine:
    """Both directions in memory; each frame may be damaged or dropped on the way, by a seeded generator."""

    def __init__(self, rng: random.Random, loss: float) -> None:
        self.rng, self.loss = rng, loss
        self.to_bridge = bytearray()
        self.to_device = bytearray()

    def hurt(self, data: bytes) -> bytes:
        out = bytearray()
        for run in data.split(b"\x00"):
            if not run:
                continue
            roll = self.rng.random()
            if roll < self.loss / 2:
                continue  # lost whole
            hurt = bytearray(run)
            if roll < self.loss:
                hurt[self.rng.randrange(len(hurt))] ^= 1 << self.rng.randrange(8)
            out += b"\x00" + hurt + b"\x00"
        return bytes(out)


class DevicePort:
    def __init__(self, line: LossyLine) -> None:
        self.line = line

    def read(self, size: int) -> bytes:
        data = bytes(self.line.to_device[:size])
        del self.line.to_device[:size]
        return data

    def write(self, data: bytes) -> None:
        self.line.to_bridge += self.line.hurt(data)


@pytest.mark.parametrize("mode", ["signed", "attested"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_firmware_and_session_deliver_every_reading_once_in_order_over_a_lossy_line(tmp_path: Path, mode: str,
                                                                                   seed: int) -> None:
    site = Cluster()
    rng = random.Random(seed)
    line = LossyLine(rng, loss=0.15)
    config: dict[str, Any] = {"device": "t1" if mode == "signed" else "t2", "mode": mode}
    if mode == "signed":
        config.update(seed=bytes(range(32)), certificate=b"")
        key = SigningKey.from_seed(bytes(range(32)))
        site.keys["t1"] = key
        cert = certificates.issue(site.operator, cluster=CLUSTER, subject=key.public_key, name="t1", role="sensor",
                                  not_before=0, not_after=2**40, publish=default_publish_rights("sensor", "t1"))
        config["certificate"] = cert.encoded
    clock = [0]
    firmware = tomqfw.Firmware(DevicePort(line), config, store=str(tmp_path), window=6, rto_ms=30, max_queue=40,
                               wall_ms=lambda: time.time() * 1000, ticks_ms=lambda: clock[0],
                               pure_crypto=True)  # signed by ed25519.py, as on a board
    acked: list[int] = []
    firmware.on_ack = acked.append
    session = site.session()
    line.to_device += session.line_up(NOW)
    taken: list[int] = []
    sampled = 0
    for _ in range(20_000):
        if sampled < 150 and firmware.pending() < 40:
            assert firmware.sample(sampled, "n") is not None
            sampled += 1
        firmware.poll()
        clock[0] += 5
        actions = session.receive(bytes(line.to_bridge), NOW)
        line.to_bridge.clear()
        takes = [a for a in actions if isinstance(a, Take)]
        taken += [t.seq for t in takes]
        out = b"".join(a.data for a in actions if isinstance(a, Send)) + b"".join(session.taken(takes))
        line.to_device += line.hurt(out)
        if sampled == 150 and firmware.pending() == 0:
            break
    assert firmware.pending() == 0 and len(acked) == 150
    assert taken == sorted(set(taken)) and set(acked) == set(taken)  # in order, once each, all acked
    assert firmware.counters["rewinds"] > 0 and session.counters[config["device"]].gaps > 0


# ------------------------------------------------------------------------------------------ under MicroPython itself

MICROPYTHON_MJS = Path(os.environ.get(
    "TOMQ_MICROPYTHON_MJS",
    Path(__file__).resolve().parent.parent / ".venv" / "micropython" / "node_modules" / "@micropython"
    / "micropython-webassembly-pyscript" / "micropython.mjs"))

_RUNNER = """
import { loadMicroPython } from %s;
import fs from "fs";
const mp = await loadMicroPython({stdout: (t) => process.stdout.write(t + "\\n"), heapsize: 32 * 1024 * 1024});
for (const f of ["tomqfw.py", "ed25519.py"]) mp.FS.writeFile("/" + f, fs.readFileSync(process.argv[2] + "/" + f));
mp.FS.writeFile("/check.py", fs.readFileSync(process.argv[3]));
mp.runPython("import sys\\nsys.path.append('/')\\nexec(open('/check.py').read())");
"""

# The same script runs under MicroPython and CPython; everything it prints must be identical.
_SCENARIO = """
import binascii, os, sys
import tomqfw
print("cbor", binascii.hexlify(tomqfw.cbor({"v": 1, "seq": 2**40, "t": -5,
      "x": [1.5, 0.1, 21.5, 65504.0, 1e-7, 3.4e38, True, None, b"\\x00\\x01", "h\\u00e9"]})).decode())
seed = bytes(range(32))
sign, public = tomqfw.make_signer(seed, True)   # the pure-Python Ed25519 a board uses
print("id", tomqfw.identity_id(public), "password", tomqfw.broker_password(seed))

class Port:
    def __init__(self):
        self.out = bytearray()
        self.inbox = bytearray()
    def read(self, n):
        data = bytes(self.inbox[:n])
        self.inbox = self.inbox[n:]
        return data
    def write(self, data):
        self.out.extend(data)

try:
    os.mkdir(STORE)
except OSError:
    pass
port = Port()
ticks = [0]
config = {"device": "t1", "mode": "signed", "seed": seed, "certificate": b"\\xa1\\x61c\\x01"}
fw = tomqfw.Firmware(port, config, store=STORE, window=4, rto_ms=100, wall_ms=lambda: 1700000000000,
                     ticks_ms=lambda: ticks[0], pure_crypto=True)
for i in range(3):
    fw.sample(20.5 + i, "degC")
fw.poll()                                                     # hello
port.inbox.extend(tomqfw.encode_frame(3, fw.hello[0], 0))     # its ack
fw.poll()                                                     # three readings
port.inbox.extend(tomqfw.encode_frame(3, fw.queue[0].seq, 0))
port.inbox.extend(tomqfw.encode_frame(4, 0, 0, tomqfw.cbor({"code": "damaged", "reason": "x"})))
fw.poll()                                                     # one acked, the rest sent again
ticks[0] += 500
fw.poll()                                                     # timed out: sent again
print("line", binascii.hexlify(bytes(port.out)).decode())
print("counters", sorted(fw.counters.items()))
print("seq file", open(STORE + "/seq").read().strip())
"""


def test_the_firmware_runs_under_micropython_as_under_cpython(tmp_path: Path) -> None:
    """Real MicroPython (1.27, its WebAssembly port under node) runs tomqfw.py and ed25519.py: the same
    CBOR, ids, password, signatures and line bytes as CPython. Needs node and the npm package
    @micropython/micropython-webassembly-pyscript, which scripts/test installs into .venv/micropython."""
    node = shutil.which("node")
    require("MicroPython (WebAssembly port under node)", node is not None and MICROPYTHON_MJS.exists(),
            "npm install --prefix .venv/micropython @micropython/micropython-webassembly-pyscript@1.27.0")
    assert node is not None
    runner = tmp_path / "run.mjs"
    runner.write_text(_RUNNER % json.dumps(MICROPYTHON_MJS.as_uri()))
    (tmp_path / "mpy.py").write_text(_SCENARIO.replace("STORE", repr("/fwstore")))
    firmware_dir = Path(__file__).resolve().parent.parent / "firmware-bridge" / "firmware"
    ran = subprocess.run([node, str(runner), str(firmware_dir), str(tmp_path / "mpy.py")], capture_output=True,
                         text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr
    micropython = ran.stdout.splitlines()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(_SCENARIO.replace("STORE", repr(str(tmp_path / "cpython"))), {})
    assert micropython == printed.getvalue().splitlines()
    assert len(micropython) == 5 and "('rewinds', 2)" in micropython[3]


def test_enrolling_a_bridge_delegates_attestation_without_widening_its_broker_rights(tmp_path: Path) -> None:
    from tomq import cluster as clusters
    from tomq.bridge.provision import enrol_bridge, firmware_config
    from tomq.broker.policy import load_policy

    directory = tmp_path / "site"
    clusters.init(directory, ["n1"], cluster_name=CLUSTER)
    clusters.add_member(directory, "t1", "sensor")
    certificate = enrol_bridge(directory, "b1", ["t2"])
    assert certificate.may_publish("dev/t2/data") and certificate.role == "sensor"
    assert enrol_bridge(directory, "b1", ["t2", "t3"]).subject == certificate.subject  # re-certified, same key
    policy = load_policy(directory)
    root = f"tomq/{CLUSTER}"
    assert policy.may_publish("b1", f"{root}/dev/b1/data") and policy.may_publish("b1", f"{root}/dev/b1/state")
    assert not policy.may_publish("b1", f"{root}/dev/t2/data")  # the delegation is not a broker right
    assert not policy.may_publish("b1", f"{root}/dev/t1/data")
    config = firmware_config(directory, "t1")
    key = SigningKey.from_seed(bytes.fromhex(config["seed"]))
    assert key.id == clusters.load(directory).member("t1").id and config["mode"] == "signed"
    assert firmware_config(directory, "t2", attested=True) == {"device": "t2", "mode": "attested", "cluster": CLUSTER}
