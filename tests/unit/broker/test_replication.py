"""Produce, fetch, replication, ISR and high watermark, on real replica managers."""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.lowlevel

from dlog.errors import ErrorCode, StorageIOError
from dlog.net.messages import payload_bytes
from dlog.net.protocol import (
    FetchPartition,
    FetchRequest,
    FetchResponse,
    ListOffsetsPartition,
    ListOffsetsRequest,
    ListOffsetsResponse,
    NewTopic,
    ProducePartition,
    ProducePartitionResult,
    ProduceRequest,
    ProduceResponse,
)
from dlog.storage import build_batch, decode_records
from tests.unit.broker.dataplane import DataPlaneCluster, dataplane_cluster, wait_until

NOW = 1_700_000_000_000


def batch(*values: bytes) -> bytes:
    return bytes(build_batch(values, base_timestamp=NOW))


async def produce(
    cluster: DataPlaneCluster,
    topic: str,
    *values: bytes,
    acks: int = -1,
    timeout_ms: int = 5000,
    partition: int = 0,
    raw: bytes | None = None,
) -> ProduceResponse:
    data = raw if raw is not None else batch(*values)
    leader = cluster.leader_of(topic, partition)
    resp = await cluster.pool.call(
        leader.address,
        ProduceRequest(
            acks=acks,
            timeout_ms=timeout_ms,
            partitions=[ProducePartition(topic=topic, partition=partition, size=len(data))],
            payload=data,
        ),
    )
    assert isinstance(resp, ProduceResponse)
    return resp


async def fetch(
    cluster: DataPlaneCluster, address: str, topic: str, offset: int, max_wait_ms: int = 0
) -> tuple[FetchResponse, list[bytes]]:
    resp = await cluster.pool.call(
        address,
        FetchRequest(
            max_wait_ms=max_wait_ms,
            partitions=[FetchPartition(topic=topic, partition=0, fetch_offset=offset)],
        ),
    )
    assert isinstance(resp, FetchResponse)
    data = payload_bytes(resp.payload)
    values = [r.value for r in decode_records(data, min_offset=offset)] if data else []
    return resp, values  # type: ignore[return-value]


def logs_equal(cluster: DataPlaneCluster, topic: str, upto: int | None = None) -> bool:
    contents = []
    for node in cluster.nodes.values():
        p = node.rm.partitions.get((topic, 0))
        if p is None:
            return False
        end = p.log.log_end_offset if upto is None else upto
        contents.append(p.log.read(0, 1 << 30, end).records if end else b"")
    return all(c == contents[0] for c in contents)


async def test_acks_all_replicates_to_every_isr_member(tmp_path: Path) -> None:
    async with dataplane_cluster(tmp_path) as cluster:
        await cluster.create_topic("t")
        await wait_until(lambda: ("t", 0) in cluster.leader_of("t").rm.partitions)
        resp = await produce(cluster, "t", b"a", b"b", b"c")
        r = resp.partitions[0]
        assert (r.error_code, r.base_offset, r.last_offset) == (0, 0, 2)
        leader = cluster.leader_of("t")
        # Acknowledged means every ISR member has it.
        for node in cluster.nodes.values():
            assert node.rm.partitions[("t", 0)].log.log_end_offset == 3
        assert leader.rm.partitions[("t", 0)].high_watermark == 3
        assert logs_equal(cluster, "t")
        _, values = await fetch(cluster, leader.address, "t", 0)
        assert values == [b"a", b"b", b"c"]


async def test_consumers_never_see_above_the_high_watermark(tmp_path: Path) -> None:
    async with dataplane_cluster(tmp_path) as cluster:
        await cluster.create_topic("t")
        await produce(cluster, "t", b"committed")
        leader = cluster.leader_of("t")
        # Followers stop fetching: an acks=leader write stays above the HW.
        for node in cluster.nodes.values():
            if node is not leader:
                node.rm.fetch_delay_s = 3600
        await trio.lowlevel.checkpoint()
        resp = await produce(cluster, "t", b"uncommitted", acks=1)
        assert resp.partitions[0].error_code == 0
        p = leader.rm.partitions[("t", 0)]
        assert p.log_end_offset == 2
        assert p.high_watermark == 1
        r, values = await fetch(cluster, leader.address, "t", 0)
        assert values == [b"committed"]
        assert r.partitions[0].high_watermark == 1
        # An offset in [HW, LEO] gives no data and no error.
        r, values = await fetch(cluster, leader.address, "t", 1)
        assert (r.partitions[0].error_code, values) == (0, [])
        # Beyond the LEO is out of range, with the range in the answer.
        r, _ = await fetch(cluster, leader.address, "t", 5)
        assert r.partitions[0].error_code == ErrorCode.OFFSET_OUT_OF_RANGE
        assert r.partitions[0].log_end_offset == 2


async def test_long_poll_wakes_on_new_data(tmp_path: Path) -> None:
    async with dataplane_cluster(tmp_path) as cluster:
        await cluster.create_topic("t", rf=1)
        leader = cluster.leader_of("t")
        got: list[list[bytes]] = []

        async def consume() -> None:
            _, values = await fetch(cluster, leader.address, "t", 0, max_wait_ms=10_000)
            got.append(values)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(consume)
            await wait_until(lambda: leader.rm.partitions[("t", 0)]._parked)
            await produce(cluster, "t", b"x", acks=1)
        assert got == [[b"x"]]


