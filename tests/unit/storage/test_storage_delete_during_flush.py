"""Deleting a partition while the background flush fsyncs it or writes its checkpoints.

Found by ``dlogctl bench`` (create, fill, delete a topic in quick succession): nodes
exited with ``fsync failed: [Errno 2] No such file or directory: '.../<topic>-0'`` and
``writing checkpoints in .../<topic>-2 failed: [Errno 2] ...`` (KAFKA_STORAGE_ERROR).
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import trio
from storage_testing import MakeBatch

from dlog.clock import ManualClock
from dlog.storage import log as log_module
from dlog.storage.config import LogConfig
from dlog.storage.manager import LogManager


async def test_deleting_a_log_during_its_background_fsync_keeps_the_manager_running(
    tmp_path: Path, clock: ManualClock, make_batch: MakeBatch, monkeypatch: pytest.MonkeyPatch
) -> None:
    in_fsync = threading.Event()
    release = threading.Event()
    finished = threading.Event()
    real_fsync_all = log_module._fsync_all

    def held_fsync_all(*args: object) -> None:
        in_fsync.set()
        release.wait(10)
        try:
            real_fsync_all(*args)  # type: ignore[arg-type]
        finally:
            finished.set()

    monkeypatch.setattr(log_module, "_fsync_all", held_fsync_all)
    logs = LogManager(
        tmp_path / "data", clock, LogConfig(flush_messages=1), flush_check_interval_ms=10
    )
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(logs.run)
            doomed = await logs.get_or_create("doomed", 0, "id-1")
            doomed.append(make_batch(3), leader_epoch=0)
            # The flush loop is now fsyncing the log in a worker thread.
            await trio.to_thread.run_sync(in_fsync.wait, 10)
            monkeypatch.setattr(log_module, "_fsync_all", real_fsync_all)
            deleted = trio.Event()

            async def delete() -> None:
                assert await logs.delete("doomed", 0)
                deleted.set()

            nursery.start_soon(delete)
            # Let the delete go as far as it goes while the fsync is held: today it renames
            # the directory away and returns; a delete that waits for the fsync in progress
            # stays blocked until the release.
            with trio.move_on_after(2):
                await deleted.wait()
            release.set()
            await trio.to_thread.run_sync(finished.wait, 10)
            await deleted.wait()
            # The manager goes on serving other partitions.
            survivor = await logs.get_or_create("survivor", 0, "id-2")
            survivor.append(make_batch(2), leader_epoch=0)
            await logs.flush_all()
            assert logs.running
            nursery.cancel_scope.cancel()


async def test_deleting_a_log_during_its_background_checkpoint_keeps_the_manager_running(
    tmp_path: Path, clock: ManualClock, make_batch: MakeBatch, monkeypatch: pytest.MonkeyPatch
) -> None:
    in_write = threading.Event()
    release = threading.Event()
    finished = threading.Event()
    real_write = log_module._write_checkpoints

    def held_write(*args: object) -> None:
        in_write.set()
        release.wait(10)
        try:
            real_write(*args)  # type: ignore[arg-type]
        finally:
            finished.set()

    logs = LogManager(
        tmp_path / "data", clock, LogConfig(), flush_check_interval_ms=10, checkpoint_interval_ms=10
    )
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(logs.run)
            doomed = await logs.get_or_create("doomed", 0, "id-1")
            doomed.append(make_batch(3), leader_epoch=0)
            doomed.update_high_watermark(doomed.log_end_offset)
            monkeypatch.setattr(log_module, "_write_checkpoints", held_write)
            # The checkpoint loop is now writing the log's checkpoints in a worker thread.
            await trio.to_thread.run_sync(in_write.wait, 10)
            monkeypatch.setattr(log_module, "_write_checkpoints", real_write)
            deleted = trio.Event()

            async def delete() -> None:
                assert await logs.delete("doomed", 0)
                deleted.set()

            nursery.start_soon(delete)
            with trio.move_on_after(2):
                await deleted.wait()
            release.set()
            await trio.to_thread.run_sync(finished.wait, 10)
            await deleted.wait()
            survivor = await logs.get_or_create("survivor", 0, "id-2")
            survivor.append(make_batch(2), leader_epoch=0)
            await logs.flush_all()
            assert logs.running
            nursery.cancel_scope.cancel()
