"""What gossip tells the rest of the node: member snapshots and membership events."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from dlog.gossip.messages import Address
from dlog.types import NodeId


class MemberState(enum.Enum):
    ALIVE = "alive"
    #: Missed a probe; declared dead unless it refutes before its suspicion times out.
    SUSPECT = "suspect"
    DEAD = "dead"
    #: Left gracefully (``leave()``).
    LEFT = "left"


@dataclass(frozen=True, slots=True, kw_only=True)
class Member:
    """One member as this node sees it at one moment."""

    node_id: NodeId
    #: The gossip (UDP) address it advertises.
    address: Address
    state: MemberState
    incarnation: int
    #: Opaque to gossip: rpc and raft addresses, role, version, ...
    metadata: Mapping[str, str]


@dataclass(frozen=True, slots=True, kw_only=True)
class MemberJoined:
    """A member became alive: first heard of, or back after being dead or left."""

    member: Member


@dataclass(frozen=True, slots=True, kw_only=True)
class MemberUpdated:
    """A live member changed its metadata or address."""

    member: Member


@dataclass(frozen=True, slots=True, kw_only=True)
class MemberSuspect:
    member: Member


@dataclass(frozen=True, slots=True, kw_only=True)
class MemberAlive:
    """A suspect member refuted the suspicion."""

    member: Member


@dataclass(frozen=True, slots=True, kw_only=True)
class MemberDead:
    member: Member


@dataclass(frozen=True, slots=True, kw_only=True)
class MemberLeft:
    member: Member


MemberEvent = MemberJoined | MemberUpdated | MemberSuspect | MemberAlive | MemberDead | MemberLeft
