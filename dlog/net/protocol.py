"""The dlog protocol: every operation clients and brokers send each other.

Names and meanings follow Kafka's APIs (Produce, Fetch, ListOffsets, Metadata,
OffsetsForLeaderEpoch, CreateTopics, ...), reshaped for CBOR. Record batches are never
in the CBOR body: a request or response that carries batches lists, per partition,
how many payload bytes belong to it (``size``), and the batches follow the header as
one raw payload, partition after partition, in list order.

Per-partition results carry an ``error_code`` (0 = none, see :mod:`dlog.errors`) and,
when not 0, an ``error_message``; a NOT_LEADER_OR_FOLLOWER result also names the
``leader`` and ``leader_epoch`` the broker knows, so a client retries at once.

This module holds data definitions only: no broker logic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dlog.net.messages import Message, Struct, register

# Special values, as in Kafka.
CONSUMER_REPLICA_ID = -1
EARLIEST_TIMESTAMP = -2
LATEST_TIMESTAMP = -1
NO_EPOCH = -1

ACKS_NONE = 0
ACKS_LEADER = 1
ACKS_ALL = -1


def acks_from_text(value: str | int) -> int:
    """``none|leader|all`` (or Kafka's 0/1/-1) as the wire value; ValueError otherwise."""
    text = str(value).strip().lower()
    table = {"none": 0, "0": 0, "leader": 1, "1": 1, "all": -1, "-1": -1}
    if text not in table:
        raise ValueError(f"acks must be none, leader or all (or 0, 1, -1), not {value!r}")
    return table[text]


# --- metadata ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class BrokerInfo(Struct):
    node_id: int
    rpc: str
    gossip: str = ""
    raft: str = ""
    fenced: bool = False
    #: As seen by the answering broker's gossip; None when unknown.
    alive: bool | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class PartitionMetadata(Struct):
    partition: int
    leader: int | None
    leader_epoch: int
    replicas: list[int]
    isr: list[int]
    partition_epoch: int = 0
    error_code: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class TopicMetadata(Struct):
    name: str
    topic_id: str = ""
    partitions: list[PartitionMetadata] = field(default_factory=list)
    configs: dict[str, Any] = field(default_factory=dict)
    internal: bool = False
    error_code: int = 0
    error_message: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class MetadataRequest(Message):
    #: None: every topic. An unknown name comes back with UNKNOWN_TOPIC_OR_PARTITION.
    topics: list[str] | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class MetadataResponse(Message):
    cluster_id: str
    controller: int | None
    brokers: list[BrokerInfo]
    topics: list[TopicMetadata]
    #: The Raft index of the metadata this answer reflects.
    metadata_index: int = 0


# --- produce ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ProducePartition(Struct):
    topic: str
    partition: int
    #: Payload bytes (one or more record batches) for this partition.
    size: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ProduceRequest(Message):
    acks: int
    timeout_ms: int
    partitions: list[ProducePartition]


@dataclass(frozen=True, slots=True, kw_only=True)
class ProducePartitionResult(Struct):
    topic: str
    partition: int
    error_code: int = 0
    error_message: str = ""
    base_offset: int = -1
    last_offset: int = -1
    log_start_offset: int = -1
    leader: int | None = None
    leader_epoch: int = NO_EPOCH


@dataclass(frozen=True, slots=True, kw_only=True)
class ProduceResponse(Message):
    partitions: list[ProducePartitionResult]


# --- fetch -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class FetchPartition(Struct):
    topic: str
    partition: int
    fetch_offset: int
    partition_max_bytes: int = 1 << 20
    #: The leader epoch the fetcher believes current (NO_EPOCH: don't check).
    current_leader_epoch: int = NO_EPOCH


@dataclass(frozen=True, slots=True, kw_only=True)
class FetchRequest(Message):
    #: CONSUMER_REPLICA_ID for consumers; a follower's node id for replication.
    replica_id: int = CONSUMER_REPLICA_ID
    max_wait_ms: int = 500
    min_bytes: int = 1
    max_bytes: int = 50 << 20
    partitions: list[FetchPartition] = field(default_factory=list)


@dataclass(frozen=True, slots=True, kw_only=True)
class FetchPartitionResult(Struct):
    topic: str
    partition: int
    error_code: int = 0
    error_message: str = ""
    high_watermark: int = -1
    log_start_offset: int = -1
    log_end_offset: int = -1
    #: Payload bytes (whole record batches) for this partition.
    size: int = 0
    leader: int | None = None
    leader_epoch: int = NO_EPOCH


@dataclass(frozen=True, slots=True, kw_only=True)
class FetchResponse(Message):
    partitions: list[FetchPartitionResult]


# --- offsets ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ListOffsetsPartition(Struct):
    topic: str
    partition: int
    #: EARLIEST_TIMESTAMP, LATEST_TIMESTAMP, or a timestamp in ms.
    timestamp: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ListOffsetsRequest(Message):
    partitions: list[ListOffsetsPartition]


@dataclass(frozen=True, slots=True, kw_only=True)
class ListOffsetsPartitionResult(Struct):
    topic: str
    partition: int
    error_code: int = 0
    error_message: str = ""
    #: -1 when no record has a timestamp at or after the one asked for.
    offset: int = -1
    timestamp: int = -1
    leader: int | None = None
    leader_epoch: int = NO_EPOCH


@dataclass(frozen=True, slots=True, kw_only=True)
class ListOffsetsResponse(Message):
    partitions: list[ListOffsetsPartitionResult]


@dataclass(frozen=True, slots=True, kw_only=True)
class EpochQuery(Struct):
    topic: str
    partition: int
    leader_epoch: int
    current_leader_epoch: int = NO_EPOCH


@dataclass(frozen=True, slots=True, kw_only=True)
class OffsetsForLeaderEpochRequest(Message):
    replica_id: int = CONSUMER_REPLICA_ID
    partitions: list[EpochQuery] = field(default_factory=list)


@dataclass(frozen=True, slots=True, kw_only=True)
class EpochEndOffset(Struct):
    topic: str
    partition: int
    error_code: int = 0
    error_message: str = ""
    #: The largest epoch <= the one asked for, and the offset where it ended.
    leader_epoch: int = NO_EPOCH
    end_offset: int = -1


@dataclass(frozen=True, slots=True, kw_only=True)
class OffsetsForLeaderEpochResponse(Message):
    partitions: list[EpochEndOffset]


# --- replica state (describe, top) ------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplicaState(Struct):
    node_id: int
    log_end_offset: int
    #: Seconds since this follower last caught up with the leader's LEO.
    lag_s: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class PartitionState(Struct):
    topic: str
    partition: int
    role: str
    leader_epoch: int
    log_start_offset: int
    log_end_offset: int
    high_watermark: int
    size_bytes: int = 0
    #: On the leader: what it knows of every replica (itself included).
    replicas: list[ReplicaState] = field(default_factory=list)


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplicaStatusRequest(Message):
    #: None: every partition this broker holds.
    topics: list[str] | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class GroupOffsets(Struct):
    group: str
    topic: str
    partition: int
    offset: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplicaStatusResponse(Message):
    node_id: int
    partitions: list[PartitionState]
    #: Committed offsets of the groups this broker coordinates.
    group_offsets: list[GroupOffsets] = field(default_factory=list)


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterStatusRequest(Message):
    pass


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterStatusResponse(Message):
    """Everything ``dlogctl top`` shows, gathered by the broker that answers."""

    cluster_id: str
    answered_by: int
    controller: int | None
    metadata_index: int
    brokers: list[BrokerInfo]
    #: node id -> "voter" | "learner"; the controller is the Raft leader.
    raft_roles: dict[str, str]
    topics: list[TopicMetadata]
    #: From every reachable broker, the state of the partitions it holds.
    replicas: list[ReplicaStatusResponse]
    #: Node ids that did not answer the status fan-out.
    unreachable: list[int]
    group_offsets: list[GroupOffsets] = field(default_factory=list)


# --- admin -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class NewTopic(Struct):
    name: str
    partitions: int = 1
    #: None: min(3, live brokers).
    replication_factor: int | None = None
    configs: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class TopicResult(Struct):
    name: str
    error_code: int = 0
    error_message: str = ""
    topic_id: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class CreateTopicsRequest(Message):
    topics: list[NewTopic]
    validate_only: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class CreateTopicsResponse(Message):
    topics: list[TopicResult]


@dataclass(frozen=True, slots=True, kw_only=True)
class DeleteTopicsRequest(Message):
    topics: list[str]


@dataclass(frozen=True, slots=True, kw_only=True)
class DeleteTopicsResponse(Message):
    topics: list[TopicResult]


@dataclass(frozen=True, slots=True, kw_only=True)
class AlterTopicRequest(Message):
    name: str
    #: New total partition count (only growth is allowed); None: unchanged.
    partitions: int | None = None
    #: Config changes; a None value resets the key to its default.
    configs: dict[str, str | None] = field(default_factory=dict)
    validate_only: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class AlterTopicResponse(Message):
    topic: TopicResult


@dataclass(frozen=True, slots=True, kw_only=True)
class DescribeClusterRequest(Message):
    pass


@dataclass(frozen=True, slots=True, kw_only=True)
class RaftMember(Struct):
    node_id: int
    directory_id: str
    address: str
    role: str  # "voter" | "learner"


@dataclass(frozen=True, slots=True, kw_only=True)
class DescribeClusterResponse(Message):
    cluster_id: str
    controller: int | None
    brokers: list[BrokerInfo]
    raft_members: list[RaftMember]
    metadata_index: int


@dataclass(frozen=True, slots=True, kw_only=True)
class RemoveNodeRequest(Message):
    node_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class RemoveNodeResponse(Message):
    pass


# --- consumer offsets ---------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class FindCoordinatorRequest(Message):
    group: str


@dataclass(frozen=True, slots=True, kw_only=True)
class FindCoordinatorResponse(Message):
    node_id: int
    rpc: str


@dataclass(frozen=True, slots=True, kw_only=True)
class OffsetCommitPartition(Struct):
    topic: str
    partition: int
    offset: int
    metadata: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class OffsetCommitRequest(Message):
    group: str
    partitions: list[OffsetCommitPartition]


@dataclass(frozen=True, slots=True, kw_only=True)
class OffsetCommitPartitionResult(Struct):
    topic: str
    partition: int
    error_code: int = 0
    error_message: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class OffsetCommitResponse(Message):
    partitions: list[OffsetCommitPartitionResult]


@dataclass(frozen=True, slots=True, kw_only=True)
class TopicPartitionRef(Struct):
    topic: str
    partition: int


@dataclass(frozen=True, slots=True, kw_only=True)
class OffsetFetchRequest(Message):
    group: str
    #: None: every partition the group has committed.
    partitions: list[TopicPartitionRef] | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class OffsetFetchPartitionResult(Struct):
    topic: str
    partition: int
    #: -1 when the group has committed nothing for the partition.
    offset: int = -1
    metadata: str = ""
    error_code: int = 0
    error_message: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class OffsetFetchResponse(Message):
    partitions: list[OffsetFetchPartitionResult]


# --- broker to controller ---------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class BrokerRegistrationRequest(Message):
    node_id: int
    directory_id: str
    cluster_id: str
    #: Random per process start: tells the controller a broker restarted.
    incarnation: str
    rpc: str
    gossip: str
    raft: str


@dataclass(frozen=True, slots=True, kw_only=True)
class BrokerRegistrationResponse(Message):
    #: The metadata index of the registration; the broker is unfenced once caught up.
    metadata_index: int


@dataclass(frozen=True, slots=True, kw_only=True)
class AlterPartitionRequest(Message):
    """A partition leader asks the controller to change the partition's ISR."""

    broker_id: int
    topic_id: str
    partition: int
    leader_epoch: int
    partition_epoch: int
    new_isr: list[int]


@dataclass(frozen=True, slots=True, kw_only=True)
class AlterPartitionResponse(Message):
    leader: int | None
    leader_epoch: int
    partition_epoch: int
    isr: list[int]


@dataclass(frozen=True, slots=True, kw_only=True)
class ControlledShutdownRequest(Message):
    broker_id: int
    incarnation: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ControlledShutdownResponse(Message):
    #: Partitions this broker still leads (could not be moved: no other ISR member).
    remaining_leaderships: int


for _name, _req, _resp in [
    ("metadata", MetadataRequest, MetadataResponse),
    ("produce", ProduceRequest, ProduceResponse),
    ("fetch", FetchRequest, FetchResponse),
    ("list_offsets", ListOffsetsRequest, ListOffsetsResponse),
    ("offsets_for_leader_epoch", OffsetsForLeaderEpochRequest, OffsetsForLeaderEpochResponse),
    ("replica_status", ReplicaStatusRequest, ReplicaStatusResponse),
    ("cluster_status", ClusterStatusRequest, ClusterStatusResponse),
    ("create_topics", CreateTopicsRequest, CreateTopicsResponse),
    ("delete_topics", DeleteTopicsRequest, DeleteTopicsResponse),
    ("alter_topic", AlterTopicRequest, AlterTopicResponse),
    ("describe_cluster", DescribeClusterRequest, DescribeClusterResponse),
    ("remove_node", RemoveNodeRequest, RemoveNodeResponse),
    ("find_coordinator", FindCoordinatorRequest, FindCoordinatorResponse),
    ("offset_commit", OffsetCommitRequest, OffsetCommitResponse),
    ("offset_fetch", OffsetFetchRequest, OffsetFetchResponse),
    ("broker_registration", BrokerRegistrationRequest, BrokerRegistrationResponse),
    ("alter_partition", AlterPartitionRequest, AlterPartitionResponse),
    ("controlled_shutdown", ControlledShutdownRequest, ControlledShutdownResponse),
]:
    register(_name, _req, _resp)
