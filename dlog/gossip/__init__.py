"""dlog.gossip: SWIM membership with Lifeguard, a sans-I/O core and its trio UDP driver.

- :class:`GossipNode` (dlog.gossip.node): run it, read ``members()``, ``subscribe()``
  to membership events, ``update_metadata()``, ``leave()``.
- :class:`GossipConfig`: timing and sizing (defaults and their arithmetic in
  dlog.gossip.config).
- :class:`GossipCore` (dlog.gossip.core): the protocol state machine, no I/O.
- dlog.gossip.sim: a deterministic in-process network of cores for tests and benchmarks.

Gossip discovers members and detects failures; it never changes Raft membership.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dlog.gossip.config import GossipConfig
from dlog.gossip.core import GossipCore, GossipStats
from dlog.gossip.events import (
    Member,
    MemberAlive,
    MemberDead,
    MemberEvent,
    MemberJoined,
    MemberLeft,
    MemberState,
    MemberSuspect,
    MemberUpdated,
)

if TYPE_CHECKING:
    from dlog.gossip.node import GossipNode


def __getattr__(name: str) -> object:
    # The trio driver loads on first use, so importing the sans-I/O core loads no trio.
    if name == "GossipNode":
        from dlog.gossip.node import GossipNode

        return GossipNode
    raise AttributeError(f"module 'dlog.gossip' has no attribute {name!r}")


__all__ = [
    "GossipConfig",
    "GossipCore",
    "GossipNode",
    "GossipStats",
    "Member",
    "MemberAlive",
    "MemberDead",
    "MemberEvent",
    "MemberJoined",
    "MemberLeft",
    "MemberState",
    "MemberSuspect",
    "MemberUpdated",
]
