from __future__ import annotations

from dlog.broker.metadata import MetadataImage
from dlog.broker.placement import assign_replicas
from dlog.broker.records import (
    AlterConfigs,
    CreatePartitions,
    CreateTopic,
    DeleteTopic,
    FenceBroker,
    PartitionAssignment,
    PartitionChange,
    RegisterBroker,
    UnfenceBroker,
    decode_batch,
    encode_batch,
)


def register(image: MetadataImage, node: int, inc: str = "a", index: int = 1) -> None:
    rec = RegisterBroker(
        node_id=node, directory_id=f"d{node}", incarnation=inc, rpc=f"h:{node}", gossip="", raft=""
    )
    image.apply_entry(index, encode_batch([rec, UnfenceBroker(node_id=node, incarnation=inc)]))


def topic(name: str = "t", topic_id: str = "id1", n: int = 2) -> CreateTopic:
    return CreateTopic(
        name=name,
        topic_id=topic_id,
        configs={"retention_ms": "1000"},
        partitions=[
            PartitionAssignment(partition=i, replicas=[1, 2, 3], isr=[1, 2, 3], leader=1 + i % 3)
            for i in range(n)
        ],
    )


def test_batch_codec_round_trip() -> None:
    records = [topic(), FenceBroker(node_id=1, incarnation="x"), DeleteTopic(topic_id="id1")]
    assert decode_batch(encode_batch(records)) == records


def test_register_fence_unfence_by_incarnation() -> None:
    image = MetadataImage()
    register(image, 1)
    assert not image.brokers[1].fenced
    # A restart (new incarnation) comes back fenced.
    image.apply_entry(
        2,
        encode_batch(
            [
                RegisterBroker(
                    node_id=1, directory_id="d1", incarnation="b", rpc="h", gossip="", raft=""
                )
            ]
        ),
    )
    assert image.brokers[1].fenced
    # An unfence for the old incarnation is skipped.
    delta = image.apply_entry(3, encode_batch([UnfenceBroker(node_id=1, incarnation="a")]))
    assert delta.skipped == {0: "stale incarnation"}
    assert image.brokers[1].fenced
    image.apply_entry(4, encode_batch([UnfenceBroker(node_id=1, incarnation="b")]))
    assert not image.brokers[1].fenced
    assert image.applied_index == 4


def test_partition_change_bumps_epochs_and_rejects_stale() -> None:
    image = MetadataImage()
    image.apply_entry(1, encode_batch([topic()]))
    p = image.partition("t", 0)
    assert p is not None
    assert (p.leader, p.leader_epoch, p.partition_epoch) == (1, 0, 0)
    # ISR shrink, same leader: partition epoch bumps, leader epoch does not.
    image.apply_entry(
        2,
        encode_batch(
            [PartitionChange(topic_id="id1", partition=0, partition_epoch=0, leader=1, isr=[1, 2])]
        ),
    )
    p = image.partition("t", 0)
    assert p is not None
    assert (p.isr, p.leader_epoch, p.partition_epoch) == ((1, 2), 0, 1)
    # New leader: both bump.
    image.apply_entry(
        3,
        encode_batch(
            [PartitionChange(topic_id="id1", partition=0, partition_epoch=1, leader=2, isr=[2])]
        ),
    )
    p = image.partition("t", 0)
    assert p is not None
    assert (p.leader, p.leader_epoch, p.partition_epoch) == (2, 1, 2)
    # Stale epoch, empty ISR, leader outside ISR, non-replica: all skipped.
    delta = image.apply_entry(
        4,
        encode_batch(
            [
                PartitionChange(topic_id="id1", partition=0, partition_epoch=1, leader=3, isr=[3]),
                PartitionChange(
                    topic_id="id1", partition=0, partition_epoch=2, leader=None, isr=[]
                ),
                PartitionChange(topic_id="id1", partition=0, partition_epoch=2, leader=3, isr=[2]),
                PartitionChange(topic_id="id1", partition=0, partition_epoch=2, leader=9, isr=[9]),
            ]
        ),
    )
    assert set(delta.skipped) == {0, 1, 2, 3}
    p = image.partition("t", 0)
    assert p is not None
    assert p.partition_epoch == 2
    # Going offline bumps the leader epoch too.
    image.apply_entry(
        5,
        encode_batch(
            [PartitionChange(topic_id="id1", partition=0, partition_epoch=2, leader=None, isr=[2])]
        ),
    )
    p = image.partition("t", 0)
    assert p is not None
    assert (p.leader, p.leader_epoch) == (None, 2)


