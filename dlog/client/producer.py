"""The producer: per-partition record batches, one sender task, ordered retries.

How a record travels:

1. ``send_nowait`` picks the partition (the given one, Kafka's murmur2 of the key, or
   the topic's sticky partition) and appends the record to that partition's open
   :class:`~dlog.storage.batch.BatchBuilder` -- one ``bytearray`` per batch, no object
   per record besides the returned :class:`DeliveryHandle` (``send_many`` makes none).
2. A batch is closed when it reaches ``batch_size`` or its first record has lingered
   ``linger_ms`` (at once while flushing or closing). Closing it moves the sticky
   partition elsewhere (KIP-480).
3. The sender task groups closed batches by the partition leader's broker and sends
   one ProduceRequest per broker carrying the batches of many partitions, up to
   ``max_request_size`` bytes; it keeps up to ``max_in_flight_requests_per_broker``
   requests in flight to each broker.
4. A partition has at most one request in flight at a time (with all its waiting
   batches in it), so the broker sees its batches in order however it schedules
   concurrent requests. After a retriable error the partition's batches go back to
   the front of its queue and are resent one batch per request, after a backoff, until
   one succeeds; order is kept and a record may be duplicated when a request was
   applied but its answer lost. After an error that says the leader may have moved
   (NOT_LEADER_OR_FOLLOWER, a dead connection, ...), the metadata is refreshed every
   ``retry_backoff_ms`` while the partition backs off, and the backoff ends as soon as
   the metadata names another leader (or the error named a newer one): a failover
   costs one metadata refresh, not a backoff grown to ``retry_backoff_max_ms``.
5. A batch not acknowledged ``delivery_timeout_ms`` after it was opened fails with
   RequestTimedOutError; so do records whose topic never appears in the metadata
   within ``max_block_ms``.

Memory: records waiting or in flight are bounded by ``buffer_memory`` (a batch reserves
``batch_size`` when opened): ``send_nowait`` raises ``trio.WouldBlock`` when the buffer
is full, the async sends wait for room.

Ownership and cancellation: :meth:`Producer.run` owns the sender task and one task per
request in flight. :meth:`Producer.aclose` flushes then stops it; cancelling ``run``
(or leaving the ``async with`` by an exception) fails every record not yet
acknowledged with ``trio.ClosedResourceError``. A caller cancelled while waiting for
an acknowledgement does not take its records back: they are still delivered.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
from collections import deque
from collections.abc import Generator, Iterable, Sequence
from typing import Any

import trio

from dlog.client.backoff import Backoff
from dlog.client.config import ClientOptions, ProducerConfig
from dlog.client.metadata import ClusterView, MetadataCache
from dlog.client.partitioner import murmur2, next_sticky_partition
from dlog.client.records import BatchMetadata, RecordMetadata
from dlog.client.watch import call_unless, led_elsewhere
from dlog.clock import WallClock
from dlog.errors import (
    BrokerNotAvailableError,
    DlogError,
    FencedLeaderEpochError,
    LeaderNotAvailableError,
    MessageTooLargeError,
    NetworkError,
    NotLeaderError,
    RequestTimedOutError,
    UnknownServerError,
    UnknownTopicOrPartitionError,
    error_from_wire,
)
from dlog.net.client import RpcPool
from dlog.net.protocol import (
    ACKS_NONE,
    ProducePartition,
    ProducePartitionResult,
    ProduceRequest,
    ProduceResponse,
)
from dlog.storage.batch import BatchBuilder, Header

log = logging.getLogger(__name__)

#: Errors after which the partition's leader may have moved: refresh metadata.
_LEADER_ERRORS = (
    NotLeaderError,
    UnknownTopicOrPartitionError,
    LeaderNotAvailableError,
    FencedLeaderEpochError,
    NetworkError,
    BrokerNotAvailableError,
)
_BYTES_TYPES = frozenset({bytes, bytearray})
#: At most the bytes a record without headers or its own timestamp adds besides its
#: value and key: varints of at most 5 bytes for its length, offset delta, key length
#: and value length, one byte each for attributes, timestamp delta and header count.
_RECORD_OVERHEAD_MAX = 23


def fresh_error(exc: BaseException) -> BaseException:
    """A new exception equal to ``exc``, so one failure can be raised in many tasks."""
    if isinstance(exc, DlogError):
        return type(exc)(exc.message, **exc.details)
    return type(exc)(*exc.args)


class _Batch:
    """One record batch of one partition, from its first record to its outcome."""

    __slots__ = (
        "_event",
        "base_offset",
        "base_timestamp",
        "buf",
        "builder",
        "created",
        "deadline",
        "done",
        "error",
        "partition",
        "record_count",
        "reserved",
        "size",
        "topic",
    )

    def __init__(
        self,
        topic: str,
        partition: int,
        builder: BatchBuilder,
        base_timestamp: int,
        created: float,
        deadline: float,
        reserved: int,
    ) -> None:
        self.topic = topic
        self.partition = partition
        self.builder: BatchBuilder | None = builder
        self.base_timestamp = base_timestamp
        self.created = created
        self.deadline = deadline
        self.reserved = reserved
        self.buf: bytearray | None = None
        self.size = 0
        self.record_count = 0
        self.base_offset = -1
        self.error: BaseException | None = None
        self.done = False
        self._event: trio.Event | None = None

    def resolve(self, base_offset: int, error: BaseException | None) -> None:
        self.base_offset = base_offset
        self.error = error
        self.done = True
        self.buf = None
        self.builder = None
        if self._event is not None:
            self._event.set()

    async def wait(self) -> None:
        """Wait until the batch is acknowledged or failed (does not raise)."""
        if not self.done:
            if self._event is None:
                self._event = trio.Event()
            await self._event.wait()


class _Unplaced:
    """Records sent to a topic whose metadata has not arrived yet."""

    __slots__ = ("deadline", "event", "records", "reserved", "topic")

    def __init__(self, topic: str, deadline: float) -> None:
        self.topic = topic
        self.deadline = deadline
        self.records: list[
            tuple[
                bytes | None,
                bytes | None,
                Sequence[Header] | None,
                int | None,
                int | None,
                DeliveryHandle,
            ]
        ] = []
        self.reserved = 0
        self.event = trio.Event()


class DeliveryHandle:
    """The outcome of one record given to :meth:`Producer.send_nowait`.

    ``await handle`` (or ``await handle.wait()``) returns its :class:`RecordMetadata`
    once acknowledged, or raises why it failed; :meth:`result` does the same without
    waiting. Cancelling a wait does not cancel the delivery.
    """

    __slots__ = ("_batch", "_delta", "_error", "_pending", "_timestamp")

    def __init__(self, batch: _Batch | None, delta: int, timestamp: int | None) -> None:
        self._batch = batch
        self._delta = delta
        self._timestamp = timestamp
        self._pending: _Unplaced | None = None
        self._error: BaseException | None = None

    @property
    def done(self) -> bool:
        """Whether the record was acknowledged or failed."""
        if self._error is not None:
            return True
        return self._batch is not None and self._batch.done

    def result(self) -> RecordMetadata:
        """The record's metadata, or its error raised; ``trio.WouldBlock`` if not done."""
        if self._error is not None:
            raise fresh_error(self._error)
        batch = self._batch
        if batch is None or not batch.done:
            raise trio.WouldBlock
        if batch.error is not None:
            raise fresh_error(batch.error)
        offset = batch.base_offset + self._delta if batch.base_offset >= 0 else -1
        timestamp = batch.base_timestamp if self._timestamp is None else self._timestamp
        return RecordMetadata(batch.topic, batch.partition, offset, timestamp)

    async def wait(self) -> RecordMetadata:
        while self._batch is None and self._error is None:
            assert self._pending is not None
            await self._pending.event.wait()
        if self._batch is not None:
            await self._batch.wait()
        return self.result()

    def __await__(self) -> Generator[Any, None, RecordMetadata]:
        return self.wait().__await__()


