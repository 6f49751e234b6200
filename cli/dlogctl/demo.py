"""``dlogctl demo`` (what ``make run`` runs): a local cluster, a topic, a few records."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.panel import Panel

from dlog.client import Client
from dlog.errors import TopicAlreadyExistsError
from dlogctl.cluster import bring_up
from dlogctl.common import DataDirOption, console, open_client, run

TOPIC = "demo"


def demo(
    data_dir: Path = DataDirOption,
    base_port: int = typer.Option(9400, "--base-port", help="As for `cluster up`."),
) -> None:
    """Start a local 3-node cluster, create a demo topic, produce and consume a few records."""
    spec = bring_up(data_dir, nodes=3, base_port=base_port)
    bootstrap = [n.rpc for n in spec.nodes]
    run(_demo, bootstrap)
    where = "\n".join(
        [
            f"bootstrap address   {spec.nodes[0].rpc}",
            f"cluster directory   {spec.data_dir}  (cluster.json, node-N/ data, node-N/node.log)",
            "",
            "try:",
            f"  echo hello | .venv/bin/dlogctl produce {TOPIC}",
            f"  .venv/bin/dlogctl consume {TOPIC} --from-beginning",
            "  .venv/bin/dlogctl top                 # live view (q quits)",
            "  .venv/bin/dlogctl cluster status",
            "  .venv/bin/dlogctl cluster down        # stop the cluster",
        ]
    )
    console.print(Panel(where, title="dlog is running", expand=False))


async def _demo(bootstrap: list[str]) -> None:
    async with open_client(bootstrap) as client:
        try:
            await client.create_topic(TOPIC, partitions=3, replication_factor=3)
            console.print(f"created topic [bold]{TOPIC}[/] (3 partitions, replication factor 3)")
        except TopicAlreadyExistsError:
            console.print(f"topic [bold]{TOPIC}[/] already exists")
        await client.wait_for_topic(TOPIC)
        await _produce_and_consume(client)
        desc = await client.describe_topic(TOPIC)
    for p in desc.partitions:
        console.print(
            f"  partition {p.partition}: leader {p.leader}, replicas {list(p.replicas)}, "
            f"isr {list(p.isr)}, high watermark {p.high_watermark}"
        )


async def _produce_and_consume(client: Client) -> None:
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot"]
    async with client.producer(acks="all") as producer:
        metas = [
            await producer.send(TOPIC, w.encode(), key=f"key-{i}".encode())
            for i, w in enumerate(words)
        ]
    for word, meta in zip(words, metas, strict=True):
        console.print(f"  produced {word!r} -> partition {meta.partition}, offset {meta.offset}")
    starts: dict[int, int] = {}
    for m in metas:
        starts[m.partition] = min(m.offset, starts.get(m.partition, m.offset))
    async with client.consumer(TOPIC, partitions=sorted(starts), from_beginning=True) as consumer:
        for p, start in starts.items():
            consumer.seek(p, start)
        got = 0
        while got < len(words):
            batch = await consumer.getmany(max_records=100, timeout_ms=5000)
            if not batch:
                break
            for partition, records in batch.items():
                for r in records:
                    value = (r[3] or b"").decode()
                    console.print(f"  consumed {value!r} <- partition {partition}, offset {r[0]}")
                    got += 1
