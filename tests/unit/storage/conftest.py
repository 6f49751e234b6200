"""Fixtures shared by the storage tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from storage_testing import START_MS, MakeBatch, OpenLog, ThreadGate

from dlog.clock import ManualClock
from dlog.storage.batch import BatchBuilder, Compression
from dlog.storage.config import LogConfig
from dlog.storage.log import PartitionLog


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


@pytest.fixture
def thread_gate(monkeypatch: pytest.MonkeyPatch) -> ThreadGate:
    """Freeze work at the moment it would go to a worker thread, deterministically."""
    gate = ThreadGate()
    run_sync = trio.to_thread.run_sync

    async def gated(fn: Callable[..., object], *args: object, **kwargs: Any) -> object:
        gate.entered.set()
        await gate.opened.wait()
        return await run_sync(fn, *args, **kwargs)

    monkeypatch.setattr(trio.to_thread, "run_sync", gated)
    return gate
