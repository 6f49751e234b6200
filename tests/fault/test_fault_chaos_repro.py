"""Reproductions of bugs the chaos soak (test_fault_chaos.py) turned up, kept as
regression tests: a restarted leader with a torn tail must not truncate the replicas
that have its records, and concurrent offset commits must end in log order.
"""

from __future__ import annotations

import os
from pathlib import Path

import cbor2
import pytest
import trio

import dlog
from dlog.net.protocol import (
    FindCoordinatorRequest,
    FindCoordinatorResponse,
    OffsetCommitPartition,
    OffsetCommitRequest,
    OffsetCommitResponse,
    OffsetFetchRequest,
    OffsetFetchResponse,
    TopicPartitionRef,
)
from dlog.storage import decode_records
from tests.fault.processes import process_cluster
from tests.fault.workload import consume_all, read_replica_log, wait_replicas_converged

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


async def test_restarted_leader_with_a_torn_tail_does_not_truncate_its_followers(
    tmp_path: Path,
) -> None:
    """One machine loses the unflushed tail of a partition (power loss; simulated by
    cutting its segment while the node is down) and restarts while the controller is
    stalled. Two other replicas hold every acknowledged record, so replication must
    keep them (DESIGN.md: "replication across machines is what protects it")."""
    topic = "torn"
    async with (
        process_cluster(tmp_path) as cluster,
        dlog.connect(cluster.bootstrap) as client,
    ):
        await client.create_topic(topic, partitions=3, replication_factor=3)
        await client.wait_for_topic(topic)
        controller = await cluster.controller(cluster.node_ids[0])
        parts = await cluster.partitions(cluster.node_ids[0], topic)
        p = next(q for q, info in parts.items() if info.leader != controller)
        leader = parts[p].leader
        assert controller is not None and leader is not None
        values = [b"v-%06d" % i for i in range(3000)]
        async with client.producer(acks="all", linger_ms=0, batch_size=4096) as producer:
            for i in range(0, len(values), 100):
                await producer.send_many(topic, values[i : i + 100], partition=p)

        cluster.pause(controller)  # nobody fences the leader while it is down
        cluster.kill(leader)
        segment = cluster.data_dir(leader) / "logs" / f"{topic}-{p}" / f"{0:020d}.log"
        os.truncate(segment, segment.stat().st_size - 20_000)
        cluster.start(leader)
        await trio.sleep(8)
        cluster.resume(controller)

        await wait_replicas_converged(cluster, topic, 3, timeout=60)
        seen = await consume_all(cluster.bootstrap, topic, 3)
        missing = sorted(set(values) - set(seen[p]))
        assert not missing, f"{len(missing)} acknowledged records lost, first {missing[:3]}"


async def test_concurrent_offset_commits_leave_the_last_appended_one(tmp_path: Path) -> None:
    """Two commits for one (group, topic, partition) in flight at once, both
    acknowledged: OffsetFetch must return the one appended last, which is also what a
    new coordinator replaying the offsets partition finds."""
    async with (
        process_cluster(tmp_path) as cluster,
        dlog.connect(cluster.bootstrap) as client,
    ):
        await client.create_topic("t", partitions=1, replication_factor=3)
        await client.wait_for_topic("t")
        group = "g"
        async with client.consumer("t", group=group) as consumer:
            await consumer.commit({0: 0})  # creates and loads the offsets partition
        found = await cluster.pool.call_typed(
            cluster.bootstrap[0], FindCoordinatorRequest(group=group), FindCoordinatorResponse
        )
        fetched: dict[int, int] = {}
        acked: set[int] = set()

        async def commit(offset: int) -> None:
            request = OffsetCommitRequest(
                group=group,
                partitions=[OffsetCommitPartition(topic="t", partition=0, offset=offset)],
            )
            response = await cluster.pool.call_typed(
                found.rpc, request, OffsetCommitResponse, timeout=10
            )
            if response.partitions[0].error_code == 0:
                acked.add(offset)

        for round_ in range(1, 61):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(commit, 10 * round_ + 1)
                await trio.lowlevel.checkpoint()
                nursery.start_soon(commit, 10 * round_ + 2)
            reply = await cluster.pool.call_typed(
                found.rpc,
                OffsetFetchRequest(
                    group=group, partitions=[TopicPartitionRef(topic="t", partition=0)]
                ),
                OffsetFetchResponse,
            )
            if {10 * round_ + 1, 10 * round_ + 2} <= acked:
                fetched[round_] = reply.partitions[0].offset

        cluster.cleanup()
        appended: dict[int, list[int]] = {}
        for n in cluster.node_ids:
            directory = cluster.data_dir(n) / "logs"
            for part in sorted(directory.glob("__consumer_offsets-*")):
                index = int(part.name.rsplit("-", 1)[1])
                raw = read_replica_log(cluster.data_dir(n), "__consumer_offsets", index)
                for record in decode_records(raw):
                    assert record.value is not None
                    offset = cbor2.loads(record.value)[0]
                    if offset >= 10:
                        appended.setdefault(offset // 10, []).append(offset)
            break  # one replica is enough (the logs are identical)
        assert len(fetched) >= 30, f"too few rounds with both commits acknowledged: {fetched}"
        wrong = {r: (appended[r], got) for r, got in fetched.items() if got != appended[r][-1]}
        assert not wrong, f"round: (log order, fetched) where the fetch is stale: {wrong}"
