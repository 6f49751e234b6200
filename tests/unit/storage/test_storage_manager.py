"""LogManager: directories, topic ids, start-up, background flush/retention, shutdown."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
import trio.testing
from storage_testing import MakeBatch

from dlog.clock import ManualClock
from dlog.errors import InvalidTopicError, StorageError, StorageIOError
from dlog.storage.config import LogConfig
from dlog.storage.log import OFFSETS_CHECKPOINT
from dlog.storage.manager import (
    PARTITION_METADATA,
    LogManager,
    parse_partition_dir_name,
    read_partition_metadata,
)


def manager(tmp_path: Path, clock: ManualClock, **kwargs: int) -> LogManager:
    return LogManager(tmp_path / "data", clock, LogConfig(), **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def inline_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run "worker threads" inline: the autojump clock would otherwise move on while a
    thread fsyncs, and virtual time would not be exact."""

    async def inline(fn: Callable[..., object], *args: object, **_: object) -> object:
        await trio.lowlevel.checkpoint()
        return fn(*args)

    monkeypatch.setattr(trio.to_thread, "run_sync", inline)


def test_partition_dir_names() -> None:
    assert parse_partition_dir_name("orders-3") == ("orders", 3)
    assert parse_partition_dir_name("my-topic-12") == ("my-topic", 12)
    for name in ("orders", "orders-", "-3", "orders-03", "orders-x", "orders-3.abc-delete"):
        assert parse_partition_dir_name(name) is None


async def test_create_reopen_and_adopt_by_topic_id(
    tmp_path: Path, clock: ManualClock, make_batch: MakeBatch
) -> None:
    first = manager(tmp_path, clock)
    async with trio.open_nursery() as nursery:
        await nursery.start(first.run)
        log = await first.get_or_create("orders", 0, "id-1", LogConfig(segment_bytes=500))
        assert log.config.segment_bytes == 500
        assert await first.get_or_create("orders", 0, "id-1") is log
        assert log.config == LogConfig()  # the new config replaces the old
        log.append(make_batch(3), leader_epoch=0)
        await first.get_or_create("orders", 1, "id-1")
        directory = log.directory
        assert directory == tmp_path / "data" / "orders-0"
        assert read_partition_metadata(directory) == "id-1"
        assert (directory / PARTITION_METADATA).read_text() == "version: 0\ntopic_id: id-1\n"
        nursery.cancel_scope.cancel()
    assert log.closed
    # On shutdown everything was flushed and checkpointed.
    assert "recovery_point 3" in (directory / OFFSETS_CHECKPOINT).read_text()

    second = manager(tmp_path, clock)
    async with trio.open_nursery() as nursery:
        await nursery.start(second.run)
        assert set(second.logs) == {("orders", 0), ("orders", 1)}
        reopened = await second.get_or_create("orders", 0, "id-1")
        assert reopened.log_end_offset == 3
        # Same name, another topic id (deleted and recreated): never adopted.
        fresh = await second.get_or_create("orders", 0, "id-2")
        assert fresh is not reopened
        assert reopened.closed
        assert fresh.log_end_offset == 0
        assert read_partition_metadata(fresh.directory) == "id-2"
        assert not [p for p in (tmp_path / "data").iterdir() if p.name.endswith("-delete")]
        nursery.cancel_scope.cancel()


async def test_delete_and_leftovers(tmp_path: Path, clock: ManualClock) -> None:
    data = tmp_path / "data"
    (data / "old-0.0123abc-delete").mkdir(parents=True)
    (data / "old-0.0123abc-delete" / "00000000000000000000.log").write_bytes(b"x")
    (data / "not a partition").mkdir()
    (data / "nometa-0").mkdir()  # half-created: no partition.metadata
    logs = manager(tmp_path, clock)
    async with trio.open_nursery() as nursery:
        await nursery.start(logs.run)
        assert not (data / "old-0.0123abc-delete").exists()
        assert (data / "not a partition").exists()
        assert logs.topic_id("nometa", 0) is None
        adopted = await logs.get_or_create("nometa", 0, "id-9")
        assert logs.topic_id("nometa", 0) == "id-9"
        assert read_partition_metadata(adopted.directory) == "id-9"
        await logs.get_or_create("gone", 0, "id-3")
        assert await logs.delete("gone", 0)
        assert not await logs.delete("gone", 0)
        assert logs.get("gone", 0) is None
        assert not (data / "gone-0").exists()
        assert not [p for p in data.iterdir() if p.name.endswith("-delete")]
        with pytest.raises(InvalidTopicError):
            await logs.get_or_create("../etc", 0, "id")
        with pytest.raises(InvalidTopicError):
            await logs.get_or_create("a/b", 0, "id")
        nursery.cancel_scope.cancel()


