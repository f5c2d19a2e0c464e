"""The network test bed (tests/netbed.py) does what it says, shown with real traffic between namespaces.

Most tests share one bed of three hosts (a, b, c), each running a TCP + UDP echo server on ECHO_PORT;
after each test every cut is healed and every netem cleared. Clients are sockets of this process made
inside a host's namespace (NetBed.socket), so no test waits for a Python interpreter to start. The
whole file takes ~8 s. Timing checks that a stall of the whole machine could break (a round trip that
should be fast, a probe that should connect) measure again, up to three times; the checks that a broken
helper fails (a cut host still answering, a delay missing) never pass by retrying.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import statistics
import subprocess
import textwrap
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import require
from netbed import RECORD_DIR, BedProcess, NetBed, availability, clean_stale_beds, namespace_names
from procs import PYTHON, pid_alive

ECHO_PORT = 7000
HOSTS = ["a", "b", "c"]

ECHO_SERVER = textwrap.dedent("""
    import socket, sys, threading

    port = int(sys.argv[1])

    def serve(connection):
        with connection:
            while data := connection.recv(65536):
                connection.sendall(data)

    def accept():
        server = socket.create_server(("0.0.0.0", port))
        while True:
            threading.Thread(target=serve, args=(server.accept()[0],), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("0.0.0.0", port))
    while True:
        data, peer = udp.recvfrom(65536)
        udp.sendto(data, peer)
""")


def start_echo(bed: NetBed, host: str, workdir: Path, port: int = ECHO_PORT) -> BedProcess:
    echo = BedProcess(bed, host, [PYTHON, "-c", ECHO_SERVER, str(port)], workdir / f"echo-{host}-{port}.log")
    echo.start()
    return echo


def wait_listening(bed: NetBed, echoes: list[BedProcess], port: int = ECHO_PORT) -> None:
    deadline = time.monotonic() + 10
    for echo in echoes:
        while not bed.reaches(echo.host, echo.host, port, timeout=0.2):
            assert echo.alive(), f"echo server on {echo.host} exited: {echo.tail()}"
            assert time.monotonic() < deadline, f"echo server on {echo.host} not listening: {echo.tail()}"
            time.sleep(0.02)


@pytest.fixture(scope="module")
def shared_bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetBed]:
    require("network namespaces", *availability())
    workdir = tmp_path_factory.mktemp("netbed")
    with NetBed(HOSTS, workdir) as bed:
        echoes = [start_echo(bed, host, workdir) for host in HOSTS]
        wait_listening(bed, echoes)
        yield bed


@pytest.fixture
def bed(shared_bed: NetBed) -> Iterator[NetBed]:
    yield shared_bed
    shared_bed.heal()
    shared_bed.clear_netem()


# ---------------------------------------------------------------------------------------- traffic helpers


def tcp_echo(bed: NetBed, source: str, target: str, timeout: float = 0.3, port: int = ECHO_PORT) -> bool:
    """Whether source connects to target's echo server and gets its bytes back within timeout s."""
    with bed.socket(source) as client:
        client.settimeout(timeout)
        try:
            client.connect((bed.address(target), port))
            client.sendall(b"hello")
            return client.recv(100) == b"hello"
        except OSError:
            return False


ALL_PAIRS = [f"{source}->{target}" for source in HOSTS for target in HOSTS if source != target]


def connectivity(bed: NetBed, cut: set[str], timeout: float = 0.3) -> dict[str, bool]:
    """tcp_echo for every "source->target" pair at once (a failing probe costs its timeout).

    A pair outside `cut` that fails is probed once more with 2 s: a stall of the machine (seen here under
    load) can make one probe miss its 0.3 s; only a pair that should be cut may then still fail."""
    def probe(pair: str) -> bool:
        source, target = pair.split("->")
        if tcp_echo(bed, source, target, timeout=timeout):
            return True
        return pair not in cut and tcp_echo(bed, source, target, timeout=2.0)

    with ThreadPoolExecutor(len(ALL_PAIRS)) as pool:
        return dict(zip(ALL_PAIRS, pool.map(probe, ALL_PAIRS), strict=True))


