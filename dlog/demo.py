"""``python -m dlog.demo``: the storage engine in a few lines (what ``make run`` runs).

Creates a partition log under ``.dlog/demo``, appends a few record batches (small
segments, so it rolls), reads them back, shuts down, and shows the records and the
files left on disk.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import trio
from rich.console import Console
from rich.table import Table

from dlog.clock import SystemClock
from dlog.storage import BatchBuilder, Compression, LogConfig, LogManager, decode_records

DEMO_DIR = Path(".dlog") / "demo"


async def demo(console: Console) -> None:
    shutil.rmtree(DEMO_DIR, ignore_errors=True)
    clock = SystemClock()
    manager = LogManager(DEMO_DIR, clock, LogConfig(segment_bytes=400))
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        log = await manager.get_or_create("orders", 0, uuid.uuid4().hex)
        for n, compression in enumerate([Compression.NONE, Compression.GZIP, Compression.NONE]):
            builder = BatchBuilder(clock.now_ms(), compression=compression)
            for i in range(4):
                builder.append(
                    f"order {n * 4 + i}: {'widget' if i % 2 else 'gadget'} x{i + 1}".encode(),
                    key=f"customer-{i % 3}".encode(),
                    headers=[("source", b"demo")] if i == 0 else None,
                )
            info = log.append(builder.build(), leader_epoch=0)
            console.print(
                f"appended batch {n} ({compression.name.lower()}): offsets"
                f" {info.first_offset}..{info.last_offset}, {info.size} bytes"
            )
        await log.flush()
        log.update_high_watermark(log.log_end_offset)
        fetched = log.read(0, max_bytes=1 << 20, upper_bound=log.high_watermark)

        records = Table(
            title=f"read offsets 0..{fetched.next_offset - 1} ({fetched.size} bytes,"
            f" {len(fetched.chunks)} segment chunk(s))"
        )
        for column in ("offset", "timestamp", "key", "value", "headers"):
            records.add_column(column)
        for record in decode_records(fetched.records):
            records.add_row(
                str(record.offset),
                str(record.timestamp),
                (record.key or b"").decode(),
                (record.value or b"").decode(),
                ", ".join(f"{k}={(v or b'').decode()}" for k, v in record.headers),
            )
        console.print(records)
        console.print(
            f"log_start_offset={log.log_start_offset} log_end_offset={log.log_end_offset}"
            f" high_watermark={log.high_watermark} segments={len(log.segments)}"
        )
        directory = log.directory
        nursery.cancel_scope.cancel()
    # After shutdown: indexes trimmed to their entries, checkpoints written.
    files = Table(title=f"files in {directory}")
    files.add_column("file")
    files.add_column("bytes", justify="right")
    for path in sorted(directory.iterdir()):
        files.add_row(path.name, str(path.stat().st_size))
    console.print(files)


def main() -> None:
    trio.run(demo, Console())


if __name__ == "__main__":
    main()
