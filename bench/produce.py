"""bench/produce.py: producer throughput and latency through the public client API.

Runs, each against a fresh local cluster (separate node processes on 127.0.0.1):

1. 1 node, acks=leader: records/s and MB/s of 100-byte unique values via send_many;
2. 3 nodes, RF 3, acks=all: the same;
3. 3 nodes, acks=all: produce-to-ack latency p50/p99 at 1,000 records/s (send_nowait,
   one record at a time, linger 0).

Every throughput run is verified afterwards: a consumer reads the topic back and the
record count and checksum must match what was acknowledged. Figures are medians of
``--repeat`` runs. Prints a table, then one JSON line.

    python bench/produce.py [--seconds 5] [--repeat 3] [--partitions 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import (
    VALUE_BYTES,
    checksum,
    expected_checksum,
    local_cluster,
    median,
    percentile,
    values,
)

import dlog

CHUNK = 20_000


async def throughput(
    bootstrap: list[str], topic: str, seconds: float, acks: str, partitions: int, rf: int
) -> tuple[int, float]:
    async with dlog.connect(bootstrap) as client:
        await client.create_topic(topic, partitions=partitions, replication_factor=rf)
        await client.wait_for_topic(topic)
        async with client.producer(acks=acks, linger_ms=2, batch_size=512 << 10) as producer:
            next_chunk = 0
            deadline = time.perf_counter() + seconds
            start = time.perf_counter()

            async def worker() -> None:
                nonlocal next_chunk
                while time.perf_counter() < deadline:
                    first = next_chunk * CHUNK
                    next_chunk += 1
                    await producer.send_many(topic, values(first, CHUNK))

            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    nursery.start_soon(worker)
            elapsed = time.perf_counter() - start
        return next_chunk * CHUNK, elapsed


async def verify(bootstrap: list[str], topic: str, count: int) -> None:
    """Read everything back: the count and checksum must match what was acknowledged."""
    seen = 0
    total = 0
    async with (
        dlog.connect(bootstrap) as client,
        client.consumer(topic, from_beginning=True) as consumer,
    ):
        while seen < count:
            batch = await consumer.getmany(max_records=100_000, timeout_ms=10_000)
            if not batch:
                raise AssertionError(f"only {seen} of {count} records came back")
            for records in batch.values():
                seen += len(records)
                total += checksum(r[3] for r in records)
    total &= 0xFFFF_FFFF_FFFF_FFFF
    if seen != count or total != expected_checksum(count):
        raise AssertionError(f"verification failed: {seen} records (expected {count})")


async def latency(bootstrap: list[str], topic: str, seconds: float, rate: int) -> list[float]:
    samples: list[float] = []
    async with dlog.connect(bootstrap) as client:
        await client.create_topic(topic, partitions=1, replication_factor=3)
        await client.wait_for_topic(topic)
        async with client.producer(acks="all", linger_ms=0) as producer:
            # Warm up connections and the fetch loops.
            for v in values(0, 200):
                await producer.send(topic, v)

            async def track(handle: dlog.DeliveryHandle, sent: float) -> None:
                await handle
                samples.append((time.perf_counter() - sent) * 1000)

            async with trio.open_nursery() as nursery:
                interval = 1 / rate
                start = time.perf_counter()
                n = int(seconds * rate)
                for i, v in enumerate(values(1000, n)):
                    target = start + i * interval
                    delay = target - time.perf_counter()
                    if delay > 0:
                        await trio.sleep(delay)
                    sent = time.perf_counter()
                    nursery.start_soon(track, producer.send_nowait(topic, v), sent)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--partitions", type=int, default=3)
    parser.add_argument("--latency-seconds", type=float, default=10.0)
    args = parser.parse_args()

    runs: dict[str, list[float]] = {"1node": [], "3node": []}
    for run in range(args.repeat):
        for nodes, acks, key in ((1, "leader", "1node"), (3, "all", "3node")):
            with local_cluster(nodes) as spec:
                bootstrap = [n.rpc for n in spec.nodes]
                topic = f"bench-{key}-{run}"
                count, elapsed = trio.run(
                    throughput, bootstrap, topic, args.seconds, acks, args.partitions, nodes
                )
                trio.run(verify, bootstrap, topic, count)
                runs[key].append(count / elapsed)
                print(
                    f"  run {run + 1}: {key} {count / elapsed:,.0f} records/s "
                    f"({count:,} records verified)",
                    file=sys.stderr,
                )
    with local_cluster(3) as spec:
        samples = trio.run(
            latency, [n.rpc for n in spec.nodes], "bench-latency", args.latency_seconds, 1000
        )
    r1 = median(runs["1node"])
    r3 = median(runs["3node"])
    result = {
        "records_s_1node_acks_leader": round(r1),
        "mb_s_1node_acks_leader": round(r1 * VALUE_BYTES / 1e6, 1),
        "records_s_3node_acks_all": round(r3),
        "mb_s_3node_acks_all": round(r3 * VALUE_BYTES / 1e6, 1),
        "latency_p50_ms": round(percentile(samples, 50), 3),
        "latency_p99_ms": round(percentile(samples, 99), 3),
        "latency_samples": len(samples),
        "repeat": args.repeat,
        "seconds": args.seconds,
        "partitions": args.partitions,
    }
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"dlog produce (median of {args.repeat}, 100-byte values)")
    table.add_column("workload")
    table.add_column("records/s", justify="right")
    table.add_column("MB/s", justify="right")
    table.add_column("target", justify="right")
    table.add_row(
        "1 node, acks=leader", f"{r1:,.0f}", f"{result['mb_s_1node_acks_leader']}", ">= 1,000,000/s"
    )
    table.add_row(
        "3 nodes, RF 3, acks=all", f"{r3:,.0f}", f"{result['mb_s_3node_acks_all']}", ">= 500,000/s"
    )
    table.add_row(
        "latency at 1,000/s (acks=all)",
        f"p50 {result['latency_p50_ms']} ms",
        f"p99 {result['latency_p99_ms']} ms",
        "p99 <= 2 ms",
    )
    Console().print(table)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
