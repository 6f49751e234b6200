"""Wall-clock time, injected so tests control it.

Wall-clock time is for record timestamps and retention only; durations (timeouts,
ISR lag) use ``trio.current_time()`` so ``autojump_clock`` drives them.
"""

from __future__ import annotations

import time
from typing import Protocol


class WallClock(Protocol):
    def now_ms(self) -> int:
        """Milliseconds since the Unix epoch."""
        ...


class SystemClock:
    """The real wall clock."""

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000


class ManualClock:
    """A wall clock that moves only when told to (the test double)."""

    def __init__(self, start_ms: int = 1_700_000_000_000) -> None:
        self._now_ms = start_ms

    def now_ms(self) -> int:
        return self._now_ms

    def advance(self, ms: int) -> None:
        if ms < 0:
            raise ValueError("a wall clock test double only moves forward")
        self._now_ms += ms

    def set(self, now_ms: int) -> None:
        self._now_ms = now_ms