def expected(cut: set[str]) -> dict[str, bool]:
    return {pair: pair not in cut for pair in ALL_PAIRS}


def steady(measure: Callable[[], list[float]], acceptable: Callable[[list[float]], bool]) -> list[float]:
    """The first of up to three measurements that is acceptable, else the third.

    A stall of the whole machine slows one measurement; a wrong netem slows all three."""
    for _ in range(2):
        result = measure()
        if acceptable(result):
            return result
    return measure()


def fast(round_trips: list[float]) -> bool:
    return len(round_trips) > 0 and statistics.median(round_trips) < 20


def udp_delivered(bed: NetBed, sender: str, receiver: str, count: int, settle: float = 1.0) -> int:
    """How many of `count` numbered datagrams from sender reach a socket on receiver.

    Waits until all arrived, or `settle` s after the last was sent."""
    inbox = bed.socket(receiver, socket.SOCK_DGRAM)
    outbox = bed.socket(sender, socket.SOCK_DGRAM)
    with inbox, outbox:
        inbox.bind((bed.address(receiver), 0))
        inbox.setblocking(False)
        received: set[int] = set()

        def drain(wait: float) -> None:
            deadline = time.monotonic() + wait
            while len(received) < count:
                ready, _, _ = select.select([inbox], [], [], max(0.0, deadline - time.monotonic()))
                if not ready:
                    return
                received.add(int(inbox.recv(100)))

        for number in range(count):
            outbox.sendto(str(number).encode(), inbox.getsockname())
            if number % 20 == 19:
                drain(0)
        drain(settle)
        return len(received)


def udp_round_trips(bed: NetBed, source: str, target: str, count: int = 12, spacing: float = 0.01,
                    timeout: float = 2.0) -> list[float]:
    """Round-trip times (ms) of numbered UDP probes from source to target's echo server, the answered ones."""
    sent: dict[int, float] = {}
    round_trips: list[float] = []
    with bed.socket(source, socket.SOCK_DGRAM) as probe:
        probe.connect((bed.address(target), ECHO_PORT))
        probe.setblocking(False)
        deadline = time.monotonic() + count * spacing + timeout
        next_send = time.monotonic()
        while len(round_trips) < count and time.monotonic() < deadline:
            if len(sent) < count and time.monotonic() >= next_send:
                sent[len(sent)] = time.monotonic()
                probe.send(str(len(sent) - 1).encode())
                next_send += spacing
            wake_at = next_send if len(sent) < count else deadline
            ready, _, _ = select.select([probe], [], [], max(0.0, wake_at - time.monotonic()))
            if ready:
                number = int(probe.recv(100))
                round_trips.append((time.monotonic() - sent[number]) * 1000)
    return round_trips


# ---------------------------------------------------------------------------------------- cuts


def test_hosts_exchange_tcp_and_a_cut_stops_both_directions(bed: NetBed) -> None:
    assert connectivity(bed, set()) == expected(set()), "hosts cannot talk before any cut"
    with bed.socket("a") as open_connection:
        open_connection.settimeout(2)
        open_connection.connect((bed.address("b"), ECHO_PORT))
        open_connection.sendall(b"before")
        assert open_connection.recv(100) == b"before"

        bed.cut("a", "b")
        assert connectivity(bed, {"a->b", "b->a"}) == expected({"a->b", "b->a"})
        open_connection.sendall(b"during")
        open_connection.settimeout(0.3)
        with pytest.raises(TimeoutError):
            open_connection.recv(100)  # an established connection is cut too

        bed.heal()
        assert connectivity(bed, set()) == expected(set()), "heal() did not restore a-b"
        open_connection.settimeout(5)  # TCP retransmits what was sent during the cut
        assert open_connection.recv(100) == b"during"


