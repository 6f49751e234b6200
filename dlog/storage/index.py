"""Sparse, memory-mapped segment indexes: offset index and time index.

Both follow Kafka's OffsetIndex / TimeIndex:

* The offset index maps a batch's last offset (relative to the segment's base
  offset, u32) to the file position where the batch starts (u32): 8 bytes an entry.
  A lookup gives the greatest entry at or below the target; the caller scans batch
  headers forward from that position.
* The time index maps a timestamp (i64) to the relative offset (u32) of the batch
  that first reached it: 12 bytes an entry, timestamps strictly increasing.

Entries are added about once per ``index_interval_bytes`` of log. The active
segment's index file is preallocated to ``max_index_size`` (rounded down to whole
entries) and mmap'd writable; when the segment rolls or closes the file is trimmed to
its entries and mapped read-only. Indexes are a cache of the log: recovery rebuilds
them rather than trusting them, and :meth:`sanity_check` catches the common damage
(an untrimmed, zero-filled tail) of an index that recovery does not rebuild.

Not thread-safe; :meth:`fsync` alone may run in a worker thread while the owning
thread keeps appending (it touches only the file descriptor).
"""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path
from typing import ClassVar, Final, NamedTuple

from dlog.errors import StorageError, StorageIOError

MAX_RELATIVE_OFFSET: Final = 0xFFFFFFFF


class OffsetPosition(NamedTuple):
    offset: int
    position: int


class TimestampOffset(NamedTuple):
    timestamp: int
    offset: int