async def test_min_insync_replicas_checked_before_and_after(tmp_path: Path) -> None:
    async with dataplane_cluster(tmp_path, replica_lag_time_max_ms=500) as cluster:
        await cluster.create_topic("t", min_insync_replicas="3")
        await produce(cluster, "t", b"ok")
        leader = cluster.leader_of("t")
        for node in cluster.nodes.values():
            if node is not leader:
                node.rm.fetch_delay_s = 3600
        # The ISR shrinks once the followers lag for replica_lag_time_max_ms.
        p = leader.rm.partitions[("t", 0)]
        await wait_until(lambda: len(p.isr) < 3)
        end = p.log_end_offset
        resp = await produce(cluster, "t", b"refused")
        assert resp.partitions[0].error_code == ErrorCode.NOT_ENOUGH_REPLICAS
        assert p.log_end_offset == end  # nothing written


async def test_not_enough_replicas_after_append(tmp_path: Path) -> None:
    async with dataplane_cluster(tmp_path, replica_lag_time_max_ms=500) as cluster:
        await cluster.create_topic("t", min_insync_replicas="3")
        leader = cluster.leader_of("t")
        await produce(cluster, "t", b"warm")
        for node in cluster.nodes.values():
            if node is not leader:
                node.rm.fetch_delay_s = 3600
        await trio.sleep(0.01)
        # Written while the ISR is still 3; the ISR shrinks before it replicates.
        resp = await produce(cluster, "t", b"late", timeout_ms=5000)
        assert resp.partitions[0].error_code == ErrorCode.NOT_ENOUGH_REPLICAS_AFTER_APPEND


async def test_slow_follower_leaves_isr_then_rejoins(tmp_path: Path) -> None:
    async with dataplane_cluster(tmp_path, replica_lag_time_max_ms=500) as cluster:
        await cluster.create_topic("t")
        await produce(cluster, "t", b"1")
        leader = cluster.leader_of("t")
        slow = next(n for n in cluster.nodes.values() if n is not leader)
        slow.rm.fetch_delay_s = 3600
        slow_p = slow.rm.partitions[("t", 0)]
        # Wake the fetcher so the new delay applies.
        slow.rm._start_fetcher(slow_p, slow_p.info)
        p = leader.rm.partitions[("t", 0)]
        await wait_until(lambda: slow.node_id not in p.isr)
        # acks=all now succeeds on the smaller ISR.
        resp = await produce(cluster, "t", b"2")
        assert resp.partitions[0].error_code == 0
        slow.rm.fetch_delay_s = 0
        slow.rm._start_fetcher(slow_p, slow_p.info)
        await wait_until(lambda: slow.node_id in p.isr)
        assert logs_equal(cluster, "t")


async def test_hw_does_not_advance_on_uncommitted_isr_shrink(tmp_path: Path) -> None:
    async with dataplane_cluster(tmp_path, replica_lag_time_max_ms=300) as cluster:
        await cluster.create_topic("t")
        await produce(cluster, "t", b"1")
        leader = cluster.leader_of("t")
        p = leader.rm.partitions[("t", 0)]
        assert cluster.controller is not None
        # The controller accepts ISR changes but they never commit.
        blocked = trio.Event()
        original = cluster.controller.alter_partition

        async def stuck(req: object) -> object:
            await blocked.wait()
            return await original(req)  # type: ignore[arg-type]

        cluster.controller.alter_partition = stuck  # type: ignore[method-assign]
        for node in cluster.nodes.values():
            if node is not leader:
                node.rm.fetch_delay_s = 3600
                q = node.rm.partitions[("t", 0)]
                node.rm._start_fetcher(q, q.info)
        await produce(cluster, "t", b"2", acks=1)
        await wait_until(lambda: p.pending_isr is not None)
        await trio.sleep(0.5)
        assert p.isr == (1, 2, 3) or len(p.isr) == 3
        assert p.high_watermark == 1  # the shrink is pending: the HW waits
        blocked.set()
        await wait_until(lambda: len(p.isr) == 1)
        await wait_until(lambda: p.high_watermark == 2)


async def test_divergent_leader_truncates_when_it_returns(tmp_path: Path) -> None:
    async with dataplane_cluster(tmp_path, replica_lag_time_max_ms=60_000) as cluster:
        await cluster.create_topic("t")
        await produce(cluster, "t", b"a", b"b")
        old = cluster.leader_of("t")
        for node in cluster.nodes.values():
            if node is not old:
                node.rm.fetch_delay_s = 3600
                q = node.rm.partitions[("t", 0)]
                node.rm._start_fetcher(q, q.info)
        # Appended on the leader only, never replicated, then the leader dies.
        resp = await produce(cluster, "t", b"lost1", b"lost2", acks=1)
        assert resp.partitions[0].error_code == 0
        await cluster.stop(old.node_id)
        for node in cluster.nodes.values():
            node.rm.fetch_delay_s = 0
        await wait_until(lambda: cluster.leader_of("t") is not old)
        new = cluster.leader_of("t")
        await wait_until(lambda: new.rm.partitions[("t", 0)].role.value == "leader")
        resp = await produce(cluster, "t", b"c", b"d", b"e")
        assert resp.partitions[0].error_code == 0
        assert resp.partitions[0].base_offset == 2
        await cluster.restart(old.node_id)
        returned = cluster.nodes[old.node_id]
        await wait_until(
            lambda: (
                ("t", 0) in returned.rm.partitions
                and returned.rm.partitions[("t", 0)].log_end_offset == 5
            )
        )
        assert logs_equal(cluster, "t")
        p = returned.rm.partitions[("t", 0)]
        values = [r.value for r in decode_records(p.log.read(0, 1 << 20, 5).records)]
        assert values == [b"a", b"b", b"c", b"d", b"e"]


