"""LogManager: every partition log under one data directory.

Layout::

    <data_dir>/.log-manager.lock        flock held while the manager runs
    <data_dir>/<topic>-<partition>/     one PartitionLog
        partition.metadata              "version: 0" / "topic_id: <id>"
        00000000000000000000.log ...    segments and checkpoints (see log.py)
    <data_dir>/<topic>-<partition>.<uuid>-delete/   being removed (cut to 255 bytes)

Ownership: the manager owns every :class:`PartitionLog` it opens; callers use them
but never close them. :meth:`LogManager.run` owns the flush and retention tasks (in
its own nursery) and, when cancelled, flushes, checkpoints and closes every log in a
shielded ``finally`` bounded by ``shutdown_timeout_s``; the logs are closed even if
that time runs out. The manager knows nothing of brokers: topic ids are opaque
strings and configs arrive as :class:`LogConfig` values.
"""

from __future__ import annotations

import fcntl
import logging
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Final

import trio

from dlog.clock import WallClock
from dlog.errors import InvalidTopicError, StorageError, StorageIOError
from dlog.storage.checkpoint import TMP_SUFFIX, fsync_directory
from dlog.storage.config import LogConfig
from dlog.storage.log import PartitionLog

logger = logging.getLogger(__name__)

PARTITION_METADATA: Final = "partition.metadata"
DELETE_SUFFIX: Final = "-delete"
#: The longest file name most file systems take (names here are ASCII).
MAX_FILE_NAME_BYTES: Final = 255
#: Not ".lock": a broker locking its own data directory must not collide with this.
LOCK_FILE: Final = ".log-manager.lock"
#: Checkpoint write failures are logged at most this often.
_CHECKPOINT_ERROR_LOG_S: Final = 30.0

TopicPartition = tuple[str, int]


def partition_dir_name(topic: str, partition: int) -> str:
    return f"{topic}-{partition}"


def doomed_dir_name(name: str) -> str:
    """What directory ``name`` is renamed to before it is removed: unique, ending in
    DELETE_SUFFIX, and (as Kafka's) cut to fit a file name's 255 bytes, since a
    partition directory of the longest topic name alone takes up to 254."""
    suffix = f".{uuid.uuid4().hex}{DELETE_SUFFIX}"
    return name[: MAX_FILE_NAME_BYTES - len(suffix)] + suffix


def parse_partition_dir_name(name: str) -> TopicPartition | None:
    """(topic, partition) of ``<topic>-<partition>``, or None for anything else."""
    topic, sep, partition = name.rpartition("-")
    if not sep or not topic or not partition.isdigit() or partition != str(int(partition)):
        return None
    return topic, int(partition)


def validate_topic_name(topic: str) -> None:
    """Names that are safe as a directory component (Kafka's rules)."""
    if not topic or len(topic) > 249 or topic in (".", ".."):
        raise InvalidTopicError(f"invalid topic name {topic!r}", topic=topic)
    if not all(c.isascii() and (c.isalnum() or c in "._-") for c in topic):
        raise InvalidTopicError(
            f"topic {topic!r} may contain only ASCII letters, digits, '.', '_' and '-'",
            topic=topic,
        )


def read_partition_metadata(directory: Path) -> str | None:
    """The topic id in ``partition.metadata``, or None if missing or unreadable."""
    try:
        text = (directory / PARTITION_METADATA).read_text()
    except (OSError, UnicodeDecodeError):
        return None
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    if fields.get("version") != "0" or not fields.get("topic_id"):
        return None
    return fields["topic_id"]


def write_partition_metadata(directory: Path, topic_id: str) -> None:
    """Write ``partition.metadata`` atomically (blocking: fsyncs)."""
    path = directory / PARTITION_METADATA
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with open(tmp, "w") as file:
        file.write(f"version: 0\ntopic_id: {topic_id}\n")
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)
    fsync_directory(directory)


