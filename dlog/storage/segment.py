"""One log segment: ``<base>.log`` + ``<base>.index`` + ``<base>.timeindex``.

File names are the segment's base offset, zero-padded to 20 digits, as Kafka names
them. Batches are appended with ``os.write`` on a descriptor opened with
``O_APPEND`` (no Python buffering: an append is in the kernel when it returns) and
read with ``os.pread``. Every segment's first batch starts at its base offset and
offsets are contiguous inside it, which recovery checks.

Reference counting: the owning log holds one reference; a reader or a flush that
works on the segment across an ``await`` takes another with :meth:`acquire` and
gives it back with :meth:`release`. Deleting a segment renames its files to
``*.deleted`` at once (so a restart removes them) and closes and unlinks them when
the last reference is released, so retention or truncation never pulls a file from
under a reader. Reference counts are touched only from the owning (trio) thread.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Final, NamedTuple

import crc32c

from dlog.errors import StorageError, StorageIOError
from dlog.storage.batch import (
    ATTRIBUTES_POS,
    HEADER_SIZE,
    HEADER_STRUCT,
    LOG_OVERHEAD,
    MAGIC,
    MIN_BATCH_LENGTH,
    BatchHeader,
)
from dlog.storage.index import MAX_RELATIVE_OFFSET, OffsetIndex, TimeIndex

logger = logging.getLogger(__name__)

LOG_SUFFIX: Final = ".log"
INDEX_SUFFIX: Final = ".index"
TIME_INDEX_SUFFIX: Final = ".timeindex"
DELETED_SUFFIX: Final = ".deleted"
SEGMENT_SUFFIXES: Final = (LOG_SUFFIX, INDEX_SUFFIX, TIME_INDEX_SUFFIX)

#: How much a header walk over trusted data reads at a time.
_WALK_WINDOW: Final = 8192
#: How much recovery reads at a time; a bigger batch is CRC-checked in pieces.
_RECOVERY_WINDOW: Final = 1 << 20


def segment_file_name(base_offset: int, suffix: str) -> str:
    return f"{base_offset:020d}{suffix}"


def parse_segment_file_name(name: str) -> tuple[int, str] | None:
    """(base offset, suffix) of a segment file name, or None for anything else."""
    for suffix in SEGMENT_SUFFIXES:
        if name.endswith(suffix):
            stem = name[: -len(suffix)]
            if len(stem) == 20 and stem.isdigit():
                return int(stem), suffix
    return None


class FlushToken(NamedTuple):
    """Modification counts of a segment's three files when a flush started."""

    segment: int
    offset_index: int
    time_index: int


class ReadPlan(NamedTuple):
    """Whole batches a read takes from one segment: bytes [position, position + size)."""

    position: int
    size: int
    first_offset: int  # base offset of the first batch
    next_offset: int  # the offset just past the last batch taken


def _header_at(buf: bytes, off: int, position: int) -> BatchHeader:
    return BatchHeader._make((position, *HEADER_STRUCT.unpack_from(buf, off)))


