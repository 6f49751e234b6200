"""The consumer: positions per partition, pipelined long-poll fetches, lazy decoding.

Fetching: partitions are grouped by their leader; each leader gets one FetchRequest for
all of them, long-polling (``max_wait_ms``, ``min_bytes``), and the next request to a
leader leaves as soon as the previous one is answered, so a fetch is always in flight
while the application works through what came before. Raw batch bytes are buffered as
they arrived (no per-record work in the fetch path); a partition with
``4 * max_partition_fetch_bytes`` buffered, or a consumer with ``max_buffer_bytes``
buffered, is not fetched until the application catches up.

Decoding happens in :meth:`Consumer.getmany` (or the ``async for`` iterator), one
fetched chunk at a time: records below the position are skipped (a batch can start
before the offset asked for), so the application sees each offset once, in order per
partition.

Positions: :meth:`Consumer.position` is the offset of the next record the application
will get. It starts at the group's committed offset, else earliest
(``from_beginning``) or latest; it moves as records are handed out, or by
:meth:`seek`. OFFSET_OUT_OF_RANGE resets it by ``auto_offset_reset`` (``error``:
``getmany`` raises OffsetOutOfRangeError and the partition stops until a seek).
Leader moves are followed through the metadata cache (NOT_LEADER_OR_FOLLOWER,
FENCED_LEADER_EPOCH ...), with the leader epoch from the metadata sent in each fetch.
A leader that hangs instead of failing (a paused process answers nothing) is noticed
too: once a fetch is overdue the metadata is refreshed every second, and the fetch is
abandoned as soon as the metadata shows all its partitions led elsewhere.

Ownership and cancellation: :meth:`Consumer.run` owns the fetch loop and one task per
fetch or offset reset in flight. ``getmany`` and ``async for`` are cancel-safe: a
cancelled call hands out nothing and loses nothing. A group is an offsets namespace
only (no membership or rebalancing in this version).
"""

from __future__ import annotations

import logging
import math
import random
import struct
from collections import deque
from collections.abc import Iterable, Mapping

import trio

from dlog.client.backoff import Backoff
from dlog.client.config import ClientOptions, ConsumerConfig
from dlog.client.metadata import MetadataCache, TopicInfo
from dlog.client.records import ConsumerRecord, Records
from dlog.client.routing import Router
from dlog.client.watch import call_unless, led_elsewhere
from dlog.errors import (
    CorruptRecordError,
    DlogError,
    FencedLeaderEpochError,
    InvalidConfigError,
    LeaderNotAvailableError,
    NetworkError,
    NotLeaderError,
    OffsetOutOfRangeError,
    RequestTimedOutError,
    UnknownLeaderEpochError,
    UnknownTopicOrPartitionError,
    UnsupportedCompressionTypeError,
    error_from_wire,
)
from dlog.net.client import RpcPool
from dlog.net.messages import payload_bytes
from dlog.net.protocol import (
    EARLIEST_TIMESTAMP,
    LATEST_TIMESTAMP,
    FetchPartition,
    FetchRequest,
    FetchResponse,
    OffsetCommitPartition,
    OffsetCommitRequest,
    OffsetCommitResponse,
    OffsetFetchRequest,
    OffsetFetchResponse,
    TopicPartitionRef,
)
from dlog.storage.batch import (
    HEADER_SIZE,
    LAST_OFFSET_DELTA_POS,
    LOG_OVERHEAD,
    RecordRow,
    decode_rows,
)

log = logging.getLogger(__name__)

_OFFSET_AND_LENGTH = struct.Struct(">qi")
_I32 = struct.Struct(">i")

_LEADER_ERRORS = (
    NotLeaderError,
    UnknownTopicOrPartitionError,
    LeaderNotAvailableError,
    FencedLeaderEpochError,
    UnknownLeaderEpochError,
    NetworkError,
    RequestTimedOutError,
)
_RESET_TIMESTAMPS = {"earliest": EARLIEST_TIMESTAMP, "latest": LATEST_TIMESTAMP}


