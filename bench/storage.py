"""Storage benchmark: PartitionLog append/read against plain file I/O of the same bytes.

Appends batches of 1000 records x 100-byte values (each batch built by the client
codec with unique values; building is timed separately and not counted as append
time) for a few seconds, writing the very same bytes to a plain file next to each
append as the baseline (the two take turns going first). Then reads everything back through the log (1 MiB
fetches) and through plain ``os.pread`` of the baseline file, checking that both
return the same bytes and every record arrived. Last, fsync-on-every-append
(flush_messages=1) batches per second.

Prints a table, then one JSON line (the last line) with the results.

    python bench/storage.py [--seconds 3] [--fsync-seconds 1] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import crc32c
import trio
from _harness import python_build
from rich.console import Console
from rich.table import Table

from dlog.clock import SystemClock
from dlog.storage import BatchBuilder, LogConfig, PartitionLog, iter_batch_headers
from dlog.storage.batch import set_base_offset_and_epoch

READ_SIZE = 1 << 20
MB = 1e6


class UniqueValues:
    """100-byte values, each unique: an 8-byte counter then bytes from a random pool."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._pool = os.urandom(1 << 16)
        self.count = 0

    def batch(self, n: int) -> list[bytes]:
        pad = self._size - 8
        pool = self._pool
        start = self.count
        values = [
            (start + i).to_bytes(8, "big") + pool[(start + i) % 4096 : (start + i) % 4096 + pad]
            for i in range(n)
        ]
        self.count += n
        return values


def write_all(fd: int, buf: bytearray) -> None:
    view = memoryview(buf)
    while view:
        view = view[os.write(fd, view) :]


def append_phase(
    log: PartitionLog,
    raw_path: Path,
    seconds: float,
    records: int,
    value_bytes: int,
    clock: SystemClock,
) -> dict[str, float]:
    values = UniqueValues(value_bytes)
    raw_fd = os.open(raw_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_TRUNC, 0o644)
    append_time = raw_time = build_time = append_cpu = raw_cpu = 0.0
    total_bytes = batches = 0
    checksum = 0
    perf = time.perf_counter
    cpu = time.thread_time  # CPU time: tells the code's cost from a busy machine's noise
    deadline = perf() + seconds
    try:
        while perf() < deadline:
            t0 = perf()
            builder = BatchBuilder(clock.now_ms())
            builder.append_values(values.batch(records))
            buf = builder.build()
            t1 = perf()
            build_time += t1 - t0
            # Whichever goes first reads the freshly built buffer from further away in
            # the cache hierarchy, so the two take turns going first. The plain write
            # gets the offsets the log is about to assign, so both files end up equal.
            if batches % 2:
                c1 = cpu()
                t1 = perf()
                log.append(buf, leader_epoch=0)
                t2, c2 = perf(), cpu()
                write_all(raw_fd, buf)
                t3, c3 = perf(), cpu()
                append_time += t2 - t1
                raw_time += t3 - t2
                append_cpu += c2 - c1
                raw_cpu += c3 - c2
            else:
                set_base_offset_and_epoch(buf, 0, log.log_end_offset, 0)
                c1 = cpu()
                t1 = perf()
                write_all(raw_fd, buf)
                t2, c2 = perf(), cpu()
                log.append(buf, leader_epoch=0)
                t3, c3 = perf(), cpu()
                raw_time += t2 - t1
                append_time += t3 - t2
                raw_cpu += c2 - c1
                append_cpu += c3 - c2
            total_bytes += len(buf)
            batches += 1
            checksum = crc32c.crc32c(buf, checksum)
    finally:
        os.close(raw_fd)
    return {
        "batches": batches,
        "records": batches * records,
        "bytes": total_bytes,
        "checksum": checksum,
        "append_s": append_time,
        "raw_write_s": raw_time,
        "append_cpu_s": append_cpu,
        "raw_write_cpu_s": raw_cpu,
        "build_s": build_time,
    }


def read_phase(log: PartitionLog, raw_path: Path) -> dict[str, float]:
    perf = time.perf_counter
    # Through the log, 1 MiB fetches chained by next_offset.
    log_time = 0.0
    log_bytes = 0
    log_checksum = 0
    records = 0
    offset = log.log_start_offset
    end = log.log_end_offset
    log_cpu = raw_cpu = 0.0
    cpu = time.thread_time
    while offset < end:
        c0 = cpu()
        t0 = perf()
        data = log.read(offset, READ_SIZE)
        log_time += perf() - t0
        log_cpu += cpu() - c0
        for chunk in data.chunks:
            log_bytes += len(chunk)
            log_checksum = crc32c.crc32c(chunk, log_checksum)
            records += sum(h.record_count for h in iter_batch_headers(chunk))
        offset = data.next_offset
    # Plain preads of the baseline file, same size.
    raw_time = 0.0
    raw_bytes = 0
    raw_checksum = 0
    fd = os.open(raw_path, os.O_RDONLY)
    try:
        position = 0
        while True:
            c0 = cpu()
            t0 = perf()
            chunk = os.pread(fd, READ_SIZE, position)
            raw_time += perf() - t0
            raw_cpu += cpu() - c0
            if not chunk:
                break
            position += len(chunk)
            raw_bytes += len(chunk)
            raw_checksum = crc32c.crc32c(chunk, raw_checksum)
    finally:
        os.close(fd)
    return {
        "read_s": log_time,
        "read_cpu_s": log_cpu,
        "raw_read_cpu_s": raw_cpu,
        "read_bytes": log_bytes,
        "read_checksum": log_checksum,
        "read_records": records,
        "raw_read_s": raw_time,
        "raw_read_bytes": raw_bytes,
        "raw_read_checksum": raw_checksum,
    }


