"""dlog: a Kafka-style replicated, ordered log on trio.

``dlog.connect(...)`` and the client's types are importable from here; they are loaded
on first use, so importing a sans-I/O module (``dlog.raft``, ``dlog.storage``) does not
pull in the client.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from dlog.client import (
        BatchMetadata,
        Client,
        Consumer,
        ConsumerRecord,
        DeliveryHandle,
        Producer,
        Record,
        RecordMetadata,
        Records,
        TopicDescription,
        connect,
    )

__all__ = [
    "BatchMetadata",
    "Client",
    "Consumer",
    "ConsumerRecord",
    "DeliveryHandle",
    "Producer",
    "Record",
    "RecordMetadata",
    "Records",
    "TopicDescription",
    "__version__",
    "connect",
]


def __getattr__(name: str) -> Any:
    if name in __all__ and name != "__version__":
        import dlog.client

        return getattr(dlog.client, name)
    raise AttributeError(f"module 'dlog' has no attribute {name!r}")
