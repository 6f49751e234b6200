"""``dlogctl produce`` and ``dlogctl consume``: records between stdin/stdout and a topic."""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path
from typing import Any

import trio
import typer

from dlog.client import DeliveryHandle, Producer
from dlog.errors import DlogError
from dlog.net.protocol import acks_from_text
from dlogctl.common import (
    BootstrapOption,
    DataDirOption,
    err_console,
    fail,
    open_client,
    resolve_bootstrap,
    run,
)

_CHECK_EVERY = 20_000


def produce(
    topic: str = typer.Argument(..., help="Topic to write to."),
    acks: str = typer.Option("all", "--acks", help="none | leader | all (or 0, 1, -1)."),
    partition: int | None = typer.Option(
        None, "--partition", "-p", help="Write every record to this partition."
    ),
    key_separator: str | None = typer.Option(
        None, "--key-separator", help="Split each line into KEY<SEP>VALUE at the first SEP."
    ),
    linger_ms: int = typer.Option(5, "--linger-ms", help="Batch records for up to this long."),
    bootstrap: str | None = BootstrapOption,
    data_dir: Path = DataDirOption,
) -> None:
    """Write one record per line of stdin; exit non-zero if any record failed."""
    try:
        acks_value = acks_from_text(acks)
    except ValueError as exc:
        fail(str(exc))
    if key_separator == "":
        fail("--key-separator must not be empty")
    addresses = resolve_bootstrap(bootstrap, data_dir)
    sent, failed = run(_produce, addresses, topic, acks_value, partition, key_separator, linger_ms)
    err_console.print(
        f"produced {sent - failed} record(s) to {topic}"
        + (f", [red]{failed} failed[/]" if failed else "")
    )
    if failed:
        raise typer.Exit(1)


async def _produce(
    addresses: list[str],
    topic: str,
    acks: int,
    partition: int | None,
    separator: str | None,
    linger_ms: int,
) -> tuple[int, int]:
    sep = separator.encode() if separator is not None else None
    stdin = sys.stdin.buffer
    sent = failed = 0
    async with open_client(addresses) as client:
        await client.wait_for_topic(topic, timeout=10)
        async with client.producer(acks=acks, linger_ms=linger_ms) as producer:
            handles: list[DeliveryHandle] = []
            while True:
                lines = await trio.to_thread.run_sync(stdin.readlines, 1 << 20)
                if not lines:
                    break
                for line in lines:
                    value = line.rstrip(b"\r\n") if line.endswith(b"\n") else line
                    key = None
                    if sep is not None:
                        k, found, v = value.partition(sep)
                        if found:
                            key, value = k, v
                    handles.append(
                        await producer.enqueue(topic, value, key=key, partition=partition)
                    )
                    sent += 1
                if len(handles) >= _CHECK_EVERY:
                    failed += await _settle(producer, handles)
                    handles = []
            failed += await _settle(producer, handles)
    return sent, failed


async def _settle(producer: Producer, handles: list[DeliveryHandle]) -> int:
    await producer.flush()
    failed = 0
    for handle in handles:
        try:
            handle.result()
        except DlogError as exc:
            if failed < 5:
                err_console.print(f"[red]record failed:[/] {exc.message}")
            failed += 1
    return failed


def consume(
    topic: str = typer.Argument(..., help="Topic to read."),
    from_beginning: bool = typer.Option(
        False, "--from-beginning", help="Start at the earliest offset (if the group has none)."
    ),
    group: str | None = typer.Option(
        None, "--group", "-g", help="Resume from and commit to this group's offsets."
    ),
    partition: int | None = typer.Option(None, "--partition", "-p", help="Only this partition."),
    offset: int | None = typer.Option(
        None, "--offset", "-o", help="Start at this offset (needs --partition)."
    ),
    max_records: int | None = typer.Option(
        None, "--max-records", "-n", min=1, help="Stop after this many records."
    ),
    timeout_ms: int | None = typer.Option(
        None, "--timeout-ms", min=0, help="Stop when no record arrives for this long."
    ),
    as_json: bool = typer.Option(
        False, "--json", help='One JSON object per line: {"partition", "offset", ...}.'
    ),
    json_binary: bool = typer.Option(
        False, "--json-binary", help="Like --json with key and value in base64."
    ),
    bootstrap: str | None = BootstrapOption,
    data_dir: Path = DataDirOption,
) -> None:
    """Print records to stdout (the value per line, or JSON with --json)."""
    if offset is not None and partition is None:
        fail("--offset needs --partition")
    if offset is not None and offset < 0:
        fail("--offset must be >= 0")
    addresses = resolve_bootstrap(bootstrap, data_dir)
    mode = "binary" if json_binary else ("json" if as_json else "text")
    try:
        count = run(
            _consume,
            addresses,
            topic,
            from_beginning,
            group,
            partition,
            offset,
            max_records,
            timeout_ms,
            mode,
        )
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): not an error.
        sys.stderr.close()
        raise typer.Exit(0) from None
    err_console.print(f"consumed {count} record(s) from {topic}")


def _text(data: bytes | None) -> str | None:
    return None if data is None else data.decode("utf-8", errors="replace")


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode()


async def _consume(
    addresses: list[str],
    topic: str,
    from_beginning: bool,
    group: str | None,
    partition: int | None,
    offset: int | None,
    max_records: int | None,
    timeout_ms: int | None,
    mode: str,
) -> int:
    out = sys.stdout
    encode = _b64 if mode == "binary" else _text
    count = 0
    options: dict[str, Any] = {}
    if group is not None:
        options["auto_commit_interval_ms"] = 5000
    async with (
        open_client(addresses) as client,
        client.consumer(
            topic, group=group, partitions=partition, from_beginning=from_beginning, **options
        ) as consumer,
    ):
        if offset is not None and partition is not None:
            consumer.seek(partition, offset)
        while max_records is None or count < max_records:
            want = 10_000 if max_records is None else min(10_000, max_records - count)
            batch = await consumer.getmany(max_records=want, timeout_ms=timeout_ms)
            if not batch:
                if timeout_ms is not None:
                    break
                continue
            lines = []
            for part, records in batch.items():
                for rec in records:
                    if mode == "text":
                        lines.append(_text(rec[3]) or "")
                    else:
                        lines.append(
                            json.dumps(
                                {
                                    "partition": part,
                                    "offset": rec[0],
                                    "timestamp": rec[1],
                                    "key": encode(rec[2]),
                                    "value": encode(rec[3]),
                                }
                            )
                        )
            count += len(lines)
            out.write("\n".join(lines) + "\n")
            out.flush()
        if group is not None:
            await consumer.commit()
    return count