class _PartitionState:
    __slots__ = (
        "backoff",
        "backoff_until",
        "buffered",
        "error",
        "fetch_offset",
        "fetching",
        "generation",
        "high_watermark",
        "log_end_offset",
        "log_start_offset",
        "partition",
        "position",
        "reset_to",
        "resetting",
    )

    def __init__(self, partition: int, backoff: Backoff) -> None:
        self.partition = partition
        #: The next offset the application gets.
        self.position = 0
        #: The next offset to fetch (past what is buffered).
        self.fetch_offset = 0
        #: Bumped by every seek or reset: older chunks and fetch answers are dropped.
        self.generation = 0
        self.fetching = False
        #: A pending reset ("earliest"/"latest") and whether its ListOffsets is running.
        self.reset_to: str | None = None
        self.resetting = False
        self.buffered = 0
        self.backoff = backoff
        self.backoff_until = -math.inf
        #: An error that stops this partition until a seek (raised once by getmany).
        self.error: DlogError | None = None
        self.high_watermark: int | None = None
        self.log_start_offset: int | None = None
        self.log_end_offset: int | None = None


class _Chunk:
    """One partition's batches from one fetch answer, decoded when first read."""

    __slots__ = ("data", "generation", "index", "next_offset", "records", "size", "state")

    def __init__(
        self, state: _PartitionState, data: memoryview, next_offset: int, size: int
    ) -> None:
        self.state = state
        self.generation = state.generation
        self.data: memoryview | None = data
        self.next_offset = next_offset
        self.size = size
        self.records: list[RecordRow] | None = None
        self.index = 0


