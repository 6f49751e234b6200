"""Consumer: start positions, committed offsets, seeks, resets, fetch pipelining."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from dlog.client.consumer import Consumer
from dlog.client.records import Record, Records
from dlog.errors import (
    CorruptRecordError,
    ErrorCode,
    InvalidConfigError,
    OffsetOutOfRangeError,
    UnknownTopicOrPartitionError,
)
from dlog.net.protocol import FetchRequest
from tests.unit.client.fake_broker import FakeCluster, open_fake_cluster
from tests.unit.net.test_rpc_tcp import wait_until


def values(n: int, prefix: bytes = b"v") -> list[bytes]:
    return [prefix + b"%04d" % i for i in range(n)]


async def read(
    consumer: Consumer, count: int, timeout_ms: float = 5000
) -> list[tuple[int, int, bytes | None]]:
    """(partition, offset, value) of the next ``count`` records, in arrival order."""
    out: list[tuple[int, int, bytes | None]] = []
    while len(out) < count:
        batch = await consumer.getmany(max_records=count - len(out), timeout_ms=timeout_ms)
        if not batch:
            break
        for partition, records in batch.items():
            out += [(partition, r.offset, r.value) for r in records]
    return out


def fetches(cluster: FakeCluster) -> list[tuple[int, FetchRequest]]:
    out = []
    for node, request in cluster.requests_of("fetch"):
        assert isinstance(request, FetchRequest)
        out.append((node, request))
    return out


async def test_from_beginning_reads_everything_in_offset_order(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_fake_cluster(2) as cluster, cluster.connect() as client:
        cluster.create_topic("t", 3)
        for p in range(3):
            for chunk in range(4):
                cluster.append_values("t", p, values(25, b"p%dc%d-" % (p, chunk)))
        async with client.consumer("t", from_beginning=True) as consumer:
            got = await read(consumer, 300)
        assert len(got) == 300
        for p in range(3):
            mine = [(o, v) for part, o, v in got if part == p]
            assert [o for o, _ in mine] == list(range(100))
            assert [v for _, v in mine] == cluster.partition("t", p).values()


async def test_default_start_is_the_end(autojump_clock: trio.abc.Clock) -> None:
    async with open_fake_cluster() as cluster, cluster.connect() as client:
        cluster.create_topic("t")
        cluster.append_values("t", 0, values(10, b"old"))
        async with client.consumer("t") as consumer:
            assert consumer.position(0) == 10
            assert await consumer.getmany(timeout_ms=100) == {}
            assert trio.current_time() == pytest.approx(0.1, abs=0.01)
            cluster.append_values("t", 0, [b"new"])
            assert await read(consumer, 1) == [(0, 10, b"new")]


async def test_async_for_yields_consumer_records(autojump_clock: trio.abc.Clock) -> None:
    async with open_fake_cluster() as cluster, cluster.connect() as client:
        cluster.create_topic("t", 2)
        async with client.producer() as producer:
            await producer.send("t", b"a", key=b"k", headers=[("h", b"1")], partition=1)
            await producer.send("t", b"b", partition=1)
        async with client.consumer("t", from_beginning=True) as consumer:
            got = []
            async for record in consumer:
                got.append(record)
                if len(got) == 2:
                    break
            assert consumer.position(1) == 2
        assert [(r.topic, r.partition, r.offset, r.key, r.value, r.headers) for r in got] == [
            ("t", 1, 0, b"k", b"a", (("h", b"1"),)),
            ("t", 1, 1, None, b"b", ()),
        ]
        assert got[0].timestamp == cluster.clock.now_ms()


async def test_getmany_respects_max_records_and_keeps_the_rest(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_fake_cluster() as cluster, cluster.connect() as client:
        cluster.create_topic("t")
        cluster.append_values("t", 0, values(100))
        async with client.consumer("t", from_beginning=True) as consumer:
            first = await consumer.getmany(max_records=30)
            assert [r.offset for r in first[0]] == list(range(30))
            assert consumer.position(0) == 30
            rest = await read(consumer, 70)
            assert [o for _, o, _ in rest] == list(range(30, 100))


async def test_getmany_hands_out_records_sequences_whose_items_are_records(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_fake_cluster() as cluster, cluster.connect() as client:
        cluster.create_topic("t")
        cluster.append_values("t", 0, values(40))
        cluster.append_values("t", 0, values(10, b"w"))  # a second batch
        async with client.consumer("t", from_beginning=True) as consumer:
            batch = await consumer.getmany(max_records=45)
    records = batch[0]
    assert isinstance(records, Records)
    assert len(records) == 45
    every = list(records)
    assert all(type(r) is Record for r in every)
    assert [r.offset for r in every] == list(range(45))
    assert [r.value for r in every] == values(40) + values(5, b"w")
    assert records[0] == every[0] and records[-1].value == b"w0004"
    assert isinstance(records[40:42], Records)
    assert records[40:42] == every[40:42] == [r for r in every if r.offset in (40, 41)]
    assert list(reversed(records)) == every[::-1]
    assert records == every and every == records and records != tuple(every)  # as a list
    assert records != every[:-1] and records != every[:-1] + [every[0]]
    assert every[3] in records and records.index(every[3]) == 3
    assert repr(records[:1]) == f"Records([{every[0]!r}])"
    with pytest.raises(TypeError):
        hash(records)


async def test_commit_and_resume_in_the_same_group(autojump_clock: trio.abc.Clock) -> None:
    async with open_fake_cluster(2) as cluster, cluster.connect() as client:
        cluster.create_topic("t", 2)
        for p in range(2):
            cluster.append_values("t", p, values(20))
        async with client.consumer("t", group="g", from_beginning=True) as consumer:
            got = await read(consumer, 25)
            await consumer.commit()
            positions = {p: consumer.position(p) for p in (0, 1)}
            assert sum(positions.values()) == 25
            assert await consumer.committed(0) == positions[0]
        assert cluster.offsets == {("g", "t", p): positions[p] for p in (0, 1)}
        async with client.consumer("t", group="g", from_beginning=True) as again:
            assert {p: again.position(p) for p in (0, 1)} == positions
            rest = await read(again, 15)
        assert sorted((p, o) for p, o, _ in got + rest) == [
            (p, o) for p in (0, 1) for o in range(20)
        ]
        async with client.consumer("t", group="other") as fresh:
            assert (fresh.position(0), await fresh.committed(0)) == (20, None)


async def test_commit_explicit_offsets_and_needs_a_group(autojump_clock: trio.abc.Clock) -> None:
    async with open_fake_cluster() as cluster, cluster.connect() as client:
        cluster.create_topic("t")
        async with client.consumer("t", group="g") as consumer:
            await consumer.commit({0: 7})
            assert await consumer.committed(0) == 7
        async with client.consumer("t") as no_group:
            with pytest.raises(InvalidConfigError):
                await no_group.commit()


async def test_coordinator_moves_and_loading_are_retried(autojump_clock: trio.abc.Clock) -> None:
    async with open_fake_cluster(2) as cluster, cluster.connect() as client:
        cluster.create_topic("t")
        cluster.offsets["g", "t", 0] = 3
        cluster.append_values("t", 0, values(5))
        cluster.inject("offset_fetch", ErrorCode.COORDINATOR_LOAD_IN_PROGRESS, times=2)
        async with client.consumer("t", group="g") as consumer:
            assert consumer.position(0) == 3
            cluster.coordinator = 2  # the client still asks node 1: NOT_COORDINATOR
            await consumer.commit({0: 4})
        assert cluster.offsets["g", "t", 0] == 4
        assert [n for n, _ in cluster.requests_of("offset_commit")] == [1, 2]
        assert len(cluster.requests_of("find_coordinator")) == 2


async def test_seek_mid_batch_skips_records_below_the_offset(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_fake_cluster() as cluster, cluster.connect() as client:
        cluster.create_topic("t")
        cluster.append_values("t", 0, values(50))  # one batch, offsets 0..49
        async with client.consumer("t", from_beginning=True) as consumer:
            assert [o for _, o, _ in await read(consumer, 3)] == [0, 1, 2]
            consumer.seek(0, 37)
            assert consumer.position(0) == 37
            got = await read(consumer, 13)
            assert [o for _, o, _ in got] == list(range(37, 50))
            assert got[0][2] == b"v0037"
            await consumer.seek_to_beginning()
            assert (await read(consumer, 1))[0][1] == 0
            await consumer.seek_to_end(0)
            assert consumer.position(0) == 50
            with pytest.raises(UnknownTopicOrPartitionError):
                consumer.seek(3, 0)


async def test_consumers_never_see_above_the_high_watermark(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_fake_cluster() as cluster, cluster.connect() as client:
        cluster.create_topic("t")
        part = cluster.partition("t", 0)
        part.hold_high_watermark = True
        for i in range(3):
            cluster.append_values("t", 0, values(10, b"b%d-" % i))
        cluster.set_high_watermark("t", 0, 10)
        async with client.consumer("t", from_beginning=True) as consumer:
            assert [o for _, o, _ in await read(consumer, 30, timeout_ms=500)] == list(range(10))
            assert consumer.highwater(0) == 10
            cluster.set_high_watermark("t", 0, 30)
            assert [o for _, o, _ in await read(consumer, 20)] == list(range(10, 30))


@pytest.mark.parametrize(("policy", "expected_first"), [("earliest", 40), ("latest", 60)])
async def test_out_of_range_resets_by_policy(
    autojump_clock: trio.abc.Clock, policy: str, expected_first: int
) -> None:
    async with open_fake_cluster() as cluster, cluster.connect() as client:
        cluster.create_topic("t")
        for _ in range(6):
            cluster.append_values("t", 0, values(10))
        cluster.delete_records_before("t", 0, 40)  # retention removed offsets 0..39
        async with client.consumer("t", auto_offset_reset=policy) as consumer:
            consumer.seek(0, 5)
            if policy == "latest":
                # The seek takes effect once the long poll in flight (500 ms) returns.
                assert await consumer.getmany(timeout_ms=1500) == {}
                assert consumer.position(0) == 60
                cluster.append_values("t", 0, values(1, b"after"))
            got = await read(consumer, 1)
            assert got[0][1] == expected_first


async def test_out_of_range_with_policy_error_raises_until_seek(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_fake_cluster() as cluster, cluster.connect() as client:
        cluster.create_topic("t")
        cluster.append_values("t", 0, values(10))
        async with client.consumer("t", auto_offset_reset="error") as consumer:
            consumer.seek(0, 99)
            with pytest.raises(OffsetOutOfRangeError, match=r"outside the log \[0, 10\]") as info:
                await consumer.getmany(timeout_ms=1000)
            assert info.value.details["log_end_offset"] == 10
            assert await consumer.getmany(timeout_ms=100) == {}  # stopped, raised once
            consumer.seek(0, 8)
            assert [o for _, o, _ in await read(consumer, 2)] == [8, 9]


async def test_one_pipelined_fetch_per_leader_for_all_its_partitions(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_fake_cluster(2) as cluster, cluster.connect() as client:
        cluster.create_topic("t", 4)  # p0, p2 on node 1; p1, p3 on node 2
        for p in range(4):
            cluster.append_values("t", p, values(5))
        async with client.consumer("t", from_beginning=True, max_wait_ms=200) as consumer:
            assert len(await read(consumer, 20)) == 20
            await trio.sleep(1.0)
        requests = fetches(cluster)
        for node, request in requests:
            assert sorted(p.partition for p in request.partitions) == (
                [0, 2] if node == 1 else [1, 3]
            )
        # Long polls back to back: about one per max_wait_ms per broker, never two at once.
        per_node = [sum(1 for n, _ in requests if n == node) for node in (1, 2)]
        assert all(5 <= count <= 8 for count in per_node)


async def test_next_fetch_leaves_while_the_application_works(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_fake_cluster() as cluster, cluster.connect() as client:
        cluster.create_topic("t")
        cluster.append_values("t", 0, values(10))
        async with client.consumer("t", from_beginning=True) as consumer:
            await read(consumer, 10)
            await trio.testing.wait_all_tasks_blocked()
            # The next long poll is already at the broker, asking from offset 10.
            assert fetches(cluster)[-1][1].partitions[0].fetch_offset == 10


async def test_leader_change_is_followed(autojump_clock: trio.abc.Clock) -> None:
    async with open_fake_cluster(2) as cluster, cluster.connect() as client:
        cluster.create_topic("t", leaders=[1])
        cluster.append_values("t", 0, values(10))
        async with client.consumer("t", from_beginning=True) as consumer:
            assert len(await read(consumer, 10)) == 10
            cluster.move_leader("t", 0, 2)
            cluster.append_values("t", 0, values(5, b"new"))
            got = await read(consumer, 5)
        assert [(o, v) for _, o, v in got] == [(10 + i, b"new%04d" % i) for i in range(5)]
        assert fetches(cluster)[-1][0] == 2
        assert fetches(cluster)[-1][1].partitions[0].current_leader_epoch == 1


async def test_a_hung_leader_is_abandoned_once_the_partition_moves(
    autojump_clock: trio.abc.Clock,
) -> None:
    # A leader that neither answers nor fails (a paused process) must not hold the
    # partition for the whole request timeout once the cluster moved it elsewhere.
    async with open_fake_cluster(2) as cluster, cluster.connect() as client:
        cluster.create_topic("t", leaders=[1])
        cluster.append_values("t", 0, values(10))
        async with client.consumer("t", from_beginning=True) as consumer:
            assert len(await read(consumer, 10)) == 10
            cluster.hung_nodes.add(1)  # its next fetch (in flight now or soon) hangs
            await trio.sleep(0.5)
            start = trio.current_time()
            cluster.move_leader("t", 0, 2)
            cluster.append_values("t", 0, values(5, b"new"))
            got = await read(consumer, 5)
            # An overdue metadata refresh (max_wait_ms + 1 s), which skips the hung
            # broker after 2 s -- not the 30 s request timeout.
            assert trio.current_time() - start < 5
        assert [(o, v) for _, o, v in got] == [(10 + i, b"new%04d" % i) for i in range(5)]
        assert fetches(cluster)[-1][0] == 2


async def test_fetch_errors_are_retried(autojump_clock: trio.abc.Clock) -> None:
    async with open_fake_cluster() as cluster, cluster.connect() as client:
        cluster.create_topic("t")
        cluster.append_values("t", 0, values(3))
        cluster.inject("fetch", ErrorCode.NOT_LEADER_OR_FOLLOWER, topic="t", times=2)
        cluster.inject("fetch", ErrorCode.UNKNOWN_TOPIC_OR_PARTITION, topic="t")
        async with client.consumer("t", from_beginning=True) as consumer:
            assert [o for _, o, _ in await read(consumer, 3)] == [0, 1, 2]


async def test_fetch_buffer_is_bounded(autojump_clock: trio.abc.Clock) -> None:
    async with open_fake_cluster() as cluster, cluster.connect() as client:
        cluster.create_topic("t")
        for _ in range(50):
            cluster.append_values("t", 0, values(10))  # about 200 bytes per batch
        async with client.consumer(
            "t", from_beginning=True, max_partition_fetch_bytes=500, max_buffer_bytes=1000
        ) as consumer:
            await trio.sleep(1)
            # Fetching stopped once the buffer was full (plus what one fetch brings).
            assert consumer._buffered <= 1000 + 500
            stalled = len(fetches(cluster))
            await trio.sleep(1)
            assert len(fetches(cluster)) == stalled
            assert len(await read(consumer, 500)) == 500


async def test_unknown_topic_or_partition(autojump_clock: trio.abc.Clock) -> None:
    async with (
        open_fake_cluster() as cluster,
        cluster.connect(default_api_timeout_ms=2000) as client,
    ):
        cluster.create_topic("t", 2)
        with pytest.raises(UnknownTopicOrPartitionError, match="'nope' does not exist"):
            async with client.consumer("nope"):
                pass
        with pytest.raises(UnknownTopicOrPartitionError, match="no partition 5"):
            async with client.consumer("t", partitions=[5]):
                pass


async def test_chosen_partitions_only(autojump_clock: trio.abc.Clock) -> None:
    async with open_fake_cluster() as cluster, cluster.connect() as client:
        cluster.create_topic("t", 3)
        for p in range(3):
            cluster.append_values("t", p, values(4, b"p%d-" % p))
        async with client.consumer("t", partitions=1, from_beginning=True) as consumer:
            assert consumer.assignment == (1,)
            got = await read(consumer, 10, timeout_ms=300)
        assert {p for p, _, _ in got} == {1}
        assert len(got) == 4


async def test_auto_commit_commits_on_close(autojump_clock: trio.abc.Clock) -> None:
    async with open_fake_cluster() as cluster, cluster.connect() as client:
        cluster.create_topic("t")
        cluster.append_values("t", 0, values(5))
        async with client.consumer(
            "t", group="g", from_beginning=True, auto_commit_interval_ms=1000
        ) as consumer:
            await read(consumer, 2)
            await trio.sleep(1.5)
            assert cluster.offsets["g", "t", 0] == 2
            await read(consumer, 3)
        assert cluster.offsets["g", "t", 0] == 5


async def test_body_exceptions_come_back_unwrapped(autojump_clock: trio.abc.Clock) -> None:
    async with open_fake_cluster() as cluster:
        cluster.create_topic("t")

        async def fail_inside() -> None:
            async with cluster.connect() as client, client.consumer("t"):
                raise ValueError("mine")

        with pytest.raises(ValueError, match="mine"):
            await fail_inside()


async def test_getmany_cancelled_loses_nothing(autojump_clock: trio.abc.Clock) -> None:
    async with open_fake_cluster() as cluster, cluster.connect() as client:
        cluster.create_topic("t")
        async with client.consumer("t") as consumer:
            with trio.move_on_after(0.1):
                await consumer.getmany()
            cluster.append_values("t", 0, values(3))
            with trio.CancelScope() as scope:
                scope.cancel()
                await consumer.getmany()
            assert consumer.position(0) == 0
            assert [o for _, o, _ in await read(consumer, 3)] == [0, 1, 2]


async def test_a_cut_off_last_batch_is_fetched_again(autojump_clock: trio.abc.Clock) -> None:
    async with open_fake_cluster() as cluster, cluster.connect() as client:
        cluster.create_topic("t")
        for i in range(3):
            cluster.append_values("t", 0, values(10, b"b%d-" % i))
        cluster.mangle_fetch = lambda data: data[:-7]
        async with client.consumer("t", from_beginning=True) as consumer:
            got = await read(consumer, 30)
        assert [o for _, o, _ in got] == list(range(30))
        assert [r.partitions[0].fetch_offset for _, r in fetches(cluster)][:2] == [0, 20]


async def test_a_corrupt_batch_raises_once_and_stops_the_partition(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_fake_cluster() as cluster, cluster.connect() as client:
        cluster.create_topic("t")
        cluster.append_values("t", 0, values(10))

        def flip_last_byte(data: bytes) -> bytes:
            return data[:-1] + bytes([data[-1] ^ 0xFF])

        cluster.mangle_fetch = flip_last_byte
        async with client.consumer("t", from_beginning=True) as consumer:
            with pytest.raises(CorruptRecordError, match="CRC mismatch"):
                await consumer.getmany(timeout_ms=1000)
            assert await consumer.getmany(timeout_ms=500) == {}
            assert consumer.position(0) == 0
            consumer.seek(0, 0)  # the next fetch is not mangled
            assert len(await read(consumer, 10)) == 10


async def test_a_corrupt_batch_stops_its_partition_even_with_later_data_buffered(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Data fetched after a corrupt batch (buffered already, or arriving) is not handed
    out while the partition is stopped: the corrupt offsets are not silently skipped,
    and a commit cannot pass them. A seek starts the partition again."""
    async with open_fake_cluster() as cluster, cluster.connect() as client:
        cluster.create_topic("t")
        cluster.append_values("t", 0, values(10))
        cluster.mangle_fetch = lambda data: data[:-1] + bytes([data[-1] ^ 0xFF])
        async with client.consumer("t", from_beginning=True) as consumer:
            await trio.sleep(0.05)  # the corrupt chunk is buffered
            cluster.append_values("t", 0, values(10, b"w"))
            await trio.sleep(0.05)  # and the good one after it (offsets 10-19)
            with pytest.raises(CorruptRecordError, match="CRC mismatch"):
                await consumer.getmany(timeout_ms=100)
            assert await consumer.getmany(timeout_ms=500) == {}
            assert consumer.position(0) == 0
            consumer.seek(0, 0)
            assert [o for _, o, _ in await read(consumer, 20)] == list(range(20))


