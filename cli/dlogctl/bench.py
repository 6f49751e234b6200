"""``dlogctl bench produce|consume|e2e``: the bench/ workloads against any cluster.

Each run shows a progress bar on stderr while it works (on a terminal), then a result
table on stdout, or with ``--json`` one JSON object and nothing else on stdout. It exits
1 when what came back does not match what was sent (count or checksum).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from dlogctl.common import (
    BootstrapOption,
    DataDirOption,
    console,
    err_console,
    fail,
    print_json,
    resolve_bootstrap,
    run,
)

app = typer.Typer(
    help="Benchmark a cluster: produce throughput, consume throughput, end-to-end latency.",
    no_args_is_help=True,
)

RecordsOption = typer.Option(200_000, "--records", "-n", min=1, help="Records to send.")
ValueBytesOption = typer.Option(
    100, "--value-bytes", "-s", min=28, help="Bytes per value (unique: tag + sequence number)."
)
PartitionsOption = typer.Option(
    3, "--partitions", "-p", min=1, help="Partitions of the throwaway topic."
)
ReplicationOption = typer.Option(
    None,
    "--replication-factor",
    "-r",
    min=1,
    help="Replication factor of the throwaway topic (default min(3, brokers)).",
)
TopicOption = typer.Option(
    None,
    "--topic",
    "-t",
    help="Use this existing topic instead of a throwaway one (only this run's records "
    "are checked).",
)
AcksOption = typer.Option("all", "--acks", help="none | leader | all (or 0, 1, -1).")
JsonOption = typer.Option(False, "--json", help="Print one JSON object, no table.")


@app.command("produce")
def bench_produce(
    records: int = RecordsOption,
    value_bytes: int = ValueBytesOption,
    acks: str = AcksOption,
    partitions: int = PartitionsOption,
    replication_factor: int | None = ReplicationOption,
    topic: str | None = TopicOption,
    as_json: bool = JsonOption,
    bootstrap: str | None = BootstrapOption,
    data_dir: Path = DataDirOption,
) -> None:
    """Produce N unique values with send_many, then read them back and verify them."""
    from dlogctl import bench_runs

    settings = bench_runs.BenchSettings(
        addresses=resolve_bootstrap(bootstrap, data_dir),
        records=records,
        value_bytes=value_bytes,
        partitions=partitions,
        replication_factor=replication_factor,
        topic=topic,
        acks=_checked_acks(acks),
    )
    with _progress() as progress:
        result = run(bench_runs.produce, settings, progress)
    _report(result, as_json, _produce_rows(result))


@app.command("consume")
def bench_consume(
    records: int = RecordsOption,
    value_bytes: int = ValueBytesOption,
    partitions: int = PartitionsOption,
    replication_factor: int | None = ReplicationOption,
    topic: str | None = TopicOption,
    as_json: bool = JsonOption,
    bootstrap: str | None = BootstrapOption,
    data_dir: Path = DataDirOption,
) -> None:
    """Fill a topic with N unique values, then time reading them back with getmany,
    touching every value."""
    from dlogctl import bench_runs

    settings = bench_runs.BenchSettings(
        addresses=resolve_bootstrap(bootstrap, data_dir),
        records=records,
        value_bytes=value_bytes,
        partitions=partitions,
        replication_factor=replication_factor,
        topic=topic,
    )
    with _progress() as progress:
        result = run(bench_runs.consume, settings, progress)
    _report(result, as_json, _consume_rows(result))


@app.command("e2e")
def bench_e2e(
    rate: float = typer.Option(1000.0, "--rate", min=1, help="Records per second."),
    seconds: float = typer.Option(5.0, "--seconds", min=0.1, help="How long to send."),
    value_bytes: int = ValueBytesOption,
    acks: str = AcksOption,
    partitions: int = typer.Option(
        1, "--partitions", "-p", min=1, help="Partitions of the throwaway topic."
    ),
    replication_factor: int | None = ReplicationOption,
    topic: str | None = TopicOption,
    as_json: bool = JsonOption,
    bootstrap: str | None = BootstrapOption,
    data_dir: Path = DataDirOption,
) -> None:
    """Send records one at a time at --rate while a consumer reads them: latency from
    send to acknowledgement and from send to the consumer, p50/p99."""
    from dlogctl import bench_runs

    settings = bench_runs.BenchSettings(
        addresses=resolve_bootstrap(bootstrap, data_dir),
        records=max(1, round(rate * seconds)),
        value_bytes=value_bytes,
        partitions=partitions,
        replication_factor=replication_factor,
        topic=topic,
        acks=_checked_acks(acks),
        rate=rate,
    )
    with _progress() as progress:
        result = run(bench_runs.end_to_end, settings, progress)
    _report(result, as_json, _e2e_rows(result))


def _checked_acks(acks: str) -> str:
    from dlog.net.protocol import acks_from_text

    try:
        acks_from_text(acks)
    except ValueError as exc:
        fail(str(exc))
    return acks


@contextmanager
def _progress() -> Iterator[Progress | None]:
    """A transient bar on stderr while the run works; none when stderr is not a terminal
    (so logs and CI output hold only the result)."""
    if not sys.stderr.isatty():
        yield None
        return
    with Progress(
        TextColumn("{task.description:<22}"),
        BarColumn(),
        TaskProgressColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
        auto_refresh=False,
    ) as progress:
        yield progress


def _report(result: dict[str, Any], as_json: bool, rows: list[tuple[str, str]]) -> None:
    if as_json:
        print_json(result)
    else:
        table = Table(title=f"dlog bench {result['workload']}", show_header=False)
        table.add_column(style="bold")
        table.add_column()
        table.add_row("cluster", result["bootstrap"])
        table.add_row(
            "topic",
            f"{result['topic']}: {result['partitions']} partition(s), "
            f"RF {result['replication_factor']}"
            + (" (throwaway, deleted)" if result["throwaway_topic"] else ""),
        )
        for name, value in rows:
            table.add_row(name, value)
        console.print(table)
    if not result["verified"]:
        fail(_shortfall(result))


def _shortfall(result: dict[str, Any]) -> str:
    if result["workload"] == "e2e":
        return f"only {result['received']:,} of {result['records']:,} records reached the consumer"
    if result["verified_records"] != result["records"]:
        return (
            f"verification failed: {result['verified_records']:,} of {result['records']:,} "
            "records came back"
        )
    return "verification failed: the checksum of what came back does not match what was sent"


def _num(value: float | None, unit: str = "", digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}{unit}"


def _produce_rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        ("records", f"{r['records']:,} x {r['value_bytes']} B, acks={r['acks']}"),
        ("time", _num(r["seconds"], " s", 2)),
        ("records/s", _num(r["records_s"])),
        ("MB/s", _num(r["mb_s"], "", 1)),
        (
            f"latency per {r['latency_chunk_records']:,} records",
            f"p50 {_num(r['latency_p50_ms'], ' ms', 1)}   p99 {_num(r['latency_p99_ms'], ' ms', 1)}"
            f"   max {_num(r['latency_max_ms'], ' ms', 1)}",
        ),
        ("verified", _verified(r)),
    ]


def _consume_rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        ("records", f"{r['records']:,} x {r['value_bytes']} B"),
        ("time", _num(r["seconds"], " s", 2)),
        ("records/s", _num(r["records_s"])),
        ("MB/s", _num(r["mb_s"], "", 1)),
        ("fill (acks=all) records/s", _num(r["fill_records_s"])),
        ("verified", _verified(r)),
    ]


def _e2e_rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    def spread(prefix: str) -> str:
        return (
            f"p50 {_num(r[prefix + '_p50_ms'], ' ms', 2)}   "
            f"p99 {_num(r[prefix + '_p99_ms'], ' ms', 2)}   "
            f"max {_num(r[prefix + '_max_ms'], ' ms', 2)}"
        )

    return [
        ("records", f"{r['records']:,} x {r['value_bytes']} B, acks={r['acks']}"),
        ("rate", f"{r['achieved_rate']:,.0f}/s (asked {r['rate']:,.0f}/s)"),
        ("produce -> consume", spread("latency")),
        ("produce -> ack", spread("ack")),
        ("received", f"{r['received']:,} of {r['records']:,}"),
    ]


def _verified(r: dict[str, Any]) -> str:
    if r["verified"]:
        return f"{r['verified_records']:,} records, checksum ok"
    return f"[red]{_shortfall(r)}[/]"