def _pread_exact(fd: int, size: int, position: int) -> bytes:
    data = os.pread(fd, size, position)
    if len(data) == size or not data:
        return data
    parts = [data]
    got = len(data)
    while got < size:
        more = os.pread(fd, size - got, position + got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def scan_batches(
    fd: int,
    start: int,
    end: int,
    *,
    first_offset: int,
    verify_crc: bool,
) -> Iterator[BatchHeader]:
    """Yield the valid batches of a file region; stop silently at the first bad byte.

    Valid means: a whole header, a plausible length inside the region, magic 2,
    ``lastOffsetDelta == recordCount - 1``, a base offset continuing the previous
    batch (the first one at ``first_offset``) and, with ``verify_crc``, a matching
    CRC. This is recovery's definition of "the log ends here".
    """
    buf = b""
    buf_pos = start
    pos = start
    expected = first_offset
    while pos + HEADER_SIZE <= end:
        off = pos - buf_pos
        if off + HEADER_SIZE > len(buf):
            buf = os.pread(fd, min(_RECOVERY_WINDOW, end - pos), pos)
            buf_pos, off = pos, 0
            if len(buf) < HEADER_SIZE:
                return
        header = _header_at(buf, off, pos)
        size = header.batch_length + LOG_OVERHEAD
        if (
            header.batch_length < MIN_BATCH_LENGTH
            or pos + size > end
            or header.magic != MAGIC
            or header.record_count < 1
            or header.last_offset_delta != header.record_count - 1
            or header.base_offset != expected
        ):
            return
        if verify_crc:
            crc: int | None
            if off + size > len(buf) and size <= _RECOVERY_WINDOW:
                buf = os.pread(fd, min(_RECOVERY_WINDOW, end - pos), pos)
                buf_pos, off = pos, 0
            if off + size <= len(buf):
                with memoryview(buf) as view:
                    crc = crc32c.crc32c(view[off + ATTRIBUTES_POS : off + size])
            else:
                crc = _crc_in_pieces(fd, pos + ATTRIBUTES_POS, pos + size)
            if crc != header.crc:
                return
        yield header
        pos += size
        expected = header.base_offset + header.last_offset_delta + 1


def _crc_in_pieces(fd: int, start: int, end: int) -> int | None:
    crc = 0
    pos = start
    while pos < end:
        piece = os.pread(fd, min(_RECOVERY_WINDOW, end - pos), pos)
        if not piece:
            return None
        crc = crc32c.crc32c(piece, crc)
        pos += len(piece)
    return crc


class LogSegment:
    """A segment's files and what the log needs to know about them."""

    def __init__(
        self,
        directory: Path,
        base_offset: int,
        *,
        index_interval_bytes: int,
        max_index_size: int,
        active: bool,
        created_ms: int,
    ) -> None:
        self.directory = directory
        self.base_offset = base_offset
        self._index_interval_bytes = index_interval_bytes
        self.log_path = directory / segment_file_name(base_offset, LOG_SUFFIX)
        flags = os.O_RDWR | os.O_CREAT | os.O_APPEND | getattr(os, "O_CLOEXEC", 0)
        self._fd = os.open(self.log_path, flags, 0o644)
        index_path = directory / segment_file_name(base_offset, INDEX_SUFFIX)
        time_index_path = directory / segment_file_name(base_offset, TIME_INDEX_SUFFIX)
        #: Were both index files there to open (else they are new and empty)?
        self._indexes_existed = index_path.exists() and time_index_path.exists()
        try:
            self.size = os.fstat(self._fd).st_size
            self.offset_index = OffsetIndex(
                index_path,
                base_offset,
                max_index_size,
                writable=active,
            )
            try:
                self.time_index = TimeIndex(
                    time_index_path,
                    base_offset,
                    max_index_size,
                    writable=active,
                )
            except BaseException:
                self.offset_index.close()
                raise
        except BaseException:
            os.close(self._fd)
            raise
        last_time = self.time_index.last_entry()
        self.max_timestamp_so_far = last_time.timestamp
        self.offset_of_max_timestamp = last_time.offset
        #: When segment_ms counts from: the wall clock at the first append, or after a
        #: restart the first batch's timestamp (set by recover(); the time of the first
        #: append is not stored anywhere).
        self.rolling_based_timestamp = created_ms
        #: The offset after the last batch, when known (the active segment, and any
        #: segment recovery scanned); None for a trusted, unscanned segment.
        self.next_offset: int | None = base_offset if self.size == 0 else None
        self._bytes_since_last_index_entry = 0
        #: (offset, position) of a batch start the last read ended at; see plan_read.
        self._read_hint: tuple[int, int] | None = None
        #: (offset, position) of the last append's first batch: where readers that
        #: were caught up (followers, tailing consumers) all come next.
        self._tail_hint: tuple[int, int] | None = None
        #: Index entries the active segment's appends may add without allocating disk
        #: blocks first (a lower bound; 0 forces a check).
        self._index_room = 0
        self._refs = 1
        self._deleted = False
        self._closed = False
        # Modification counter vs. what the last fsync covered.
        self._dirty_seq = 0
        self._flushed = FlushToken(
            0, self.offset_index.modifications, self.time_index.modifications
        )

    @classmethod
    def create(
        cls,
        directory: Path,
        base_offset: int,
        *,
        index_interval_bytes: int,
        max_index_size: int,
        created_ms: int,
    ) -> LogSegment:
        """A new, empty, active segment (any stale files of that name are replaced)."""
        for suffix in SEGMENT_SUFFIXES:
            (directory / segment_file_name(base_offset, suffix)).unlink(missing_ok=True)
        return cls(
            directory,
            base_offset,
            index_interval_bytes=index_interval_bytes,
            max_index_size=max_index_size,
            active=True,
            created_ms=created_ms,
        )

    # -- state ---------------------------------------------------------------------------

    @property
    def is_empty(self) -> bool:
        return self.size == 0

    @property
    def is_dirty(self) -> bool:
        return self._dirty_seq != self._flushed.segment

    @property
    def refs(self) -> int:
        return self._refs

    @property
    def deleted(self) -> bool:
        return self._deleted

    def largest_timestamp(self) -> int:
        """Newest record timestamp, else the file's mtime (Kafka's rule for retention)."""
        if self.max_timestamp_so_far >= 0:
            return self.max_timestamp_so_far
        return os.fstat(self._fd).st_mtime_ns // 1_000_000

    def _mark_dirty(self) -> None:
        self._dirty_seq += 1

    # -- writing -------------------------------------------------------------------------

    def should_roll(
        self,
        size: int,
        batch_count: int,
        last_offset: int,
        now_ms: int,
        segment_bytes: int,
        segment_ms: int,
    ) -> bool:
        """Kafka's roll rule for an append of ``size`` bytes in ``batch_count`` batches:
        the segment would outgrow segment_bytes, is older than segment_ms (by the wall
        clock), an index could fill up, or ``last_offset`` would not fit the index's
        32-bit relative offsets. An empty segment never rolls."""
        if not self.size:
            return False
        return (
            self.size + size > segment_bytes
            or now_ms - self.rolling_based_timestamp > segment_ms
            or self.offset_index.entries + batch_count > self.offset_index.max_entries
            or self.time_index.entries + batch_count + 1 > self.time_index.max_entries
            or last_offset - self.base_offset > MAX_RELATIVE_OFFSET
        )

    def append(
        self,
        buf: bytes | bytearray | memoryview,
        headers: Sequence[BatchHeader],
        first_offset: int,
        now_ms: int,
    ) -> int:
        """Write whole, validated batches and index them; returns the next offset.

        ``headers`` are the batches' headers as parsed from ``buf`` (positions within
        it); their offsets run from ``first_offset`` (the leader assigned them in
        place after parsing). ``now_ms`` is the wall clock: a segment's age for
        segment_ms counts from its first append. Either all of ``buf`` reaches the
        kernel or, on an I/O error, the file is cut back to its previous size and
        :class:`StorageError` is raised.
        """
        start = self.size
        total = len(buf)
        # At most one index entry per batch: make sure the indexes can take them before
        # anything is written (a full disk fails here, not half-way).
        n = len(headers)
        if self._index_room < n:
            self._refill_index_room(n)
        self._index_room -= n
        try:
            written = os.write(self._fd, buf)  # one write takes it all, bar a short write
            if written < total:
                with memoryview(buf) as view:
                    while written < total:
                        written += os.write(self._fd, view[written:])
        except OSError as exc:
            try:
                os.ftruncate(self._fd, start)
            except OSError:
                logger.exception("could not cut %s back after a failed write", self.log_path)
            raise StorageIOError(f"write to {self.log_path} failed: {exc}") from exc
        if start == 0:
            # Kafka counts from the first batch's own timestamp; the broker's clock is
            # used here so that producers replaying old records cannot make every
            # append roll a new segment.
            self.rolling_based_timestamp = now_ms
        offset = first_offset
        # _index_batch inlined: this loop runs for every appended batch.
        interval = self._index_interval_bytes
        since = self._bytes_since_last_index_entry
        for header in headers:
            last = offset + header.last_offset_delta
            max_timestamp = header.max_timestamp
            if max_timestamp > self.max_timestamp_so_far:
                self.max_timestamp_so_far = max_timestamp
                self.offset_of_max_timestamp = last
            if since > interval:
                self.offset_index.append(last, start + header.position, skip_when_full=True)
                self.time_index.maybe_append(
                    self.max_timestamp_so_far, self.offset_of_max_timestamp, skip_when_full=True
                )
                since = 0
            since += header.batch_length + LOG_OVERHEAD
            offset = last + 1
        self._bytes_since_last_index_entry = since
        self.size = start + total
        self.next_offset = offset
        self._tail_hint = (first_offset, start)
        self._dirty_seq += 1
        return offset

    def _refill_index_room(self, n: int) -> None:
        """Give both indexes disk blocks for at least ``n`` more entries (StorageError
        if the disk has no room); remember how many they can take now."""
        oi, ti = self.offset_index, self.time_index
        oi_room = oi.back(oi.entries + n) - oi.entries
        ti_room = ti.back(ti.entries + n + 1) - ti.entries - 1  # (+1: the roll's entry)
        self._index_room = max(0, min(oi_room, ti_room))

    def _index_batch(self, position: int, size: int, last_offset: int, max_timestamp: int) -> None:
        """Track the max timestamp and add index entries every index_interval_bytes
        (Kafka's rule; :meth:`append` inlines it)."""
        if max_timestamp > self.max_timestamp_so_far:
            self.max_timestamp_so_far = max_timestamp
            self.offset_of_max_timestamp = last_offset
        if self._bytes_since_last_index_entry > self._index_interval_bytes:
            self.offset_index.append(last_offset, position, skip_when_full=True)
            self.time_index.maybe_append(
                self.max_timestamp_so_far, self.offset_of_max_timestamp, skip_when_full=True
            )
            self._bytes_since_last_index_entry = 0
        self._bytes_since_last_index_entry += size

    # -- reading -------------------------------------------------------------------------

    def read_bytes(self, position: int, size: int) -> bytes:
        """``os.pread`` of a byte range (short only if the file is shorter)."""
        return _pread_exact(self._fd, size, position)

    def _walk(self, position: int, end: int) -> Iterator[BatchHeader]:
        """Headers of the (trusted) batches from ``position`` until ``end``."""
        buf = b""
        buf_pos = position
        while position + HEADER_SIZE <= end:
            off = position - buf_pos
            if off + HEADER_SIZE > len(buf):
                buf = os.pread(self._fd, min(_WALK_WINDOW, end - position), position)
                buf_pos, off = position, 0
                if len(buf) < HEADER_SIZE:
                    return
            header = _header_at(buf, off, position)
            if header.batch_length < MIN_BATCH_LENGTH or header.magic != MAGIC:
                # Trusted data that is not a batch (a damaged index pointed here, or the
                # disk rotted): refuse rather than serve misaligned bytes.
                raise StorageError(f"{self.log_path}: no record batch at byte {position}")
            yield header
            position += header.batch_length + LOG_OVERHEAD

    def translate_offset(self, offset: int, start_position: int = 0) -> BatchHeader | None:
        """The first batch whose last offset is >= ``offset``, or None past the end."""
        entry = self.offset_index.lookup(offset)
        position = max(entry.position, start_position)
        for header in self._walk(position, self.size):
            if header.base_offset + header.last_offset_delta >= offset:
                return header
        return None

    def plan_read(
        self,
        offset: int,
        max_size: int,
        max_offset: int,
        end_offset: int,
        *,
        min_one_batch: bool,
    ) -> ReadPlan | None:
        """Which bytes a read starting at ``offset`` takes from this segment.

        Whole batches only, starting with the one holding ``offset``; only batches
        whose last offset is below ``max_offset``; at most ``max_size`` bytes unless
        ``min_one_batch`` and the first batch alone is bigger. ``end_offset`` is
        where this segment's offsets end (the next segment's base offset, or the log
        end offset). None when ``offset`` is past this segment's last batch.
        """
        located = self._locate(offset)
        if located is None:
            return None
        start, first_offset = located
        # Where the batches below max_offset end.
        bound_pos, bound_offset = self.size, end_offset
        if max_offset < end_offset:
            upper = self.translate_offset(max_offset, start)
            if upper is not None:
                bound_pos, bound_offset = upper.position, upper.base_offset
        if bound_pos <= start:  # the first batch already reaches max_offset
            return ReadPlan(start, 0, first_offset, first_offset)
        limit = start + max_size
        if limit >= bound_pos:
            plan = ReadPlan(start, bound_pos - start, first_offset, bound_offset)
        else:
            plan = self._cut(start, first_offset, limit, bound_pos, min_one_batch)
        if plan.size and plan.next_offset < end_offset:
            # Readers usually come back for the next offset: remember where it starts.
            self._read_hint = (plan.next_offset, plan.position + plan.size)
        return plan

    def _locate(self, offset: int) -> tuple[int, int] | None:
        """(position, base offset) of the batch holding ``offset``; None past the end."""
        hint = self._read_hint
        if hint is not None and hint[0] == offset:
            return hint[1], offset
        hint = self._tail_hint
        if hint is not None and hint[0] == offset:
            return hint[1], offset
        header = self.translate_offset(offset)
        if header is None:
            return None
        return header.position, header.base_offset

    def _cut(
        self, start: int, first_offset: int, limit: int, bound_pos: int, min_one_batch: bool
    ) -> ReadPlan:
        """Whole batches from ``start`` ending at or before ``limit`` (< ``bound_pos``).

        The offset index gives a batch boundary near the limit, so only about one
        index interval of headers is walked, whatever the read size.
        """
        end_pos = max(self.offset_index.lookup_position(limit).position, start)
        next_offset = first_offset
        for header in self._walk(end_pos, bound_pos):
            if header.position + header.size > limit:
                next_offset = header.base_offset
                break
            end_pos = header.position + header.size
            next_offset = header.next_offset
            if end_pos + HEADER_SIZE > limit:
                break  # no further batch can fit: do not read its header
        if end_pos > start:
            return ReadPlan(start, end_pos - start, first_offset, next_offset)
        if not min_one_batch:
            return ReadPlan(start, 0, first_offset, first_offset)
        first = next(self._walk(start, self.size))
        return ReadPlan(start, first.size, first_offset, first.next_offset)

    def find_first_batch_at_or_after_timestamp(self, timestamp: int) -> BatchHeader | None:
        """The first batch whose maxTimestamp is >= ``timestamp`` (via the time index)."""
        entry = self.time_index.lookup(timestamp)
        position = self.offset_index.lookup(entry.offset).position
        for header in self._walk(position, self.size):
            if header.max_timestamp >= timestamp:
                return header
        return None

    # -- recovery ------------------------------------------------------------------------

    def recover(self, *, on_batch: Callable[[BatchHeader], None] | None = None) -> int:
        """Validate every batch, rebuild both indexes, cut the file at the first bad byte.

        Returns the number of bytes cut off. ``on_batch`` sees each valid batch (the
        log re-derives leader epochs from them).
        """
        self.offset_index.reset()
        self.time_index.reset()
        self._index_room = 0
        self.max_timestamp_so_far = -1
        self.offset_of_max_timestamp = self.base_offset
        self._bytes_since_last_index_entry = 0
        self._read_hint = self._tail_hint = None
        file_size = os.fstat(self._fd).st_size
        valid_end = 0
        next_offset = self.base_offset
        for header in scan_batches(
            self._fd, 0, file_size, first_offset=self.base_offset, verify_crc=True
        ):
            if valid_end == 0 and header.max_timestamp >= 0:
                self.rolling_based_timestamp = header.max_timestamp
            self._index_batch(
                header.position, header.size, header.last_offset, header.max_timestamp
            )
            if on_batch is not None:
                on_batch(header)
            valid_end = header.position + header.size
            next_offset = header.next_offset
        truncated = file_size - valid_end
        if truncated:
            os.ftruncate(self._fd, valid_end)
            self._mark_dirty()
        self.size = valid_end
        self.next_offset = next_offset
        return truncated

    def first_batch_is_valid(self) -> bool:
        """Does the segment start with a whole, CRC-valid batch at its base offset?"""
        for _ in scan_batches(
            self._fd, 0, self.size, first_offset=self.base_offset, verify_crc=True
        ):
            return True
        return False

    def ensure_next_offset(self) -> int:
        """The offset after the last batch, walking the headers if it is not known."""
        if self.next_offset is None:
            next_offset = self.base_offset
            for header in self._walk(0, self.size):
                next_offset = header.next_offset
            self.next_offset = next_offset
        return self.next_offset

    def sanity_check_indexes(self) -> bool:
        """Can a trusted segment's indexes be used as they are?

        Cheap checks (Kafka's, plus one read): the files existed, their last entries
        are plausible, and the last offset entry points at a batch ending at its offset.
        """
        if not self._indexes_existed and self.size:
            return False
        if not (self.offset_index.sanity_check(self.size) and self.time_index.sanity_check()):
            return False
        if not self.offset_index.entries:
            return True
        last = self.offset_index.last_entry()
        buf = os.pread(self._fd, HEADER_SIZE, last.position)
        if len(buf) < HEADER_SIZE:
            return False
        header = _header_at(buf, 0, last.position)
        return header.magic == MAGIC and header.last_offset == last.offset

    def rebuild_indexes(self) -> None:
        """Rebuild both indexes from batch headers (no CRC: the data is trusted)."""
        self.offset_index.reset()
        self.time_index.reset()
        self._index_room = 0
        self.max_timestamp_so_far = -1
        self.offset_of_max_timestamp = self.base_offset
        self._bytes_since_last_index_entry = 0
        for header in scan_batches(
            self._fd, 0, self.size, first_offset=self.base_offset, verify_crc=False
        ):
            self._index_batch(
                header.position, header.size, header.last_offset, header.max_timestamp
            )
        self._mark_dirty()

    # -- truncation, roll ----------------------------------------------------------------

    def truncate_to(self, offset: int) -> int:
        """Remove every batch whose last offset is >= ``offset``; returns bytes removed.

        A batch holding ``offset`` goes whole, so the segment then ends at that
        batch's base offset (see :attr:`next_offset`).
        """
        header = self.translate_offset(offset)
        if header is None:
            return 0
        removed = self.size - header.position
        self._read_hint = self._tail_hint = None
        os.ftruncate(self._fd, header.position)
        self.size = header.position
        self.next_offset = header.base_offset
        self.offset_index.truncate_to(header.base_offset)
        self.time_index.truncate_to(header.base_offset)
        last_time = self.time_index.last_entry()
        self.max_timestamp_so_far = last_time.timestamp
        self.offset_of_max_timestamp = last_time.offset
        self._bytes_since_last_index_entry = 0
        self._mark_dirty()
        return removed

    def on_become_inactive(self) -> None:
        """On roll: make the time index's last entry the segment's max, trim both."""
        if self.max_timestamp_so_far >= 0 and self.time_index.max_entries:
            self.time_index.make_writable()
            self.time_index.maybe_append(
                self.max_timestamp_so_far, self.offset_of_max_timestamp, skip_full_check=True
            )
        self.offset_index.trim_to_valid_size()
        self.time_index.trim_to_valid_size()
        self._index_room = 0
        self._mark_dirty()

    def on_become_active(self) -> None:
        """Truncation made this the last segment again: indexes take appends again."""
        self.offset_index.make_writable()
        self.time_index.make_writable()
        self._index_room = 0

    # -- durability ----------------------------------------------------------------------

    def begin_flush(self) -> FlushToken:
        """What an fsync started now must cover (taken in the owning thread)."""
        return FlushToken(
            self._dirty_seq,
            self.offset_index.modifications,
            self.time_index.modifications,
        )

    def fsync(self, token: FlushToken) -> None:
        """fdatasync the log and whichever index changed since the last flush.

        May run in a worker thread (hold a reference meanwhile). fdatasync, not fsync:
        it still writes the file size and block maps, which is all reading needs.
        """
        os.fdatasync(self._fd)
        if token.offset_index != self._flushed.offset_index:
            self.offset_index.fsync()
        if token.time_index != self._flushed.time_index:
            self.time_index.fsync()

    def mark_flushed(self, token: FlushToken) -> None:
        """The fsync for ``token`` completed (back in the owning thread)."""
        if token.segment >= self._flushed.segment:
            self._flushed = token

    # -- lifetime ------------------------------------------------------------------------

    def acquire(self) -> None:
        if self._refs <= 0:
            raise StorageError(f"segment {self.log_path.name} is closed")
        self._refs += 1

    def release(self) -> None:
        self._refs -= 1
        if self._refs == 0:
            self._close_files()

    def close(self) -> None:
        """The log lets go of the segment (on shutdown); files close with the last ref."""
        if self._closed:
            return
        self._closed = True
        if self.time_index.writable and self.max_timestamp_so_far >= 0:
            self.time_index.maybe_append(
                self.max_timestamp_so_far, self.offset_of_max_timestamp, skip_full_check=True
            )
        self.release()

    def delete(self) -> None:
        """Rename the files ``*.deleted`` now; unlink them when the last ref goes."""
        if self._closed:
            return
        self._closed = True
        self._deleted = True
        try:
            os.rename(self.log_path, self.log_path.with_name(self.log_path.name + DELETED_SUFFIX))
            self.log_path = self.log_path.with_name(self.log_path.name + DELETED_SUFFIX)
            for index in (self.offset_index, self.time_index):
                index.rename(index.path.with_name(index.path.name + DELETED_SUFFIX))
        except OSError as exc:
            raise StorageIOError(f"could not delete segment {self.log_path}: {exc}") from exc
        finally:
            self.release()

    def _close_files(self) -> None:
        try:
            self.offset_index.close(trim=not self._deleted)
            self.time_index.close(trim=not self._deleted)
        finally:
            os.close(self._fd)
            self._fd = -1
        if self._deleted:
            for path in (self.log_path, self.offset_index.path, self.time_index.path):
                path.unlink(missing_ok=True)

    def __repr__(self) -> str:
        return f"LogSegment(base_offset={self.base_offset}, size={self.size}, refs={self._refs})"
