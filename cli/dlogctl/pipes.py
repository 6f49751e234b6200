"""The work of ``dlogctl produce`` and ``consume``: stdin lines to records, records to
stdout lines (text, JSON or JSON with base64), with a transient progress bar on stderr
when records go to a file or pipe."""

from __future__ import annotations

import base64
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import trio
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from dlog.client import DeliveryHandle, Producer
from dlog.errors import DlogError
from dlogctl.common import err_console
from dlogctl.connection import open_client, require_topic

_CHECK_EVERY = 20_000


async def produce_lines(
    addresses: list[str],
    topic: str,
    acks: int,
    partition: int | None,
    separator: str | None,
    linger_ms: int,
    timeout_ms: int = 30_000,
) -> tuple[int, int]:
    """Produce one record per stdin line (KEY<separator>VALUE when a separator is given);
    returns (records sent, records that failed)."""
    sep = separator.encode() if separator is not None else None
    stdin = sys.stdin.buffer
    sent = failed = 0
    async with open_client(addresses) as client:
        await require_topic(client, topic)
        async with client.producer(
            acks=acks,
            linger_ms=linger_ms,
            delivery_timeout_ms=timeout_ms,
            request_timeout_ms=min(30_000, timeout_ms),
        ) as producer:
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
                err_console.print(f"[red]record failed:[/] {escape(exc.message)}")
            failed += 1
    return failed


def _text(data: bytes | None) -> str | None:
    return None if data is None else data.decode("utf-8", errors="replace")


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode()


async def print_records(
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
    """Write records to stdout until ``max_records`` or ``timeout_ms`` without one (else
    forever); commits the group's position at the end. Returns how many were written."""
    out = sys.stdout
    encode = _b64 if mode == "binary" else _text
    count = 0
    options: dict[str, Any] = {}
    if group is not None:
        options["auto_commit_interval_ms"] = 5000
    if offset is not None:
        # The consumer fetches as soon as it starts; at "latest" that first fetch would
        # long-poll (max_wait_ms) before the seek below could take effect. From the
        # beginning it returns at once when there is data, so the seek goes next.
        from_beginning = True
        # An offset the log does not have is an error, not a silent restart elsewhere.
        options["auto_offset_reset"] = "error"
    with _progress(max_records) as progress:
        async with open_client(addresses) as client:
            await require_topic(client, topic)
            async with client.consumer(
                topic, group=group, partitions=partition, from_beginning=from_beginning, **options
            ) as consumer:
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
                    progress.advance(len(lines))
                if group is not None:
                    await consumer.commit()
    return count


class _Counter:
    """Records written so far, shown on a transient stderr progress bar (or not)."""

    def __init__(self, progress: Progress | None, task: TaskID | None) -> None:
        self._progress = progress
        self._task = task
        self._last_refresh = 0.0

    def advance(self, records: int) -> None:
        if self._progress is None or self._task is None:
            return
        self._progress.advance(self._task, records)
        now = time.monotonic()
        if now - self._last_refresh >= 0.1:
            self._last_refresh = now
            self._progress.refresh()


@contextmanager
def _progress(total: int | None) -> Iterator[_Counter]:
    """A progress bar on stderr while records go to a file or pipe: only when stderr is
    a terminal and stdout is not (records printed on the terminal are their own
    progress, and a bar drawn between them would garble both)."""
    if not (sys.stderr.isatty() and not sys.stdout.isatty()):
        yield _Counter(None, None)
        return
    # Refreshed by the consume loop, not by rich's refresh thread.
    with Progress(
        TextColumn("consuming"),
        BarColumn(),
        MofNCompleteColumn() if total is not None else TextColumn("{task.completed} records"),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
        auto_refresh=False,
    ) as progress:
        task = progress.add_task("consume", total=total)
        yield _Counter(progress, task)
