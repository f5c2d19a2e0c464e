"""The README's first command runs a real cluster end to end; this runs the same script."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "demo_cluster.py"


def test_the_demo_commits_verifies_and_stops_everything(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "demo")], capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "200 signed readings committed" in result.stdout and "missing" not in result.stdout
    assert "ledger ok:" in result.stdout and "PROV-DATA 200" in result.stdout
    assert "leader n" in result.stdout  # tomq status agreed on a leader
    leftovers = subprocess.run(["pgrep", "-f", str(tmp_path / "demo")], capture_output=True, text=True)
    assert leftovers.stdout.strip() == "", f"processes left running: {leftovers.stdout}"
