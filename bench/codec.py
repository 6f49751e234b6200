"""Record-batch codec speed: the per-record work clients do.

Builds batches of 1000 records x 100-byte distinct values (per-record ``append``,
the bulk ``append_values``, the same with 90-110-byte values, keyed records, records
with a header and timestamp, gzip), decodes them back (checking every value arrives), and times the
broker-side validation (header checks and CRC, no record decoding). Each figure is
the best of five rounds, since a busy machine only makes things slower.
Prints a table, then one JSON line (the last line).

    python bench/codec.py [--seconds 0.5]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable

from rich.console import Console
from rich.table import Table

from dlog.storage import BatchBuilder, Compression, decode_records, validate_batches

RECORDS = 1000
NOW = 1_700_000_000_000


def rate(fn: Callable[[], object], seconds: float) -> float:
    """Calls per second of ``fn``: the best of five rounds (a busy machine only slows)."""
    best = float("inf")
    for _ in range(5):
        calls = 0
        start = time.perf_counter()
        deadline = start + seconds / 5
        while True:
            fn()
            calls += 1
            now = time.perf_counter()
            if now >= deadline:
                break
        best = min(best, (now - start) / calls)
    return 1 / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=0.5, help="time per measurement")
    args = parser.parse_args()
    pool = os.urandom(1 << 16)
    # Distinct values made up front (16 batches' worth, cycled) so that only the
    # codec is timed.
    value_sets = [
        [(n * RECORDS + i).to_bytes(8, "big") + pool[i : i + 92] for i in range(RECORDS)]
        for n in range(16)
    ]
    # The same values cut to 90-110 bytes: a batch whose records differ in length
    # takes the record-by-record paths (one length takes the uniform-batch ones).
    mixed_sets = [[v[: 90 + i % 21] for i, v in enumerate(vs)] for vs in value_sets]
    counter = iter(range(1 << 62))

    def values() -> list[bytes]:
        return value_sets[next(counter) % 16]

    def mixed_values() -> list[bytes]:
        return mixed_sets[next(counter) % 16]

    def per_record() -> bytearray:
        builder = BatchBuilder(NOW)
        append = builder.append
        for value in values():
            append(value)
        return builder.build()

    def bulk(compression: Compression = Compression.NONE) -> bytearray:
        builder = BatchBuilder(NOW, compression=compression)
        builder.append_values(values())
        return builder.build()

    def bulk_mixed() -> bytearray:
        builder = BatchBuilder(NOW)
        builder.append_values(mixed_values())
        return builder.build()

    def keyed() -> bytearray:
        builder = BatchBuilder(NOW)
        append = builder.append
        for value in values():
            append(value, value[:8])
        return builder.build()

    def full() -> bytearray:
        builder = BatchBuilder(NOW)
        append = builder.append
        headers = [("trace", b"abc")]
        for value in values():
            append(value, value[:8], headers, NOW + 1)
        return builder.build()

    builds = {
        "build append()": per_record,
        "build append_values()": bulk,
        "build append_values() 90-110 B": bulk_mixed,
        "build keyed": keyed,
        "build key+header+timestamp": full,
        "build append_values() gzip": lambda: bulk(Compression.GZIP),
    }
    results: dict[str, float] = {}
    for name, build in builds.items():
        results[name] = RECORDS * rate(build, args.seconds)
    samples = {
        "decode": bulk(),
        "decode 90-110 B": bulk_mixed(),
        "decode keyed+header": full(),
        "decode gzip": bulk(Compression.GZIP),
    }
    for name, batch in samples.items():
        decoded = decode_records(batch)
        assert len({r.value for r in decoded}) == len(decoded) == RECORDS
        results[name] = RECORDS * rate(lambda b=batch: decode_records(b), args.seconds)  # type: ignore[misc]
    batch = bulk()
    validations = rate(
        lambda: validate_batches(
            batch, now_ms=NOW, max_timestamp_skew_ms=0, max_batch_bytes=1 << 20
        ),
        args.seconds,
    )
    results["broker validate (batches/s)"] = validations

    table = Table(title=f"dlog record codec: {RECORDS} records x 100 B per batch")
    table.add_column("operation")
    table.add_column("records/s", justify="right")
    for name, value in results.items():
        if name.startswith("broker"):
            table.add_row(name, f"{value * RECORDS:,.0f} ({value:,.0f} batches/s)")
        else:
            table.add_row(name, f"{value:,.0f}")
    Console().print(table)
    summary = {
        "build_records_s": round(results["build append()"]),
        "build_bulk_records_s": round(results["build append_values()"]),
        "build_bulk_mixed_records_s": round(results["build append_values() 90-110 B"]),
        "build_keyed_records_s": round(results["build keyed"]),
        "build_full_records_s": round(results["build key+header+timestamp"]),
        "build_gzip_records_s": round(results["build append_values() gzip"]),
        "decode_records_s": round(results["decode"]),
        "decode_mixed_records_s": round(results["decode 90-110 B"]),
        "decode_full_records_s": round(results["decode keyed+header"]),
        "decode_gzip_records_s": round(results["decode gzip"]),
        "validate_batches_s": round(validations),
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
