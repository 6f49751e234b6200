"""Shared by the data-plane benchmarks: local clusters; the workloads, unique values and
checksums come from :mod:`dlogctl.workloads` (what ``dlogctl bench`` runs too)."""

from __future__ import annotations

import sys
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
    "python_build",
    "values",
]


def python_build() -> str:
    """Which interpreter ran the benchmark, for its JSON line: every figure here is
    bound by the interpreter's speed, and builds differ by 15-25% per request on this
    machine (see the README's benchmarks section). Says whether libpython is a shared
    library (slower calls unless built with -fno-semantic-interposition) and whether
    CPython's own PGO+LTO switch was used (distributions may optimize without it), and
    which build of dlog ran."""
    import os
    import sysconfig

    traits = []
    try:
        with open("/proc/self/maps") as maps:  # (Linux)
            traits.append("libpython shared" if "libpython" in maps.read() else "libpython static")
    except OSError:
        pass
    config_args = sysconfig.get_config_var("CONFIG_ARGS") or ""
    if "--enable-optimizations" in config_args:
        traits.append("--enable-optimizations")
    if "--with-lto" in config_args:
        traits.append("--with-lto")
    # And whether dlog itself is the compiled build (`make compiled`) or pure Python.
    import dlog.storage.log

    compiled = (dlog.storage.log.__file__ or "").endswith(".so")
    traits.append("dlog compiled" if compiled else "dlog pure Python")
    version = sys.version.split()[0]
    where = os.path.realpath(sys.executable)  # (the interpreter a venv links to)
    return f"{version} {where}" + (f" ({', '.join(traits)})" if traits else "")


@contextmanager
def local_cluster(nodes: int) -> Iterator[ClusterSpec]:
    """A fresh cluster of ``nodes`` processes in a temporary directory, killed on exit."""
    with tempfile.TemporaryDirectory(prefix="dlog-bench-") as tmp:
        spec = start_cluster(Path(tmp) / "cluster", nodes)
        try:
            yield spec
        finally:
            stop_cluster(spec)