@pytest.mark.parametrize("damage", ["crc", "magic", "length", "delta"])
async def test_corrupt_batches_rejected_nothing_written(tmp_path: Path, damage: str) -> None:
    async with dataplane_cluster(tmp_path) as cluster:
        await cluster.create_topic("t", rf=1)
        good = bytearray(batch(b"x", b"y"))
        if damage == "crc":
            good[-1] ^= 0xFF
        elif damage == "magic":
            good[16] = 1
        elif damage == "length":
            good[8:12] = (len(good) + 50).to_bytes(4, "big")
        else:
            good[23:27] = (5).to_bytes(4, "big")  # lastOffsetDelta != recordCount - 1
        resp = await produce(cluster, "t", raw=bytes(good), acks=1)
        assert resp.partitions[0].error_code == ErrorCode.CORRUPT_MESSAGE
        assert cluster.leader_of("t").rm.partitions[("t", 0)].log_end_offset == 0


async def test_unknown_topic_and_wrong_broker(tmp_path: Path) -> None:
    async with dataplane_cluster(tmp_path) as cluster:
        await cluster.create_topic("t", rf=1)
        data = batch(b"v")
        leader = cluster.leader_of("t")
        other = next(n for n in cluster.nodes.values() if n is not leader)
        resp = await cluster.pool.call(
            other.address,
            ProduceRequest(
                acks=1,
                timeout_ms=1000,
                partitions=[
                    ProducePartition(topic="t", partition=0, size=len(data)),
                    ProducePartition(topic="nope", partition=0, size=len(data)),
                ],
                payload=data + data,
            ),
        )
        assert isinstance(resp, ProduceResponse)
        wrong, unknown = resp.partitions
        assert wrong.error_code == ErrorCode.NOT_LEADER_OR_FOLLOWER
        assert wrong.leader == leader.node_id
        assert unknown.error_code == ErrorCode.UNKNOWN_TOPIC_OR_PARTITION


async def test_list_offsets(tmp_path: Path) -> None:
    async with dataplane_cluster(tmp_path) as cluster:
        await cluster.create_topic("t")
        await produce(cluster, "t", b"a", b"b", b"c")
        leader = cluster.leader_of("t")
        resp = await cluster.pool.call(
            leader.address,
            ListOffsetsRequest(
                partitions=[
                    ListOffsetsPartition(topic="t", partition=0, timestamp=-2),
                    ListOffsetsPartition(topic="t", partition=0, timestamp=-1),
                    ListOffsetsPartition(topic="t", partition=0, timestamp=NOW),
                    ListOffsetsPartition(topic="t", partition=0, timestamp=NOW + 10**9),
                ]
            ),
        )
        assert isinstance(resp, ListOffsetsResponse)
        assert [r.offset for r in resp.partitions] == [0, 3, 0, -1]


async def test_flush_messages_acknowledges_only_fsynced_records(tmp_path: Path) -> None:
    """With flush_messages=1 every replica has fsynced a record before acks=all
    answers; with the default interval policy, requests never wait for an fsync."""
    async with dataplane_cluster(tmp_path) as cluster:
        await cluster.create_topic("always", flush_messages="1")
        await cluster.create_topic("interval", flush_ms="3600000")
        for topic in ("always", "interval"):
            await wait_until(lambda t=topic: (t, 0) in cluster.leader_of(t).rm.partitions)
            resp = await produce(cluster, topic, b"a", b"b")
            assert resp.partitions[0].error_code == 0
        for node in cluster.nodes.values():
            assert node.rm.partitions[("always", 0)].log.recovery_point == 2
            assert node.rm.partitions[("interval", 0)].log.recovery_point == 0


async def test_a_stopped_replica_manager_takes_no_new_tasks(tmp_path: Path) -> None:
    # Raft can still apply metadata while a node shuts down; the broker then asks the
    # replica manager for tasks (stray-log cleanup). Once its run() has ended, by
    # cancellation included, there must be no closed nursery left to start them in.
    async with dataplane_cluster(tmp_path) as cluster:
        node = cluster.nodes[1]
        assert node.rm._nursery is not None
        await cluster.stop(1)
        assert node.rm._nursery is None