def test_one_way_cut_drops_only_that_direction(bed: NetBed) -> None:
    assert udp_delivered(bed, "a", "b", 20) == 20 and udp_delivered(bed, "b", "a", 20) == 20
    bed.cut("a", "b", one_way=True)
    assert udp_delivered(bed, "a", "b", 20, settle=0.3) == 0, "a -> b arrives after cut(a, b, one_way=True)"
    assert udp_delivered(bed, "b", "a", 20) == 20, "b -> a datagrams lost, though only a -> b was cut"
    assert not tcp_echo(bed, "b", "a"), "TCP b -> a works, though a's answers to b are dropped"
    assert udp_delivered(bed, "c", "b", 20) == 20 and udp_delivered(bed, "a", "c", 20) == 20
    bed.heal()
    assert udp_delivered(bed, "a", "b", 20) == 20, "heal() did not restore a -> b"


def test_cut_without_b_isolates_a_host(bed: NetBed) -> None:
    bed.cut("c")
    isolated = {"c->a", "a->c", "c->b", "b->c"}
    assert connectivity(bed, isolated) == expected(isolated)
    bed.heal()
    bed.cut("c", one_way=True)
    assert udp_delivered(bed, "c", "a", 20, settle=0.3) == 0
    assert udp_delivered(bed, "c", "b", 20, settle=0.3) == 0
    assert udp_delivered(bed, "a", "c", 20) == 20 and udp_delivered(bed, "b", "c", 20) == 20


# ---------------------------------------------------------------------------------------- netem


def test_netem_delays_both_directions_of_the_link_and_clear_restores(bed: NetBed) -> None:
    before = steady(lambda: udp_round_trips(bed, "a", "b"), fast)
    assert fast(before), f"a -> b round trips before any netem: {before}"
    bed.netem("a", delay_ms=200)

    # Each direction of a's link is delayed 200 ms: a round trip through it takes ~400 ms.
    def about_400(round_trips: list[float]) -> bool:
        return (len(round_trips) == 12 and 380 <= statistics.median(round_trips) <= 600
                and max(round_trips) - min(round_trips) < 60)

    from_a = steady(lambda: udp_round_trips(bed, "a", "b"), about_400)
    to_a = steady(lambda: udp_round_trips(bed, "b", "a"), about_400)
    elsewhere = steady(lambda: udp_round_trips(bed, "b", "c"), fast)
    assert len(from_a) == len(to_a) == 12, f"probes lost under a delay without loss: {from_a} {to_a}"
    assert 380 <= statistics.median(from_a) <= 600, f"a -> b round trips {from_a}"
    assert 380 <= statistics.median(to_a) <= 600, f"b -> a round trips {to_a}"
    assert max(from_a) - min(from_a) < 60, f"round trips spread without jitter: {from_a}"
    assert fast(elsewhere), f"b -> c slowed by a's netem: {elsewhere}"
    bed.clear_netem("a")
    after = steady(lambda: udp_round_trips(bed, "a", "b"), fast)
    assert fast(after), f"round trips still slow after clear_netem: {after}"


def test_netem_jitter_spreads_round_trips(bed: NetBed) -> None:
    bed.netem("a", delay_ms=100, jitter_ms=80)

    # Two independent delays of 20..180 ms each: round trips between ~40 and ~360 ms, widely spread.
    def jittered(round_trips: list[float]) -> bool:
        return (len(round_trips) == 40 and 25 <= min(round_trips) and max(round_trips) <= 450
                and max(round_trips) - min(round_trips) >= 100
                and 120 <= statistics.median(round_trips) <= 300)

    round_trips = steady(lambda: udp_round_trips(bed, "a", "b", count=40, spacing=0.005), jittered)
    assert len(round_trips) == 40
    assert 25 <= min(round_trips) and max(round_trips) <= 450, round_trips
    assert max(round_trips) - min(round_trips) >= 100, f"jitter 80 ms barely spreads: {round_trips}"
    assert 120 <= statistics.median(round_trips) <= 300, round_trips


