"""The runs behind ``dlogctl bench``: each sets up its topic, runs a workload of
:mod:`dlogctl.workloads` against the cluster with progress on a rich bar, verifies what
arrived, and returns its figures as one JSON-ready dict.

A run without ``topic`` creates a throwaway topic and deletes it afterwards (also when
it fails or is interrupted). With ``topic`` it writes to that existing topic, tagging
its values so that it reads back and checks only its own records.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio
from rich.progress import Progress

from dlog.client import Client
from dlog.errors import DlogError
from dlog.net.protocol import acks_from_text
from dlogctl import workloads
from dlogctl.connection import open_client, require_topic

#: Produce throughput: records per send_many call and calls in flight. Small chunks keep
#: each chunk's latency meaningful; enough of them keep every partition's pipeline full.
CHUNK = 2_000
WORKERS = 8


@dataclass(frozen=True, slots=True, kw_only=True)
class BenchSettings:
    addresses: list[str]
    records: int
    value_bytes: int = workloads.VALUE_BYTES
    partitions: int = 3
    replication_factor: int | None = None
    topic: str | None = None
    acks: str = "all"
    #: e2e only: records per second.
    rate: float = 1000.0


@dataclass(frozen=True, slots=True)
class _Target:
    topic: str
    tag: bytes
    partitions: int
    replication_factor: int
    #: Where this run's records start (None: the whole topic is ours).
    start: dict[int, int] | None


@asynccontextmanager
async def _target(client: Client, settings: BenchSettings, kind: str) -> AsyncIterator[_Target]:
    if settings.topic is not None:
        await require_topic(client, settings.topic)
        info = await client.describe_topic(settings.topic)
        start = await workloads.end_offsets(client, settings.topic)
        yield _Target(
            settings.topic,
            b"%08x" % secrets.randbits(32),
            len(info.partitions),
            max(len(p.replicas) for p in info.partitions),
            start,
        )
        return
    name = f"bench-{kind}-{secrets.token_hex(4)}"
    await client.create_topic(name, settings.partitions, settings.replication_factor)
    try:
        await client.wait_for_topic(name)
        info = await client.describe_topic(name)
        yield _Target(
            name, b"", len(info.partitions), max(len(p.replicas) for p in info.partitions), None
        )
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(10):
            try:
                await client.delete_topic(name)
            except DlogError:
                pass  # the run's own outcome matters more than the cleanup's


async def _refresh(progress: Progress | None) -> None:
    """Redraw the bar from trio (rich's own refresh thread is not used)."""
    if progress is None:
        return
    while True:
        progress.refresh()
        await trio.sleep(0.1)


def _counter(progress: Progress | None, description: str, total: int) -> workloads.Progress:
    if progress is None:
        return lambda records: None
    task = progress.add_task(description, total=total)
    return lambda records: progress.advance(task, records)


def _common(settings: BenchSettings, target: _Target, kind: str) -> dict[str, Any]:
    return {
        "workload": kind,
        "bootstrap": ",".join(settings.addresses),
        "topic": target.topic,
        "throwaway_topic": settings.topic is None,
        "partitions": target.partitions,
        "replication_factor": target.replication_factor,
        "records": settings.records,
        "value_bytes": settings.value_bytes,
    }


def _verdict(settings: BenchSettings, target: _Target, read: workloads.ReadBack) -> dict[str, Any]:
    want = workloads.expected_checksum(settings.records, settings.value_bytes, target.tag)
    checksum_ok = read.records == settings.records and read.checksum == want
    return {
        "verified_records": read.records,
        "checksum_ok": checksum_ok,
        "verified": checksum_ok,
    }


async def _produce_then_read(
    settings: BenchSettings,
    progress: Progress | None,
    kind: str,
    acks: str,
    labels: tuple[str, str],
) -> tuple[_Target, workloads.Produced, workloads.ReadBack]:
    """The shared shape of ``produce`` and ``consume``: N unique values with
    ``send_many`` at ``acks``, then every one read back (and checked by the caller);
    ``labels`` name the two phases on the progress display."""
    async with open_client(settings.addresses) as client, trio.open_nursery() as nursery:
        nursery.start_soon(_refresh, progress)
        async with _target(client, settings, kind) as target:
            async with client.producer(acks=acks, **workloads.THROUGHPUT_PRODUCER) as producer:
                produced = await workloads.produce(
                    producer,
                    target.topic,
                    count=settings.records,
                    size=settings.value_bytes,
                    tag=target.tag,
                    chunk=CHUNK,
                    workers=WORKERS,
                    on_progress=_counter(progress, labels[0], settings.records),
                )
            read = await workloads.read_back(
                client,
                target.topic,
                settings.records,
                start=target.start,
                tag=target.tag,
                on_progress=_counter(progress, labels[1], settings.records),
            )
        nursery.cancel_scope.cancel()
    return target, produced, read


async def produce(settings: BenchSettings, progress: Progress | None) -> dict[str, Any]:
    """N unique values with ``send_many`` at ``acks``, then read back and verified."""
    target, produced, read = await _produce_then_read(
        settings, progress, "produce", settings.acks, ("producing", "verifying")
    )
    rate = produced.records / produced.seconds
    lat = produced.chunk_latencies_ms
    return {
        **_common(settings, target, "produce"),
        "acks": _acks_name(settings.acks),
        "seconds": round(produced.seconds, 3),
        "records_s": round(rate),
        "mb_s": round(rate * settings.value_bytes / 1e6, 2),
        "latency_chunk_records": produced.chunk,
        "latency_p50_ms": _ms(workloads.percentile(lat, 50)),
        "latency_p99_ms": _ms(workloads.percentile(lat, 99)),
        "latency_max_ms": _ms(max(lat, default=math.nan)),
        **_verdict(settings, target, read),
    }


async def consume(settings: BenchSettings, progress: Progress | None) -> dict[str, Any]:
    """Fill a topic with N unique values (acks=all), then time reading them back with
    ``getmany``, touching every value."""
    target, filled, read = await _produce_then_read(
        settings, progress, "consume", "all", ("filling", "consuming")
    )
    rate = read.records / read.seconds if read.seconds > 0 else math.nan
    return {
        **_common(settings, target, "consume"),
        "seconds": round(read.seconds, 3),
        "records_s": round(rate) if math.isfinite(rate) else None,
        "mb_s": round(rate * settings.value_bytes / 1e6, 2) if math.isfinite(rate) else None,
        "fill_records_s": round(filled.records / filled.seconds),
        **_verdict(settings, target, read),
    }


async def end_to_end(settings: BenchSettings, progress: Progress | None) -> dict[str, Any]:
    """N records sent one at a time at ``rate`` (linger 0) while a consumer reads the
    topic: the latency of each acknowledgement and of each record's arrival."""
    async with open_client(settings.addresses) as client, trio.open_nursery() as nursery:
        nursery.start_soon(_refresh, progress)
        async with (
            _target(client, settings, "e2e") as target,
            client.consumer(target.topic, from_beginning=False) as consumer,
            client.producer(acks=settings.acks, linger_ms=0) as producer,
        ):
            result = await workloads.latency(
                producer,
                target.topic,
                rate=settings.rate,
                count=settings.records,
                consumer=consumer,
                size=settings.value_bytes,
                tag=target.tag,
                on_progress=_counter(progress, "sending and receiving", settings.records),
            )
        nursery.cancel_scope.cancel()
    ack, e2e = result.ack_ms, result.end_to_end_ms
    return {
        **_common(settings, target, "e2e"),
        "acks": _acks_name(settings.acks),
        "rate": settings.rate,
        "achieved_rate": round(result.sent / result.seconds, 1),
        "seconds": round(result.seconds, 3),
        "latency_p50_ms": _ms(workloads.percentile(e2e, 50)),
        "latency_p99_ms": _ms(workloads.percentile(e2e, 99)),
        "latency_max_ms": _ms(max(e2e, default=math.nan)),
        "ack_p50_ms": _ms(workloads.percentile(ack, 50)),
        "ack_p99_ms": _ms(workloads.percentile(ack, 99)),
        "ack_max_ms": _ms(max(ack, default=math.nan)),
        "received": len(e2e),
        "verified": len(e2e) == settings.records,
    }


def _ms(value: float) -> float | None:
    """A figure for JSON: rounded, or None when there was nothing to measure."""
    return round(value, 3) if math.isfinite(value) else None


def _acks_name(acks: str) -> str:
    return {0: "none", 1: "leader", -1: "all"}[acks_from_text(acks)]