class Consumer:
    """Reads one topic's partitions. Make one with ``client.consumer(topic, ...)``.

    ``async for record in consumer`` yields :class:`ConsumerRecord` objects forever;
    ``await consumer.getmany(max_records=..., timeout_ms=...)`` returns what is there
    as ``{partition: Records}`` (the throughput path: a :class:`Records` sequence per
    partition, whose ``Record`` tuples are made as they are read).
    """

    def __init__(
        self,
        pool: RpcPool,
        metadata: MetadataCache,
        router: Router,
        topic: str,
        config: ConsumerConfig,
        *,
        options: ClientOptions,
        rng: random.Random,
    ) -> None:
        self.topic = topic
        self.config = config
        self._pool = pool
        self._metadata = metadata
        self._router = router
        self._options = options
        self._rng = rng
        self._states: dict[int, _PartitionState] = {}
        self._chunks: deque[_Chunk] = deque()
        self._buffered = 0
        self._partition_cap = 4 * config.max_partition_fetch_bytes
        self._nodes_fetching: set[int] = set()
        #: Errors to raise from getmany, each with its partition (a seek drops them).
        self._errors: deque[tuple[_PartitionState, DlogError]] = deque()
        self._data = trio.Event()
        self._wake = trio.Event()
        self._nursery: trio.Nursery | None = None

    # --- start ---------------------------------------------------------------------

    async def start(self) -> None:
        """Look up the topic and every partition's starting position.

        Waits up to ``default_api_timeout_ms`` for the topic to appear; raises
        UnknownTopicOrPartitionError for a topic or partition that does not exist.
        """
        info = await self._wait_for_topic()
        count = len(info.partitions)
        partitions = self.config.partitions
        if partitions is None:
            partitions = tuple(range(count))
        for p in partitions:
            if p >= count:
                raise UnknownTopicOrPartitionError(
                    f"topic {self.topic!r} has no partition {p} (it has {count})",
                    topic=self.topic,
                    partition=p,
                )
        self._states = {p: self._new_state(p) for p in sorted(partitions)}
        committed: dict[int, int] = {}
        if self.config.group is not None:
            committed = await self._fetch_committed(list(self._states))
        for p, offset in committed.items():
            if offset >= 0 and p in self._states:
                self._set_position(self._states[p], offset)
        fresh = [p for p in self._states if committed.get(p, -1) < 0]
        if fresh:
            where = "earliest" if self.config.from_beginning else "latest"
            await self._reset_now(fresh, where)

    def _new_state(self, partition: int) -> _PartitionState:
        opts = self._options
        backoff = Backoff(opts.retry_backoff_ms / 1000, opts.retry_backoff_max_ms / 1000, self._rng)
        return _PartitionState(partition, backoff)

    async def _wait_for_topic(self) -> TopicInfo:
        self._metadata.track(self.topic)
        budget = self._options.default_api_timeout_ms / 1000
        with trio.move_on_after(budget):
            while True:
                info = self._metadata.view.topics.get(self.topic)
                if info is not None and info.partitions:
                    return info
                try:
                    await self._metadata.refresh()
                except DlogError as exc:
                    if not exc.retriable:
                        raise
        if self.topic in self._metadata.view.missing:
            raise UnknownTopicOrPartitionError(
                f"topic {self.topic!r} does not exist (waited {budget:g}s)", topic=self.topic
            )
        raise RequestTimedOutError(f"no metadata for topic {self.topic!r} within {budget:g}s")

    # --- reading ----------------------------------------------------------------------

    async def getmany(
        self, max_records: int = 10_000, timeout_ms: float | None = None
    ) -> dict[int, Records]:
        """Up to ``max_records`` records as ``{partition: Records}``, each sequence in
        offset order; waits up to ``timeout_ms`` (None: until there are records) and
        returns ``{}`` if none came.

        ``Record`` is ``(offset, timestamp, key, value, headers)``. Positions move past
        what is returned. Raises a partition's error (OffsetOutOfRangeError with
        ``auto_offset_reset="error"``, CorruptRecordError, ...) once; that partition
        then stays stopped until :meth:`seek`. Cancel-safe.
        """
        if max_records < 1:
            raise ValueError("max_records must be at least 1")
        await trio.lowlevel.checkpoint()
        if not self._chunks and not self._errors:
            await self._wait_for_data(timeout_ms)
        return self._take(max_records)

    def __aiter__(self) -> Consumer:
        return self

    async def __anext__(self) -> ConsumerRecord:
        """The next record (waits as long as it takes; the iteration never ends).

        Yields to other tasks once per fetched chunk, not per record. Cancel-safe.
        """
        while True:
            chunks = self._chunks
            if chunks:
                head = chunks[0]
                records = head.records
                if records is not None and head.index < len(records):
                    record = records[head.index]
                    head.index += 1
                    state = head.state
                    state.position = record[0] + 1
                    if head.index >= len(records):
                        self._pop_chunk()
                        state.position = max(state.position, head.next_offset)
                    return ConsumerRecord(self.topic, state.partition, *record)
                # A new chunk: let the fetcher and the connections run first.
                await trio.lowlevel.checkpoint()
                if self._chunks or self._errors:
                    taken = self._take(1)
                    if taken:
                        ((partition, (record,)),) = taken.items()
                        return ConsumerRecord(self.topic, partition, *record)
                continue
            if self._errors:
                self._take(1)  # raises the error
            await self._wait_for_data(None)

    async def _wait_for_data(self, timeout_ms: float | None) -> None:
        deadline = math.inf if timeout_ms is None else trio.current_time() + timeout_ms / 1000
        while not self._chunks and not self._errors:
            # One event for every reader waiting now: a new one only once it was set
            # (replacing it per waiter would leave the earlier waiters unwoken).
            if self._data.is_set():
                self._data = trio.Event()
            data = self._data
            with trio.move_on_at(deadline):
                await data.wait()
            if trio.current_time() >= deadline:
                return

    def _take(self, max_records: int) -> dict[int, Records]:
        """Hand out up to ``max_records`` buffered records (no awaiting)."""
        if self._errors:
            raise self._errors.popleft()[1]
        out: dict[int, list[RecordRow]] = {}
        left = max_records
        chunks = self._chunks
        while left > 0 and chunks:
            chunk = chunks[0]
            state = chunk.state
            if chunk.generation != state.generation:
                self._pop_chunk()
                continue
            records = chunk.records
            if records is None:
                assert chunk.data is not None
                try:
                    records = decode_rows(chunk.data, min_offset=state.position)
                except (CorruptRecordError, UnsupportedCompressionTypeError) as exc:
                    self._pop_chunk()
                    self._stop_partition(state, exc)
                    if out:
                        break
                    raise self._errors.popleft()[1] from None
                chunk.records = records
                chunk.data = None
            i = chunk.index
            n = len(records)
            taken = records if i == 0 and n <= left else records[i : i + left]
            if taken:
                have = out.get(state.partition)
                if have is None:
                    out[state.partition] = taken
                else:
                    have.extend(taken)
                state.position = taken[-1][0] + 1
                left -= len(taken)
                chunk.index = i + len(taken)
            if chunk.index >= n:
                self._pop_chunk()
                state.position = max(state.position, chunk.next_offset)
        return {partition: Records(rows) for partition, rows in out.items()}

    def _pop_chunk(self) -> None:
        chunk = self._chunks.popleft()
        chunk.state.buffered -= chunk.size
        self._buffered -= chunk.size
        self._wake.set()

    # --- positions ------------------------------------------------------------------

    @property
    def assignment(self) -> tuple[int, ...]:
        """The partitions this consumer reads."""
        return tuple(self._states)

    def position(self, partition: int) -> int:
        """The offset of the next record the application will get from ``partition``."""
        return self._state(partition).position

    def highwater(self, partition: int) -> int | None:
        """The high watermark the last fetch of ``partition`` reported (None before one)."""
        return self._state(partition).high_watermark

    def seek(self, partition: int, offset: int) -> None:
        """Read ``partition`` from ``offset`` next; drops what was buffered for it.

        An offset outside the log is handled by ``auto_offset_reset`` on the next fetch.
        """
        if offset < 0:
            raise ValueError("offset must be >= 0 (use seek_to_beginning/seek_to_end)")
        self._set_position(self._state(partition), offset)
        self._wake.set()

    async def seek_to_beginning(self, *partitions: int) -> None:
        """Seek ``partitions`` (default: all) to their log start offset."""
        await self._reset_now(list(partitions or self._states), "earliest")

    async def seek_to_end(self, *partitions: int) -> None:
        """Seek ``partitions`` (default: all) to their high watermark."""
        await self._reset_now(list(partitions or self._states), "latest")

    async def commit(self, offsets: Mapping[int, int] | None = None) -> None:
        """Commit ``{partition: offset}`` (the next offset to read) for the group; by
        default every partition's current position. Retries coordinator moves;
        raises InvalidConfigError without a group. If cancelled, the commit may or
        may not have happened.
        """
        group = self._require_group()
        if offsets is None:
            offsets = {p: st.position for p, st in self._states.items()}
        if not offsets:
            return
        request = OffsetCommitRequest(
            group=group,
            partitions=[
                OffsetCommitPartition(topic=self.topic, partition=p, offset=o)
                for p, o in sorted(offsets.items())
            ],
        )
        await self._router.call_coordinator(
            group, request, OffsetCommitResponse, check=_commit_error
        )

    async def committed(self, partition: int) -> int | None:
        """The group's committed offset for ``partition`` (None when none)."""
        self._require_group()
        offset = (await self._fetch_committed([partition])).get(partition, -1)
        return None if offset < 0 else offset

    def _require_group(self) -> str:
        if self.config.group is None:
            raise InvalidConfigError("this consumer has no group: pass group=... to commit")
        return self.config.group

    def _state(self, partition: int) -> _PartitionState:
        state = self._states.get(partition)
        if state is None:
            raise UnknownTopicOrPartitionError(
                f"partition {partition} of {self.topic!r} is not assigned to this consumer"
                f" (assigned: {list(self._states)})",
                topic=self.topic,
                partition=partition,
            )
        return state

    def _set_position(self, state: _PartitionState, offset: int) -> None:
        self._restart(state)
        state.position = state.fetch_offset = offset
        state.reset_to = None
        state.error = None
        state.backoff_until = -math.inf
        if self._errors:
            # An error raised for the old position is no news for the new one.
            self._errors = deque(e for e in self._errors if e[0] is not state)

    def _restart(self, state: _PartitionState) -> None:
        """Forget what was fetched for ``state``: its buffered chunks go, and the
        answers of fetches and resets in flight are ignored (a new generation)."""
        state.generation += 1
        if state.buffered:
            kept = deque(c for c in self._chunks if c.state is not state)
            self._buffered -= state.buffered
            state.buffered = 0
            self._chunks = kept
            self._wake.set()

    async def _reset_now(self, partitions: Iterable[int], where: str) -> None:
        states = [self._state(p) for p in partitions]
        generations = [s.generation for s in states]
        timestamp = _RESET_TIMESTAMPS[where]
        results = await self._router.list_offsets(
            self.topic, {s.partition: timestamp for s in states}
        )
        for state, generation in zip(states, generations, strict=True):
            if state.generation == generation:
                self._set_position(state, results[state.partition].offset)
        self._wake.set()

    async def _fetch_committed(self, partitions: list[int]) -> dict[int, int]:
        group = self._require_group()
        request = OffsetFetchRequest(
            group=group,
            partitions=[TopicPartitionRef(topic=self.topic, partition=p) for p in partitions],
        )
        response = await self._router.call_coordinator(
            group, request, OffsetFetchResponse, check=_offset_fetch_error
        )
        return {
            r.partition: r.offset
            for r in response.partitions
            if r.topic == self.topic and r.partition in partitions
        }

    def _stop_partition(self, state: _PartitionState, exc: DlogError) -> None:
        """Stop ``state`` until a seek: ``exc`` is raised once, and nothing fetched for
        it after its position is handed out (its position stays where the error is)."""
        state.error = exc
        self._restart(state)
        self._errors.append((state, exc))
        self._data.set()

    # --- the fetcher -------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Fetch until cancelled (after :meth:`start`). Owns every fetch in flight."""
        self._metadata.add_listener(self._on_metadata)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self.config.auto_commit_interval_ms is not None:
                    nursery.start_soon(self._auto_commit_loop)
                task_status.started()
                while True:
                    self._wake = trio.Event()
                    next_at = self._dispatch(trio.current_time())
                    if next_at == math.inf:
                        await self._wake.wait()
                    else:
                        with trio.move_on_at(next_at):
                            await self._wake.wait()
        finally:
            self._metadata.remove_listener(self._on_metadata)

    def _on_metadata(self, _view: object) -> None:
        self._wake.set()

    async def _auto_commit_loop(self) -> None:
        assert self.config.auto_commit_interval_ms is not None
        interval = self.config.auto_commit_interval_ms / 1000
        while True:
            await trio.sleep(interval)
            try:
                await self.commit()
            except DlogError as exc:
                log.warning("auto-commit for group %r failed: %s", self.config.group, exc)

    def _dispatch(self, now: float) -> float:
        """Start fetches and resets that can go; returns when to look again."""
        view = self._metadata.view
        next_at = math.inf
        by_node: dict[int, list[_PartitionState]] = {}
        addresses: dict[int, str] = {}
        want_metadata = False
        room = self._buffered < self.config.max_buffer_bytes
        assert self._nursery is not None
        for state in self._states.values():
            if state.fetching or state.error is not None or state.resetting:
                continue
            if state.backoff_until > now:
                next_at = min(next_at, state.backoff_until)
                continue
            if state.reset_to is not None:
                state.resetting = True
                self._nursery.start_soon(self._reset_task, state, state.reset_to, state.generation)
                continue
            if not room or state.buffered >= self._partition_cap:
                continue
            leader = view.leader(self.topic, state.partition)
            if leader is None:
                want_metadata = True
                continue
            node, address = leader
            if node in self._nodes_fetching:
                continue
            by_node.setdefault(node, []).append(state)
            addresses[node] = address
        if want_metadata:
            self._metadata.request_refresh()
        for node, states in by_node.items():
            self._nodes_fetching.add(node)
            for state in states:
                state.fetching = True
            self._nursery.start_soon(self._fetch, node, addresses[node], states)
        return next_at

    async def _fetch(self, node: int, address: str, states: list[_PartitionState]) -> None:
        config = self.config
        view = self._metadata.view
        entries = []
        for state in states:
            info = view.partition(self.topic, state.partition)
            entries.append(
                FetchPartition(
                    topic=self.topic,
                    partition=state.partition,
                    fetch_offset=state.fetch_offset,
                    partition_max_bytes=config.max_partition_fetch_bytes,
                    current_leader_epoch=-1 if info is None else info.leader_epoch,
                )
            )
        sent = [(state, state.generation, state.fetch_offset) for state in states]
        request = FetchRequest(
            max_wait_ms=config.max_wait_ms,
            min_bytes=config.min_bytes,
            max_bytes=config.fetch_max_bytes,
            partitions=entries,
        )
        timeout = self._options.request_timeout_ms / 1000 + config.max_wait_ms / 1000
        response: FetchResponse | None = None
        error: DlogError | None = None
        try:
            response = await self._fetch_unless_moved(
                node, address, request, [state.partition for state in states], timeout
            )
        except DlogError as exc:
            error = exc
        finally:
            self._nodes_fetching.discard(node)
            for state in states:
                state.fetching = False
            self._wake.set()
        now = trio.current_time()
        if response is None:
            assert error is not None
            self._on_fetch_error(sent, error, now)
            return
        by_partition = {state.partition: (state, gen, offset) for state, gen, offset in sent}
        payload = memoryview(payload_bytes(response.payload))
        position = 0
        for result in response.partitions:
            size = result.size
            data = payload[position : position + size]
            position += size
            entry = by_partition.get(result.partition)
            if entry is None or result.topic != self.topic:
                continue
            state, generation, fetch_offset = entry
            if state.generation != generation:
                continue  # a seek or reset happened meanwhile
            if result.error_code:
                details = {}
                if result.leader is not None:
                    details = {"leader": result.leader, "leader_epoch": result.leader_epoch}
                failure = error_from_wire(result.error_code, result.error_message, details)
                self._on_partition_error(
                    state, failure, result.log_start_offset, result.log_end_offset, now
                )
                continue
            state.backoff.reset()
            state.high_watermark = result.high_watermark
            state.log_start_offset = result.log_start_offset
            state.log_end_offset = result.log_end_offset
            if not size:
                continue
            whole, next_offset = _whole_batches(data, fetch_offset)
            if not whole:
                self._stop_partition(
                    state,
                    CorruptRecordError(
                        f"fetch of {self.topic}-{state.partition} at {fetch_offset} returned"
                        f" {size} bytes without one whole record batch",
                        topic=self.topic,
                        partition=state.partition,
                        offset=fetch_offset,
                    ),
                )
                continue
            if next_offset <= fetch_offset:
                continue
            size = whole
            self._chunks.append(_Chunk(state, data[:whole], next_offset, size))
            state.fetch_offset = next_offset
            state.buffered += size
            self._buffered += size
            self._data.set()

    async def _fetch_unless_moved(
        self,
        node: int,
        address: str,
        request: FetchRequest,
        partitions: list[int],
        timeout: float,
    ) -> FetchResponse:
        """The broker's answer -- unless the metadata shows every partition of the fetch
        led elsewhere first (a leader that hangs, e.g. a paused process, answers nothing
        until the request timeout): then NotLeaderError, and the partitions are fetched
        from their new leaders (see :mod:`dlog.client.watch`)."""
        return await call_unless(
            self._pool,
            self._metadata,
            address,
            request,
            FetchResponse,
            timeout=timeout,
            expected_s=self.config.max_wait_ms / 1000,
            pointless=led_elsewhere([(self.topic, p) for p in partitions], node),
            abandoned=lambda: NotLeaderError(
                f"partitions moved away from broker {node} while it did not answer", leader=None
            ),
        )

    def _on_fetch_error(
        self, sent: list[tuple[_PartitionState, int, int]], exc: DlogError, now: float
    ) -> None:
        log.debug("fetch from %s failed: %s", self.topic, exc)
        if isinstance(exc, _LEADER_ERRORS):
            self._metadata.request_refresh()
        for state, generation, _ in sent:
            if state.generation != generation:
                continue
            if exc.retriable:
                state.backoff_until = now + state.backoff.failed()
            else:
                self._stop_partition(state, exc)

    def _on_partition_error(
        self,
        state: _PartitionState,
        exc: DlogError,
        log_start_offset: int,
        log_end_offset: int,
        now: float,
    ) -> None:
        if isinstance(exc, OffsetOutOfRangeError):
            policy = self.config.reset_policy
            if policy == "error":
                self._stop_partition(
                    state,
                    OffsetOutOfRangeError(
                        f"offset {state.fetch_offset} of {self.topic}-{state.partition} is"
                        f" outside the log [{log_start_offset}, {log_end_offset}]",
                        topic=self.topic,
                        partition=state.partition,
                        offset=state.fetch_offset,
                        log_start_offset=log_start_offset,
                        log_end_offset=log_end_offset,
                    ),
                )
            else:
                log.info(
                    "offset %d of %s-%d out of range [%d, %d]: resetting to %s",
                    state.fetch_offset,
                    self.topic,
                    state.partition,
                    log_start_offset,
                    log_end_offset,
                    policy,
                )
                state.reset_to = policy
            return
        if not exc.retriable:
            self._stop_partition(state, exc)
            return
        leader = exc.details.get("leader")
        moved = False
        if isinstance(leader, int):
            epoch = exc.details.get("leader_epoch", -1)
            moved = self._metadata.apply_leader_hint(
                self.topic, state.partition, leader, epoch if isinstance(epoch, int) else -1
            )
        if isinstance(exc, _LEADER_ERRORS):
            self._metadata.request_refresh()
        state.backoff_until = now if moved else now + state.backoff.failed()

    async def _reset_task(self, state: _PartitionState, where: str, generation: int) -> None:
        """Reset ``state`` to ``where`` as decided at ``generation``; a seek between the
        decision and the answer (even before this task runs) wins."""
        try:
            if state.generation != generation:
                return
            results = await self._router.list_offsets(
                self.topic, {state.partition: _RESET_TIMESTAMPS[where]}
            )
        except DlogError as exc:
            if state.generation == generation:
                if exc.retriable:
                    state.backoff_until = trio.current_time() + state.backoff.failed()
                else:
                    self._stop_partition(state, exc)
        else:
            if state.generation == generation:
                self._set_position(state, results[state.partition].offset)
        finally:
            state.resetting = False
            self._wake.set()


def _whole_batches(data: memoryview, fetch_offset: int) -> tuple[int, int]:
    """How many leading bytes of ``data`` are whole batches, and the offset after them.

    A cut-off batch at the end (a broker may stop at a byte limit) is left out and
    fetched again next time; the records themselves are checked when decoded.
    """
    position = 0
    end = len(data)
    next_offset = fetch_offset
    while position + HEADER_SIZE <= end:
        base_offset, batch_length = _OFFSET_AND_LENGTH.unpack_from(data, position)
        size = batch_length + LOG_OVERHEAD
        if size < HEADER_SIZE or position + size > end:
            break
        (last_delta,) = _I32.unpack_from(data, position + LAST_OFFSET_DELTA_POS)
        next_offset = max(next_offset, base_offset + last_delta + 1)
        position += size
    return position, next_offset


def _commit_error(response: OffsetCommitResponse) -> DlogError | None:
    for r in response.partitions:
        if r.error_code:
            return error_from_wire(r.error_code, r.error_message)
    return None


def _offset_fetch_error(response: OffsetFetchResponse) -> DlogError | None:
    for r in response.partitions:
        if r.error_code:
            return error_from_wire(r.error_code, r.error_message)
    return None