class _PartitionQueue:
    """The batches of one partition: the open one, closed ones waiting, the one sending."""

    __slots__ = (
        "backoff_until",
        "failed_leader",
        "failures",
        "in_flight",
        "last_error",
        "open",
        "partition",
        "ready",
        "retrying",
        "topic",
    )

    def __init__(self, topic: str, partition: int) -> None:
        self.topic = topic
        self.partition = partition
        self.open: _Batch | None = None
        self.ready: deque[_Batch] = deque()
        self.in_flight: list[_Batch] = []
        self.retrying = False
        self.failures = 0
        #: Why the batches are being retried (told when they expire meanwhile).
        self.last_error: DlogError | None = None
        self.backoff_until = -math.inf
        #: The broker whose answer (or dead connection) said it may not lead any more,
        #: while this partition backs off; None otherwise.
        self.failed_leader: int | None = None


class _TopicState:
    __slots__ = ("available", "name", "num_partitions", "previous_sticky", "queues", "sticky")

    def __init__(self, name: str) -> None:
        self.name = name
        self.queues: list[_PartitionQueue] = []
        self.num_partitions = 0
        self.available: list[int] = []
        self.sticky = -1
        self.previous_sticky = -1


class Producer:
    """Sends records to partition leaders in batches. Make one with
    ``client.producer(...)``, an async context manager whose exit flushes.

    Three ways to send (all take ``topic, value, key=None, headers=None,
    partition=None, timestamp=None``; ``value``, ``key`` and header values are bytes):

    - ``await send(...)`` waits for the acknowledgement and returns RecordMetadata.
    - ``send_nowait(...)`` returns a :class:`DeliveryHandle` at once.
    - ``await send_many(topic, values)``: the bulk path for value-only records.
    """

    def __init__(
        self,
        pool: RpcPool,
        metadata: MetadataCache,
        config: ProducerConfig,
        *,
        options: ClientOptions,
        clock: WallClock,
        rng: random.Random,
    ) -> None:
        self.config = config
        self._pool = pool
        self._metadata = metadata
        self._clock = clock
        self._rng = rng
        self._backoff = Backoff(
            options.retry_backoff_ms / 1000, options.retry_backoff_max_ms / 1000, rng
        )
        self._acks = config.acks_value
        self._batch_size = config.batch_size
        self._linger_s = config.linger_ms / 1000
        self._delivery_timeout_s = config.delivery_timeout_ms / 1000
        self._max_block_s = config.max_block_ms / 1000
        self._max_request_size = config.max_request_size
        self._buffer_memory = config.buffer_memory
        self._compression = config.compression_codec
        self._topics: dict[str, _TopicState] = {}
        self._unplaced: dict[str, _Unplaced] = {}
        #: Queues that hold or send batches; the sender looks only at these.
        self._active: dict[tuple[str, int], _PartitionQueue] = {}
        self._in_flight_by_node: dict[int, int] = {}
        self._requests_in_flight = 0
        self._buffered = 0
        self._room = trio.Event()
        self._wake = trio.Event()
        self._flushing = 0
        self._batches_closed = 0
        self._drain_start = 0
        self._closed = False
        self._stopping = False
        self._stopped = trio.Event()
        self._nursery: trio.Nursery | None = None

    # --- sending ----------------------------------------------------------------------

    def send_nowait(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None = None,
        headers: Sequence[Header] | None = None,
        partition: int | None = None,
        timestamp: int | None = None,
    ) -> DeliveryHandle:
        """Accept a record and return its :class:`DeliveryHandle` without waiting.

        Raises ``trio.WouldBlock`` when ``buffer_memory`` is full (use :meth:`enqueue`
        or :meth:`send` to wait for room), ``trio.ClosedResourceError`` after close,
        MessageTooLargeError for a record bigger than ``max_request_size``,
        UnknownTopicOrPartitionError for a partition the topic does not have, and
        TypeError or ValueError for a value, key, header (``(str, bytes | None)``) or
        timestamp (int milliseconds >= 0) it cannot send -- checked here, before
        anything is buffered. A record for a topic whose metadata is not known yet is
        held until it is.
        """
        if value.__class__ is not bytes and value is not None:
            value = _as_bytes(value, "value")
        if key.__class__ is not bytes and key is not None:
            key = _as_bytes(key, "key")
        if headers is not None or timestamp is not None:
            # Checked now: a bad one found when its batch is built would fail others.
            headers = _checked_headers(headers)
            _check_timestamp(timestamp)
        ts = self._topics.get(topic)
        if ts is None or self._closed:
            return self._send_unplaced(topic, value, key, headers, partition, timestamp)
        batch, delta = self._append(ts, value, key, headers, partition, timestamp, False)
        return DeliveryHandle(batch, delta, timestamp)

    async def enqueue(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None = None,
        headers: Sequence[Header] | None = None,
        partition: int | None = None,
        timestamp: int | None = None,
    ) -> DeliveryHandle:
        """:meth:`send_nowait`, but waiting (up to ``max_block_ms``) for buffer room.

        A loop of ``await enqueue(...)`` is the fast per-record path that respects the
        memory bound. It yields to other tasks only when it has to wait or a batch
        became full (so the sender can send it), not on every record. Cancelled
        while waiting for room, the record was not accepted.
        """
        closed_before = self._batches_closed
        while True:
            try:
                handle = self.send_nowait(topic, value, key, headers, partition, timestamp)
            except trio.WouldBlock:
                await self._wait_for_room(self._batch_size)
                continue
            break
        if self._batches_closed != closed_before:
            await trio.lowlevel.checkpoint()
        return handle

    async def send(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None = None,
        headers: Sequence[Header] | None = None,
        partition: int | None = None,
        timestamp: int | None = None,
    ) -> RecordMetadata:
        """Send one record and wait for its acknowledgement (as ``acks`` defines it).

        Raises the error that failed the record. If cancelled after the record was
        accepted, the record is still delivered.
        """
        handle = await self.enqueue(topic, value, key, headers, partition, timestamp)
        if not handle.done:
            self._wake.set()
        return await handle.wait()

    async def send_many(
        self,
        topic: str,
        values: Iterable[bytes],
        *,
        key: bytes | None = None,
        partition: int | None = None,
    ) -> list[BatchMetadata]:
        """Send value-only records in bulk and wait until every one is acknowledged.

        ``values`` is any iterable of bytes (a list is fastest; a generator is consumed
        lazily, within ``buffer_memory``). Records go to ``partition``, or to the
        partition of ``key`` (which every record then carries), or sticky-partitioned
        batch by batch. They are appended batch-wise (``BatchBuilder.append_values``)
        with no per-record Python object.

        Its last, partly filled batches are sent at once rather than after ``linger_ms``
        (the call waits for them anyway).

        Returns, in order, one :class:`BatchMetadata` per run of records that landed in
        one batch: together they cover every value, in order. Raises the first failure
        (records in other batches may still have been delivered). If cancelled, a
        prefix of ``values`` has been accepted and will be delivered; the rest was not.
        """
        ts = await self._topic_state(topic)
        fixed: int | None = None
        if partition is not None:
            if not 0 <= partition < ts.num_partitions:
                raise _no_partition(topic, partition, ts.num_partitions)
            fixed = partition
        elif key is not None:
            key = _as_bytes(key, "key")
            fixed = (murmur2(key) & 0x7FFFFFFF) % ts.num_partitions
        parts: list[list[Any]] = []
        if isinstance(values, list | tuple):
            await self._append_values(ts, values, fixed, key, parts)
        else:
            iterator = iter(values)
            while chunk := list(itertools.islice(iterator, 8192)):
                await self._append_values(ts, chunk, fixed, key, parts)
        # This call waits for its last batches anyway: send them now, not after linger.
        for batch, _, _ in parts[-ts.num_partitions :]:
            q = ts.queues[batch.partition]
            if q.open is batch:
                self._close_open(q)
        if parts:
            self._wake.set()
        out: list[BatchMetadata] = []
        for batch, start, count in parts:
            if not batch.done:
                await batch.wait()
            if batch.error is not None:
                raise fresh_error(batch.error)
            base = batch.base_offset + start if batch.base_offset >= 0 else -1
            out.append(BatchMetadata(topic, batch.partition, base, count))
        return out

    async def flush(self) -> None:
        """Send every record accepted so far at once (no lingering) and wait until each
        is acknowledged or failed. Does not raise for failed records (their handles
        do). Cancelling the wait leaves the records going.
        """
        self._flushing += 1
        self._wake.set()
        try:
            while self._unplaced:
                await next(iter(self._unplaced.values())).event.wait()
            pending: list[_Batch] = []
            for q in self._active.values():
                pending.extend(q.in_flight)
                pending.extend(q.ready)
                if q.open is not None:
                    pending.append(q.open)
            for batch in pending:
                await batch.wait()
        finally:
            self._flushing -= 1

    async def aclose(self) -> None:
        """Stop accepting records, flush, and stop the sender. Idempotent."""
        self._closed = True
        if not self._stopped.is_set():
            await self.flush()
            self._stopping = True
            self._wake.set()
            await self._stopped.wait()

    @property
    def buffered_bytes(self) -> int:
        """Bytes reserved by records not yet acknowledged (bounded by buffer_memory)."""
        return self._buffered

    # --- the owner's side -------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the sender until :meth:`aclose` finishes or this is cancelled.

        Whatever is not acknowledged when it ends fails with ClosedResourceError.
        """
        self._metadata.add_listener(self._on_metadata)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await self._sender_loop()
        finally:
            self._metadata.remove_listener(self._on_metadata)
            self._closed = True
            self._fail_everything(
                trio.ClosedResourceError("producer closed before the record was acknowledged")
            )
            self._stopped.set()

    # --- appending --------------------------------------------------------------------

    def _append(
        self,
        ts: _TopicState,
        value: bytes | None,
        key: bytes | None,
        headers: Sequence[Header] | None,
        partition: int | None,
        timestamp: int | None,
        force: bool,
    ) -> tuple[_Batch, int]:
        if partition is None:
            if key is None:
                partition = ts.sticky
                if partition < 0:
                    partition = self._choose_sticky(ts)
            else:
                partition = (murmur2(key) & 0x7FFFFFFF) % ts.num_partitions
        elif not 0 <= partition < ts.num_partitions:
            raise _no_partition(ts.name, partition, ts.num_partitions)
        size = (0 if value is None else len(value)) + (0 if key is None else len(key))
        if size > self._max_request_size:
            raise MessageTooLargeError(
                f"record of {size} bytes is larger than max_request_size"
                f" ({self._max_request_size})",
                size=size,
            )
        q = ts.queues[partition]
        batch = q.open
        if batch is None:
            batch = self._new_batch(q, force)
        else:
            assert batch.builder is not None
            bound = size + _RECORD_OVERHEAD_MAX
            if timestamp is not None:
                bound += 9  # a timestamp delta varint takes up to 10 bytes, not 1
            if headers:
                bound += sum(10 + len(k.encode()) + len(v or b"") for k, v in headers)
            if bound + batch.builder.size_in_bytes > self._batch_size:
                self._close_open(q)
                self._wake.set()
                batch = self._new_batch(q, force)
        builder = batch.builder
        assert builder is not None
        try:
            delta = builder.append(value, key, headers, timestamp)
        except BaseException:
            if builder.record_count == 0:  # a batch opened for this record alone
                q.open = None
                self._release(batch.reserved)
            raise
        if builder.size_in_bytes >= self._batch_size:
            self._close_open(q)
            self._wake.set()
        return batch, delta

    async def _append_values(
        self,
        ts: _TopicState,
        values: Sequence[bytes],
        fixed: int | None,
        key: bytes | None,
        parts: list[list[Any]],
    ) -> None:
        if not set(map(type, values)) <= _BYTES_TYPES:
            raise TypeError("send_many values must be bytes or bytearray")
        n = len(values)
        i = 0
        batch_size = self._batch_size
        # An upper bound, never an average: a batch filled by estimate must not pass
        # batch_size (the broker rejects batches over max_message_bytes). Each round
        # fills most of what is left, so a batch is full after a few rounds.
        per_record = (max(map(len, values)) if n else 0) + _RECORD_OVERHEAD_MAX
        if key:
            per_record += len(key)
        while i < n:
            if self._closed:
                raise trio.ClosedResourceError("producer is closed")
            if fixed is not None:
                p = fixed
            else:
                p = ts.sticky
                if p < 0:
                    p = self._choose_sticky(ts)
            q = ts.queues[p]
            batch = q.open
            if batch is None:
                try:
                    batch = self._new_batch(q, False)
                except trio.WouldBlock:
                    await self._wait_for_room(batch_size)
                    continue  # the sticky partition may have moved meanwhile
            builder = batch.builder
            assert builder is not None
            before = builder.size_in_bytes
            fits = (batch_size - before) // per_record
            if not fits and builder.record_count:
                # A batch others started, too full for one more of these: a new one.
                self._close_open(q)
                self._wake.set()
                continue
            k = min(n - i, max(1, fits))
            start = builder.record_count
            chunk = values if k == n else values[i : i + k]
            if key is None:
                builder.append_values(chunk)
            else:
                for value in chunk:
                    builder.append(value, key)
            i += k
            if parts and parts[-1][0] is batch:
                parts[-1][2] += k
            else:
                parts.append([batch, start, k])
            if builder.size_in_bytes + per_record > batch_size:
                self._close_open(q)
                self._wake.set()
                # Let the sender send what is full while we build the next batch.
                await trio.lowlevel.checkpoint()

    def _send_unplaced(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None,
        headers: Sequence[Header] | None,
        partition: int | None,
        timestamp: int | None,
    ) -> DeliveryHandle:
        if self._closed:
            raise trio.ClosedResourceError("producer is closed")
        view = self._metadata.view
        if topic in view.topics:
            ts = self._ensure_topic(topic, view)
            batch, delta = self._append(ts, value, key, headers, partition, timestamp, False)
            return DeliveryHandle(batch, delta, timestamp)
        size = (0 if value is None else len(value)) + (0 if key is None else len(key)) + 64
        if self._buffered and self._buffered + size > self._buffer_memory:
            raise trio.WouldBlock
        self._metadata.track(topic)
        unplaced = self._unplaced.get(topic)
        if unplaced is None:
            deadline = trio.current_time() + self._max_block_s
            unplaced = self._unplaced[topic] = _Unplaced(topic, deadline)
            self._metadata.request_refresh()
            self._wake.set()
        self._buffered += size
        unplaced.reserved += size
        handle = DeliveryHandle(None, 0, timestamp)
        handle._pending = unplaced
        unplaced.records.append((value, key, headers, partition, timestamp, handle))
        return handle

    def _new_batch(self, q: _PartitionQueue, force: bool) -> _Batch:
        if self._closed and not force:
            raise trio.ClosedResourceError("producer is closed")
        reserve = self._batch_size
        if not force and self._buffered and self._buffered + reserve > self._buffer_memory:
            raise trio.WouldBlock
        self._buffered += reserve
        now = trio.current_time()
        base_timestamp = self._clock.now_ms()
        batch = _Batch(
            q.topic,
            q.partition,
            BatchBuilder(base_timestamp, compression=self._compression),
            base_timestamp,
            now,
            now + self._delivery_timeout_s,
            reserve,
        )
        q.open = batch
        self._active[q.topic, q.partition] = q
        self._wake.set()  # the sender must learn this batch's linger deadline
        return batch

    def _close_open(self, q: _PartitionQueue) -> None:
        batch = q.open
        assert batch is not None
        assert batch.builder is not None
        q.open = None
        builder = batch.builder
        batch.record_count = builder.record_count
        batch.buf = builder.build()
        batch.builder = None
        batch.size = len(batch.buf)
        if batch.size > batch.reserved:
            self._buffered += batch.size - batch.reserved
            batch.reserved = batch.size
        q.ready.append(batch)
        self._batches_closed += 1
        ts = self._topics.get(q.topic)
        if ts is not None and ts.sticky == q.partition:
            ts.sticky = -1

    def _choose_sticky(self, ts: _TopicState) -> int:
        p = next_sticky_partition(ts.available, ts.num_partitions, ts.previous_sticky, self._rng)
        ts.sticky = ts.previous_sticky = p
        return p

    async def _wait_for_room(self, need: int) -> None:
        deadline = trio.current_time() + self._max_block_s
        while self._buffered and self._buffered + need > self._buffer_memory:
            if self._closed:
                raise trio.ClosedResourceError("producer is closed")
            if trio.current_time() >= deadline:
                raise RequestTimedOutError(
                    f"no room in buffer_memory ({self._buffer_memory} bytes) within"
                    f" max_block_ms ({self.config.max_block_ms})"
                )
            room = self._room  # shared by every waiter: _release wakes them all
            self._wake.set()
            with trio.move_on_at(deadline):
                await room.wait()

    def _release(self, nbytes: int) -> None:
        self._buffered -= nbytes
        room = self._room
        if room.statistics().tasks_waiting:
            room.set()
            self._room = trio.Event()

    # --- metadata -----------------------------------------------------------------------

    async def _topic_state(self, topic: str) -> _TopicState:
        ts = self._topics.get(topic)
        if ts is not None:
            return ts
        if self._closed:
            raise trio.ClosedResourceError("producer is closed")
        self._metadata.track(topic)
        with trio.move_on_after(self._max_block_s):
            while topic not in self._metadata.view.topics:
                try:
                    await self._metadata.refresh()
                except DlogError as exc:
                    if not exc.retriable:
                        raise
        view = self._metadata.view
        if topic not in view.topics:
            if topic in view.missing:
                raise UnknownTopicOrPartitionError(
                    f"topic {topic!r} does not exist (waited max_block_ms ="
                    f" {self.config.max_block_ms})"
                )
            raise RequestTimedOutError(
                f"no metadata for topic {topic!r} within max_block_ms = {self.config.max_block_ms}"
            )
        return self._ensure_topic(topic, view)

    def _ensure_topic(self, topic: str, view: ClusterView) -> _TopicState:
        ts = self._topics.get(topic)
        if ts is None:
            ts = self._topics[topic] = _TopicState(topic)
        info = view.topics.get(topic)
        if info is not None:
            while len(ts.queues) < len(info.partitions):
                ts.queues.append(_PartitionQueue(topic, len(ts.queues)))
            ts.num_partitions = len(ts.queues)
            ts.available = view.available_partitions(topic)
        return ts

    def _on_metadata(self, view: ClusterView) -> None:
        for topic in self._topics:
            self._ensure_topic(topic, view)
        now = trio.current_time()
        for q in self._active.values():
            if q.failed_leader is None or q.in_flight or q.backoff_until <= now:
                continue
            leader = view.leader(q.topic, q.partition)
            if leader is not None and leader[0] != q.failed_leader:
                q.backoff_until = now  # a new leader: retry there at once
        for topic in [t for t in self._unplaced if t in view.topics]:
            self._place(self._unplaced.pop(topic), self._ensure_topic(topic, view))
        self._wake.set()

    def _place(self, unplaced: _Unplaced, ts: _TopicState) -> None:
        self._release(unplaced.reserved)
        for value, key, headers, partition, timestamp, handle in unplaced.records:
            handle._pending = None
            try:
                handle._batch, handle._delta = self._append(
                    ts, value, key, headers, partition, timestamp, True
                )
            except Exception as exc:  # (checked in send_nowait: a DlogError, normally)
                handle._error = exc
        unplaced.event.set()

    # --- the sender -----------------------------------------------------------------------

    async def _sender_loop(self) -> None:
        while True:
            self._wake = trio.Event()
            next_at = self._dispatch(trio.current_time())
            if (
                self._stopping
                and not self._active
                and not self._unplaced
                and self._requests_in_flight == 0
            ):
                return
            if next_at == math.inf:
                await self._wake.wait()
            else:
                with trio.move_on_at(next_at):
                    await self._wake.wait()

    def _dispatch(self, now: float) -> float:
        """Close due batches, expire old ones, start requests; returns when to look again."""
        next_at = math.inf
        for topic, unplaced in list(self._unplaced.items()):
            if unplaced.deadline <= now:
                del self._unplaced[topic]
                self._fail_unplaced(unplaced)
            else:
                next_at = min(next_at, unplaced.deadline)
        view = self._metadata.view
        flushing = self._flushing > 0 or self._stopping
        linger = self._linger_s
        by_node: dict[int, list[_PartitionQueue]] = {}
        addresses: dict[int, str] = {}
        want_metadata = False
        for key, q in list(self._active.items()):
            if q.in_flight:
                continue
            oldest = q.ready[0] if q.ready else q.open
            if oldest is None:
                del self._active[key]
                continue
            if oldest.deadline <= now:
                self._expire(q, now)
                if not q.ready and q.open is None:
                    del self._active[key]
                    continue
            if q.open is not None:
                due = q.open.created + linger
                if flushing or due <= now:
                    self._close_open(q)
                else:
                    next_at = min(next_at, due)
                    if not q.ready:
                        continue
            next_at = min(next_at, q.ready[0].deadline)
            if q.backoff_until > now:
                next_at = min(next_at, q.backoff_until)
                if q.failed_leader is not None:
                    # Keep the view fresh: each refresh calls _on_metadata, which
                    # ends the backoff once another broker leads.
                    want_metadata = True
                continue
            leader = view.leader(q.topic, q.partition)
            if leader is None:
                want_metadata = True
                if not isinstance(q.last_error, LeaderNotAvailableError):
                    q.last_error = LeaderNotAvailableError(
                        f"{q.topic}-{q.partition} has no leader (its replicas are down?)"
                    )
                continue
            if isinstance(q.last_error, LeaderNotAvailableError):
                q.last_error = None  # it has one again
            node, address = leader
            by_node.setdefault(node, []).append(q)
            addresses[node] = address
        if want_metadata:
            self._metadata.request_refresh()
        limit = self.config.max_in_flight_requests_per_broker
        self._drain_start += 1
        for node, queues in by_node.items():
            # Start each round at another partition, so that when a request's byte
            # budget or the in-flight limit cuts the list, no partition always waits.
            start = self._drain_start % len(queues)
            queues[:] = queues[start:] + queues[:start]
            queues.reverse()  # pop() from the end takes them in that order
            while queues and self._in_flight_by_node.get(node, 0) < limit:
                parts = self._take_request(queues)
                self._in_flight_by_node[node] = self._in_flight_by_node.get(node, 0) + 1
                self._requests_in_flight += 1
                assert self._nursery is not None
                self._nursery.start_soon(self._send_request, node, addresses[node], parts)
        return next_at

    def _take_request(
        self, queues: list[_PartitionQueue]
    ) -> list[tuple[_PartitionQueue, list[_Batch]]]:
        """Take batches for one request from ``queues`` (consumed from the end)."""
        budget = self._max_request_size
        used = 0
        parts: list[tuple[_PartitionQueue, list[_Batch]]] = []
        while queues:
            q = queues[-1]
            if parts and used + q.ready[0].size > budget:
                break
            queues.pop()
            batches = [q.ready.popleft()]
            used += batches[0].size
            if not q.retrying:
                while q.ready and used + q.ready[0].size <= budget:
                    batch = q.ready.popleft()
                    batches.append(batch)
                    used += batch.size
            q.in_flight = batches
            parts.append((q, batches))
        return parts

    async def _send_request(
        self, node: int, address: str, parts: list[tuple[_PartitionQueue, list[_Batch]]]
    ) -> None:
        payload: list[bytearray] = []
        entries: list[ProducePartition] = []
        for q, batches in parts:
            size = 0
            for batch in batches:
                assert batch.buf is not None
                payload.append(batch.buf)
                size += batch.size
            entries.append(ProducePartition(topic=q.topic, partition=q.partition, size=size))
        request = ProduceRequest(
            acks=self._acks,
            timeout_ms=self.config.request_timeout_ms,
            partitions=entries,
            payload=payload,
        )
        # The broker may hold acks=all until timeout_ms: wait a little longer than that,
        # but not past the batches' delivery deadline.
        now = trio.current_time()
        latest_deadline = max(b.deadline for _, batches in parts for b in batches)
        timeout = max(
            0.001, min(self.config.request_timeout_ms / 1000 + 1.0, latest_deadline - now)
        )
        response: ProduceResponse | None = None
        error: DlogError | None = None
        try:
            try:
                # A broker whose connects keep failing (a dead leader) fails the request
                # at once instead of holding it in the pool's reconnect backoff, where
                # it would count as in flight and miss a new leader in the metadata.
                conn = await self._pool.connection(address, deadline=now)
            except RequestTimedOutError as exc:
                raise NetworkError(exc.message, address=address) from None
            if self._acks == ACKS_NONE:
                # Nothing is answered (Kafka's acks=0): the batches count as sent once
                # they are handed to the connection -- at once while its buffer has
                # room, else within the timeout (a broker that stops reading must not
                # hold the producer's flush forever).
                if conn.has_room:
                    await conn.send_oneway(request)
                else:
                    with trio.move_on_after(timeout) as waited:
                        await conn.send_oneway(request)
                    if waited.cancelled_caught:
                        raise NetworkError(
                            f"broker {node} ({address}) is not reading its connection",
                            address=address,
                        )
            else:
                response = await self._await_unless_moved(node, address, request, parts, timeout)
        except DlogError as exc:
            error = exc
        self._in_flight_by_node[node] -= 1
        self._requests_in_flight -= 1
        now = trio.current_time()
        if error is not None:
            for q, batches in parts:
                self._on_error(q, batches, error, None, now, node)
        elif response is None:
            for q, batches in parts:
                self._on_success(q, batches, -1)
        else:
            results = {(r.topic, r.partition): r for r in response.partitions}
            for q, batches in parts:
                result = results.get((q.topic, q.partition))
                if result is None:
                    missing = UnknownServerError(
                        f"produce response from {address} has no result for {q.topic}-{q.partition}"
                    )
                    self._on_error(q, batches, missing, None, now, node)
                elif result.error_code == 0:
                    self._on_success(q, batches, result.base_offset)
                else:
                    details: dict[str, Any] = {}
                    if result.leader is not None:
                        details = {"leader": result.leader, "leader_epoch": result.leader_epoch}
                    failure = error_from_wire(result.error_code, result.error_message, details)
                    self._on_error(q, batches, failure, result, now, node)
        self._wake.set()

    async def _await_unless_moved(
        self,
        node: int,
        address: str,
        request: ProduceRequest,
        parts: list[tuple[_PartitionQueue, list[_Batch]]],
        timeout: float,
    ) -> ProduceResponse:
        """The broker's answer -- unless the metadata shows every partition of the
        request led elsewhere first (a leader that hangs, e.g. a paused process, answers
        nothing until ``request_timeout_ms``): then NotLeaderError, and the batches are
        retried on the new leader at once (see :mod:`dlog.client.watch`).
        A batch abandoned this way may still be appended by the old leader (a duplicate
        at worst, as retries allow; acks=all data on a fenced leader never commits)."""
        return await call_unless(
            self._pool,
            self._metadata,
            address,
            request,
            ProduceResponse,
            timeout=timeout,
            pointless=led_elsewhere([(q.topic, q.partition) for q, _ in parts], node),
            abandoned=lambda: NotLeaderError(
                f"partitions moved away from broker {node} while it did not answer", leader=None
            ),
        )

    def _on_success(self, q: _PartitionQueue, batches: list[_Batch], base_offset: int) -> None:
        q.in_flight = []
        q.retrying = False
        q.failures = 0
        q.last_error = None
        q.failed_leader = None
        offset = base_offset
        for batch in batches:
            self._release(batch.reserved)
            batch.resolve(offset, None)
            if offset >= 0:
                offset += batch.record_count

    def _on_error(
        self,
        q: _PartitionQueue,
        batches: list[_Batch],
        exc: DlogError,
        result: ProducePartitionResult | None,
        now: float,
        node: int,
    ) -> None:
        q.in_flight = []
        q.failed_leader = None
        if not exc.retriable:
            log.debug("produce to %s-%d failed: %s", q.topic, q.partition, exc)
            for batch in batches:
                self._release(batch.reserved)
                batch.resolve(-1, exc)
            return
        moved = False
        if result is not None and result.leader is not None:
            moved = self._metadata.apply_leader_hint(
                q.topic, q.partition, result.leader, result.leader_epoch
            )
        if isinstance(exc, _LEADER_ERRORS):
            self._metadata.request_refresh()
            if not moved:
                q.failed_leader = node
        retry: list[_Batch] = []
        for batch in batches:
            if batch.deadline <= now:
                self._release(batch.reserved)
                batch.resolve(-1, _delivery_timeout(batch, self.config, exc))
            else:
                retry.append(batch)
        q.ready.extendleft(reversed(retry))
        q.retrying = True
        q.failures += 1
        q.last_error = exc
        q.backoff_until = now if moved else now + self._backoff.delay(q.failures)
        if q.ready or q.open is not None:
            self._active[q.topic, q.partition] = q
        log.debug(
            "produce to %s-%d: %s; retrying %d batches", q.topic, q.partition, exc, len(retry)
        )

    def _expire(self, q: _PartitionQueue, now: float) -> None:
        while q.ready and q.ready[0].deadline <= now:
            batch = q.ready.popleft()
            self._release(batch.reserved)
            batch.resolve(-1, _delivery_timeout(batch, self.config, q.last_error))
        if not q.ready and q.open is not None and q.open.deadline <= now:
            batch, q.open = q.open, None
            self._release(batch.reserved)
            batch.resolve(-1, _delivery_timeout(batch, self.config, q.last_error))
            ts = self._topics.get(q.topic)
            if ts is not None and ts.sticky == q.partition:
                ts.sticky = -1

    def _fail_unplaced(self, unplaced: _Unplaced) -> None:
        self._release(unplaced.reserved)
        view = self._metadata.view
        if unplaced.topic in view.missing:
            exc: DlogError = UnknownTopicOrPartitionError(
                f"topic {unplaced.topic!r} does not exist (waited max_block_ms ="
                f" {self.config.max_block_ms})"
            )
        else:
            exc = RequestTimedOutError(
                f"no metadata for topic {unplaced.topic!r} within max_block_ms ="
                f" {self.config.max_block_ms}"
            )
        for *_, handle in unplaced.records:
            handle._pending = None
            handle._error = exc
        unplaced.event.set()

    def _fail_everything(self, exc: BaseException) -> None:
        for unplaced in self._unplaced.values():
            self._release(unplaced.reserved)
            for *_, handle in unplaced.records:
                handle._pending = None
                handle._error = exc
            unplaced.event.set()
        self._unplaced.clear()
        for q in self._active.values():
            batches = [*q.in_flight, *q.ready]
            if q.open is not None:
                batches.append(q.open)
            q.in_flight, q.open = [], None
            q.ready.clear()
            for batch in batches:
                if not batch.done:
                    self._release(batch.reserved)
                    batch.resolve(-1, exc)
        self._active.clear()


def _checked_headers(headers: Sequence[Header] | None) -> list[Header] | None:
    """``headers`` as a list of ``(str, bytes | None)``, or TypeError/ValueError."""
    if headers is None:
        return None
    checked: list[Header] = []
    for header in headers:
        if not isinstance(header, tuple | list) or len(header) != 2:
            raise TypeError(f"a header is a (name, value) pair, not {header!r}")
        name, value = header
        if not isinstance(name, str):
            raise TypeError(f"header name must be str, not {type(name).__name__}")
        name.encode()  # (a lone surrogate cannot be sent: UnicodeEncodeError now)
        if value is not None and value.__class__ is not bytes:
            value = _as_bytes(value, "header value")
        checked.append((name, value))
    return checked


def _check_timestamp(timestamp: int | None) -> None:
    if timestamp is None:
        return
    if not isinstance(timestamp, int) or isinstance(timestamp, bool):
        raise TypeError(f"timestamp must be int milliseconds, not {type(timestamp).__name__}")
    if timestamp < 0:
        raise ValueError(f"timestamp must be >= 0 (milliseconds since the epoch), got {timestamp}")


def _as_bytes(value: object, what: str) -> bytes:
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    if isinstance(value, bytes):
        return value
    raise TypeError(f"record {what} must be bytes, not {type(value).__name__}")


def _no_partition(topic: str, partition: int, count: int) -> UnknownTopicOrPartitionError:
    return UnknownTopicOrPartitionError(
        f"topic {topic!r} has no partition {partition} (it has {count})",
        topic=topic,
        partition=partition,
    )


def _delivery_timeout(
    batch: _Batch, config: ProducerConfig, last_error: DlogError | None
) -> RequestTimedOutError:
    count = batch.record_count or (batch.builder.record_count if batch.builder else 0)
    why = f"; last error: {last_error}" if last_error is not None else ""
    return RequestTimedOutError(
        f"{count} records for {batch.topic}-{batch.partition} not acknowledged within"
        f" delivery_timeout_ms ({config.delivery_timeout_ms}){why}",
        topic=batch.topic,
        partition=batch.partition,
    )
