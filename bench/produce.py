"""bench/produce.py: producer throughput and latency through the public client API.

Runs, each against a fresh local cluster (separate node processes on 127.0.0.1):

1. 1 node, acks=leader: records/s and MB/s of 100-byte unique values via send_many;
2. 3 nodes, RF 3, acks=all: the same;
3. 3 nodes, acks=all: produce-to-ack latency p50/p99 at 1,000 records/s (send_nowait,
   one record at a time, linger 0);
4. the latency baseline, same rate and length (bench/_relay.py): the same four-process
   chain (client -> leader -> two followers -> leader -> client) carrying bare
   100-byte messages, over blocking sockets, trio streams and asyncio streams, so the
   machine's own tail at this rate is measured in the same run;
5. the CPU probe (bench/_relay.py ``cpu_probe``): one process doing the same small
   piece of Python work every millisecond, to show how steady the CPU itself is.

Every throughput run is verified afterwards: a consumer reads the topic back and the
record count and checksum must match what was acknowledged. Figures are medians of
``--repeat`` runs. Prints a table, then one JSON line.

    python bench/produce.py [--seconds 5] [--repeat 3] [--partitions 3]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import (
    VALUE_BYTES,
    expected_checksum,
    local_cluster,
    median,
    percentile,
    python_build,
)
from _relay import STACKS, cpu_probe, relay_latencies
from dlogctl import workloads

import dlog


async def throughput(
    bootstrap: list[str], topic: str, seconds: float, acks: str, partitions: int, rf: int
) -> tuple[int, float]:
    async with dlog.connect(bootstrap) as client:
        await client.create_topic(topic, partitions=partitions, replication_factor=rf)
        await client.wait_for_topic(topic)
        async with client.producer(acks=acks, **workloads.THROUGHPUT_PRODUCER) as producer:
            produced = await workloads.produce(producer, topic, seconds=seconds)
        return produced.records, produced.seconds


async def verify(bootstrap: list[str], topic: str, count: int) -> None:
    """Read everything back: the count and checksum must match what was acknowledged."""
    async with dlog.connect(bootstrap) as client:
        read = await workloads.read_back(client, topic, count)
    if read.records != count or read.checksum != expected_checksum(count):
        raise AssertionError(f"verification failed: {read.records} records (expected {count})")


async def latency(bootstrap: list[str], topic: str, seconds: float, rate: int) -> list[float]:
    async with dlog.connect(bootstrap) as client:
        await client.create_topic(topic, partitions=1, replication_factor=3)
        await client.wait_for_topic(topic)
        async with client.producer(acks="all", linger_ms=0) as producer:
            result = await workloads.latency(producer, topic, rate=rate, count=int(seconds * rate))
    return result.ack_ms


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
    relay = {stack: relay_latencies(stack, 1000, args.latency_seconds) for stack in STACKS}
    probe = cpu_probe(args.latency_seconds)
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
        **{
            f"relay_{stack}_p{p}_ms": round(percentile(relay[stack], p), 3)
            for stack in STACKS
            for p in (50, 99)
        },
        **{f"cpu_probe_{k}": v for k, v in probe.items()},
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
    for stack in STACKS:
        table.add_row(
            f"  baseline: relay, {stack}",
            f"p50 {result[f'relay_{stack}_p50_ms']} ms",
            f"p99 {result[f'relay_{stack}_p99_ms']} ms",
            "",
        )
    table.add_row(
        "  baseline: CPU probe (work every ms)",
        f"p50 {probe['p50_us'] / 1000:.3f} ms",
        f"p99 {probe['p99_us'] / 1000:.3f} ms",
        f"{probe['slow_pct']}% > 4x p50",
    )
    Console().print(table)
    result["python"] = python_build()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
