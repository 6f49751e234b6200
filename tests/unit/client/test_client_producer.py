"""Producer: partitioning, batching, acks, retries and ordering, timeouts, close."""

from __future__ import annotations

import random

import pytest
import trio
import trio.testing

import dlog
from dlog.client.partitioner import partition_for_key
from dlog.errors import (
    CorruptRecordError,
    ErrorCode,
    MessageTooLargeError,
    RequestTimedOutError,
    UnknownTopicOrPartitionError,
)
from dlog.net.client import ClientConfig
from dlog.net.messages import payload_bytes
from dlog.net.protocol import ProduceRequest
from dlog.storage.batch import iter_batch_headers
from tests.unit.client.fake_broker import (
    DROP,
    DROP_AFTER_APPEND,
    FakeCluster,
    MemoryRpcPool,
    open_fake_cluster,
)


def produce_requests(cluster: FakeCluster) -> list[tuple[int, ProduceRequest]]:
    out = []
    for node, request in cluster.requests_of("produce"):
        assert isinstance(request, ProduceRequest)
        out.append((node, request))
    return out


def batch_sizes(request: ProduceRequest) -> list[int]:
    """Record counts of the batches in a produce request's payload."""
    return [h.record_count for h in iter_batch_headers(payload_bytes(request.payload))]


