"""Requests with values of the right types but no valid meaning get the Kafka error
that names the problem, never UNKNOWN_SERVER_ERROR (the regressions of
tests/cluster/test_request_fuzz.py, one per handler crash it found)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from dlog.broker.offsets import OFFSETS_TOPIC
from dlog.errors import (
    ErrorCode,
    InvalidConfigError,
    InvalidPartitionsError,
    InvalidRequestError,
)
from dlog.net.protocol import (
    NO_EPOCH,
    AlterTopicRequest,
    BrokerRegistrationRequest,
    CreateTopicsRequest,
    FetchPartition,
    FetchRequest,
    FetchResponse,
    ListOffsetsPartition,
    ListOffsetsRequest,
    ListOffsetsResponse,
    NewTopic,
    ProducePartition,
    ProduceRequest,
    ProduceResponse,
)
from tests.unit.broker.dataplane import dataplane_cluster
from tests.unit.broker.test_replication import batch, produce


async def test_list_offsets_refuses_negative_timestamps_it_does_not_define(
    tmp_path: Path,
) -> None:
    async with dataplane_cluster(tmp_path, n=1) as cluster:
        await cluster.create_topic("t", rf=1)
        await produce(cluster, "t", b"a", acks=1)
        resp = await cluster.pool.call(
            cluster.leader_of("t").address,
            ListOffsetsRequest(
                partitions=[
                    ListOffsetsPartition(topic="t", partition=0, timestamp=ts)
                    for ts in (-3, -(1 << 63), -2, -1)
                ]
            ),
        )
        assert isinstance(resp, ListOffsetsResponse)
        assert [r.error_code for r in resp.partitions] == [
            ErrorCode.INVALID_REQUEST,
            ErrorCode.INVALID_REQUEST,
            0,
            0,
        ]
        assert [r.offset for r in resp.partitions[2:]] == [0, 1]


async def test_creating_or_adding_more_partitions_than_a_request_may_is_refused(
    tmp_path: Path,
) -> None:
    # Kafka's limit (10,000 new partitions per request). Without one, a count of 2**63-1
    # kept the controller assigning replicas forever, holding its lock.
    async with dataplane_cluster(tmp_path, n=1) as cluster:
        controller = cluster.controller
        assert controller is not None
        with trio.fail_after(5):
            for count in (10_001, (1 << 63) - 1):
                resp = await controller.create_topics(
                    CreateTopicsRequest(
                        topics=[NewTopic(name="big", partitions=count)], validate_only=True
                    )
                )
                assert [t.error_code for t in resp.topics] == [ErrorCode.INVALID_PARTITIONS]
            # The limit is on the request: two topics of 6,000 partitions exceed it.
            resp = await controller.create_topics(
                CreateTopicsRequest(
                    topics=[NewTopic(name=n, partitions=6_000) for n in ("a", "b")],
                    validate_only=True,
                )
            )
            assert [t.error_code for t in resp.topics] == [ErrorCode.INVALID_PARTITIONS] * 2
            await cluster.create_topic("t", rf=1)
            for count in (10_002, (1 << 63) - 1):
                with pytest.raises(InvalidPartitionsError):
                    await controller.alter_topic(
                        AlterTopicRequest(name="t", partitions=count, validate_only=True)
                    )
        assert len(cluster.image.topics["t"].partitions) == 1


GOOD_REGISTRATION = {
    "node_id": 7,
    "directory_id": "d7",
    "cluster_id": "test",
    "incarnation": "i7",
    "rpc": "127.0.0.1:9407",
    "gossip": "127.0.0.1:9507",
    "raft": "127.0.0.1:9607",
}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("node_id", -1),
        ("directory_id", ""),
        ("incarnation", ""),
        ("rpc", ""),
        ("rpc", "garbage"),
        ("gossip", "127.0.0.1:99999"),
        ("raft", "127.0.0.1:0"),
        ("raft", "[::1"),
    ],
)
async def test_a_registration_that_names_no_reachable_broker_is_refused(
    tmp_path: Path, field: str, value: object
) -> None:
    # Such a broker cannot be talked to, yet the controller would try to add it to the
    # Raft quorum (a learner needs a directory id and an address) on every tick.
    async with dataplane_cluster(tmp_path, n=1) as cluster:
        controller = cluster.controller
        assert controller is not None
        await controller.register_broker(BrokerRegistrationRequest(**GOOD_REGISTRATION))  # type: ignore[arg-type]
        bad = {**GOOD_REGISTRATION, "node_id": 8, field: value}
        with pytest.raises(InvalidRequestError):
            await controller.register_broker(BrokerRegistrationRequest(**bad))  # type: ignore[arg-type]
        assert 7 in cluster.image.brokers
        assert 8 not in cluster.image.brokers and -1 not in cluster.image.brokers


async def test_a_follower_fetch_counts_only_from_a_replica_at_an_offset_in_the_log(
    tmp_path: Path,
) -> None:
    """The leader takes a follower's fetch offset for that follower's log end, which
    moves the HW. An offset beyond the leader's log end (OFFSET_OUT_OF_RANGE) or a
    replica id that is not a follower of the partition (NOT_LEADER_OR_FOLLOWER, or
    UNKNOWN_LEADER_EPOCH when it names an epoch, as Kafka answers) must not: a fetch
    claiming offset 2**62 for a real follower committed records no follower had."""
    async with dataplane_cluster(tmp_path) as cluster:
        await cluster.create_topic("t")
        await produce(cluster, "t", b"committed")
        leader = cluster.leader_of("t")
        followers = [n.node_id for n in cluster.nodes.values() if n is not leader]
        for node in cluster.nodes.values():
            if node is not leader:
                node.rm.fetch_delay_s = 3600
        await trio.lowlevel.checkpoint()
        await produce(cluster, "t", b"not replicated", acks=1)
        p = leader.rm.partitions[("t", 0)]
        assert (p.high_watermark, p.log_end_offset) == (1, 2)

        async def follower_fetch(replica: int, offset: int, epoch: int = NO_EPOCH) -> int:
            resp = await cluster.pool.call(
                leader.address,
                FetchRequest(
                    replica_id=replica,
                    max_wait_ms=0,
                    partitions=[
                        FetchPartition(
                            topic="t",
                            partition=0,
                            fetch_offset=offset,
                            current_leader_epoch=epoch,
                        )
                    ],
                ),
            )
            assert isinstance(resp, FetchResponse)
            return resp.partitions[0].error_code

        for replica in followers:
            assert await follower_fetch(replica, 1 << 62) == ErrorCode.OFFSET_OUT_OF_RANGE
            assert await follower_fetch(replica, 3) == ErrorCode.OFFSET_OUT_OF_RANGE
        for stranger in (leader.node_id, 99):
            assert await follower_fetch(stranger, 2) == ErrorCode.NOT_LEADER_OR_FOLLOWER
            assert await follower_fetch(stranger, 2, p.leader_epoch) == (
                ErrorCode.UNKNOWN_LEADER_EPOCH
            )
        assert (p.high_watermark, p.log_end_offset) == (1, 2)
        assert sorted(p.followers) == sorted(followers)
        # A real follower at a real offset still moves the HW.
        for replica in followers:
            assert await follower_fetch(replica, 2) == 0
        assert p.high_watermark == 2


async def test_produce_partition_sizes_must_frame_the_payload_exactly(tmp_path: Path) -> None:
    """The payload is cut into the partitions' record sets by their sizes, in order. A
    negative size, or sizes that do not add up to the payload, leave no meaning to any
    cut: the request is refused whole and nothing is written. (A negative size moved
    the cursor backwards, and the next partition took bytes from the wrong place.)"""
    async with dataplane_cluster(tmp_path, n=1) as cluster:
        await cluster.create_topic("t", rf=1)
        leader = cluster.leader_of("t")
        one = batch(b"x")
        cases = [
            ([-2 * len(one), len(one)], one + one),
            ([len(one), -1], one),
            ([len(one)], one + b"trailing"),
            ([len(one), len(one)], one),
        ]
        for sizes, payload in cases:
            with pytest.raises(InvalidRequestError, match="sizes"):
                await cluster.pool.call(
                    leader.address,
                    ProduceRequest(
                        acks=1,
                        timeout_ms=1000,
                        partitions=[
                            ProducePartition(topic="t", partition=0, size=size) for size in sizes
                        ],
                        payload=payload,
                    ),
                )
        assert leader.rm.partitions[("t", 0)].log_end_offset == 0
        # An empty record set is that partition's error alone.
        resp = await cluster.pool.call(
            leader.address,
            ProduceRequest(
                acks=1,
                timeout_ms=1000,
                partitions=[
                    ProducePartition(topic="t", partition=0, size=0),
                    ProducePartition(topic="t", partition=0, size=len(one)),
                ],
                payload=one,
            ),
        )
        assert isinstance(resp, ProduceResponse)
        assert [r.error_code for r in resp.partitions] == [ErrorCode.INVALID_REQUEST, 0]


async def test_a_topic_config_beyond_64_bits_is_refused_and_the_largest_one_works(
    tmp_path: Path,
) -> None:
    # flush_ms=10**400 was accepted; the first append then made the log's flush timer
    # divide it into a float, and the OverflowError stopped the whole node.
    async with dataplane_cluster(tmp_path, n=1) as cluster:
        for key in ("flush_ms", "segment_ms", "retention_ms", "max_timestamp_skew_ms"):
            name = key.replace("_", "-")
            with pytest.raises(InvalidConfigError):
                await cluster.create_topic(name, rf=1, **{key: "9" * 400})
            await cluster.create_topic(name, rf=1, **{key: str((1 << 63) - 1)})
            resp = await produce(cluster, name, b"a", acks=1)
            assert resp.partitions[0].error_code == 0
        # What the flush timer (every 100 ms) asks of a log with unflushed records.
        log = cluster.leader_of("flush-ms").rm.partitions[("flush-ms", 0)].log
        assert log.needs_flush
        assert not log.flush_due(trio.current_time())


@pytest.mark.parametrize("timeout_ms", [-1, -(1 << 63), 0])
async def test_a_produce_that_fsyncs_first_takes_a_negative_timeout_as_none(
    tmp_path: Path, timeout_ms: int
) -> None:
    # As Kafka, a timeout <= 0 waits for nothing. A produce to a topic that fsyncs
    # before acknowledging handed a negative one to trio.move_on_after, whose
    # ValueError made the written records' answer UNKNOWN_SERVER_ERROR.
    async with dataplane_cluster(tmp_path, n=1) as cluster:
        await cluster.create_topic("t", rf=1, flush_messages="1")
        for acks in (-1, 1):
            resp = await produce(cluster, "t", b"a", acks=acks, timeout_ms=timeout_ms)
            assert resp.partitions[0].error_code == 0
        assert cluster.leader_of("t").rm.partitions[("t", 0)].high_watermark == 2


async def test_the_offsets_topic_keeps_its_partition_count(tmp_path: Path) -> None:
    # A group's coordinator is partition crc32(group) % count: adding partitions sends
    # groups to partitions that hold none of their commits, which are then lost.
    async with dataplane_cluster(tmp_path, n=1) as cluster:
        controller = cluster.controller
        assert controller is not None
        await cluster.create_topic(OFFSETS_TOPIC, partitions=2, rf=1)
        for validate_only in (True, False):
            with pytest.raises(InvalidPartitionsError, match="cannot change"):
                await controller.alter_topic(
                    AlterTopicRequest(name=OFFSETS_TOPIC, partitions=3, validate_only=validate_only)
                )
        assert len(cluster.image.topics[OFFSETS_TOPIC].partitions) == 2
        # Its configs may change, and asking for the count it has changes nothing.
        await controller.alter_topic(
            AlterTopicRequest(name=OFFSETS_TOPIC, partitions=2, configs={"retention_ms": "-1"})
        )
        assert cluster.image.topics[OFFSETS_TOPIC].configs == {"retention_ms": "-1"}
