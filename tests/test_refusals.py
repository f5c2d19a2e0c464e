"""tomq/refusals.py: counts, a rate-limited log, and quarantine of a sender that keeps failing checks."""

from __future__ import annotations

import logging

import pytest

from tomq.refusals import Refusals


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make(clock: Clock, **kwargs) -> Refusals:
    return Refusals("proposal", logging.getLogger("test.refusals"), clock=clock, **kwargs)


def test_first_refusal_per_sender_and_reason_is_logged_then_summarised(clock, caplog):
    refusals = make(clock, strikes=10_000)
    with caplog.at_level(logging.WARNING, "test.refusals"):
        for i in range(500):
            refusals.refuse("rogue", "BadSignature", f"signature of envelope {i} does not verify")
        refusals.refuse("s1", "BadSignature", "one")
        assert len(caplog.records) == 2, [r.getMessage() for r in caplog.records]
        assert "refused proposal from rogue (BadSignature)" in caplog.records[0].getMessage()
        clock.now += 10.0
        refusals.flush()
    summary = [r.getMessage() for r in caplog.records][2:]
    assert summary == ["refused 499 more proposals from rogue (BadSignature) in the last 10 s; "
                       "last: signature of envelope 499 does not verify"]
    assert refusals.by_reason["BadSignature"] == 501
    assert refusals.by_sender == {"rogue": 500, "s1": 1}


def test_a_sender_with_too_many_strikes_is_quarantined_and_released(clock, caplog):
    refusals = make(clock, strikes=5, window=10, quarantine=10)
    for _ in range(4):
        refusals.refuse("rogue", "MalformedEnvelope", "junk")
        clock.now += 1
    assert not refusals.is_quarantined("rogue")
    refusals.refuse("rogue", "MalformedEnvelope", "junk")
    assert refusals.is_quarantined("rogue")
    assert not refusals.is_quarantined("s1"), "only the sender that failed"
    for _ in range(99):
        refusals.is_quarantined("rogue")
    assert refusals.dropped["rogue"] == 100
    assert refusals.status()["quarantined"] == ["rogue"]
    clock.now += 10.5
    with caplog.at_level(logging.WARNING, "test.refusals"):
        assert not refusals.is_quarantined("rogue")
    assert "quarantine over after 10 s, 100 messages dropped unread" in caplog.text
    # Going on doubles the quarantine.
    for _ in range(5):
        refusals.refuse("rogue", "MalformedEnvelope", "junk")
    clock.now += 15
    assert refusals.is_quarantined("rogue"), "the second quarantine lasts 20 s"
    clock.now += 5.5
    assert not refusals.is_quarantined("rogue")
    assert refusals.quarantines == 2


def test_strikes_outside_the_window_do_not_add_up(clock):
    refusals = make(clock, strikes=3, window=10)
    for _ in range(10):
        refusals.refuse("slow", "BadSignature", "x")
        clock.now += 6
    assert not refusals.is_quarantined("slow")


def test_refusals_that_are_not_strikes_never_quarantine(clock):
    refusals = make(clock, strikes=3)
    for _ in range(100):
        refusals.refuse("collector", "OutOfOrder", "arrived after a later one", strike=False)
    assert not refusals.is_quarantined("collector")
    assert refusals.by_reason["OutOfOrder"] == 100


def test_sender_names_are_bounded(clock, monkeypatch):
    monkeypatch.setattr("tomq.refusals.MAX_SENDERS", 3)
    refusals = make(clock, strikes=1000)
    for i in range(10):
        refusals.refuse(f"s{i}", "UnknownSender", "x")
    assert set(refusals.by_sender) == {"s0", "s1", "s2", "(others)"}
    assert refusals.by_sender["(others)"] == 7
