"""The group coordinator's committed offsets: log order and the high watermark."""

from __future__ import annotations

from pathlib import Path

import cbor2
import pytest
import trio

from dlog.broker.offsets import OFFSETS_TOPIC, GroupCoordinator, PartitionOffsets
from dlog.broker.partition import Partition
from dlog.errors import CoordinatorLoadInProgressError, ErrorCode
from dlog.net.protocol import (
    OffsetCommitPartition,
    OffsetCommitRequest,
    OffsetFetchRequest,
    ProducePartition,
    ProduceRequest,
    ProduceResponse,
    TopicPartitionRef,
)
from dlog.storage import BatchBuilder
from tests.unit.broker.dataplane import DataPlaneCluster, Node, dataplane_cluster, wait_until

GROUP = "g"


async def start(cluster: DataPlaneCluster) -> tuple[Node, Partition]:
    await cluster.create_topic(OFFSETS_TOPIC, partitions=1)
    leader = cluster.leader_of(OFFSETS_TOPIC)
    return leader, leader.rm.partitions[(OFFSETS_TOPIC, 0)]


def coordinator(node: Node, cluster: DataPlaneCluster, timeout_s: float = 5) -> GroupCoordinator:
    """A coordinator on ``node``: a new one loads the partition (a takeover)."""
    return GroupCoordinator(node.rm, cluster.clock, commit_timeout_s=timeout_s)


async def commit(c: GroupCoordinator, offset: int) -> int:
    response = await c.commit(
        OffsetCommitRequest(
            group=GROUP, partitions=[OffsetCommitPartition(topic="t", partition=0, offset=offset)]
        )
    )
    return response.partitions[0].error_code


async def fetched(c: GroupCoordinator) -> int:
    response = await c.fetch(
        OffsetFetchRequest(group=GROUP, partitions=[TopicPartitionRef(topic="t", partition=0)])
    )
    return response.partitions[0].offset


def test_a_record_applies_only_over_an_older_one() -> None:
    key = (GROUP, "t", 0)
    state = PartitionOffsets(epoch=0)
    state.add(5, key, 50, "", high_watermark=0)
    state.add(6, key, 60, "", high_watermark=0)
    assert state.offsets == {}  # nothing is below the HW yet
    state.advance(6)
    assert state.offsets[key].offset == 50
    state.advance(7)
    assert state.offsets[key].offset == 60
    state.add(4, key, 40, "", high_watermark=7)  # an older record changes nothing
    assert state.offsets[key] == (60, "", 6)


async def test_concurrent_commits_end_in_log_order(tmp_path: Path) -> None:
    """Two commits of one key in flight; the first appended is the last whose wait for
    the HW ends. OffsetFetch, and a new coordinator replaying the log, give the one
    appended last."""
    async with dataplane_cluster(tmp_path) as cluster:
        leader, p = await start(cluster)
        c = coordinator(leader, cluster)
        assert await commit(c, 1) == 0  # loads the partition

        first_offset = p.log_end_offset
        second_done = trio.Event()
        wait = p.wait_for_high_watermark

        async def first_wakes_last(offset: int) -> None:
            await wait(offset)
            if offset == first_offset:
                await second_done.wait()

        p.wait_for_high_watermark = first_wakes_last  # type: ignore[method-assign]
        codes: dict[int, int] = {}

        async def run(offset: int) -> None:
            codes[offset] = await commit(c, offset)
            if offset == 12:
                second_done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, 11)
            await wait_until(lambda: p.log_end_offset == first_offset + 1)
            nursery.start_soon(run, 12)
        assert codes == {11: 0, 12: 0}
        assert await fetched(c) == 12
        assert await fetched(coordinator(leader, cluster)) == 12


async def test_a_takeover_serves_only_replicated_commits(tmp_path: Path) -> None:
    """A commit above the HW (not replicated, so a failover may drop it) is not served,
    neither by the coordinator that appended it nor by one that takes over, until the
    HW passes it; then both serve it, as replaying the log does."""
    async with dataplane_cluster(tmp_path, replica_lag_time_max_ms=60_000) as cluster:
        leader, p = await start(cluster)
        c = coordinator(leader, cluster, timeout_s=0.3)
        assert await commit(c, 1) == 0
        followers = [n for n in cluster.nodes.values() if n is not leader]
        for node in followers:
            node.rm.fetch_delay_s = 3600
        await trio.sleep(0.1)  # (long-polls in flight return)
        assert await commit(c, 2) == ErrorCode.REQUEST_TIMED_OUT
        assert p.high_watermark < p.log_end_offset
        assert await fetched(c) == 1

        new = coordinator(leader, cluster, timeout_s=0.3)
        with pytest.raises(CoordinatorLoadInProgressError):
            await fetched(new)  # what it loaded is not all below the HW
        for node in followers:
            node.rm.fetch_delay_s = 0
        await wait_until(lambda: p.high_watermark == p.log_end_offset)
        assert await fetched(new) == 2
        assert await fetched(c) == 2


async def test_clients_may_not_produce_to_the_offsets_topic(tmp_path: Path) -> None:
    """As in Kafka (INVALID_TOPIC_EXCEPTION): its records are the coordinator's, and a
    client's would be replayed as commits by every coordinator that takes over."""
    async with dataplane_cluster(tmp_path) as cluster:
        leader, p = await start(cluster)
        c = coordinator(leader, cluster)
        assert await commit(c, 1) == 0
        end = p.log_end_offset
        builder = BatchBuilder(1)
        builder.append(cbor2.dumps([5, ""]), key=cbor2.dumps([GROUP, "t", 0]))
        forged = bytes(builder.build())
        resp = await cluster.pool.call(
            leader.address,
            ProduceRequest(
                acks=1,
                timeout_ms=1000,
                partitions=[ProducePartition(topic=OFFSETS_TOPIC, partition=0, size=len(forged))],
                payload=forged,
            ),
        )
        assert isinstance(resp, ProduceResponse)
        assert resp.partitions[0].error_code == ErrorCode.INVALID_TOPIC_EXCEPTION
        assert p.log_end_offset == end
        assert await fetched(coordinator(leader, cluster)) == 1


async def test_a_takeover_skips_records_it_cannot_have_written(tmp_path: Path) -> None:
    """Records of the offsets topic that are no commit (a key or value of other types,
    e.g. written by a client before clients were refused) are skipped when a coordinator
    replays the partition; an unhashable key made every takeover fail."""
    async with dataplane_cluster(tmp_path) as cluster:
        leader, p = await start(cluster)
        assert await commit(coordinator(leader, cluster), 1) == 0
        builder = BatchBuilder(1)
        for key, value in [
            ([[GROUP], "t", 0], [7, ""]),  # unhashable group
            ([GROUP, {"t": 1}, 0], [7, ""]),  # unhashable topic
            ([GROUP, "t", 0], ["seven", ""]),  # not an offset
            ([GROUP, "t", 0], [7, ["not", "metadata"]]),
            ([GROUP, "t", 0.5], [7, ""]),  # not a partition
        ]:
            builder.append(cbor2.dumps(value), key=cbor2.dumps(key))
        p.append_as_leader(builder.build())
        await wait_until(lambda: p.high_watermark == p.log_end_offset)
        assert await fetched(coordinator(leader, cluster)) == 1
