"""Consumer group offsets, kept in the internal topic ``__consumer_offsets``.

A group's coordinator is the leader of partition ``crc32(group) % N`` of the offsets
topic. It keeps the latest committed offset of every (group, topic, partition) it
coordinates in memory, and rebuilds that map by replaying its partition when it takes
over (the one place a broker decodes records, as DESIGN.md allows). A commit is a
record batch appended through the normal leader path and acknowledged once the high
watermark passes it (acks=all), so committed offsets survive broker failure exactly
like acknowledged records do.

The in-memory map is the replay of the partition up to its high watermark, in log
order, as in Kafka: each key remembers the log offset of the record that set it, and a
record is applied only if its offset is higher. Records appended but not yet below the
HW (our own commits waiting for replication, and the tail a new leader finds above its
HW when it takes over) wait in log order and are applied once the HW passes them, so
concurrent commits end in log order whatever order their waits end in, and a fetch
never returns a commit that a failover could still take back. After a takeover,
fetches wait (then answer COORDINATOR_LOAD_IN_PROGRESS, retriable) until the HW
reaches the log end found at the takeover, so no commit the old leader acknowledged
is missing from what they return.

Record format: key = CBOR ``[group, topic, partition]``, value = CBOR
``[offset, metadata, commit timestamp ms]``. The topic keeps every record until log
compaction exists (DESIGN.md).
"""

from __future__ import annotations

import logging
import zlib
from collections import deque
from typing import NamedTuple

import cbor2
import trio

from dlog.broker.partition import Partition, Role
from dlog.broker.replica_manager import ReplicaManager
from dlog.clock import WallClock
from dlog.errors import (
    CoordinatorLoadInProgressError,
    DlogError,
    InvalidRequestError,
    NotCoordinatorError,
    NotEnoughReplicasError,
    RequestTimedOutError,
)
from dlog.net.protocol import (
    OffsetCommitPartitionResult,
    OffsetCommitRequest,
    OffsetCommitResponse,
    OffsetFetchPartitionResult,
    OffsetFetchRequest,
    OffsetFetchResponse,
)
from dlog.storage import BatchBuilder, decode_records

log = logging.getLogger(__name__)

OFFSETS_TOPIC = "__consumer_offsets"
_LOAD_CHUNK_BYTES = 4 << 20
#: How long a fetch right after a takeover waits for the HW to reach the log end found
#: at the takeover before answering COORDINATOR_LOAD_IN_PROGRESS (the client retries).
_TAKEOVER_WAIT_S = 1.0

GroupKey = tuple[str, str, int]


class Committed(NamedTuple):
    offset: int
    metadata: str
    #: Offset in the offsets partition of the record that set this value.
    record_offset: int


