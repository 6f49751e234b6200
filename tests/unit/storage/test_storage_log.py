"""PartitionLog: append, read, truncation, epochs, roll, retention, flush, checkpoints."""

from __future__ import annotations

import errno
import os
import struct
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from storage_testing import MakeBatch, OpenLog, ThreadGate

from dlog.clock import ManualClock
from dlog.errors import (
    CorruptRecordError,
    FencedLeaderEpochError,
    InvalidTimestampError,
    MessageTooLargeError,
    OffsetOutOfRangeError,
    StorageError,
    StorageIOError,
)
from dlog.storage.batch import decode_records, iter_batch_headers
from dlog.storage.log import (
    EARLIEST_TIMESTAMP,
    LATEST_TIMESTAMP,
    LEADER_EPOCH_CHECKPOINT,
    OFFSETS_CHECKPOINT,
    PartitionLog,
    UnexpectedAppendOffsetError,
)


def values(log: PartitionLog, offset: int = 0, upper_bound: int | None = None) -> list[bytes]:
    data = log.read(offset, 1 << 30, upper_bound)
    return [r.value or b"" for r in decode_records(data.records, min_offset=offset)]


def log_file_bytes(log: PartitionLog) -> int:
    return sum(p.stat().st_size for p in log.directory.glob("*.log"))


# -- append ---------------------------------------------------------------------------------


def test_append_assigns_offsets_in_place(open_log: OpenLog, make_batch: MakeBatch) -> None:
    log = open_log()
    assert (log.log_start_offset, log.log_end_offset, log.high_watermark) == (0, 0, 0)
    first = make_batch([b"a", b"b"])
    info = log.append(first, leader_epoch=3)
    assert (info.first_offset, info.last_offset, info.record_count) == (0, 1, 2)
    assert struct.unpack_from(">qii", first, 0)[0::2] == (0, 3)  # written into our buffer
    second = bytes(make_batch([b"c"]))
    info = log.append(second, leader_epoch=3)
    assert (info.first_offset, info.last_offset) == (2, 2)
    assert struct.unpack_from(">q", second)[0] == 0  # bytes are copied, not changed
    assert log.log_end_offset == 3
    assert values(log) == [b"a", b"b", b"c"]
    headers = list(iter_batch_headers(log.read(0, 1 << 20).records))
    assert [(h.base_offset, h.partition_leader_epoch) for h in headers] == [(0, 3), (2, 3)]


def test_append_several_batches_in_one_buffer(open_log: OpenLog, make_batch: MakeBatch) -> None:
    log = open_log()
    buf = make_batch([b"a"]) + make_batch([b"b", b"c"]) + make_batch([b"d"])
    info = log.append(buf, leader_epoch=0)
    assert (info.first_offset, info.last_offset, info.batch_count) == (0, 3, 3)
    assert values(log) == [b"a", b"b", b"c", b"d"]
    # Every field (the append builds it positionally, without the arity check).
    headers = list(iter_batch_headers(buf))
    assert info._asdict() == {
        "first_offset": 0,
        "last_offset": 3,
        "max_timestamp": max(h.max_timestamp for h in headers),
        "batch_count": 3,
        "record_count": 4,
        "size": len(buf),
    }


@pytest.mark.parametrize("damage", ["crc", "magic", "length", "trailing"])
def test_bad_batch_writes_nothing(open_log: OpenLog, make_batch: MakeBatch, damage: str) -> None:
    log = open_log()
    log.append(make_batch(3), leader_epoch=0)
    size_before = log_file_bytes(log)
    bad = make_batch(2)
    if damage == "crc":
        bad[-1] ^= 0x01
    elif damage == "magic":
        bad[16] = 0
    elif damage == "length":
        struct.pack_into(">i", bad, 8, len(bad))
    else:
        bad += b"\x00" * 10
    # The good batch in front of the bad one is not written either.
    with pytest.raises(CorruptRecordError):
        log.append(make_batch(1) + bad, leader_epoch=0)
    assert log.log_end_offset == 3
    assert log_file_bytes(log) == size_before


