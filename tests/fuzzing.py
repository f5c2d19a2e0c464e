"""A small coverage-guided fuzzer for decoders of bytes from outside (issue 9, item 4).

Why: property tests try the inputs someone thought of. Every decoder here promises one documented
error type "whatever the bytes", and the cheapest way to hold it to that is to throw many near-valid
inputs at it, keeping the ones that make it do something new.

How, per target (see `Target`):

1. Start from a corpus of valid encodings (built in code from real keys), plus every saved input.
2. Mutate a corpus entry: byte-level (bit flips, interesting bytes, insert, delete, duplicate,
   truncate, CBOR heads with huge lengths or indefinite markers, dictionary tokens, splicing with
   another entry), CBOR-structure-aware (decode with cbor2, descend also into byte strings that hold
   CBOR, change a value's type or size, drop or add map keys, nest deeply, then re-encode) and the
   target's own mutators. Then, half the time, the target's fixup repairs what a mutation breaks
   first (a signature, a CRC), so that mutations reach the code behind those checks.
3. Run the decoder under `sys.settrace`, recording line-to-line edges in the target's own modules
   only; an input that reaches a new edge joins the corpus.
4. Classify: accepted (returned), refused (raised one of the target's documented errors) or crash
   (anything else, a refusal whose message is not one line, more than `time_limit` seconds, or a
   jump of the peak RSS by more than `memory_limit_mb`). A crash's input is written to
   `<crash_dir>/<target>/crash-<sha256[:16]>.bin`, after a cheap minimisation.

Deterministic: with a run budget (`runs=`) a seed always yields the same inputs in the same order,
as coverage is a function of the code. A time budget (`seconds=`, for long runs) is not.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import math
import random
import resource
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import CodeType, FrameType
from typing import Any

import cbor2

ACCEPTED, REFUSED, CRASH = "accepted", "refused", "crash"

Mutator = Callable[[random.Random, bytes], bytes | None]


class Refused(Exception):
    """Raised by a harness whose decoder refuses through its return value (a Fault, a counter)."""


class InputTimedOut(BaseException):
    """The per-input time limit passed. A BaseException, so that no `except Exception` in a decoder
    can swallow it."""


@dataclass(frozen=True)
class Target:
    """One decoder of bytes from outside, and what the fuzzer needs to know about it.

    `run(data)` feeds the decoder; returning means accepted. It may check properties of what it
    accepted with `assert` (an AssertionError is a crash). `refusals` are the documented errors.
    """

    name: str
    run: Callable[[bytes], object]
    refusals: tuple[type[BaseException], ...]
    seeds: Callable[[], Sequence[bytes]]  # valid encodings; built lazily, when a fuzzer starts
    modules: tuple[str, ...]  # modules whose lines are the coverage signal
    mutators: tuple[Mutator, ...] = ()  # structure-aware mutators of this format
    # Repairs signatures and checksums after a mutation; the random source lets it repair only some.
    fixup: Callable[[random.Random, bytes], bytes] | None = None
    fixup_chance: float = 0.5
    cbor: bool = True  # the whole input is CBOR, so the generic CBOR mutations apply
    byte_level: bool = True  # byte-level mutations of the whole input make sense (not of a harness's framing)
    max_bytes: int = 64 * 1024
    time_limit: float = 2.0  # seconds per input; generous, as CI machines are slow and shared
    description: str = ""


@dataclass(frozen=True)
class Crash:
    target: str
    error: str  # "ExceptionType: first line of the message", or what limit the input broke
    details: str  # the traceback, for the failure message
    data: bytes
    path: Path | None = None  # where the input was saved


@dataclass
class Report:
    target: str
    tried: int = 0  # inputs run
    repeats: int = 0  # mutations that gave an input already tried, not run again
    accepted: int = 0
    refused: int = 0
    crashes: list[Crash] = field(default_factory=list)
    corpus: int = 0
    lines: int = 0
    edges: int = 0
    seconds: float = 0.0

    @property
    def per_second(self) -> float:
        return self.tried / self.seconds if self.seconds else 0.0

    def summary(self) -> str:
        return (f"{self.target}: {self.tried} inputs ({self.per_second:.0f}/s), {self.refused} refused, "
                f"{self.accepted} accepted, corpus {self.corpus}, {self.lines} lines / {self.edges} edges "
                f"covered, {len(self.crashes)} crash(es)")


@dataclass(frozen=True)
class _Outcome:
    kind: str  # ACCEPTED, REFUSED or CRASH
    error: str = ""
    details: str = ""
    where: str = ""  # file:line of the innermost frame of a crash's exception

    @property
    def signature(self) -> str:
        """What identifies "the same crash" (while minimising, and to report each bug once)."""
        return f"{self.kind}|{self.error.split(':')[0]}|{self.where}"


def crash_file(crash_dir: Path, target: str, data: bytes) -> Path:
    return crash_dir / target / f"crash-{hashlib.sha256(data).hexdigest()[:16]}.bin"


def saved_inputs(directory: Path, target: str) -> list[Path]:
    """Every saved input of `target` (crashes found before, interesting seeds), in name order."""
    folder = directory / target
    return sorted(folder.glob("*.bin")) if folder.is_dir() else []


# ------------------------------------------------------------------------------------------ running inputs


class _EdgeTracer:
    """Line-to-line edges of the functions defined in `files`, via sys.settrace (Python 3.11 has no
    sys.monitoring). Frames of every other file are not traced at all, which keeps the cost down."""

    def __init__(self, files: set[str]) -> None:
        self.files = files
        self.edges: set[tuple[int, int, int]] = set()
        self.code_files: dict[int, str] = {}

    def on_call(self, frame: FrameType, event: str, arg: Any) -> Callable[..., Any] | None:
        code: CodeType = frame.f_code
        if code.co_filename not in self.files:
            return None
        code_id = id(code)
        self.code_files[code_id] = code.co_filename
        add = self.edges.add
        last = -1

        def on_line(frame: FrameType, event: str, arg: Any) -> Callable[..., Any]:
            nonlocal last
            if event == "line":
                line = frame.f_lineno
                add((code_id, last, line))
                last = line
            return on_line

        return on_line


def _module_files(modules: Sequence[str]) -> set[str]:
    import importlib

    files = set()
    for name in modules:
        module_file = importlib.import_module(name).__file__
        assert module_file is not None, name
        files.add(module_file)
    return files


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class _Runner:
    """Runs one input of one target and classifies what happened."""

    def __init__(self, target: Target, *, memory_limit_mb: float = 256) -> None:
        self.target = target
        self.memory_limit_mb = memory_limit_mb
        self._alarm = threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
        self._armed = False

    def __enter__(self) -> _Runner:
        if self._alarm:
            self._previous = signal.signal(signal.SIGALRM, self._on_alarm)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self._previous)

    def _on_alarm(self, signum: int, frame: FrameType | None) -> None:
        if self._armed:
            raise InputTimedOut()

    def run(self, data: bytes, tracer: _EdgeTracer | None = None) -> _Outcome:
        target = self.target
        peak_before = _peak_rss_mb()
        previous_trace = sys.gettrace()
        started = time.perf_counter()
        outcome = _Outcome(ACCEPTED)
        try:
            try:
                if self._alarm:
                    self._armed = True
                    signal.setitimer(signal.ITIMER_REAL, target.time_limit)
                if tracer is not None:
                    sys.settrace(tracer.on_call)
                target.run(data)
            finally:
                if tracer is not None:
                    sys.settrace(previous_trace)
                self._armed = False
                if self._alarm:
                    signal.setitimer(signal.ITIMER_REAL, 0)
        except target.refusals as exc:
            message = str(exc)
            if "\n" in message:  # errors.py: every message is one line an operator can act on
                outcome = _Outcome(CRASH, f"{type(exc).__name__} message is not one line: {message[:120]!r}",
                                   _traceback_text(exc), _where(exc))
            else:
                outcome = _Outcome(REFUSED)
        except InputTimedOut as exc:
            outcome = _Outcome(CRASH, f"hang: no answer within {target.time_limit} s", _traceback_text(exc))
        except Exception as exc:
            outcome = _Outcome(CRASH, f"{type(exc).__name__}: {_first_line(exc)}", _traceback_text(exc),
                               _where(exc))
        if tracer is not None:  # again: the alarm may have cut the `finally` above short
            sys.settrace(previous_trace)
        self._armed = False
        elapsed = time.perf_counter() - started
        if outcome.kind != CRASH and elapsed > target.time_limit:
            outcome = _Outcome(CRASH, f"hang: took {elapsed:.2f} s, the limit is {target.time_limit} s")
        grown = _peak_rss_mb() - peak_before
        if outcome.kind != CRASH and grown > self.memory_limit_mb:
            outcome = _Outcome(CRASH, f"memory: peak RSS grew by {grown:.0f} MiB on one input")
        return outcome


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return (text.splitlines()[0] if text else "")[:200]


def _where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else ""


def _traceback_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__, limit=-8))


@contextlib.contextmanager
def _quiet_logging() -> Iterator[None]:
    """Decoders log what they refuse; thousands of refusals a second would drown the output."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def replay(target: Target, data: bytes) -> tuple[str, str]:
    """Run one input as the fuzzer would (no coverage): (ACCEPTED | REFUSED | CRASH, what crashed)."""
    with _Runner(target) as runner, _quiet_logging():
        outcome = runner.run(data)
    return outcome.kind, f"{outcome.error}\n{outcome.details}".strip()


