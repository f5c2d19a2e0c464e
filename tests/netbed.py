"""A multi-host network test bed: every host (broker, nodes, clients) in its own network namespace.

    with NetBed(["broker", "n1", "n2", "n3", "client"], tmp_path) as bed:
        broker = BedProcess(bed, "broker", ["mosquitto", "-c", conf], tmp_path / "broker.log")
        broker.start()                    # runs inside the broker's namespace
        bed.address("broker")             # "10.231.N.10": what the other hosts connect to
        bed.cut("n1", "n2")               # n1 <-> n2 packets dropped, both ways
        bed.cut("n3", one_way=True)       # n3 -> every other host dropped; they still reach n3
        bed.heal()
        bed.netem("n1", delay_ms=200, jitter_ms=20, loss_pct=5)
        broker.pause(); broker.resume(); broker.restart()
    # leaving the block SIGKILLs what the bed started and deletes exactly its namespaces

Layout: one namespace per host, tomq-<bed id>-<host> (bed id: 6 hex digits, unique among the beds on
this machine), and tomq-<bed id>-hub holding a Linux bridge `br0`. Each host has one veth pair: `eth0`
inside the host's namespace, its peer `port<i>` in the hub, attached to the bridge. Host i has address
10.231.<octet>.<10 + i>/24 (octet random, not used by another live bed); lo is up everywhere. The hosts
reach only one another: there is no route to the machine's own network or the internet. IPv4 only:
cuts and netem do not touch IPv6 (which nothing here uses).

Why the test bed exists: Raft over MQTT through a broker has to survive partitions, one-way links, slow
and lossy links and paused or restarted processes; loopback on one machine can show none of them.

How faults are made, and what was found on this machine (Debian 12 in a VM, kernel 6.18, iproute2 6.1,
iptables 1.8.9, Python 3.11, root):

* No tc netem here. The kernel is built without sch_netem (CONFIG_NET_SCH_NETEM is not set) and
  loads no modules at all (no /lib/modules), so `tc qdisc add ... netem` answers "Specified qdisc kind
  is unknown". It has no fq either (so no eBPF earliest-departure-time delay), only htb, tbf and
  ingress; tc is not used at all. It does have NFQUEUE (CONFIG_NETFILTER_NETLINK_QUEUE=y), bridge
  netfilter and the physdev and statistic matches, so netem is made in the hub, on the bridge:
  iptables there (bridge-nf-call-iptables, a per-namespace sysctl, set to 1) sends the packets that
  enter the bridge from a host's port (mangle PREROUTING, --physdev-in) and those leaving it to that
  port (mangle POSTROUTING, --physdev-out) to netfilter queue <host index + 1>; a small process of ours
  in the hub (`python netbed.py delay`, the netlink client below, no library) gives each packet its
  verdict after delay ± jitter ms (uniform). Loss is the kernel's `-m statistic --mode random` DROP on
  the same packets. Each direction of the host's link gets the full delay and loss, as netem on both
  ends of its veth would: a round trip to a host with netem(delay_ms=200) takes ~400 ms more, and a
  message between two such hosts ~400 ms one way. Jitter reorders packets, as netem's does. The rules
  use --queue-bypass, so if a delay process dies its packets flow undelayed rather than stop
  (clear_netem then raises).
* Why in the hub and not in the host's own namespace: a packet held in the sender's OUTPUT still
  belongs to its socket, and TCP small queues let a socket have only ~2 packets below TCP at once, so
  a 50 ms delay there throttled a bulk TCP transfer to 0.1 MB/s (netem itself orphans the packets it
  holds to avoid exactly this). Packets reach the hub already orphaned (crossing a veth does it): the
  same 50 ms link then carries ~13 MB/s (~400 MB/s without netem).
* Faults stay silent to the sender, as on a real network. An iptables DROP in OUTPUT makes the
  sender's own UDP sendto() fail at once with EPERM ("Operation not permitted"; TCP hides it in its
  retransmissions), which a real partition never does. So a cut a -> b is a DROP in b's INPUT (filter
  chain TOMQ-CUT, from a's address), never in a's OUTPUT. Existing TCP connections are cut too (no
  ESTABLISHED exception): their data is retransmitted and flows again after heal().
* iptables-nft (the Debian default alternative) and iptables-legacy both work inside a namespace made
  by `ip netns add`, and each namespace has its own tables. This module uses iptables-nft
  (iptables-legacy only when the nft one fails the probe in `availability()`), through
  `iptables-restore --noflush`, in chains of its own (TOMQ-CUT in each host, TOMQ-FROM-<i> and
  TOMQ-TO-<i> in the hub), so a change is one atomic call (~10 ms).
* `ip link add eth0 netns A type veth peer name port0 netns HUB` creates both ends straight inside
  their namespaces, so interface names never clash with the root namespace's or another bed's.
* `ip netns exec NS argv` execs argv in place (no fork): Popen.pid is the program's own pid, so
  SIGSTOP, SIGCONT and SIGKILL reach it directly. It also gives the program a private mount
  namespace (remounting /sys); /tmp and every other file stays shared.
* `ip netns delete` of a namespace with processes still inside only removes its name; the namespace
  lives on with them. So stop() kills first: what the bed started, then whatever `ip netns pids`
  still finds inside (children of what it started), then deletes the names.
* No ping on this machine; the tests measure round trips with UDP and TCP echo. A thread that calls
  setns(2) on /run/netns/<name> makes sockets that stay in that namespace after the thread ends
  (NetBed.socket): clients for checks without starting a process (Python 3.11 has no os.setns, so
  ctypes). Making a 3-host bed takes ~0.1 s, a 5-host one ~0.15 s, stopping it ~0.03 s.
* A bed records its owner (pid and start time) in /run/tomq-netbed/<bed id>.json before it creates a
  namespace. start() (and `python tests/netbed.py clean`) removes the namespaces of beds whose owner
  is dead (a crashed run), and never touches a bed whose owner lives or that has no record.

Every subprocess call has a timeout; every process killed here is one the bed started or one still
inside the bed's own namespaces.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import heapq
import itertools
import json
import os
import random
import re
import secrets
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from procs import kill_process, pid_alive, stop_process, which

PYTHON = sys.executable
RECORD_DIR = Path("/run/tomq-netbed")
NETNS_DIR = Path("/run/netns")
BRIDGE_NETFILTER = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")
NAMESPACE_PATTERN = re.compile(r"^tomq-([0-9a-f]{6})-(.+)$")
HOST_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,39}$")
HUB = "hub"
BRIDGE = "br0"
HOST_INTERFACE = "eth0"
NETEM_QUEUE = 1
SUBNET_PREFIX = "10.231"
COMMAND_TIMEOUT = 20.0
RUN_TIMEOUT = 60.0

T = TypeVar("T")


class NetBedError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------- tools


@dataclass(frozen=True)
class Tools:
    ip: str
    iptables: str
    iptables_restore: str
    wait_flag: tuple[str, ...]  # iptables-legacy takes the xtables lock in /run, shared by every namespace


def _run(argv: list[str], timeout: float = COMMAND_TIMEOUT, input_text: str | None = None,
         check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, input=input_text, capture_output=True, text=True, timeout=timeout,
                            stdin=None if input_text is not None else subprocess.DEVNULL)
    if check and result.returncode != 0:
        output = (result.stdout + result.stderr).strip()
        raise NetBedError(f"{' '.join(argv)} exited {result.returncode}: {output}")
    return result


@functools.cache
def tools() -> Tools:
    """The commands this machine has, with the iptables variant that works in a fresh namespace."""
    if os.geteuid() != 0:
        raise NetBedError("network namespaces, veth pairs and iptables need root")
    ip = which("ip")
    if ip is None:
        raise NetBedError("`ip` not found; install the Debian package iproute2")
    candidates = [(which(f"iptables-{kind}"), which(f"iptables-{kind}-restore"), flag)
                  for kind, flag in (("nft", ()), ("legacy", ("-w", "5")))]
    if not any(binary and restore for binary, restore, _ in candidates):
        raise NetBedError("neither iptables-nft nor iptables-legacy found; install the Debian package "
                          "iptables")
    if not BRIDGE_NETFILTER.exists():
        raise NetBedError(f"{BRIDGE_NETFILTER} is missing: the kernel has no bridge netfilter (br_netfilter)")
    probe = f"tomq-probe-{os.getpid()}-{secrets.token_hex(3)}"
    failures = []
    try:
        _run([ip, "netns", "add", probe])
        _run([ip, "-n", probe, "link", "add", "probe-br", "type", "bridge"])
        _run([ip, "-n", probe, "link", "add", "probe-a", "type", "veth", "peer", "name", "probe-b"])
        for binary, restore, flag in candidates:
            if not (binary and restore):
                continue
            rules = ("*mangle\n:TOMQ-PROBE - [0:0]\n"
                     "-A TOMQ-PROBE -m physdev --physdev-in probe-a -m statistic --mode random "
                     "--probability 0.5 -j DROP\n"
                     f"-A TOMQ-PROBE -m physdev --physdev-out probe-a -j NFQUEUE --queue-num {NETEM_QUEUE} "
                     "--queue-bypass\n"
                     "COMMIT\n*filter\n:TOMQ-PROBE - [0:0]\n-A TOMQ-PROBE -s 10.0.0.1/32 -j DROP\nCOMMIT\n")
            result = _run([ip, "netns", "exec", probe, restore, *flag, "--noflush"], input_text=rules,
                          check=False)
            if result.returncode == 0:
                return Tools(ip, binary, restore, flag)
            failures.append(f"{restore}: {result.stderr.strip()}")
    except (NetBedError, OSError, subprocess.TimeoutExpired) as exc:
        raise NetBedError(f"cannot make a network namespace with a bridge and a veth pair: {exc}") from exc
    finally:
        _run([ip, "netns", "delete", probe], check=False)
    raise NetBedError(f"iptables with physdev, statistic and NFQUEUE does not work in a namespace: "
                      f"{'; '.join(failures)}")


def availability() -> tuple[bool, str]:
    """Whether a bed can be made here, and if not, why (for conftest.require)."""
    try:
        tools()
    except NetBedError as exc:
        return False, str(exc)
    return True, ""


# ---------------------------------------------------------------------------------------- namespaces


def namespace_names() -> list[str]:
    """Every named network namespace on this machine (what `ip netns list` shows)."""
    try:
        return sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []


def namespace_pids(namespace: str) -> list[int]:
    result = _run([tools().ip, "netns", "pids", namespace], check=False)
    return [int(word) for word in result.stdout.split() if word.isdigit() and int(word) != os.getpid()]


def _kill_namespace_processes(namespace: str, timeout: float = 10.0) -> list[int]:
    """SIGCONT and SIGKILL every process inside `namespace` (ours: the namespace is); return their pids."""
    killed: list[int] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = [pid for pid in namespace_pids(namespace) if pid_alive(pid)]
        if not pids:
            return killed
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        _wait(functools.partial(_all_exited, pids), 2.0)
    raise NetBedError(f"processes still inside {namespace} {timeout} s after SIGKILL: "
                      f"{namespace_pids(namespace)}")


def _all_exited(pids: list[int]) -> bool:
    return not any(pid_alive(pid) for pid in pids)


def _start_time(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2 :].split()[19])


def _read_record(bed_id: str) -> dict[str, Any] | None:
    try:
        record = json.loads((RECORD_DIR / f"{bed_id}.json").read_text())
    except (OSError, ValueError):
        return None  # none, or still being written: not ours to judge
    return record if isinstance(record, dict) else None


def _owner_alive(record: dict[str, Any]) -> bool:
    pid = record.get("owner_pid")
    return isinstance(pid, int) and pid_alive(pid) and _start_time(pid) == record.get("owner_start")


def clean_stale_beds() -> list[str]:
    """Delete the namespaces of beds whose recorded owner is dead; return what was removed.

    A namespace named like a bed's but without a record, or whose owner lives, is left alone."""
    removed: list[str] = []
    by_bed: dict[str, list[str]] = {}
    for name in namespace_names():
        match = NAMESPACE_PATTERN.match(name)
        if match:
            by_bed.setdefault(match.group(1), []).append(name)
    recorded = {path.stem for path in RECORD_DIR.glob("*.json")} if RECORD_DIR.is_dir() else set()
    for bed_id in sorted(set(by_bed) | recorded):
        record = _read_record(bed_id)
        if record is None or _owner_alive(record):
            continue
        for name in by_bed.get(bed_id, []):
            _kill_namespace_processes(name)
            _run([tools().ip, "netns", "delete", name], check=False)
            removed.append(name)
        with contextlib.suppress(FileNotFoundError):
            (RECORD_DIR / f"{bed_id}.json").unlink()
    return removed