class LogManager:
    """Opens, creates, deletes, flushes and retains the partition logs of a node."""

    def __init__(
        self,
        data_dir: Path | str,
        clock: WallClock,
        default_config: LogConfig,
        *,
        flush_check_interval_ms: int = 100,
        checkpoint_interval_ms: int = 5000,
        retention_check_interval_ms: int = 300_000,
        shutdown_timeout_s: float = 10.0,
    ) -> None:
        for name, value in (
            ("flush_check_interval_ms", flush_check_interval_ms),
            ("checkpoint_interval_ms", checkpoint_interval_ms),
            ("retention_check_interval_ms", retention_check_interval_ms),
        ):
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        self.data_dir = Path(data_dir)
        self.clock = clock
        self.default_config = default_config
        self._flush_check_interval = flush_check_interval_ms / 1000
        self._checkpoint_interval = checkpoint_interval_ms / 1000
        self._retention_check_interval = retention_check_interval_ms / 1000
        self._shutdown_timeout = shutdown_timeout_s
        self._logs: dict[TopicPartition, PartitionLog] = {}
        self._topic_ids: dict[TopicPartition, str | None] = {}
        self._lock_fd = -1
        self._running = False
        self._lock = trio.Lock()  # serialises create/delete of partition directories
        # Checkpoint write failures not yet reported, and when the next report may go.
        self._checkpoint_failures = 0
        self._next_checkpoint_report = -math.inf

    # -- queries -------------------------------------------------------------------------

    def get(self, topic: str, partition: int) -> PartitionLog | None:
        return self._logs.get((topic, partition))

    def topic_id(self, topic: str, partition: int) -> str | None:
        return self._topic_ids.get((topic, partition))

    @property
    def logs(self) -> dict[TopicPartition, PartitionLog]:
        """The open logs (a copy)."""
        return dict(self._logs)

    @property
    def running(self) -> bool:
        return self._running

    # -- lifetime ------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Lock the data directory, open and recover every log, then flush and retain.

        Calls ``task_status.started()`` once every log is open, so
        ``await nursery.start(manager.run)`` returns a usable manager. Runs until
        cancelled; then flushes, checkpoints and closes every log (shielded, at most
        ``shutdown_timeout_s`` for the flushing; closing always happens) and unlocks.
        """
        if self._running:
            raise RuntimeError("LogManager.run is already running")
        await trio.to_thread.run_sync(self._lock_data_dir)
        self._running = True
        try:
            await self._load_logs()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._flush_loop)
                nursery.start_soon(self._retention_loop)
                task_status.started()
        finally:
            self._running = False
            with trio.CancelScope(shield=True):
                await self._shutdown()

    async def _shutdown(self) -> None:
        logs = list(self._logs.items())
        with trio.move_on_after(self._shutdown_timeout) as scope:
            for key, log in logs:
                try:
                    await log.flush()
                    await log.checkpoint()
                except StorageError:
                    logger.exception("flushing %s-%d on shutdown failed", *key)
        if scope.cancelled_caught:
            logger.warning("shutdown flush ran out of time; closing logs unflushed")
        for log in self._logs.values():
            log.close()
        self._logs.clear()
        self._topic_ids.clear()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1

    def _lock_data_dir(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise StorageError(f"{self.data_dir} is in use by another process: {exc}") from exc
        self._lock_fd = fd

    async def _load_logs(self) -> None:
        """Open every partition directory; remove ``*-delete`` leftovers."""
        for path in sorted(self.data_dir.iterdir()):
            if not path.is_dir():
                continue
            if path.name.endswith(DELETE_SUFFIX):
                await trio.to_thread.run_sync(shutil.rmtree, path, True)
                continue
            key = parse_partition_dir_name(path.name)
            if key is None:
                logger.warning("ignoring %s: not a <topic>-<partition> directory", path)
                continue
            try:
                log = await trio.to_thread.run_sync(
                    PartitionLog.open, path, self.default_config, self.clock
                )
            except StorageError:
                # One unreadable partition must not stop the node; it stays offline.
                logger.exception("could not open log %s", path)
                continue
            self._logs[key] = log
            self._topic_ids[key] = read_partition_metadata(path)

    # -- creating and deleting -----------------------------------------------------------

    def _check_running(self) -> None:
        if not self._running:
            raise StorageError("the log manager is not running")

    async def get_or_create(
        self,
        topic: str,
        partition: int,
        topic_id: str,
        config: LogConfig | None = None,
    ) -> PartitionLog:
        """The log of ``topic``-``partition``, created if missing.

        An existing directory is adopted only if its ``partition.metadata`` holds
        ``topic_id``; otherwise (a deleted-then-recreated topic, a missed delete, a
        half-created directory) it is renamed ``*-delete`` and removed, and a fresh
        log is created. ``config`` (default: the manager's) replaces the log's config.
        """
        self._check_running()
        validate_topic_name(topic)
        if partition < 0:
            raise ValueError(f"partition must be >= 0, got {partition}")
        if not topic_id or any(c.isspace() for c in topic_id):
            raise ValueError(f"topic id must be a non-empty word, got {topic_id!r}")
        config = config or self.default_config
        key = (topic, partition)
        async with self._lock:
            log = self._logs.get(key)
            if log is not None:
                if self._topic_ids.get(key) == topic_id:
                    log.update_config(config)
                    return log
                logger.warning(
                    "%s-%d has topic id %s on disk, %s was asked for: removing it",
                    topic,
                    partition,
                    self._topic_ids.get(key),
                    topic_id,
                )
                await self._remove(key)
            directory = self.data_dir / partition_dir_name(topic, partition)
            if directory.exists():
                # One that failed to open at start-up, or appeared since: retried if it
                # is this topic's (an error then propagates; its data is kept), removed
                # if it is not.
                if read_partition_metadata(directory) == topic_id:
                    log = await trio.to_thread.run_sync(
                        PartitionLog.open, directory, config, self.clock
                    )
                    return self._adopt(key, topic_id, log)
                await self._remove_directory(directory)
            log = await trio.to_thread.run_sync(self._create, directory, topic_id, config)
            return self._adopt(key, topic_id, log)

    def _adopt(self, key: TopicPartition, topic_id: str, log: PartitionLog) -> PartitionLog:
        """Take ownership of a log opened in a worker thread, unless shutdown began
        meanwhile (then it is closed, not leaked)."""
        if not self._running:
            log.close()
            raise StorageError("the log manager stopped while the log was being opened")
        self._logs[key] = log
        self._topic_ids[key] = topic_id
        return log

    def _create(self, directory: Path, topic_id: str, config: LogConfig) -> PartitionLog:
        try:
            directory.mkdir(parents=True)
            # The metadata goes first: a directory without it is never adopted.
            write_partition_metadata(directory, topic_id)
            log = PartitionLog.open(directory, config, self.clock)
            fsync_directory(self.data_dir)
            return log
        except OSError as exc:
            raise StorageIOError(f"cannot create log {directory}: {exc}") from exc

    async def delete(self, topic: str, partition: int) -> bool:
        """Close the log and remove its directory (renamed ``*-delete`` first).

        Returns False if there was no such log. Readers holding its segments keep
        reading what they have (unlinked files stay readable until closed).
        """
        self._check_running()
        async with self._lock:
            key = (topic, partition)
            if key not in self._logs:
                directory = self.data_dir / partition_dir_name(topic, partition)
                if directory.exists():
                    await self._remove_directory(directory)
                    return True
                return False
            await self._remove(key)
            return True

    async def _remove(self, key: TopicPartition) -> None:
        log = self._logs.pop(key)
        self._topic_ids.pop(key, None)
        await log.close_when_idle()
        await self._remove_directory(log.directory)

    async def _remove_directory(self, directory: Path) -> None:
        doomed = directory.with_name(doomed_dir_name(directory.name))

        def rename_and_remove() -> None:
            os.rename(directory, doomed)
            fsync_directory(self.data_dir)
            shutil.rmtree(doomed, ignore_errors=True)

        try:
            await trio.to_thread.run_sync(rename_and_remove)
        except OSError as exc:
            raise StorageIOError(f"cannot remove {directory}: {exc}") from exc

    # -- background work -----------------------------------------------------------------

    async def flush_all(self) -> None:
        """fsync every log that has unflushed data, then checkpoint every log."""
        for log in list(self._logs.values()):
            if not log.closed:
                await log.flush()
        await self.checkpoint_all()

    async def checkpoint_all(self) -> None:
        for log in list(self._logs.values()):
            if not log.closed:
                await log.checkpoint()

    async def _checkpoint_round(self) -> None:
        """The flusher's periodic checkpoint of every log. A checkpoint that cannot be
        written (a full disk) leaves the previous one in place, which is safe -- a
        restart recovers from an older checkpoint as after a crash, only scanning more
        -- so it is logged (a line per :data:`_CHECKPOINT_ERROR_LOG_S` at most) and
        tried again next round, and the other logs still get theirs."""
        failed = 0
        first: StorageError | None = None
        for log in list(self._logs.values()):
            if log.closed:
                continue
            try:
                await log.checkpoint()
            except StorageError as exc:
                failed += 1
                first = first or exc
        if first is None:
            return
        now = trio.current_time()
        self._checkpoint_failures += failed
        if now >= self._next_checkpoint_report:
            logger.error(
                "writing checkpoints failed %d times (the previous ones are kept; will retry): %s",
                self._checkpoint_failures,
                first,
            )
            self._checkpoint_failures = 0
            self._next_checkpoint_report = now + _CHECKPOINT_ERROR_LOG_S

    async def _flush_loop(self) -> None:
        """Apply each log's flush policy every ``flush_check_interval_ms``; checkpoint
        every ``checkpoint_interval_ms``. An fsync error ends the manager (and the
        node): a log that cannot be fsynced cannot promise durability. A checkpoint
        error does not (see :meth:`_checkpoint_round`)."""
        start = trio.current_time()
        ticks_per_checkpoint = max(1, round(self._checkpoint_interval / self._flush_check_interval))
        tick = 0
        while True:
            tick += 1
            # Deadlines from the tick count: no drift, and checkpoints land on a tick.
            await trio.sleep_until(start + tick * self._flush_check_interval)
            for log in list(self._logs.values()):
                if log.disk_error is not None:
                    # (Failed in a request's flush or a follower's truncation, say: the
                    # node stops all the same.)
                    what = log.disk_failure
                    logger.critical("%s: a %s failed; stopping", log.directory, what)
                    raise StorageIOError(f"{what} of {log.directory} failed: {log.disk_error}")
                if not log.closed:
                    await log.maybe_flush()
            if tick % ticks_per_checkpoint == 0:
                await self._checkpoint_round()

    async def _retention_loop(self) -> None:
        """Apply retention to every log every ``retention_check_interval_ms``."""
        while True:
            await trio.sleep(self._retention_check_interval)
            self.apply_retention()

    def apply_retention(self) -> int:
        """One retention pass over every log; returns how many segments went."""
        deleted = 0
        for key, log in list(self._logs.items()):
            if log.closed:
                continue
            try:
                deleted += log.delete_old_segments()
            except StorageError:
                logger.exception("retention on %s-%d failed", *key)
        return deleted