# ------------------------------------------------------------------------------------------ the fuzzer


class Fuzzer:
    """Coverage-guided mutation fuzzing of one target; `run` for a bounded number of inputs or time."""

    def __init__(self, target: Target, *, seed: int = 0, crash_dir: Path | None = None,
                 extra_inputs: Sequence[bytes] = (), coverage: bool = True, memory_limit_mb: float = 256,
                 minimise_budget: int = 300) -> None:
        self.target = target
        self.rng = random.Random(f"tomq-fuzz/{seed}/{target.name}")
        self.crash_dir = crash_dir
        self.coverage = coverage
        self.memory_limit_mb = memory_limit_mb
        self.minimise_budget = minimise_budget
        self.files = _module_files(target.modules) if coverage else set()
        self.seeds = [bytes(seed_input) for seed_input in target.seeds()]
        self.corpus: list[bytes] = []
        self.edges: set[tuple[int, int, int]] = set()
        self.code_files: dict[int, str] = {}
        self.tried_digests: set[bytes] = set()
        self.dictionary = Dictionary.from_inputs([*self.seeds, *extra_inputs] if target.cbor else [])
        self.mutations = Mutations(self.dictionary, target)
        self.report = Report(target.name)
        self._crash_signatures: set[str] = set()
        self._initial = [*self.seeds, *extra_inputs]

    def run(self, *, runs: int | None = None, seconds: float | None = None, max_crashes: int = 1) -> Report:
        """Fuzz until `runs` inputs (seeds and repeats included) or `seconds` have gone, or `max_crashes`
        distinct crashes were found."""
        if runs is None and seconds is None:
            raise ValueError("give a budget: runs, seconds or both")
        started = time.perf_counter()
        deadline = started + seconds if seconds is not None else math.inf
        limit = runs if runs is not None else sys.maxsize
        with _Runner(self.target, memory_limit_mb=self.memory_limit_mb) as runner, _quiet_logging():
            pending = list(self._initial)
            while self.report.tried + self.report.repeats < limit and time.perf_counter() < deadline:
                if len(self.report.crashes) >= max_crashes:
                    break
                if pending:
                    data, is_initial = pending.pop(0), True
                else:
                    data, is_initial = self._next_input(), False
                    digest = hashlib.blake2b(data, digest_size=8).digest()
                    if digest in self.tried_digests:
                        self.report.repeats += 1  # not run again, but spends budget: a run always ends
                        continue
                    if len(self.tried_digests) < 2_000_000:
                        self.tried_digests.add(digest)
                self._execute(runner, data, keep=is_initial)
        self.report.seconds = time.perf_counter() - started
        self.report.corpus = len(self.corpus)
        self.report.edges = len(self.edges)
        self.report.lines = len({(code_id, line) for code_id, _, line in self.edges})
        return self.report

    def _execute(self, runner: _Runner, data: bytes, *, keep: bool) -> None:
        tracer = _EdgeTracer(self.files) if self.coverage else None
        outcome = runner.run(data, tracer)
        self.report.tried += 1
        if outcome.kind == ACCEPTED:
            self.report.accepted += 1
        elif outcome.kind == REFUSED:
            self.report.refused += 1
        else:
            self._crashed(runner, data, outcome)
            return
        new = tracer.edges - self.edges if tracer is not None else set()
        if new:
            self.edges |= new
            assert tracer is not None
            self.code_files.update(tracer.code_files)
        if keep or new:
            self.corpus.append(data)

    def _crashed(self, runner: _Runner, data: bytes, outcome: _Outcome) -> None:
        if outcome.signature in self._crash_signatures:
            return
        self._crash_signatures.add(outcome.signature)
        if not outcome.error.startswith(("hang", "memory")):  # each attempt would cost the limit again
            data = self._minimise(runner, data, outcome.signature)
        path = None
        if self.crash_dir is not None:
            path = crash_file(self.crash_dir, self.target.name, data)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        self.report.crashes.append(Crash(self.target.name, outcome.error, outcome.details, data, path))

    def _minimise(self, runner: _Runner, data: bytes, signature: str) -> bytes:
        """Remove chunks (halving their size) while the same crash still happens; bounded by a budget.
        Inputs behind a signature rarely shrink, which is fine: the point is a readable repro when it can."""
        budget = self.minimise_budget
        chunk = max(1, len(data) // 2)
        while chunk >= 1 and budget > 0:
            start = 0
            while start < len(data) and budget > 0:
                candidate = data[:start] + data[start + chunk:]
                budget -= 1
                if candidate and runner.run(candidate).signature == signature:
                    data = candidate
                else:
                    start += chunk
            chunk //= 2
        return data

    def _parent(self) -> bytes:
        """A corpus entry to mutate: any, or (a third of the time) one of the latest finds, which are
        the likeliest to lead further, as in AFL's favouring of new paths."""
        if self.rng.random() < 0.33:
            back = min(len(self.corpus) - 1, int(self.rng.expovariate(0.5)))
            return self.corpus[-1 - back]
        return self.rng.choice(self.corpus)

    def _next_input(self) -> bytes:
        rng = self.rng
        data = self._parent() if self.corpus else b""
        for _ in range(rng.choice((1, 1, 1, 2, 2, 3, 4, 6))):
            mutated = self.mutations.apply(rng, data, self.corpus)
            if mutated is not None:
                data = mutated
        if self.target.fixup is not None and rng.random() < self.target.fixup_chance:
            try:
                data = self.target.fixup(rng, data)
            except Exception:  # a fixup that cannot make sense of the input leaves it as it is
                pass
        return data[: self.target.max_bytes]


# ------------------------------------------------------------------------------------------ mutations


INTERESTING_BYTES = (0x00, 0x01, 0x17, 0x18, 0x19, 0x1A, 0x1B, 0x1F, 0x20, 0x3F, 0x40, 0x5F, 0x60, 0x7F, 0x80,
                     0x9F, 0xA0, 0xBF, 0xC0, 0xC2, 0xD8, 0xF4, 0xF5, 0xF6, 0xF7, 0xF9, 0xFA, 0xFB, 0xFF)
# CBOR heads that stress a decoder: 8-byte lengths near the top of the range, indefinite lengths,
# tags, undefined, simple values and the three float widths.
CBOR_HEADS = (b"\x1b\xff\xff\xff\xff\xff\xff\xff\xff", b"\x3b\xff\xff\xff\xff\xff\xff\xff\xff",
              b"\x5b\x7f\xff\xff\xff\xff\xff\xff\xff", b"\x7b\x00\x00\x00\x01\x00\x00\x00\x00",
              b"\x9b\x00\x00\x00\x00\xff\xff\xff\xff", b"\xbb\x7f\xff\xff\xff\xff\xff\xff\xff",
              b"\x5a\xff\xff\xff\xff", b"\x9a\x10\x00\x00\x00", b"\x5f", b"\x7f", b"\x9f", b"\xbf", b"\xff",
              b"\xc0", b"\xc1", b"\xc2\x49\x01\x00\x00\x00\x00\x00\x00\x00\x00", b"\xd8\x18", b"\xd9\xd9\xf7",
              b"\xf7", b"\xf8\x20", b"\xf9\x7e\x00", b"\xfa\x7f\x80\x00\x00",
              b"\xfb\x7f\xf0\x00\x00\x00\x00\x00\x00",
              b"\x1c", b"\x5c", b"\xfc")


def _huge_bignum() -> int:
    return 10**5000  # more digits than Python 3.11 turns into text by default (int_max_str_digits)


def _deep(depth: int, leaf: Any = 0) -> Any:
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


def interesting_values(rng: random.Random) -> Any:
    """One value of any CBOR type, chosen to sit on a boundary somebody may have got wrong."""
    choice = rng.randrange(12)
    if choice == 0:
        return rng.choice((0, 1, -1, 23, 24, 255, 256, 65535, 65536, 2**31, 2**32 - 1, 2**32, 2**53 + 1,
                           2**63 - 1, 2**63, 2**64 - 1, -(2**63), -(2**64), 2**64, -(2**64) - 1, 2**100))
    if choice == 1:
        return rng.choice((0.0, -0.0, 0.5, 1.0, 1e308, -1e308, 5e-324, math.inf, -math.inf, math.nan,
                           2.0**63))
    if choice == 2:
        return rng.choice((True, False, None, cbor2.undefined, cbor2.CBORSimpleValue(99)))
    if choice == 3:
        return rng.choice(("", "a", "x" * 64, "x" * 65, "x" * 300, "\x00", "é", "a/b", "+", "#", "..", "-a",
                           "a\nb", "\u202e", "Ω" * 40, "0" * 4096))
    if choice == 4:
        return bytes(rng.choice((0, 1, 4, 8, 16, 31, 32, 33, 63, 64, 65, 256, 2049)))
    if choice == 5:
        return rng.choice(([], {}, [0], {"": 0}, [[]], {"a": {}}))
    if choice == 6:
        return _deep(rng.choice((31, 32, 33, 64, 300, 1000)))
    if choice == 7:
        return cbor2.CBORTag(rng.choice((0, 1, 2, 3, 24, 55799, 258, 2**32)), rng.choice((0, b"", "x", [])))
    if choice == 8:
        return _huge_bignum() * rng.choice((1, -1))
    if choice == 9:
        return [0] * rng.choice((2, 24, 1000, 10000))
    if choice == 10:
        return {str(k): k for k in range(rng.choice((2, 24, 1025)))}
    return rng.choice(("0" * 20, 10**19, b"\xff" * 32))


@dataclass
class Dictionary:
    """Tokens seen in the seeds: map keys, text values and integers, for mutations to reuse."""

    texts: list[str] = field(default_factory=list)
    ints: list[int] = field(default_factory=list)
    blobs: list[bytes] = field(default_factory=list)  # the same tokens CBOR-encoded, to insert as bytes

    @classmethod
    def from_inputs(cls, inputs: Sequence[bytes]) -> Dictionary:
        texts: dict[str, None] = {}
        ints: dict[int, None] = {}
        for data in inputs:
            value = loads_exactly(data)
            if value is NOT_CBOR:
                continue
            for _, node in _nodes(value):
                if isinstance(node, str) and len(node) <= 64:
                    texts[node] = None
                elif isinstance(node, dict):
                    texts.update((key, None) for key in node if isinstance(key, str))
                elif isinstance(node, int) and not isinstance(node, bool):
                    ints[node] = None
        blobs = [cbor2.dumps(token) for token in [*texts, *ints]]
        return cls(list(texts), list(ints), blobs)


NOT_CBOR = object()


def loads_exactly(data: bytes) -> Any:
    """One CBOR value that fills `data` exactly, or NOT_CBOR."""
    try:
        stream = io.BytesIO(data)
        value = cbor2.CBORDecoder(stream).decode()
    except Exception:
        return NOT_CBOR
    return value if stream.tell() == len(data) else NOT_CBOR


def holds_cbor(blob: bytes) -> Any:
    """The container a byte string holds as CBOR (envelopes nest signed bytes), or NOT_CBOR."""
    if len(blob) < 2 or blob[0] >> 5 not in (4, 5):  # arrays and maps only: keys and signatures stay bytes
        return NOT_CBOR
    return loads_exactly(blob)


# A path step into a decoded value: ("i", index) into a list, ("k", key) into a map, ("b", None) into
# the CBOR a byte string holds.
Path_ = tuple[tuple[str, Any], ...]


def _nodes(value: Any, path: Path_ = (), depth: int = 0) -> Iterator[tuple[Path_, Any]]:
    yield path, value
    if depth > 12:
        return
    if isinstance(value, list):
        for index, item in enumerate(value[:64]):
            yield from _nodes(item, (*path, ("i", index)), depth + 1)
    elif isinstance(value, dict):
        for key, item in list(value.items())[:64]:
            yield from _nodes(item, (*path, ("k", key)), depth + 1)
    elif isinstance(value, bytes):
        inner = holds_cbor(value)
        if inner is not NOT_CBOR:
            yield from _nodes(inner, (*path, ("b", None)), depth + 1)


def _replace(value: Any, path: Path_, new: Any, canonical: bool) -> Any:
    if not path:
        return new
    (kind, key), rest = path[0], path[1:]
    if kind == "i":
        copy = list(value)
        copy[key] = _replace(copy[key], rest, new, canonical)
        return copy
    if kind == "k":
        items = dict(value)
        items[key] = _replace(items[key], rest, new, canonical)
        return items
    return cbor2.dumps(_replace(holds_cbor(value), rest, new, canonical), canonical=canonical)


class Mutations:
    """Every mutation the fuzzer knows, chosen at random with weights."""

    def __init__(self, dictionary: Dictionary, target: Target) -> None:
        self.dictionary = dictionary
        self.target = target
        byte_level: list[tuple[int, Callable[..., bytes | None]]] = [
            (3, self.flip_bit), (2, self.interesting_byte), (1, self.random_byte), (1, self.add_to_byte),
            (2, self.insert_bytes), (2, self.delete_range), (1, self.duplicate_range), (1, self.truncate),
            (2, self.cbor_head), (2, self.splice),
        ]
        if dictionary.blobs:
            byte_level.append((2, self.insert_token))
        if not target.byte_level:
            byte_level = []
        structured: list[tuple[int, Callable[..., bytes | None]]] = []
        if target.cbor:
            structured.append((10, self.cbor_value))
        structured += [(8, _target_mutator(mutator)) for mutator in target.mutators]
        choices = byte_level + structured
        self._functions = [function for _, function in choices]
        self._weights = [weight for weight, _ in choices]

    def apply(self, rng: random.Random, data: bytes, corpus: Sequence[bytes]) -> bytes | None:
        (function,) = rng.choices(self._functions, self._weights)
        return function(rng, data, corpus)

    # -- byte level

    def flip_bit(self, rng: random.Random, data: bytes, corpus: Sequence[bytes]) -> bytes | None:
        if not data:
            return None
        buf = bytearray(data)
        buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
        return bytes(buf)

    def interesting_byte(self, rng: random.Random, data: bytes, corpus: Sequence[bytes]) -> bytes | None:
        if not data:
            return bytes([rng.choice(INTERESTING_BYTES)])
        buf = bytearray(data)
        buf[rng.randrange(len(buf))] = rng.choice(INTERESTING_BYTES)
        return bytes(buf)

    def random_byte(self, rng: random.Random, data: bytes, corpus: Sequence[bytes]) -> bytes | None:
        if not data:
            return None
        buf = bytearray(data)
        buf[rng.randrange(len(buf))] = rng.randrange(256)
        return bytes(buf)

    def add_to_byte(self, rng: random.Random, data: bytes, corpus: Sequence[bytes]) -> bytes | None:
        if not data:
            return None
        buf = bytearray(data)
        index = rng.randrange(len(buf))
        buf[index] = (buf[index] + rng.choice((-1, 1)) * rng.randint(1, 35)) % 256
        return bytes(buf)

    def insert_bytes(self, rng: random.Random, data: bytes, corpus: Sequence[bytes]) -> bytes | None:
        at = rng.randint(0, len(data))
        if rng.random() < 0.5:
            chunk = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        else:
            chunk = bytes([rng.choice(INTERESTING_BYTES)]) * rng.choice((1, 2, 4, 64, 300))
        return data[:at] + chunk + data[at:]

    def delete_range(self, rng: random.Random, data: bytes, corpus: Sequence[bytes]) -> bytes | None:
        if not data:
            return None
        start = rng.randrange(len(data))
        end = min(len(data), start + rng.choice((1, 1, 2, 4, 8, 32, 256)))
        return data[:start] + data[end:]

    def duplicate_range(self, rng: random.Random, data: bytes, corpus: Sequence[bytes]) -> bytes | None:
        if not data:
            return None
        start = rng.randrange(len(data))
        end = min(len(data), start + rng.randint(1, 64))
        at = rng.randint(0, len(data))
        return data[:at] + data[start:end] * rng.choice((1, 1, 2, 16)) + data[at:]

    def truncate(self, rng: random.Random, data: bytes, corpus: Sequence[bytes]) -> bytes | None:
        return data[: rng.randint(0, len(data))] if data else None

    def cbor_head(self, rng: random.Random, data: bytes, corpus: Sequence[bytes]) -> bytes | None:
        head = rng.choice(CBOR_HEADS)
        at = rng.randint(0, len(data))
        if rng.random() < 0.5:
            return data[:at] + head + data[at:]
        return data[:at] + head + data[at + len(head):]

    def insert_token(self, rng: random.Random, data: bytes, corpus: Sequence[bytes]) -> bytes | None:
        token = rng.choice(self.dictionary.blobs)
        at = rng.randint(0, len(data))
        if rng.random() < 0.5:
            return data[:at] + token + data[at:]
        return data[:at] + token + data[at + len(token):]

    def splice(self, rng: random.Random, data: bytes, corpus: Sequence[bytes]) -> bytes | None:
        if not corpus:
            return None
        other = rng.choice(corpus)
        if rng.random() < 0.5:  # the front of one input and the back of another
            return data[: rng.randint(0, len(data))] + other[rng.randint(0, len(other)):]
        start = rng.randint(0, len(other))
        chunk = other[start: start + rng.randint(1, 128)]
        at = rng.randint(0, len(data))
        return data[:at] + chunk + data[at:]

    # -- CBOR structure

    def cbor_value(self, rng: random.Random, data: bytes, corpus: Sequence[bytes]) -> bytes | None:
        """Decode, change one value anywhere in the tree (nested CBOR in byte strings too), re-encode."""
        root = loads_exactly(data)
        if root is NOT_CBOR:
            return None
        return mutate_cbor_value(rng, root, self.dictionary, canonical=rng.random() < 0.85)


def _target_mutator(mutator: Mutator) -> Callable[..., bytes | None]:
    def apply(rng: random.Random, data: bytes, corpus: Sequence[bytes]) -> bytes | None:
        return mutator(rng, data)

    apply.__name__ = getattr(mutator, "__name__", "target_mutator")
    return apply


def mutate_cbor_value(rng: random.Random, root: Any, dictionary: Dictionary, *,
                      canonical: bool = True) -> bytes | None:
    """One structure-aware change to a decoded CBOR value, re-encoded; None if it cannot be encoded.
    Target mutators use it on the CBOR inside their own framing (a serial frame's body)."""
    nodes = list(_nodes(root))
    path, value = rng.choice(nodes)
    new = _changed(rng, value, nodes, dictionary)
    try:
        return cbor2.dumps(_replace(root, path, new, canonical), canonical=canonical)
    except Exception:  # a combination cbor2 cannot encode (e.g. a list as a map key)
        return None


def _changed(rng: random.Random, value: Any, nodes: list[tuple[Path_, Any]], dictionary: Dictionary) -> Any:
    choice = rng.randrange(10)
    if choice <= 2:
        return interesting_values(rng)
    if choice == 3:
        return rng.choice(nodes)[1]  # a copy of another value of the same tree
    if choice == 4 and dictionary.texts:
        return rng.choice(dictionary.texts)
    if choice == 5 and dictionary.ints:
        return rng.choice(dictionary.ints) + rng.choice((-1, 0, 1))
    if choice == 6:
        return _deep(rng.choice((1, 2, 31, 40)), value)  # the same value, nested in lists
    # a change that keeps the type
    if isinstance(value, bool) or value is None:
        return not value
    if isinstance(value, int):
        return rng.choice((value + 1, value - 1, -value, value * 2, value ^ (1 << rng.randrange(64)), 0))
    if isinstance(value, float):
        whole = float(int(value)) if math.isfinite(value) else 0.0
        return rng.choice((value * 2, -value, value + 1e-9, math.nan, whole))
    if isinstance(value, str):
        return _changed_sequence(rng, value, rng.choice(("x", "\x00", "\n", "/", "é", value[:1] or "a")))
    if isinstance(value, bytes):
        return _changed_sequence(rng, value, bytes([rng.randrange(256)]))
    if isinstance(value, list):
        items = list(value)
        operation = rng.randrange(4)
        if operation == 0 and items:
            del items[rng.randrange(len(items))]
        elif operation == 1 and items:
            items.insert(rng.randint(0, len(items)), rng.choice(items))
        elif operation == 2:
            items.append(interesting_values(rng))
        else:
            rng.shuffle(items)
        return items
    if isinstance(value, dict):
        mapping = dict(value)
        operation = rng.randrange(4)
        if operation == 0 and mapping:
            del mapping[rng.choice(list(mapping))]
        elif operation == 1:
            key = rng.choice(dictionary.texts) if dictionary.texts and rng.random() < 0.8 else "zz"
            mapping[key] = interesting_values(rng)
        elif operation == 2 and mapping:
            old = rng.choice(list(mapping))
            text_key = rng.choice(dictionary.texts) if dictionary.texts else "k"
            new_key: Any = rng.choice((0, -1, b"k", 1.5, text_key))
            mapping[new_key] = mapping.pop(old)
        else:
            return {} if rng.random() < 0.5 else [mapping]
        return mapping
    return interesting_values(rng)


def _changed_sequence(rng: random.Random, value: Any, unit: Any) -> Any:
    operation = rng.randrange(5)
    if operation == 0:
        return value[: rng.randint(0, len(value))]
    if operation == 1:
        return value + unit * rng.choice((1, 31, 64, 300))
    if operation == 2 and value:
        index = rng.randrange(len(value))
        return value[:index] + unit + value[index + 1:]
    if operation == 3:
        return value[::-1]
    return value * 2
