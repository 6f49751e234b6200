"""bench/consume.py: consumer throughput through the public client API.

Fills a topic on a fresh 3-node cluster (RF 3) with 100-byte unique values, then times
a consumer reading everything from the beginning with ``getmany``, touching every value
(a checksum over all of them, checked against what was produced). Median of
``--repeat`` reads. Prints a table, then one JSON line.

    python bench/consume.py [--records 2000000] [--repeat 3] [--partitions 3]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import VALUE_BYTES, expected_checksum, local_cluster, median, python_build
from dlogctl import workloads

import dlog


async def fill(bootstrap: list[str], topic: str, records: int, partitions: int) -> None:
    async with dlog.connect(bootstrap) as client:
        await client.create_topic(topic, partitions=partitions, replication_factor=3)
        await client.wait_for_topic(topic)
        async with client.producer(acks="all", **workloads.THROUGHPUT_PRODUCER) as producer:
            await workloads.produce(producer, topic, count=records)


async def consume(bootstrap: list[str], topic: str, records: int) -> tuple[float, int]:
    async with dlog.connect(bootstrap) as client:
        read = await workloads.read_back(client, topic, records)
    if read.records != records:
        raise AssertionError(f"only {read.records} of {records} records came back")
    return read.seconds, read.checksum


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=2_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--partitions", type=int, default=3)
    args = parser.parse_args()
    rates = []
    with local_cluster(3) as spec:
        bootstrap = [n.rpc for n in spec.nodes]
        trio.run(fill, bootstrap, "bench-consume", args.records, args.partitions)
        want = expected_checksum(args.records)
        for run in range(args.repeat):
            elapsed, checksum = trio.run(consume, bootstrap, "bench-consume", args.records)
            if checksum != want:
                raise AssertionError("checksum of consumed values does not match")
            rates.append(args.records / elapsed)
            print(f"  run {run + 1}: {rates[-1]:,.0f} records/s", file=sys.stderr)
    rate = median(rates)
    result = {
        "records_s": round(rate),
        "mb_s": round(rate * VALUE_BYTES / 1e6, 1),
        "records": args.records,
        "repeat": args.repeat,
        "partitions": args.partitions,
    }
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"dlog consume (median of {args.repeat}, 100-byte values, 3 nodes)")
    table.add_column("workload")
    table.add_column("records/s", justify="right")
    table.add_column("MB/s", justify="right")
    table.add_column("target", justify="right")
    table.add_row(
        "getmany, every value checksummed", f"{rate:,.0f}", str(result["mb_s"]), ">= 500,000/s"
    )
    Console().print(table)
    result["python"] = python_build()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
