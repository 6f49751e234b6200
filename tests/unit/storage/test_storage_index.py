"""Offset and time indexes: lookup, truncation, preallocation and trimming."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from dlog.errors import StorageError
from dlog.storage.index import OffsetIndex, OffsetPosition, TimeIndex, TimestampOffset

BASE = 1000


def offset_index(tmp_path: Path, *, writable: bool = True, size: int = 800) -> OffsetIndex:
    return OffsetIndex(tmp_path / "x.index", BASE, size, writable=writable)


def test_preallocated_then_trimmed(tmp_path: Path) -> None:
    index = offset_index(tmp_path, size=805)
    path = tmp_path / "x.index"
    assert path.stat().st_size == 800  # whole entries only
    assert index.max_entries == 100
    index.append(BASE + 3, 100)
    index.append(BASE + 9, 250)
    index.trim_to_valid_size()
    assert path.stat().st_size == 16
    assert not index.writable
    assert index.lookup(BASE + 5) == OffsetPosition(BASE + 3, 100)
    with pytest.raises(StorageError):
        index.append(BASE + 20, 400)
    index.make_writable()
    assert path.stat().st_size == 800
    index.append(BASE + 20, 400)
    index.close()
    assert path.stat().st_size == 24  # close trims
    reopened = offset_index(tmp_path, writable=False)
    assert reopened.entries == 3
    assert reopened.last_entry() == OffsetPosition(BASE + 20, 400)
    reopened.close()


def test_lookup_is_greatest_entry_at_or_below(tmp_path: Path) -> None:
    index = offset_index(tmp_path)
    entries = [(BASE + 10 * i + 5, 1000 * i + 1) for i in range(50)]
    for offset, position in entries:
        index.append(offset, position)
    assert index.lookup(BASE) == OffsetPosition(BASE, 0)  # before the first entry
    assert index.lookup(BASE + 4) == OffsetPosition(BASE, 0)
    for i, (offset, position) in enumerate(entries):
        assert index.lookup(offset) == OffsetPosition(offset, position)
        assert index.lookup(offset + 9) == OffsetPosition(offset, position)
        assert index.lookup_position(position + 999) == OffsetPosition(offset, position)
        if i:
            assert index.lookup(offset - 1) == OffsetPosition(*entries[i - 1])
    assert index.lookup_position(0) == OffsetPosition(BASE, 0)
    index.close()


def test_truncate_removes_entries_at_and_above(tmp_path: Path) -> None:
    index = offset_index(tmp_path)
    for i in range(1, 6):
        index.append(BASE + 10 * i, 100 * i)
    index.truncate_to(BASE + 30)
    assert index.entries == 2
    assert index.last_entry() == OffsetPosition(BASE + 20, 200)
    index.truncate_to(BASE + 21)
    assert index.entries == 2
    index.truncate_to(BASE)
    assert index.entries == 0
    index.append(BASE + 1, 1)  # appends work after truncation
    index.close()


def test_rejects_out_of_order_and_full(tmp_path: Path) -> None:
    index = offset_index(tmp_path, size=16)
    index.append(BASE + 1, 10)
    with pytest.raises(StorageError):
        index.append(BASE + 1, 20)
    with pytest.raises(StorageError):
        index.append(BASE + 2, 10)
    index.append(BASE + 2, 20)
    assert index.is_full
    with pytest.raises(StorageError):
        index.append(BASE + 3, 30)
    with pytest.raises(StorageError):
        index.append(BASE + (1 << 32), 40)
    index.close()


def test_sanity_check_spots_an_untrimmed_tail(tmp_path: Path) -> None:
    # A crash before trimming leaves the preallocated, zero-filled file behind.
    (tmp_path / "x.index").write_bytes(struct.pack(">II", 5, 100) + bytes(792))
    reopened = offset_index(tmp_path, writable=False)
    assert reopened.entries == 100
    assert not reopened.sanity_check(log_size=10_000)
    reopened.reset()
    reopened.append(BASE + 5, 100)
    reopened.trim_to_valid_size()
    assert reopened.sanity_check(log_size=10_000)
    assert not reopened.sanity_check(log_size=100)  # points past the end of the log
    reopened.close()


def test_time_index(tmp_path: Path) -> None:
    index = TimeIndex(tmp_path / "x.timeindex", BASE, 120, writable=True)
    assert index.max_entries == 10
    assert index.lookup(5) == TimestampOffset(-1, BASE)
    index.maybe_append(100, BASE + 1)
    index.maybe_append(100, BASE + 2)  # not newer: skipped
    index.maybe_append(90, BASE + 3)  # older: skipped
    index.maybe_append(200, BASE + 4)
    index.maybe_append(300, BASE + 9)
    assert index.entries == 3
    assert index.lookup(99) == TimestampOffset(-1, BASE)
    assert index.lookup(100) == TimestampOffset(100, BASE + 1)
    assert index.lookup(250) == TimestampOffset(200, BASE + 4)
    assert index.lookup(10**12) == TimestampOffset(300, BASE + 9)
    with pytest.raises(StorageError):
        index.maybe_append(400, BASE + 8)  # offsets may not go back
    index.truncate_to(BASE + 4)
    assert index.last_entry() == TimestampOffset(100, BASE + 1)
    assert index.sanity_check()
    index.close()
    assert (tmp_path / "x.timeindex").stat().st_size == 12


def test_time_index_full_final_entry_overwrites_last_slot(tmp_path: Path) -> None:
    index = TimeIndex(tmp_path / "x.timeindex", BASE, 24, writable=True)
    index.maybe_append(10, BASE + 1)
    index.maybe_append(20, BASE + 2)
    assert index.is_full
    with pytest.raises(StorageError):
        index.maybe_append(30, BASE + 3)
    index.maybe_append(30, BASE + 3, skip_full_check=True)
    assert [index.entry(i) for i in range(index.entries)] == [
        TimestampOffset(10, BASE + 1),
        TimestampOffset(30, BASE + 3),
    ]
    index.close()
