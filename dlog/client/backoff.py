"""Exponential retry backoff with jitter, as Kafka's clients do it.

The delay starts at ``initial_s``, doubles on every consecutive failure up to
``max_s``, and is spread by +-20 % so many clients do not retry in lockstep.
"""

from __future__ import annotations

import random


class Backoff:
    __slots__ = ("_failures", "_initial", "_max", "_rng")

    def __init__(self, initial_s: float, max_s: float, rng: random.Random) -> None:
        self._initial = initial_s
        self._max = max_s
        self._rng = rng
        self._failures = 0

    @property
    def failures(self) -> int:
        return self._failures

    def current(self) -> float:
        """The delay to wait before the next attempt (the initial one after a success)."""
        if self._failures == 0:
            return self._initial
        return self.delay(self._failures)

    def delay(self, failures: int) -> float:
        """The delay after ``failures`` consecutive failures (jittered)."""
        base = min(self._max, self._initial * float(2 ** min(62, max(0, failures - 1))))
        return base * self._rng.uniform(0.8, 1.2)

    def failed(self) -> float:
        """Count a failure; returns the delay before the next attempt."""
        self._failures += 1
        return self.delay(self._failures)

    def reset(self) -> None:
        self._failures = 0
