"""`tomq demo`: a whole cluster on this machine, end to end, with the commands an operator would type.

In one directory (a temporary one, or --keep DIR) it runs, as separate processes:

    tomq init DIR --nodes n1,n2,n3 --broker 127.0.0.1:<free port>    (writes the genesis block)
    tomq device add DIR --name <d> --role sensor|actuator             for every device of the scenario
    tomq broker DIR                                                   the embedded broker
    tomq node DIR --id nX --runtime auto --ledger-dir DIR/shared-ledger     three of them
    tomq deploy DIR DIR/specs/<service>.toml                          the scenario's services
    tomq actuator ... / tomq sensor ...                               the devices, logs in DIR/logs/

then shows the live view (view.py) for --duration seconds; with --chaos it SIGKILLs a node (the
leader when one is agreed) half-way and restarts it 5 s later. At the end it stops the devices with
SIGTERM (so they leave, and the ledger records it), removes the services, stops the nodes and the
broker, checks the shared ledger with `tomq ledger verify`, exports it as PROV when `tomq ledger
export` exists, and says where everything is. Ctrl-C (or SIGTERM) at any point goes straight to that
clean-up. Every child runs in its own process group, so a Ctrl-C at the terminal reaches the demo
alone and the children are stopped in order: devices before the nodes that record their leaving.

What this module must never do: signal a process it did not start (the service instances its nodes
started are found by the instance directory inside the demo's own directory), or delete a directory
it did not create (--keep DIR must be new or empty, and is never deleted).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO, Any

from tomq import canonical, records
from tomq.errors import TomqError, UsageError
from tomq.node.demo.scenarios import SCENARIOS, Scenario
from tomq.node.demo.view import ClusterWatcher, ViewState, render, setting_text, status_line
from tomq.node.ledger.block import decode_block_file
from tomq.ports import free_port

NODES = ("n1", "n2", "n3")
LEADER_TIMEOUT = 40.0  # seconds for the first leader: three Python processes starting on a small machine
CHAOS_RESTART_AFTER = 5.0
FRAME_SECONDS = 0.5  # the terminal view redraws at 2 Hz
STATUS_LINE_SECONDS = 5.0  # without a terminal, a compact line every 5 s keeps transcripts readable
LEAVE_TIMEOUT = 10.0
TOMQ = [sys.executable, "-m", "tomq"]


@dataclass(frozen=True, slots=True)
class DemoOptions:
    scenario: Scenario
    duration: float = 60.0
    chaos: bool = False
    keep: Path | None = None
    view: bool = True


class Abort(Exception):
    """The demo cannot go on (no leader): stop everything in order, check what is there, exit non-zero."""


class Interrupted(Abort):
    """Ctrl-C or SIGTERM: stop everything in order, then exit."""


class Child:
    """One process the demo started: its argv, its log, and only ever its own pid."""

    def __init__(self, name: str, argv: list[str], log_path: Path) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.reported_exit = False

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            # Its own process group: a Ctrl-C at the terminal reaches the demo, which stops it in order.
            self.process = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            env=dict(os.environ, PYTHONUNBUFFERED="1"), process_group=0)
        self.reported_exit = False

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        if self.running:
            assert self.process is not None
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def terminate(self) -> None:
        if self.running:
            assert self.process is not None
            self.process.terminate()

    def wait(self, timeout: float) -> None:
        """Wait for the exit after terminate(); SIGKILL what has not exited by then."""
        if self.process is None:
            return
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def available_commands() -> tuple[set[str], dict[str, argparse.ArgumentParser]]:
    """The `tomq` commands this installation has, and the `tomq ledger` actions (name -> parser)."""
    from tomq.cli import build_parser

    commands: set[str] = set()
    ledger: dict[str, argparse.ArgumentParser] = {}
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            commands = set(action.choices)
            ledger_parser = action.choices.get("ledger")
            for sub in (ledger_parser._actions if ledger_parser is not None else []):
                if isinstance(sub, argparse._SubParsersAction):
                    ledger = dict(sub.choices)
    return commands, ledger


class DemoRun:
    def __init__(self, options: DemoOptions, out: IO[str] | None = None) -> None:
        self.options = options
        self.scenario = options.scenario
        self.out = out if out is not None else sys.stdout
        self.tty = self.out.isatty() and options.view
        self.directory = Path()
        self.children: dict[str, Child] = {}
        self.devices: dict[str, Child] = {}
        self.watcher: ClusterWatcher | None = None
        self.problems: list[str] = []
        self.elected = False
        self.deployed: list[str] = []
        self.printed_events = 0
        self.drawing = False  # the terminal view is on screen (it shows the events itself)

    # -- output ------------------------------------------------------------------------------------

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def tomq(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*TOMQ, *args], capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, process_group=0)

    def step(self, *args: str, timeout: float = 120, quiet: bool = False) -> subprocess.CompletedProcess[str]:
        """Run one `tomq` command to completion, showing it and (unless quiet) what it printed."""
        self.say(f"$ tomq {' '.join(self._shown(a) for a in args)}")
        result = self.tomq(*args, timeout=timeout)
        text = (result.stdout + result.stderr).rstrip()
        if text and (not quiet or result.returncode != 0):
            self.say("\n".join(f"  {line}" for line in text.splitlines()))
        self._print_events()
        return result

    def _shown(self, arg: str) -> str:
        return arg.replace(str(self.directory), "DIR") if str(self.directory) not in ("", ".") else arg

    # -- the run -------------------------------------------------------------------------------------

    def run(self) -> int:
        interrupted = False
        previous = {s: signal.signal(s, self._interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self._make_directory()
            try:
                self._start()
                self._show()
            except Interrupted:
                interrupted = True
                self.say("\ninterrupted: stopping everything")
            except Abort:
                pass
            finally:
                # A second Ctrl-C must not cut the clean-up short: devices leave, nodes record it.
                for signum in previous:
                    signal.signal(signum, self._patience)
                self._stop()
            verified = self._finish()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        if interrupted:
            return 130
        return 0 if verified and self.elected and not self.problems else 1

    def _interrupt(self, signum: int, frame: FrameType | None) -> None:
        raise Interrupted()

    def _patience(self, signum: int, frame: FrameType | None) -> None:
        self.say("stopping, please wait (devices leave, services are removed, nodes stop)")

    def _make_directory(self) -> None:
        keep = self.options.keep
        if keep is None:
            self.directory = Path(tempfile.mkdtemp(prefix="tomq-demo-")).resolve()
            return
        keep = keep.resolve()
        if keep.exists() and (not keep.is_dir() or any(keep.iterdir())):
            raise UsageError(f"--keep {keep}: exists and is not an empty directory; tomq demo starts a new "
                             "cluster there (choose a new path)")
        keep.mkdir(parents=True, exist_ok=True)
        self.directory = keep

    def _start(self) -> None:
        directory = self.directory
        scenario = self.scenario
        port = free_port()
        (directory / "logs").mkdir(parents=True, exist_ok=True)
        self.say(f"tomq demo: {scenario.name}: {scenario.summary}")
        self.say(f"cluster directory {directory} (shown as DIR below)")
        name = f"{scenario.name}-{secrets.token_hex(2)}"  # instances and containers are labelled with it
        init = self.step("init", str(directory), "--nodes", ",".join(NODES), "--broker", f"127.0.0.1:{port}",
                         "--cluster", name, quiet=True)
        if init.returncode != 0:
            raise UsageError(f"tomq init failed: {init.stderr.strip()}")
        if not (directory / "genesis.block").exists():  # older `tomq init`s left it to `tomq ledger genesis`
            self.step("ledger", "genesis", str(directory), quiet=True)
        for device in scenario.devices:
            result = self.step("device", "add", str(directory), "--name", device.name, "--role", device.role,
                               quiet=True)
            if result.returncode != 0:
                raise UsageError(f"tomq device add {device.name} failed: {result.stderr.strip()}")

        from tomq.node.runtime.docker import docker_available

        if docker_available():
            # Nodes build the runtime image themselves when it is missing, before they join Raft;
            # building it once here, in the open, keeps three nodes from doing it at once.
            self.step("image", "build", timeout=900)
        self._spawn("broker", ["broker", str(directory)])
        self._wait_for_port(port, self.children["broker"])
        state = ViewState.new(name, scenario.name, NODES, [a.name for a in scenario.actuators])
        self.watcher = ClusterWatcher(directory, state)
        self.watcher.start(timeout=20)
        for node in NODES:
            self._spawn(node, self._node_argv(node))
        self._wait_for_leader()
        self._report_runtime()

        specs = directory / "specs"
        specs.mkdir(exist_ok=True)
        for service in scenario.services:
            path = specs / f"{service.name}.toml"
            path.write_text(service.spec)
            result = self.step("deploy", str(directory), str(path), "--wait", "45")
            if result.returncode == 0:
                self.deployed.append(service.name)
            else:
                self.problems.append(f"tomq deploy {service.name} failed")

        commands, _ = available_commands()
        # Actuators first: they listen for commands before the first reading can fire a contract.
        for device in (*scenario.actuators, *scenario.sensors):
            command = device.argv(str(directory))[0]
            if command not in commands:
                self.say(f"  (tomq {command} is not in this version of tomq: {device.name} does not run)")
                continue
            self.say(f"$ tomq {' '.join(self._shown(a) for a in device.argv(str(directory)))} "
                     f"> DIR/logs/{device.name}.log")
            self._spawn(device.name, device.argv(str(directory)), device=True)

    def _node_argv(self, node: str) -> list[str]:
        return ["node", str(self.directory), "--id", node, "--runtime", "auto", "--ledger-dir",
                str(self.directory / "shared-ledger")]

    def _spawn(self, name: str, args: list[str], device: bool = False) -> Child:
        if not device:
            self.say(f"$ tomq {' '.join(self._shown(a) for a in args)} > DIR/logs/{name}.log &")
        child = Child(name, [*TOMQ, *args], self.directory / "logs" / f"{name}.log")
        child.start()
        (self.devices if device else self.children)[name] = child
        return child

    def _wait_for_port(self, port: int, child: Child, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not child.running:
                raise UsageError(f"the broker exited before it listened on {port}:\n{child.tail()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
            time.sleep(0.1)
        raise UsageError(f"the broker did not listen on 127.0.0.1:{port} within {timeout:.0f} s")

    def _now_ms(self) -> int:
        return int(time.time() * 1000)

    def _view(self, function: Callable[[ViewState], Any]) -> Any:
        assert self.watcher is not None
        return self.watcher.locked(function)

    def _wait_for_leader(self) -> None:
        started = time.monotonic()
        while time.monotonic() - started < LEADER_TIMEOUT:
            leader, _ = self._view(lambda s: s.leader(self._now_ms()))
            self._print_events()
            if leader is not None:
                self.elected = True
                self.say(f"  (the first leader, {time.monotonic() - started:.1f} s after the nodes started)")
                return
            for node in NODES:
                child = self.children[node]
                if not child.running and not child.reported_exit:
                    child.reported_exit = True
                    self.say(f"  {node} exited with code {child.process.returncode if child.process else '?'}:\n"
                             f"{child.tail()}")
            time.sleep(0.2)
        self.say(f"no leader was elected within {LEADER_TIMEOUT:.0f} s; see {self.directory}/logs/n*.log")
        raise Abort()

    def _report_runtime(self) -> None:
        deadline = time.monotonic() + 5
        runtimes: dict[str, str | None] = {}
        while time.monotonic() < deadline:
            runtimes = self._view(lambda s: {n.name: n.runtime for n in s.nodes.values()})
            if all(runtimes.values()):
                break
            time.sleep(0.2)
        chosen = sorted({r for r in runtimes.values() if r})
        if chosen == ["process"]:
            self.say("runtime: process (no Docker engine answered)")
        elif chosen == ["docker"]:
            self.say("runtime: docker")
        else:
            self.say("runtime: " + (", ".join(f"{n} {r or 'unknown'}" for n, r in sorted(runtimes.items()))))

    # -- the live phase ------------------------------------------------------------------------------

    def _show(self) -> None:
        duration = self.options.duration
        started = time.monotonic()
        now_ms = self._now_ms()

        def begin(state: ViewState) -> None:
            state.started_ms = now_ms
            state.duration_s = duration

        self._view(begin)
        self.say(f"== live for {duration:g} s" + (" (with chaos half-way)" if self.options.chaos else "")
                 + ("" if self.tty else "; events as they happen" +
                    ("" if not self.options.view else f", a status line every {STATUS_LINE_SECONDS:g} s")))
        chaos_at = started + duration / 2 if self.options.chaos else None
        victim: Child | None = None
        restart_at: float | None = None
        next_line = started + STATUS_LINE_SECONDS
        if self.tty:
            self.out.write("\x1b[2J")
            self.drawing = True
        while True:
            now = time.monotonic()
            if now - started >= duration and restart_at is None:
                break
            if chaos_at is not None and now >= chaos_at:
                chaos_at = None
                victim = self._chaos_kill()
                restart_at = now + CHAOS_RESTART_AFTER
            if restart_at is not None and now >= restart_at and victim is not None:
                victim.start()
                self._note(f"chaos: restarted {victim.name}")
                restart_at = None
            self._watch_children()
            if self.tty:
                frame = self._view(self._frame)
                self.out.write("\x1b[H" + frame.replace("\n", "\x1b[K\n") + "\x1b[K\x1b[J")
                self.out.flush()
            else:
                self._print_events()
                if self.options.view and now >= next_line:
                    next_line = now + STATUS_LINE_SECONDS
                    self.say(self._view(lambda s: status_line(s, self._now_ms())))
            time.sleep(FRAME_SECONDS)
        self._print_events()
        if self.drawing:
            self.drawing = False
            self.say()
        elif self.options.view:
            self.say(self._view(lambda s: status_line(s, self._now_ms())))

    def _frame(self, state: ViewState) -> str:
        size = shutil.get_terminal_size((100, 40))
        return render(state, size.columns, self._now_ms(), height=size.lines - 1)  # the last line stays free

    def _note(self, text: str) -> None:
        assert self.watcher is not None
        self.watcher.note(text)

    def _print_events(self) -> None:
        """Print the events noted since the last call (the terminal view shows them itself)."""
        if self.watcher is None:
            return

        def new(state: ViewState) -> list[tuple[int, str]]:
            fresh = state.noted - self.printed_events
            self.printed_events = state.noted
            return list(state.events)[-fresh:] if fresh > 0 else []

        fresh = self._view(new)
        if self.drawing:
            return
        for at, text in fresh:
            self.say(f"{time.strftime('%H:%M:%S', time.localtime(at / 1000))} {text}")

    def _chaos_kill(self) -> Child:
        leader, term = self._view(lambda s: s.leader(self._now_ms()))
        name = leader if leader in NODES else NODES[0]
        victim = self.children[name]
        victim.kill()
        why = f"the leader, term {term}" if leader == name else "no leader agreed right now"
        self._note(f"chaos: SIGKILL {name} ({why}); it restarts in {CHAOS_RESTART_AFTER:g} s")
        victim.reported_exit = True
        return victim

    def _watch_children(self) -> None:
        for child in (*self.children.values(), *self.devices.values()):
            if child.process is not None and not child.running and not child.reported_exit:
                child.reported_exit = True
                self._note(f"{child.name} exited with code {child.process.returncode} "
                           f"(see DIR/logs/{child.log_path.name})")

    # -- stopping --------------------------------------------------------------------------------------

    def _stop(self) -> None:
        if self.drawing:  # interrupted while the view was on screen, with the events on it
            self._print_events()
            self.drawing = False
            self.say()
        if self.devices:
            self.say("== stopping the devices (SIGTERM: each leaves, and the ledger records it)")
            for child in self.devices.values():
                child.terminate()
            for child in self.devices.values():
                child.wait(10)
            self._wait_for_leaves()
        nodes_up = self.watcher is not None and any(self.children[n].running for n in NODES if n in self.children)
        if nodes_up:
            for service in reversed(self.deployed):
                self.step("remove", str(self.directory), service, "--wait", "20")
            self._wait_for_instances_to_stop()
        self.say("== stopping the nodes and the broker")
        for name in NODES:
            if name in self.children:
                self.children[name].terminate()
        for name in NODES:
            if name in self.children:
                self.children[name].wait(15)
        self._stop_leftover_instances()
        if self.watcher is not None:
            self._print_events()
            self.watcher.stop()
        broker = self.children.get("broker")
        if broker is not None:
            broker.terminate()
            broker.wait(10)

    def _wait_for_leaves(self) -> None:
        if self.watcher is None:
            return
        deadline = time.monotonic() + LEAVE_TIMEOUT
        while time.monotonic() < deadline:
            pending = self._view(lambda s: s.devices_joined - s.devices_left)
            self._print_events()
            if not pending:
                return
            time.sleep(0.2)
        self.say(f"  not recorded as left within {LEAVE_TIMEOUT:g} s: {', '.join(sorted(pending))}")

    def _wait_for_instances_to_stop(self) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            running = self._view(lambda s: [i for n in s.live_nodes(self._now_ms()) for i in n.instances])
            self._print_events()
            if not running:
                return
            time.sleep(0.3)

    def _stop_leftover_instances(self) -> None:
        """Instances outlive their node by design; the ones our nodes started are found and stopped."""
        marker = f"TOMQ_INSTANCE_DIR={self.directory}/".encode()
        leaders = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            with contextlib.suppress(OSError):
                environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
                if any(item.startswith(marker) for item in environ) and os.getpgid(int(entry)) == int(entry):
                    leaders.append(int(entry))
        for signum in (signal.SIGTERM, signal.SIGKILL):
            alive = [pid for pid in leaders if _alive(pid)]
            if not alive:
                break
            for pid in alive:
                with contextlib.suppress(OSError):
                    os.killpg(pid, signum)
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline and any(_alive(pid) for pid in alive):
                time.sleep(0.1)
        if leaders:
            self.say(f"  stopped {len(leaders)} service instance(s) the nodes left running")
        self._stop_leftover_containers()

    def _stop_leftover_containers(self) -> None:
        runtimes = self._view(lambda s: {n.runtime for n in s.nodes.values()}) if self.watcher else set()
        if "docker" not in runtimes:
            return
        try:
            import docker

            client = docker.from_env()
            name = self._view(lambda s: s.cluster)
            for container in client.containers.list(all=True, filters={"label": f"tomq.cluster={name}"}):
                container.remove(force=True)
            client.close()
        except Exception as exc:  # the engine went away: nothing more we can do from here
            self.say(f"  could not remove leftover containers: {exc}")

    # -- after -------------------------------------------------------------------------------------------

    def _finish(self) -> bool:
        directory = self.directory
        ledger_dir = directory / "shared-ledger"
        if not (directory / "operator" / "operator.pub").exists():
            return False
        if not ledger_dir.is_dir():
            self.say(f"no ledger was written (stopped before the nodes ran); cluster directory {directory}")
            return False
        self.say("== the ledger, checked offline with only the operator's public key")
        verify = self.step("ledger", "verify", str(ledger_dir), "--operator-key",
                           str(directory / "operator" / "operator.pub"))
        verified = verify.returncode == 0
        try:
            for line in ledger_summary(ledger_dir, [d.name for d in self.scenario.devices]):
                self.say(f"  {line}")
        except TomqError as exc:  # verify has said what is wrong; the summary cannot read it either
            self.say(f"  (no summary: {exc})")
        self._export(ledger_dir)
        if self.problems:
            self.say("problems: " + "; ".join(self.problems))
        keep = self.options.keep is not None or not verified or not self.elected or bool(self.problems)
        if keep:
            self.say(f"ledger: {ledger_dir}")
            self.say(f"logs: {directory / 'logs'}; cluster directory: {directory}")
        else:
            shutil.rmtree(directory, ignore_errors=True)
            self.say(f"removed {directory} (use --keep DIR to keep the cluster, its ledger and logs)")
        return verified

    def _export(self, ledger_dir: Path) -> None:
        _, ledger_actions = available_commands()
        export = ledger_actions.get("export")
        if export is None:
            self.say("  PROV export: not available yet (this tomq has no `tomq ledger export`)")
            return
        options = {o for action in export._actions for o in action.option_strings}
        target = self.directory / "ledger.prov.json"
        args = ["ledger", "export", str(ledger_dir), "--format", "prov-json"]
        if "--operator-key" in options:
            args += ["--operator-key", str(self.directory / "operator" / "operator.pub")]
        for flag in ("--output", "--out", "-o"):
            if flag in options:
                args += [flag, str(target)]
                result = self.step(*args, quiet=True)
                break
        else:
            self.say(f"$ tomq {' '.join(self._shown(a) for a in args)} > {self._shown(str(target))}")
            result = self.tomq(*args)
            if result.returncode == 0:
                target.write_text(result.stdout)
        if result.returncode == 0:
            self.say(f"  PROV-JSON written to {target}")
        else:
            self.say(f"  PROV export failed: {(result.stderr or result.stdout).strip()[:300]}")


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2:].split()[0] not in ("Z", "X")


def ledger_records(ledger_dir: Path) -> Iterator[tuple[int, records.Record]]:
    """(height, record) of every record in a ledger directory's block files, in order."""
    for path in sorted(ledger_dir.glob("*.block"), key=lambda p: int(p.stem) if p.stem.isdigit() else -1):
        block = decode_block_file(path.read_bytes()).block
        for envelope in block.records:
            fields = canonical.decode(canonical.decode(envelope)[0], check_canonical=False)
            with contextlib.suppress(Exception):
                yield block.height, records.from_map(fields["body"])


