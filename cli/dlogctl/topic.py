"""``dlogctl topic``: create, alter, list, describe, delete."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from dlogctl.common import (
    BootstrapOption,
    DataDirOption,
    console,
    fail,
    open_client,
    print_json,
    resolve_bootstrap,
    run,
)

app = typer.Typer(help="Manage topics.", no_args_is_help=True)

ConfigOption = typer.Option(
    [], "--config", "-c", help="Topic config KEY=VALUE (repeat), e.g. retention_ms=60000."
)


def parse_configs(pairs: list[str]) -> dict[str, str]:
    configs: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            fail(f"bad --config {pair!r}: expected KEY=VALUE")
        configs[key.strip()] = value.strip()
    return configs


@app.command("create")
def topic_create(
    name: str = typer.Argument(..., help="Topic name: 1-249 of [a-zA-Z0-9._-]."),
    partitions: int = typer.Option(1, "--partitions", "-p", help="Number of partitions."),
    replication_factor: int | None = typer.Option(
        None,
        "--replication-factor",
        "-r",
        help="Copies of each partition (default min(3, brokers)).",
    ),
    config: list[str] = ConfigOption,
    bootstrap: str | None = BootstrapOption,
    data_dir: Path = DataDirOption,
) -> None:
    """Create a topic."""
    configs = parse_configs(config)
    addresses = resolve_bootstrap(bootstrap, data_dir)

    async def create() -> None:
        async with open_client(addresses) as client:
            await client.create_topic(name, partitions, replication_factor, config=configs)
            await client.wait_for_topic(name, timeout=30)

    run(create)
    console.print(f"created topic [bold]{name}[/] with {partitions} partition(s)")


@app.command("alter")
def topic_alter(
    name: str = typer.Argument(...),
    partitions: int | None = typer.Option(
        None, "--partitions", "-p", help="New total partition count (can only grow)."
    ),
    config: list[str] = ConfigOption,
    bootstrap: str | None = BootstrapOption,
    data_dir: Path = DataDirOption,
) -> None:
    """Add partitions or change topic configs (KEY= with no value resets a key)."""
    configs: dict[str, str | None] = {
        k: (v if v != "" else None) for k, v in parse_configs(config).items()
    }
    if partitions is None and not configs:
        fail("nothing to change: give --partitions and/or --config")
    addresses = resolve_bootstrap(bootstrap, data_dir)

    async def alter() -> None:
        async with open_client(addresses) as client:
            await client.alter_topic(name, partitions=partitions, config=configs)

    run(alter)
    console.print(f"altered topic [bold]{name}[/]")


@app.command("list")
def topic_list(
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    internal: bool = typer.Option(False, "--internal", help="Include internal topics."),
    bootstrap: str | None = BootstrapOption,
    data_dir: Path = DataDirOption,
) -> None:
    """List topics."""
    addresses = resolve_bootstrap(bootstrap, data_dir)

    async def listing() -> list:  # type: ignore[type-arg]
        async with open_client(addresses) as client:
            return await client.list_topics(include_internal=internal)

    topics = run(listing)
    if as_json:
        print_json([t.to_dict() for t in topics])
        return
    if not topics:
        console.print("no topics")
        return
    table = Table()
    table.add_column("topic")
    table.add_column("partitions", justify="right")
    table.add_column("replication", justify="right")
    table.add_column("configs")
    for t in topics:
        configs = ", ".join(f"{k}={v}" for k, v in sorted(t.configs.items()))
        table.add_row(t.name, str(t.partitions), str(t.replication_factor), configs)
    console.print(table)


@app.command("describe")
def topic_describe(
    name: str = typer.Argument(...),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    bootstrap: str | None = BootstrapOption,
    data_dir: Path = DataDirOption,
) -> None:
    """Show a topic's partitions: leader, epoch, replicas, ISR, high watermark, LEO."""
    addresses = resolve_bootstrap(bootstrap, data_dir)

    async def describe():  # type: ignore[no-untyped-def]
        async with open_client(addresses) as client:
            return await client.describe_topic(name)

    topic = run(describe)
    if as_json:
        print_json(topic.to_dict())
        return
    configs = ", ".join(f"{k}={v}" for k, v in sorted(topic.configs.items())) or "defaults"
    table = Table(title=f"{topic.name}  (id {topic.topic_id}; {configs})")
    for column in ("partition", "leader", "epoch", "replicas", "isr", "HW", "LEO"):
        table.add_column(column, justify="right" if column in ("HW", "LEO") else "left")
    for p in topic.partitions:
        under = len(p.isr) < len(p.replicas)
        leader = "[bold red]offline[/]" if p.leader is None else str(p.leader)
        isr = ",".join(map(str, p.isr))
        table.add_row(
            str(p.partition),
            leader,
            str(p.leader_epoch),
            ",".join(map(str, p.replicas)),
            f"[yellow]{isr}[/]" if under else isr,
            "-" if p.high_watermark is None else str(p.high_watermark),
            "-" if p.log_end_offset is None else str(p.log_end_offset),
        )
    console.print(table)


@app.command("delete")
def topic_delete(
    name: str = typer.Argument(...),
    bootstrap: str | None = BootstrapOption,
    data_dir: Path = DataDirOption,
) -> None:
    """Delete a topic and all its data."""
    addresses = resolve_bootstrap(bootstrap, data_dir)

    async def delete() -> None:
        async with open_client(addresses) as client:
            await client.delete_topic(name)

    run(delete)
    console.print(f"deleted topic [bold]{name}[/]")
