"""PartitionLog: one partition's log on disk (Kafka's UnifiedLog + LocalLog).

Rules:

* The log is a directory of segments with contiguous offsets: every segment's first
  batch starts at its base offset, and each segment starts where the previous one
  ends. ``log_start_offset`` is the first segment's base offset, ``log_end_offset``
  (LEO) the offset the next batch gets.
* ``append`` (leader) validates *every* batch of the buffer before writing any, then
  writes baseOffset and partitionLeaderEpoch in place (outside the CRC) and hands
  the buffer to the kernel with one ``os.write``. An append is visible to readers
  as soon as it returns. ``append_as_follower`` writes the leader's batches as they
  are, checking that they continue at the LEO.
* Reads return whole batches, never past ``upper_bound``, at least one batch when
  one exists below it.
* Durability: ``flush`` fsyncs (fdatasync, in a worker thread) and only then advances the
  recovery point. ``open`` scans every segment from the one holding the recovery
  point, validating lengths, CRCs and offsets, and cuts the log at the first bad
  byte (later segments are deleted); indexes of scanned segments are rebuilt.
* Checkpoints (``partition-offsets-checkpoint``: high watermark, log start,
  recovery point; ``leader-epoch-checkpoint``) are written by ``checkpoint``, and
  at once by a truncation, before any further append, so a stale recovery point
  can never vouch for data written after a truncation.
* The leader-epoch cache is re-derived from the batches recovery scans, so its
  checkpoint only has to cover data below the checkpointed recovery point, which
  holds because ``checkpoint`` writes it before the offsets file.
* Retention deletes whole segments, oldest first, only below the high watermark,
  and rolls the active segment first if every segment is to go.
* Wall-clock time (timestamps, segment_ms, retention) comes from the injected
  :class:`~dlog.clock.WallClock`; durations (flush_ms) from ``trio.current_time()``.

Concurrency: everything runs in the owning trio thread except fsyncs and the preads
of :meth:`PartitionLog.read_async`, which pin the segments they touch.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, NamedTuple

import trio

from dlog.clock import WallClock
from dlog.errors import (
    CorruptRecordError,
    FencedLeaderEpochError,
    OffsetOutOfRangeError,
    StorageError,
    StorageIOError,
)
from dlog.storage.batch import (
    NO_TIMESTAMP,
    BatchHeader,
    Buffer,
    assign_offsets,
    iter_records,
    parse_batches,
    validate_produce,
)
from dlog.storage.checkpoint import (
    TMP_SUFFIX,
    CorruptCheckpointError,
    fsync_directory,
    parse_offset,
    read_checkpoint,
    write_checkpoint,
)
from dlog.storage.config import LogConfig
from dlog.storage.epoch_cache import EpochEntry, LeaderEpochCache
from dlog.storage.segment import (
    DELETED_SUFFIX,
    LOG_SUFFIX,
    SEGMENT_SUFFIXES,
    FlushToken,
    LogSegment,
    ReadPlan,
    parse_segment_file_name,
    segment_file_name,
)
from dlog.types import Epoch, Offset

logger = logging.getLogger(__name__)

OFFSETS_CHECKPOINT: Final = "partition-offsets-checkpoint"
LEADER_EPOCH_CHECKPOINT: Final = "leader-epoch-checkpoint"

#: ListOffsets' special timestamps (Kafka's numbers).
LATEST_TIMESTAMP: Final = -1
EARLIEST_TIMESTAMP: Final = -2


class UnexpectedAppendOffsetError(CorruptRecordError):
    """A follower append whose batches do not continue at the log end offset.

    details: ``first_offset``, ``log_end_offset``.
    """


#: Builds a NamedTuple from a tuple of its fields without a Python frame.
_new_tuple = tuple.__new__


class LogAppendInfo(NamedTuple):
    """What an append wrote. (A NamedTuple, not a frozen dataclass: it is built on
    every append, and a frozen dataclass costs microseconds to build.)"""

    first_offset: Offset
    last_offset: Offset
    max_timestamp: int
    batch_count: int
    record_count: int
    size: int


class FetchDataInfo(NamedTuple):
    """Whole batches read from the log, as one chunk per segment touched.

    ``next_offset`` is the offset just past the last batch returned (``fetch_offset``
    when nothing was). Send ``chunks`` one after another to avoid joining them;
    ``records`` joins them.
    """

    fetch_offset: Offset
    next_offset: Offset
    chunks: tuple[bytes, ...]

    @property
    def size(self) -> int:
        return sum(len(chunk) for chunk in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks

    @property
    def records(self) -> bytes:
        if len(self.chunks) == 1:
            return self.chunks[0]
        return b"".join(self.chunks)


@dataclass(frozen=True, slots=True, kw_only=True)
class TimestampAndOffset:
    """An answer of :meth:`PartitionLog.offset_for_timestamp`."""

    timestamp: int
    offset: Offset
    leader_epoch: Epoch | None


@dataclass(frozen=True, slots=True, kw_only=True)
class RecoveryReport:
    """What :meth:`PartitionLog.open` found and did."""

    recovered_segments: int
    truncated_bytes: int
    deleted_segments: int
    rebuilt_indexes: int


class PartitionLog:
    """One partition's log. Create with :meth:`open`; not thread-safe (one trio thread)."""

    def __init__(
        self,
        directory: Path,
        config: LogConfig,
        clock: WallClock,
        segments: list[LogSegment],
        *,
        recovery_point: int,
        high_watermark: int,
        epoch_cache: LeaderEpochCache,
        report: RecoveryReport,
    ) -> None:
        self.directory = directory
        self._config = config
        self._clock = clock
        self._segments = segments
        self._bases = [segment.base_offset for segment in segments]
        last = segments[-1]
        assert last.next_offset is not None
        self._next_offset = last.next_offset
        self._recovery_point = recovery_point
        self._high_watermark = high_watermark
        self._epoch_cache = epoch_cache
        self.recovery_report = report
        # Bumped by truncations: an in-flight threaded read or flush started before one
        # must not trust what it saw.
        self._generation = 0
        #: The generation the checkpoint on disk was written in. Behind _generation, a
        #: truncation's checkpoint is not written yet (its write failed): the one on
        #: disk may claim a recovery point above the log end, and appends there would
        #: be trusted unscanned after a crash. So appends wait until it is written.
        self._checkpointed_generation = 0
        #: Set when an fsync failed -- what was written may be lost whatever a later
        #: fsync says (the kernel may have dropped the dirty pages) -- or a truncation
        #: failed part-way (the files no longer match the log's view of them): the log
        #: takes no more writes, and the manager stops the node (as Kafka does when its
        #: log directory fails). ``_disk_failure`` says which ("fsync", "truncation").
        self._disk_error: StorageIOError | None = None
        self._disk_failure = ""
        self._truncating = False
        self._closed = False
        self._dir_seq = 1  # directory changes (files created, renamed) vs. fsynced
        self._dir_flushed_seq = 0
        self._flush_lock = trio.Lock()
        self._checkpoint_lock = trio.Lock()
        self._last_flush_time: float | None = None
        self._checkpointed: tuple[int, int, int] | None = None
        self._checkpointed_epochs = -1

    # ------------------------------------------------------------------------------------
    # Opening and recovery
    # ------------------------------------------------------------------------------------

    @classmethod
    def open(cls, directory: Path | str, config: LogConfig, clock: WallClock) -> PartitionLog:
        """Open (creating if needed) and recover the log in ``directory``.

        Blocking (it reads every segment above the recovery point): run it in a worker
        thread. Never fails on damaged data: a torn or corrupt tail, a garbage
        segment, an unreadable checkpoint all end in a shorter, valid log.
        """
        directory = Path(directory)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            return cls._open(directory, config, clock)
        except OSError as exc:
            raise StorageIOError(f"cannot open log {directory}: {exc}") from exc

    @classmethod
    def _open(cls, directory: Path, config: LogConfig, clock: WallClock) -> PartitionLog:
        bases: set[int] = set()
        index_files: list[tuple[int, Path]] = []
        for path in directory.iterdir():
            name = path.name
            if name.endswith(DELETED_SUFFIX) or name.endswith(TMP_SUFFIX):
                path.unlink(missing_ok=True)
                continue
            parsed = parse_segment_file_name(name)
            if parsed is None:
                continue
            base, suffix = parsed
            if suffix == LOG_SUFFIX:
                bases.add(base)
            else:
                index_files.append((base, path))
        for base, path in index_files:
            if base not in bases:
                path.unlink(missing_ok=True)

        high_watermark, log_start, recovery_point, epoch_entries = cls._read_checkpoints(directory)
        now_ms = clock.now_ms()

        def make_segment(base: int, *, active: bool) -> LogSegment:
            return LogSegment(
                directory,
                base,
                index_interval_bytes=config.index_interval_bytes,
                max_index_size=config.segment_index_bytes,
                active=active,
                created_ms=now_ms,
            )

        ordered = sorted(bases)
        segments: list[LogSegment] = []
        rebuilt = 0
        # Segments wholly below the recovery point are trusted (they were fsynced),
        # after a cheap look at their indexes and first batch.
        start = max(bisect.bisect_right(ordered, recovery_point) - 1, 0)
        for position, base in enumerate(ordered[:start]):
            segment = make_segment(base, active=False)
            if not segment.first_batch_is_valid():
                logger.warning(
                    "%s: segment %d is damaged below the recovery point", directory, base
                )
                segment.close()
                start = position
                break
            if not segment.sanity_check_indexes():
                segment.rebuild_indexes()
                segment.on_become_inactive()
                rebuilt += 1
            segments.append(segment)

        epoch_cache = LeaderEpochCache(epoch_entries)
        scan_from = ordered[start] if start < len(ordered) else log_start
        epoch_cache.truncate_from_end(scan_from)

        def on_batch(header: BatchHeader) -> None:
            epoch = header.partition_leader_epoch
            if epoch >= 0 and (
                epoch_cache.latest_epoch is None or epoch > epoch_cache.latest_epoch
            ):
                epoch_cache.assign(epoch, header.base_offset)

        truncated = 0
        deleted = 0
        recovered = 0
        expected: int | None = None
        remaining = ordered[start:]
        for position, base in enumerate(remaining):
            if expected is not None and base != expected:
                # A segment that does not continue the log: it and all after it go.
                deleted += _delete_files(directory, remaining[position:])
                break
            segment = make_segment(base, active=True)
            cut = segment.recover(on_batch=on_batch)
            recovered += 1
            if cut:
                logger.warning(
                    "%s: cut %d bytes of invalid data from segment %d at byte %d",
                    directory,
                    cut,
                    base,
                    segment.size,
                )
                truncated += cut
            segments.append(segment)
            expected = segment.next_offset
            if cut:
                deleted += _delete_files(directory, remaining[position + 1 :])
                break

        if not segments:
            segments.append(
                LogSegment.create(
                    directory,
                    log_start,
                    index_interval_bytes=config.index_interval_bytes,
                    max_index_size=config.segment_index_bytes,
                    created_ms=now_ms,
                )
            )
        for segment in segments[:-1]:
            if segment.offset_index.writable:
                segment.on_become_inactive()
        last = segments[-1]
        last.on_become_active()
        if last.next_offset is None:
            # Only trusted segments lack it, and the last one is always scanned.
            raise StorageError(f"{directory}: end of the last segment unknown")
        log_end = last.next_offset
        log_start = segments[0].base_offset
        recovery_point = min(max(recovery_point, log_start), log_end)
        high_watermark = min(max(high_watermark, log_start), log_end)
        epoch_cache.truncate_from_end(log_end)
        epoch_cache.truncate_from_start(log_start)
        report = RecoveryReport(
            recovered_segments=recovered,
            truncated_bytes=truncated,
            deleted_segments=deleted,
            rebuilt_indexes=rebuilt,
        )
        log = cls(
            directory,
            config,
            clock,
            segments,
            recovery_point=recovery_point,
            high_watermark=high_watermark,
            epoch_cache=epoch_cache,
            report=report,
        )
        logger.debug(
            "opened %s: offsets [%d, %d), hw %d, recovery point %d, %s",
            directory,
            log_start,
            log_end,
            high_watermark,
            recovery_point,
            report,
        )
        return log

    @staticmethod
    def _read_checkpoints(directory: Path) -> tuple[int, int, int, list[EpochEntry]]:
        """(high watermark, log start, recovery point, epoch entries), safe on damage."""
        high_watermark = log_start = recovery_point = 0
        offsets_path = directory / OFFSETS_CHECKPOINT
        try:
            entries = read_checkpoint(offsets_path, 2)
            if entries is not None:
                values = {key: parse_offset(offsets_path, value) for key, value in entries}
                high_watermark = values.get("high_watermark", 0)
                log_start = values.get("log_start_offset", 0)
                recovery_point = values.get("recovery_point", 0)
        except CorruptCheckpointError as exc:
            logger.warning("%s; recovering the whole log", exc)
            high_watermark = log_start = recovery_point = 0
        epoch_entries: list[EpochEntry] = []
        epochs_path = directory / LEADER_EPOCH_CHECKPOINT
        try:
            raw = read_checkpoint(epochs_path, 2)
            for epoch, start in raw or []:
                epoch_entries.append(
                    EpochEntry(
                        Epoch(parse_offset(epochs_path, epoch)),
                        Offset(parse_offset(epochs_path, start)),
                    )
                )
        except CorruptCheckpointError as exc:
            # Recovery re-derives epochs from the batches it scans: scan them all.
            logger.warning("%s; recovering the whole log to rebuild it", exc)
            epoch_entries = []
            recovery_point = 0
        return high_watermark, log_start, recovery_point, epoch_entries

    # ------------------------------------------------------------------------------------
    # State
    # ------------------------------------------------------------------------------------

    @property
    def config(self) -> LogConfig:
        return self._config

    def update_config(self, config: LogConfig) -> None:
        """Takes effect at the next append, roll, flush or retention pass."""
        self._config = config

    @property
    def log_start_offset(self) -> Offset:
        return Offset(self._bases[0])

    @property
    def log_end_offset(self) -> Offset:
        return Offset(self._next_offset)

    @property
    def high_watermark(self) -> Offset:
        return Offset(self._high_watermark)

    @property
    def recovery_point(self) -> Offset:
        return Offset(self._recovery_point)

    @property
    def latest_epoch(self) -> Epoch | None:
        return self._epoch_cache.latest_epoch

    @property
    def leader_epoch_cache(self) -> LeaderEpochCache:
        return self._epoch_cache

    @property
    def size_in_bytes(self) -> int:
        return sum(segment.size for segment in self._segments)

    @property
    def segments(self) -> tuple[LogSegment, ...]:
        """The live segments, oldest first (for inspection; do not modify)."""
        return tuple(self._segments)

    @property
    def active_segment(self) -> LogSegment:
        return self._segments[-1]

    @property
    def unflushed_messages(self) -> int:
        return self._next_offset - self._recovery_point

    @property
    def closed(self) -> bool:
        return self._closed

    def update_high_watermark(self, offset: int) -> Offset:
        """Set the high watermark, clamped to [log_start_offset, log_end_offset]."""
        self._high_watermark = min(max(offset, self._bases[0]), self._next_offset)
        return Offset(self._high_watermark)

    def end_offset_for_epoch(self, epoch: int) -> tuple[Epoch, Offset]:
        """OffsetsForLeaderEpoch: (epoch, end offset) as Kafka answers it."""
        return self._epoch_cache.end_offset_for(epoch, self._next_offset)

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError(f"log {self.directory} is closed")

    @property
    def disk_error(self) -> StorageIOError | None:
        """The disk failure that took this log offline, if any (see :attr:`disk_failure`)."""
        return self._disk_error

    @property
    def disk_failure(self) -> str:
        """What failed when the log went offline: "fsync" or "truncation" ("" if online)."""
        return self._disk_failure

    def _offline(self) -> StorageIOError:
        return StorageIOError(
            f"log {self.directory} is offline after a failed {self._disk_failure}"
            f" ({self._disk_error})"
        )

    def _go_offline(self, failure: str, error: StorageIOError) -> StorageIOError:
        if self._disk_error is None:
            self._disk_error = error
            self._disk_failure = failure
        return error

    def _check_appendable(self) -> None:
        self._check_open()
        if self._truncating:
            raise StorageError(f"log {self.directory} is being truncated")
        if self._disk_error is not None:
            raise self._offline()
        if self._checkpointed_generation != self._generation:
            raise StorageError(
                f"log {self.directory} takes appends again once the checkpoint of its"
                " truncation is written (the last attempt failed)"
            )

    # ------------------------------------------------------------------------------------
    # Appending
    # ------------------------------------------------------------------------------------

    def append(self, records: Buffer, leader_epoch: int) -> LogAppendInfo:
        """Leader path: validate, assign offsets in place, write. Returns what was written.

        ``records`` is one or more whole batches. Pass a ``bytearray`` (or a writable
        memoryview) to have offsets written into it without a copy. Nothing is
        written unless every batch is valid: raises :class:`CorruptRecordError`,
        :class:`InvalidTimestampError`, :class:`MessageTooLargeError`,
        :class:`UnsupportedCompressionTypeError`, :class:`InvalidRecordError`, or
        :class:`FencedLeaderEpochError` for an epoch older than the log's latest.
        """
        if (
            self._closed
            or self._truncating
            or self._checkpointed_generation != self._generation
            or self._disk_error is not None
        ):
            self._check_appendable()
        if leader_epoch < 0:
            raise ValueError(f"leader epoch must be >= 0, got {leader_epoch}")
        buf: bytearray | memoryview
        if type(records) is bytearray or (isinstance(records, memoryview) and not records.readonly):
            buf = records
        else:
            buf = bytearray(records)
        config = self._config
        now_ms = self._clock.now_ms()
        skew = config.max_timestamp_skew_ms
        headers = validate_produce(
            buf, now_ms if skew >= 0 else None, skew, config.max_message_bytes
        )
        latest = self._epoch_cache.latest_epoch
        if latest is not None and leader_epoch < latest:
            raise FencedLeaderEpochError(
                f"append with leader epoch {leader_epoch}, the log is at epoch {latest}",
                leader_epoch=leader_epoch,
                latest_epoch=latest,
            )
        first = self._next_offset
        assign_offsets(buf, headers, first, leader_epoch)
        info = self._write(buf, headers, first, now_ms)
        if latest != leader_epoch:
            self._epoch_cache.assign(leader_epoch, first)
        return info

    def append_as_follower(self, records: Buffer) -> LogAppendInfo:
        """Follower path: write the leader's batches as they are.

        Checks structure, CRC and that the batches continue exactly at the log end
        offset (:class:`UnexpectedAppendOffsetError` otherwise); records each new
        leader epoch in the epoch cache. Nothing is written unless all are valid.
        """
        self._check_appendable()
        headers = parse_batches(records)
        if not headers:
            raise CorruptRecordError("empty record set")
        expected = self._next_offset
        for header in headers:
            if header.base_offset != expected:
                raise UnexpectedAppendOffsetError(
                    f"batch at offset {header.base_offset} does not continue the log at {expected}",
                    first_offset=headers[0].base_offset,
                    log_end_offset=self._next_offset,
                )
            expected = header.next_offset
        info = self._write(records, headers, headers[0].base_offset, self._clock.now_ms())
        for header in headers:
            epoch = header.partition_leader_epoch
            latest = self._epoch_cache.latest_epoch
            if epoch >= 0 and (latest is None or epoch > latest):
                self._epoch_cache.assign(epoch, header.base_offset)
        return info

    def _write(
        self, buf: Buffer, headers: list[BatchHeader], first: int, now_ms: int
    ) -> LogAppendInfo:
        max_timestamp = NO_TIMESTAMP
        records = 0
        for header in headers:
            if header.max_timestamp > max_timestamp:
                max_timestamp = header.max_timestamp
            records += header.record_count
        last = first + records - 1  # offsets are contiguous: one per record
        size = len(buf)
        segment = self._segments[-1]
        if segment.size and segment.should_roll(
            size, len(headers), last, now_ms, self._config.segment_bytes, self._config.segment_ms
        ):
            segment = self.roll()
        self._next_offset = segment.append(buf, headers, first, now_ms)
        # (Positional, offsets as they are: a keyword NamedTuple call and two NewType
        # calls cost microseconds on every append.)
        info: LogAppendInfo = _new_tuple(
            LogAppendInfo, (first, last, max_timestamp, len(headers), records, size)
        )
        return info

    def _new_segment(self, base: int) -> LogSegment:
        """A new, empty, active segment at ``base`` (not yet one of the log's)."""
        return LogSegment.create(
            self.directory,
            base,
            index_interval_bytes=self._config.index_interval_bytes,
            max_index_size=self._config.segment_index_bytes,
            created_ms=self._clock.now_ms(),
        )

    def roll(self) -> LogSegment:
        """Start a new active segment at the log end offset (no-op if the active is empty)."""
        self._check_open()
        active = self._segments[-1]
        if active.is_empty:
            return active
        base = self._next_offset
        try:
            segment = self._new_segment(base)
        except OSError as exc:  # no room for the files, too many open files ...
            raise StorageIOError(f"{self.directory}: cannot roll to {base}: {exc}") from exc
        try:
            active.on_become_inactive()
        except OSError as exc:
            segment.close()  # its files are replaced by the next attempt's
            raise StorageIOError(f"{self.directory}: cannot roll to {base}: {exc}") from exc
        self._segments.append(segment)
        self._bases.append(base)
        self._dir_seq += 1
        logger.debug("%s: rolled segment %d", self.directory, base)
        return segment

    # ------------------------------------------------------------------------------------
    # Reading
    # ------------------------------------------------------------------------------------

    def _plan(
        self, offset: int, max_bytes: int, upper_bound: int | None, min_one_batch: bool
    ) -> tuple[int, list[tuple[LogSegment, ReadPlan]]]:
        """Check the offset and decide which bytes of which segments a read takes."""
        self._check_open()
        log_end = self._next_offset
        if offset < self._bases[0] or offset > log_end:
            raise OffsetOutOfRangeError(
                f"offset {offset} is outside the log [{self._bases[0]}, {log_end}]",
                log_start_offset=self._bases[0],
                log_end_offset=log_end,
            )
        bound = log_end if upper_bound is None else min(upper_bound, log_end)
        plans: list[tuple[LogSegment, ReadPlan]] = []
        if offset >= bound:
            return offset, plans
        index = bisect.bisect_right(self._bases, offset) - 1
        remaining = max_bytes
        position = offset
        next_offset = offset
        while index < len(self._segments) and position < bound:
            segment = self._segments[index]
            end_offset = self._bases[index + 1] if index + 1 < len(self._bases) else log_end
            plan = segment.plan_read(
                position,
                remaining,
                bound,
                end_offset,
                min_one_batch=min_one_batch and not plans,
            )
            if plan is None:
                index += 1
                continue
            if plan.size == 0:
                break
            plans.append((segment, plan))
            remaining -= plan.size
            position = next_offset = plan.next_offset
            if remaining <= 0 or plan.next_offset < end_offset:
                break
            index += 1
        return next_offset, plans

    def read(
        self,
        offset: int,
        max_bytes: int,
        upper_bound: int | None = None,
        *,
        min_one_batch: bool = True,
    ) -> FetchDataInfo:
        """Whole batches from the one holding ``offset``.

        At most ``max_bytes`` (but at least one whole batch when ``min_one_batch`` and
        one exists below the bound, as Kafka does), never a batch reaching
        ``upper_bound`` (default: the log end offset; consumers pass the high
        watermark). ``offset`` outside [log_start_offset, log_end_offset] raises
        :class:`OffsetOutOfRangeError` with both in its details; an offset in
        [upper_bound, log_end_offset] gives an empty result. Reads with ``os.pread``
        in the calling thread: see :meth:`read_async` for reads that may miss the
        page cache.
        """
        next_offset, plans = self._plan(offset, max_bytes, upper_bound, min_one_batch)
        chunks = tuple(segment.read_bytes(plan.position, plan.size) for segment, plan in plans)
        return FetchDataInfo(
            fetch_offset=Offset(offset), next_offset=Offset(next_offset), chunks=chunks
        )

    async def read_async(
        self,
        offset: int,
        max_bytes: int,
        upper_bound: int | None = None,
        *,
        min_one_batch: bool = True,
    ) -> FetchDataInfo:
        """:meth:`read` with the data preads in a worker thread.

        The segments read are pinned meanwhile, so retention cannot close them; if a
        truncation ran meanwhile, the read is redone. Cancellation waits for the
        worker thread's preads (they are short) and then raises.
        """
        generation = self._generation
        next_offset, plans = self._plan(offset, max_bytes, upper_bound, min_one_batch)
        if not plans:
            return FetchDataInfo(
                fetch_offset=Offset(offset), next_offset=Offset(next_offset), chunks=()
            )
        for segment, _ in plans:
            segment.acquire()
        try:
            chunks = await trio.to_thread.run_sync(
                lambda: tuple(
                    segment.read_bytes(plan.position, plan.size) for segment, plan in plans
                )
            )
        finally:
            for segment, _ in plans:
                segment.release()
        if generation != self._generation:
            return self.read(offset, max_bytes, upper_bound, min_one_batch=min_one_batch)
        return FetchDataInfo(
            fetch_offset=Offset(offset), next_offset=Offset(next_offset), chunks=chunks
        )

    def offset_for_timestamp(self, timestamp: int) -> TimestampAndOffset | None:
        """ListOffsets: the first record with timestamp >= ``timestamp``.

        :data:`EARLIEST_TIMESTAMP` (-2) gives the log start offset and
        :data:`LATEST_TIMESTAMP` (-1) the log end offset. None when no record is that
        new. Uses the time index to find the batch, then decodes that one batch (the
        one place this log looks inside a batch, and not on a produce or fetch path).
        """
        self._check_open()
        if timestamp == EARLIEST_TIMESTAMP:
            start = self._bases[0]
            return TimestampAndOffset(
                timestamp=NO_TIMESTAMP,
                offset=Offset(start),
                leader_epoch=self._epoch_cache.epoch_for_offset(start),
            )
        if timestamp == LATEST_TIMESTAMP:
            return TimestampAndOffset(
                timestamp=NO_TIMESTAMP,
                offset=Offset(self._next_offset),
                leader_epoch=self._epoch_cache.latest_epoch,
            )
        if timestamp < 0:
            raise ValueError(f"timestamp {timestamp} is neither >= 0, -1 nor -2")
        for segment in self._segments:
            if segment.max_timestamp_so_far < timestamp:
                continue
            header = segment.find_first_batch_at_or_after_timestamp(timestamp)
            while header is not None:
                data = segment.read_bytes(header.position, header.size)
                for record in iter_records(data):
                    if record.timestamp >= timestamp:
                        return TimestampAndOffset(
                            timestamp=record.timestamp,
                            offset=Offset(record.offset),
                            leader_epoch=Epoch(header.partition_leader_epoch),
                        )
                # The batch's maxTimestamp promised more than its records hold.
                header = segment.translate_offset(header.next_offset, header.position + header.size)
        return None

    # ------------------------------------------------------------------------------------
    # Truncation
    # ------------------------------------------------------------------------------------

    async def truncate_to(self, offset: int) -> bool:
        """Remove every record at or above ``offset`` (a follower's divergence repair).

        A batch holding ``offset`` is removed whole, so the log end offset may end up
        below ``offset``. Returns False if there was nothing to remove. Below the log
        start this becomes :meth:`truncate_fully_and_start_at`. The checkpoints are
        written before this returns, and appends are refused until they are; the
        write is shielded from cancellation.
        """
        self._check_appendable()
        if offset < 0:
            raise ValueError(f"cannot truncate to negative offset {offset}")
        if offset >= self._next_offset:
            return False
        if offset < self._bases[0]:
            await self.truncate_fully_and_start_at(offset)
            return True
        self._truncating = True
        try:
            self._generation += 1
            try:
                while len(self._segments) > 1 and self._bases[-1] > offset:
                    self._bases.pop()
                    self._segments.pop().delete()
                    self._dir_seq += 1
                segment = self._segments[-1]
                segment.truncate_to(offset)
                segment.on_become_active()
                self._next_offset = segment.ensure_next_offset()
            except (OSError, StorageIOError) as exc:
                raise self._truncation_failed(exc) from exc
            self._recovery_point = min(self._recovery_point, self._next_offset)
            self._high_watermark = min(self._high_watermark, self._next_offset)
            self._epoch_cache.truncate_from_end(self._next_offset)
            logger.info("%s: truncated to %d", self.directory, self._next_offset)
            with trio.CancelScope(shield=True):
                await self.checkpoint(force=True)
        finally:
            self._truncating = False
        return True

    def _truncation_failed(self, exc: OSError | StorageIOError) -> StorageIOError:
        """A truncation stopped part-way: the files may no longer match the log's view
        of them, so the log goes offline (see ``_disk_error``)."""
        detail = exc.message if isinstance(exc, StorageIOError) else str(exc)
        error = StorageIOError(f"truncating {self.directory} failed: {detail}")
        logger.error("%s; the log is offline", error.message)
        return self._go_offline("truncation", error)

    async def truncate_fully_and_start_at(self, offset: int) -> None:
        """Delete every segment and start empty at ``offset`` (a follower far behind)."""
        self._check_appendable()
        if offset < 0:
            raise ValueError(f"cannot start a log at negative offset {offset}")
        self._truncating = True
        try:
            self._generation += 1
            try:
                for segment in self._segments:
                    segment.delete()
                segment = self._new_segment(offset)
            except (OSError, StorageIOError) as exc:
                raise self._truncation_failed(exc) from exc
            self._segments = [segment]
            self._bases = [offset]
            self._dir_seq += 1
            self._next_offset = offset
            self._recovery_point = offset
            self._high_watermark = offset
            self._epoch_cache.clear()
            logger.info("%s: truncated fully, now starts at %d", self.directory, offset)
            with trio.CancelScope(shield=True):
                await self.checkpoint(force=True)
        finally:
            self._truncating = False

    # ------------------------------------------------------------------------------------
    # Retention
    # ------------------------------------------------------------------------------------

    def delete_old_segments(self) -> int:
        """Apply retention_ms then retention_bytes; returns how many segments went.

        Only segments wholly below the high watermark go; if that is every segment
        (the active one is expired too), the log rolls first, as Kafka does. The log
        start offset moves to the first remaining segment.
        """
        self._check_open()
        config = self._config
        deleted = 0
        if config.retention_ms >= 0:
            now = self._clock.now_ms()
            retention_ms = config.retention_ms
            deleted += self._delete_oldest(
                lambda segment: now - segment.largest_timestamp() > retention_ms
            )
        if config.retention_bytes >= 0:
            excess = self.size_in_bytes - config.retention_bytes

            def over_size(segment: LogSegment) -> bool:
                nonlocal excess
                if excess - segment.size >= 0:
                    excess -= segment.size
                    return True
                return False

            deleted += self._delete_oldest(over_size)
        return deleted

    def _delete_oldest(self, predicate: Callable[[LogSegment], bool]) -> int:
        doomed = 0
        for index, segment in enumerate(self._segments):
            last = index == len(self._segments) - 1
            if last and segment.is_empty:
                break
            upper = self._next_offset if last else self._bases[index + 1]
            if upper > self._high_watermark or not predicate(segment):
                break
            doomed += 1
        if not doomed:
            return 0
        if doomed == len(self._segments):
            self.roll()
        for _ in range(doomed):
            self._bases.pop(0)
            segment = self._segments.pop(0)
            segment.delete()
            logger.info("%s: retention deleted segment %d", self.directory, segment.base_offset)
        self._dir_seq += 1
        start = self._bases[0]
        self._epoch_cache.truncate_from_start(start)
        self._recovery_point = max(self._recovery_point, start)
        return doomed

    # ------------------------------------------------------------------------------------
    # Durability
    # ------------------------------------------------------------------------------------

    @property
    def needs_flush(self) -> bool:
        return (
            self._next_offset > self._recovery_point
            or self._dir_seq != self._dir_flushed_seq
            or any(segment.is_dirty for segment in self._segments)
        )

    def flush_due(self, now: float) -> bool:
        """Does the flush policy ask for an fsync at trio time ``now``?"""
        if not self.needs_flush:
            return False
        config = self._config
        if config.flush_messages > 0 and self.unflushed_messages >= config.flush_messages:
            return True
        if config.flush_ms < 0:
            return False
        if self._last_flush_time is None:
            self._last_flush_time = now
        # A microsecond of slack: periodic checks summing float sleeps land a hair
        # early, which would otherwise put the flush off by a whole check interval.
        return now - self._last_flush_time >= config.flush_ms / 1000 - 1e-6

    @property
    def flush_before_ack(self) -> bool:
        """Does the flush policy want what was written so far fsynced before it is
        acknowledged? True once ``flush_messages`` records are unflushed, or always
        with ``flush_ms=0``. An interval flush (``flush_ms``) is the background
        flusher's job (LogManager), not a request's: a produce or a follower fetch
        that waited for it would stall every acks=all producer once per interval."""
        if not self.needs_flush:
            return False
        config = self._config
        return config.flush_ms == 0 or (
            config.flush_messages > 0 and self.unflushed_messages >= config.flush_messages
        )

    async def maybe_flush(self) -> bool:
        """fsync if the flush policy says so (flush_messages, flush_ms). True if it did."""
        if self._closed or not self.flush_due(trio.current_time()):
            return False
        await self.flush()
        return True

    async def flush(self) -> None:
        """fsync everything written so far (in a worker thread), then advance the
        recovery point. Concurrent calls queue; a later one finding the work done
        returns at once (fsyncs are shared by everyone waiting). Cancellation waits
        for the fsync in progress, then raises.
        """
        async with self._flush_lock:
            if self._disk_error is not None:
                raise self._offline()
            if self._closed or not self.needs_flush:
                self._last_flush_time = trio.current_time()
                return
            target = self._next_offset
            generation = self._generation
            dir_seq = self._dir_seq
            dirty = [
                (segment, segment.begin_flush()) for segment in self._segments if segment.is_dirty
            ]
            sync_dir = dir_seq != self._dir_flushed_seq
            for segment, _ in dirty:
                segment.acquire()
            try:
                await trio.to_thread.run_sync(
                    _fsync_all,
                    dirty,
                    self.directory if sync_dir else None,
                )
            except StorageIOError as exc:
                self._go_offline("fsync", exc)
                raise
            finally:
                for segment, _ in dirty:
                    segment.release()
            for segment, token in dirty:
                segment.mark_flushed(token)
            self._dir_flushed_seq = max(self._dir_flushed_seq, dir_seq)
            if generation == self._generation:
                self._recovery_point = max(self._recovery_point, min(target, self._next_offset))
            self._last_flush_time = trio.current_time()

    async def checkpoint(self, *, force: bool = False) -> bool:
        """Write the checkpoint files if anything changed (or ``force``). True if written.

        The epoch cache goes first, then the offsets file; both atomically, in a
        worker thread. Writers are serialised, and each writes the values current when
        its turn comes, so the last file on disk is never older than the last call.
        Cancellation waits for a write in progress (a file is never half-replaced),
        then raises.
        """
        async with self._checkpoint_lock:
            generation = self._generation
            force = force or self._checkpointed_generation != generation
            if self._closed and not force:
                return False
            offsets = (self._high_watermark, self._bases[0], self._recovery_point)
            epochs_version = self._epoch_cache.version
            write_epochs = force or epochs_version != self._checkpointed_epochs
            if not write_epochs and not force and offsets == self._checkpointed:
                return False
            epoch_entries: list[tuple[int, int]] | None = (
                [(entry.epoch, entry.start_offset) for entry in self._epoch_cache.entries()]
                if write_epochs
                else None
            )
            await trio.to_thread.run_sync(
                _write_checkpoints, self.directory, offsets, epoch_entries
            )
            self._checkpointed = offsets
            self._checkpointed_epochs = epochs_version
            self._checkpointed_generation = max(self._checkpointed_generation, generation)
            return True

    # ------------------------------------------------------------------------------------
    # Closing
    # ------------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the files (trimming the active segment's indexes); no flush. Idempotent.

        Segments pinned by an in-flight read stay open until it releases them.
        """
        if self._closed:
            return
        self._closed = True
        for segment in self._segments:
            segment.close()

    async def close_when_idle(self) -> None:
        """Close once no flush or checkpoint is running (one in a worker thread finishes
        first), so deleting a log never pulls its directory from under an fsync."""
        async with self._flush_lock, self._checkpoint_lock:
            self.close()

    async def aclose(self) -> None:
        """Flush, checkpoint and close; closes even if the flush fails or is cancelled."""
        try:
            if not self._closed:
                await self.flush()
                await self.checkpoint()
        finally:
            self.close()

    def __repr__(self) -> str:
        return (
            f"PartitionLog({str(self.directory)!r}, log_start_offset={self._bases[0]},"
            f" log_end_offset={self._next_offset}, high_watermark={self._high_watermark})"
        )


def _delete_files(directory: Path, bases: list[int]) -> int:
    """Remove the files of segments recovery cut off (nothing reads them yet)."""
    for base in bases:
        for suffix in SEGMENT_SUFFIXES:
            (directory / segment_file_name(base, suffix)).unlink(missing_ok=True)
    return len(bases)


def _fsync_all(segments: list[tuple[LogSegment, FlushToken]], directory: Path | None) -> None:
    try:
        for segment, token in segments:
            segment.fsync(token)
        if directory is not None:
            fsync_directory(directory)
    except OSError as exc:
        raise StorageIOError(f"fsync failed: {exc}") from exc


def _write_checkpoints(
    directory: Path,
    offsets: tuple[int, int, int],
    epoch_entries: list[tuple[int, int]] | None,
) -> None:
    high_watermark, log_start, recovery_point = offsets
    try:
        if epoch_entries is not None:
            write_checkpoint(directory / LEADER_EPOCH_CHECKPOINT, epoch_entries)
        write_checkpoint(
            directory / OFFSETS_CHECKPOINT,
            [
                ("high_watermark", high_watermark),
                ("log_start_offset", log_start),
                ("recovery_point", recovery_point),
            ],
        )
    except OSError as exc:
        raise StorageIOError(f"writing checkpoints in {directory} failed: {exc}") from exc