async def test_send_returns_metadata_and_keys_pick_kafkas_partition(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_fake_cluster(2) as cluster, cluster.connect() as client:
        cluster.create_topic("t", 5)
        async with client.producer() as producer:
            metas = [await producer.send("t", b"v%d" % i, key=b"user-7") for i in range(3)]
        expected = partition_for_key(b"user-7", 5)
        assert [(m.topic, m.partition, m.offset) for m in metas] == [
            ("t", expected, 0),
            ("t", expected, 1),
            ("t", expected, 2),
        ]
        assert metas[0].timestamp == cluster.clock.now_ms()
        records = cluster.partition("t", expected).records()
        assert [(r.key, r.value) for r in records] == [(b"user-7", b"v%d" % i) for i in range(3)]


async def test_linger_holds_a_batch_then_sends_it_whole(autojump_clock: trio.abc.Clock) -> None:
    async with open_fake_cluster() as cluster, cluster.connect() as client:
        cluster.create_topic("t")
        await client.wait_for_topic("t")
        async with client.producer(linger_ms=20) as producer:
            start = trio.current_time()
            handles = [producer.send_nowait("t", b"r%d" % i) for i in range(10)]
            await handles[-1]
            assert trio.current_time() - start == pytest.approx(0.020)
            assert [(await h).offset for h in handles] == list(range(10))
        ((node, request),) = produce_requests(cluster)
        assert batch_sizes(request) == [10]


async def test_linger_zero_sends_when_the_sender_runs(autojump_clock: trio.abc.Clock) -> None:
    async with open_fake_cluster() as cluster, cluster.connect() as client:
        cluster.create_topic("t")
        await client.wait_for_topic("t")
        async with client.producer(linger_ms=0) as producer:
            start = trio.current_time()
            await producer.send("t", b"now")
            assert trio.current_time() == start


async def test_batch_size_closes_batches_and_each_stays_under_it(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_fake_cluster() as cluster, cluster.connect() as client:
        cluster.create_topic("t")
        await client.wait_for_topic("t")
        async with client.producer(batch_size=1000, linger_ms=1000) as producer:
            handles = [producer.send_nowait("t", b"x" * 90) for _ in range(50)]
            for h in handles:
                await h
        sizes = []
        for _, request in produce_requests(cluster):
            sizes += [h.size for h in iter_batch_headers(payload_bytes(request.payload))]
        assert len(sizes) > 4
        assert all(size <= 1000 for size in sizes)
        assert cluster.partition("t", 0).values() == [b"x" * 90] * 50


async def test_sticky_partitioning_fills_one_partition_per_batch(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_fake_cluster(2) as cluster, cluster.connect() as client:
        cluster.create_topic("t", 4)
        await client.wait_for_topic("t")
        async with client.producer(batch_size=2000, linger_ms=50) as producer:
            handles = [producer.send_nowait("t", b"%04d" % i + b"." * 96) for i in range(200)]
            metas = [await h for h in handles]
        # Consecutive null-key records share a partition until their batch is full.
        runs: list[tuple[int, int]] = []
        for m in metas:
            if runs and runs[-1][0] == m.partition:
                runs[-1] = (m.partition, runs[-1][1] + 1)
            else:
                runs.append((m.partition, 1))
        assert all(count >= 15 for _, count in runs[:-1])
        assert all(a[0] != b[0] for a, b in zip(runs, runs[1:], strict=False))
        assert len({p for p, _ in runs}) >= 3


async def test_one_request_per_broker_carries_many_partitions(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_fake_cluster(2) as cluster, cluster.connect() as client:
        cluster.create_topic("t", 4)  # leaders: p0 -> 1, p1 -> 2, p2 -> 1, p3 -> 2
        await client.wait_for_topic("t")
        async with client.producer(linger_ms=10) as producer:
            handles = [producer.send_nowait("t", b"v", partition=p) for p in range(4)]
            for h in handles:
                await h
        requests = produce_requests(cluster)
        assert sorted(
            (node, sorted(p.partition for p in r.partitions)) for node, r in requests
        ) == [(1, [0, 2]), (2, [1, 3])]


async def test_acks_none_does_not_wait_for_the_broker(autojump_clock: trio.abc.Clock) -> None:
    async with open_fake_cluster() as cluster, cluster.connect() as client:
        cluster.create_topic("t")
        await client.wait_for_topic("t")
        cluster.produce_gate = trio.Event()  # the broker never answers
        async with client.producer(acks="none", linger_ms=0) as producer:
            meta = await producer.send("t", b"fire")
            assert meta.offset == -1
            batch = await producer.send_many("t", [b"a", b"b"])
            assert [b.base_offset for b in batch] == [-1]
        await trio.testing.wait_all_tasks_blocked()  # let the broker read what was sent
        assert [r.acks for _, r in produce_requests(cluster)] == [0, 0]
        assert cluster.partition("t", 0).values() == [b"fire", b"a", b"b"]
        cluster.produce_gate.set()


@pytest.mark.parametrize(("acks", "wire"), [("leader", 1), ("all", -1), (1, 1), (-1, -1)])
async def test_acks_value_on_the_wire(
    autojump_clock: trio.abc.Clock, acks: str | int, wire: int
) -> None:
    async with open_fake_cluster() as cluster, cluster.connect() as client:
        cluster.create_topic("t")
        async with client.producer(acks=acks) as producer:
            assert (await producer.send("t", b"x")).offset == 0
        assert [r.acks for _, r in produce_requests(cluster)] == [wire]


async def test_acks_all_waits_for_the_high_watermark(autojump_clock: trio.abc.Clock) -> None:
    async with open_fake_cluster() as cluster, cluster.connect() as client:
        cluster.create_topic("t")
        await client.wait_for_topic("t")
        cluster.partition("t", 0).hold_high_watermark = True
        async with client.producer(acks="all", linger_ms=0) as producer:
            handle = producer.send_nowait("t", b"x")
            await trio.sleep(1)
            assert not handle.done
            cluster.set_high_watermark("t", 0, 1)
            assert (await handle).offset == 0
            assert trio.current_time() == pytest.approx(1.0, abs=0.01)


async def test_acks_all_timeouts_are_retried_until_the_delivery_timeout(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_fake_cluster() as cluster, cluster.connect() as client:
        cluster.create_topic("t")
        await client.wait_for_topic("t")
        cluster.partition("t", 0).hold_high_watermark = True
        async with client.producer(
            acks="all", linger_ms=0, request_timeout_ms=1000, delivery_timeout_ms=5000
        ) as producer:
            start = trio.current_time()
            with pytest.raises(RequestTimedOutError, match="delivery_timeout_ms"):
                await producer.send("t", b"x")
            assert 5.0 <= trio.current_time() - start <= 5.5
        # It was retried (and so written more than once: no idempotence yet).
        assert len(produce_requests(cluster)) >= 3


async def test_a_batch_expiring_while_it_backs_off_says_what_kept_failing(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The delivery timeout of a batch that expired between retries (a leader with a
    full disk, say) names the error that kept it from being written."""
    async with (
        open_fake_cluster() as cluster,
        cluster.connect(retry_backoff_ms=1_500, retry_backoff_max_ms=1_500) as client,
    ):
        cluster.create_topic("t")
        await client.wait_for_topic("t")
        cluster.inject("produce", ErrorCode.KAFKA_STORAGE_ERROR, topic="t", times=1000)
        async with client.producer(linger_ms=0, delivery_timeout_ms=2_000) as producer:
            with pytest.raises(RequestTimedOutError) as caught:
                await producer.send("t", b"x")
        assert "delivery_timeout_ms" in str(caught.value)
        assert "last error: KAFKA_STORAGE_ERROR" in str(caught.value)


async def test_retriable_errors_are_retried_in_order(autojump_clock: trio.abc.Clock) -> None:
    async with open_fake_cluster() as cluster, cluster.connect() as client:
        cluster.create_topic("t")
        await client.wait_for_topic("t")
        cluster.inject("produce", ErrorCode.NOT_ENOUGH_REPLICAS, topic="t", times=3)
        async with client.producer(batch_size=300, linger_ms=0) as producer:
            handles = [producer.send_nowait("t", b"%03d" % i + b"-" * 40) for i in range(60)]
            metas = [await h for h in handles]
        assert [m.offset for m in metas] == list(range(60))
        assert cluster.partition("t", 0).values() == [b"%03d" % i + b"-" * 40 for i in range(60)]
        assert cluster.overlapping_produces == 0
        # While retrying, one batch per request; afterwards several again.
        counts = [len(batch_sizes(r)) for _, r in produce_requests(cluster)]
        assert counts[1:4] == [1, 1, 1]
        assert max(counts[4:]) > 1


async def test_not_leader_hint_retries_on_the_new_leader_at_once(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_fake_cluster(2) as cluster, cluster.connect() as client:
        cluster.create_topic("t", leaders=[1])
        await client.wait_for_topic("t")
        cluster.move_leader("t", 0, 2)  # the client's metadata still says 1
        async with client.producer(linger_ms=0) as producer:
            start = trio.current_time()
            meta = await producer.send("t", b"x")
            assert trio.current_time() == start  # no backoff, no metadata wait
        assert meta.offset == 0
        assert [node for node, _ in produce_requests(cluster)] == [1, 2]


@pytest.mark.parametrize("dead_for", [2.0, 2.2, 2.4, 2.6, 2.8, 3.0, 3.2, 3.4])
async def test_dead_leader_replaced_retries_on_the_new_leader_without_backoff(
    autojump_clock: trio.abc.Clock, dead_for: float
) -> None:
    """After a crash the retries back off to retry_backoff_max_ms, and reconnects to
    the dead broker to reconnect_backoff_max_s (faster with two partitions failing
    there). Once the metadata names a new leader each batch goes there at once,
    wherever in those backoffs that happens."""
    async with open_fake_cluster(2) as cluster, cluster.connect() as client:
        cluster.create_topic("t", partitions=2, leaders=[1, 1])
        await client.wait_for_topic("t")
        cluster.stop_broker(1)
        async with client.producer(linger_ms=0) as producer:
            handles = [producer.send_nowait("t", b"x%d" % p, partition=p) for p in (0, 1)]
            await trio.sleep(dead_for)  # retries to the dead broker, further and further apart
            assert not any(h.done for h in handles)
            moved = trio.current_time()
            cluster.move_leader("t", 0, 2)  # the controller elected a new leader
            cluster.move_leader("t", 1, 2)
            metas = [await h for h in handles]
            # Learned within a metadata refresh (retry_backoff_ms) and sent at once.
            assert trio.current_time() - moved <= 0.2
        assert [m.offset for m in metas] == [0, 0]
        assert cluster.partition("t", 0).values() == [b"x0"]
        assert cluster.partition("t", 1).values() == [b"x1"]


async def test_leader_change_mid_stream_keeps_every_record_in_order(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_fake_cluster(3) as cluster, cluster.connect() as client:
        cluster.create_topic("t", leaders=[1])
        await client.wait_for_topic("t")
        values = [b"%05d" % i for i in range(3000)]
        async with client.producer(batch_size=2000, linger_ms=1) as producer:
            handles = []
            for i, value in enumerate(values):
                if i == 1000:
                    cluster.move_leader("t", 0, 2)
                if i == 2000:
                    cluster.move_leader("t", 0, 3)
                handles.append(await producer.enqueue("t", value))
                if i % 100 == 0:
                    await trio.sleep(0.001)
            metas = [await h for h in handles]
        assert [m.offset for m in metas] == list(range(3000))
        assert cluster.partition("t", 0).values() == values
        assert {node for node, _ in produce_requests(cluster)} == {1, 2, 3}
        assert cluster.overlapping_produces == 0


async def test_connection_drop_before_append_is_retried_once(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_fake_cluster() as cluster, cluster.connect() as client:
        cluster.create_topic("t")
        await client.wait_for_topic("t")
        cluster.inject("produce", DROP, topic="t")
        async with client.producer(linger_ms=0) as producer:
            assert (await producer.send("t", b"once")).offset == 0
        assert cluster.partition("t", 0).values() == [b"once"]


async def test_lost_answer_means_a_duplicate_but_order_is_kept(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_fake_cluster() as cluster, cluster.connect() as client:
        cluster.create_topic("t")
        await client.wait_for_topic("t")
        cluster.inject("produce", DROP_AFTER_APPEND, topic="t")
        async with client.producer(linger_ms=0) as producer:
            first = producer.send_nowait("t", b"a")
            await cluster.wait_for_requests("produce", 1)
            second = producer.send_nowait("t", b"b")
            assert (await first).offset == 1  # written at 0, answer lost, rewritten at 1
            assert (await second).offset == 2
        assert cluster.partition("t", 0).values() == [b"a", b"a", b"b"]


async def test_partition_without_leader_fails_at_the_delivery_timeout(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_fake_cluster() as cluster, cluster.connect() as client:
        cluster.create_topic("t")
        await client.wait_for_topic("t")
        cluster.move_leader("t", 0, None)
        async with client.producer(delivery_timeout_ms=3000, linger_ms=0) as producer:
            start = trio.current_time()
            # The first attempt learns there is no leader; the record waits, then expires,
            # saying why it waited.
            with pytest.raises(RequestTimedOutError, match="delivery_timeout_ms") as caught:
                await producer.send("t", b"x")
            assert trio.current_time() - start == pytest.approx(3.0, abs=0.01)
            assert "last error: LEADER_NOT_AVAILABLE: t-0 has no leader" in str(caught.value)
            # The leader comes back: sending works again.
            cluster.move_leader("t", 0, 1)
            assert (await producer.send("t", b"y")).offset == 0


async def test_unknown_topic_fails_after_max_block(autojump_clock: trio.abc.Clock) -> None:
    async with (
        open_fake_cluster() as cluster,
        cluster.connect() as client,
        client.producer(max_block_ms=2000) as producer,
    ):
        start = trio.current_time()
        with pytest.raises(UnknownTopicOrPartitionError, match="'nope' does not exist"):
            await producer.send("nope", b"x")
        assert trio.current_time() - start == pytest.approx(2.0, abs=0.01)
        with pytest.raises(UnknownTopicOrPartitionError):
            await producer.send_many("nope", [b"x"])


async def test_topic_created_while_records_wait_for_it(autojump_clock: trio.abc.Clock) -> None:
    async with (
        open_fake_cluster() as cluster,
        cluster.connect() as client,
        client.producer() as producer,
    ):
        handles = [producer.send_nowait("late", b"v%d" % i) for i in range(3)]
        await trio.sleep(1)
        assert not any(h.done for h in handles)
        cluster.create_topic("late")
        assert [(await h).offset for h in handles] == [0, 1, 2]


async def test_bad_partition_and_oversized_record_fail_at_once(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_fake_cluster() as cluster, cluster.connect() as client:
        cluster.create_topic("t", 2)
        async with client.producer(max_request_size=1000) as producer:
            await producer.send("t", b"warm-up")
            with pytest.raises(UnknownTopicOrPartitionError, match="no partition 5"):
                producer.send_nowait("t", b"x", partition=5)
            with pytest.raises(MessageTooLargeError):
                producer.send_nowait("t", b"x" * 2000)
            with pytest.raises(TypeError):
                producer.send_nowait("t", "text")  # type: ignore[arg-type]


async def test_non_retriable_error_fails_the_batch(autojump_clock: trio.abc.Clock) -> None:
    async with open_fake_cluster() as cluster, cluster.connect() as client:
        cluster.create_topic("t")
        await client.wait_for_topic("t")
        cluster.inject("produce", ErrorCode.CORRUPT_MESSAGE, topic="t")
        async with client.producer(linger_ms=0) as producer:
            with pytest.raises(CorruptRecordError):
                await producer.send("t", b"x")
            assert (await producer.send("t", b"y")).offset == 0
        assert len(produce_requests(cluster)) == 2


async def test_close_flushes_lingering_records(autojump_clock: trio.abc.Clock) -> None:
    async with open_fake_cluster() as cluster, cluster.connect() as client:
        cluster.create_topic("t", 3)
        await client.wait_for_topic("t")
        async with client.producer(linger_ms=60_000) as producer:
            handles = [producer.send_nowait("t", b"%d" % i) for i in range(100)]
        assert trio.current_time() < 1
        assert all(h.done for h in handles)
        assert sum(len(cluster.partition("t", p).values()) for p in range(3)) == 100
        with pytest.raises(trio.ClosedResourceError):
            producer.send_nowait("t", b"late")


async def test_flush_waits_for_every_record(autojump_clock: trio.abc.Clock) -> None:
    async with open_fake_cluster() as cluster, cluster.connect() as client:
        cluster.create_topic("t")
        await client.wait_for_topic("t")
        async with client.producer(linger_ms=60_000) as producer:
            handles = [producer.send_nowait("t", b"%d" % i) for i in range(10)]
            await producer.flush()
            assert all(h.done for h in handles)
            assert handles[9].result().offset == 9
            assert producer.buffered_bytes == 0


async def test_leaving_by_an_exception_fails_unsent_records(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_fake_cluster() as cluster, cluster.connect() as client:
        cluster.create_topic("t")
        await client.wait_for_topic("t")
        handles = []

        async def fail_inside() -> None:
            async with client.producer(linger_ms=60_000) as producer:
                handles.extend(producer.send_nowait("t", b"x") for _ in range(3))
                raise KeyError("boom")

        with pytest.raises(KeyError):  # the caller's own exception, not an ExceptionGroup
            await fail_inside()
        for handle in handles:
            with pytest.raises(trio.ClosedResourceError):
                handle.result()
        assert cluster.partition("t", 0).values() == []


async def test_buffer_memory_bounds_send_nowait_and_enqueue_waits(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_fake_cluster() as cluster, cluster.connect() as client:
        cluster.create_topic("t", 4)
        await client.wait_for_topic("t")
        cluster.produce_gate = trio.Event()
        async with client.producer(batch_size=1000, buffer_memory=3000, linger_ms=0) as producer:
            for p in range(3):
                producer.send_nowait("t", b"x", partition=p)
            with pytest.raises(trio.WouldBlock):
                producer.send_nowait("t", b"x", partition=3)
            assert producer.buffered_bytes <= 3000
            async with trio.open_nursery() as nursery:
                done = trio.Event()

                async def blocked() -> None:
                    await producer.enqueue("t", b"y", partition=3)
                    done.set()

                nursery.start_soon(blocked)
                await trio.sleep(1)
                assert not done.is_set()
                cluster.produce_gate.set()
                await done.wait()


async def test_send_many_covers_every_value_in_order(autojump_clock: trio.abc.Clock) -> None:
    async with open_fake_cluster(2) as cluster, cluster.connect() as client:
        cluster.create_topic("t", 3)
        values = [b"value-%06d" % i for i in range(20_000)]
        async with client.producer(batch_size=16 * 1024) as producer:
            result = await producer.send_many("t", values)
        assert sum(b.record_count for b in result) == len(values)
        assert len({b.partition for b in result}) == 3
        i = 0
        for b in result:
            log = cluster.partition("t", b.partition).records()
            stored = [
                r.value for r in log if b.base_offset <= r.offset < b.base_offset + b.record_count
            ]
            assert stored == values[i : i + b.record_count]
            i += b.record_count
        for _, request in produce_requests(cluster):
            for h in iter_batch_headers(payload_bytes(request.payload)):
                assert h.size <= 16 * 1024


async def test_send_many_with_a_key_or_partition_and_a_generator(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_fake_cluster() as cluster, cluster.connect() as client:
        cluster.create_topic("t", 4)
        async with client.producer() as producer:
            keyed = await producer.send_many("t", (b"g%d" % i for i in range(50)), key=b"k")
            fixed = await producer.send_many("t", [b"p"] * 5, partition=1)
            with pytest.raises(TypeError):
                await producer.send_many("t", ["str"])  # type: ignore[list-item]
        p = partition_for_key(b"k", 4)
        assert [(b.partition, b.record_count) for b in keyed] == [(p, 50)]
        assert all(r.key == b"k" for r in cluster.partition("t", p).records())
        assert [(b.partition, b.base_offset, b.record_count) for b in fixed] == [
            (1, 50 if p == 1 else 0, 5)
        ]


async def test_pipelining_keeps_one_request_per_partition(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_fake_cluster() as cluster, cluster.connect() as client:
        cluster.create_topic("t", 2)
        await client.wait_for_topic("t")
        cluster.produce_gate = trio.Event()
        async with client.producer(linger_ms=0) as producer:
            a = producer.send_nowait("t", b"a0", partition=0)
            await trio.sleep(0.1)
            b = producer.send_nowait("t", b"b0", partition=1)
            a2 = producer.send_nowait("t", b"a1", partition=0)
            await trio.sleep(0.1)
            # p0's first request is held; p1 went out in a second request; a1 waits.
            assert [
                sorted(p.partition for p in r.partitions) for _, r in produce_requests(cluster)
            ] == [[0], [1]]
            cluster.produce_gate.set()
            assert [(await h).offset for h in (a, b, a2)] == [0, 0, 1]
        assert cluster.overlapping_produces == 0


async def test_headers_and_timestamps_round_trip(autojump_clock: trio.abc.Clock) -> None:
    async with open_fake_cluster() as cluster, cluster.connect() as client:
        cluster.create_topic("t")
        async with client.producer() as producer:
            meta = await producer.send(
                "t", b"v", key=b"k", headers=[("h", b"1"), ("n", None)], timestamp=1234
            )
        assert meta.timestamp == 1234
        (record,) = cluster.partition("t", 0).records()
        assert record.headers == (("h", b"1"), ("n", None))
        assert record.timestamp == 1234


async def test_send_many_does_not_linger_on_its_last_batch(autojump_clock: trio.abc.Clock) -> None:
    async with open_fake_cluster() as cluster, cluster.connect() as client:
        cluster.create_topic("t", 2)
        await client.wait_for_topic("t")
        async with client.producer(linger_ms=1000) as producer:
            start = trio.current_time()
            await producer.send_many("t", [b"a", b"b"])
            await producer.send_many("t", [b"c"], partition=1)
            assert trio.current_time() == start


async def test_a_hung_leader_is_abandoned_once_the_partition_moves(
    autojump_clock: trio.abc.Clock,
) -> None:
    # A leader that neither answers nor fails (a paused process) must not hold the
    # partition for the whole request timeout once the cluster moved it elsewhere.
    async with open_fake_cluster(2) as cluster, cluster.connect() as client:
        cluster.create_topic("t", 1, leaders=[1])
        await client.wait_for_topic("t")
        async with client.producer(acks="all", request_timeout_ms=30_000) as producer:
            await producer.send("t", b"before")
            cluster.hung_nodes.add(1)
            start = trio.current_time()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(producer.send, "t", b"during")
                await trio.sleep(0.5)
                cluster.move_leader("t", 0, 2)
            assert trio.current_time() - start < 5  # not the 30 s request timeout
        assert cluster.partition("t", 0).values()[-1] == b"during"


async def test_acks_none_to_a_broker_that_stops_reading_fails_within_the_timeout(
    autojump_clock: trio.abc.Clock,
) -> None:
    # The leader of partition 0 accepts the connection and never reads it: a one-way
    # send waits for room in the connection's buffer at most request_timeout_ms, then
    # fails retriably ("not reading its connection"), until the record's delivery
    # timeout gives up -- instead of holding the producer forever.
    async with open_fake_cluster(2) as cluster:
        cluster.create_topic("t", 1, leaders=[2])
        stalled = cluster.brokers[2].address
        unread: list[trio.abc.Stream] = []

        class StallingPool(MemoryRpcPool):
            async def _open_stream(self, address: str) -> trio.abc.Stream:
                if address != stalled:
                    return await super()._open_stream(address)
                client_side, server_side = trio.testing.lockstep_stream_pair()
                unread.append(server_side)  # kept open, never read
                return client_side

        rng = random.Random(7)
        config = ClientConfig(max_outbox_bytes=1024)
        async with trio.open_nursery() as nursery:
            pool = StallingPool(nursery, config, rng, cluster)
            async with dlog.connect(
                cluster.brokers[1].address, pool=pool, clock=cluster.clock, rng=rng
            ) as client:
                await client.wait_for_topic("t")
                async with client.producer(
                    acks="none", linger_ms=0, request_timeout_ms=2_000, delivery_timeout_ms=10_000
                ) as producer:

                    async def send_records() -> None:
                        for i in range(100):
                            await producer.send("t", b"%d" % i + b"x" * 4000)

                    start = trio.current_time()
                    with (
                        trio.fail_after(60),
                        pytest.raises(RequestTimedOutError, match="not reading its connection"),
                    ):
                        await send_records()
                    # Within the delivery timeout (retries included), not forever.
                    assert trio.current_time() - start <= 10 + 2 + 1
                    assert unread, "the producer never reached the stalled leader"
            pool.close()
            nursery.cancel_scope.cancel()


async def test_every_task_waiting_for_buffer_room_is_woken(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Two sends wait for room in a full buffer_memory; when the broker answers, both
    go ahead (each waiter used to replace the shared event, so only the last one was
    woken and the others timed out at max_block_ms with room to spare)."""
    async with open_fake_cluster() as cluster, cluster.connect() as client:
        cluster.create_topic("t", 4)
        cluster.produce_gate = trio.Event()
        async with client.producer(
            batch_size=1024, buffer_memory=2048, linger_ms=0, max_block_ms=5000
        ) as producer:
            producer.send_nowait("t", b"a", partition=0)
            producer.send_nowait("t", b"b", partition=1)
            await trio.sleep(0.01)  # both batches in flight: the buffer is full
            assert producer.buffered_bytes == 2048
            waited: dict[str, float] = {}

            async def send(name: str, partition: int) -> None:
                start = trio.current_time()
                await producer.send("t", name.encode(), partition=partition)
                waited[name] = trio.current_time() - start

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send, "A", 2)
                await trio.sleep(0.01)
                nursery.start_soon(send, "B", 3)
                await trio.sleep(0.01)
                gate, cluster.produce_gate = cluster.produce_gate, None
                gate.set()
            assert sorted(waited) == ["A", "B"]
            assert max(waited.values()) < 1  # not max_block_ms
            assert producer.buffered_bytes == 0


@pytest.mark.parametrize("known", [True, False], ids=["known-topic", "unknown-topic"])
async def test_a_bad_header_or_timestamp_is_refused_at_once_and_harms_nothing(
    autojump_clock: trio.abc.Clock, known: bool
) -> None:
    """A header that is not (str, bytes) or a timestamp that is not a non-negative int
    is refused by send_nowait itself -- for a topic whose metadata is not known yet
    too. Found later, when its batch was built (or its topic's metadata arrived), it
    failed the producer and the client, and every other buffered record with them."""
    async with open_fake_cluster() as cluster, cluster.connect() as client:
        cluster.create_topic("t", 2)
        if known:
            await client.refresh_metadata()
        async with client.producer(linger_ms=5) as producer:
            if known:
                await producer.send("t", b"warm-up", partition=1)
            with pytest.raises(TypeError, match="header value must be bytes"):
                producer.send_nowait("t", b"v", headers=[("h", "not-bytes")])  # type: ignore[list-item]
            with pytest.raises(TypeError, match="header name must be str"):
                producer.send_nowait("t", b"v", headers=[(b"h", b"x")])  # type: ignore[list-item]
            with pytest.raises(TypeError, match="timestamp must be int"):
                producer.send_nowait("t", b"v", partition=1, timestamp=1.5)  # type: ignore[arg-type]
            with pytest.raises(ValueError, match="timestamp must be >= 0"):
                producer.send_nowait("t", b"v", partition=1, timestamp=-5)
            good = [
                producer.send_nowait("t", b"good-%d" % i, partition=1, headers=[("h", b"x")])
                for i in range(2)
            ]
            for handle in good:
                assert (await handle).partition == 1
        assert cluster.partition("t", 1).values()[-2:] == [b"good-0", b"good-1"]
