"""dlog.raft: the Raft that agrees on cluster metadata.

Layers, bottom up:

- :mod:`dlog.raft.core` -- the sans-I/O protocol (:class:`RaftCore`: ``tick``, ``step``,
  ``propose``, ``ready``/``advance``), with :mod:`~dlog.raft.messages` (frozen
  dataclasses), :mod:`~dlog.raft.log`, :mod:`~dlog.raft.progress`,
  :mod:`~dlog.raft.storage` (the Storage protocol, MemoryStorage) and
  :mod:`~dlog.raft.codec`. None of them imports trio, socket or os.
- :mod:`dlog.raft.disk` -- :class:`DiskStorage`: CRC-checked WAL + snapshot files.
- :mod:`dlog.raft.transport` and :mod:`dlog.raft.node` -- :class:`RaftNode`, the trio
  driver over dlog.net.
- :mod:`dlog.raft.sim` -- the deterministic cluster simulation
  (``python -m dlog.raft.sim --seeds N``).

The names below are loaded on first use, so importing the core stays free of trio.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dlog.raft.core import CoreConfig, RaftCore
    from dlog.raft.disk import DiskStorage, open_disk_storage
    from dlog.raft.messages import (
        ConfChange,
        ConfChangeType,
        Configuration,
        Member,
        Role,
        Snapshot,
        SnapshotMeta,
    )
    from dlog.raft.node import PeerProgress, RaftConfig, RaftNode, RaftStatus, StateMachine
    from dlog.raft.storage import MemoryStorage, Storage

_WHERE = {
    "CoreConfig": "dlog.raft.core",
    "RaftCore": "dlog.raft.core",
    "DiskStorage": "dlog.raft.disk",
    "open_disk_storage": "dlog.raft.disk",
    "ConfChange": "dlog.raft.messages",
    "ConfChangeType": "dlog.raft.messages",
    "Configuration": "dlog.raft.messages",
    "Member": "dlog.raft.messages",
    "Role": "dlog.raft.messages",
    "Snapshot": "dlog.raft.messages",
    "SnapshotMeta": "dlog.raft.messages",
    "PeerProgress": "dlog.raft.node",
    "RaftConfig": "dlog.raft.node",
    "RaftNode": "dlog.raft.node",
    "RaftStatus": "dlog.raft.node",
    "StateMachine": "dlog.raft.node",
    "MemoryStorage": "dlog.raft.storage",
    "Storage": "dlog.raft.storage",
}

__all__ = [
    "ConfChange",
    "ConfChangeType",
    "Configuration",
    "CoreConfig",
    "DiskStorage",
    "Member",
    "MemoryStorage",
    "PeerProgress",
    "RaftConfig",
    "RaftCore",
    "RaftNode",
    "RaftStatus",
    "Role",
    "Snapshot",
    "SnapshotMeta",
    "StateMachine",
    "Storage",
    "open_disk_storage",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'dlog.raft' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
