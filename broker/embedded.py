"""The embedded broker: amqtt 0.12 with tomq's authentication and ACL, in a thread or in the foreground.

`EmbeddedBroker(DIR).start()` runs a `TomqBroker` (broker/amqtt_plugins.py) on its own asyncio
loop in a background thread, so that synchronous code (tests, the demo, the CLI) can own it;
`stop()` shuts it down and joins the thread. `run_forever()` is the `tomq broker DIR` command.

It binds 127.0.0.1 unless told otherwise, takes its port from cluster.toml `[broker]` unless
given one, and with `tls=True` adds a second, TLS listener whose CA and server certificate are
issued into DIR/broker/tls/ on first use (clients trust DIR/broker/tls/ca.pem). It must never
start without tomq's access plugin, never listen anonymously, and never leave its thread or
sockets behind after `stop()`.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tomq import cluster as clusters
from tomq.errors import ConfigError

log = logging.getLogger(__name__)

PLUGIN = "tomq.broker.amqtt_plugins.TomqAccessPlugin"
START_TIMEOUT = 10.0  # seconds for amqtt to open its listeners or shut down
TLS_VALID_DAYS = 825  # the longest server-certificate lifetime common TLS clients accept


@dataclass(frozen=True)
class TlsFiles:
    ca: Path  # give this to clients: paho `tls_set(ca_certs=...)`, `mosquitto_sub --cafile`
    cert: Path
    key: Path


def ensure_tls_files(cluster_dir: str | os.PathLike[str], hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> TlsFiles:
    """The broker's CA and server certificate in DIR/broker/tls/, issued on first use and then reused.

    The CA's private key is not kept: nothing else is ever signed with it, and a server
    certificate for more names is issued by deleting the folder (clients then need the new ca.pem).
    """
    tls_dir = Path(cluster_dir) / "broker" / "tls"
    files = TlsFiles(tls_dir / "ca.pem", tls_dir / "server.pem", tls_dir / "server.key")
    if files.ca.exists() and files.cert.exists() and files.key.exists():
        return files
    tls_dir.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"tomq broker CA for {Path(cluster_dir).resolve().name}")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # edge clocks drift
        .not_valid_after(now + datetime.timedelta(days=TLS_VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=TLS_VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = server_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption())
    # Key first and 0600, certificates last: a crash in between leaves no usable-looking half set.
    _write(files.key, key_pem, 0o600)
    _write(files.cert, server.public_bytes(serialization.Encoding.PEM), 0o644)
    _write(files.ca, ca.public_bytes(serialization.Encoding.PEM), 0o644)
    return files


def _write(path: Path, data: bytes, mode: int) -> None:
    temp = path.with_name(path.name + ".tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.chmod(temp, mode)
    os.replace(temp, path)


def broker_config(cluster_dir: Path, host: str, port: int, tls: TlsFiles | None = None,
                  tls_port: int | None = None) -> dict[str, Any]:
    """The amqtt 0.12 config: tomq's plugin only (no anonymous auth, no $SYS, no packet logging)."""
    listeners: dict[str, Any] = {"default": {"type": "tcp", "bind": f"{host}:{port}"}}
    if tls is not None:
        listeners["tls"] = {"type": "tcp", "bind": f"{host}:{tls_port}", "ssl": True,
                            "certfile": str(tls.cert), "keyfile": str(tls.key)}
    return {"listeners": listeners, "plugins": {PLUGIN: {"cluster_dir": str(cluster_dir.resolve())}}}


class EmbeddedBroker:
    """amqtt with tomq's policy on a background thread with its own event loop."""

    def __init__(self, cluster_dir: str | os.PathLike[str], host: str = "127.0.0.1", port: int | None = None,
                 *, tls: bool = False, tls_port: int | None = None) -> None:
        self.cluster_dir = Path(cluster_dir)
        loaded = clusters.load(self.cluster_dir)  # fail here, in the caller's thread, on a bad DIR
        self.cluster = loaded.name
        self.host = host
        self.port = loaded.broker_port if port is None else port
        self.tls = ensure_tls_files(self.cluster_dir, _tls_hosts(host)) if tls else None
        self.tls_port = (tls_port if tls_port is not None else self.port + 1) if tls else None
        self.config = broker_config(self.cluster_dir, host, self.port, self.tls, self.tls_port)
        self.broker: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    def start(self) -> None:
        """Start on a background thread; return once every listener accepts connections."""
        if self._thread is not None:
            raise RuntimeError("this EmbeddedBroker was already started; make a new one")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=f"tomq-broker-{self.port}", daemon=True)
        self._thread.start()
        if not self._started.wait(START_TIMEOUT):
            raise TimeoutError(f"amqtt did not start within {START_TIMEOUT} s")
        if self._error is not None:
            self._thread.join(timeout=START_TIMEOUT)
            raise ConfigError(f"the embedded broker did not start on {self.host}:{self.port}: {self._error}") \
                from self._error
        # No port probing needed: Broker.start() returns only after asyncio.start_server() has bound
        # and is listening on every listener (and a probe would log a bogus "no data" warning).

    def _run(self) -> None:
        from tomq.broker.amqtt_plugins import TomqBroker  # importing amqtt is slow; only when a broker runs

        assert self._loop is not None
        loop = self._loop
        asyncio.set_event_loop(loop)

        async def boot() -> None:
            self.broker = TomqBroker(self.config, loop=loop)  # must be created inside the running loop
            await self.broker.start()

        try:
            loop.run_until_complete(boot())
        except BaseException as exc:
            self._error = exc
            self._started.set()
            _close_loop(loop)
            return
        self._started.set()
        try:
            loop.run_forever()
        finally:
            _close_loop(loop)

    def stop(self) -> None:
        """Shut the broker down (clients are disconnected) and join its thread. Safe to call twice."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None or not thread.is_alive():
            return
        try:
            if self.broker is not None and self.broker.transitions.state == "started":
                asyncio.run_coroutine_threadsafe(self.broker.shutdown(), loop).result(timeout=START_TIMEOUT)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=START_TIMEOUT)
        if thread.is_alive():
            raise RuntimeError("the embedded broker's thread did not stop")

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def run_forever(self, on_started: Callable[[], None] | None = None) -> None:
        """Run until SIGINT or SIGTERM (the `tomq broker DIR` command); call `on_started` once listening."""
        stop = threading.Event()
        previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.start()
            if on_started is not None:
                on_started()
            while not stop.wait(0.5):
                if self._thread is not None and not self._thread.is_alive():
                    raise RuntimeError("the embedded broker stopped by itself")
        finally:
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _tls_hosts(host: str) -> tuple[str, ...]:
    hosts = ["127.0.0.1", "localhost"]
    if host not in ("0.0.0.0", "::", "") and host not in hosts:
        hosts.insert(0, host)
    if host in ("0.0.0.0", "::"):
        hosts.insert(0, socket.gethostname())
    return tuple(hosts)


def _close_loop(loop: asyncio.AbstractEventLoop) -> None:
    pending = asyncio.all_tasks(loop)
    for task in pending:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.close()
