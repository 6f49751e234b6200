"""send_many never builds a batch larger than ``batch_size``, whatever its values' sizes.

A batch over ``batch_size`` can exceed the broker's ``max_message_bytes`` (1 MiB + 12 by
default) and fail with MESSAGE_TOO_LARGE, as bench/produce.py's 1 MiB batches of 100-byte
values did when the bulk path under-estimated each record's varint overhead.
"""

from __future__ import annotations

import pytest
import trio

from dlog.net.messages import payload_bytes
from dlog.net.protocol import ProduceRequest
from dlog.storage.batch import iter_batch_headers
from tests.unit.client.fake_broker import FakeCluster, open_fake_cluster


def batch_bytes(cluster: FakeCluster) -> list[int]:
    sizes = []
    for _, request in cluster.requests_of("produce"):
        assert isinstance(request, ProduceRequest)
        sizes += [h.size for h in iter_batch_headers(payload_bytes(request.payload))]
    return sizes


@pytest.mark.parametrize(
    "values",
    [
        pytest.param([b"%020d" % i + b"x" * 80 for i in range(30_000)], id="100-byte"),
        pytest.param([b"s"] + [b"L" * 1000] * 2_000, id="small-then-large"),
        pytest.param([b"v" * (i % 700) for i in range(5_000)], id="mixed"),
    ],
)
async def test_send_many_batches_stay_within_batch_size(
    autojump_clock: trio.abc.Clock, values: list[bytes]
) -> None:
    async with open_fake_cluster() as cluster, cluster.connect() as client:
        cluster.create_topic("t", 2)
        async with client.producer(batch_size=64 * 1024, linger_ms=1000) as producer:
            result = await producer.send_many("t", values)
        assert sum(b.record_count for b in result) == len(values)
        sizes = batch_bytes(cluster)
        assert max(sizes) <= 64 * 1024
        # Still filled, not split needlessly: every batch but the last of each partition
        # lacks less than one record (and the batch header) of batch_size.
        room = max(map(len, values)) + 100
        assert all(size > 64 * 1024 - room for size in sorted(sizes)[2:])
        values_stored = [r.value for p in (0, 1) for r in cluster.partition("t", p).records()]
        assert sorted(values_stored) == sorted(values)


async def test_send_many_with_a_key_stays_within_batch_size(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_fake_cluster() as cluster, cluster.connect() as client:
        cluster.create_topic("t", 1)
        values = [b"k" * (i % 300) for i in range(3_000)]
        async with client.producer(batch_size=16 * 1024, linger_ms=1000) as producer:
            await producer.send_many("t", values, key=b"some-key")
        assert max(batch_bytes(cluster)) <= 16 * 1024
        assert [r.value for r in cluster.partition("t", 0).records()] == values


async def test_enqueue_with_headers_and_timestamps_stays_within_batch_size(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_fake_cluster() as cluster, cluster.connect() as client:
        cluster.create_topic("t", 1)
        await client.wait_for_topic("t")
        async with client.producer(batch_size=4096, linger_ms=1000) as producer:
            handles = [
                await producer.enqueue(
                    "t",
                    b"v" * (i % 200),
                    key=b"k%d" % i,
                    headers=[("trace", b"h" * (i % 50))],
                    timestamp=1_000_000_000_000 + i * 10**9,
                )
                for i in range(500)
            ]
            await producer.flush()
            assert [h.result().offset for h in handles] == list(range(500))
        assert max(batch_bytes(cluster)) <= 4096
