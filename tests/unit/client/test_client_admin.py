"""Admin calls and the metadata cache: results, errors, retries, broker failover."""

from __future__ import annotations

import json

import pytest
import trio

from dlog.errors import (
    BrokerIdNotRegisteredError,
    ErrorCode,
    InvalidPartitionsError,
    InvalidReplicationFactorError,
    InvalidTopicError,
    LeaderNotAvailableError,
    TopicAlreadyExistsError,
    UnknownTopicOrPartitionError,
)
from dlog.net.protocol import EARLIEST_TIMESTAMP, LATEST_TIMESTAMP, MetadataRequest
from tests.unit.client.fake_broker import open_fake_cluster


async def test_create_list_describe_delete(autojump_clock: trio.abc.Clock) -> None:
    async with open_fake_cluster(3) as cluster, cluster.connect() as client:
        topic_id = await client.create_topic(
            "orders", partitions=3, replication_factor=2, config={"retention_ms": 1000}
        )
        assert topic_id == cluster.topics["orders"].topic_id
        assert cluster.topics["orders"].configs == {"retention_ms": "1000"}
        cluster.append_values("orders", 1, [b"a", b"b"])
        listing = await client.list_topics()
        assert [(t.name, t.partitions, t.replication_factor) for t in listing] == [("orders", 3, 2)]
        description = await client.describe_topic("orders")
        assert json.loads(json.dumps(description.to_dict())) == {
            "name": "orders",
            "partitions": [
                {
                    "partition": p,
                    "leader": p + 1,
                    "leader_epoch": 0,
                    "replicas": cluster.partition("orders", p).replicas,
                    "isr": cluster.partition("orders", p).replicas,
                    "high_watermark": 2 if p == 1 else 0,
                    "log_end_offset": 2 if p == 1 else 0,
                }
                for p in range(3)
            ],
        }
        await client.delete_topic("orders")
        assert await client.list_topics() == []
        with pytest.raises(UnknownTopicOrPartitionError, match="'orders' does not exist"):
            await client.describe_topic("orders")
        with pytest.raises(UnknownTopicOrPartitionError, match="'orders' does not exist"):
            await client.delete_topic("orders")