class PartitionOffsets:
    """The committed offsets of one offsets-topic partition led at ``epoch``: the replay
    of its log up to the high watermark."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        #: The log end offset when this leader loaded the partition: fetches wait for
        #: the HW to reach it (everything the previous leader acknowledged is below it).
        self.load_end = 0
        self.offsets: dict[GroupKey, Committed] = {}
        #: (record offset, key, offset, metadata) of records in the log at or above the
        #: HW when last looked at, in log order.
        self.pending: deque[tuple[int, GroupKey, int, str]] = deque()

    def add(
        self, record_offset: int, key: GroupKey, offset: int, metadata: str, high_watermark: int
    ) -> None:
        """A record in the log (log order): applied once the HW passes it."""
        self.pending.append((record_offset, key, offset, metadata))
        self.advance(high_watermark)

    def advance(self, high_watermark: int) -> None:
        """Apply the records below ``high_watermark``."""
        pending = self.pending
        while pending and pending[0][0] < high_watermark:
            record_offset, key, offset, metadata = pending.popleft()
            current = self.offsets.get(key)
            if current is None or record_offset > current.record_offset:
                self.offsets[key] = Committed(offset, metadata, record_offset)


def _is_commit(
    group: object, topic: object, partition: object, offset: object, metadata: object
) -> bool:
    """Whether a decoded record has the types :meth:`GroupCoordinator.commit` writes."""
    return (
        type(group) is str
        and type(topic) is str
        and type(partition) is int
        and type(offset) is int
        and type(metadata) is str
    )


def coordinator_partition(group: str, partitions: int) -> int:
    return zlib.crc32(group.encode()) % partitions


class GroupCoordinator:
    """Answers offset commits and fetches for the groups whose partitions it leads."""

    def __init__(self, replicas: ReplicaManager, clock: WallClock, *, commit_timeout_s: float):
        self.replicas = replicas
        self.clock = clock
        self.commit_timeout_s = commit_timeout_s
        #: offsets-topic partition -> its offsets, loaded at the leader epoch they keep
        self._loaded: dict[int, PartitionOffsets] = {}
        self._load_locks: dict[int, trio.Lock] = {}

    def _partition_count(self) -> int:
        topic = self.replicas.hooks.image().topics.get(OFFSETS_TOPIC)
        if topic is None:
            raise NotCoordinatorError(f"{OFFSETS_TOPIC} does not exist yet")
        return len(topic.partitions)

    async def _state_for(self, group: str) -> tuple[Partition, PartitionOffsets]:
        index = coordinator_partition(group, self._partition_count())
        p = self.replicas.partitions.get((OFFSETS_TOPIC, index))
        if p is None or p.role is not Role.LEADER:
            raise NotCoordinatorError(
                f"broker {self.replicas.node_id} is not the coordinator of group {group!r}"
            )
        loaded = self._loaded.get(index)
        if loaded is not None and loaded.epoch == p.leader_epoch:
            loaded.advance(p.high_watermark)
            return p, loaded
        lock = self._load_locks.setdefault(index, trio.Lock())
        if lock.locked():
            raise CoordinatorLoadInProgressError(f"loading offsets partition {index}")
        async with lock:
            epoch = p.leader_epoch
            state = await self._load(p, epoch)
            if p.role is not Role.LEADER or p.leader_epoch != epoch:
                raise NotCoordinatorError("leadership moved while loading offsets")
            state.advance(p.high_watermark)
            self._loaded[index] = state
            return p, state

    async def _load(self, p: Partition, epoch: int) -> PartitionOffsets:
        """Replay ``p`` in log order; what is at or above the HW stays pending."""
        state = PartitionOffsets(epoch)
        position = p.log.log_start_offset
        end = state.load_end = p.log.log_end_offset
        records = 0
        while position < end:
            data = await p.log.read_async(position, _LOAD_CHUNK_BYTES, end)
            if data.is_empty:
                break
            for record in decode_records(data.records, min_offset=position):
                if record.offset >= end:
                    break
                if record.key is None or record.value is None:
                    continue
                try:
                    group, topic, partition = cbor2.loads(record.key)
                    offset, metadata = cbor2.loads(record.value)[:2]
                except (ValueError, TypeError, cbor2.CBORDecodeError):
                    continue
                if not _is_commit(group, topic, partition, offset, metadata):
                    continue  # not one of ours: a key or value of other types
                state.add(
                    record.offset, (group, topic, partition), offset, metadata, p.high_watermark
                )
                records += 1
            position = data.next_offset
        log.info(
            "loaded %d offset commits (%d keys, %d above the HW %d) from %s-%d",
            records,
            len(state.offsets),
            len(state.pending),
            p.high_watermark,
            p.topic,
            p.partition,
        )
        return state

    async def _wait_for_takeover(self, p: Partition, state: PartitionOffsets) -> None:
        """Until the HW reaches the log end found at the takeover, so that every commit
        the previous leader acknowledged is applied (and nothing above the HW is)."""
        if p.high_watermark >= state.load_end:
            return
        # A new leader's HW moves on a follower's fetch or an append; one alone in its
        # ISR would wait for the next commit.
        if p.maybe_advance_high_watermark():
            p.notify()
        with trio.move_on_after(min(self.commit_timeout_s, _TAKEOVER_WAIT_S)):
            await p.wait_for_high_watermark(state.load_end - 1)
        if p.role is not Role.LEADER or p.leader_epoch != state.epoch:
            raise NotCoordinatorError("coordinator moved while taking over")
        if p.high_watermark < state.load_end:
            raise CoordinatorLoadInProgressError(
                f"offsets partition {p.partition}: HW {p.high_watermark} has not reached "
                f"the log end {state.load_end} found at the takeover"
            )
        state.advance(p.high_watermark)

    async def commit(self, request: OffsetCommitRequest) -> OffsetCommitResponse:
        if not request.group:
            raise InvalidRequestError("group must not be empty")
        p, state = await self._state_for(request.group)
        if not request.partitions:
            return OffsetCommitResponse(partitions=[])
        now = self.clock.now_ms()
        builder = BatchBuilder(now)
        for c in request.partitions:
            builder.append(
                cbor2.dumps([c.offset, c.metadata, now]),
                key=cbor2.dumps([request.group, c.topic, c.partition]),
            )
        results: list[OffsetCommitPartitionResult] = []
        try:
            if len(p.isr) < p.config.min_insync_replicas:
                raise NotEnoughReplicasError(
                    f"offsets partition {p.partition} has too few in-sync replicas"
                )
            epoch = p.leader_epoch
            info = p.append_as_leader(builder.build())
            # The records join the map in log order once the HW passes them, whatever
            # order the commits' waits end in (and even if this one times out).
            for i, c in enumerate(request.partitions):
                state.add(
                    info.first_offset + i,
                    (request.group, c.topic, c.partition),
                    c.offset,
                    c.metadata,
                    p.high_watermark,
                )
            with trio.move_on_after(self.commit_timeout_s):
                await p.wait_for_high_watermark(info.last_offset)
            if p.role is not Role.LEADER or p.leader_epoch != epoch:
                raise NotCoordinatorError("coordinator moved before the commit was replicated")
            if p.high_watermark <= info.last_offset:
                raise RequestTimedOutError("offset commit not replicated in time")
            state.advance(p.high_watermark)
        except DlogError as exc:
            results = [
                OffsetCommitPartitionResult(
                    topic=c.topic,
                    partition=c.partition,
                    error_code=int(exc.code),
                    error_message=exc.message,
                )
                for c in request.partitions
            ]
            return OffsetCommitResponse(partitions=results)
        for c in request.partitions:
            results.append(OffsetCommitPartitionResult(topic=c.topic, partition=c.partition))
        return OffsetCommitResponse(partitions=results)

    async def fetch(self, request: OffsetFetchRequest) -> OffsetFetchResponse:
        p, state = await self._state_for(request.group)
        await self._wait_for_takeover(p, state)
        offsets = state.offsets
        results = []
        if request.partitions is None:
            keys = sorted(k for k in offsets if k[0] == request.group)
            wanted = [(t, part) for _, t, part in keys]
        else:
            wanted = [(r.topic, r.partition) for r in request.partitions]
        for topic, partition in wanted:
            committed = offsets.get((request.group, topic, partition))
            offset, metadata = (-1, "") if committed is None else committed[:2]
            results.append(
                OffsetFetchPartitionResult(
                    topic=topic, partition=partition, offset=offset, metadata=metadata
                )
            )
        return OffsetFetchResponse(partitions=results)

    def all_offsets(self) -> list[tuple[str, str, int, int]]:
        """(group, topic, partition, offset) for every group this broker coordinates."""
        out = []
        for index, state in self._loaded.items():
            p = self.replicas.partitions.get((OFFSETS_TOPIC, index))
            if p is None or p.role is not Role.LEADER or p.leader_epoch != state.epoch:
                continue
            state.advance(p.high_watermark)
            for (group, topic, partition), committed in state.offsets.items():
                out.append((group, topic, partition, committed.offset))
        return sorted(out)