def test_minus_one_turns_the_timestamp_check_and_interval_flush_off(
    open_log: OpenLog, make_batch: MakeBatch, clock: ManualClock
) -> None:
    log = open_log(max_timestamp_skew_ms=-1, flush_ms=-1)
    log.append(make_batch(1, timestamp=clock.now_ms() + 10**9), leader_epoch=0)
    assert log.log_end_offset == 1
    assert not log.flush_due(0.0)
    assert not log.flush_due(10**9)
    assert not log.flush_before_ack


def test_timestamp_and_size_limits(
    open_log: OpenLog, make_batch: MakeBatch, clock: ManualClock
) -> None:
    log = open_log(max_timestamp_skew_ms=1000, max_message_bytes=500)
    with pytest.raises(InvalidTimestampError):
        log.append(make_batch(1, timestamp=clock.now_ms() + 1001), leader_epoch=0)
    log.append(make_batch(1, timestamp=clock.now_ms() + 1000), leader_epoch=0)
    with pytest.raises(MessageTooLargeError):
        log.append(make_batch([bytes(600)]), leader_epoch=0)
    assert log.log_end_offset == 1


def test_stale_leader_epoch_is_fenced(open_log: OpenLog, make_batch: MakeBatch) -> None:
    log = open_log()
    log.append(make_batch(1), leader_epoch=5)
    with pytest.raises(FencedLeaderEpochError):
        log.append(make_batch(1), leader_epoch=4)
    log.append(make_batch(1), leader_epoch=6)
    assert [(e.epoch, e.start_offset) for e in log.leader_epoch_cache.entries()] == [(5, 0), (6, 1)]


def test_append_as_follower(open_log: OpenLog, make_batch: MakeBatch, tmp_path: Path) -> None:
    leader = open_log(tmp_path / "leader-0")
    follower = open_log(tmp_path / "follower-0")
    leader.append(make_batch(2), leader_epoch=1)
    leader.append(make_batch(3), leader_epoch=2)
    leader.append(make_batch(1), leader_epoch=2)
    data = leader.read(0, 1 << 20).records
    info = follower.append_as_follower(data)
    assert (info.first_offset, info.last_offset, info.batch_count) == (0, 5, 3)
    assert follower.read(0, 1 << 20).records == data
    assert follower.leader_epoch_cache.entries() == leader.leader_epoch_cache.entries()
    assert follower.end_offset_for_epoch(1) == (1, 2)
    # Batches must continue exactly at the log end offset.
    with pytest.raises(UnexpectedAppendOffsetError) as info_:
        follower.append_as_follower(data)
    assert info_.value.details["log_end_offset"] == 6
    bad = bytearray(leader.read(0, 1).records)
    bad[-1] ^= 1
    with pytest.raises(CorruptRecordError):
        follower.append_as_follower(bad)
    assert follower.log_end_offset == 6


# -- read -----------------------------------------------------------------------------------


def test_read_returns_at_least_one_whole_batch(open_log: OpenLog, make_batch: MakeBatch) -> None:
    log = open_log()
    big = make_batch([bytes(5000)])
    log.append(big, leader_epoch=0)
    log.append(make_batch(1), leader_epoch=0)
    data = log.read(0, max_bytes=10)
    assert data.records == bytes(big)
    assert data.next_offset == 1
    assert log.read(0, 10, min_one_batch=False).is_empty


