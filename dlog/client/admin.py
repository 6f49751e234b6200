"""What the admin methods of :class:`dlog.client.Client` return: frozen dataclasses.

``to_dict()`` gives the JSON the CLI prints (``topic describe --json`` is a contract
in DESIGN.md "Interfaces users and tests rely on": exactly those keys).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True, kw_only=True)
class PartitionDescription:
    partition: int
    leader: int | None
    leader_epoch: int
    replicas: tuple[int, ...]
    isr: tuple[int, ...]
    #: From the partition's leader; None when it could not be asked.
    high_watermark: int | None = None
    log_end_offset: int | None = None
    log_start_offset: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "partition": self.partition,
            "leader": self.leader,
            "leader_epoch": self.leader_epoch,
            "replicas": list(self.replicas),
            "isr": list(self.isr),
            "high_watermark": self.high_watermark,
            "log_end_offset": self.log_end_offset,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class TopicDescription:
    name: str
    topic_id: str
    partitions: tuple[PartitionDescription, ...]
    configs: Mapping[str, Any] = field(default_factory=dict)
    internal: bool = False

    def to_dict(self) -> dict[str, Any]:
        """``{"name": ..., "partitions": [...]}`` as ``dlogctl topic describe --json``."""
        return {"name": self.name, "partitions": [p.to_dict() for p in self.partitions]}


@dataclass(frozen=True, slots=True, kw_only=True)
class TopicListing:
    name: str
    topic_id: str
    partitions: int
    replication_factor: int
    internal: bool = False
    configs: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "topic_id": self.topic_id,
            "partitions": self.partitions,
            "replication_factor": self.replication_factor,
            "internal": self.internal,
            "configs": dict(self.configs),
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class BrokerDescription:
    node_id: int
    rpc: str
    gossip: str = ""
    raft: str = ""
    fenced: bool = False
    #: As the answering broker's gossip sees it; None when unknown.
    alive: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.node_id,
            "rpc": self.rpc,
            "gossip": self.gossip,
            "raft": self.raft,
            "fenced": self.fenced,
            "alive": self.alive,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class RaftMemberDescription:
    node_id: int
    directory_id: str
    address: str
    #: "voter" or "learner".
    role: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.node_id,
            "directory_id": self.directory_id,
            "address": self.address,
            "role": self.role,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterDescription:
    cluster_id: str
    controller: int | None
    brokers: tuple[BrokerDescription, ...]
    raft_members: tuple[RaftMemberDescription, ...]
    metadata_index: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "cluster_id": self.cluster_id,
            "controller": self.controller,
            "metadata_index": self.metadata_index,
            "brokers": [b.to_dict() for b in self.brokers],
            "raft_members": [m.to_dict() for m in self.raft_members],
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class ListedOffset:
    """A ListOffsets answer: ``offset`` is None when no record has a timestamp at or
    after the one asked for."""

    offset: int | None
    timestamp: int | None
