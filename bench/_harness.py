"""Shared by the data-plane benchmarks: local clusters; the workloads, unique values and
checksums come from :mod:`dlogctl.workloads` (what ``dlogctl bench`` runs too)."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dlogctl.local import ClusterSpec, start_cluster, stop_cluster
from dlogctl.workloads import (
    VALUE_BYTES,
    checksum,
    expected_checksum,
    median,
    percentile,
    values,
)

__all__ = [
    "VALUE_BYTES",
    "checksum",
    "expected_checksum",
    "local_cluster",
    "median",
    "percentile",
    "values",
]


@contextmanager
def local_cluster(nodes: int) -> Iterator[ClusterSpec]:
    """A fresh cluster of ``nodes`` processes in a temporary directory, killed on exit."""
    with tempfile.TemporaryDirectory(prefix="dlog-bench-") as tmp:
        spec = start_cluster(Path(tmp) / "cluster", nodes)
        try:
            yield spec
        finally:
            stop_cluster(spec)