@asynccontextmanager
async def parked_fetch(
    cluster: DataPlaneCluster, topic: str, offset: int
) -> AsyncIterator[list[FetchResponse]]:
    """A long-polling fetch of ``topic``-0 from ``offset`` in the background, parked at
    its leader when the block starts; its answer is in the yielded list after it."""
    leader = cluster.leader_of(topic)
    p = leader.rm.partitions[(topic, 0)]
    got: list[FetchResponse] = []

    async def consume() -> None:
        got.append((await fetch(cluster, leader.address, topic, offset, max_wait_ms=60_000))[0])

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(consume)
            await wait_until(lambda: p._parked)
            yield got


async def test_parked_fetches_are_answered_once_by_data_or_deadline_and_leave_nothing(
    tmp_path: Path,
) -> None:
    async with dataplane_cluster(tmp_path) as cluster:
        await cluster.create_topic("t", rf=1)
        leader = cluster.leader_of("t")
        p = leader.rm.partitions[("t", 0)]
        # Nothing comes: answered empty at the deadline, and no earlier.
        start = trio.current_time()
        with trio.fail_after(5):
            resp, values = await fetch(cluster, leader.address, "t", 0, max_wait_ms=200)
        assert values == [] and resp.partitions[0].error_code == 0
        assert trio.current_time() - start >= 0.2
        assert not p._parked and leader.server.in_flight == 0
        # Data comes: answered by the append, long before the deadline.
        got: list[list[bytes]] = []

        async def consume() -> None:
            got.append((await fetch(cluster, leader.address, "t", 0, max_wait_ms=60_000))[1])

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(consume)
                await wait_until(lambda: p._parked)
                await produce(cluster, "t", b"x", acks=1)
        assert got == [[b"x"]]
        assert not p._parked and leader.server.in_flight == 0


async def test_a_parked_fetch_whose_client_went_away_is_dropped_at_once(tmp_path: Path) -> None:
    from dlog.net import open_rpc_pool

    async with dataplane_cluster(tmp_path) as cluster:
        await cluster.create_topic("t", rf=1)
        leader = cluster.leader_of("t")
        p = leader.rm.partitions[("t", 0)]
        async with open_rpc_pool() as pool:
            await pool.start_call(
                leader.address,
                FetchRequest(
                    max_wait_ms=60_000,
                    partitions=[FetchPartition(topic="t", partition=0, fetch_offset=0)],
                ),
            )
            await wait_until(lambda: p._parked)
        # The client is gone: its fetch is let go of at once, not at its deadline.
        await wait_until(lambda: leader.server.in_flight == 0)
        assert not p._parked
        assert all(entry[2].finished for entry in leader.rm._parked)
        await produce(cluster, "t", b"x", acks=1)
        assert not p._parked


async def test_a_parked_fetch_that_fails_gets_an_error_and_the_append_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with dataplane_cluster(tmp_path) as cluster:
        await cluster.create_topic("t", rf=1)
        leader = cluster.leader_of("t")
        p = leader.rm.partitions[("t", 0)]
        async with parked_fetch(cluster, "t", 0) as responses:

            def broken(*args: object) -> object:
                raise RuntimeError("bug in the read path")

            monkeypatch.setattr(leader.rm, "_read", broken)
            resp = await produce(cluster, "t", b"x", acks=1)
        assert resp.partitions[0].error_code == 0  # the append that poked it is fine
        assert responses[0].partitions[0].error_code == ErrorCode.UNKNOWN_SERVER_ERROR
        assert not p._parked


async def test_answered_parked_fetches_do_not_pile_up_and_a_stop_answers_the_rest(
    tmp_path: Path,
) -> None:
    async with dataplane_cluster(tmp_path) as cluster:
        await cluster.create_topic("t", rf=1)
        leader = cluster.leader_of("t")
        p = leader.rm.partitions[("t", 0)]
        for n in range(300):  # each answered by data long before its deadline
            async with trio.open_nursery() as nursery:
                nursery.start_soon(fetch, cluster, leader.address, "t", n, 60_000)
                await wait_until(lambda: p._parked)
                await produce(cluster, "t", b"v%d" % n, acks=1)
        assert len(leader.rm._parked) <= 130  # not one entry per fetch until its deadline
        # A fetch still parked when the replica manager stops is answered then.
        async with parked_fetch(cluster, "t", 300) as got:
            assert leader.rm._nursery is not None
            leader.rm._nursery.cancel_scope.cancel()
        assert got[0].partitions[0].error_code == 0 and leader.server.in_flight == 0


def parked_produces(p: object) -> list[object]:
    from dlog.broker.replica_manager import _ParkedProduce

    return [x for x in p._parked if isinstance(x, _ParkedProduce)]  # type: ignore[attr-defined]


async def stall_followers(cluster: DataPlaneCluster, topic: str) -> None:
    leader = cluster.leader_of(topic)
    for node in cluster.nodes.values():
        if node is not leader:
            node.rm.fetch_delay_s = 3600
            q = node.rm.partitions[(topic, 0)]
            node.rm._start_fetcher(q, q.info)


async def resume_followers(cluster: DataPlaneCluster, topic: str) -> None:
    leader = cluster.leader_of(topic)
    for node in cluster.nodes.values():
        if node is not leader:
            node.rm.fetch_delay_s = 0


