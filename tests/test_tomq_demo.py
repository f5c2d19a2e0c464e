"""`tomq demo` end to end: one command, the embedded broker, three nodes, services, devices, verify.

It runs as a user would run it (`python -m tomq demo ... --no-view --keep DIR`), then reads the
ledger it left in DIR/shared-ledger, checked again here with only the operator's public key: every
device joined (PROV-ID-create) and left (PROV-ID-delete) on its own, the cars' readings and the
analyser's results are PROV-DATA, and the traffic contracts commanded the lights (PROV-ORCH). Nothing
the demo started may outlive it.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tomq.identity import PublicKey
from tomq.node.demo.run import ledger_records
from tomq.node.demo.scenarios import SCENARIOS
from tomq.node.ledger.verify import verify_ledger
from tomq.records import DATA, ID_CREATE, ID_DELETE, ORCH, Identity, Orchestrate, Provenance, Record

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "demo"


def run_demo(directory: Path, *args: str, timeout: float = 200, script: bool = False) -> subprocess.CompletedProcess[str]:
    # script=True: exactly the README's first command (scripts/demo), which installs then runs `tomq demo`.
    command = ["bash", str(SCRIPT)] if script else [sys.executable, "-m", "tomq", "demo"]
    result = subprocess.run([*command, "--no-view", "--keep", str(directory), *args],
                            capture_output=True, text=True, timeout=timeout)
    leftovers = subprocess.run(["pgrep", "-af", str(directory)], capture_output=True, text=True)
    assert leftovers.stdout.strip() == "", f"processes left running: {leftovers.stdout}"
    return result


def verified_records(directory: Path) -> list[tuple[int, Record]]:
    operator = PublicKey.from_hex((directory / "operator" / "operator.pub").read_text().strip())
    verify_ledger(directory / "shared-ledger", operator)  # raises LedgerInvalid naming the first bad height
    return list(ledger_records(directory / "shared-ledger"))


def recorded_until_they_left(recorded: list[tuple[int, Record]], devices: set[str]) -> dict[str, float]:
    """Per device: seconds between its last recorded reading and its leave (both on the ledger)."""
    last_reading: dict[str, int] = {}
    left_at: dict[str, int] = {}
    for _, record in recorded:
        structure = record.structure
        if isinstance(structure, Provenance) and structure.data.startswith("reading:") and structure.source:
            last_reading[structure.source] = max(last_reading.get(structure.source, 0), record.time_ms)
        elif isinstance(structure, Identity) and record.state == ID_DELETE:
            left_at[structure.object] = record.time_ms
    return {d: (left_at[d] - last_reading[d]) / 1000 for d in devices if d in left_at and d in last_reading}


def explain(result: subprocess.CompletedProcess[str], directory: Path) -> str:
    logs = []
    for log in sorted((directory / "logs").glob("*.log")):
        lines = log.read_text(errors="replace").splitlines()[-8:]
        logs.append(f"--- {log.name}\n" + "\n".join(lines))
    return result.stdout[-6000:] + result.stderr[-3000:] + "\n" + "\n".join(logs)[-8000:]


@pytest.mark.slow
def test_the_smart_city_demo_records_devices_data_and_commands_and_stops_everything(tmp_path: Path):
    directory = tmp_path / "demo"
    result = run_demo(directory, "--duration", "25", script=True)
    assert result.returncode == 0, explain(result, directory)
    out = result.stdout
    assert "ledger ok:" in out
    assert "runtime: process (no Docker engine answered)" in out or "runtime: docker" in out
    assert "$ tomq deploy DIR DIR/specs/analyser.toml" in out and "analyser:0 on n" in out
    assert f"ledger: {directory / 'shared-ledger'}" in out

    scenario = SCENARIOS["smart-city"]
    devices = {d.name for d in scenario.devices}
    recorded = verified_records(directory)
    joined = {r.structure.object for _, r in recorded
              if r.state == ID_CREATE and isinstance(r.structure, Identity) and r.structure.kind == "device"}
    left = {r.structure.object for _, r in recorded
            if r.state == ID_DELETE and isinstance(r.structure, Identity) and r.structure.kind == "device"}
    assert joined == devices, explain(result, directory)
    assert left == devices, "every device left gracefully on SIGTERM\n" + explain(result, directory)
    readings = {r.structure.source for _, r in recorded
                if r.state == DATA and isinstance(r.structure, Provenance) and r.structure.data.startswith("reading:")}
    assert {f"car-{i}" for i in range(1, 7)} <= readings
    cars = {d.name for d in scenario.sensors}  # an actuator reports only when it changes
    gaps = recorded_until_they_left(recorded, cars)
    assert len(gaps) == 6 and all(gap < 5 for gap in gaps.values()), f"readings stopped early: {gaps}"
    results = [r for _, r in recorded
               if r.state == DATA and isinstance(r.structure, Provenance) and r.structure.data.startswith("result:")]
    assert results, "the analyser recorded results"
    commands = [r.structure for _, r in recorded
                if r.state == ORCH and isinstance(r.structure, Orchestrate) and r.structure.action == "command"]
    assert commands and {c.location for c in commands} <= {"tl-j1", "tl-j2"}, explain(result, directory)
    assert all(c.reason["setting"] in ({"colour": "green"}, {"colour": "red"}) for c in commands)
    # Every light change the actuator made names a PROV-ORCH command record that was already on the
    # ledger (its height, its id, its setting), and the light's report of it was recorded after it.
    by_id = {c.deployed: (height, record) for height, record in recorded
             if isinstance(c := record.structure, Orchestrate) and c.action == "command"}
    changes = 0
    for light in ("tl-j1", "tl-j2"):
        reports = sorted((height, r.time_ms) for height, r in recorded
                         if r.state == DATA and isinstance(r.structure, Provenance) and r.structure.source == light)
        for line in (directory / "logs" / f"{light}.log").read_text().splitlines():
            match = re.fullmatch(rf"{light} (\w+) \(command (\S+), height (\d+)\)", line)
            if not match:
                continue
            changes += 1
            colour, command_id, height = match.group(1), match.group(2), int(match.group(3))
            assert command_id in by_id, f"{light} acted on {command_id}, which is not on the ledger"
            recorded_height, record = by_id[command_id]
            assert recorded_height == height and record.structure.location == light
            assert record.structure.reason["setting"] == {"colour": colour}
            assert any(h > height and t >= record.time_ms for h, t in reports), \
                f"no report of {light} recorded after the command at height {height}"
    assert changes >= 1, "the lights changed at least once"
    # what the demo said at the end agrees with the ledger
    assert "devices joined: " in out and "never joined" not in out
    assert "commands: tl-j" in out


@pytest.mark.slow
def test_chaos_kills_the_leader_half_way_and_the_ledger_still_verifies(tmp_path: Path):
    directory = tmp_path / "chaos"
    result = run_demo(directory, "--duration", "20", "--chaos", "--scenario", "logistics")
    assert result.returncode == 0, explain(result, directory)
    out = result.stdout
    assert "ledger ok:" in out
    killed = next(line for line in out.splitlines() if "chaos: SIGKILL" in line)
    assert "(the leader, term" in killed, killed
    victim = killed.split("chaos: SIGKILL ")[1].split()[0]
    after = out[out.index(killed):]
    assert f"chaos: restarted {victim}" in after
    assert " leader n" in after, "a new leader was elected after the kill:\n" + out  # the event line
    recorded = verified_records(directory)
    readers = {r.structure.source for _, r in recorded
               if r.state == DATA and isinstance(r.structure, Provenance) and r.structure.data.startswith("reading:")}
    assert readers == {"rfid-1", "rfid-2", "rfid-3"}, explain(result, directory)
    # ... and kept being recorded after the kill, until each reader left: a service that was on the
    # killed node runs elsewhere and takes the data over
    gaps = recorded_until_they_left(recorded, readers)
    assert len(gaps) == 3 and all(gap < 5 for gap in gaps.values()), f"{gaps}\n" + explain(result, directory)


def test_a_kept_directory_must_be_new(tmp_path: Path):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "something").write_text("mine")
    result = subprocess.run([sys.executable, "-m", "tomq", "demo", "--keep", str(tmp_path / "used")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "not an empty directory" in result.stderr
    assert (tmp_path / "used" / "something").read_text() == "mine"