def _wait(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000


def call_in_namespace(namespace: str, function: Callable[[], T]) -> T:
    """Run `function` in a new thread that joined `namespace` (setns); sockets it makes stay there."""
    outcome: dict[str, Any] = {}

    def enter_and_call() -> None:
        try:
            fd = os.open(NETNS_DIR / namespace, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    error = ctypes.get_errno()
                    raise OSError(error, f"setns({namespace}): {os.strerror(error)}")
            finally:
                os.close(fd)
            outcome["value"] = function()
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=enter_and_call, name=f"netns-{namespace}")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    value: T = outcome["value"]
    return value


# ---------------------------------------------------------------------------------------- pause / resume

_paused: dict[int, subprocess.Popen[Any]] = {}


def _state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()[0]


def pause(process: subprocess.Popen[Any], timeout: float = 5.0) -> None:
    """SIGSTOP `process` and wait until the kernel reports it stopped. NetBed.stop resumes it."""
    if process.poll() is not None:
        raise NetBedError(f"process {process.pid} already exited with {process.returncode}")
    process.send_signal(signal.SIGSTOP)
    _paused[process.pid] = process
    if not _wait(lambda: _state(process.pid) in ("T", "t", None), timeout):
        raise NetBedError(f"process {process.pid} not stopped {timeout} s after SIGSTOP "
                          f"(state {_state(process.pid)})")


def resume(process: subprocess.Popen[Any]) -> None:
    """SIGCONT `process` (if it still runs)."""
    _paused.pop(process.pid, None)
    if process.poll() is None:
        process.send_signal(signal.SIGCONT)


def paused(process: subprocess.Popen[Any]) -> bool:
    return _paused.get(process.pid) is process and process.poll() is None


# ---------------------------------------------------------------------------------------- the bed


@dataclass
class Netem:
    delay_ms: float
    jitter_ms: float
    loss_pct: float
    delayer: subprocess.Popen[bytes] | None


class NetBed:
    """Hosts in network namespaces on one bridge; see the module docstring."""

    def __init__(self, hosts: list[str], workdir: Path) -> None:
        if not hosts:
            raise ValueError("a bed needs at least one host")
        if len(set(hosts)) != len(hosts):
            raise ValueError(f"host names repeat: {hosts}")
        for host in hosts:
            if not HOST_PATTERN.match(host) or host == HUB:
                raise ValueError(f"bad host name {host!r}: letters, digits, _ . -, at most 40, not {HUB!r}")
        if len(hosts) > 200:
            raise ValueError("at most 200 hosts")
        self.hosts = list(hosts)
        self.workdir = Path(workdir)
        self.bed_id = ""
        self.octet = -1
        self.created: list[str] = []  # namespaces made, in order
        self.processes: list[subprocess.Popen[Any]] = []  # everything popen() started, helpers included
        self.sockets: list[socket.socket] = []
        self.cuts: set[tuple[str, str]] = set()  # (from, to): packets from -> to dropped
        self.netems: dict[str, Netem] = {}
        self.started = False
        self.stopped = False
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------ context manager

    def __enter__(self) -> NetBed:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ queries

    def namespace(self, host: str) -> str:
        if host not in self.hosts and host != HUB:
            raise KeyError(f"no host {host!r} in this bed ({', '.join(self.hosts)})")
        if not self.bed_id:
            raise NetBedError("the bed has not been started")
        return f"tomq-{self.bed_id}-{host}"

    @property
    def namespaces(self) -> list[str]:
        return [self.namespace(host) for host in [HUB, *self.hosts]]

    def address(self, host: str) -> str:
        if host not in self.hosts:
            raise KeyError(f"no host {host!r} in this bed ({', '.join(self.hosts)})")
        if self.octet < 0:
            raise NetBedError("the bed has not been started")
        return f"{SUBNET_PREFIX}.{self.octet}.{10 + self.hosts.index(host)}"

    # ------------------------------------------------------------------ start

    def start(self) -> None:
        if self.started:
            raise NetBedError("a bed starts once")
        begun = time.monotonic()
        ip = tools().ip
        self.started = True
        self.workdir.mkdir(parents=True, exist_ok=True)
        clean_stale_beds()
        self._claim()
        try:
            hub = self.namespace(HUB)
            self._add_namespace(hub)
            _run([ip, "-n", hub, "-batch", "-"],
                 input_text=f"link set lo up\nlink add {BRIDGE} type bridge\nlink set {BRIDGE} up\n")
            ports = []
            for index, host in enumerate(self.hosts):
                namespace = self.namespace(host)
                self._add_namespace(namespace)
                _run([ip, "link", "add", HOST_INTERFACE, "netns", namespace, "type", "veth",
                      "peer", "name", f"port{index}", "netns", hub])
                _run([ip, "-n", namespace, "-batch", "-"],
                     input_text=f"addr add {self.address(host)}/24 dev {HOST_INTERFACE}\n"
                                f"link set {HOST_INTERFACE} up\nlink set lo up\n")
                ports.append(f"link set port{index} master {BRIDGE}\nlink set port{index} up\n")
                self._iptables(namespace, "*filter\n:TOMQ-CUT - [0:0]\n-A INPUT -j TOMQ-CUT\nCOMMIT\n")
            _run([ip, "-n", hub, "-batch", "-"], input_text="".join(ports))
            # netem happens in the hub, on bridged packets: iptables must see them (br_netfilter).
            self.in_namespace(HUB, _enable_bridge_netfilter)
            chains = "".join(f":{_egress_chain(i)} - [0:0]\n:{_ingress_chain(i)} - [0:0]\n"
                             f"-A PREROUTING -m physdev --physdev-in port{i} -j {_egress_chain(i)}\n"
                             f"-A POSTROUTING -m physdev --physdev-out port{i} -j {_ingress_chain(i)}\n"
                             for i in range(len(self.hosts)))
            self._iptables(hub, f"*mangle\n{chains}COMMIT\n")
        except BaseException:
            with contextlib.suppress(NetBedError):
                self.stop()
            raise
        self.timings["start"] = time.monotonic() - begun

    def _claim(self) -> None:
        """Pick a bed id and subnet no live bed uses, and record our ownership before any namespace exists."""
        RECORD_DIR.mkdir(parents=True, exist_ok=True)
        taken_octets = set()
        for path in RECORD_DIR.glob("*.json"):
            record = _read_record(path.stem)
            if record is not None and isinstance(record.get("octet"), int):
                taken_octets.add(record["octet"])
        free_octets = sorted(set(range(256)) - taken_octets) or list(range(256))
        existing = set(namespace_names())
        for _ in range(100):
            bed_id = secrets.token_hex(3)
            if any(NAMESPACE_PATTERN.match(name) and name.split("-")[1] == bed_id for name in existing):
                continue
            try:
                fd = os.open(RECORD_DIR / f"{bed_id}.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                continue
            self.bed_id, self.octet = bed_id, random.choice(free_octets)
            with os.fdopen(fd, "w") as record_file:
                json.dump({"owner_pid": os.getpid(), "owner_start": _start_time(os.getpid()),
                           "octet": self.octet, "namespaces": self.namespaces, "workdir": str(self.workdir)},
                          record_file)
            return
        raise NetBedError("no free bed id after 100 tries")

    def _add_namespace(self, namespace: str) -> None:
        _run([tools().ip, "netns", "add", namespace])
        self.created.append(namespace)

    def _iptables(self, namespace: str, rules: str) -> None:
        """Apply iptables-restore text (without flushing anything else) in a namespace of this bed."""
        t = tools()
        _run([t.ip, "netns", "exec", namespace, t.iptables_restore, *t.wait_flag, "--noflush"],
             input_text=rules)

    def iptables_rules(self, host: str) -> str:
        """`iptables -S` of the host's (or "hub"'s) filter and mangle tables, for failure messages."""
        t = tools()
        argv = [t.ip, "netns", "exec", self.namespace(host), t.iptables, *t.wait_flag, "-S"]
        return _run([*argv, "-t", "filter"]).stdout + _run([*argv, "-t", "mangle"]).stdout

    # ------------------------------------------------------------------ processes and sockets

    def _check_running(self) -> None:
        if not self.started or self.stopped or not self.created:
            raise NetBedError("the bed is not running")

    def command(self, host: str, argv: list[str]) -> list[str]:
        """The command line that runs argv inside the host's (or "hub"'s) namespace."""
        return [tools().ip, "netns", "exec", self.namespace(host), *map(str, argv)]

    def popen(self, host: str, argv: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start argv inside the host's namespace (Popen's keyword arguments); stop() kills it if it runs.

        Popen.pid is the program's own pid (`ip netns exec` execs it in place)."""
        self._check_running()
        self.processes = [running for running in self.processes if running.poll() is None]
        process: subprocess.Popen[Any] = subprocess.Popen(self.command(host, argv), **kwargs)
        self.processes.append(process)
        return process

    def run(self, host: str, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        """subprocess.run inside the host's namespace; timeout defaults to 60 s."""
        self._check_running()
        kwargs.setdefault("timeout", RUN_TIMEOUT)
        return subprocess.run(self.command(host, argv), **kwargs)

    def in_namespace(self, host: str, function: Callable[[], T]) -> T:
        """Run function in a thread inside the host's namespace (from this process, no fork)."""
        self._check_running()
        return call_in_namespace(self.namespace(host), function)

    def socket(self, host: str, kind: int = socket.SOCK_STREAM) -> socket.socket:
        """An IPv4 socket of this process that lives in the host's namespace; stop() closes it."""
        made = self.in_namespace(host, lambda: socket.socket(socket.AF_INET, kind))
        self.sockets.append(made)
        return made

    def reaches(self, source: str, target: str, port: int, timeout: float = 0.5) -> bool:
        """Whether a TCP connection from source to target:port is accepted within timeout s."""
        with self.socket(source) as probe:
            probe.settimeout(timeout)
            try:
                probe.connect((self.address(target), port))
            except OSError:
                return False
        return True

    def wait_for_port(self, host: str, port: int, timeout: float = 10.0, *, source: str | None = None,
                      process: subprocess.Popen[Any] | BedProcess | None = None) -> None:
        """Wait until host's address:port accepts TCP from `source` (default: host itself).

        Fails early if `process` (the server being waited for) exits."""
        deadline = time.monotonic() + timeout
        while not self.reaches(source or host, host, port, timeout=0.2):
            popen = process.process if isinstance(process, BedProcess) else process
            if popen is not None and popen.poll() is not None:
                raise NetBedError(f"the server on {host} exited with {popen.returncode} "
                                  f"before listening on {port}")
            if time.monotonic() >= deadline:
                raise TimeoutError(f"nothing listened on {host} ({self.address(host)}:{port}) "
                                   f"within {timeout} s")
            time.sleep(0.02)

    # ------------------------------------------------------------------ cuts

    def cut(self, a: str, b: str | None = None, *, one_way: bool = False) -> None:
        """Drop packets between a and b (b=None: a and every other host); one_way: only a -> b.

        The drop happens in the receiver's INPUT, so a sender sees silence, never an error."""
        self._check_running()
        others = [b] if b is not None else [host for host in self.hosts if host != a]
        if a not in self.hosts or any(other not in self.hosts or other == a for other in others):
            raise ValueError(f"cut({a!r}, {b!r}): hosts must be two different hosts of this bed")
        pairs = {(a, other) for other in others}
        if not one_way:
            pairs |= {(other, a) for other in others}
        new = pairs - self.cuts
        by_receiver: dict[str, list[str]] = {}
        for sender, receiver in sorted(new):
            by_receiver.setdefault(receiver, []).append(sender)
        for receiver, senders in by_receiver.items():
            rules = "".join(f"-A TOMQ-CUT -s {self.address(sender)}/32 -j DROP\n" for sender in senders)
            self._iptables(self.namespace(receiver), f"*filter\n{rules}COMMIT\n")
            self.cuts |= {(sender, receiver) for sender in senders}

    def heal(self) -> None:
        """Remove every cut."""
        self._check_running()
        for receiver in sorted({receiver for _, receiver in self.cuts}):
            self._iptables(self.namespace(receiver), "*filter\n-F TOMQ-CUT\nCOMMIT\n")
        self.cuts.clear()

    # ------------------------------------------------------------------ netem

    def netem(self, host: str, delay_ms: float, jitter_ms: float = 0, loss_pct: float = 0.0) -> None:
        """Delay (± jitter, uniform) and lose the host's packets, each direction of its link.

        Replaces the host's previous netem. Made in the hub, see the module docstring (NFQUEUE, not tc)."""
        self._check_running()
        if host not in self.hosts:
            raise KeyError(f"no host {host!r} in this bed")
        if delay_ms < 0 or jitter_ms < 0 or not 0 <= loss_pct <= 100:
            raise ValueError(f"netem({delay_ms}, {jitter_ms}, {loss_pct}): negative, or loss not 0-100 %")
        self.clear_netem(host)
        if delay_ms == 0 and jitter_ms == 0 and loss_pct == 0:
            return
        index = self.hosts.index(host)
        queue = index + 1
        netem = self.netems[host] = Netem(delay_ms, jitter_ms, loss_pct, None)
        if delay_ms or jitter_ms:  # loss alone needs no process
            log_path = self.workdir / f"netem-{host}.log"
            with open(log_path, "ab") as log:
                delayer = netem.delayer = self.popen(
                    HUB, [PYTHON, str(Path(__file__).resolve()), "delay", "--queue", str(queue),
                          "--delay-ms", str(delay_ms), "--jitter-ms", str(jitter_ms)],
                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log)
            assert delayer.stdout is not None
            ready, _, _ = select.select([delayer.stdout], [], [], COMMAND_TIMEOUT)
            line = delayer.stdout.readline() if ready else b""
            delayer.stdout.close()
            if line.strip() != b"ready":
                self.clear_netem(host)
                raise NetBedError(f"the delay process for {host} did not start: {_tail(log_path)}")
        actions = []
        if loss_pct:
            actions.append(f"-m statistic --mode random --probability {loss_pct / 100:.6f} -j DROP")
        if netem.delayer is not None:
            actions.append(f"-j NFQUEUE --queue-num {queue} --queue-bypass")
        rules = [f"-A {chain} {action}\n" for chain in (_egress_chain(index), _ingress_chain(index))
                 for action in actions]
        self._iptables(self.namespace(HUB), "*mangle\n" + "".join(rules) + "COMMIT\n")

    def clear_netem(self, host: str | None = None) -> None:
        """Take delay and loss off the host's link (host=None: every host's)."""
        self._check_running()
        for name in [host] if host is not None else sorted(self.netems):
            netem = self.netems.pop(name, None)
            if netem is None:
                continue
            # Rules first, so no packet is queued any more; then the delay process releases what it holds.
            index = self.hosts.index(name)
            self._iptables(self.namespace(HUB),
                           f"*mangle\n-F {_egress_chain(index)}\n-F {_ingress_chain(index)}\nCOMMIT\n")
            if netem.delayer is not None:
                died = netem.delayer.poll()
                stop_process(netem.delayer, 5)
                if died is not None:  # with --queue-bypass its packets went through undelayed meanwhile
                    raise NetBedError(f"the delay process for {name} had exited with {died}: "
                                      f"{_tail(self.workdir / f'netem-{name}.log')}")

    # ------------------------------------------------------------------ stop

    def stop(self) -> None:
        """SIGKILL what the bed started, delete exactly its namespaces. Idempotent; raises if any is left."""
        if self.stopped or not self.started:
            self.stopped = True
            return
        self.stopped = True
        begun = time.monotonic()
        problems: list[str] = []
        for process in self.processes:
            if paused(process):
                resume(process)
            with contextlib.suppress(Exception):
                if process.poll() is None:
                    process.send_signal(signal.SIGCONT)
            try:
                kill_process(process)
            except (OSError, subprocess.TimeoutExpired) as exc:
                problems.append(f"kill {process.pid}: {exc}")
            for stream in (process.stdin, process.stdout, process.stderr):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
        for made in self.sockets:
            made.close()
        self.sockets.clear()
        self.netems.clear()
        self.cuts.clear()
        for namespace in reversed(self.created):
            try:
                _kill_namespace_processes(namespace)
            except (NetBedError, OSError, subprocess.TimeoutExpired) as exc:
                problems.append(str(exc))
            result = _run([tools().ip, "netns", "delete", namespace], check=False)
            if result.returncode != 0:
                problems.append(f"ip netns delete {namespace}: {result.stderr.strip()}")
        left = sorted(set(self.created) & set(namespace_names()))
        if left:
            problems.append(f"namespaces left: {left}")
        elif self.bed_id:
            with contextlib.suppress(FileNotFoundError):
                (RECORD_DIR / f"{self.bed_id}.json").unlink()
        self.created.clear()
        self.timings["stop"] = time.monotonic() - begun
        if problems:
            raise NetBedError("; ".join(problems))


def _egress_chain(index: int) -> str:
    return f"TOMQ-FROM-{index}"  # in the hub: packets host `index` sent


def _ingress_chain(index: int) -> str:
    return f"TOMQ-TO-{index}"  # in the hub: packets on their way to host `index`


def _enable_bridge_netfilter() -> None:
    """Make iptables see bridged IPv4 packets, in the calling thread's namespace (a per-namespace sysctl)."""
    BRIDGE_NETFILTER.write_text("1\n")
    if BRIDGE_NETFILTER.read_text().strip() != "1":
        raise NetBedError(f"{BRIDGE_NETFILTER} does not stay 1")


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""


class BedProcess:
    """A program run inside one host's namespace, restartable there, with its log kept for failures.

    `env` holds variables added to this process's environment (PYTHONUNBUFFERED=1 is added too)."""

    def __init__(self, bed: NetBed, host: str, argv: list[str], log_path: Path,
                 env: dict[str, str] | None = None) -> None:
        self.bed = bed
        self.host = host
        self.argv = argv
        self.log_path = log_path
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        if self.alive():
            raise NetBedError(f"{self.host}: {self.argv[0]} already runs as {self.pid}")
        with open(self.log_path, "ab") as log:
            self.process = self.bed.popen(self.host, self.argv, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, env=self.env)

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def pause(self) -> None:
        assert self.process is not None
        pause(self.process)

    def resume(self) -> None:
        if self.process is not None:
            resume(self.process)

    def kill(self) -> None:
        """SIGKILL (a paused process too) and reap."""
        if self.process is not None:
            resume(self.process)
            kill_process(self.process)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (after SIGCONT, so a paused process can act on it), SIGKILL after timeout s."""
        if self.process is not None:
            resume(self.process)
            stop_process(self.process, timeout)

    def restart(self, kill: bool = False) -> None:
        """Stop (or SIGKILL) and start again in the same namespace, with the same address."""
        if kill:
            self.kill()
        else:
            self.stop()
        self.start()

    def tail(self, lines: int = 30) -> str:
        return _tail(self.log_path, lines)


# ---------------------------------------------------------------------------------------- the delay process
#
# A netfilter queue client speaking nfnetlink directly (linux/netfilter/nfnetlink_queue.h): bind a queue,
# ask for packet metadata only, and answer each packet id with ACCEPT after its delay, or DROP.

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_VERDICT, NFQNL_MSG_CONFIG = 0, 1, 2
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN, NFQA_CFG_MASK, NFQA_CFG_FLAGS = 1, 2, 3, 4, 5
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NFQA_CFG_F_GSO = 4
NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NF_DROP, NF_ACCEPT = 0, 1
NLMSG_ERROR = 2
NLM_F_REQUEST, NLM_F_ACK = 1, 4
SO_RCVBUFFORCE = 33
NLMSG_HEADER = struct.Struct("=IHHII")


def _attribute(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


class QueueLink:
    """One bound netfilter queue in the current network namespace."""

    def __init__(self, queue: int, max_length: int = 20000) -> None:
        self.queue = queue
        self.sequence = itertools.count(1)
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        # Metadata-only messages are ~100 bytes; a lost one would leave its packet queued for good.
        self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 16 << 20)
        self.sock.bind((0, 0))
        self.sock.settimeout(COMMAND_TIMEOUT)
        self._configure(_attribute(NFQA_CFG_CMD, struct.pack("!BxH", NFQNL_CFG_CMD_BIND, socket.AF_INET)))
        self._configure(_attribute(NFQA_CFG_PARAMS, struct.pack("!IB", 0, NFQNL_COPY_META)))
        self._configure(_attribute(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", max_length)))
        self._configure(_attribute(NFQA_CFG_MASK, struct.pack("!I", NFQA_CFG_F_GSO))
                        + _attribute(NFQA_CFG_FLAGS, struct.pack("!I", NFQA_CFG_F_GSO)))
        self.sock.setblocking(False)

    def _message(self, kind: int, flags: int, payload: bytes) -> tuple[int, bytes]:
        sequence = next(self.sequence)
        body = struct.pack("=BB", socket.AF_UNSPEC, 0) + struct.pack("!H", self.queue) + payload
        header = NLMSG_HEADER.pack(NLMSG_HEADER.size + len(body), (NFNL_SUBSYS_QUEUE << 8) | kind, flags,
                                   sequence, 0)
        return sequence, header + body

    def _configure(self, attributes: bytes) -> None:
        sequence, message = self._message(NFQNL_MSG_CONFIG, NLM_F_REQUEST | NLM_F_ACK, attributes)
        self.sock.sendto(message, (0, 0))
        while True:
            data = self.sock.recv(65536)
            for kind, message_sequence, payload in self._split(data):
                if kind == NLMSG_ERROR and message_sequence == sequence:
                    error = struct.unpack_from("=i", payload)[0]
                    if error:
                        raise OSError(-error, f"nfqueue config: {os.strerror(-error)}")
                    return

    @staticmethod
    def _split(data: bytes) -> Iterator[tuple[int, int, bytes]]:
        offset = 0
        while offset + NLMSG_HEADER.size <= len(data):
            length, kind, _, sequence, _ = NLMSG_HEADER.unpack_from(data, offset)
            if length < NLMSG_HEADER.size:
                return
            yield kind, sequence, data[offset + NLMSG_HEADER.size : offset + length]
            offset += (length + 3) & ~3

    def receive(self) -> list[int]:
        """Ids of the packets queued since the last call (never blocks)."""
        ids: list[int] = []
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except BlockingIOError:
                return ids
            for kind, _, payload in self._split(data):
                if kind == NLMSG_ERROR:
                    error = struct.unpack_from("=i", payload)[0]
                    if error:
                        print(f"nfqueue error: {os.strerror(-error)}", file=sys.stderr, flush=True)
                    continue
                if kind != (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
                    continue
                offset = 4  # struct nfgenmsg
                while offset + 4 <= len(payload):
                    length, attribute = struct.unpack_from("=HH", payload, offset)
                    if length < 4:
                        break
                    if attribute & 0x3FFF == NFQA_PACKET_HDR:
                        ids.append(struct.unpack_from("!I", payload, offset + 4)[0])
                    offset += (length + 3) & ~3

    def verdict(self, packet_id: int, verdict: int) -> None:
        _, message = self._message(NFQNL_MSG_VERDICT, NLM_F_REQUEST,
                                   _attribute(NFQA_VERDICT_HDR, struct.pack("!II", verdict, packet_id)))
        while True:
            try:
                self.sock.sendto(message, (0, 0))
                return
            except BlockingIOError:
                select.select([], [self.sock], [], 1.0)


def run_delayer(queue: int, delay_ms: float, jitter_ms: float) -> None:
    """Hold each packet of `queue` delay ± jitter ms (uniform), until SIGTERM."""
    link = QueueLink(queue)
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_read, False)
    os.set_blocking(wake_write, False)
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.set_wakeup_fd(wake_write)
    print("ready", flush=True)
    held: list[tuple[float, int, int]] = []  # (release at, arrival order, packet id)
    arrivals = itertools.count()
    low, high = max(0.0, delay_ms - jitter_ms) / 1000, (delay_ms + jitter_ms) / 1000
    while not stopping:
        timeout = max(0.0, held[0][0] - time.monotonic()) if held else None
        watched: list[Any] = [link.sock, wake_read]
        ready, _, _ = select.select(watched, [], [], timeout)
        if wake_read in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(wake_read, 512)
        now = time.monotonic()
        for packet_id in link.receive():
            heapq.heappush(held, (now + random.uniform(low, high), next(arrivals), packet_id))
        now = time.monotonic()
        while held and held[0][0] <= now:
            link.verdict(heapq.heappop(held)[2], NF_ACCEPT)
    for _, _, packet_id in sorted(held):  # the rules are gone by now: let what we hold go
        link.verdict(packet_id, NF_ACCEPT)


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="netbed.py", description="the network test bed's helpers")
    commands = parser.add_subparsers(dest="command", required=True)
    delay = commands.add_parser("delay", help="the delay process (run inside a bed's namespace)")
    delay.add_argument("--queue", type=int, default=NETEM_QUEUE)
    delay.add_argument("--delay-ms", type=float, default=0.0)
    delay.add_argument("--jitter-ms", type=float, default=0.0)
    commands.add_parser("clean", help="delete the namespaces of beds whose owner is dead")
    args = parser.parse_args(argv)
    if args.command == "delay":
        run_delayer(args.queue, args.delay_ms, args.jitter_ms)
    else:
        for name in clean_stale_beds():
            print(f"deleted {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