@asynccontextmanager
async def stalled_followers(tmp_path: Path) -> AsyncIterator[tuple[DataPlaneCluster, Any, Any]]:
    """Topic t (3 replicas, one record) whose followers stopped fetching but stay in
    the ISR: yields the cluster, the leader and its partition."""
    async with dataplane_cluster(tmp_path, replica_lag_time_max_ms=60_000) as cluster:
        await cluster.create_topic("t")
        await produce(cluster, "t", b"warm")
        leader = cluster.leader_of("t")
        await stall_followers(cluster, "t")
        yield cluster, leader, leader.rm.partitions[("t", 0)]


async def test_parked_produces_are_answered_by_replication_timeout_or_a_move(
    tmp_path: Path,
) -> None:
    async with stalled_followers(tmp_path) as (cluster, leader, p):
        # Not replicated in time: REQUEST_TIMED_OUT at the request's timeout, no earlier.
        start = trio.current_time()
        resp = await produce(cluster, "t", b"slow", timeout_ms=300)
        assert resp.partitions[0].error_code == ErrorCode.REQUEST_TIMED_OUT
        assert trio.current_time() - start >= 0.3
        assert not parked_produces(p)
        # Parked (no task waits for it), then answered by the fetch that moves the HW.
        got: list[ProduceResponse] = []

        async def send(value: bytes) -> None:
            got.append(await produce(cluster, "t", value, timeout_ms=60_000))

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send, b"replicated")
                await wait_until(lambda: parked_produces(p))
                await resume_followers(cluster, "t")
        assert got[0].partitions[0].error_code == 0
        assert got[0].partitions[0].base_offset == 2
        assert p.high_watermark == 3 and not parked_produces(p)
        # Leadership moves while it waits: NOT_LEADER_OR_FOLLOWER at once.
        await stall_followers(cluster, "t")
        got.clear()
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send, b"moved")
                await wait_until(lambda: parked_produces(p))
                other = next(n for n in p.info.replicas if n != leader.node_id)
                p.become_follower(
                    dataclasses.replace(p.info, leader=other, leader_epoch=p.leader_epoch + 1)
                )
        assert got[0].partitions[0].error_code == ErrorCode.NOT_LEADER_OR_FOLLOWER
        assert not parked_produces(p)


async def test_a_parked_produce_whose_client_went_away_is_dropped_at_once(
    tmp_path: Path,
) -> None:
    from dlog.net import open_rpc_pool

    async with stalled_followers(tmp_path) as (cluster, leader, p):
        data = batch(b"x")
        async with open_rpc_pool() as pool:
            await pool.start_call(
                leader.address,
                ProduceRequest(
                    acks=-1,
                    timeout_ms=60_000,
                    partitions=[ProducePartition(topic="t", partition=0, size=len(data))],
                    payload=data,
                ),
            )
            await wait_until(lambda: parked_produces(p))
        # The client is gone: its produce is let go of at once, not at its timeout.
        await wait_until(lambda: not parked_produces(p))
        assert all(entry[2].finished for entry in leader.rm._parked)


async def test_a_parked_produce_that_fails_gets_an_error_and_replication_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dlog.broker.replica_manager as rm_module

    async with dataplane_cluster(tmp_path) as cluster:
        await cluster.create_topic("t")
        await produce(cluster, "t", b"warm")
        leader = cluster.leader_of("t")
        p = leader.rm.partitions[("t", 0)]

        def broken(*args: object) -> object:
            raise RuntimeError("bug in the produce answer")

        monkeypatch.setattr(rm_module, "_produce_outcome", broken)
        resp = await produce(cluster, "t", b"x")
        assert resp.partitions[0].error_code == ErrorCode.UNKNOWN_SERVER_ERROR
        # The follower fetch whose HW move answered it went on as if nothing happened.
        await wait_until(lambda: p.high_watermark == 2 and logs_equal(cluster, "t"))
        assert leader.server.stats.error_responses == 0
        assert leader.server.stats.handler_crashes == 0
        assert not parked_produces(p)


async def test_a_stopping_replica_manager_answers_parked_produces(tmp_path: Path) -> None:
    async with stalled_followers(tmp_path) as (cluster, leader, p):
        got: list[ProduceResponse] = []

        async def send() -> None:
            got.append(await produce(cluster, "t", b"x", timeout_ms=60_000))

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                await wait_until(lambda: parked_produces(p))
                assert leader.rm._nursery is not None
                leader.rm._nursery.cancel_scope.cancel()
        assert got[0].partitions[0].error_code == ErrorCode.REQUEST_TIMED_OUT
        assert not parked_produces(p)