def test_topic_lifecycle_and_delta() -> None:
    image = MetadataImage()
    delta = image.apply_entry(1, encode_batch([topic(n=2)]))
    assert delta.created_topics == {"t"}
    assert delta.partitions == {("t", 0), ("t", 1)}
    assert image.apply_entry(2, encode_batch([topic(n=1)])).skipped == {0: "topic exists"}
    delta = image.apply_entry(
        3,
        encode_batch(
            [
                CreatePartitions(
                    topic_id="id1",
                    partitions=[PartitionAssignment(partition=2, replicas=[2], isr=[2], leader=2)],
                ),
                AlterConfigs(topic_id="id1", configs={"retention_ms": None, "segment_ms": "5"}),
            ]
        ),
    )
    assert delta.partitions == {("t", 2)}
    assert image.topics["t"].configs == {"segment_ms": "5"}
    delta = image.apply_entry(4, encode_batch([DeleteTopic(topic_id="id1")]))
    assert delta.deleted_topics == [("t", "id1", 3)]
    assert "t" not in image.topics
    # Same name, new id.
    image.apply_entry(5, encode_batch([topic(topic_id="id2")]))
    assert image.topics["t"].topic_id == "id2"


def test_snapshot_restore_is_identical() -> None:
    image = MetadataImage()
    register(image, 1)
    register(image, 2, index=2)
    image.apply_entry(3, encode_batch([topic(n=3)]))
    image.apply_entry(
        4,
        encode_batch(
            [PartitionChange(topic_id="id1", partition=1, partition_epoch=0, leader=3, isr=[3])]
        ),
    )
    other = MetadataImage()
    other.apply_entry(1, encode_batch([topic(name="gone", topic_id="old")]))
    delta = other.restore(image.snapshot())
    assert other.snapshot() == image.snapshot()
    assert other.applied_index == 4
    assert delta.deleted_topics == [("gone", "old", 2)]
    assert other.partition("t", 1) == image.partition("t", 1)


def test_undecodable_entry_is_skipped_not_fatal() -> None:
    image = MetadataImage()
    delta = image.apply_entry(7, b"\xff\x00garbage")
    assert delta.empty
    assert image.applied_index == 7


def test_placement_spreads_leaders_evenly() -> None:
    assignments = assign_replicas(0, 6, 3, [1, 2, 3], {}, {})
    leaders = [a.leader for a in assignments]
    assert sorted(leaders.count(b) for b in (1, 2, 3)) == [2, 2, 2]
    for a in assignments:
        assert a.replicas[0] == a.leader
        assert sorted(a.replicas) == [1, 2, 3]
        assert a.isr == a.replicas


def test_placement_least_loaded_first() -> None:
    # Broker 3 already leads and holds much more: new partitions avoid it.
    assignments = assign_replicas(0, 4, 2, [1, 2, 3], {3: 10}, {3: 10})
    assert all(a.leader in (1, 2) for a in assignments)
    replica_counts = {b: sum(b in a.replicas for a in assignments) for b in (1, 2, 3)}
    assert replica_counts == {1: 4, 2: 4, 3: 0}


def test_placement_rf_too_large() -> None:
    import pytest

    from dlog.errors import InvalidReplicationFactorError

    with pytest.raises(InvalidReplicationFactorError, match="larger than"):
        assign_replicas(0, 1, 4, [1, 2, 3], {}, {})


def test_a_removed_directory_cannot_register_again() -> None:
    from dlog.broker.records import UnregisterBroker

    image = MetadataImage()
    register(image, 4)
    image.apply_entry(2, encode_batch([UnregisterBroker(node_id=4)]))
    assert 4 not in image.brokers
    delta = image.apply_entry(
        3,
        encode_batch(
            [
                RegisterBroker(
                    node_id=4, directory_id="d4", incarnation="b", rpc="", gossip="", raft=""
                )
            ]
        ),
    )
    assert delta.skipped == {0: "removed for good"}
    # A wiped node (new directory id) may come back as a new member.
    image.apply_entry(
        4,
        encode_batch(
            [
                RegisterBroker(
                    node_id=4, directory_id="fresh", incarnation="c", rpc="", gossip="", raft=""
                )
            ]
        ),
    )
    assert image.brokers[4].directory_id == "fresh"
    other = MetadataImage()
    other.restore(image.snapshot())
    assert other.removed_directories == {"d4"}