def test_read_respects_max_bytes_with_whole_batches(
    open_log: OpenLog, make_batch: MakeBatch
) -> None:
    log = open_log()
    batches = [make_batch(3) for _ in range(10)]
    for batch in batches:
        log.append(batch, leader_epoch=0)
    size = len(batches[0])
    data = log.read(0, max_bytes=size * 3 + size // 2)
    assert data.records == b"".join(bytes(b) for b in batches[:3])
    assert data.next_offset == 9
    # Reading from inside a batch starts with that whole batch.
    data = log.read(4, max_bytes=size)
    assert data.records == bytes(batches[1])
    assert decode_records(data.records, min_offset=4)[0].offset == 4


def test_read_never_passes_upper_bound(open_log: OpenLog, make_batch: MakeBatch) -> None:
    log = open_log()
    for _ in range(5):
        log.append(make_batch(2), leader_epoch=0)
    log.update_high_watermark(6)
    assert values(log, 0, log.high_watermark) == values(log)[:6]
    assert log.read(0, 1 << 20, upper_bound=5).next_offset == 4  # batch [4, 5] reaches 5
    # [high watermark, log end offset]: no data, no error.
    for offset in (6, 8, 10):
        data = log.read(offset, 1 << 20, upper_bound=log.high_watermark)
        assert data.is_empty
        assert data.next_offset == offset


@pytest.mark.parametrize("offset", [-1, 11])
def test_read_out_of_range_names_the_range(
    open_log: OpenLog, make_batch: MakeBatch, offset: int
) -> None:
    log = open_log()
    log.append(make_batch(10), leader_epoch=0)
    with pytest.raises(OffsetOutOfRangeError) as info:
        log.read(offset, 100)
    assert info.value.details == {"log_start_offset": 0, "log_end_offset": 10}


def test_read_across_segments_gives_one_chunk_per_segment(
    open_log: OpenLog, make_batch: MakeBatch
) -> None:
    log = open_log(segment_bytes=300)
    for _ in range(12):
        log.append(make_batch(2), leader_epoch=0)
    assert len(log.segments) > 3
    data = log.read(0, 1 << 20)
    assert len(data.chunks) == len(log.segments)
    assert [r.offset for r in decode_records(data.records)] == list(range(24))
    # Chained reads of a few hundred bytes see every record exactly once.
    seen: list[int] = []
    offset = 0
    while offset < log.log_end_offset:
        data = log.read(offset, 250)
        seen += [r.offset for r in decode_records(data.records, min_offset=offset)]
        offset = data.next_offset
    assert seen == list(range(24))


def test_a_roll_the_disk_refuses_is_a_storage_io_error_with_nothing_written(
    open_log: OpenLog, make_batch: MakeBatch, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An append that must roll, when the new segment's files cannot be made (too many
    open files, no room), is a StorageIOError -- a per-partition disk error for the
    broker, not an unexpected OSError failing a whole produce request -- and writes
    nothing; the next append after the disk recovers rolls and goes on."""
    log = open_log(segment_bytes=300)
    while len(log.segments) < 2:
        log.append(make_batch(2), leader_epoch=0)
    segments, end = len(log.segments), log.log_end_offset
    real_open = os.open

    def no_files(path: Any, flags: int, mode: int = 0o777, **kw: Any) -> int:
        if str(path).endswith(".log"):
            raise OSError(errno.EMFILE, "Too many open files")
        return real_open(path, flags, mode, **kw)

    monkeypatch.setattr(os, "open", no_files)
    with pytest.raises(StorageIOError, match="cannot roll .*Too many open files"):  # noqa: PT012
        while True:  # until an append needs a roll
            log.append(make_batch(2), leader_epoch=0)
            end = log.log_end_offset
    assert log.log_end_offset == end
    assert len(log.segments) == segments
    monkeypatch.undo()
    info = log.append(make_batch(2), leader_epoch=0)
    assert info.first_offset == end
    assert len(log.segments) == segments + 1
    assert [r.offset for r in decode_records(log.read(0, 1 << 20).records)] == list(range(end + 2))


async def test_read_async_matches_read(open_log: OpenLog, make_batch: MakeBatch) -> None:
    log = open_log(segment_bytes=400)
    for _ in range(10):
        log.append(make_batch(3), leader_epoch=0)
    for offset in (0, 5, 17, 29, 30):
        assert await log.read_async(offset, 500) == log.read(offset, 500)


async def test_read_async_pins_segments_against_retention(
    open_log: OpenLog, make_batch: MakeBatch, clock: ManualClock, thread_gate: ThreadGate
) -> None:
    log = open_log(segment_bytes=200, retention_ms=1000)
    for _ in range(6):
        log.append(make_batch(2), leader_epoch=0)
    log.update_high_watermark(log.log_end_offset)
    expected = log.read(0, 1 << 20)
    first = log.segments[0]
    result = []

    async def reader() -> None:
        result.append(await log.read_async(0, 1 << 20))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await thread_gate.entered.wait()  # the reader has pinned its segments
        clock.advance(2000)
        assert log.delete_old_segments() >= 1
        assert first.deleted
        assert list(log.directory.glob("*.log.deleted"))  # renamed, not yet unlinked
        thread_gate.open()
    assert result == [expected]
    assert first.refs == 0
    assert not list(log.directory.glob("*.deleted"))


async def test_read_async_redone_after_a_concurrent_truncation(
    open_log: OpenLog, make_batch: MakeBatch, thread_gate: ThreadGate
) -> None:
    log = open_log()
    for _ in range(4):
        log.append(make_batch(2), leader_epoch=0)
    result = []

    async def reader() -> None:
        result.append(await log.read_async(0, 1 << 20))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await thread_gate.entered.wait()  # planned the read of all 8 records
        nursery.start_soon(log.truncate_to, 3)  # cuts the file under it
        await trio.testing.wait_all_tasks_blocked()
        thread_gate.open()
    assert log.log_end_offset == 2
    assert result == [log.read(0, 1 << 20)]
    assert [r.offset for r in decode_records(result[0].records)] == [0, 1]


def test_offset_for_timestamp(open_log: OpenLog, make_batch: MakeBatch, clock: ManualClock) -> None:
    log = open_log(segment_bytes=300, index_interval_bytes=50)
    start = clock.now_ms()
    for i in range(20):
        log.append(make_batch(2, timestamp=start + 10 * i), leader_epoch=1)
    assert log.offset_for_timestamp(start).offset == 0  # type: ignore[union-attr]
    found = log.offset_for_timestamp(start + 55)
    assert found is not None
    assert (found.offset, found.timestamp, found.leader_epoch) == (12, start + 60, 1)
    assert log.offset_for_timestamp(start + 190).offset == 38  # type: ignore[union-attr]
    assert log.offset_for_timestamp(start + 191) is None
    assert log.offset_for_timestamp(EARLIEST_TIMESTAMP).offset == 0  # type: ignore[union-attr]
    assert log.offset_for_timestamp(LATEST_TIMESTAMP).offset == 40  # type: ignore[union-attr]


def test_offset_for_timestamp_inside_a_batch(open_log: OpenLog, clock: ManualClock) -> None:
    from dlog.storage.batch import BatchBuilder

    log = open_log()
    builder = BatchBuilder(1000)
    for i in range(5):
        builder.append(b"x", timestamp=1000 + i * 100)
    log.append(builder.build(), leader_epoch=0)
    assert log.offset_for_timestamp(1250).offset == 3  # type: ignore[union-attr]


# -- roll -----------------------------------------------------------------------------------


def test_rolls_by_size(open_log: OpenLog, make_batch: MakeBatch) -> None:
    log = open_log(segment_bytes=500)
    size = len(make_batch(2))
    for _ in range(10):
        log.append(make_batch(2), leader_epoch=0)
    per_segment = 500 // size
    assert [s.base_offset for s in log.segments] == list(range(0, 20, 2 * per_segment))
    assert all(s.size <= 500 for s in log.segments)
    names = sorted(p.name for p in log.directory.glob("*.log"))
    assert names[1] == f"{2 * per_segment:020d}.log"
    # Closed segments' indexes are trimmed; the active one's is preallocated.
    assert (log.directory / f"{0:020d}.index").stat().st_size < 1024
    assert log.active_segment.offset_index.writable


def test_rolls_by_time(open_log: OpenLog, make_batch: MakeBatch, clock: ManualClock) -> None:
    log = open_log(segment_ms=60_000)
    log.append(make_batch(1), leader_epoch=0)
    clock.advance(60_000)
    log.append(make_batch(1), leader_epoch=0)
    assert len(log.segments) == 1
    clock.advance(1)
    log.append(make_batch(1), leader_epoch=0)
    assert [s.base_offset for s in log.segments] == [0, 2]


def test_segment_age_counts_from_its_first_append(
    open_log: OpenLog, make_batch: MakeBatch, clock: ManualClock
) -> None:
    log = open_log(segment_ms=60_000)
    clock.advance(10 * 60_000)  # idle long before the first append
    log.append(make_batch(1), leader_epoch=0)
    log.append(make_batch(1), leader_epoch=0)
    assert len(log.segments) == 1
    # A producer replaying old records does not make every append roll.
    replay = open_log(log.directory.with_name("replay-0"), segment_ms=60_000)
    for _ in range(4):
        replay.append(make_batch(1, timestamp=clock.now_ms() - 10**9), leader_epoch=0)
    assert len(replay.segments) == 1


def test_rolls_when_the_index_fills(open_log: OpenLog, make_batch: MakeBatch) -> None:
    log = open_log(index_interval_bytes=0, segment_index_bytes=48)
    for _ in range(12):
        log.append(make_batch(1), leader_epoch=0)
    assert len(log.segments) > 1
    assert values(log) == [f"value-{i}".encode() for i in range(12)]


# -- truncation and the epoch cache ---------------------------------------------------------


async def test_truncate_to_within_and_across_segments(
    open_log: OpenLog, make_batch: MakeBatch
) -> None:
    log = open_log(segment_bytes=300)
    for epoch in (1, 1, 2, 2, 3, 3, 3, 4, 4):
        log.append(make_batch(2), leader_epoch=epoch)
    log.update_high_watermark(18)
    assert len(log.segments) >= 3
    assert not await log.truncate_to(18)
    assert await log.truncate_to(9)  # inside batch [8, 9]: the whole batch goes
    assert log.log_end_offset == 8
    assert log.high_watermark == 8
    assert values(log) == [f"value-{i}".encode() for i in range(8)]
    assert [(e.epoch, e.start_offset) for e in log.leader_epoch_cache.entries()] == [(1, 0), (2, 4)]
    assert log.end_offset_for_epoch(2) == (2, 8)
    assert log.end_offset_for_epoch(3) == (-1, -1)
    # Appends continue at the new end, in the next epoch.
    info = log.append(make_batch(1), leader_epoch=5)
    assert info.first_offset == 8
    assert log.end_offset_for_epoch(2) == (2, 8)
    assert not list(log.directory.glob("*.deleted"))
    # The truncation was checkpointed before truncate_to returned.
    checkpoint = (log.directory / OFFSETS_CHECKPOINT).read_text()
    assert "recovery_point" in checkpoint
    epochs = (log.directory / LEADER_EPOCH_CHECKPOINT).read_text()
    assert epochs == "0\n2\n1 0\n2 4\n"


async def test_truncate_fully_and_start_at(open_log: OpenLog, make_batch: MakeBatch) -> None:
    log = open_log(segment_bytes=300)
    for _ in range(6):
        log.append(make_batch(2), leader_epoch=1)
    await log.truncate_fully_and_start_at(1000)
    assert (log.log_start_offset, log.log_end_offset, log.high_watermark) == (1000, 1000, 1000)
    assert log.leader_epoch_cache.entries() == []
    assert [p.name for p in log.directory.glob("*.log")] == [f"{1000:020d}.log"]
    info = log.append(make_batch(1), leader_epoch=2)
    assert info.first_offset == 1000
    with pytest.raises(OffsetOutOfRangeError):
        log.read(0, 100)
    log.close()
    reopened = PartitionLog.open(log.directory, log.config, ManualClock())
    assert (reopened.log_start_offset, reopened.log_end_offset) == (1000, 1001)
    reopened.close()


async def test_truncate_below_log_start_starts_over(
    open_log: OpenLog, make_batch: MakeBatch
) -> None:
    log = open_log()
    await log.truncate_fully_and_start_at(50)
    log.append(make_batch(2), leader_epoch=0)
    assert await log.truncate_to(10)
    assert (log.log_start_offset, log.log_end_offset) == (10, 10)


async def test_appends_wait_for_the_truncation_checkpoint(
    open_log: OpenLog, make_batch: MakeBatch, thread_gate: ThreadGate
) -> None:
    log = open_log()
    for _ in range(3):
        log.append(make_batch(1), leader_epoch=0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(log.truncate_to, 1)
        await thread_gate.entered.wait()  # truncate_to is about to write its checkpoint
        with pytest.raises(StorageError, match="truncated") as refused:
            log.append(make_batch(1), leader_epoch=0)
        assert not isinstance(refused.value, StorageIOError)  # the log's state, not the disk
        thread_gate.open()
    assert log.append(make_batch(1), leader_epoch=0).first_offset == 1


async def test_appends_wait_until_a_failed_truncation_checkpoint_is_written(
    open_log: OpenLog, make_batch: MakeBatch, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the checkpoint after a truncation cannot be written (a full disk), the one on
    disk still has the old recovery point, above the new log end: appends there would
    be trusted without a scan after a crash. So appends are refused until a
    checkpoint is written (the log manager retries it every round)."""
    import dlog.storage.log as log_module

    log = open_log()
    for _ in range(4):
        log.append(make_batch(1), leader_epoch=0)
    await log.flush()
    assert await log.checkpoint()  # recovery point 4 on disk
    real_write = log_module._write_checkpoints

    def no_space(*args: object) -> None:
        raise StorageError("writing checkpoints failed: [Errno 28] No space left on device")

    monkeypatch.setattr(log_module, "_write_checkpoints", no_space)
    with pytest.raises(StorageError, match="No space"):
        await log.truncate_to(2)
    assert log.log_end_offset == 2
    assert "recovery_point 4" in (log.directory / OFFSETS_CHECKPOINT).read_text()
    with pytest.raises(StorageError, match="once the checkpoint of its truncation is written"):
        log.append(make_batch(1), leader_epoch=0)
    with pytest.raises(StorageError, match="No space"):
        await log.checkpoint()  # a periodic one: still failing, still refused
    with pytest.raises(StorageError, match="once the checkpoint"):
        log.append(make_batch(1), leader_epoch=0)
    monkeypatch.setattr(log_module, "_write_checkpoints", real_write)
    assert await log.checkpoint()
    assert "recovery_point 2" in (log.directory / OFFSETS_CHECKPOINT).read_text()
    assert log.append(make_batch(1), leader_epoch=0).first_offset == 2


# -- high watermark, checkpoints, reopen ----------------------------------------------------


async def test_checkpoints_survive_reopen_and_are_clamped(
    open_log: OpenLog, make_batch: MakeBatch, clock: ManualClock
) -> None:
    log = open_log(segment_bytes=300)
    for epoch in (1, 2, 2, 3):
        log.append(make_batch(3), leader_epoch=epoch)
    assert log.update_high_watermark(100) == 12  # clamped to the log end
    log.update_high_watermark(9)
    await log.flush()
    assert log.recovery_point == 12
    assert await log.checkpoint()
    assert not await log.checkpoint()  # unchanged: not rewritten
    log.close()
    reopened = PartitionLog.open(log.directory, log.config, clock)
    assert (reopened.high_watermark, reopened.recovery_point, reopened.log_end_offset) == (
        9,
        12,
        12,
    )
    assert reopened.leader_epoch_cache.entries() == log.leader_epoch_cache.entries()
    reopened.close()
    # Lose the tail on disk: the checkpointed values are clamped to what is left.
    last = max(reopened.directory.glob("*.log"))
    os.truncate(last, last.stat().st_size - 1)
    again = PartitionLog.open(log.directory, log.config, clock)
    assert again.log_end_offset == 9
    assert (again.high_watermark, again.recovery_point) == (9, 9)
    assert [(e.epoch, e.start_offset) for e in again.leader_epoch_cache.entries()] == [
        (1, 0),
        (2, 3),
    ]
    again.close()


def test_damaged_checkpoints_mean_full_recovery_not_failure(
    open_log: OpenLog, make_batch: MakeBatch, clock: ManualClock
) -> None:
    log = open_log()
    log.append(make_batch(2), leader_epoch=4)
    log.close()
    (log.directory / OFFSETS_CHECKPOINT).write_text("garbage")
    (log.directory / LEADER_EPOCH_CHECKPOINT).write_text("0\n5\n")
    (log.directory / (OFFSETS_CHECKPOINT + ".tmp")).write_text("half written")
    reopened = PartitionLog.open(log.directory, log.config, clock)
    assert reopened.log_end_offset == 2
    assert reopened.recovery_point == 0
    assert reopened.leader_epoch_cache.entries() == [(4, 0)]  # re-derived from the batches
    assert not (log.directory / (OFFSETS_CHECKPOINT + ".tmp")).exists()
    reopened.close()


# -- flush ----------------------------------------------------------------------------------


async def test_recovery_point_moves_only_on_flush(open_log: OpenLog, make_batch: MakeBatch) -> None:
    log = open_log()
    log.append(make_batch(5), leader_epoch=0)
    assert log.recovery_point == 0
    assert log.unflushed_messages == 5
    await log.flush()
    assert log.recovery_point == 5
    assert not log.needs_flush


async def test_flush_messages_one_fsyncs_every_append(
    open_log: OpenLog, make_batch: MakeBatch
) -> None:
    log = open_log(flush_messages=1)
    for i in range(3):
        log.append(make_batch(2), leader_epoch=0)
        assert await log.maybe_flush()
        assert log.recovery_point == 2 * (i + 1)


async def test_flush_ms_interval(
    open_log: OpenLog, make_batch: MakeBatch, autojump_clock: trio.testing.MockClock
) -> None:
    log = open_log(flush_ms=1000)
    log.append(make_batch(1), leader_epoch=0)
    assert not await log.maybe_flush()  # first look starts the interval
    await trio.sleep(0.999)
    assert not await log.maybe_flush()
    await trio.sleep(0.001)
    assert await log.maybe_flush()
    assert log.recovery_point == 1
    assert not await log.maybe_flush()  # nothing new


async def test_flush_before_ack_follows_the_count_policy_not_the_interval(
    open_log: OpenLog,
    make_batch: MakeBatch,
    autojump_clock: trio.testing.MockClock,
    tmp_path: Path,
) -> None:
    """Requests wait for an fsync only under flush_messages or flush_ms=0; an elapsed
    interval is the background flusher's business."""
    interval = open_log(tmp_path / "a-0", flush_ms=1000)
    interval.append(make_batch(1), leader_epoch=0)
    assert not interval.flush_due(trio.current_time())  # the first look starts the interval
    await trio.sleep(5)
    assert interval.flush_due(trio.current_time())
    assert not interval.flush_before_ack
    counted = open_log(tmp_path / "b-0", flush_ms=60_000, flush_messages=3)
    counted.append(make_batch(2), leader_epoch=0)
    assert not counted.flush_before_ack
    counted.append(make_batch(1), leader_epoch=0)
    assert counted.flush_before_ack
    await counted.flush()
    assert not counted.flush_before_ack
    always = open_log(tmp_path / "c-0", flush_ms=0)
    await always.flush()  # the new directory and files
    assert not always.flush_before_ack
    always.append(make_batch(1), leader_epoch=0)
    assert always.flush_before_ack


# -- retention ------------------------------------------------------------------------------


def test_retention_by_bytes_keeps_the_active_segment(
    open_log: OpenLog, make_batch: MakeBatch
) -> None:
    log = open_log(segment_bytes=300, retention_bytes=700)
    for epoch in range(12):
        log.append(make_batch(2), leader_epoch=epoch)
    assert log.delete_old_segments() == 0  # nothing below the high watermark yet
    log.update_high_watermark(log.log_end_offset)
    deleted = log.delete_old_segments()
    assert deleted > 0
    # Kafka's rule: delete the oldest segment only while the rest still holds >= 700.
    assert log.size_in_bytes - log.segments[0].size < 700 <= log.size_in_bytes
    assert log.log_start_offset == log.segments[0].base_offset > 0
    assert log.leader_epoch_cache.entries()[0].start_offset == log.log_start_offset
    with pytest.raises(OffsetOutOfRangeError):
        log.read(0, 100)
    assert values(log, log.log_start_offset)[0] == f"value-{log.log_start_offset}".encode()
    assert not list(log.directory.glob("*.deleted"))


def test_retention_by_time(open_log: OpenLog, make_batch: MakeBatch, clock: ManualClock) -> None:
    log = open_log(segment_bytes=300, retention_ms=10_000)
    for _ in range(4):
        log.append(make_batch(2), leader_epoch=0)
    old_segments = len(log.segments)
    clock.advance(5_000)
    for _ in range(4):
        log.append(make_batch(2), leader_epoch=0)
    log.update_high_watermark(log.log_end_offset)
    clock.advance(5_001)  # the first batches are now 10_001 ms old, the rest 5_001
    deleted = log.delete_old_segments()
    assert 0 < deleted <= old_segments
    assert log.log_start_offset <= 8
    clock.advance(10_000)  # everything expired: the active segment is rolled, then deleted
    assert log.delete_old_segments() > 0
    assert (log.log_start_offset, log.log_end_offset) == (16, 16)
    assert len(log.segments) == 1
    assert log.append(make_batch(1), leader_epoch=0).first_offset == 16