async def test_a_follower_told_to_follow_an_older_epoch_does_not_truncate(
    tmp_path: Path,
) -> None:
    from dlog.errors import FencedLeaderEpochError

    async with dataplane_cluster(tmp_path) as cluster:
        await cluster.create_topic("t")
        await produce(cluster, "t", b"a")
        old = cluster.leader_of("t")
        await cluster.stop(old.node_id)
        await wait_until(lambda: cluster.leader_of("t") is not old)
        new = cluster.leader_of("t")
        await wait_until(lambda: new.rm.partitions[("t", 0)].role.value == "leader")
        resp = await produce(cluster, "t", b"b", b"c")  # written at the new epoch
        assert resp.partitions[0].error_code == 0
        follower = next(n for n in cluster.nodes.values() if n.up and n is not new)
        q = follower.rm.partitions[("t", 0)]
        await wait_until(lambda: q.log_end_offset == 3)
        # Stale metadata (say, replayed at a restart) names the old leader at epoch 0,
        # which knows nothing of epoch 1 (it answers NO_EPOCH): truncating to what it
        # knows would lose b and c.
        from dlog.net.protocol import EpochEndOffset, OffsetsForLeaderEpochResponse

        asked: list[object] = []

        class StaleLeader:
            async def call(self, address: str, request: object, **kw: object) -> object:
                asked.append(request)
                return OffsetsForLeaderEpochResponse(
                    partitions=[EpochEndOffset(topic="t", partition=0)]
                )

        real_pool = follower.rm.pool
        follower.rm.pool = StaleLeader()  # type: ignore[assignment]
        try:
            with pytest.raises(FencedLeaderEpochError):
                await follower.rm._truncate_to_leader(q, old.address, 0)
        finally:
            follower.rm.pool = real_pool
        assert q.log_end_offset == 3 and not asked


async def test_a_new_leader_alone_in_its_isr_commits_its_log_at_once(tmp_path: Path) -> None:
    async with dataplane_cluster(tmp_path, replica_lag_time_max_ms=60_000) as cluster:
        await cluster.create_topic("t")
        leader = cluster.leader_of("t")
        survivor, stalled = (n for n in cluster.nodes.values() if n is not leader)
        stalled.rm.fetch_delay_s = 3600
        s = stalled.rm.partitions[("t", 0)]
        stalled.rm._start_fetcher(s, s.info)
        # The stalled follower holds the HW at 0; the survivor has both records.
        await produce(cluster, "t", b"a", b"b", acks=1)
        q = survivor.rm.partitions[("t", 0)]
        await wait_until(lambda: q.log_end_offset == 2)
        assert q.high_watermark == 0
        await cluster.stop(leader.node_id)
        await cluster.stop(stalled.node_id)
        await wait_until(lambda: q.role.value == "leader" and q.isr == (survivor.node_id,))
        # Alone in its ISR it has everything committed: no append needed to show it.
        assert q.high_watermark == q.log_end_offset == 2


async def test_start_serving_drops_stray_logs_before_it_opens_current_ones(
    tmp_path: Path,
) -> None:
    from dlog.net.protocol import DeleteTopicsRequest

    async with dataplane_cluster(tmp_path) as cluster:
        await cluster.create_topic("gone")
        await cluster.create_topic("again")
        await produce(cluster, "gone", b"g")
        await produce(cluster, "again", b"old1", b"old2")
        assert cluster.controller is not None
        away = next(n for n in cluster.nodes.values() if n is not cluster.leader_of("again"))
        await cluster.stop(away.node_id)
        # While it is away: one topic deleted, the other deleted and created again
        # (on the two live nodes).
        await cluster.controller.delete_topics(DeleteTopicsRequest(topics=["gone", "again"]))
        await cluster.create_topic("again", rf=2)
        # It returns; its own image catches up without naming what went (as a node
        # whose replay starts from a snapshot), so its old logs are still on disk.
        await cluster.restart(away.node_id)
        node = cluster.nodes[away.node_id]
        assert ("gone", 0) in node.logs.logs and ("again", 0) in node.logs.logs
        node.rm.start_serving(node.image)
        await wait_until(
            lambda: ("gone", 0) not in node.logs.logs and ("again", 0) not in node.logs.logs
        )
        assert ("again", 0) not in node.rm.partitions


def test_each_partition_of_a_parked_produce_is_settled_once() -> None:
    """A partition whose HW passed its batch is answered as replicated even if its
    leadership moves before the request's other partitions settle (as Kafka's
    DelayedProduce); one that moved first is NOT_LEADER_OR_FOLLOWER; one still
    waiting at the end REQUEST_TIMED_OUT."""
    from types import SimpleNamespace

    from dlog.broker.partition import Role
    from dlog.broker.replica_manager import _produce_outcome, _settle

    def partition(hw: int) -> SimpleNamespace:
        return SimpleNamespace(
            role=Role.LEADER,
            leader_epoch=3,
            high_watermark=hw,
            isr=(1, 2, 3),
            config=SimpleNamespace(min_insync_replicas=2),
            info=SimpleNamespace(leader=1, leader_epoch=3),
        )

    a, b, c = partition(0), partition(0), partition(0)
    results = [ProducePartitionResult(topic="t", partition=n, base_offset=0) for n in range(3)]
    request = ProduceRequest(acks=-1, timeout_ms=100, partitions=[])
    waits = [(0, a, 0, 3), (1, b, 0, 3), (2, c, 0, 3)]
    waits = _settle(request, results, waits)  # type: ignore[arg-type]
    assert len(waits) == 3
    a.high_watermark = 1  # a is replicated ...
    waits = _settle(request, results, waits)  # type: ignore[arg-type]
    assert [w[0] for w in waits] == [1, 2]
    a.role = b.role = Role.FOLLOWER  # ... then a and b lose their leadership
    b.info = SimpleNamespace(leader=2, leader_epoch=4)
    response = _produce_outcome(request, results, waits)  # type: ignore[arg-type]
    codes = [r.error_code for r in response.partitions]
    assert codes == [0, ErrorCode.NOT_LEADER_OR_FOLLOWER, ErrorCode.REQUEST_TIMED_OUT]


