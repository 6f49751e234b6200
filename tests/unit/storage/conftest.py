"""Fixtures shared by the storage tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dlog.clock import ManualClock
from dlog.storage.batch import BatchBuilder, Compression
from dlog.storage.config import LogConfig
from dlog.storage.log import PartitionLog

START_MS = 1_700_000_000_000

MakeBatch = Callable[..., bytearray]
OpenLog = Callable[..., PartitionLog]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START_MS)


@pytest.fixture
def make_batch(clock: ManualClock) -> MakeBatch:
    """make_batch(values | count, *, timestamp=now, compression=NONE) -> bytearray."""
    counter = iter(range(1 << 62))

    def make(
        values: list[bytes] | int = 1,
        *,
        timestamp: int | None = None,
        compression: Compression = Compression.NONE,
    ) -> bytearray:
        if isinstance(values, int):
            values = [f"value-{next(counter)}".encode() for _ in range(values)]
        builder = BatchBuilder(
            clock.now_ms() if timestamp is None else timestamp, compression=compression
        )
        builder.append_values(values)
        return builder.build()

    return make


@pytest.fixture
def open_log(tmp_path: Path, clock: ManualClock) -> Iterator[OpenLog]:
    """open_log(**config overrides) -> PartitionLog in tmp_path/topic-0; closed after."""
    opened: list[PartitionLog] = []

    def open_(directory: Path | None = None, **overrides: int) -> PartitionLog:
        config = LogConfig.from_overrides(overrides)
        log = PartitionLog.open(directory or tmp_path / "topic-0", config, clock)
        opened.append(log)
        return log

    yield open_
    for log in opened:
        log.close()
