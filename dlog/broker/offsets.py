"""Consumer group offsets, kept in the internal topic ``__consumer_offsets``.

A group's coordinator is the leader of partition ``crc32(group) % N`` of the offsets
topic. It keeps the latest committed offset of every (group, topic, partition) it
coordinates in memory, and rebuilds that map by replaying its partition when it takes
over (the one place a broker decodes records, as DESIGN.md allows). A commit is a
record batch appended through the normal leader path and acknowledged once the high
watermark passes it (acks=all), so committed offsets survive broker failure exactly
like acknowledged records do.

Record format: key = CBOR ``[group, topic, partition]``, value = CBOR
``[offset, metadata, commit timestamp ms]``. The topic keeps every record until log
compaction exists (DESIGN.md).
"""

from __future__ import annotations

import logging
import zlib

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

GroupKey = tuple[str, str, int]


def coordinator_partition(group: str, partitions: int) -> int:
    return zlib.crc32(group.encode()) % partitions


class GroupCoordinator:
    """Answers offset commits and fetches for the groups whose partitions it leads."""

    def __init__(self, replicas: ReplicaManager, clock: WallClock, *, commit_timeout_s: float):
        self.replicas = replicas
        self.clock = clock
        self.commit_timeout_s = commit_timeout_s
        #: offsets-topic partition -> (leader epoch it was loaded at, its offsets)
        self._loaded: dict[int, tuple[int, dict[GroupKey, tuple[int, str]]]] = {}
        self._load_locks: dict[int, trio.Lock] = {}

    def _partition_count(self) -> int:
        topic = self.replicas.hooks.image().topics.get(OFFSETS_TOPIC)
        if topic is None:
            raise NotCoordinatorError(f"{OFFSETS_TOPIC} does not exist yet")
        return len(topic.partitions)

    async def _state_for(self, group: str) -> tuple[Partition, dict[GroupKey, tuple[int, str]]]:
        index = coordinator_partition(group, self._partition_count())
        p = self.replicas.partitions.get((OFFSETS_TOPIC, index))
        if p is None or p.role is not Role.LEADER:
            raise NotCoordinatorError(
                f"broker {self.replicas.node_id} is not the coordinator of group {group!r}"
            )
        loaded = self._loaded.get(index)
        if loaded is not None and loaded[0] == p.leader_epoch:
            return p, loaded[1]
        lock = self._load_locks.setdefault(index, trio.Lock())
        if lock.locked():
            raise CoordinatorLoadInProgressError(f"loading offsets partition {index}")
        async with lock:
            epoch = p.leader_epoch
            offsets = await self._load(p)
            if p.role is not Role.LEADER or p.leader_epoch != epoch:
                raise NotCoordinatorError("leadership moved while loading offsets")
            self._loaded[index] = (epoch, offsets)
            return p, offsets

    async def _load(self, p: Partition) -> dict[GroupKey, tuple[int, str]]:
        offsets: dict[GroupKey, tuple[int, str]] = {}
        position = p.log.log_start_offset
        end = p.log.log_end_offset
        records = 0
        while position < end:
            data = await p.log.read_async(position, _LOAD_CHUNK_BYTES, end)
            if data.is_empty:
                break
            for record in decode_records(data.records, min_offset=position):
                if record.key is None or record.value is None:
                    continue
                try:
                    group, topic, partition = cbor2.loads(record.key)
                    offset, metadata = cbor2.loads(record.value)[:2]
                except (ValueError, TypeError, cbor2.CBORDecodeError):
                    continue
                offsets[(group, topic, partition)] = (offset, metadata)
                records += 1
            position = data.next_offset
        log.info(
            "loaded %d offset commits (%d keys) from %s-%d",
            records,
            len(offsets),
            p.topic,
            p.partition,
        )
        return offsets

    async def commit(self, request: OffsetCommitRequest) -> OffsetCommitResponse:
        if not request.group:
            raise InvalidRequestError("group must not be empty")
        p, offsets = await self._state_for(request.group)
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
            with trio.move_on_after(self.commit_timeout_s):
                await p.wait_for_high_watermark(info.last_offset)
            if p.role is not Role.LEADER or p.leader_epoch != epoch:
                raise NotCoordinatorError("coordinator moved before the commit was replicated")
            if p.high_watermark <= info.last_offset:
                raise RequestTimedOutError("offset commit not replicated in time")
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
            offsets[(request.group, c.topic, c.partition)] = (c.offset, c.metadata)
            results.append(OffsetCommitPartitionResult(topic=c.topic, partition=c.partition))
        return OffsetCommitResponse(partitions=results)

    async def fetch(self, request: OffsetFetchRequest) -> OffsetFetchResponse:
        _, offsets = await self._state_for(request.group)
        results = []
        if request.partitions is None:
            keys = sorted(k for k in offsets if k[0] == request.group)
            wanted = [(t, part) for _, t, part in keys]
        else:
            wanted = [(r.topic, r.partition) for r in request.partitions]
        for topic, partition in wanted:
            offset, metadata = offsets.get((request.group, topic, partition), (-1, ""))
            results.append(
                OffsetFetchPartitionResult(
                    topic=topic, partition=partition, offset=offset, metadata=metadata
                )
            )
        return OffsetFetchResponse(partitions=results)

    def all_offsets(self) -> list[tuple[str, str, int, int]]:
        """(group, topic, partition, offset) for every group this broker coordinates."""
        out = []
        for index, (_, offsets) in self._loaded.items():
            p = self.replicas.partitions.get((OFFSETS_TOPIC, index))
            if p is None or p.role is not Role.LEADER:
                continue
            for (group, topic, partition), (offset, _) in offsets.items():
                out.append((group, topic, partition, offset))
        return sorted(out)
