"""The queue of membership updates waiting to be piggybacked (memberlist's
TransmitLimitedQueue).

One pending update per member: a newer update about a member replaces the older
one. Each datagram takes the updates sent least often first (newest first among
equals) until its size budget is spent; an update retires after ``limit``
transmissions, ``retransmit_mult * ceil(log10(n + 1))`` for n live members, which
is enough for an epidemic to reach every member with high probability.
"""

from __future__ import annotations

from dlog.types import NodeId


class _Pending:
    __slots__ = ("key", "payload", "serial", "transmits")

    def __init__(self, key: NodeId, payload: bytes, serial: int) -> None:
        self.key = key
        self.payload = payload
        self.serial = serial
        self.transmits = 0


class BroadcastQueue:
    def __init__(self) -> None:
        self._pending: dict[NodeId, _Pending] = {}
        self._serial = 0

    def __len__(self) -> int:
        return len(self._pending)

    def queue(self, key: NodeId, payload: bytes) -> None:
        """Queue an encoded update about member ``key``, replacing an older one."""
        self._serial += 1
        self._pending[key] = _Pending(key, payload, self._serial)

    def transmits(self, key: NodeId) -> int | None:
        """How often the pending update about ``key`` went out; None if none pending."""
        pending = self._pending.get(key)
        return None if pending is None else pending.transmits

    def take(self, budget: int, limit: int) -> list[bytes]:
        """Updates for one datagram, at most ``budget`` bytes in all."""
        if not self._pending or budget <= 0:
            return []
        chosen: list[bytes] = []
        for pending in sorted(self._pending.values(), key=lambda p: (p.transmits, -p.serial)):
            size = len(pending.payload)
            if size > budget:
                continue
            budget -= size
            chosen.append(pending.payload)
            pending.transmits += 1
            if pending.transmits >= limit:
                del self._pending[pending.key]
        return chosen
