"""An in-process fake dlog cluster for the client's unit tests.

Each :class:`FakeBroker` is a real :class:`dlog.net.RpcServer` answering the client
protocol (metadata, produce, fetch, list_offsets, offsets, admin, replica_status) from
state shared by the whole :class:`FakeCluster`: topics with in-memory logs of whole
record batches (offsets assigned in place with ``assign_offsets``), partition leaders
and epochs, group offsets. There is no replication: a "leader move" is a metadata
change the test makes.

Transports: ``memory`` (default) connects the client's pool to the servers through
``trio.testing.memory_stream_pair`` so tests run on virtual time (``autojump_clock``);
``tcp`` serves every broker on 127.0.0.1 port 0.

Hooks: :meth:`FakeCluster.inject` queues an error for the next matching requests
(any error code, or ``DROP`` to cut the connection without answering, or
``DROP_AFTER_APPEND`` to append and then cut it, losing the answer);
:meth:`FakeCluster.move_leader`; :meth:`FakeCluster.stop_broker` /
``start_broker``; ``hold_high_watermark`` to keep the HW from following the LEO;
``produce_gate`` to hold produce answers. Every request is logged in
``cluster.requests`` as ``(node_id, op, request)``.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio
import trio.testing

import dlog
from dlog.clock import ManualClock
from dlog.errors import (
    DlogError,
    ErrorCode,
    NotCoordinatorError,
    error_from_wire,
)
from dlog.net.client import ClientConfig, RpcPool
from dlog.net.messages import Message, payload_bytes
from dlog.net.protocol import (
    EARLIEST_TIMESTAMP,
    LATEST_TIMESTAMP,
    NO_EPOCH,
    AlterTopicRequest,
    AlterTopicResponse,
    BrokerInfo,
    ClusterStatusRequest,
    ClusterStatusResponse,
    CreateTopicsRequest,
    CreateTopicsResponse,
    DeleteTopicsRequest,
    DeleteTopicsResponse,
    DescribeClusterRequest,
    DescribeClusterResponse,
    FetchPartitionResult,
    FetchRequest,
    FetchResponse,
    FindCoordinatorRequest,
    FindCoordinatorResponse,
    ListOffsetsPartitionResult,
    ListOffsetsRequest,
    ListOffsetsResponse,
    MetadataRequest,
    MetadataResponse,
    OffsetCommitPartitionResult,
    OffsetCommitRequest,
    OffsetCommitResponse,
    OffsetFetchPartitionResult,
    OffsetFetchRequest,
    OffsetFetchResponse,
    PartitionMetadata,
    PartitionState,
    ProducePartitionResult,
    ProduceRequest,
    ProduceResponse,
    RaftMember,
    RemoveNodeRequest,
    RemoveNodeResponse,
    ReplicaState,
    ReplicaStatusRequest,
    ReplicaStatusResponse,
    TopicMetadata,
    TopicResult,
)
from dlog.net.server import RpcServer
from dlog.storage.batch import (
    BatchBuilder,
    Record,
    assign_offsets,
    decode_records,
    validate_batches,
)

DROP = "drop"
DROP_AFTER_APPEND = "drop_after_append"


@dataclass
class FakePartition:
    topic: str
    index: int
    leader: int | None
    replicas: list[int]
    leader_epoch: int = 0
    #: (base_offset, next_offset, batch bytes with offsets assigned)
    batches: list[tuple[int, int, bytes]] = field(default_factory=list)
    log_start_offset: int = 0
    log_end_offset: int = 0
    high_watermark: int = 0
    hold_high_watermark: bool = False
    #: Produce requests being handled for this partition right now (must stay <= 1).
    producing: int = 0

    @property
    def isr(self) -> list[int]:
        return list(self.replicas)

    def records(self) -> list[Record]:
        return decode_records(b"".join(b for _, _, b in self.batches))

    def values(self) -> list[bytes | None]:
        return [r.value for r in self.records()]


@dataclass
class FakeTopic:
    name: str
    topic_id: str
    partitions: list[FakePartition]
    configs: dict[str, str] = field(default_factory=dict)
    internal: bool = False


@dataclass
class Fault:
    op: str
    code: int | str
    topic: str | None
    partition: int | None
    node: int | None
    times: int
    details: dict[str, Any]


class FakeCluster:
    """Shared state of all fake brokers (see the module docstring)."""

    def __init__(self, nodes: int, *, transport: str = "memory") -> None:
        self.transport = transport
        self.cluster_id = "fake-cluster"
        self.clock = ManualClock()
        self.brokers: dict[int, FakeBroker] = {i: FakeBroker(self, i) for i in range(1, nodes + 1)}
        self.topics: dict[str, FakeTopic] = {}
        self.offsets: dict[tuple[str, str, int], int] = {}
        self.coordinator = 1
        self.metadata_index = 1
        self.faults: list[Fault] = []
        self.requests: list[tuple[int, str, Message]] = []
        self.produce_gate: trio.Event | None = None
        #: Brokers whose metadata, produce and fetch handlers never answer (as if the
        #: process were paused).
        self.hung_nodes: set[int] = set()
        #: Applied once to the next partition data a fetch returns (then cleared).
        self.mangle_fetch: Callable[[bytes], bytes] | None = None
        #: Produce requests that overlapped another for the same partition.
        self.overlapping_produces = 0
        self.changed = trio.Event()
        self._request_seen = trio.Event()
        self._nursery: trio.Nursery | None = None

    # --- set-up --------------------------------------------------------------------------

    @property
    def bootstrap(self) -> str:
        return ",".join(b.address for b in self.brokers.values())

    def create_topic(
        self,
        name: str,
        partitions: int = 1,
        replication_factor: int = 1,
        *,
        leaders: list[int] | None = None,
        configs: dict[str, str] | None = None,
        internal: bool = False,
    ) -> FakeTopic:
        nodes = sorted(self.brokers)
        parts = []
        for p in range(partitions):
            leader = leaders[p] if leaders is not None else nodes[p % len(nodes)]
            replicas = [leader]
            if leader in nodes:
                start = nodes.index(leader)
                replicas += [
                    nodes[(start + k) % len(nodes)]
                    for k in range(1, min(replication_factor, len(nodes)))
                ]
            parts.append(FakePartition(topic=name, index=p, leader=leader, replicas=replicas))
        topic = FakeTopic(
            name=name,
            topic_id=uuid.uuid4().hex,
            partitions=parts,
            configs=dict(configs or {}),
            internal=internal,
        )
        self.topics[name] = topic
        self.metadata_index += 1
        return topic

    def partition(self, topic: str, partition: int) -> FakePartition:
        return self.topics[topic].partitions[partition]

    def append_values(self, topic: str, partition: int, values: list[bytes]) -> None:
        """Write records straight into a log (as if produced earlier)."""
        builder = BatchBuilder(self.clock.now_ms())
        builder.append_values(values)
        self._append(self.partition(topic, partition), bytes(builder.build()))

    def move_leader(self, topic: str, partition: int, node: int | None) -> None:
        part = self.partition(topic, partition)
        part.leader = node
        part.leader_epoch += 1
        if node is not None and node not in part.replicas:
            part.replicas.append(node)
        self.metadata_index += 1

    def delete_records_before(self, topic: str, partition: int, offset: int) -> None:
        """Retention: drop whole batches that end at or below ``offset``."""
        part = self.partition(topic, partition)
        part.batches = [b for b in part.batches if b[1] > offset]
        part.log_start_offset = part.batches[0][0] if part.batches else part.log_end_offset

    def set_high_watermark(self, topic: str, partition: int, hw: int) -> None:
        part = self.partition(topic, partition)
        part.high_watermark = hw
        self._notify()

    def inject(
        self,
        op: str,
        code: int | str,
        *,
        topic: str | None = None,
        partition: int | None = None,
        node: int | None = None,
        times: int = 1,
        **details: Any,
    ) -> None:
        """The next ``times`` matching ``op`` requests (per partition for produce,
        fetch, list_offsets) fail with ``code`` (or DROP / DROP_AFTER_APPEND)."""
        self.faults.append(Fault(op, code, topic, partition, node, times, details))

    def stop_broker(self, node: int) -> None:
        self.brokers[node].stop()

    async def start_broker(self, node: int) -> None:
        await self.brokers[node].start()

    def requests_of(self, op: str) -> list[tuple[int, Message]]:
        return [(n, r) for n, o, r in self.requests if o == op]

    async def wait_for_requests(self, op: str, count: int) -> None:
        """Wait until ``count`` requests of ``op`` have reached the brokers."""
        while len(self.requests_of(op)) < count:
            await self._request_seen.wait()

    @asynccontextmanager
    async def connect(self, **options: Any) -> AsyncIterator[dlog.Client]:
        """``dlog.connect`` to this cluster (through memory streams or TCP)."""
        rng = random.Random(7)
        if self.transport == "memory":
            async with (
                open_memory_pool(self, rng) as pool,
                dlog.connect(
                    self.bootstrap, pool=pool, clock=self.clock, rng=rng, **options
                ) as client,
            ):
                yield client
        else:
            async with dlog.connect(self.bootstrap, clock=self.clock, rng=rng, **options) as c:
                yield c

    # --- shared logic -------------------------------------------------------------------

    def _take_fault(
        self, op: str, node: int, topic: str | None = None, partition: int | None = None
    ) -> Fault | None:
        for fault in self.faults:
            if (
                fault.op == op
                and fault.times > 0
                and (fault.node is None or fault.node == node)
                and (fault.topic is None or fault.topic == topic)
                and (fault.partition is None or fault.partition == partition)
            ):
                fault.times -= 1
                if fault.times == 0:
                    self.faults.remove(fault)
                return fault
        return None

    def _append(self, part: FakePartition, data: bytes) -> tuple[int, int]:
        buf = bytearray(data)
        headers = validate_batches(
            buf, now_ms=None, max_timestamp_skew_ms=0, max_batch_bytes=64 << 20
        )
        first = part.log_end_offset
        assign_offsets(buf, headers, first, part.leader_epoch)
        offset = first
        for h in headers:
            size = h.size
            part.batches.append(
                (offset, offset + h.record_count, bytes(buf[h.position : h.position + size]))
            )
            offset += h.record_count
        part.log_end_offset = offset
        if not part.hold_high_watermark:
            part.high_watermark = offset
        self._notify()
        return first, offset - 1

    def _notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def _broker_infos(self) -> list[BrokerInfo]:
        return [
            BrokerInfo(node_id=b.node_id, rpc=b.address, alive=not b.down)
            for b in self.brokers.values()
            if not b.removed
        ]

    def _topic_metadata(self, topic: FakeTopic) -> TopicMetadata:
        return TopicMetadata(
            name=topic.name,
            topic_id=topic.topic_id,
            partitions=[
                PartitionMetadata(
                    partition=p.index,
                    leader=p.leader,
                    leader_epoch=p.leader_epoch,
                    replicas=list(p.replicas),
                    isr=p.isr,
                )
                for p in topic.partitions
            ],
            configs=dict(topic.configs),
            internal=topic.internal,
        )


class FakeBroker:
    """One fake broker: an RpcServer whose handlers read and write the cluster."""

    def __init__(self, cluster: FakeCluster, node_id: int) -> None:
        self.cluster = cluster
        self.node_id = node_id
        self.down = False
        self.removed = False
        self.port = 0
        self._scope: trio.CancelScope | None = None
        self.server = RpcServer(
            {
                "metadata": self._metadata,
                "produce": self._produce,
                "fetch": self._fetch,
                "list_offsets": self._list_offsets,
                "find_coordinator": self._find_coordinator,
                "offset_commit": self._offset_commit,
                "offset_fetch": self._offset_fetch,
                "create_topics": self._create_topics,
                "delete_topics": self._delete_topics,
                "alter_topic": self._alter_topic,
                "replica_status": self._replica_status,
                "describe_cluster": self._describe_cluster,
                "cluster_status": self._cluster_status,
                "remove_node": self._remove_node,
            },
            name=f"fake-broker-{node_id}",
        )

    @property
    def address(self) -> str:
        if self.cluster.transport == "memory":
            return f"broker{self.node_id}.fake:9092"
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.down = True
        self.server.refuse_connections = True
        self.server.drop_connections()
        if self._scope is not None:
            self._scope.cancel()
            self._scope = None

    async def start(self) -> None:
        self.down = False
        self.server.refuse_connections = False
        if self.cluster.transport == "tcp":
            assert self.cluster._nursery is not None
            await self.cluster._nursery.start(self._serve_tcp)

    async def _serve_tcp(self, *, task_status: trio.TaskStatus[None]) -> None:
        with trio.CancelScope() as scope:
            self._scope = scope

            async def run(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
                await self.server.run("127.0.0.1", self.port, task_status=task_status)

            async with trio.open_nursery() as nursery:
                self.port = await nursery.start(run)
                task_status.started()

    def _log(self, op: str, request: Message) -> None:
        c = self.cluster
        c.requests.append((self.node_id, op, request))
        c._request_seen.set()
        c._request_seen = trio.Event()

    def _request_fault(self, op: str) -> None:
        fault = self.cluster._take_fault(op, self.node_id)
        if fault is not None:
            assert isinstance(fault.code, int)
            raise error_from_wire(fault.code, f"injected {op} fault", fault.details)

    async def _drop(self) -> None:
        self.server.drop_connections()
        await trio.sleep_forever()

    # --- metadata ----------------------------------------------------------------------

    async def _metadata(self, req: MetadataRequest) -> MetadataResponse:
        self._log("metadata", req)
        self._request_fault("metadata")
        c = self.cluster
        if self.node_id in c.hung_nodes:
            await trio.sleep_forever()  # a paused process: no answer, no error
        if req.topics is None:
            topics = [c._topic_metadata(t) for t in c.topics.values()]
        else:
            topics = []
            for name in req.topics:
                topic = c.topics.get(name)
                if topic is None:
                    topics.append(
                        TopicMetadata(
                            name=name,
                            error_code=ErrorCode.UNKNOWN_TOPIC_OR_PARTITION,
                            error_message=f"topic {name!r} does not exist",
                        )
                    )
                else:
                    topics.append(c._topic_metadata(topic))
        return MetadataResponse(
            cluster_id=c.cluster_id,
            controller=min(c.brokers),
            brokers=c._broker_infos(),
            topics=topics,
            metadata_index=c.metadata_index,
        )

    # --- produce -------------------------------------------------------------------------

    async def _produce(self, req: ProduceRequest) -> ProduceResponse:
        self._log("produce", req)
        c = self.cluster
        payload = payload_bytes(req.payload)
        pos = 0
        results = []
        drop_after = False
        touched: list[FakePartition] = []
        try:
            for entry in req.partitions:
                data = payload[pos : pos + entry.size]
                pos += entry.size
                fault = c._take_fault("produce", self.node_id, entry.topic, entry.partition)
                if fault is not None and fault.code == DROP:
                    await self._drop()
                if fault is not None and fault.code == DROP_AFTER_APPEND:
                    drop_after = True
                    fault = None
                topic = c.topics.get(entry.topic)
                if topic is None or not 0 <= entry.partition < len(topic.partitions):
                    results.append(_produce_error(entry, ErrorCode.UNKNOWN_TOPIC_OR_PARTITION))
                    continue
                part = topic.partitions[entry.partition]
                part.producing += 1
                touched.append(part)
                if part.producing > 1:
                    c.overlapping_produces += 1
                if fault is not None:
                    assert isinstance(fault.code, int)
                    results.append(
                        _produce_error(
                            entry,
                            fault.code,
                            leader=fault.details.get("leader", part.leader),
                            leader_epoch=fault.details.get("leader_epoch", part.leader_epoch),
                        )
                    )
                    continue
                if part.leader != self.node_id:
                    results.append(
                        _produce_error(
                            entry,
                            ErrorCode.NOT_LEADER_OR_FOLLOWER,
                            leader=part.leader,
                            leader_epoch=part.leader_epoch,
                        )
                    )
                    continue
                try:
                    first, last = c._append(part, data)
                except DlogError as exc:
                    results.append(_produce_error(entry, exc.code, message=exc.message))
                    continue
                results.append(
                    ProducePartitionResult(
                        topic=entry.topic,
                        partition=entry.partition,
                        base_offset=first,
                        last_offset=last,
                        log_start_offset=part.log_start_offset,
                    )
                )
            if c.produce_gate is not None:
                await c.produce_gate.wait()
            if self.node_id in c.hung_nodes:
                await trio.sleep_forever()  # a paused process: no answer, no error
            if req.acks == -1:
                await self._wait_for_hw(req, results)
            if drop_after:
                await self._drop()
            return ProduceResponse(partitions=results)
        finally:
            for part in touched:
                part.producing -= 1

    async def _wait_for_hw(
        self, req: ProduceRequest, results: list[ProducePartitionResult]
    ) -> None:
        c = self.cluster
        with trio.move_on_after(req.timeout_ms / 1000):
            while True:
                waiting = [
                    r
                    for r in results
                    if not r.error_code
                    and c.partition(r.topic, r.partition).high_watermark <= r.last_offset
                ]
                if not waiting:
                    return
                await c.changed.wait()
        for i, r in enumerate(results):
            if (
                not r.error_code
                and c.partition(r.topic, r.partition).high_watermark <= r.last_offset
            ):
                results[i] = ProducePartitionResult(
                    topic=r.topic,
                    partition=r.partition,
                    error_code=ErrorCode.REQUEST_TIMED_OUT,
                    error_message="acks=all: the high watermark did not pass the batch",
                )

    # --- fetch ---------------------------------------------------------------------------

    async def _fetch(self, req: FetchRequest) -> FetchResponse:
        self._log("fetch", req)
        c = self.cluster
        if self.node_id in c.hung_nodes:
            await trio.sleep_forever()  # a paused process: no answer, no error
        deadline = trio.current_time() + req.max_wait_ms / 1000
        while True:
            results, chunks, total, errors = self._read(req)
            if total >= req.min_bytes or errors or trio.current_time() >= deadline:
                return FetchResponse(partitions=results, payload=chunks)
            with trio.move_on_at(deadline):
                await c.changed.wait()

    def _read(self, req: FetchRequest) -> tuple[list[FetchPartitionResult], list[bytes], int, bool]:
        c = self.cluster
        results: list[FetchPartitionResult] = []
        chunks: list[bytes] = []
        total = 0
        errors = False
        for fp in req.partitions:
            fault = c._take_fault("fetch", self.node_id, fp.topic, fp.partition)
            topic = c.topics.get(fp.topic)
            if topic is None or not 0 <= fp.partition < len(topic.partitions):
                results.append(
                    FetchPartitionResult(
                        topic=fp.topic,
                        partition=fp.partition,
                        error_code=ErrorCode.UNKNOWN_TOPIC_OR_PARTITION,
                    )
                )
                errors = True
                continue
            part = topic.partitions[fp.partition]
            code = 0
            if fault is not None:
                assert isinstance(fault.code, int)
                code = fault.code
            elif part.leader != self.node_id:
                code = ErrorCode.NOT_LEADER_OR_FOLLOWER
            elif (
                fp.current_leader_epoch != NO_EPOCH and fp.current_leader_epoch < part.leader_epoch
            ):
                code = ErrorCode.FENCED_LEADER_EPOCH
            elif fp.current_leader_epoch > part.leader_epoch:
                code = ErrorCode.UNKNOWN_LEADER_EPOCH
            elif not part.log_start_offset <= fp.fetch_offset <= part.log_end_offset:
                code = ErrorCode.OFFSET_OUT_OF_RANGE
            if code:
                errors = True
                results.append(
                    FetchPartitionResult(
                        topic=fp.topic,
                        partition=fp.partition,
                        error_code=code,
                        error_message="fake fetch error",
                        high_watermark=part.high_watermark,
                        log_start_offset=part.log_start_offset,
                        log_end_offset=part.log_end_offset,
                        leader=part.leader,
                        leader_epoch=part.leader_epoch,
                    )
                )
                continue
            size = 0
            first_chunk = len(chunks)
            for base, nxt, data in part.batches:
                if nxt <= fp.fetch_offset:
                    continue
                if base >= part.high_watermark:
                    break
                if nxt > part.high_watermark:
                    break  # a batch only partly below the HW is not served yet
                if size and size + len(data) > fp.partition_max_bytes:
                    break
                if (size or total) and total + len(data) > req.max_bytes:
                    break
                chunks.append(data)
                size += len(data)
                total += len(data)
            if size and c.mangle_fetch is not None:
                mangled = c.mangle_fetch(b"".join(chunks[first_chunk:]))
                c.mangle_fetch = None
                del chunks[first_chunk:]
                chunks.append(mangled)
                total += len(mangled) - size
                size = len(mangled)
            results.append(
                FetchPartitionResult(
                    topic=fp.topic,
                    partition=fp.partition,
                    high_watermark=part.high_watermark,
                    log_start_offset=part.log_start_offset,
                    log_end_offset=part.log_end_offset,
                    size=size,
                )
            )
        return results, chunks, total, errors

    # --- offsets -------------------------------------------------------------------------

    async def _list_offsets(self, req: ListOffsetsRequest) -> ListOffsetsResponse:
        self._log("list_offsets", req)
        c = self.cluster
        out = []
        for q in req.partitions:
            fault = c._take_fault("list_offsets", self.node_id, q.topic, q.partition)
            topic = c.topics.get(q.topic)
            if topic is None or not 0 <= q.partition < len(topic.partitions):
                out.append(
                    ListOffsetsPartitionResult(
                        topic=q.topic,
                        partition=q.partition,
                        error_code=ErrorCode.UNKNOWN_TOPIC_OR_PARTITION,
                    )
                )
                continue
            part = topic.partitions[q.partition]
            if fault is not None or part.leader != self.node_id:
                code = int(fault.code) if fault is not None else ErrorCode.NOT_LEADER_OR_FOLLOWER
                out.append(
                    ListOffsetsPartitionResult(
                        topic=q.topic,
                        partition=q.partition,
                        error_code=code,
                        leader=part.leader,
                        leader_epoch=part.leader_epoch,
                    )
                )
                continue
            if q.timestamp == EARLIEST_TIMESTAMP:
                offset, ts = part.log_start_offset, -1
            elif q.timestamp == LATEST_TIMESTAMP:
                offset, ts = part.high_watermark, -1
            else:
                found = next((r for r in part.records() if r.timestamp >= q.timestamp), None)
                offset, ts = (-1, -1) if found is None else (found.offset, found.timestamp)
            out.append(
                ListOffsetsPartitionResult(
                    topic=q.topic, partition=q.partition, offset=offset, timestamp=ts
                )
            )
        return ListOffsetsResponse(partitions=out)

    async def _find_coordinator(self, req: FindCoordinatorRequest) -> FindCoordinatorResponse:
        self._log("find_coordinator", req)
        self._request_fault("find_coordinator")
        c = self.cluster
        return FindCoordinatorResponse(node_id=c.coordinator, rpc=c.brokers[c.coordinator].address)

    async def _offset_commit(self, req: OffsetCommitRequest) -> OffsetCommitResponse:
        self._log("offset_commit", req)
        self._request_fault("offset_commit")
        c = self.cluster
        out = []
        for p in req.partitions:
            if c.coordinator != self.node_id:
                out.append(
                    OffsetCommitPartitionResult(
                        topic=p.topic,
                        partition=p.partition,
                        error_code=ErrorCode.NOT_COORDINATOR,
                        error_message="not the coordinator",
                    )
                )
                continue
            c.offsets[req.group, p.topic, p.partition] = p.offset
            out.append(OffsetCommitPartitionResult(topic=p.topic, partition=p.partition))
        return OffsetCommitResponse(partitions=out)

    async def _offset_fetch(self, req: OffsetFetchRequest) -> OffsetFetchResponse:
        self._log("offset_fetch", req)
        self._request_fault("offset_fetch")
        c = self.cluster
        if c.coordinator != self.node_id:
            raise NotCoordinatorError(f"node {self.node_id} is not the coordinator")
        if req.partitions is None:
            keys = [(t, p) for (g, t, p) in c.offsets if g == req.group]
        else:
            keys = [(r.topic, r.partition) for r in req.partitions]
        return OffsetFetchResponse(
            partitions=[
                OffsetFetchPartitionResult(
                    topic=t, partition=p, offset=c.offsets.get((req.group, t, p), -1)
                )
                for t, p in keys
            ]
        )

    # --- admin ---------------------------------------------------------------------------

    async def _create_topics(self, req: CreateTopicsRequest) -> CreateTopicsResponse:
        self._log("create_topics", req)
        self._request_fault("create_topics")
        c = self.cluster
        out = []
        for t in req.topics:
            code, message = 0, ""
            if not t.name or any(ch not in _TOPIC_CHARS for ch in t.name):
                code, message = ErrorCode.INVALID_TOPIC_EXCEPTION, f"invalid topic name {t.name!r}"
            elif t.name in c.topics:
                code, message = ErrorCode.TOPIC_ALREADY_EXISTS, f"topic {t.name!r} already exists"
            elif t.partitions < 1:
                code, message = ErrorCode.INVALID_PARTITIONS, "partitions must be at least 1"
            elif (t.replication_factor or 1) > len(c.brokers):
                code, message = (
                    ErrorCode.INVALID_REPLICATION_FACTOR,
                    f"replication factor {t.replication_factor} is more than the"
                    f" {len(c.brokers)} brokers",
                )
            if code:
                out.append(TopicResult(name=t.name, error_code=code, error_message=message))
                continue
            rf = t.replication_factor or min(3, len(c.brokers))
            topic = c.create_topic(t.name, t.partitions, rf, configs=t.configs)
            out.append(TopicResult(name=t.name, topic_id=topic.topic_id))
        return CreateTopicsResponse(topics=out)

    async def _delete_topics(self, req: DeleteTopicsRequest) -> DeleteTopicsResponse:
        self._log("delete_topics", req)
        c = self.cluster
        out = []
        for name in req.topics:
            topic = c.topics.pop(name, None)
            if topic is None:
                out.append(
                    TopicResult(
                        name=name,
                        error_code=ErrorCode.UNKNOWN_TOPIC_OR_PARTITION,
                        error_message=f"topic {name!r} does not exist",
                    )
                )
            else:
                c.metadata_index += 1
                out.append(TopicResult(name=name, topic_id=topic.topic_id))
        return DeleteTopicsResponse(topics=out)

    async def _alter_topic(self, req: AlterTopicRequest) -> AlterTopicResponse:
        self._log("alter_topic", req)
        c = self.cluster
        topic = c.topics.get(req.name)
        if topic is None:
            # As the real controller answers it: the whole request fails.
            raise error_from_wire(
                ErrorCode.UNKNOWN_TOPIC_OR_PARTITION, f"topic {req.name!r} does not exist"
            )
        if req.partitions is not None and req.partitions < len(topic.partitions):
            return AlterTopicResponse(
                topic=TopicResult(
                    name=req.name,
                    error_code=ErrorCode.INVALID_PARTITIONS,
                    error_message="partitions can only grow",
                )
            )
        nodes = sorted(c.brokers)
        while req.partitions is not None and len(topic.partitions) < req.partitions:
            p = len(topic.partitions)
            leader = nodes[p % len(nodes)]
            topic.partitions.append(
                FakePartition(topic=req.name, index=p, leader=leader, replicas=[leader])
            )
        for key, value in req.configs.items():
            if value is None:
                topic.configs.pop(key, None)
            else:
                topic.configs[key] = value
        c.metadata_index += 1
        return AlterTopicResponse(topic=TopicResult(name=req.name, topic_id=topic.topic_id))

    async def _replica_status(self, req: ReplicaStatusRequest) -> ReplicaStatusResponse:
        self._log("replica_status", req)
        c = self.cluster
        out = []
        for topic in c.topics.values():
            if req.topics is not None and topic.name not in req.topics:
                continue
            for p in topic.partitions:
                if self.node_id not in p.replicas:
                    continue
                out.append(
                    PartitionState(
                        topic=topic.name,
                        partition=p.index,
                        role="leader" if p.leader == self.node_id else "follower",
                        leader_epoch=p.leader_epoch,
                        log_start_offset=p.log_start_offset,
                        log_end_offset=p.log_end_offset,
                        high_watermark=p.high_watermark,
                        replicas=[
                            ReplicaState(node_id=n, log_end_offset=p.log_end_offset)
                            for n in p.replicas
                        ],
                    )
                )
        return ReplicaStatusResponse(node_id=self.node_id, partitions=out)

    async def _describe_cluster(self, req: DescribeClusterRequest) -> DescribeClusterResponse:
        self._log("describe_cluster", req)
        c = self.cluster
        return DescribeClusterResponse(
            cluster_id=c.cluster_id,
            controller=min(c.brokers),
            brokers=c._broker_infos(),
            raft_members=[
                RaftMember(
                    node_id=b.node_id,
                    directory_id=f"dir-{b.node_id}",
                    address=b.address,
                    role="voter",
                )
                for b in c.brokers.values()
                if not b.removed
            ],
            metadata_index=c.metadata_index,
        )

    async def _cluster_status(self, req: ClusterStatusRequest) -> ClusterStatusResponse:
        self._log("cluster_status", req)
        c = self.cluster
        return ClusterStatusResponse(
            cluster_id=c.cluster_id,
            answered_by=self.node_id,
            controller=min(c.brokers),
            metadata_index=c.metadata_index,
            brokers=c._broker_infos(),
            raft_roles={str(n): "voter" for n in c.brokers},
            topics=[c._topic_metadata(t) for t in c.topics.values()],
            replicas=[],
            unreachable=[],
        )

    async def _remove_node(self, req: RemoveNodeRequest) -> RemoveNodeResponse:
        self._log("remove_node", req)
        c = self.cluster
        broker = c.brokers.get(req.node_id)
        if broker is None:
            raise error_from_wire(ErrorCode.BROKER_ID_NOT_REGISTERED, f"no node {req.node_id}")
        broker.removed = True
        c.metadata_index += 1
        return RemoveNodeResponse()


_TOPIC_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def _produce_error(
    entry: Any,
    code: int,
    *,
    message: str = "",
    leader: int | None = None,
    leader_epoch: int = NO_EPOCH,
) -> ProducePartitionResult:
    return ProducePartitionResult(
        topic=entry.topic,
        partition=entry.partition,
        error_code=code,
        error_message=message or f"fake produce error {code}",
        leader=leader,
        leader_epoch=leader_epoch,
    )


class MemoryRpcPool(RpcPool):
    """An RpcPool whose connections are in-memory streams to the fake brokers."""

    def __init__(
        self, nursery: trio.Nursery, config: ClientConfig, rng: random.Random, cluster: FakeCluster
    ) -> None:
        super().__init__(nursery, config, rng)
        self._cluster = cluster

    async def _open_stream(self, address: str) -> trio.abc.Stream:
        broker = next((b for b in self._cluster.brokers.values() if b.address == address), None)
        if broker is None or broker.down:
            raise OSError(f"connection to {address} refused")
        client_side, server_side = trio.testing.memory_stream_pair()
        assert self._cluster._nursery is not None
        self._cluster._nursery.start_soon(broker.server.serve_stream, server_side)
        return client_side


@asynccontextmanager
async def open_memory_pool(
    cluster: FakeCluster, rng: random.Random, config: ClientConfig | None = None
) -> AsyncIterator[MemoryRpcPool]:
    body_error: BaseException | None = None
    async with trio.open_nursery() as nursery:
        pool = MemoryRpcPool(nursery, config or ClientConfig(), rng, cluster)
        try:
            yield pool
        except BaseException as exc:
            body_error = exc
        pool.close()
        nursery.cancel_scope.cancel()
    if body_error is not None:
        raise body_error


@asynccontextmanager
async def open_fake_cluster(
    nodes: int = 1, *, transport: str = "memory"
) -> AsyncIterator[FakeCluster]:
    """A running fake cluster of ``nodes`` brokers (ids 1..nodes)."""
    cluster = FakeCluster(nodes, transport=transport)
    body_error: BaseException | None = None
    async with trio.open_nursery() as nursery:
        cluster._nursery = nursery
        if transport == "tcp":
            for broker in cluster.brokers.values():
                await broker.start()
        try:
            yield cluster
        except BaseException as exc:
            body_error = exc
        nursery.cancel_scope.cancel()
    if body_error is not None:
        raise body_error