async def test_metadata_that_fails_to_apply_is_retried_and_does_not_hold_up_the_rest(
    tmp_path: Path,
) -> None:
    """One local action of a metadata change failing (here a disk error deleting a
    topic's log) neither skips the other actions of that change (a topic created in the
    same batch is still replicated here) nor is forgotten: it is tried again."""
    from dlog.broker.records import CreateTopic, DeleteTopic, PartitionAssignment, encode_batch
    from dlog.errors import StorageError

    async with dataplane_cluster(tmp_path) as cluster:
        await cluster.create_topic("doomed")
        node = cluster.nodes[2]
        real_delete = node.logs.delete
        failures = []

        async def delete_failing_once(topic: str, partition: int) -> None:
            if topic == "doomed" and not failures:
                failures.append((topic, partition))
                raise StorageError("injected: rename failed")
            await real_delete(topic, partition)

        node.logs.delete = delete_failing_once  # type: ignore[method-assign]
        doomed_id = cluster.image.topics["doomed"].topic_id
        await cluster.quorum.propose(
            encode_batch(
                [
                    DeleteTopic(topic_id=doomed_id),
                    CreateTopic(
                        name="fresh",
                        topic_id="fresh-id",
                        configs={},
                        partitions=[
                            PartitionAssignment(
                                partition=0, replicas=[1, 2, 3], isr=[1, 2, 3], leader=1
                            )
                        ],
                    ),
                ]
            )
        )
        await wait_until(lambda: ("fresh", 0) in node.rm.partitions)
        assert failures == [("doomed", 0)]
        await wait_until(lambda: ("doomed", 0) not in node.logs.logs, timeout=10)
        await produce(cluster, "fresh", b"after")


