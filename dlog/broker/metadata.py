"""The metadata state machine: brokers, topics, partitions, as the Raft log built them.

Rules (every broker applies the same records in the same order, so every broker ends
in the same state):

- Apply is deterministic: records carry ids and values; nothing here reads a clock,
  draws a random number or touches a file.
- A broker registers with an incarnation (one per process start). A new incarnation
  fences the broker until the controller unfences it; fence and unfence records name
  the incarnation they are about and are skipped when it is not the current one.
- A partition change carries the partition epoch it was computed from and is skipped
  when stale. An applied change bumps the partition epoch, and bumps the leader epoch
  when the leader changes (to another broker or to none).
- The ISR is never empty while the partition has replicas: a change that would empty
  it is refused (the controller keeps the last member, leader or not).
- Deleting a topic drops it by id; a later topic with the same name has a new id.

Readers share the image objects: partitions and brokers are frozen values replaced on
change, so a reference taken before an ``await`` stays a consistent (if old) view.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any

import cbor2

from dlog.broker.records import (
    AlterConfigs,
    CreatePartitions,
    CreateTopic,
    DeleteTopic,
    FenceBroker,
    PartitionAssignment,
    PartitionChange,
    Record,
    RegisterBroker,
    UnfenceBroker,
    UnregisterBroker,
    decode_batch,
)
from dlog.errors import ProtocolError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BrokerRegistration:
    node_id: int
    directory_id: str
    incarnation: str
    rpc: str
    gossip: str
    raft: str
    fenced: bool = True


@dataclass(frozen=True, slots=True)
class PartitionInfo:
    topic: str
    topic_id: str
    partition: int
    replicas: tuple[int, ...]
    isr: tuple[int, ...]
    leader: int | None
    leader_epoch: int = 0
    partition_epoch: int = 0

    @property
    def offline(self) -> bool:
        return self.leader is None

    @property
    def under_replicated(self) -> bool:
        return len(self.isr) < len(self.replicas)


@dataclass(slots=True)
class TopicInfo:
    name: str
    topic_id: str
    configs: dict[str, str]
    partitions: list[PartitionInfo]
    internal: bool = False


@dataclass(slots=True)
class MetadataDelta:
    """What one applied batch changed; brokers turn it into local actions."""

    partitions: set[tuple[str, int]] = field(default_factory=set)
    created_topics: set[str] = field(default_factory=set)
    #: (name, topic_id, partition count) of every topic deleted.
    deleted_topics: list[tuple[str, str, int]] = field(default_factory=list)
    config_changed_topics: set[str] = field(default_factory=set)
    brokers: set[int] = field(default_factory=set)
    #: Records skipped as stale (index in the batch -> reason), for the proposer.
    skipped: dict[int, str] = field(default_factory=dict)

    def merge(self, other: MetadataDelta) -> None:
        self.partitions |= other.partitions
        self.created_topics |= other.created_topics
        self.deleted_topics.extend(other.deleted_topics)
        self.config_changed_topics |= other.config_changed_topics
        self.brokers |= other.brokers

    @property
    def empty(self) -> bool:
        return not (
            self.partitions
            or self.created_topics
            or self.deleted_topics
            or self.config_changed_topics
            or self.brokers
        )


class MetadataImage:
    """The cluster metadata at ``applied_index`` of the Raft log."""

    def __init__(self) -> None:
        self.applied_index = 0
        self.brokers: dict[int, BrokerRegistration] = {}
        self.topics: dict[str, TopicInfo] = {}
        self.topics_by_id: dict[str, TopicInfo] = {}
        #: Directory ids of nodes removed for good (`node remove`): they may not
        #: register again; the node must be wiped to return as a new member.
        self.removed_directories: set[str] = set()

    # --- queries ---------------------------------------------------------------

    def partition(self, topic: str, partition: int) -> PartitionInfo | None:
        info = self.topics.get(topic)
        if info is None or not 0 <= partition < len(info.partitions):
            return None
        return info.partitions[partition]

    def partitions(self) -> list[PartitionInfo]:
        return [p for t in self.topics.values() for p in t.partitions]

    def unfenced_brokers(self) -> list[int]:
        return sorted(b.node_id for b in self.brokers.values() if not b.fenced)

    def leader_counts(self) -> dict[int, int]:
        counts = {node: 0 for node in self.brokers}
        for p in self.partitions():
            if p.leader is not None:
                counts[p.leader] = counts.get(p.leader, 0) + 1
        return counts

    def replica_counts(self) -> dict[int, int]:
        counts = {node: 0 for node in self.brokers}
        for p in self.partitions():
            for r in p.replicas:
                counts[r] = counts.get(r, 0) + 1
        return counts

    # --- apply -----------------------------------------------------------------

    def apply_entry(self, index: int, data: bytes) -> MetadataDelta:
        """Apply one Raft entry (a batch of records, or b"" for a no-op)."""
        delta = MetadataDelta()
        if data:
            try:
                records = decode_batch(data)
            except ProtocolError:
                # A corrupt entry can only come from a bug; skipping it keeps every
                # broker identical (they all skip it) instead of crashing all of them.
                log.error("skipping undecodable metadata entry at index %d", index)
                records = []
            for i, record in enumerate(records):
                reason = self.apply_record(record, delta)
                if reason is not None:
                    delta.skipped[i] = reason
        self.applied_index = index
        return delta

    def apply_record(self, record: Record, delta: MetadataDelta) -> str | None:
        """Apply one record; returns why it was skipped, or None when applied."""
        match record:
            case RegisterBroker():
                return self._register(record, delta)
            case FenceBroker() | UnfenceBroker():
                return self._fence(record, delta)
            case UnregisterBroker():
                removed = self.brokers.pop(record.node_id, None)
                if removed is None:
                    return "unknown broker"
                self.removed_directories.add(removed.directory_id)
                delta.brokers.add(record.node_id)
                return None
            case CreateTopic():
                return self._create_topic(record, delta)
            case CreatePartitions():
                return self._create_partitions(record, delta)
            case AlterConfigs():
                return self._alter_configs(record, delta)
            case DeleteTopic():
                return self._delete_topic(record, delta)
            case PartitionChange():
                return self._partition_change(record, delta)
        return f"unknown record {type(record).__name__}"

    def _register(self, r: RegisterBroker, delta: MetadataDelta) -> str | None:
        if r.directory_id in self.removed_directories:
            return "removed for good"
        old = self.brokers.get(r.node_id)
        fenced = True if old is None or old.incarnation != r.incarnation else old.fenced
        self.brokers[r.node_id] = BrokerRegistration(
            r.node_id, r.directory_id, r.incarnation, r.rpc, r.gossip, r.raft, fenced
        )
        delta.brokers.add(r.node_id)
        return None

    def _fence(self, r: FenceBroker | UnfenceBroker, delta: MetadataDelta) -> str | None:
        old = self.brokers.get(r.node_id)
        if old is None:
            return "unknown broker"
        if old.incarnation != r.incarnation:
            return "stale incarnation"
        self.brokers[r.node_id] = replace(old, fenced=isinstance(r, FenceBroker))
        delta.brokers.add(r.node_id)
        return None

    def _create_topic(self, r: CreateTopic, delta: MetadataDelta) -> str | None:
        if r.name in self.topics:
            return "topic exists"
        if r.topic_id in self.topics_by_id:
            return "topic id exists"
        topic = TopicInfo(r.name, r.topic_id, dict(r.configs), [], r.internal)
        for a in sorted(r.partitions, key=lambda a: a.partition):
            if a.partition != len(topic.partitions):
                return "partitions not numbered 0..n-1"
            topic.partitions.append(self._new_partition(topic, a))
        self.topics[r.name] = topic
        self.topics_by_id[r.topic_id] = topic
        delta.created_topics.add(r.name)
        delta.partitions.update((r.name, p.partition) for p in topic.partitions)
        return None

    @staticmethod
    def _new_partition(topic: TopicInfo, a: PartitionAssignment) -> PartitionInfo:
        return PartitionInfo(
            topic.name, topic.topic_id, a.partition, tuple(a.replicas), tuple(a.isr), a.leader
        )

    def _create_partitions(self, r: CreatePartitions, delta: MetadataDelta) -> str | None:
        topic = self.topics_by_id.get(r.topic_id)
        if topic is None:
            return "unknown topic id"
        for a in sorted(r.partitions, key=lambda a: a.partition):
            if a.partition != len(topic.partitions):
                return "partitions must continue the numbering"
            topic.partitions.append(self._new_partition(topic, a))
            delta.partitions.add((topic.name, a.partition))
        return None

    def _alter_configs(self, r: AlterConfigs, delta: MetadataDelta) -> str | None:
        topic = self.topics_by_id.get(r.topic_id)
        if topic is None:
            return "unknown topic id"
        for key, value in r.configs.items():
            if value is None:
                topic.configs.pop(key, None)
            else:
                topic.configs[key] = value
        delta.config_changed_topics.add(topic.name)
        return None

    def _delete_topic(self, r: DeleteTopic, delta: MetadataDelta) -> str | None:
        topic = self.topics_by_id.pop(r.topic_id, None)
        if topic is None:
            return "unknown topic id"
        del self.topics[topic.name]
        delta.deleted_topics.append((topic.name, topic.topic_id, len(topic.partitions)))
        delta.created_topics.discard(topic.name)
        delta.partitions -= {(topic.name, p.partition) for p in topic.partitions}
        return None

    def _partition_change(self, r: PartitionChange, delta: MetadataDelta) -> str | None:
        topic = self.topics_by_id.get(r.topic_id)
        if topic is None or not 0 <= r.partition < len(topic.partitions):
            return "unknown partition"
        old = topic.partitions[r.partition]
        if old.partition_epoch != r.partition_epoch:
            return "stale partition epoch"
        if not r.isr:
            return "empty ISR"
        if r.leader is not None and r.leader not in r.isr:
            return "leader not in ISR"
        if any(node not in old.replicas for node in r.isr):
            return "ISR member not a replica"
        new = replace(
            old,
            isr=tuple(r.isr),
            leader=r.leader,
            leader_epoch=old.leader_epoch + (1 if r.leader != old.leader else 0),
            partition_epoch=old.partition_epoch + 1,
        )
        topic.partitions[r.partition] = new
        delta.partitions.add((topic.name, r.partition))
        return None

    # --- snapshots -------------------------------------------------------------

    def snapshot(self) -> bytes:
        state: dict[str, Any] = {
            "applied_index": self.applied_index,
            "brokers": [
                [b.node_id, b.directory_id, b.incarnation, b.rpc, b.gossip, b.raft, b.fenced]
                for b in self.brokers.values()
            ],
            "removed_directories": sorted(self.removed_directories),
            "topics": [
                {
                    "name": t.name,
                    "topic_id": t.topic_id,
                    "configs": t.configs,
                    "internal": t.internal,
                    "partitions": [
                        [
                            p.partition,
                            list(p.replicas),
                            list(p.isr),
                            p.leader,
                            p.leader_epoch,
                            p.partition_epoch,
                        ]
                        for p in t.partitions
                    ],
                }
                for t in self.topics.values()
            ],
        }
        return cbor2.dumps(state)

    def restore(self, data: bytes) -> MetadataDelta:
        """Replace the whole image with a snapshot; the delta names everything."""
        state = cbor2.loads(data)
        before_topics = {(t.name, t.topic_id, len(t.partitions)) for t in self.topics.values()}
        self.brokers = {}
        for node_id, directory_id, incarnation, rpc, gossip, raft, fenced in state["brokers"]:
            self.brokers[node_id] = BrokerRegistration(
                node_id, directory_id, incarnation, rpc, gossip, raft, fenced
            )
        self.removed_directories = set(state.get("removed_directories", ()))
        self.topics = {}
        self.topics_by_id = {}
        for t in state["topics"]:
            topic = TopicInfo(t["name"], t["topic_id"], dict(t["configs"]), [], t["internal"])
            for partition, replicas, isr, leader, leader_epoch, partition_epoch in t["partitions"]:
                topic.partitions.append(
                    PartitionInfo(
                        topic.name,
                        topic.topic_id,
                        partition,
                        tuple(replicas),
                        tuple(isr),
                        leader,
                        leader_epoch,
                        partition_epoch,
                    )
                )
            self.topics[topic.name] = topic
            self.topics_by_id[topic.topic_id] = topic
        self.applied_index = state["applied_index"]
        delta = MetadataDelta()
        after = {(t.name, t.topic_id) for t in self.topics.values()}
        delta.deleted_topics = [
            (name, topic_id, n)
            for name, topic_id, n in before_topics
            if (name, topic_id) not in after
        ]
        everything = self.everything()
        everything.deleted_topics = delta.deleted_topics
        return everything

    def everything(self) -> MetadataDelta:
        """A delta naming every topic, partition and broker of the image (for a
        broker that starts acting on the metadata as it is now)."""
        delta = MetadataDelta()
        delta.created_topics = set(self.topics)
        delta.partitions = {(p.topic, p.partition) for p in self.partitions()}
        delta.brokers = set(self.brokers)
        return delta