def ledger_summary(ledger_dir: Path, devices: list[str]) -> list[str]:
    """What the scenario left on the ledger, in a few lines: devices in and out, commands, results."""
    joined: list[str] = []
    left: list[str] = []
    commands: Counter[str] = Counter()
    results = readings = 0
    for _, record in ledger_records(ledger_dir):
        structure = record.structure
        if isinstance(structure, records.Identity) and structure.kind == "device":
            (joined if record.state == records.ID_CREATE else left).append(structure.object)
        elif isinstance(structure, records.Orchestrate) and structure.action == "command":
            commands[f"{structure.location} {setting_text(structure.reason.get('setting'))}"] += 1
        elif isinstance(structure, records.Provenance):
            if structure.data.startswith("result:"):
                results += 1
            elif structure.data.startswith("reading:"):
                readings += 1
    lines = [f"devices joined: {', '.join(joined) or 'none'}",
             f"devices left: {', '.join(left) or 'none'}",
             f"readings recorded: {readings}; analyser results: {results}"]
    missing = [d for d in devices if d not in joined]
    if missing:
        lines.append(f"never joined: {', '.join(missing)}")
    if commands:
        lines.append("commands: " + ", ".join(f"{what} ×{n}" for what, n in sorted(commands.items())))
    return lines


def run_demo(options: DemoOptions, out: IO[str] | None = None) -> int:
    return DemoRun(options, out).run()


def scenario_named(name: str) -> Scenario:
    try:
        return SCENARIOS[name]
    except KeyError:
        raise UsageError(f"no scenario {name!r}; choose one of {', '.join(SCENARIOS)}") from None


__all__ = ["DemoOptions", "DemoRun", "ledger_records", "ledger_summary", "run_demo", "scenario_named"]