async def test_a_seek_drops_the_error_raised_for_the_old_position(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A partition stopped by an error not yet raised (out of range, policy "error")
    and then moved by seek() reads from the new position: the old position's error is
    not raised after it."""
    async with open_fake_cluster() as cluster, cluster.connect() as client:
        cluster.create_topic("t")
        cluster.append_values("t", 0, values(10))
        async with client.consumer("t", auto_offset_reset="error") as consumer:
            consumer.seek(0, 100)
            await wait_until(lambda: consumer._states[0].error is not None)
            consumer.seek(0, 3)
            assert [o for _, o, _ in await read(consumer, 7)] == list(range(3, 10))


async def test_a_seek_racing_an_offset_reset_wins(autojump_clock: trio.abc.Clock) -> None:
    """A seek() after the fetcher decided to reset a partition's offset, before the
    reset task ran, used to crash the consumer (the task found no reset to do); now
    the seek wins and the reset does nothing. Driven step by step: the race is a
    matter of which task trio runs first."""
    async with open_fake_cluster() as cluster, cluster.connect() as client:
        cluster.create_topic("t")
        cluster.append_values("t", 0, values(10))
        async with client.consumer("t", auto_offset_reset="latest") as consumer:
            state = consumer._states[0]
            await wait_until(lambda: state.fetching)  # (a long poll at the end)
            state.reset_to = "latest"  # as an OFFSET_OUT_OF_RANGE answer leaves it
            state.fetching = False
            consumer._dispatch(trio.current_time())  # starts the reset task ...
            assert state.resetting
            consumer.seek(0, 3)  # ... and the application seeks before it runs
            assert [o for _, o, _ in await read(consumer, 7)] == list(range(3, 10))
            assert consumer.position(0) == 10


async def test_concurrent_getmany_callers_are_all_woken(autojump_clock: trio.abc.Clock) -> None:
    """Two tasks waiting in getmany both get records as they arrive (each waiter used
    to replace the shared event, so the first one slept on with data buffered)."""
    async with open_fake_cluster() as cluster, cluster.connect() as client:
        cluster.create_topic("t", 2)
        async with client.consumer("t") as consumer:
            got: dict[str, list[int]] = {}

            async def reader(name: str) -> None:
                batch = await consumer.getmany(max_records=5)
                got[name] = sorted(r.offset for records in batch.values() for r in records)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader, "A")
                await trio.sleep(0.01)
                nursery.start_soon(reader, "B")
                await trio.sleep(0.01)
                cluster.append_values("t", 0, values(3))
                await trio.sleep(0.5)
                cluster.append_values("t", 1, values(3))
                await wait_until(lambda: len(got) == 2, timeout=5)
            assert got == {"A": [0, 1, 2], "B": [0, 1, 2]}


async def test_gzip_batches_round_trip(autojump_clock: trio.abc.Clock) -> None:
    async with open_fake_cluster() as cluster, cluster.connect() as client:
        cluster.create_topic("t")
        async with client.producer(compression="gzip") as producer:
            await producer.send_many("t", values(500))
            await producer.send("t", b"keyed", key=b"k")
        async with client.consumer("t", from_beginning=True) as consumer:
            got = await read(consumer, 501)
        assert [v for _, _, v in got] == [*values(500), b"keyed"]
        stored = sum(len(b) for _, _, b in cluster.partition("t", 0).batches)
        assert stored < 500 * 5  # compressed: far less than the 5+ bytes per value