async def test_describe_without_a_reachable_leader_leaves_offsets_unknown(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_fake_cluster(2) as cluster, cluster.connect(request_timeout_ms=500) as client:
        cluster.create_topic("t", 2)
        cluster.stop_broker(2)
        description = await client.describe_topic("t")
        assert [(p.partition, p.high_watermark) for p in description.partitions] == [
            (0, 0),
            (1, None),
        ]


async def test_admin_errors_have_one_clear_message(autojump_clock: trio.abc.Clock) -> None:
    async with open_fake_cluster(2) as cluster, cluster.connect() as client:
        await client.create_topic("t")
        with pytest.raises(TopicAlreadyExistsError) as info:
            await client.create_topic("t")
        assert str(info.value) == "TOPIC_ALREADY_EXISTS: topic 't' already exists"
        with pytest.raises(InvalidReplicationFactorError):
            await client.create_topic("u", replication_factor=3)
        with pytest.raises(InvalidTopicError):
            await client.create_topic("bad name!")
        with pytest.raises(InvalidPartitionsError):
            await client.alter_topic("t", partitions=0)


async def test_no_such_topic_or_node_from_the_controller_is_final(
    autojump_clock: trio.abc.Clock,
) -> None:
    """UNKNOWN_TOPIC_OR_PARTITION and BROKER_ID_NOT_REGISTERED are retriable in
    general (metadata still propagating), but the controller answers admin requests from
    committed metadata: retrying its "does not exist" for the whole API timeout only
    made a typo take 20 s to report."""
    async with open_fake_cluster(2) as cluster, cluster.connect() as client:
        start = trio.current_time()
        with pytest.raises(UnknownTopicOrPartitionError, match="'nosuch' does not exist"):
            await client.alter_topic("nosuch", partitions=5)
        with pytest.raises(BrokerIdNotRegisteredError):
            await client.remove_node(77)
        assert trio.current_time() - start < 1
        assert len(cluster.requests_of("alter_topic")) == 1
        assert len(cluster.requests_of("remove_node")) == 1


async def test_retriable_admin_errors_are_retried(autojump_clock: trio.abc.Clock) -> None:
    async with open_fake_cluster(2) as cluster, cluster.connect() as client:
        cluster.inject("create_topics", ErrorCode.NOT_CONTROLLER, times=2, controller=1)
        await client.create_topic("t")
        assert "t" in cluster.topics
        assert len(cluster.requests_of("create_topics")) == 3


async def test_alter_topic_grows_partitions_and_changes_configs(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_fake_cluster() as cluster, cluster.connect() as client:
        await client.create_topic("t", config={"a": "1", "b": "2"})
        await client.alter_topic("t", partitions=3, config={"a": None, "b": 5, "c": True})
        assert len(cluster.topics["t"].partitions) == 3
        assert cluster.topics["t"].configs == {"b": "5", "c": "true"}
        # A producer sees the new partitions after its metadata refresh.
        await client.wait_for_topic("t")
        assert len(client.cluster.topics["t"].partitions) == 3


async def test_wait_for_topic(autojump_clock: trio.abc.Clock) -> None:
    async with open_fake_cluster() as cluster, cluster.connect() as client:
        with pytest.raises(UnknownTopicOrPartitionError, match="did not appear within 1s"):
            await client.wait_for_topic("t", timeout=1)
        cluster.create_topic("t", 2)
        cluster.move_leader("t", 1, None)
        with pytest.raises(LeaderNotAvailableError, match=r"partitions \[1\] have no leader"):
            await client.wait_for_topic("t", timeout=1)

        async def elect_later() -> None:
            await trio.sleep(0.5)
            cluster.move_leader("t", 1, 1)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(elect_later)
            start = trio.current_time()
            await client.wait_for_topic("t", timeout=5)
            assert 0.5 <= trio.current_time() - start < 1.5


async def test_list_offsets(autojump_clock: trio.abc.Clock) -> None:
    async with open_fake_cluster() as cluster, cluster.connect() as client:
        cluster.create_topic("t")
        cluster.append_values("t", 0, [b"a", b"b"])
        cluster.clock.advance(1000)
        cluster.append_values("t", 0, [b"c"])
        cluster.delete_records_before("t", 0, 0)
        assert await client.earliest_offset("t", 0) == 0
        assert await client.latest_offset("t", 0) == 3
        later = await client.list_offsets("t", 0, cluster.clock.now_ms() - 10)
        assert (later.offset, later.timestamp) == (2, cluster.clock.now_ms())
        none = await client.list_offsets("t", 0, cluster.clock.now_ms() + 10)
        assert (none.offset, none.timestamp) == (None, None)
        early = await client.list_offsets("t", 0, EARLIEST_TIMESTAMP)
        assert early.offset == 0
        assert (await client.list_offsets("t", 0, LATEST_TIMESTAMP)).offset == 3
        with pytest.raises(UnknownTopicOrPartitionError, match="no partition 4"):
            await client.earliest_offset("t", 4)


async def test_list_offsets_follows_the_leader(autojump_clock: trio.abc.Clock) -> None:
    async with open_fake_cluster(2) as cluster, cluster.connect() as client:
        cluster.create_topic("t", leaders=[1])
        await client.wait_for_topic("t")
        cluster.move_leader("t", 0, 2)
        assert await client.latest_offset("t", 0) == 0
        assert [n for n, _ in cluster.requests_of("list_offsets")] == [1, 2]


async def test_cluster_calls(autojump_clock: trio.abc.Clock) -> None:
    async with open_fake_cluster(3) as cluster, cluster.connect() as client:
        description = await client.describe_cluster()
        assert description.controller == 1
        assert [b.node_id for b in description.brokers] == [1, 2, 3]
        assert [m.role for m in description.raft_members] == ["voter"] * 3
        assert description.to_dict()["brokers"][0]["rpc"] == cluster.brokers[1].address
        status = await client.cluster_status()
        assert status.cluster_id == "fake-cluster"
        await client.remove_node(3)
        assert [b.node_id for b in (await client.describe_cluster()).brokers] == [1, 2]


async def test_metadata_tries_the_next_broker_when_one_is_down(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_fake_cluster(3) as cluster, cluster.connect() as client:
        cluster.create_topic("t", 3)
        await client.wait_for_topic("t")
        cluster.stop_broker(1)
        cluster.stop_broker(2)
        await client.create_topic("u")  # answered by node 3
        await client.wait_for_topic("u")  # metadata from node 3 (asks for "u" by name)
        assert "u" in client.cluster.topics
        assert {n for n, _ in cluster.requests_of("create_topics")} == {3}


async def test_metadata_gets_past_a_broker_that_hangs(autojump_clock: trio.abc.Clock) -> None:
    # The broker that answered last is asked first; when it hangs (a paused process
    # answers nothing, fails nothing) a refresh must not wait out the 30 s request
    # timeout: producers and consumers learn leader moves from these refreshes.
    async with open_fake_cluster(2) as cluster, cluster.connect() as client:
        cluster.create_topic("t", leaders=[1])
        await client.wait_for_topic("t")
        asked = {n for n, _ in cluster.requests_of("metadata")}
        assert asked == {1}  # the first bootstrap address answered
        cluster.hung_nodes.add(1)
        cluster.move_leader("t", 0, 2)
        start = trio.current_time()
        view = await client.refresh_metadata()
        assert trio.current_time() - start <= 2.5
        assert view.leader("t", 0) == (2, cluster.brokers[2].address)
        # The broker that answered is asked first from now on.
        start = trio.current_time()
        await client.refresh_metadata()
        assert trio.current_time() - start < 0.5


async def test_metadata_is_refreshed_periodically(autojump_clock: trio.abc.Clock) -> None:
    async with (
        open_fake_cluster() as cluster,
        cluster.connect(metadata_max_age_ms=10_000) as client,
    ):
        cluster.create_topic("t")
        await client.wait_for_topic("t")
        asked = len(cluster.requests_of("metadata"))
        await trio.sleep(35)
        assert len(cluster.requests_of("metadata")) == asked + 3
        # Only the topics in use are asked for.
        _, last = cluster.requests_of("metadata")[-1]
        assert isinstance(last, MetadataRequest)


async def test_refresh_requests_are_coalesced(autojump_clock: trio.abc.Clock) -> None:
    async with open_fake_cluster() as cluster, cluster.connect() as client:
        cluster.create_topic("t")
        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(client.refresh_metadata)
        assert len(cluster.requests_of("metadata")) <= 2


async def test_tcp_round_trip_and_dropped_connections() -> None:
    async with open_fake_cluster(2, transport="tcp") as cluster, cluster.connect() as client:
        await client.create_topic("t", partitions=2)
        await client.wait_for_topic("t")
        values = [b"tcp-%05d" % i for i in range(5000)]
        async with client.producer(batch_size=16 * 1024) as producer:
            first = await producer.send_many("t", values[:2500])
            for broker in cluster.brokers.values():
                broker.server.drop_connections()
            second = await producer.send_many("t", values[2500:])
        assert sum(b.record_count for b in first + second) == 5000
        async with client.consumer("t", from_beginning=True) as consumer:
            got: list[bytes] = []
            while len(got) < 5000:
                batch = await consumer.getmany(timeout_ms=5000)
                assert batch
                for records in batch.values():
                    got += [r.value for r in records if r.value is not None]
        assert sorted(got) == values


async def test_tcp_broker_restart() -> None:
    async with (
        open_fake_cluster(1, transport="tcp") as cluster,
        cluster.connect(retry_backoff_ms=10) as client,
    ):
        cluster.create_topic("t")
        async with client.producer(linger_ms=0) as producer:
            assert (await producer.send("t", b"before")).offset == 0
            cluster.stop_broker(1)
            handle = producer.send_nowait("t", b"during")
            await cluster.start_broker(1)
            assert (await handle).offset == 1
