"""What a node or the broker refused, from whom, and why: counters, a log that a flood cannot flood,
and quarantine.

Every input a node refuses (a Raft batch, a proposal, a device's state message), and every publish or
subscribe the embedded broker denies, is refused through a `Refusals` of its own kind, naming the sender as the topic names it: the broker lets a member
publish only on topics carrying its own name, so the topic, unlike a claim inside the payload, says
who sent it. Operators see

- counts by reason and by sender (`tomq status --json`, Prometheus);
- the first refusal of each (sender, reason) in a log line at once, and then, while that sender keeps
  failing, one line per `summary_every` seconds with how many more there were: 10,000 forged messages
  a second must not become 10,000 log lines a second;
- quarantine: a sender that fails `strikes` cryptographic or format checks within `window` seconds is
  not listened to for `quarantine` seconds (doubling while it goes on, up to `max_quarantine`). What
  it sends meanwhile is dropped before any decoding or signature check (which costs ~0.1-0.3 ms each),
  so one hostile member cannot spend a node's CPU. Only `strike=True` refusals count: a well-behaved
  member can send a record the rules refuse (a retry after a leader change), never a bad signature.

Pure apart from the logger: time comes from `clock`, so tests drive it.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

MAX_SENDERS = 10_000


@dataclass
class _Sender:
    strikes: deque[float] = field(default_factory=deque)
    quarantined_until: float = 0.0
    quarantine_seconds: float = 0.0
    dropped: int = 0  # while quarantined, since the last summary
    suppressed: Counter[str] = field(default_factory=Counter)  # reason -> refusals not logged yet
    last_detail: dict[str, str] = field(default_factory=dict)
    logged: set[str] = field(default_factory=set)  # reasons logged in the current summary period


class Refusals:
    def __init__(self, what: str, logger: logging.Logger, *, clock: Callable[[], float] = time.monotonic,
                 strikes: int = 20, window: float = 10.0, quarantine: float = 10.0, max_quarantine: float = 300.0,
                 summary_every: float = 10.0, on_refuse: Callable[[str, str], None] | None = None) -> None:
        self.what = what  # e.g. "raft batch", "proposal"
        self.log = logger
        self.clock = clock
        self.strikes = strikes
        self.window = window
        self.quarantine = quarantine
        self.max_quarantine = max_quarantine
        self.summary_every = summary_every
        self.on_refuse = on_refuse  # (sender, reason), e.g. a Prometheus counter
        self.by_reason: Counter[str] = Counter()
        self.by_sender: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()  # sender -> messages dropped unread while quarantined
        self.quarantines = 0
        self._senders: dict[str, _Sender] = {}
        self._next_summary = clock() + summary_every

    def is_quarantined(self, sender: str) -> bool:
        """True (and the message counted as dropped) if `sender` is not listened to right now."""
        state = self._senders.get(sender)
        if state is None or state.quarantined_until == 0.0:
            return False
        now = self.clock()
        if now >= state.quarantined_until:
            self.log.warning("%s from %s: quarantine over after %.0f s, %d messages dropped unread", self.what,
                             sender, state.quarantine_seconds, state.dropped)
            state.quarantined_until = 0.0
            state.dropped = 0
            state.strikes.clear()
            return False
        state.dropped += 1
        self.dropped[sender] += 1
        self.by_reason["quarantined"] += 1
        if self.on_refuse is not None:
            self.on_refuse(sender, "quarantined")
        return True

    def quarantined(self) -> dict[str, float]:
        """Senders not listened to now -> seconds left (an expired quarantine ends here, quietly: the
        next message from that sender logs its end)."""
        now = self.clock()
        return {sender: state.quarantined_until - now for sender, state in self._senders.items()
                if state.quarantined_until > now}

    def impose(self, sender: str, seconds: float, by: str) -> None:
        """Quarantine `sender` on another node's word (the leader, which checks signatures this node
        does not check), unless it already is for at least that long."""
        now = self.clock()
        state = self._senders.setdefault(sender, _Sender()) if len(self._senders) < MAX_SENDERS else None
        if state is None or state.quarantined_until >= now + seconds - 1.0:
            return
        if state.quarantined_until <= now:
            self.quarantines += 1
            self.log.warning("%s from %s: not listening to it for %.0f s, as %s decided", self.what, sender,
                             seconds, by)
        state.quarantined_until = now + seconds
        state.quarantine_seconds = max(state.quarantine_seconds, seconds)

    def refuse(self, sender: str, reason: str, detail: str, *, strike: bool = True) -> None:
        now = self.clock()
        self.by_reason[reason] += 1
        if sender not in self._senders and len(self._senders) >= MAX_SENDERS:
            sender = "(others)"  # names come from topics the broker allowed, but bound the memory anyway
        self.by_sender[sender] += 1
        if self.on_refuse is not None:
            self.on_refuse(sender, reason)
        state = self._senders.setdefault(sender, _Sender())
        if reason in state.logged:
            state.suppressed[reason] += 1
            state.last_detail[reason] = detail
        else:
            state.logged.add(reason)
            self.log.warning("refused %s from %s (%s): %s", self.what, sender, reason, detail)
        if strike:
            state.strikes.append(now)
            while state.strikes and now - state.strikes[0] > self.window:
                state.strikes.popleft()
            if len(state.strikes) >= self.strikes and state.quarantined_until == 0.0:
                state.quarantine_seconds = min(max(self.quarantine, state.quarantine_seconds * 2), self.max_quarantine)
                state.quarantined_until = now + state.quarantine_seconds
                self.quarantines += 1
                self.log.warning("%s from %s: %d refusals in %.0f s; not listening to it for %.0f s", self.what,
                                 sender, len(state.strikes), self.window, state.quarantine_seconds)
        self.flush(now)

    def flush(self, now: float | None = None) -> None:
        """Log what was refused but not logged since the last summary (called on every refusal and tick)."""
        now = self.clock() if now is None else now
        if now < self._next_summary:
            return
        self._next_summary = now + self.summary_every
        for sender, state in self._senders.items():
            for reason, count in sorted(state.suppressed.items()):
                self.log.warning("refused %d more %ss from %s (%s) in the last %.0f s; last: %s", count, self.what,
                                 sender, reason, self.summary_every, state.last_detail.get(reason, ""))
            state.suppressed.clear()
            state.last_detail.clear()
            state.logged.clear()
            if state.quarantined_until and state.dropped:
                self.log.warning("%s from %s: %d messages dropped unread while quarantined", self.what, sender,
                                 state.dropped)

    def status(self) -> dict[str, object]:
        quarantined = sorted(s for s, st in self._senders.items() if st.quarantined_until > self.clock())
        return {"by_reason": dict(self.by_reason), "by_sender": dict(self.by_sender),
                "dropped_while_quarantined": dict(self.dropped), "quarantined": quarantined,
                "quarantines": self.quarantines}
