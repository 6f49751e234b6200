"""dlog.broker: the node -- metadata state machine, controller, partitions, replication.

Wires storage, net, raft and gossip together; see :mod:`dlog.broker.node`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dlog.broker.config import BrokerConfig

if TYPE_CHECKING:
    from dlog.broker.node import BoundAddresses, Broker

__all__ = ["BoundAddresses", "Broker", "BrokerConfig"]


def __getattr__(name: str) -> Any:
    # The node pulls in every layer; importing the config alone should not.
    if name in ("Broker", "BoundAddresses"):
        from dlog.broker import node

        return getattr(node, name)
    raise AttributeError(name)
