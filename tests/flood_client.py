"""A hostile member flooding one topic: MQTT PUBLISH packets written straight to a socket, at a set rate.

    python tests/flood_client.py CLUSTER_DIR --as rogue --topic T --rate 10000 --seconds 10 PAYLOAD_FILE...

It logs in with the member's real broker credentials (a compromised device or service has them), then
sends QoS 0 PUBLISH packets built once, cycling through the payload files, in bursts every 10 ms so
that the rate holds without a Python call per message. paho would spend more CPU per message than
the nodes under test and could not reach 10,000 a second here. It prints one JSON line at the end:
{"sent": N, "seconds": S, "rate": N/S}.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tomq import cluster


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(text: str) -> bytes:
    data = text.encode()
    return len(data).to_bytes(2, "big") + data


def connect_packet(client_id: str, username: str, password: str) -> bytes:
    flags = 0x80 | 0x40 | 0x02  # username, password, clean session
    body = _string("MQTT") + bytes([4, flags]) + (60).to_bytes(2, "big") + _string(client_id)
    body += _string(username) + _string(password)
    return bytes([0x10]) + _remaining_length(len(body)) + body


def publish_packet(topic: str, payload: bytes) -> bytes:
    body = _string(topic) + payload
    return bytes([0x30]) + _remaining_length(len(body)) + body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("directory")
    parser.add_argument("--as", dest="as_name", required=True)
    parser.add_argument("--topic", required=True, help="below tomq/<cluster>/, e.g. ledger/propose/rogue")
    parser.add_argument("--rate", type=float, default=10_000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("payloads", nargs="+", type=Path)
    args = parser.parse_args(argv)

    loaded = cluster.load(args.directory)
    password = cluster.broker_password(loaded.signing_key(args.as_name))
    topic = f"{loaded.topics.root}/{args.topic}"
    packets = [publish_packet(topic, path.read_bytes()) for path in args.payloads]
    sock = socket.create_connection((loaded.broker_host, loaded.broker_port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(connect_packet(f"flood-{args.as_name}-{time.time_ns()}", args.as_name, password))
    connack = sock.recv(4)
    if len(connack) < 4 or connack[0] != 0x20 or connack[3] != 0:
        print(json.dumps({"error": f"CONNECT refused: {connack.hex()}"}))
        return 2
    sock.setblocking(False)
    burst_every = 0.01
    per_burst = max(1, round(args.rate * burst_every))
    burst = b"".join(packets[i % len(packets)] for i in range(per_burst))
    sent = 0
    started = time.monotonic()
    pending = b""
    while (elapsed := time.monotonic() - started) < args.seconds:
        due = int(elapsed * args.rate)
        if sent < due and not pending:
            pending = burst
            sent += per_burst
        if pending:
            try:
                written = sock.send(pending)
                pending = pending[written:]
            except BlockingIOError:
                pass  # the broker reads slower than we write: the rate we report is what it took
        try:
            while sock.recv(65536):
                pass
        except BlockingIOError:
            pass
        if not pending:
            time.sleep(max(0.0, (sent / args.rate) - (time.monotonic() - started)))
    seconds = time.monotonic() - started
    if pending:
        sent -= per_burst  # the last burst was not all written: count none of it
    sock.close()
    print(json.dumps({"sent": sent, "seconds": round(seconds, 2), "rate": round(sent / seconds)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
