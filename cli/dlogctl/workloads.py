"""Benchmark workloads through the public client API, shared by ``dlogctl bench`` and the
scripts in bench/: unique values, checksums, producing, reading back, latency.

Values are unique and verifiable: ``tag + 20-digit sequence number + padding``. The tag
(empty for a topic the benchmark owns) marks one run's records, so a run against a topic
that already holds data, or that others write to, reads back and checks only its own.
Every throughput run is verified: the count and an order-independent checksum of what
came back must match what was acknowledged.

Progress is reported through ``on_progress(records)`` callbacks (records just
completed), so a caller can draw a bar; nothing here prints.
"""

from __future__ import annotations

import functools
import math
import statistics
import time
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import trio

from dlog.client import Client, Consumer, DeliveryHandle, Producer

VALUE_BYTES = 100
#: Digits of the sequence number in each value (after the tag).
SEQUENCE_DIGITS = 20
#: Producer settings for throughput runs: big batches (well under the broker's default
#: max_message_bytes of 1 MiB), a short linger.
THROUGHPUT_PRODUCER = {"linger_ms": 2, "batch_size": 512 << 10}
_MASK = 0xFFFF_FFFF_FFFF_FFFF

Progress = Callable[[int], None]


def _ignore(_records: int) -> None:
    pass


def values(start: int, count: int, size: int = VALUE_BYTES, tag: bytes = b"") -> list[bytes]:
    """``count`` unique ``size``-byte values: ``tag``, a zero-padded sequence number from
    ``start``, then padding."""
    if size < min_value_bytes(tag):
        raise ValueError(f"values of {size} bytes cannot hold a {len(tag)}-byte tag and a number")
    if start < 0:
        raise ValueError(f"sequence numbers start at 0, not {start}")
    # The last _LOW_DIGITS digits and the padding come from a table, so a value costs
    # one concatenation (the generator must not be what a benchmark measures).
    tails = _tails(size - len(tag) - SEQUENCE_DIGITS)
    out: list[bytes] = []
    i = start
    end = start + count
    while i < end:
        high, low = divmod(i, _LOW_RANGE)
        n = min(end - i, _LOW_RANGE - low)
        head = tag + b"%0*d" % (SEQUENCE_DIGITS - _LOW_DIGITS, high)
        out += map(head.__add__, tails[low : low + n])
        i += n
    return out


_LOW_DIGITS = 4
_LOW_RANGE = 10**_LOW_DIGITS


@functools.lru_cache(maxsize=4)
def _tails(pad: int) -> tuple[bytes, ...]:
    """The last digits of every sequence number, each followed by ``pad`` bytes."""
    padding = b"x" * pad
    return tuple(b"%0*d" % (_LOW_DIGITS, low) + padding for low in range(_LOW_RANGE))


def min_value_bytes(tag: bytes = b"") -> int:
    return len(tag) + SEQUENCE_DIGITS


def checksum(chunks: Iterable[bytes]) -> int:
    """Order-independent checksum of a set of values (sum of CRC-32s, mod 2^64)."""
    total = 0
    crc = zlib.crc32
    for v in chunks:
        total += crc(v)
    return total & _MASK


def expected_checksum(count: int, size: int = VALUE_BYTES, tag: bytes = b"") -> int:
    """The checksum of ``values(0, count, size, tag)``, a million at a time."""
    total = 0
    for first in range(0, count, 1_000_000):
        total += checksum(values(first, min(1_000_000, count - first), size, tag))
    return total & _MASK


def percentile(samples: list[float], p: float) -> float:
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def median(samples: list[float]) -> float:
    return statistics.median(samples) if samples else float("nan")


def sequence_of(value: bytes, tag: bytes = b"") -> int | None:
    """The sequence number in one of our values, or None for another writer's record."""
    if not value.startswith(tag):
        return None
    digits = value[len(tag) : len(tag) + SEQUENCE_DIGITS]
    return int(digits) if digits.isdigit() else None


# --- producing ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Produced:
    """A throughput run: records acknowledged, seconds taken, and per-chunk latencies
    (a ``send_many`` call of ``chunk`` records until its last acknowledgement)."""

    records: int
    seconds: float
    chunk: int
    chunk_latencies_ms: list[float]


