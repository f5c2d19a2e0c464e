"""What every built-in service program stands on: its instance directory, its broker session, the ledger.

A node starts a service instance with TOMQ_INSTANCE_DIR naming a read-only directory (the contract
the node side writes, node/orchestrator/service.py):

    service.json   {"cluster", "broker": {"host", "port"}, "service", "replica", "node", "height",
                    "program", "spec" (ServiceSpec.to_map()), "identity", "ledger_height"}
    key            the service identity's Ed25519 key (PKCS#8 PEM, 0400/0600)
    cert.cbor      its membership certificate
    operator.pub   the operator's public key, hex
    devices.cbor   canonical CBOR {device name: certificate bytes}: devices joined at ledger_height

and TOMQ_CLUSTER, TOMQ_SERVICE, TOMQ_REPLICA, TOMQ_NODE, TOMQ_HEIGHT beside it.

The pieces, each usable on its own:

- `ServiceContext`: the instance directory, checked (the certificate is the operator's, names the
  identity, certifies the key), with a TrustStore of the operator key and the joined devices.
- `ServiceLink`: a small paho-mqtt 2 client. MQTT 3.1.1, TCP_NODELAY, reconnect with back-off, a
  PERSISTENT session under client id `tomq-<cluster>-<service>-<replica>` and MANUAL acknowledgements.
  An input is acknowledged only when what it produced is committed, or it was refused for good;
  until then the broker keeps it for this client id, so a killed instance, or the next instance of
  the same replica on another node, gets it again. No reading is lost; a duplicate is harmless,
  because data ids are derived from the data and Table II refuses a second PROV-DATA for a datum.
- `LedgerProposer`: seals records as the service identity (type "record", seq = a strictly rising
  microsecond clock), publishes them on ledger/propose, and takes a record's audit line (proposer =
  our key id, seq = one of the seqs it was sealed with), its certified block, or any committed
  PROV-DATA for the same datum as the commit. Without that after RETRY_SECONDS it re-seals with a
  new seq (the ledger takes a proposer's records only in rising seq order) and proposes again; after
  MAX_PROPOSALS it gives up with one log line naming the record. Giving up counts as done: the usual
  cause is a datum already committed under an earlier proposal, which the ledger refuses silently.
- `DeviceRegistry`: which devices are joined, from devices.cbor and then the ledger: PROV-ID-delete
  audit lines, and PROV-ID-create records in certified blocks (an audit line carries a certificate
  only as its hash, so the certificate itself comes from the block, checked against the operator).
- `placement_verdict`: the fencing rule. Nodes publish retained JSON on orch/placement/<service>:
  {"service", "height", "replicas": {"<r>": {"node", "height"}}}. An instance whose replica is now
  on another node, placed at a higher height than its own, gone from the document, or whose
  service's placement is cleared (empty payload), stops at once with exit code 0 and acknowledges
  nothing more, so an instance left running on a node declared dead never runs beside its successor.
- `ServiceRunner`: the loop that owns all of the above on one thread (paho's thread only enqueues),
  feeds inputs to a `ServiceProgram` (collector.py, analyser.py) and stops cleanly on SIGTERM.

Ordering rules, where they matter: an input is acknowledged after the output it produced is
published (QoS 1), so a crash between the two repeats the output rather than losing it; inputs
that arrive before the instance has its placement and the retained ledger blocks are held, so a
fenced instance never proposes and a restarted one knows what its predecessor already committed.

What this module must never do: acknowledge an input whose record is neither committed nor given
up, acknowledge anything after it is fenced, or trust a certificate the operator key did not sign.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import signal
import socket
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from tomq import canonical
from tomq import certificate as certificates
from tomq.certificate import Certificate, TrustStore
from tomq.cluster import broker_password
from tomq.errors import ConfigError, InvalidCertificate, InvalidRecord, PeerError, TomqError
from tomq.identity import PublicKey, SigningKey
from tomq.node.ledger.block import Block, decode_block_file
from tomq.node.services.readings import DEVICE_ROLES
from tomq.records import DATA, ID_CREATE, ID_DELETE, Identity, Provenance, Record, from_map
from tomq.topics import Topics, check_segment
from tomq.wire import seal

log = logging.getLogger("tomq.service")

ENV_INSTANCE_DIR = "TOMQ_INSTANCE_DIR"
EXIT_OK = 0
EXIT_CONFIG = 2


class ServiceConfigError(ConfigError):
    """The instance directory or environment is missing something or inconsistent."""


# ---------------------------------------------------------------------------------------- context


@dataclass(frozen=True)
class ServiceContext:
    directory: Path
    cluster: str
    broker_host: str
    broker_port: int
    service: str
    replica: int
    node: str
    height: int  # ledger height of the placement decision that started this instance
    program: str | None
    spec: Mapping[str, Any]
    identity: str  # the member name this instance connects and signs as
    key: SigningKey
    certificate: Certificate
    operator: PublicKey
    trust: TrustStore  # the operator's key and every joined device's certificate
    devices: Mapping[str, Certificate]  # joined devices according to the ledger at ledger_height
    ledger_height: int

    @property
    def topics(self) -> Topics:
        return Topics(self.cluster)

    @property
    def client_id(self) -> str:
        # The same for every instance of this replica, wherever it runs: the broker session (and what
        # it has not delivered or had acknowledged) passes from one instance to the next.
        return f"tomq-{self.cluster}-{self.service}-{self.replica}"

    @property
    def label(self) -> str:
        return f"{self.service}/{self.replica}@{self.node}:{self.height}"

    def inputs(self, kind: str) -> list[str]:
        """spec.inputs.devices | services | topics, as a list of text."""
        inputs = self.spec.get("inputs") if isinstance(self.spec, Mapping) else None
        values = inputs.get(kind, []) if isinstance(inputs, Mapping) else []
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise ServiceConfigError(f"service.json: spec.inputs.{kind} must be a list of text")
        return list(values)

    def setting(self, name: str, default: float, *, minimum: float, maximum: float) -> float:
        """A number from spec.env (e.g. WINDOW = "20"), within [minimum, maximum]."""
        env = self.spec.get("env") if isinstance(self.spec, Mapping) else None
        raw = env.get(name) if isinstance(env, Mapping) else None
        if raw is None:
            return default
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise ServiceConfigError(f"spec.env.{name} must be a number, got {raw!r}") from None
        if not (math.isfinite(value) and minimum <= value <= maximum):
            raise ServiceConfigError(f"spec.env.{name} must be from {minimum:g} to {maximum:g}, got {raw!r}")
        return value

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> ServiceContext:
        environ = os.environ if environ is None else environ
        directory = environ.get(ENV_INSTANCE_DIR)
        if not directory:
            raise ServiceConfigError(f"{ENV_INSTANCE_DIR} is not set; a node starts service programs with it")
        context = cls.load(directory)
        # The node sets these from the same placement; a mismatch means a stale or foreign directory.
        expected = {"TOMQ_CLUSTER": context.cluster, "TOMQ_SERVICE": context.service,
                    "TOMQ_REPLICA": str(context.replica), "TOMQ_NODE": context.node,
                    "TOMQ_HEIGHT": str(context.height)}
        for name, value in expected.items():
            given = environ.get(name)
            if given is not None and given != value:
                raise ServiceConfigError(f"{name}={given} but {directory}/service.json says {value}")
        return context

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> ServiceContext:
        root = Path(directory)

        def read(name: str) -> bytes:
            try:
                return (root / name).read_bytes()
            except OSError as exc:
                raise ServiceConfigError(f"cannot read {root / name}: {exc.strerror}") from None

        try:
            description = json.loads(read("service.json"))
        except ValueError as exc:
            raise ServiceConfigError(f"{root}/service.json is not JSON: {exc}") from None
        if not isinstance(description, dict):
            raise ServiceConfigError(f"{root}/service.json must hold a JSON object")

        def field_of(name: str, kind: type | tuple[type, ...]) -> Any:
            value = description.get(name)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ServiceConfigError(f"{root}/service.json: {name} is missing or not a {kind}")
            return value

        broker = field_of("broker", dict)
        host, port = broker.get("host"), broker.get("port")
        if not isinstance(host, str) or not isinstance(port, int) or not 0 < port < 65536:
            raise ServiceConfigError(f"{root}/service.json: broker must be {{host: text, port: 1-65535}}")
        cluster = field_of("cluster", str)
        service = field_of("service", str)
        identity = field_of("identity", str)
        node = field_of("node", str)
        try:
            for value, what in ((cluster, "cluster"), (service, "service"), (identity, "identity"), (node, "node")):
                check_segment(value, what)
        except TomqError as exc:
            raise ServiceConfigError(f"{root}/service.json: {exc}") from None
        program = description.get("program")
        if program is not None and not isinstance(program, str):
            raise ServiceConfigError(f"{root}/service.json: program must be text or null")
        spec = field_of("spec", dict)
        try:
            operator = PublicKey.from_hex(read("operator.pub").decode("ascii", "replace").strip())
        except ValueError as exc:
            raise ServiceConfigError(f"{root}/operator.pub: {exc}") from None
        key = SigningKey.load(root / "key")
        try:
            certificate = certificates.decode(read("cert.cbor"), operator)
        except InvalidCertificate as exc:
            raise ServiceConfigError(f"{root}/cert.cbor: {exc}") from None
        if certificate.name != identity or certificate.subject != key.public_key or certificate.cluster != cluster:
            raise ServiceConfigError(f"{root}/cert.cbor certifies {certificate.name} in {certificate.cluster} for "
                                     f"another key; this instance is {identity} in {cluster}")
        if certificate.role != "service":
            raise ServiceConfigError(f"{root}/cert.cbor certifies a {certificate.role}, not a service")
        trust = TrustStore(operator, cluster)
        devices: dict[str, Certificate] = {}
        try:
            listed = canonical.decode(read("devices.cbor"))
        except canonical.CanonicalDecodeError as exc:
            raise ServiceConfigError(f"{root}/devices.cbor is not canonical CBOR: {exc}") from None
        if not isinstance(listed, dict):
            raise ServiceConfigError(f"{root}/devices.cbor must be a map of device name to certificate")
        for name, encoded in sorted(listed.items()):
            try:
                device = trust.add(encoded)
            except InvalidCertificate as exc:
                log.warning("devices.cbor: ignoring the certificate of %s: %s", name, exc)
                continue
            if device.name != name or device.role not in DEVICE_ROLES:
                log.warning("devices.cbor: entry %s holds the certificate of %s (%s); ignored", name, device.name,
                            device.role)
                continue
            devices[name] = device
        return cls(directory=root, cluster=cluster, broker_host=host, broker_port=port, service=service,
                   replica=field_of("replica", int), node=node, height=field_of("height", int), program=program,
                   spec=spec, identity=identity, key=key, certificate=certificate, operator=operator,
                   trust=trust, devices=devices, ledger_height=field_of("ledger_height", int))


# ---------------------------------------------------------------------------------------- broker link


@dataclass(frozen=True, slots=True)
class Inbound:
    """One message from the broker. QoS 1 inputs must be handed back to `ack` exactly when done."""

    topic: str
    payload: bytes
    qos: int
    mid: int
    retained: bool
    duplicate: bool


class ServiceLink:
    """paho-mqtt 2 with a persistent session and manual acknowledgements, on paho's own thread.

    Subscriptions are (re)made on every connect, so they hold whether or not the broker kept the
    session. `on_ready(session_present)` is called once the broker has granted them all.
    """

    def __init__(self, *, host: str, port: int, username: str, password: str, client_id: str,
                 on_message: Callable[[Inbound], None], on_ready: Callable[[bool], None],
                 persistent: bool = True, keepalive: int = 20) -> None:
        self.host, self.port, self.keepalive = host, port, keepalive
        self._on_message = on_message
        self._on_ready = on_ready
        self._subscriptions: dict[str, int] = {}
        self._subscribing: tuple[int, bool, list[str]] | None = None  # (mid, session present, filters)
        self.connected = threading.Event()
        self._client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=not persistent,
                                   protocol=paho.MQTTv311, manual_ack=True)
        self._client.username_pw_set(username, password)
        self._client.reconnect_delay_set(1, 8)
        self._client.max_inflight_messages_set(200)  # our own outgoing QoS 1: proposals and outputs
        self._client.on_socket_open = self._socket_open
        self._client.on_connect = self._connected
        self._client.on_subscribe = self._subscribed
        self._client.on_disconnect = self._disconnected
        self._client.on_message = self._message
        self.username = username

    def subscribe(self, topic_filter: str, qos: int) -> None:
        """Register a subscription; made at the next connect (call before `start`)."""
        self._subscriptions[topic_filter] = qos

    def start(self) -> None:
        self._client.connect_async(self.host, self.port, self.keepalive)
        self._client.loop_start()

    def stop(self) -> None:
        # DISCONNECT leaves a persistent session in place: whatever is unacknowledged stays queued
        # for the next instance of this replica.
        self._client.disconnect()
        self._client.loop_stop()

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> bool:
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        # Not connected: paho keeps a QoS 1 message and sends it after the reconnect.
        return info.rc in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN)

    def ack(self, message: Inbound) -> None:
        if message.qos > 0:
            self._client.ack(message.mid, message.qos)

    # paho's thread --------------------------------------------------------------------------

    def _socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        # Proposals, audit lines and acknowledgements are small: without this, Nagle's algorithm and
        # delayed ACKs add tens of milliseconds to every commit round trip.
        if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _connected(self, client: paho.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            log.error("broker %s:%s refused %s: %s (retrying)", self.host, self.port, self.username, reason_code)
            return
        session_present = bool(getattr(flags, "session_present", False))
        log.info("connected to %s:%s as %s (session %s)", self.host, self.port, self.username,
                 "resumed" if session_present else "new")
        self.connected.set()
        filters = list(self._subscriptions.items())
        if not filters:
            self._on_ready(session_present)
            return
        result, mid = client.subscribe(filters)
        if result != paho.MQTT_ERR_SUCCESS or mid is None:
            log.error("could not subscribe (%s); will subscribe again on the next connect", result)
            return
        self._subscribing = (mid, session_present, [f for f, _ in filters])

    def _subscribed(self, client: paho.Client, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        pending = self._subscribing
        if pending is None or pending[0] != mid:
            return
        self._subscribing = None
        for topic_filter, code in zip(pending[2], reason_codes, strict=False):
            if getattr(code, "is_failure", False):
                log.error("broker refused the subscription %s for %s: %s", topic_filter, self.username, code)
        self._on_ready(pending[1])

    def _disconnected(self, client: paho.Client, userdata: Any, flags: Any, reason_code: Any,
                      properties: Any) -> None:
        self.connected.clear()
        if reason_code != 0:
            log.warning("lost the broker connection (%s); reconnecting", reason_code)

    def _message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        self._on_message(Inbound(message.topic, bytes(message.payload), message.qos, message.mid,
                                 bool(message.retain), bool(message.dup)))


# ---------------------------------------------------------------------------------------- fencing


def placement_verdict(payload: bytes, *, service: str, replica: int, node: str, height: int) -> str | None:
    """Why an instance (service, replica) started on `node` at `height` must stop, or None to go on.

    A placement older than ours (a lower height) is a stale retained message and changes nothing;
    an unreadable one is ignored, because only nodes may publish there and a node that cannot
    write JSON should not stop the cluster's services.
    """
    if not payload:
        return f"the placement of {service} was cleared"
    try:
        document = json.loads(payload)
    except ValueError:
        log.warning("ignoring an unreadable placement of %s (%d bytes)", service, len(payload))
        return None
    if not isinstance(document, dict) or not isinstance(document.get("replicas"), dict):
        log.warning("ignoring a placement of %s without a replicas map", service)
        return None
    placed_height = document.get("height")
    entry = document["replicas"].get(str(replica))
    if entry is None:
        if isinstance(placed_height, int) and placed_height < height:
            return None  # published before our own placement was decided
        return f"replica {replica} of {service} is no longer placed (placement at height {placed_height})"
    if not isinstance(entry, dict) or not isinstance(entry.get("height"), int):
        log.warning("ignoring a placement of %s whose replica %s entry is malformed", service, replica)
        return None
    if entry["height"] < height:
        return None
    if entry.get("node") != node:
        return f"replica {replica} of {service} now runs on {entry.get('node')} (placed at height {entry['height']})"
    if entry["height"] > height:
        return f"replica {replica} of {service} was placed again at height {entry['height']} (this instance: {height})"
    return None


# ---------------------------------------------------------------------------------------- the ledger


def block_records(block: Block) -> list[tuple[int, str, int, Record]]:
    """(index, proposer id, seq, record) for every well-formed record of a committed block."""
    out = []
    for index, envelope in enumerate(block.records):
        try:
            signed, _ = canonical.decode(envelope, check_canonical=False)
            fields = canonical.decode(signed, check_canonical=False)
            out.append((index, str(fields["from"]), int(fields["seq"]), from_map(fields["body"])))
        except (canonical.CanonicalDecodeError, InvalidRecord, KeyError, TypeError, ValueError):
            continue
    return out


class DeviceRegistry:
    """Which devices are joined now: devices.cbor at `height`, then every later change on the ledger.

    Changes are ordered by their position (height, index in the block): an audit line and the block
    that carries the same record, or retained blocks delivered out of order, apply once and in order.
    """

    def __init__(self, trust: TrustStore, devices: Mapping[str, Certificate], height: int) -> None:
        self.trust = trust
        self._joined: set[str] = set(devices)
        self._position: dict[str, tuple[int, int]] = dict.fromkeys(devices, (height, sys.maxsize))
        self._baseline = height

    def joined(self, name: str) -> bool:
        return name in self._joined

    def on_block(self, height: int, block: Block) -> None:
        for index, _, _, record in block_records(block):
            identity = record.structure
            if isinstance(identity, Identity):
                self._apply(height, index, record.state, identity.kind, identity.object, identity.proof)

    def on_audit_line(self, line: Mapping[str, Any]) -> None:
        state = line.get("state")
        body = line.get("body")
        identity = body.get("identity") if isinstance(body, dict) else None
        if state not in (ID_CREATE, ID_DELETE) or not isinstance(identity, dict):
            return
        height, index = line.get("height"), line.get("index")
        if not isinstance(height, int) or not isinstance(index, int):
            return
        proof: bytes | None = None
        text = identity.get("proof")
        if isinstance(text, str) and not text.startswith("sha256:"):
            try:
                proof = bytes.fromhex(text)
            except ValueError:
                proof = None
        if state == ID_CREATE and proof is None:
            return  # the line carries only the certificate's hash; its certified block brings the rest
        self._apply(height, index, state, identity.get("kind"), identity.get("object"), proof)

    def _apply(self, height: int, index: int, state: str, kind: object, name: object, proof: bytes | None) -> None:
        if state not in (ID_CREATE, ID_DELETE) or kind != "device" or not isinstance(name, str):
            return
        position = (height, index)
        if height <= self._baseline or position <= self._position.get(name, (-1, -1)):
            return
        if state == ID_DELETE:
            self._position[name] = position
            if name in self._joined:
                self._joined.discard(name)
                log.info("device %s left the cluster (height %s)", name, height)
            return
        try:
            certificate = certificates.decode(proof or b"", self.trust.operator)
            if certificate.name != name or certificate.role not in DEVICE_ROLES:
                raise InvalidCertificate(f"it certifies {certificate.name} as a {certificate.role}")
            self.trust.add(certificate.encoded)
        except InvalidCertificate as exc:
            log.warning("not trusting the join of device %s at height %s: %s", name, height, exc)
            return
        self._position[name] = position
        if name not in self._joined:
            self._joined.add(name)
            log.info("device %s joined the cluster (height %s)", name, height)


@dataclass
class _Outstanding:
    record: Record
    label: str
    data: str | None  # the datum of a PROV-DATA record: its commit by anyone counts
    on_commit: Callable[[int], None]
    on_give_up: Callable[[], None]
    seqs: list[int] = field(default_factory=list)
    proposals: int = 0
    first_sent: float = 0.0
    last_sent: float = 0.0
    gave_up_at: float | None = None


class LedgerProposer:
    """Records out on ledger/propose; commits in from audit lines and certified blocks.

    `on_commit(height)` runs once per record, on the loop's thread; a record committed after it was
    given up still gets `on_commit` (a late commit), as long as it is remembered (LATE_COMMIT_SECONDS).
    """

    RETRY_SECONDS = 2.0
    MAX_PROPOSALS = 3
    LATE_COMMIT_SECONDS = 60.0
    REMEMBERED_DATA = 200_000  # committed data ids kept to recognise redelivered inputs

    def __init__(self, key: SigningKey, topics: Topics, publish: Callable[[str, bytes, int], object],
                 micros: Callable[[], int] = lambda: time.time_ns() // 1000) -> None:
        self.key = key
        self.topics = topics
        self._publish = publish
        self._micros = micros
        self._seq = 0
        self._by_seq: dict[int, _Outstanding] = {}
        self._by_data: dict[str, _Outstanding] = {}
        self._pending: dict[int, _Outstanding] = {}  # id(entry) -> entry, not yet committed or given up
        self._given_up: dict[int, _Outstanding] = {}
        self._committed_data: OrderedDict[str, int] = OrderedDict()
        self.committed = 0
        self.gave_up = 0

    @property
    def outstanding(self) -> int:
        return len(self._pending)

    def committed_height(self, data: str) -> int | None:
        """The height at which PROV-DATA for `data` committed, if this process saw it happen."""
        return self._committed_data.get(data)

    def propose(self, record: Record, *, now: float, on_commit: Callable[[int], None],
                on_give_up: Callable[[], None], label: str | None = None) -> None:
        data = getattr(record.structure, "data", None) if record.state == DATA else None
        entry = _Outstanding(record, label or record.record_id, data, on_commit, on_give_up, first_sent=now)
        self._pending[id(entry)] = entry
        if data is not None:
            self._by_data[data] = entry
        self._send(entry, now)

    def _send(self, entry: _Outstanding, now: float) -> None:
        # Never below the last seq we used, and above anything an earlier instance of this identity
        # sealed (it started earlier, so its microsecond clock was behind ours).
        self._seq = max(self._seq + 1, self._micros())
        wire = seal(self.key, seq=self._seq, time_ms=int(now * 1000), type="record", body=entry.record.to_map())
        entry.seqs.append(self._seq)
        entry.proposals += 1
        entry.last_sent = now
        self._by_seq[self._seq] = entry
        self._publish(self.topics.ledger_propose(), wire, 1)

    def on_audit_line(self, line: Mapping[str, Any]) -> None:
        height = line.get("height")
        if not isinstance(height, int):
            return
        body = line.get("body")
        prov = body.get("prov") if isinstance(body, dict) else None
        if line.get("state") == DATA and isinstance(prov, dict) and isinstance(prov.get("data"), str):
            self._data_committed(prov["data"], height)
        if line.get("proposer") == self.key.id and isinstance(line.get("seq"), int):
            entry = self._by_seq.get(line["seq"])
            if entry is not None:
                self._commit(entry, height)

    def on_block(self, height: int, block: Block) -> None:
        for _, proposer, seq, record in block_records(block):
            if isinstance(record.structure, Provenance):
                self._data_committed(record.structure.data, height)
            if proposer == self.key.id:
                entry = self._by_seq.get(seq)
                if entry is not None:
                    self._commit(entry, height)

    def _data_committed(self, data: str, height: int) -> None:
        self._committed_data[data] = height
        self._committed_data.move_to_end(data)
        while len(self._committed_data) > self.REMEMBERED_DATA:
            self._committed_data.popitem(last=False)
        entry = self._by_data.get(data)
        if entry is not None:
            self._commit(entry, height)

    def _commit(self, entry: _Outstanding, height: int) -> None:
        if id(entry) not in self._pending and id(entry) not in self._given_up:
            return  # already reported
        self._forget(entry)
        self.committed += 1
        entry.on_commit(height)

    def _forget(self, entry: _Outstanding) -> None:
        self._pending.pop(id(entry), None)
        self._given_up.pop(id(entry), None)
        for seq in entry.seqs:
            self._by_seq.pop(seq, None)
        if entry.data is not None and self._by_data.get(entry.data) is entry:
            del self._by_data[entry.data]

    def tick(self, now: float) -> None:
        for entry in list(self._pending.values()):
            if now - entry.last_sent < self.RETRY_SECONDS:
                continue
            if entry.proposals >= self.MAX_PROPOSALS:
                del self._pending[id(entry)]
                entry.gave_up_at = now
                self._given_up[id(entry)] = entry
                self.gave_up += 1
                log.warning("gave up on record %s: not committed after %d proposals in %.0f s (already on the "
                            "ledger under an earlier proposal, or refused: see the leader's log)", entry.label,
                            entry.proposals, now - entry.first_sent)
                entry.on_give_up()
            else:
                self._send(entry, now)
        for entry in list(self._given_up.values()):
            if entry.gave_up_at is not None and now - entry.gave_up_at > self.LATE_COMMIT_SECONDS:
                self._forget(entry)


# ---------------------------------------------------------------------------------------- the runner


class ServiceProgram(Protocol):
    """A built-in service program, driven by ServiceRunner on one thread."""

    def input_filters(self) -> list[str]:
        """Full topic filters to receive as inputs (QoS 1, acknowledged by the program)."""
        ...

    def on_input(self, message: Inbound, now: float) -> None: ...

    def tick(self, now: float) -> None: ...


class ServiceRunner:
    """The instance's loop: one thread owns the proposer, the registry and the program.

    paho's thread only enqueues, except for one decision it takes itself: a placement that fences
    this instance sets `fenced` at once, and from then on nothing is acknowledged or proposed.
    """

    TICK_SECONDS = 0.05
    SETTLE_SECONDS = 0.3  # after the first subscription grant: retained placement and blocks arrive

    def __init__(self, context: ServiceContext, program: Callable[[ServiceRunner], ServiceProgram]) -> None:
        self.context = context
        self.topics = context.topics
        self._inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.fenced = threading.Event()
        self.fence_reason = ""
        self._stopping = threading.Event()
        self.stop_reason = ""
        self.link = ServiceLink(host=context.broker_host, port=context.broker_port, username=context.identity,
                                password=broker_password(context.key), client_id=context.client_id,
                                on_message=self._on_message, on_ready=self._on_ready)
        self.proposer = LedgerProposer(context.key, self.topics, self.publish)
        self.devices = DeviceRegistry(context.trust, context.devices, context.ledger_height)
        self._placement_topic = self.topics.orch_placement(context.service)
        self._audit_prefix = f"{self.topics.root}/audit/"
        self._block_prefix = f"{self.topics.root}/ledger/block/"
        self._settled_at: float | None = None
        self._held: list[Inbound] = []
        self.program = program(self)
        # Ledger and placement first: the broker sends their retained messages before any input
        # it queued for us, as far as one connection's order goes.
        self.link.subscribe(self._placement_topic, 0)
        self.link.subscribe(f"{self.topics.root}/ledger/block/+", 0)
        self.link.subscribe(f"{self.topics.root}/audit/{ID_CREATE}", 0)
        self.link.subscribe(f"{self.topics.root}/audit/{ID_DELETE}", 0)
        self.link.subscribe(f"{self.topics.root}/audit/{DATA}", 0)
        for topic_filter in self.program.input_filters():
            self.link.subscribe(topic_filter, 1)

    # called by the program --------------------------------------------------------------------

    def ack(self, message: Inbound) -> bool:
        """Acknowledge an input for good; refused (False) once fenced or stopping."""
        if self.fenced.is_set() or self._stopping.is_set():
            return False
        self.link.ack(message)
        return True

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> object:
        if self.fenced.is_set():
            return False
        return self.link.publish(topic, payload, qos)

    def stop(self, why: str) -> None:
        """Ask the loop to end (within one tick). Safe in a signal handler: it only sets an Event,
        whose lock the loop's thread never holds, where a queue put could deadlock on the queue's."""
        if not self._stopping.is_set():
            self.stop_reason = why
        self._stopping.set()

    # paho's thread ----------------------------------------------------------------------------

    def _on_message(self, message: Inbound) -> None:
        if message.topic == self._placement_topic:
            c = self.context
            reason = placement_verdict(message.payload, service=c.service, replica=c.replica, node=c.node,
                                       height=c.height)
            if reason is not None and not self.fenced.is_set():
                self.fence_reason = reason
                self.fenced.set()
                self._inbox.put(("wake", None))
            return
        self._inbox.put(("message", message))

    def _on_ready(self, session_present: bool) -> None:
        self._inbox.put(("ready", session_present))

    # the loop ---------------------------------------------------------------------------------

    def run(self) -> int:
        log.info("%s starting as %s (program %s, %d devices joined at height %s)", self.context.label,
                 self.context.identity, self.context.program, len(self.context.devices), self.context.ledger_height)
        self.link.start()
        next_tick = 0.0
        try:
            while not self._stopping.is_set() and not self.fenced.is_set():
                try:
                    kind, item = self._inbox.get(timeout=self.TICK_SECONDS)
                except queue.Empty:
                    kind, item = "idle", None
                now = time.time()
                if self._held and self._settled() and not self.fenced.is_set():
                    # Before anything newer: a device's readings must reach the program in the order
                    # they came, or the later one's seq makes the earlier ones look replayed.
                    held, self._held = self._held, []
                    for message in held:
                        self._input(message, now)
                if kind == "message":
                    self._dispatch(item, now)
                elif kind == "ready" and self._settled_at is None:
                    self._settled_at = time.monotonic() + self.SETTLE_SECONDS
                    log.info("subscribed (session %s); taking inputs in %.1f s", "resumed" if item else "new",
                             self.SETTLE_SECONDS)
                if now >= next_tick and not self.fenced.is_set():
                    next_tick = now + self.TICK_SECONDS
                    self.proposer.tick(now)
                    self.program.tick(now)
        finally:
            if self.fenced.is_set():
                log.warning("fenced: %s; exiting without acknowledging further input", self.fence_reason)
            elif self._stopping.is_set():
                log.info("stopping (%s); %d records not yet committed stay unacknowledged for the next instance",
                         self.stop_reason, self.proposer.outstanding)
            self.link.stop()
        return EXIT_OK

    def _input(self, message: Inbound, now: float) -> None:
        try:
            self.program.on_input(message, now)
        except TomqError as exc:
            # Our own refusal to build something from this input (e.g. a record that does not
            # validate): say so and let it go, rather than stall the replica on it forever.
            log.error("dropped the input on %s: %s", message.topic, exc)
            self.ack(message)

    def _settled(self) -> bool:
        return self._settled_at is not None and time.monotonic() >= self._settled_at

    def _dispatch(self, message: Inbound, now: float) -> None:
        topic = message.topic
        if topic.startswith(self._audit_prefix):
            try:
                line = json.loads(message.payload)
            except ValueError:
                return
            if isinstance(line, dict):
                self.devices.on_audit_line(line)
                self.proposer.on_audit_line(line)
            return
        if topic.startswith(self._block_prefix):
            if not message.payload:
                return  # a height that left the retained window
            try:
                block = decode_block_file(message.payload).block
            except PeerError:
                return
            self.devices.on_block(block.height, block)
            self.proposer.on_block(block.height, block)
            return
        if self._held or not self._settled() or self.fenced.is_set():
            self._held.append(message)
            return
        self._input(message, now)


def run_program(program: Callable[[ServiceRunner], ServiceProgram], name: str) -> int:
    """`python -m tomq.node.services.<name>`: load the context from the environment and run."""
    logging.basicConfig(level=os.environ.get("TOMQ_LOG_LEVEL", "INFO").upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    try:
        context = ServiceContext.from_environment()
        logging.getLogger().handlers[0].setFormatter(logging.Formatter(
            f"%(asctime)s {context.service}/{context.replica} %(levelname)s %(name)s: %(message)s"))
        runner = ServiceRunner(context, program)
    except ConfigError as exc:
        log.error("%s cannot start: %s", name, exc)
        return EXIT_CONFIG
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda number, _: runner.stop(signal.Signals(number).name))
    return runner.run()


def to_json_value(value: Any) -> Any:
    """A CBOR value as JSON: bytes as hex, map keys as text, non-finite floats as null."""
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {str(k): to_json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json_value(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