def test_netem_delay_leaves_tcp_throughput_usable(bed: NetBed) -> None:
    # Held in the sender's own namespace, delayed packets count against TCP small queues and a 20 ms
    # link carries ~0.25 MB/s (2 MB in ~8 s); held in the hub it carries several MB/s.
    bed.netem("a", delay_ms=20)
    size = 2 << 20
    server = bed.socket("b")
    server.bind((bed.address("b"), 0))
    server.listen()
    with server, bed.socket("a") as sender, ThreadPoolExecutor(1) as pool:
        def receive() -> int:
            connection, _ = server.accept()
            with connection:
                connection.settimeout(10)
                total = 0
                while chunk := connection.recv(1 << 20):
                    total += len(chunk)
                return total

        received = pool.submit(receive)
        sender.settimeout(10)
        sender.connect(server.getsockname())
        begun = time.monotonic()
        sender.sendall(b"x" * size)
        sender.shutdown(socket.SHUT_WR)
        assert received.result(timeout=10) == size
        elapsed = time.monotonic() - begun
    assert elapsed < 2.5, f"2 MB over a 20 ms link took {elapsed:.1f} s"


def test_netem_loss_drops_a_plausible_fraction(bed: NetBed) -> None:
    bed.netem("a", delay_ms=0, loss_pct=50)
    sent = udp_delivered(bed, "a", "b", 200, settle=0.3)
    received = udp_delivered(bed, "b", "a", 200, settle=0.3)
    # Binomial(200, 0.5): 100 ± 7; 60..140 is ± 5.7 standard deviations.
    assert 60 <= sent <= 140, f"{sent} of 200 a -> b datagrams arrived under 50 % loss"
    assert 60 <= received <= 140, f"{received} of 200 b -> a datagrams arrived under 50 % loss"
    assert udp_delivered(bed, "b", "c", 200) == 200, "b -> c lost datagrams under a's netem"
    bed.clear_netem()
    assert udp_delivered(bed, "a", "b", 200) == 200, "datagrams still lost after clear_netem"


# ---------------------------------------------------------------------------------------- processes


def test_pause_resume_and_restart_in_the_same_namespace(bed: NetBed, tmp_path: Path) -> None:
    port = ECHO_PORT + 1
    echo = start_echo(bed, "c", tmp_path, port)
    try:
        wait_listening(bed, [echo], port)
        with bed.socket("a") as client:
            client.settimeout(2)
            client.connect((bed.address("c"), port))
            echo.pause()
            client.sendall(b"paused?")
            client.settimeout(0.3)
            with pytest.raises(TimeoutError):
                client.recv(100)
            echo.resume()
            client.settimeout(2)
            assert client.recv(100) == b"paused?", "no answer after resume"

        old_pid = echo.pid
        echo.restart(kill=True)
        assert echo.pid != old_pid and old_pid is not None and not pid_alive(old_pid)
        wait_listening(bed, [echo], port)
        assert tcp_echo(bed, "a", "c", timeout=2, port=port), f"restarted echo not answering: {echo.tail()}"
        echo.restart()
        wait_listening(bed, [echo], port)
        assert tcp_echo(bed, "b", "c", timeout=2, port=port), f"restarted echo not answering: {echo.tail()}"
    finally:
        echo.stop()


# ---------------------------------------------------------------------------------------- beds


