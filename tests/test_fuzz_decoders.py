"""Fuzzing every decoder of bytes from outside (issue 9, item 4), bounded so that CI can afford it.

- A seeded, coverage-guided run of a fixed number of inputs per target (tests/fuzz_targets.py lists
  them): deterministic, so a failure here fails the same way again. A crash's input is saved as
  tests/fuzz_inputs/<target>/crash-<sha256[:16]>.bin and the failure names the file.
- Every saved input is replayed as its own test: a crash found once stays fixed (refused with the
  documented error), and an interesting input kept as a seed is still handled.
- The fuzzer itself can fail: a decoder with a planted bug is caught, its input saved and replayed; a
  hang is caught by the time limit; and coverage guidance finds what blind mutation does not.

`bash scripts/fuzz` runs the same targets for longer.
"""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path

import pytest

from fuzz_targets import SAVED_INPUTS, TARGETS
from fuzzing import ACCEPTED, CRASH, REFUSED, Fuzzer, Target, replay, saved_inputs

SEED = 9  # issue 9

# Inputs per target: one to two seconds each on a 2-core machine (the whole file takes about 20 s),
# and the same inputs on every run. Longer runs are `bash scripts/fuzz`.
RUNS = {
    "canonical": 4000,
    "envelope": 4000,
    "operator-request": 2000,
    "certificate": 4000,
    "raft-message": 4000,
    "raft-batch": 3000,
    "serial-frames": 500,
    "bridge-session": 500,
    "block-file": 3000,
    "ledger-bundle": 500,
    "ledger-reader": 400,
    "raft-storage": 1500,
}


def test_the_run_budgets_name_every_target() -> None:
    assert RUNS.keys() == TARGETS.keys()


@pytest.mark.parametrize("name", list(TARGETS))
def test_fuzzing_finds_no_crash(name: str, tmp_path: Path) -> None:
    target = TARGETS[name]
    saved = [path.read_bytes() for path in saved_inputs(SAVED_INPUTS, name)]
    fuzzer = Fuzzer(target, seed=SEED, crash_dir=tmp_path, extra_inputs=saved, minimise_budget=100)
    report = fuzzer.run(runs=RUNS[name], max_crashes=3)
    print(report.summary())
    messages = []
    for crash in report.crashes:
        assert crash.path is not None
        kept = SAVED_INPUTS / name / crash.path.name
        kept.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(crash.path, kept)
        messages.append(f"{crash.error}\n  input saved as {kept} (its replay is a test of this file)\n"
                        f"{crash.details}")
    assert not messages, f"fuzzing {name} ({target.description}) crashed:\n\n" + "\n\n".join(messages)
    assert report.tried + report.repeats == RUNS[name] or report.crashes
    assert report.edges > 0, "no coverage was recorded: the target's modules are not what runs"


@pytest.mark.parametrize("path", [pytest.param(path, id=f"{path.parent.name}/{path.name}")
                                  for path in sorted(SAVED_INPUTS.glob("*/*.bin"))])
def test_a_saved_input_is_handled_cleanly(path: Path) -> None:
    outcome, what = replay(TARGETS[path.parent.name], path.read_bytes())
    assert outcome != CRASH, f"{path} still crashes {path.parent.name}: {what}"
    if path.name.startswith("crash-"):  # a crash found before must now be refused, not accepted
        assert outcome == REFUSED, f"{path}: a crash input is now {outcome}"


def test_saved_inputs_belong_to_targets() -> None:
    folders = {path.name for path in SAVED_INPUTS.iterdir() if path.is_dir()}
    assert folders <= TARGETS.keys(), f"under {SAVED_INPUTS}, {folders - TARGETS.keys()} name no target"


