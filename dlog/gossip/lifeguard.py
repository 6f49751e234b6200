"""Lifeguard's two timers: the shrinking suspicion timeout and local-health awareness.

Both are plain arithmetic on ticks; see Dadgar et al., "Lifeguard: Local Health
Awareness for More Accurate Failure Detection" (2018) and memberlist's
suspicion.go / awareness.go.
"""

from __future__ import annotations

import math

from dlog.types import NodeId


class Suspicion:
    """The timer of one suspected member.

    It starts at ``max_ticks`` and, as each of ``k`` expected *independent*
    confirmations arrives (a suspicion from another accuser), shrinks
    logarithmically towards ``min_ticks``:
    ``timeout = max(min, max - (max - min) * log(n + 1) / log(k + 1))``
    for n confirmations. With ``k < 1`` the timeout is ``min_ticks`` at once.
    """

    __slots__ = ("_k", "_max", "_min", "_start", "confirmers", "deadline")

    def __init__(
        self, *, start: int, accuser: NodeId, k: int, min_ticks: int, max_ticks: int
    ) -> None:
        self._start = start
        self._k = k
        self._min = min_ticks
        self._max = max(max_ticks, min_ticks)
        #: The first accuser plus every confirmer: each counts once.
        self.confirmers: set[NodeId] = {accuser}
        #: The tick at which the member is declared dead.
        self.deadline = start + (self._max if k >= 1 else self._min)

    @property
    def confirmations(self) -> int:
        return len(self.confirmers) - 1

    def confirm(self, accuser: NodeId) -> bool:
        """Count an accusation; True when it was new (and so worth re-gossiping)."""
        if self.confirmations >= self._k or accuser in self.confirmers:
            return False
        self.confirmers.add(accuser)
        fraction = math.log(self.confirmations + 1) / math.log(self._k + 1)
        timeout = max(self._min, math.floor(self._max - fraction * (self._max - self._min)))
        self.deadline = self._start + timeout
        return True


class Awareness:
    """Local health: a score that grows when this node misses its own acks and nacks.

    Probe timeouts and the probe interval are multiplied by ``score + 1``, so a node
    starved of CPU or network probes less often and waits longer before accusing.
    """

    __slots__ = ("_max_multiplier", "score")

    def __init__(self, max_multiplier: int) -> None:
        self._max_multiplier = max_multiplier
        self.score = 0

    def apply(self, delta: int) -> None:
        self.score = min(max(self.score + delta, 0), self._max_multiplier - 1)

    def scale(self, ticks: int) -> int:
        return ticks * (self.score + 1)