class _MmapIndex:
    """The file, mapping and entry count shared by both index kinds."""

    ENTRY: ClassVar[struct.Struct]

    def __init__(
        self, path: Path, base_offset: int, max_index_size: int, *, writable: bool
    ) -> None:
        self.path = path
        self.base_offset = base_offset
        self._entry_size = self.ENTRY.size
        self._max_index_size = max_index_size - max_index_size % self._entry_size
        if self._max_index_size < self._entry_size:
            raise ValueError(f"max_index_size {max_index_size} holds no entry")
        self._max_entries = self._max_index_size // self._entry_size
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
        self._fd = os.open(path, flags, 0o644)
        self._mm: mmap.mmap | None = None
        self._writable = False
        #: Bumped by every change to the file's bytes or size (what fsync must cover).
        self.modifications = 0
        try:
            length = os.fstat(self._fd).st_size
            # A file that is not whole entries is damaged past its last whole entry.
            self._entries = min(length, self._max_index_size) // self._entry_size
            #: Entries whose bytes have disk blocks (see back()); those written are.
            self._backed = self._entries
            self._last: tuple[int, ...] | None = None
            if writable:
                self._map_writable()
            else:
                self._map_read_only(length - length % self._entry_size)
        except BaseException:
            self._unmap()
            os.close(self._fd)
            raise

    # -- mapping -------------------------------------------------------------------------

    def _unmap(self) -> None:
        if self._mm is not None:
            self._mm.close()
            self._mm = None

    def _map_writable(self) -> None:
        self._unmap()
        os.ftruncate(self._fd, self._max_index_size)
        self.modifications += 1
        self._mm = mmap.mmap(self._fd, self._max_index_size, access=mmap.ACCESS_WRITE)
        self._writable = True

    def _map_read_only(self, length: int) -> None:
        self._unmap()
        if os.fstat(self._fd).st_size != length:
            os.ftruncate(self._fd, length)  # (frees the blocks past it)
            self.modifications += 1
        self._backed = min(self._backed, length // self._entry_size)
        self._mm = mmap.mmap(self._fd, length, access=mmap.ACCESS_READ) if length else None
        self._writable = False

    def back(self, entries: int) -> int:
        """Give the first ``entries`` entries disk blocks (and some more, so that this
        is rare); returns how many are backed now.

        The file is preallocated sparse, and a store through the mapping to a page
        without blocks on a full disk is SIGBUS: the process dies. Allocating ahead
        turns that into a StorageError here, before anything is written.
        """
        if entries > self._backed:
            want = min(self._max_entries, max(entries, self._backed + _BACK_AHEAD_ENTRIES))
            start = self._backed * self._entry_size
            try:
                os.posix_fallocate(self._fd, start, want * self._entry_size - start)
            except OSError as exc:
                raise StorageIOError(f"cannot allocate index {self.path.name}: {exc}") from exc
            self._backed = want
        return self._backed

    def make_writable(self) -> None:
        """Grow back to the preallocated size (the segment became active again)."""
        if not self._writable:
            self._map_writable()

    def trim_to_valid_size(self) -> None:
        """Shrink the file to its entries and map it read-only (on roll and close)."""
        self._map_read_only(self._entries * self._entry_size)

    # -- state ---------------------------------------------------------------------------

    @property
    def entries(self) -> int:
        return self._entries

    @property
    def writable(self) -> bool:
        return self._writable

    @property
    def max_entries(self) -> int:
        return self._max_entries

    @property
    def is_full(self) -> bool:
        return self._entries >= self._max_entries

    @property
    def size_in_bytes(self) -> int:
        return self._entries * self._entry_size

    def _entry(self, n: int) -> tuple[int, ...]:
        assert self._mm is not None
        return self.ENTRY.unpack_from(self._mm, n * self._entry_size)

    def _cannot_append(self, offset: int) -> StorageError:
        """Why an entry for ``offset`` cannot be added (for the caller to raise)."""
        if not self._writable or self._mm is None:
            return StorageError(f"index {self.path.name} is read-only")
        if self.is_full:
            return StorageError(f"index {self.path.name} is full ({self._entries} entries)")
        return StorageError(
            f"offset {offset} does not fit index {self.path.name} (base {self.base_offset})"
        )

    def reset(self) -> None:
        """Drop every entry (before a rebuild)."""
        self._entries = 0
        self._last = None
        # Cut to nothing first so the preallocated space reads as zeros again: a crash
        # mid-rebuild never leaves stale entries looking valid.
        self._unmap()
        os.ftruncate(self._fd, 0)
        self._backed = 0
        self._map_writable()

    def _truncate_entries(self, n: int) -> None:
        self._entries = n
        self._last = None

    def _last_fields(self) -> tuple[int, ...]:
        """The last entry's raw fields (cached: appends check against it)."""
        if self._last is None:
            self._last = self._entry(self._entries - 1)
        return self._last

    def fsync(self) -> None:
        os.fdatasync(self._fd)

    def rename(self, path: Path) -> None:
        os.rename(self.path, path)
        self.path = path

    def close(self, *, trim: bool = True) -> None:
        """Trim (if writable and asked to) and release the file; idempotent."""
        if self._fd < 0:
            return
        try:
            if self._writable and trim:
                self.trim_to_valid_size()
        finally:
            self._unmap()
            os.close(self._fd)
            self._fd = -1


#: Entries given disk blocks at a time beyond those needed (see _MmapIndex.back).
_BACK_AHEAD_ENTRIES: Final = 8192

_OFFSET_ENTRY: Final = struct.Struct(">II")
_TIME_ENTRY: Final = struct.Struct(">qI")


class OffsetIndex(_MmapIndex):
    """Relative last offset of a batch (u32) -> file position of the batch (u32)."""

    ENTRY = _OFFSET_ENTRY

    def append(self, offset: int, position: int, *, skip_when_full: bool = False) -> None:
        """Add an entry; offsets and positions must both increase.

        A full index raises, or with ``skip_when_full`` drops the entry (the segment
        rolls before it needs more).
        """
        relative = offset - self.base_offset
        entries = self._entries
        if entries >= self._max_entries and skip_when_full:
            return
        if entries:
            last = self._last if self._last is not None else self._last_fields()
            if relative <= last[0] or position <= last[1]:
                raise StorageError(
                    f"index {self.path.name}: entry ({offset}, {position}) after"
                    f" ({self.base_offset + last[0]}, {last[1]})"
                )
        mm = self._mm
        if (
            relative < 0
            or relative > MAX_RELATIVE_OFFSET
            or entries >= self._max_entries
            or mm is None
            or not self._writable
        ):
            raise self._cannot_append(offset)
        if entries >= self._backed:
            self.back(entries + 1)
        _OFFSET_ENTRY.pack_into(mm, entries * 8, relative, position)
        self._entries = entries + 1
        self._last = (relative, position)
        self.modifications += 1

    def entry(self, n: int) -> OffsetPosition:
        relative, position = self._entry(n)
        return OffsetPosition(self.base_offset + relative, position)

    def last_entry(self) -> OffsetPosition:
        if not self._entries:
            return OffsetPosition(self.base_offset, 0)
        relative, position = self._last_fields()
        return OffsetPosition(self.base_offset + relative, position)

    def lookup(self, target_offset: int) -> OffsetPosition:
        """Greatest entry with offset <= target, else (base_offset, 0)."""
        relative = target_offset - self.base_offset
        lo, hi = 0, self._entries - 1
        found = -1
        while lo <= hi:
            mid = (lo + hi) >> 1
            if self._entry(mid)[0] <= relative:
                found = mid
                lo = mid + 1
            else:
                hi = mid - 1
        if found < 0:
            return OffsetPosition(self.base_offset, 0)
        return self.entry(found)

    def lookup_position(self, position: int) -> OffsetPosition:
        """Greatest entry whose position is <= ``position``, else (base_offset, 0)."""
        lo, hi = 0, self._entries - 1
        found = -1
        while lo <= hi:
            mid = (lo + hi) >> 1
            if self._entry(mid)[1] <= position:
                found = mid
                lo = mid + 1
            else:
                hi = mid - 1
        if found < 0:
            return OffsetPosition(self.base_offset, 0)
        return self.entry(found)

    def truncate_to(self, offset: int) -> None:
        """Remove every entry with offset >= ``offset``."""
        relative = offset - self.base_offset
        lo, hi = 0, self._entries
        while lo < hi:
            mid = (lo + hi) >> 1
            if self._entry(mid)[0] < relative:
                lo = mid + 1
            else:
                hi = mid
        self._truncate_entries(lo)

    def sanity_check(self, log_size: int) -> bool:
        """Cheap checks for an index that recovery does not rebuild.

        Every real entry has relative offset >= 1 and position >= 1 (the first entry
        follows at least one batch), so a zero entry is an untrimmed tail.
        """
        if not self._entries:
            return True
        relative, position = self._entry(self._entries - 1)
        if relative == 0 or position == 0 or position >= log_size:
            return False
        if self._entries > 1:
            prev_relative, prev_position = self._entry(self._entries - 2)
            if prev_relative >= relative or prev_position >= position:
                return False
        return True


class TimeIndex(_MmapIndex):
    """Timestamp (i64) -> relative offset (u32) of the batch that reached it."""

    ENTRY = _TIME_ENTRY

    def entry(self, n: int) -> TimestampOffset:
        timestamp, relative = self._entry(n)
        return TimestampOffset(timestamp, self.base_offset + relative)

    def last_entry(self) -> TimestampOffset:
        if not self._entries:
            return TimestampOffset(-1, self.base_offset)
        timestamp, relative = self._last_fields()
        return TimestampOffset(timestamp, self.base_offset + relative)

    def maybe_append(
        self,
        timestamp: int,
        offset: int,
        *,
        skip_full_check: bool = False,
        skip_when_full: bool = False,
    ) -> None:
        """Add (timestamp, offset) if the timestamp is newer than the last entry's.

        When the index is full: ``skip_when_full`` drops the entry (the segment rolls
        soon); ``skip_full_check`` (on roll) overwrites the last slot, as Kafka does,
        so the last entry always holds the segment's max; otherwise it raises.
        """
        relative = offset - self.base_offset
        entries = self._entries
        if entries:
            last_timestamp, last_relative = (
                self._last if self._last is not None else self._last_fields()
            )
            if timestamp <= last_timestamp:
                return
            if relative < last_relative:
                raise StorageError(
                    f"time index {self.path.name}: offset {offset} before"
                    f" {self.base_offset + last_relative}"
                )
        if entries >= self._max_entries:
            if skip_when_full:
                return
            if not skip_full_check:
                raise StorageError(f"time index {self.path.name} is full")
            self._truncate_entries(entries - 1)
            entries -= 1
        mm = self._mm
        if relative < 0 or relative > MAX_RELATIVE_OFFSET or mm is None or not self._writable:
            raise self._cannot_append(offset)
        if entries >= self._backed:
            self.back(entries + 1)
        _TIME_ENTRY.pack_into(mm, entries * 12, timestamp, relative)
        self._entries = entries + 1
        self._last = (timestamp, relative)
        self.modifications += 1

    def lookup(self, target_timestamp: int) -> TimestampOffset:
        """Greatest entry with timestamp <= target, else (-1, base_offset)."""
        lo, hi = 0, self._entries - 1
        found = -1
        while lo <= hi:
            mid = (lo + hi) >> 1
            if self._entry(mid)[0] <= target_timestamp:
                found = mid
                lo = mid + 1
            else:
                hi = mid - 1
        if found < 0:
            return TimestampOffset(-1, self.base_offset)
        return self.entry(found)

    def truncate_to(self, offset: int) -> None:
        """Remove every entry with offset >= ``offset``."""
        relative = offset - self.base_offset
        lo, hi = 0, self._entries
        while lo < hi:
            mid = (lo + hi) >> 1
            if self._entry(mid)[1] < relative:
                lo = mid + 1
            else:
                hi = mid
        self._truncate_entries(lo)

    def sanity_check(self) -> bool:
        if not self._entries:
            return True
        timestamp, relative = self._entry(self._entries - 1)
        if timestamp == 0 and relative == 0:
            return False
        if self._entries > 1:
            prev_timestamp, prev_relative = self._entry(self._entries - 2)
            if prev_timestamp >= timestamp or prev_relative > relative:
                return False
        return True