async def fsync_phase(
    directory: Path, seconds: float, records: int, value_bytes: int, clock: SystemClock
) -> dict[str, float]:
    log = PartitionLog.open(directory, LogConfig(flush_messages=1), clock)
    values = UniqueValues(value_bytes)
    perf = time.perf_counter
    elapsed = 0.0
    batches = 0
    try:
        deadline = perf() + seconds
        while perf() < deadline:
            builder = BatchBuilder(clock.now_ms())
            builder.append_values(values.batch(records))
            buf = builder.build()
            t0 = perf()
            log.append(buf, leader_epoch=0)
            if not await log.maybe_flush():
                raise AssertionError("flush_messages=1 did not fsync")
            elapsed += perf() - t0
            batches += 1
        assert log.recovery_point == log.log_end_offset
    finally:
        log.close()
    return {"fsync_batches": batches, "fsync_s": elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="append phase length")
    parser.add_argument("--fsync-seconds", type=float, default=1.0)
    parser.add_argument("--records", type=int, default=1000, help="records per batch")
    parser.add_argument("--value-bytes", type=int, default=100)
    parser.add_argument("--dir", type=Path, default=None, help="where to put the files")
    args = parser.parse_args()

    clock = SystemClock()
    base = Path(tempfile.mkdtemp(prefix="dlog-bench-storage-", dir=args.dir))
    try:
        log = PartitionLog.open(base / "bench-0", LogConfig(), clock)
        try:
            appended = append_phase(
                log, base / "raw.bin", args.seconds, args.records, args.value_bytes, clock
            )
            read = read_phase(log, base / "raw.bin")
        finally:
            log.close()
        fsynced = trio.run(
            fsync_phase, base / "fsync-0", args.fsync_seconds, args.records, args.value_bytes, clock
        )
    finally:
        shutil.rmtree(base, ignore_errors=True)

    # What arrived must be exactly what was appended.
    ok = (
        read["read_bytes"] == read["raw_read_bytes"] == appended["bytes"]
        and read["read_checksum"] == read["raw_read_checksum"] == appended["checksum"]
        and read["read_records"] == appended["records"]
    )
    mb = appended["bytes"] / MB
    results = {
        "append_mb_s": round(mb / appended["append_s"], 1),
        "append_batches_s": round(appended["batches"] / appended["append_s"]),
        "append_records_s": round(appended["records"] / appended["append_s"]),
        "raw_write_mb_s": round(mb / appended["raw_write_s"], 1),
        "append_ratio": round(appended["raw_write_s"] / appended["append_s"], 3),
        "read_mb_s": round(mb / read["read_s"], 1),
        "read_batches_s": round(appended["batches"] / read["read_s"]),
        "read_records_s": round(read["read_records"] / read["read_s"]),
        "raw_read_mb_s": round(mb / read["raw_read_s"], 1),
        "read_ratio": round(read["raw_read_s"] / read["read_s"], 3),
        "fsync_batches_s": round(fsynced["fsync_batches"] / fsynced["fsync_s"]),
        "append_cpu_ratio": round(appended["raw_write_cpu_s"] / appended["append_cpu_s"], 3),
        "read_cpu_ratio": round(read["raw_read_cpu_s"] / read["read_cpu_s"], 3),
        "build_records_s": round(appended["records"] / appended["build_s"]),
        "batches": appended["batches"],
        "records": appended["records"],
        "bytes": appended["bytes"],
        "verified": ok,
    }

    table = Table(title=f"dlog storage: {args.records} records x {args.value_bytes} B per batch")
    for column in ("", "MB/s", "batches/s", "records/s", "vs plain file"):
        table.add_column(column, justify="right")
    table.add_row(
        "append",
        f"{results['append_mb_s']:,}",
        f"{results['append_batches_s']:,}",
        f"{results['append_records_s']:,}",
        f"{results['append_ratio']:.2f}x",
    )
    table.add_row("plain write", f"{results['raw_write_mb_s']:,}", "", "", "")
    table.add_row(
        "read",
        f"{results['read_mb_s']:,}",
        f"{results['read_batches_s']:,}",
        f"{results['read_records_s']:,}",
        f"{results['read_ratio']:.2f}x",
    )
    table.add_row("plain read", f"{results['raw_read_mb_s']:,}", "", "", "")
    table.add_row("append + fsync", "", f"{results['fsync_batches_s']:,}", "", "")
    table.add_row("client build", "", "", f"{results['build_records_s']:,}", "")
    console = Console()
    console.print(table)
    console.print(
        f"{appended['batches']:,} batches, {appended['records']:,} records,"
        f" {mb:,.0f} MB; read back and verified: {'yes' if ok else 'NO'}"
    )
    results["python"] = python_build()
    print(json.dumps(results), flush=True)
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
