"""LogSegment: files, appends, reads, index rebuild, truncation, refcounted deletion."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from storage_testing import MakeBatch

import dlog.storage.segment
from dlog.errors import StorageIOError
from dlog.storage.batch import assign_offsets, iter_batch_headers, validate_batches
from dlog.storage.segment import (
    LogSegment,
    parse_segment_file_name,
    segment_file_name,
)

# The compiled build's classes cannot have methods patched; the pure build checks those.
COMPILED = (dlog.storage.segment.__file__ or "").endswith(".so")

BASE = 500


def new_segment(directory: Path, *, interval: int = 100) -> LogSegment:
    return LogSegment.create(
        directory, BASE, index_interval_bytes=interval, max_index_size=4096, created_ms=0
    )


def append(segment: LogSegment, batch: bytearray, next_offset: int) -> int:
    headers = validate_batches(batch, now_ms=None, max_timestamp_skew_ms=0, max_batch_bytes=1 << 20)
    end = assign_offsets(batch, headers, next_offset, 0)
    assert segment.append(batch, headers, next_offset, 0) == end
    return end


def fill(segment: LogSegment, make_batch: MakeBatch, count: int) -> list[bytearray]:
    written = []
    offset = BASE
    for i in range(count):
        batch = make_batch(i % 4 + 1)
        offset = append(segment, batch, offset)
        written.append(batch)
    return written


def test_file_names() -> None:
    assert segment_file_name(42, ".log") == "00000000000000000042.log"
    assert parse_segment_file_name("00000000000000000042.timeindex") == (42, ".timeindex")
    assert parse_segment_file_name("00000000000000000042.log.deleted") is None
    assert parse_segment_file_name("42.log") is None
    assert parse_segment_file_name("0000000000000000004x.log") is None


def test_append_goes_straight_to_the_file(tmp_path: Path, make_batch: MakeBatch) -> None:
    segment = new_segment(tmp_path)
    written = fill(segment, make_batch, 3)
    data = b"".join(written)
    # Visible through a separate descriptor at once: nothing buffered in Python.
    assert (tmp_path / "00000000000000000500.log").read_bytes() == data
    assert segment.size == len(data)
    assert segment.next_offset == BASE + 1 + 2 + 3
    assert segment.read_bytes(0, segment.size) == data
    segment.close()


def test_index_pages_get_disk_blocks_before_use_so_a_full_disk_is_an_error(
    tmp_path: Path, make_batch: MakeBatch, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Index files are preallocated sparse and written through mmap: a store to a page
    without disk blocks on a full disk is SIGBUS, which kills the process. Blocks are
    allocated ahead instead, and when that fails the append is a StorageError with
    nothing written."""
    import dlog.storage.index as index_module

    segment = new_segment(tmp_path, interval=0)  # an index entry for every batch
    fill(segment, make_batch, 3)
    index_path = tmp_path / segment_file_name(BASE, ".index")
    assert os.stat(index_path).st_blocks > 0  # allocated, not sparse where written
    size, next_offset = segment.size, segment.next_offset
    entries = segment.offset_index.entries

    def no_space(fd: int, offset: int, length: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(index_module.os, "posix_fallocate", no_space)
    segment._index_room = 0  # as when the allocated part is used up
    segment.offset_index._backed = segment.offset_index.entries
    batch = make_batch(1)
    headers = validate_batches(batch, now_ms=None, max_timestamp_skew_ms=0, max_batch_bytes=1 << 20)
    assign_offsets(batch, headers, next_offset, 0)
    with pytest.raises(StorageIOError, match="cannot allocate index .*No space left"):
        segment.append(batch, headers, next_offset, 0)
    assert segment.size == size == os.path.getsize(tmp_path / segment_file_name(BASE, ".log"))
    assert segment.offset_index.entries == entries
    monkeypatch.undo()
    assert append(segment, batch, next_offset) == next_offset + 1
    segment.close()


def test_a_failed_write_is_a_storage_io_error_and_leaves_nothing(
    tmp_path: Path, make_batch: MakeBatch, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write the disk refuses part-way (a full disk after a short write) raises
    StorageIOError -- the disk's fault, which the broker reports -- and the segment is
    cut back to where it was: no torn batch is left behind to be served or recovered."""
    segment = new_segment(tmp_path)
    fill(segment, make_batch, 2)
    size, next_offset = segment.size, segment.next_offset
    log_path = tmp_path / segment_file_name(BASE, ".log")
    real_write = os.write
    calls = [0]

    def short_then_full(fd: int, data: bytes) -> int:
        calls[0] += 1
        if calls[0] == 1:
            return real_write(fd, bytes(data)[:10])  # a short write ...
        raise OSError(28, "No space left on device")  # ... then the disk is full

    batch = make_batch(3)
    headers = validate_batches(batch, now_ms=None, max_timestamp_skew_ms=0, max_batch_bytes=1 << 20)
    assign_offsets(batch, headers, next_offset, 0)
    monkeypatch.setattr(os, "write", short_then_full)
    with pytest.raises(StorageIOError, match="No space left"):
        segment.append(batch, headers, next_offset, 0)
    monkeypatch.undo()
    assert calls[0] == 2
    assert segment.size == size == os.path.getsize(log_path)
    assert segment.next_offset == next_offset
    assert append(segment, batch, next_offset) == next_offset + 3
    segment.close()


def test_translate_and_plan_read(tmp_path: Path, make_batch: MakeBatch) -> None:
    segment = new_segment(tmp_path, interval=50)
    written = fill(segment, make_batch, 40)
    headers = list(iter_batch_headers(b"".join(written)))
    assert segment.offset_index.entries > 5
    for header in headers:
        for offset in range(header.base_offset, header.last_offset + 1):
            found = segment.translate_offset(offset)
            assert found is not None
            assert (found.position, found.base_offset) == (header.position, header.base_offset)
    assert segment.translate_offset(headers[-1].next_offset) is None
    end = headers[-1].next_offset
    # One batch even when max_size is tiny; none when min_one_batch is off.
    plan = segment.plan_read(BASE, 1, end, end, min_one_batch=True)
    assert plan is not None
    assert (plan.position, plan.size, plan.next_offset) == (
        0,
        headers[0].size,
        headers[1].base_offset,
    )
    plan = segment.plan_read(BASE, 1, end, end, min_one_batch=False)
    assert plan is not None
    assert plan.size == 0
    # Cut at a batch boundary below max_size.
    limit = headers[10].position + headers[10].size // 2
    plan = segment.plan_read(BASE, limit, end, end, min_one_batch=True)
    assert plan is not None
    assert (plan.size, plan.next_offset) == (headers[10].position, headers[10].base_offset)
    # Bounded by max_offset: the batch holding it is left out.
    assert headers[21].record_count == 2
    bound = headers[21].base_offset + 1
    plan = segment.plan_read(headers[5].base_offset, 1 << 20, bound, end, min_one_batch=True)
    assert plan is not None
    assert plan.position == headers[5].position
    assert plan.position + plan.size == headers[21].position
    assert plan.next_offset == headers[21].base_offset
    segment.close()


def test_readers_at_the_end_find_the_next_batch_without_a_lookup(
    tmp_path: Path, make_batch: MakeBatch, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Caught-up readers (two followers, say) read to the end, then all fetch the next
    # offset once a batch is appended there: found without the index or a header walk.
    segment = new_segment(tmp_path)
    fill(segment, make_batch, 5)
    end, size = segment.next_offset, segment.size
    assert end is not None
    for _ in range(2):
        plan = segment.plan_read(BASE, 1 << 20, end, end, min_one_batch=True)
        assert plan is not None and (plan.size, plan.next_offset) == (size, end)
    batch = make_batch(3)
    new_end = append(segment, batch, end)

    def no_lookup(offset: int, start_position: int = 0) -> None:
        raise AssertionError("looked up instead of using the hint")

    with monkeypatch.context() as patched:
        if not COMPILED:
            patched.setattr(segment, "translate_offset", no_lookup)
        for _ in range(2):
            plan = segment.plan_read(end, 1 << 20, new_end, new_end, min_one_batch=True)
            assert plan is not None
            assert (plan.position, plan.size, plan.next_offset) == (size, len(batch), new_end)
    assert segment.read_bytes(size, len(batch)) == batch
    # Truncated away, the hint is gone with it.
    segment.truncate_to(end)
    assert segment.plan_read(end, 1 << 20, end, end, min_one_batch=True) is None
    segment.close()


def test_recover_rebuilds_the_same_indexes(tmp_path: Path, make_batch: MakeBatch) -> None:
    segment = new_segment(tmp_path, interval=60)
    fill(segment, make_batch, 50)
    offsets = [segment.offset_index.entry(i) for i in range(segment.offset_index.entries)]
    times = [segment.time_index.entry(i) for i in range(segment.time_index.entries)]
    assert offsets
    assert times
    segment.close()
    for suffix in (".index", ".timeindex"):
        (tmp_path / segment_file_name(BASE, suffix)).unlink()
    reopened = LogSegment(
        tmp_path, BASE, index_interval_bytes=60, max_index_size=4096, active=True, created_ms=0
    )
    assert reopened.offset_index.entries == 0
    assert reopened.recover() == 0
    assert [reopened.offset_index.entry(i) for i in range(reopened.offset_index.entries)] == offsets
    assert [reopened.time_index.entry(i) for i in range(reopened.time_index.entries)] == times
    reopened.close()


def test_recover_cuts_at_the_first_bad_byte(tmp_path: Path, make_batch: MakeBatch) -> None:
    segment = new_segment(tmp_path)
    written = fill(segment, make_batch, 5)
    segment.close()
    path = tmp_path / segment_file_name(BASE, ".log")
    data = bytearray(path.read_bytes())
    bad_at = len(written[0]) + len(written[1]) + 30
    data[bad_at] ^= 0x55
    path.write_bytes(bytes(data))
    reopened = LogSegment(
        tmp_path, BASE, index_interval_bytes=100, max_index_size=4096, active=True, created_ms=0
    )
    assert reopened.recover() == len(data) - len(written[0]) - len(written[1])
    assert path.read_bytes() == written[0] + written[1]
    assert reopened.next_offset == BASE + 1 + 2
    reopened.close()


def test_truncate_to(tmp_path: Path, make_batch: MakeBatch) -> None:
    segment = new_segment(tmp_path, interval=10)
    written = fill(segment, make_batch, 8)
    headers = list(iter_batch_headers(b"".join(written)))
    assert headers[5].record_count == 2
    target = headers[5].base_offset + 1  # inside batch 5: the whole batch goes
    removed = segment.truncate_to(target)
    assert removed == sum(len(b) for b in written[5:])
    assert segment.size == headers[5].position
    assert segment.next_offset == headers[5].base_offset
    assert segment.offset_index.last_entry().offset < headers[5].base_offset
    assert segment.truncate_to(headers[5].base_offset) == 0
    segment.close()


def test_deleted_segment_outlives_its_readers(tmp_path: Path, make_batch: MakeBatch) -> None:
    segment = new_segment(tmp_path)
    written = fill(segment, make_batch, 3)
    segment.acquire()  # a reader
    segment.delete()
    names = sorted(os.listdir(tmp_path))
    assert names == [
        "00000000000000000500.index.deleted",
        "00000000000000000500.log.deleted",
        "00000000000000000500.timeindex.deleted",
    ]
    # The reader can still read everything.
    assert segment.read_bytes(0, segment.size) == b"".join(written)
    segment.release()
    assert os.listdir(tmp_path) == []
    with pytest.raises(OSError):
        segment.read_bytes(0, 10)


def test_close_waits_for_readers(tmp_path: Path, make_batch: MakeBatch) -> None:
    segment = new_segment(tmp_path)
    fill(segment, make_batch, 2)
    segment.acquire()
    segment.close()
    assert segment.read_bytes(0, 10)  # still open for the reader
    segment.release()
    assert segment.refs == 0
    assert (tmp_path / "00000000000000000500.log").exists()