async def test_logs_of_the_longest_topic_names_are_deleted(
    tmp_path: Path, clock: ManualClock
) -> None:
    # A 249-character topic (the longest allowed) at partition 9999 is a 254-byte
    # directory name; the "<name>.<uuid>-delete" it is renamed to on deletion must be
    # cut to 255 bytes (as Kafka does), or the rename fails with "File name too long".
    data = tmp_path / "data"
    topic = "x" * 249
    logs = manager(tmp_path, clock)
    async with trio.open_nursery() as nursery:
        await nursery.start(logs.run)
        for partition in (0, 9999):
            await logs.get_or_create(topic, partition, "id-1")
            assert await logs.delete(topic, partition)
            assert logs.get(topic, partition) is None
        # A directory of another topic id under that name is replaced, not adopted.
        await logs.get_or_create(topic, 0, "id-1")
        await logs.get_or_create(topic, 0, "id-2")
        assert logs.topic_id(topic, 0) == "id-2"
        assert [p.name for p in data.iterdir() if p.is_dir()] == [f"{topic}-0"]
        nursery.cancel_scope.cancel()


async def test_one_data_dir_one_manager(tmp_path: Path, clock: ManualClock) -> None:
    first = manager(tmp_path, clock)
    async with trio.open_nursery() as nursery:
        await nursery.start(first.run)
        with pytest.raises(StorageError, match="in use"):
            await manager(tmp_path, clock).run()
        nursery.cancel_scope.cancel()
    with pytest.raises(StorageError, match="not running"):
        await first.get_or_create("t", 0, "id")


async def test_flush_task_follows_flush_ms(
    tmp_path: Path,
    clock: ManualClock,
    make_batch: MakeBatch,
    autojump_clock: trio.testing.MockClock,
    inline_threads: None,
) -> None:
    logs = manager(tmp_path, clock, flush_check_interval_ms=100, checkpoint_interval_ms=5000)
    async with trio.open_nursery() as nursery:
        await nursery.start(logs.run)
        started = trio.current_time()
        log = await logs.get_or_create("t", 0, "id", LogConfig(flush_ms=1000))
        log.append(make_batch(2), leader_epoch=0)
        # The first check (at +0.1 s) starts the interval: fsynced flush_ms later.
        await trio.sleep(1.05)
        assert log.recovery_point == 0
        await trio.sleep(0.1)
        assert log.recovery_point == 2
        checkpoint = log.directory / OFFSETS_CHECKPOINT
        assert not checkpoint.exists()
        await trio.sleep(started + 5.05 - trio.current_time())
        assert "recovery_point 2" in checkpoint.read_text()
        nursery.cancel_scope.cancel()