async def test_many_partitions_failing_to_apply_log_a_few_lines_and_recover(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """When every new partition fails alike (out of file handles, a full disk), the
    broker says so in a few lines per attempt, not one per partition, and creates them
    all once the fault is gone."""
    from dlog.errors import StorageError

    async with dataplane_cluster(tmp_path) as cluster:
        node = cluster.nodes[2]
        real_get_or_create = node.logs.get_or_create
        broken = [True]
        attempts: list[tuple[str, int]] = []

        async def out_of_files(topic: str, partition: int, *args: Any, **kwargs: Any) -> Any:
            if topic == "wide" and broken[0]:
                attempts.append((topic, partition))
                raise StorageError(f"injected: {topic}-{partition}: Too many open files")
            return await real_get_or_create(topic, partition, *args, **kwargs)

        node.logs.get_or_create = out_of_files  # type: ignore[method-assign]
        caplog.set_level(logging.ERROR, logger="dlog.broker.replica_manager")
        assert cluster.controller is not None
        await cluster.controller.create_topic(
            NewTopic(name="wide", partitions=40, replication_factor=3, configs={})
        )
        await wait_until(lambda: len(attempts) >= 40)
        lines = [r.getMessage() for r in caplog.records]
        rounds = len(attempts) // 40  # (a round has no checkpoint: never seen half done)
        assert len(lines) == 4 * rounds, lines
        assert "partition wide-0: KAFKA_STORAGE_ERROR" in lines[0]
        assert "37 more partitions, the last wide-39" in lines[3]
        broken[0] = False
        await wait_until(
            lambda: all(("wide", p) in node.rm.partitions for p in range(40)), timeout=10
        )


async def produce_to_both_partitions(
    cluster: DataPlaneCluster, address: str
) -> list[ProducePartitionResult]:
    """One acks=1 request writing a record to each of t-0 and t-1; their results."""
    first, second = batch(b"a"), batch(b"b")
    resp = await cluster.pool.call(
        address,
        ProduceRequest(
            acks=1,
            timeout_ms=5000,
            partitions=[
                ProducePartition(topic="t", partition=0, size=len(first)),
                ProducePartition(topic="t", partition=1, size=len(second)),
            ],
            payload=first + second,
        ),
    )
    assert isinstance(resp, ProduceResponse)
    return resp.partitions


async def test_an_unexpected_append_failure_fails_its_partition_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An append that fails in a way the broker did not expect (a bug, a stray
    OSError) is that partition's UNKNOWN_SERVER_ERROR, logged with its traceback; the
    request's other partitions keep their results, since they were appended already
    and a client retrying them would write them twice (Kafka answers per partition
    too)."""
    async with dataplane_cluster(tmp_path, n=1) as cluster:
        await cluster.create_topic("t", partitions=2, rf=1)
        node = cluster.leader_of("t", 0)
        assert cluster.leader_of("t", 1) is node
        broken = node.rm.partitions["t", 1]
        real_append = type(broken).append_as_leader

        def append_as_leader(self: Any, records: Any) -> Any:
            if self is broken:
                raise RuntimeError("something nobody expected")
            return real_append(self, records)

        monkeypatch.setattr(type(broken), "append_as_leader", append_as_leader)
        caplog.set_level(logging.ERROR, logger="dlog.broker.replica_manager")
        ok, failed = await produce_to_both_partitions(cluster, node.address)
        assert (ok.partition, ok.error_code, ok.base_offset) == (0, 0, 0)
        assert failed.partition == 1
        assert failed.error_code == ErrorCode.UNKNOWN_SERVER_ERROR
        assert "RuntimeError: something nobody expected" in (failed.error_message or "")
        assert node.rm.partitions["t", 0].log.log_end_offset == 1
        assert broken.log.log_end_offset == 0
        assert any(
            "appending to t-1 failed" in r.getMessage() and r.exc_info for r in caplog.records
        )


async def test_a_fetch_answer_is_capped_by_the_broker_whatever_the_request_asks(
    tmp_path: Path,
) -> None:
    """A fetch asking for more than fetch_max_bytes gets at most that (plus the one
    batch that crosses it): an answer over the clients' 64 MiB frame limit broke the
    consumer's connection on every try. Reading on from where it ended gets the rest."""
    async with dataplane_cluster(tmp_path, n=1) as cluster:
        await cluster.create_topic("t", rf=1)
        node = cluster.leader_of("t")
        node.rm.config = dataclasses.replace(node.rm.config, fetch_max_bytes=25_000)
        for i in range(8):
            values = [b"%d-%d-" % (i, j) + b"x" * 1000 for j in range(10)]
            resp = await produce(cluster, "t", *values, acks=1)
            assert resp.partitions[0].error_code == 0
        batch_bytes = len(batch(*values))
        offset, seen = 0, 0
        while offset < 80:
            answer = await cluster.pool.call(
                node.address,
                FetchRequest(
                    max_bytes=1 << 30,
                    partitions=[
                        FetchPartition(
                            topic="t", partition=0, fetch_offset=offset, partition_max_bytes=1 << 30
                        )
                    ],
                ),
            )
            assert isinstance(answer, FetchResponse)
            data = payload_bytes(answer.payload)
            assert batch_bytes <= len(data) <= 25_000 + batch_bytes
            offsets = [r.offset for r in decode_records(data, min_offset=offset)]
            assert offsets == list(range(offset, offset + len(offsets)))
            offset += len(offsets)
            seen += 1
        assert seen >= 3


async def test_a_failed_fsync_before_the_answer_fails_its_partition_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """flush_messages=1: a produce fsyncs each partition it wrote before answering.
    One partition's failed fsync is that partition's KAFKA_STORAGE_ERROR; the other,
    written and fsynced, keeps its result (the whole request used to fail, and a
    client retrying it wrote that partition twice). The failed fsync then stops the
    node, as it must."""
    with pytest.raises(ExceptionGroup) as stopped:  # noqa: PT012
        async with dataplane_cluster(tmp_path, n=1) as cluster:
            await cluster.create_topic("t", partitions=2, rf=1, flush_messages="1")
            node = cluster.leader_of("t", 0)
            broken_dir = str(node.rm.partitions["t", 1].log.directory)
            real_fdatasync, real_fsync = os.fdatasync, os.fsync

            def failing(real: Any) -> Any:
                def sync(fd: int) -> None:
                    if os.readlink(f"/proc/self/fd/{fd}").startswith(broken_dir):
                        raise OSError(errno.EIO, "Input/output error")
                    real(fd)

                return sync

            monkeypatch.setattr(os, "fdatasync", failing(real_fdatasync))
            monkeypatch.setattr(os, "fsync", failing(real_fsync))
            ok, failed = await produce_to_both_partitions(cluster, node.address)
            assert (ok.partition, ok.error_code, ok.base_offset) == (0, 0, 0)
            assert failed.partition == 1
            assert failed.error_code == ErrorCode.KAFKA_STORAGE_ERROR
            assert "Input/output error" in (failed.error_message or "")
            await trio.sleep(10)  # the log manager's next check (every 100 ms) stops it
            pytest.fail("the node did not stop after a failed fsync")
    assert stopped.group_contains(StorageIOError, match="fsync of .* failed")


async def test_a_full_disk_answers_storage_errors_and_is_logged_once_per_interval(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A leader whose disk refuses writes (full) answers each produce with
    KAFKA_STORAGE_ERROR, which producers retry, and says so in its log: once, not once
    per retry; writes go on once the disk has room again."""
    async with dataplane_cluster(tmp_path) as cluster:
        await cluster.create_topic("t")
        p = cluster.leader_of("t").rm.partitions["t", 0]
        segment_log = p.log.active_segment.log_path
        real_write = os.write
        full = [True]

        def write(fd: int, data: Any) -> int:
            # The partition's segment file is on a full disk; everything else writes.
            if full[0] and os.path.samefile(f"/proc/self/fd/{fd}", segment_log):
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_write(fd, data)

        monkeypatch.setattr(os, "write", write)
        caplog.set_level(logging.ERROR, logger="dlog.broker.replica_manager")
        for i in range(5):
            resp = await produce(cluster, "t", b"v%d" % i)
            assert resp.partitions[0].error_code == ErrorCode.KAFKA_STORAGE_ERROR
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == 1, lines
        assert "appending to t-0 failed" in lines[0] and "No space left" in lines[0]
        full[0] = False
        resp = await produce(cluster, "t", b"after")
        assert resp.partitions[0].error_code == 0