def test_stop_kills_what_the_bed_started_and_deletes_its_namespaces(tmp_path: Path) -> None:
    require("network namespaces", *availability())
    bed = NetBed(["x", "y"], tmp_path)
    bed.start()
    try:
        namespaces = bed.namespaces
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
        assert all(name in listed for name in namespaces), listed
        assert (RECORD_DIR / f"{bed.bed_id}.json").exists()
        parent = bed.popen("x", ["sh", "-c", "sleep 60 & exec sleep 61"])  # leaves a child of its own
        paused = BedProcess(bed, "y", ["sleep", "62"], tmp_path / "paused.log")
        paused.start()
        paused.pause()
        assert bed.run("y", ["true"], timeout=10).returncode == 0
        time.sleep(0.1)
        pids = subprocess.run(["ip", "netns", "pids", bed.namespace("x")], capture_output=True, text=True,
                              timeout=10)
        inside = [int(pid) for pid in pids.stdout.split()]
        assert parent.pid in inside and len(inside) == 2, inside
    finally:
        bed.stop()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    assert not any(name in listed for name in namespaces), listed
    assert not any(pid_alive(pid) for pid in [*inside, paused.pid or 0]), "a bed's process survived stop()"
    assert parent.poll() is not None
    assert not (RECORD_DIR / f"{bed.bed_id}.json").exists()
    bed.stop()  # idempotent


def test_two_beds_coexist_without_clashing(bed: NetBed, tmp_path: Path) -> None:
    with NetBed(HOSTS, tmp_path) as other:
        assert not set(other.namespaces) & set(bed.namespaces)
        assert other.address("a") != bed.address("a")
        echo = start_echo(other, "b", tmp_path)
        wait_listening(other, [echo])
        other.cut("a", "b")
        assert not tcp_echo(other, "a", "b"), "the cut did not take in the second bed"
        assert tcp_echo(bed, "a", "b"), "a cut in the second bed reached the first"
        other.heal()
        assert tcp_echo(other, "a", "b")
    assert set(bed.namespaces) <= set(namespace_names()), "stopping the second bed removed the first's"
    assert tcp_echo(bed, "a", "b") and tcp_echo(bed, "c", "a")


CRASHING_OWNER = textwrap.dedent("""
    import json, sys, time
    sys.path.insert(0, sys.argv[1])
    from pathlib import Path
    from netbed import NetBed
    bed = NetBed(["s1", "s2"], Path(sys.argv[2]))
    bed.start()
    sleeper = bed.popen("s1", ["sleep", "60"])
    print(json.dumps({"namespaces": bed.namespaces, "bed_id": bed.bed_id, "sleeper": sleeper.pid}),
          flush=True)
    time.sleep(60)
""")


def test_a_dead_owners_bed_is_cleaned_and_a_live_ones_is_not(bed: NetBed, tmp_path: Path) -> None:
    owner = subprocess.Popen([PYTHON, "-c", CRASHING_OWNER, str(Path(__file__).parent), str(tmp_path)],
                             stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        assert owner.stdout is not None
        ready, _, _ = select.select([owner.stdout], [], [], 20)
        assert ready, "the owner process did not start its bed within 20 s"
        crashed = json.loads(owner.stdout.readline())
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait(10)
    assert set(crashed["namespaces"]) <= set(namespace_names()), "the crashed bed's namespaces vanished"
    assert pid_alive(crashed["sleeper"])
    unrecorded = f"tomq-{os.urandom(3).hex()}-orphan"  # named like a bed's, but nobody recorded it
    subprocess.run(["ip", "netns", "add", unrecorded], check=True, timeout=10)
    try:
        removed = clean_stale_beds()
        assert sorted(removed) == sorted(crashed["namespaces"]), removed
        assert not set(crashed["namespaces"]) & set(namespace_names())
        assert not pid_alive(crashed["sleeper"]), "a process inside the crashed bed survived the cleanup"
        assert not (RECORD_DIR / f"{crashed['bed_id']}.json").exists()
        assert unrecorded in namespace_names(), "a namespace without a record was deleted"
        assert set(bed.namespaces) <= set(namespace_names()), "the live bed's namespaces were deleted"
        assert tcp_echo(bed, "a", "b")
    finally:
        with contextlib.suppress(subprocess.SubprocessError):
            subprocess.run(["ip", "netns", "delete", unrecorded], timeout=10)


def test_bad_host_names_are_refused(tmp_path: Path) -> None:
    for hosts in ([], ["a", "a"], ["hub"], ["a b"], ["x" * 41]):
        with pytest.raises(ValueError):
            NetBed(hosts, tmp_path)