async def produce(
    producer: Producer,
    topic: str,
    *,
    count: int | None = None,
    seconds: float | None = None,
    size: int = VALUE_BYTES,
    tag: bytes = b"",
    chunk: int = 20_000,
    workers: int = 4,
    on_progress: Progress = _ignore,
) -> Produced:
    """Send ``count`` values (or as many as fit in ``seconds``) with ``send_many`` from
    ``workers`` concurrent tasks, each taking the next ``chunk`` of sequence numbers."""
    if (count is None) == (seconds is None):
        raise ValueError("give count or seconds")
    next_first = 0
    latencies: list[float] = []
    deadline = math.inf if seconds is None else time.perf_counter() + seconds
    start = time.perf_counter()

    async def worker() -> None:
        nonlocal next_first
        while time.perf_counter() < deadline:
            first = next_first
            n = chunk if count is None else min(chunk, count - first)
            if n <= 0:
                return
            next_first += n
            batch = values(first, n, size, tag)
            sent = time.perf_counter()
            await producer.send_many(topic, batch)
            latencies.append((time.perf_counter() - sent) * 1000)
            on_progress(n)

    async with trio.open_nursery() as nursery:
        for _ in range(workers):
            nursery.start_soon(worker)
    return Produced(next_first, time.perf_counter() - start, chunk, latencies)


# --- reading back -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReadBack:
    """What a consumer read of one run's values: how many, their checksum, and how long
    reading took (from the first ``getmany`` call)."""

    records: int
    checksum: int
    seconds: float


async def end_offsets(client: Client, topic: str) -> dict[int, int]:
    """Each partition's high watermark: where records produced from now on start."""
    info = await client.describe_topic(topic)
    return {p.partition: await client.latest_offset(topic, p.partition) for p in info.partitions}


async def read_back(
    client: Client,
    topic: str,
    count: int,
    *,
    start: Mapping[int, int] | None = None,
    tag: bytes = b"",
    idle_timeout_ms: int = 10_000,
    on_progress: Progress = _ignore,
) -> ReadBack:
    """Read from ``start`` offsets (default: the beginning) until ``count`` of this run's
    values came back, touching every value (a CRC-32 of each); stops early when nothing
    arrives for ``idle_timeout_ms`` (the caller sees the shortfall)."""
    seen = 0
    total = 0
    crc = zlib.crc32
    async with client.consumer(
        topic, from_beginning=True, max_partition_fetch_bytes=8 << 20
    ) as consumer:
        for partition, offset in (start or {}).items():
            if offset > 0:
                consumer.seek(partition, offset)
        began = time.perf_counter()
        while seen < count:
            batch = await consumer.getmany(max_records=100_000, timeout_ms=idle_timeout_ms)
            if not batch:
                break
            got = 0
            for rows in batch.values():
                if tag:
                    for row in rows:
                        value = row[3]
                        if value is not None and value.startswith(tag):
                            got += 1
                            total += crc(value)
                else:
                    got += len(rows)
                    for row in rows:
                        total += crc(row[3] or b"")
            seen += got
            on_progress(got)
        seconds = time.perf_counter() - began
    return ReadBack(seen, total & _MASK, seconds)


# --- latency --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Latencies:
    """Per record, in ms: send until acknowledged, and send until a consumer had it."""

    ack_ms: list[float]
    end_to_end_ms: list[float]
    sent: int
    seconds: float


async def latency(
    producer: Producer,
    topic: str,
    *,
    rate: float,
    count: int,
    consumer: Consumer | None = None,
    size: int = VALUE_BYTES,
    tag: bytes = b"",
    warmup: int = 200,
    idle_timeout_ms: int = 10_000,
    on_progress: Progress = _ignore,
) -> Latencies:
    """Send ``count`` records one at a time at ``rate`` per second (``send_nowait``) after
    ``warmup`` unmeasured ones; time each acknowledgement and, with a ``consumer``
    already positioned before the first, each record's arrival there."""
    sent_at: list[float] = [math.nan] * (warmup + count)
    ack_ms: list[float] = []
    e2e_ms: list[float] = []
    for value in values(0, warmup, size, tag):
        await producer.send(topic, value)

    async def track(handle: DeliveryHandle, sent: float) -> None:
        await handle
        ack_ms.append((time.perf_counter() - sent) * 1000)
        if consumer is None:
            on_progress(1)

    async def receive(consumer: Consumer) -> None:
        while len(e2e_ms) < count:
            batch = await consumer.getmany(max_records=10_000, timeout_ms=idle_timeout_ms)
            now = time.perf_counter()
            if not batch:
                return
            got = 0
            for rows in batch.values():
                for row in rows:
                    seq = sequence_of(row[3] or b"", tag)
                    if seq is not None and warmup <= seq < warmup + count:
                        e2e_ms.append((now - sent_at[seq]) * 1000)
                        got += 1
            on_progress(got)

    interval = 1 / rate
    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        if consumer is not None:
            nursery.start_soon(receive, consumer)
        for i, value in enumerate(values(warmup, count, size, tag)):
            delay = start + i * interval - time.perf_counter()
            if delay > 0:
                await trio.sleep(delay)
            sent = time.perf_counter()
            sent_at[warmup + i] = sent
            nursery.start_soon(track, producer.send_nowait(topic, value), sent)
    return Latencies(ack_ms, e2e_ms, count, time.perf_counter() - start)