@pytest.mark.parametrize("name", list(TARGETS))
def test_the_seeds_are_handled_and_the_fixups_leave_them_alone(name: str) -> None:
    """A seed corpus that no longer decodes (a format changed) would leave the fuzzer at the front door;
    a fixup that changes a valid input would re-sign with the wrong domain or key."""
    target = TARGETS[name]
    outcomes = [replay(target, seed) for seed in target.seeds()]
    assert all(outcome != CRASH for outcome, _ in outcomes), outcomes
    accepted = [seed for seed, (outcome, _) in zip(target.seeds(), outcomes, strict=True)
                if outcome == ACCEPTED]
    assert accepted, f"no seed of {name} is accepted: {outcomes}"
    if target.fixup is not None:
        for index, seed in enumerate(accepted):
            assert target.fixup(random.Random(index), seed) == seed, f"{name}: the fixup changed seed {index}"


# ------------------------------------------------------------------------------------------ the engine


def _trusting_count_decoder(data: bytes) -> list[int]:
    """A count-prefixed list of bytes with a planted bug: it trusts the count (IndexError on a short list)."""
    if not data:
        raise ValueError("empty input")
    return [data[1 + index] for index in range(data[0])]


PLANTED = Target("planted", _trusting_count_decoder, (ValueError,), lambda: [bytes([3, 7, 8, 9])],
                 (__name__,), cbor=False, description="a decoder with a planted IndexError")


def test_the_fuzzer_catches_a_planted_bug_saves_its_input_and_the_input_replays(tmp_path: Path) -> None:
    report = Fuzzer(PLANTED, seed=SEED, crash_dir=tmp_path).run(runs=2000)
    (crash,) = report.crashes
    assert crash.error.startswith("IndexError") and "_trusting_count_decoder" in crash.details
    assert crash.path is not None and crash.path.parent == tmp_path / "planted"
    assert crash.path.name.startswith("crash-") and crash.path.read_bytes() == crash.data
    assert len(crash.data) <= 2  # minimised: one count byte (and perhaps one item)
    outcome, what = replay(PLANTED, crash.path.read_bytes())
    assert outcome == CRASH and "IndexError" in what
    assert replay(PLANTED, bytes([1, 5]))[0] == ACCEPTED and replay(PLANTED, b"")[0] == REFUSED
    again = Fuzzer(PLANTED, seed=SEED, crash_dir=tmp_path / "again").run(runs=2000)
    assert [c.data for c in again.crashes] == [crash.data]  # the same seed, the same run


def _stuck_on_ff(data: bytes) -> None:
    while data[:1] == b"\xff":  # a decoder that never returns on one byte value
        pass
    if len(data) > 8:
        raise ValueError("too long")


def test_the_fuzzer_reports_a_hang(tmp_path: Path) -> None:
    target = Target("hang", _stuck_on_ff, (ValueError,), lambda: [b"\x00\x01"], (__name__,), cbor=False,
                    time_limit=0.2)
    started = time.perf_counter()
    report = Fuzzer(target, seed=SEED, crash_dir=tmp_path).run(runs=3000)
    assert [crash.error.split(":")[0] for crash in report.crashes] == ["hang"]
    assert report.crashes[0].data[:1] == b"\xff"
    assert time.perf_counter() - started < 10


def _three_magic_bytes(data: bytes) -> None:
    if len(data) < 3 or data[0] != 0xFF:
        raise ValueError("no")
    if data[1] != 0x80:
        raise ValueError("no")
    if data[2] != 0x7F:
        raise ValueError("no")
    raise IndexError("found the magic")


def test_coverage_guidance_finds_what_blind_mutation_does_not(tmp_path: Path) -> None:
    target = Target("magic", _three_magic_bytes, (ValueError,), lambda: [b"\x00\x00\x00"], (__name__,),
                    cbor=False)
    guided = Fuzzer(target, seed=SEED, crash_dir=tmp_path).run(runs=30_000)
    blind = Fuzzer(target, seed=SEED, crash_dir=tmp_path, coverage=False).run(runs=30_000)
    assert [crash.error for crash in guided.crashes] == ["IndexError: found the magic"]
    assert guided.corpus > 1 and guided.edges > 0
    assert not blind.crashes and blind.corpus == 1
