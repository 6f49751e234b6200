from __future__ import annotations

import pytest

from dlog.net import protocol as p
from dlog.net.messages import from_body, operations, to_body


def test_every_operation_round_trips_a_typical_message() -> None:
    samples = [
        p.MetadataResponse(
            cluster_id="c",
            controller=1,
            brokers=[p.BrokerInfo(node_id=1, rpc="h:1", alive=True)],
            topics=[
                p.TopicMetadata(
                    name="t",
                    topic_id="id",
                    partitions=[
                        p.PartitionMetadata(
                            partition=0, leader=None, leader_epoch=3, replicas=[1, 2], isr=[1]
                        )
                    ],
                    configs={"retention_ms": 5},
                )
            ],
        ),
        p.ProduceRequest(
            acks=-1,
            timeout_ms=1000,
            partitions=[p.ProducePartition(topic="t", partition=0, size=3)],
        ),
        p.FetchRequest(partitions=[p.FetchPartition(topic="t", partition=1, fetch_offset=9)]),
        p.AlterTopicRequest(name="t", configs={"retention_ms": None, "segment_ms": "10"}),
        p.OffsetFetchRequest(group="g", partitions=None),
    ]
    for message in samples:
        assert from_body(type(message), to_body(message)) == message


def test_registered() -> None:
    ops = operations()
    for name in [
        "metadata",
        "produce",
        "fetch",
        "create_topics",
        "offset_commit",
        "cluster_status",
    ]:
        assert name in ops


@pytest.mark.parametrize(
    ("text", "value"), [("all", -1), ("-1", -1), ("leader", 1), ("1", 1), ("none", 0), (0, 0)]
)
def test_acks_aliases(text: str, value: int) -> None:
    assert p.acks_from_text(text) == value


def test_bad_acks() -> None:
    with pytest.raises(ValueError, match="acks"):
        p.acks_from_text("most")