async def test_a_checkpoint_that_cannot_be_written_is_retried_not_fatal(
    tmp_path: Path,
    clock: ManualClock,
    make_batch: MakeBatch,
    autojump_clock: trio.testing.MockClock,
    inline_threads: None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A full disk makes checkpoint writes fail: the previous checkpoints stay (safe to
    recover from), the manager keeps running and flushing, the failures are logged a
    line per 30 s at most, the other logs still get theirs, and the checkpoint is
    written once the disk has room."""
    import dlog.storage.log as log_module

    real_write = log_module._write_checkpoints
    full = {"a-0"}

    def write(directory: Path, *args: object) -> None:
        if directory.name in full:
            raise StorageError(f"writing checkpoints in {directory} failed: [Errno 28] No space")
        real_write(directory, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(log_module, "_write_checkpoints", write)
    logs = manager(tmp_path, clock, flush_check_interval_ms=100, checkpoint_interval_ms=1000)
    async with trio.open_nursery() as nursery:
        await nursery.start(logs.run)
        a = await logs.get_or_create("a", 0, "id-a", LogConfig(flush_ms=100))
        b = await logs.get_or_create("b", 0, "id-b", LogConfig(flush_ms=100))
        for log in (a, b):
            log.append(make_batch(2), leader_epoch=0)
        await trio.sleep(10.5)  # ten checkpoint rounds
        assert logs.running and a.recovery_point == 2  # still flushing
        assert not (a.directory / OFFSETS_CHECKPOINT).exists()
        assert "recovery_point 2" in (b.directory / OFFSETS_CHECKPOINT).read_text()
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and "No space" in errors[0], errors
        full.clear()
        await trio.sleep(1)
        assert "recovery_point 2" in (a.directory / OFFSETS_CHECKPOINT).read_text()
        nursery.cancel_scope.cancel()


async def stop_of_the_manager(
    logs: LogManager, disk_failure: Callable[[], Awaitable[None]]
) -> pytest.ExceptionInfo[ExceptionGroup[Exception]]:
    """Run ``logs`` while ``disk_failure()`` breaks one of its logs; the manager must
    stop at its next flush check (within its 100 ms interval). What it stopped with."""
    with pytest.raises(ExceptionGroup) as stopped:  # noqa: PT012
        async with trio.open_nursery() as nursery:
            await nursery.start(logs.run)
            await disk_failure()
            await trio.sleep(1)  # (a deadline: the manager's stop cancels this)
            pytest.fail("the manager did not stop")
    assert trio.current_time() < 1
    return stopped


async def test_a_failed_fsync_takes_the_log_offline_and_stops_the_manager(
    tmp_path: Path,
    clock: ManualClock,
    make_batch: MakeBatch,
    autojump_clock: trio.testing.MockClock,
    inline_threads: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After a failed fsync the kernel may have dropped the dirty pages, and a later
    fsync that succeeds proves nothing: the log takes no more writes or flushes, and
    the manager (and so the node) stops at its next check, even when the fsync that
    failed was a request's (flush_messages=1), not the flusher's."""
    import dlog.storage.segment as segment_module

    logs = manager(tmp_path, clock, flush_check_interval_ms=100)

    async def failed_fsync() -> None:
        log = await logs.get_or_create("t", 0, "id", LogConfig(flush_messages=1))
        log.append(make_batch(1), leader_epoch=0)

        def eio(fd: int) -> None:
            raise OSError(5, "Input/output error")

        monkeypatch.setattr(segment_module.os, "fdatasync", eio)
        with pytest.raises(StorageIOError, match="fsync failed"):
            await log.flush()  # as a produce with flush_messages=1 does
        monkeypatch.undo()
        assert log.recovery_point == 0
        with pytest.raises(StorageIOError, match="offline after a failed fsync"):
            log.append(make_batch(1), leader_epoch=0)
        with pytest.raises(StorageIOError, match="offline after a failed fsync"):
            await log.flush()

    stopped = await stop_of_the_manager(logs, failed_fsync)
    assert stopped.group_contains(StorageIOError, match="fsync of .* failed")


async def test_a_truncation_that_fails_part_way_takes_the_log_offline_and_stops_the_manager(
    tmp_path: Path,
    clock: ManualClock,
    make_batch: MakeBatch,
    autojump_clock: trio.testing.MockClock,
    inline_threads: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A follower's truncation that the disk fails part-way (EIO cutting the segment)
    leaves files that may not match the log's view of them: it is a StorageIOError,
    the log takes no more writes, and the manager stops, as after a failed fsync."""
    logs = manager(tmp_path, clock, flush_check_interval_ms=100)

    async def failed_truncation() -> None:
        log = await logs.get_or_create("t", 0, "id", LogConfig())
        for _ in range(3):
            log.append(make_batch(1), leader_epoch=0)

        def eio(fd: int, length: int) -> None:
            raise OSError(5, "Input/output error")

        monkeypatch.setattr(os, "ftruncate", eio)
        with pytest.raises(StorageIOError, match="truncating .* failed: .*Input/output"):
            await log.truncate_to(1)
        monkeypatch.undo()
        with pytest.raises(StorageIOError, match="offline after a failed truncation"):
            log.append(make_batch(1), leader_epoch=0)
        with pytest.raises(StorageIOError, match="offline after a failed truncation"):
            await log.truncate_to(1)

    stopped = await stop_of_the_manager(logs, failed_truncation)
    assert stopped.group_contains(StorageIOError, match="truncation of .* failed")


async def test_retention_task(
    tmp_path: Path,
    clock: ManualClock,
    make_batch: MakeBatch,
    autojump_clock: trio.testing.MockClock,
    inline_threads: None,
) -> None:
    logs = manager(tmp_path, clock, retention_check_interval_ms=60_000)
    async with trio.open_nursery() as nursery:
        await nursery.start(logs.run)
        log = await logs.get_or_create(
            "t", 0, "id", LogConfig(segment_bytes=200, retention_ms=3_600_000)
        )
        for _ in range(6):
            log.append(make_batch(2), leader_epoch=0)
        log.update_high_watermark(log.log_end_offset)
        segments = len(log.segments)
        assert segments > 2
        clock.advance(3_600_001)  # wall clock: everything has expired
        await trio.sleep(59.9)  # trio clock: the retention pass has not run yet
        assert log.log_start_offset == 0
        await trio.sleep(0.2)
        assert log.log_start_offset == log.log_end_offset == 12
        assert len(log.segments) == 1
        nursery.cancel_scope.cancel()


async def test_directory_appearing_after_start_is_adopted_only_if_its_id_matches(
    tmp_path: Path, clock: ManualClock, make_batch: MakeBatch
) -> None:
    from dlog.storage.log import PartitionLog
    from dlog.storage.manager import write_partition_metadata

    logs = manager(tmp_path, clock)
    async with trio.open_nursery() as nursery:
        await nursery.start(logs.run)
        for topic, topic_id in (("same", "id-1"), ("other", "id-old")):
            directory = tmp_path / "data" / f"{topic}-0"
            directory.mkdir()
            write_partition_metadata(directory, topic_id)
            log = PartitionLog.open(directory, LogConfig(), clock)
            log.append(make_batch(2), leader_epoch=0)
            log.close()
        assert (await logs.get_or_create("same", 0, "id-1")).log_end_offset == 2
        assert (await logs.get_or_create("other", 0, "id-new")).log_end_offset == 0
        nursery.cancel_scope.cancel()
