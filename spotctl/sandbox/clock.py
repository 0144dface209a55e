"""The sandbox clock: sandbox seconds since the Unix epoch, faster than real time if asked.

Everything in the sandbox that waits (the trace tick, the two-minute interruption
notice, a volume's detach delay, the schedule sweep) reads this clock, never
``time.time()``, so a test can drive it by hand and a demo can run a day in minutes.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from typing import Protocol

# 2026-11-28T12:00:00Z: a fixed, readable start for deterministic tests.
DEFAULT_START = datetime(2026, 11, 28, 12, 0, 0, tzinfo=UTC).timestamp()


class Clock(Protocol):
    """What the sandbox needs from a clock."""

    def now(self) -> float:
        """Sandbox time, seconds since the Unix epoch."""
        ...


class FakeClock:
    """A clock that moves only when told to: tests are deterministic and fast."""

    def __init__(self, start: float = DEFAULT_START) -> None:
        self._now = start
        self._lock = threading.Lock()

    def now(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock does not go back")
        with self._lock:
            self._now += seconds

    def set(self, when: float) -> None:
        with self._lock:
            if when < self._now:
                raise ValueError("a clock does not go back")
            self._now = when


class ScaledClock:
    """Real time multiplied by ``speed`` (60.0: one real second is one sandbox minute)."""

    def __init__(self, speed: float = 1.0, start: float | None = None) -> None:
        if speed <= 0:
            raise ValueError("speed must be positive")
        self.speed = speed
        self._start = time.time() if start is None else start
        self._t0 = time.monotonic()

    def now(self) -> float:
        return self._start + (time.monotonic() - self._t0) * self.speed


def iso(when: float) -> str:
    """``2026-11-28T12:00:00Z``: the timestamp format of EC2 events and IMDS."""
    return datetime.fromtimestamp(when, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def iso_millis(when: float) -> str:
    """``2026-11-28T12:00:00.000Z``: the timestamp format of EC2 Query API answers."""
    moment = datetime.fromtimestamp(when, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
