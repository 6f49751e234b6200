"""Shared by the data-plane benchmarks: local clusters, unique values, checksums."""

from __future__ import annotations

import statistics
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dlogctl.local import ClusterSpec, start_cluster, stop_cluster

VALUE_BYTES = 100
_PAD = b"x" * VALUE_BYTES


@contextmanager
def local_cluster(nodes: int) -> Iterator[ClusterSpec]:
    """A fresh cluster of ``nodes`` processes in a temporary directory, killed on exit."""
    with tempfile.TemporaryDirectory(prefix="dlog-bench-") as tmp:
        spec = start_cluster(Path(tmp) / "cluster", nodes)
        try:
            yield spec
        finally:
            stop_cluster(spec)


def values(start: int, count: int) -> list[bytes]:
    """``count`` unique 100-byte values: a zero-padded sequence number and padding."""
    return [b"%020d" % i + _PAD[20:] for i in range(start, start + count)]


def checksum(chunks: Iterator[bytes] | list[bytes]) -> int:
    """Order-independent checksum of a set of values (sum of CRC-32s, mod 2^64)."""
    total = 0
    for v in chunks:
        total += zlib.crc32(v)
    return total & 0xFFFF_FFFF_FFFF_FFFF


def expected_checksum(count: int) -> int:
    return (
        checksum(values(0, count))
        if count < 2_000_000
        else sum(checksum(values(i, min(1_000_000, count - i))) for i in range(0, count, 1_000_000))
        & 0xFFFF_FFFF_FFFF_FFFF
    )


def percentile(samples: list[float], p: float) -> float:
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def median(samples: list[float]) -> float:
    return statistics.median(samples) if samples else float("nan")
