"""Identifiers and counters shared by every layer, as distinct types for mypy."""

from __future__ import annotations

from typing import NewType

#: A broker / Raft node id (``--node-id``), chosen by the operator.
NodeId = NewType("NodeId", int)
#: A position in a partition log.
Offset = NewType("Offset", int)
#: A partition's leader epoch: bumped on every leader change.
Epoch = NewType("Epoch", int)
#: A Raft term.
Term = NewType("Term", int)
