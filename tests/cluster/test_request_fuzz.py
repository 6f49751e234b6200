"""Hostile but well-typed requests against real brokers.

Every operation a broker's RPC port serves gets bodies built from the real message
dataclasses, with values of the declared types that a correct client would never send:
negative and huge offsets, partitions and epochs, zero, negative and huge sizes and
timeouts, acks outside {-1, 0, 1}, odd topic and group names, unknown brokers and
topics, duplicated partitions, payloads that are empty, garbage, truncated or oddly
headed record batches, payloads on operations that take none; some sent one-way, as
acks=none produce requests are. (Values of the wrong type are the codec's to refuse:
none are sent here.) Operations served on other ports (Raft's, gossip's) are sent too,
and must be refused as unknown here.

Properties, for every request: the call ends within a deadline with a response or a
DlogError; the error is never UNKNOWN_SERVER_ERROR, neither for the whole request nor
in any per-partition result (a handler crashed); the servers count no handler crash;
and no broker logs an ERROR (a failure some task caught and survived, e.g. a metadata
change it could not apply). Afterwards every broker is still up, produces and
consumes, every record produced before the fuzzing is still there, unchanged, and so
is a group's committed offset.

A long-polling fetch is answered at its own ``max_wait_ms``, as Kafka's broker does
(it does not cap it; a client bounds the wait with its request timeout): one that asks
for longer than this test waits may end with the client's REQUEST_TIMED_OUT. An
acks=all produce likewise waits its own ``timeout_ms``.

Requests that would do what they legitimately say to what is checked afterwards
(delete or reconfigure the seeded topics or the offsets topic, shut down, remove or
re-register a real broker) are not sent: those are the protocol working, not breaking.

Hypothesis drives a synchronous test; the brokers run in a trio.run of their own in a
worker thread (one cluster for all examples: starting one per example takes seconds),
and each example is sent to them with ``trio.from_thread.run``. Examples share the
cluster, so a failure may show an example or two after the request that caused it
(hypothesis then reports it as flaky; the broker's own error says what happened).
DLOG_FUZZ_EXAMPLES overrides the number of examples of each test.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

import crc32c
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dlog.broker.offsets import OFFSETS_TOPIC
from dlog.errors import DlogError, ErrorCode, RequestTimedOutError
from dlog.gossip.node import GossipPushPullRequest
from dlog.net.client import ClientConfig, RpcPool, open_rpc_pool
from dlog.net.messages import ApiVersionsRequest, EchoRequest, Message, operations, payload_bytes
from dlog.net.protocol import (
    AlterPartitionRequest,
    AlterTopicRequest,
    BrokerRegistrationRequest,
    ClusterStatusRequest,
    ControlledShutdownRequest,
    CreateTopicsRequest,
    DeleteTopicsRequest,
    DescribeClusterRequest,
    EpochQuery,
    FetchPartition,
    FetchRequest,
    FetchResponse,
    FindCoordinatorRequest,
    ListOffsetsPartition,
    ListOffsetsRequest,
    MetadataRequest,
    NewTopic,
    OffsetCommitPartition,
    OffsetCommitRequest,
    OffsetFetchRequest,
    OffsetsForLeaderEpochRequest,
    ProducePartition,
    ProduceRequest,
    RemoveNodeRequest,
    ReplicaStatusRequest,
    TopicPartitionRef,
)
from dlog.raft.transport import RaftBatchRequest
from dlog.storage import build_batch, decode_records, parse_batches
from tests.cluster.inprocess import InProcessCluster, inprocess_cluster

pytestmark = pytest.mark.timeout(180)

TOPIC = "fuzzed"
PARTITIONS = 3
#: A topic whose produce requests fsync before they are answered (a Deferred answer).
FSYNC_TOPIC = "fuzzed-fsync"
#: Topics holding records from before the fuzzing, which requests may not delete or
#: reconfigure: name -> (partitions, configs).
SEEDED_TOPICS: dict[str, tuple[int, dict[str, str]]] = {
    TOPIC: (PARTITIONS, {}),
    FSYNC_TOPIC: (1, {"flush_messages": "1"}),
}
SEEDED_PER_PARTITION = 20
#: A group whose commit (to TOPIC-0) no request names, and which must stay.
KEPT_GROUP, KEPT_OFFSET = "kept-group", 7
#: A request must be answered this fast (the broker is local and idle).
ANSWER_WITHIN_S = 5.0
#: A long poll asking to wait longer than this is left to the client's timeout.
LONG_POLL_S = 1.0
I64_MIN, I64_MAX = -(1 << 63), (1 << 63) - 1
NOW_MS = 1_700_000_000_000

_T = TypeVar("_T")


# --- the broker under fuzz, in a thread of its own ------------------------------------


class _ErrorLog(logging.Handler):
    def __init__(self, into: list[str]) -> None:
        super().__init__(logging.ERROR)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(f"{record.name}: {record.getMessage()}")


class FuzzedCluster:
    """A real in-process cluster and a raw RPC pool, run by ``trio.run`` in a worker
    thread; :meth:`run` calls an async function there from the test's thread."""

    def __init__(self, root: Path, nodes: int) -> None:
        self.root = root
        self.nodes = nodes
        self.cluster: InProcessCluster
        self.pool: RpcPool
        #: (topic, partition, offset) -> value of every record produced before fuzzing.
        self.seeded: dict[tuple[str, int, int], bytes] = {}
        self.topic_ids: list[str] = []
        self.cluster_id = ""
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="fuzzed-cluster", daemon=True)
        #: What the brokers logged at ERROR or worse: a failure some handler or task
        #: survived (caught and logged), which the answers alone may not show.
        self.errors_logged: list[str] = []
        self._error_log = _ErrorLog(self.errors_logged)

    @property
    def addresses(self) -> list[str]:
        return self.cluster.bootstrap

    @property
    def node_ids(self) -> list[int]:
        return sorted(self.cluster.members)

    def leader_address(self, topic: str, partition: int) -> str:
        member = self.cluster.controller() or self.cluster.members[self.node_ids[0]]
        info = member.broker.image.partition(topic, partition)
        assert info is not None and info.leader is not None
        return self.cluster.members[info.leader].addresses.rpc

    def handler_crashes(self) -> int:
        return sum(m.broker.rpc_server.stats.handler_crashes for m in self.cluster.members.values())

    def run(self, fn: Callable[..., Awaitable[_T]], *args: Any) -> _T:
        if self._error is not None:
            raise AssertionError("the cluster stopped") from self._error
        assert self._token is not None
        try:
            return trio.from_thread.run(fn, *args, trio_token=self._token)
        except BaseException:
            self._thread.join(timeout=10)  # if the cluster failed, say why
            if self._error is not None:
                raise AssertionError("the cluster stopped") from self._error
            raise

    def __enter__(self) -> FuzzedCluster:
        logging.getLogger("dlog").addHandler(self._error_log)
        self._thread.start()
        self._ready.wait(timeout=120)
        if self._error is not None:
            raise AssertionError("the cluster did not start") from self._error
        assert self._token is not None, "the cluster did not start in time"
        return self

    def __exit__(self, *exc_info: object) -> None:
        logging.getLogger("dlog").removeHandler(self._error_log)
        if self._token is not None and self._stop is not None:
            try:
                trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
            except trio.RunFinishedError:
                pass
        self._thread.join(timeout=60)
        assert not self._thread.is_alive(), "the cluster did not stop"
        if self._error is not None and exc_info[0] is None:
            raise AssertionError("the cluster failed") from self._error

    def _main(self) -> None:
        try:
            trio.run(self._serve)
        except BaseException as exc:
            self._error = exc
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        self._stop = trio.Event()
        async with (
            inprocess_cluster(self.root, nodes=self.nodes, offsets_topic_partitions=2) as cluster,
            open_rpc_pool(ClientConfig(request_timeout_s=ANSWER_WITHIN_S)) as pool,
        ):
            self.cluster = cluster
            self.pool = pool
            await self._seed()
            self._token = trio.lowlevel.current_trio_token()
            self._ready.set()
            await self._stop.wait()

    async def _seed(self) -> None:
        async with self.cluster.client() as client:
            for topic, (partitions, configs) in SEEDED_TOPICS.items():
                await client.create_topic(
                    topic, partitions=partitions, replication_factor=self.nodes, config=configs
                )
                await client.wait_for_topic(topic)
            async with client.producer(acks="all") as producer:
                for topic, (partitions, _) in SEEDED_TOPICS.items():
                    for partition in range(partitions):
                        for i in range(SEEDED_PER_PARTITION):
                            value = b"%s-%d-%d" % (topic.encode(), partition, i)
                            meta = await producer.send(topic, value, partition=partition)
                            self.seeded[(topic, meta.partition, meta.offset)] = value
            # The offsets topic exists and groups have commits: "seeded", which requests
            # commit to, and KEPT_GROUP, whose commits must stay.
            for group, offset in (("seeded", 1), (KEPT_GROUP, KEPT_OFFSET)):
                async with client.consumer(TOPIC, group=group, partitions=0) as consumer:
                    await consumer.commit({0: offset})
        image = self.cluster.members[self.node_ids[0]].broker.image
        self.topic_ids = [t.topic_id for t in image.topics.values()]
        member = next(iter(self.cluster.members.values()))
        self.cluster_id = member.broker.cluster_id


# --- sending one request and checking the answer -----------------------------------------


def _error_codes(value: Any) -> Iterator[int]:
    """Every ``error_code`` in a response, nested structs included."""
    if isinstance(value, list | tuple):
        for item in value:
            yield from _error_codes(item)
    elif is_dataclass(value):
        for f in fields(value):
            if f.name == "error_code":
                yield getattr(value, f.name)
            elif f.name != "payload":
                yield from _error_codes(getattr(value, f.name))


def _may_wait(request: Message) -> bool:
    """Whether the broker may rightly hold ``request`` longer than LONG_POLL_S."""
    if isinstance(request, FetchRequest):
        return request.max_wait_ms > LONG_POLL_S * 1000
    if isinstance(request, ProduceRequest):
        return request.acks == -1 and request.timeout_ms > LONG_POLL_S * 1000
    return False


async def _send(
    fc: FuzzedCluster, address: str, request: Message, oneway: bool
) -> Message | DlogError:
    """``request``'s answer. One-way, it has none: then the answer to an echo sent
    after it on the same connection (by which time the server has read it)."""
    long_poll = _may_wait(request)
    timeout = LONG_POLL_S if long_poll else ANSWER_WITHIN_S
    with trio.fail_after(timeout + 2):  # the client's own timeout must fire first
        try:
            if oneway:
                connection = await fc.pool.connection(address)
                await connection.send_oneway(request)
                return await connection.call(EchoRequest(), timeout=ANSWER_WITHIN_S)
            return await fc.pool.call(address, request, timeout=timeout)
        except RequestTimedOutError as exc:
            if long_poll and not oneway:
                return exc
            raise AssertionError(f"no answer within {timeout} s") from exc
        except DlogError as exc:
            return exc


def check_request(fc: FuzzedCluster, node: int, request: Message, oneway: bool) -> None:
    crashes = fc.handler_crashes()
    fc.errors_logged.clear()  # (one logged since the last check is blamed on this one)
    address = fc.addresses[node % len(fc.addresses)]
    outcome = fc.run(_send, fc, address, request, oneway)
    if isinstance(outcome, DlogError):
        assert outcome.code != ErrorCode.UNKNOWN_SERVER_ERROR, outcome
    else:
        codes = list(_error_codes(outcome))
        assert ErrorCode.UNKNOWN_SERVER_ERROR not in codes, outcome
    assert fc.handler_crashes() == crashes
    assert not fc.errors_logged, fc.errors_logged


# --- strategies ----------------------------------------------------------------------------

i64 = st.integers(I64_MIN, I64_MAX)


def mostly(usual: st.SearchStrategy[_T], odd: st.SearchStrategy[_T]) -> st.SearchStrategy[_T]:
    """``usual`` three times in four (one_of would flatten and weigh every branch
    alike), so that requests also get past their first check."""
    return st.integers(0, 3).flatmap(lambda i: usual if i else odd)


def ints(*interesting: int) -> st.SearchStrategy[int]:
    """A third each: values that mean something here, edges, any signed 64-bit int."""
    edges = [0, 1, -1, -2, (1 << 31) - 1, 1 << 31, -(1 << 31), I64_MAX, I64_MIN]
    if not interesting:
        return st.one_of(st.sampled_from(edges), i64)
    return st.one_of(st.sampled_from(interesting), st.sampled_from(edges), i64)


ODD_NAMES = [
    "",
    ".",
    "..",
    "/",
    "../../etc",
    "a/b",
    "a\\b",
    "x" * 249,
    "x" * 250,
    "x" * 5000,
    "ünïcödé",
    "\x00",
    " ",
    "no-such-topic",
    OFFSETS_TOPIC,
]
#: Valid names that requests create, alter, delete, produce to and fetch from, so
#: that one request meets what another did.
SCRATCH_NAMES = ["scratch-a", "scratch-b", "long" + "g" * 245]
odd_names = st.one_of(st.sampled_from(ODD_NAMES), st.text(max_size=30))
names = mostly(st.sampled_from([*SEEDED_TOPICS, TOPIC, *SCRATCH_NAMES]), odd_names)
#: Topics whose records or commits must stay.
KEPT_TOPICS = frozenset([*SEEDED_TOPICS, OFFSETS_TOPIC])
#: Names that a request may create or delete for real.
other_names = mostly(st.sampled_from(SCRATCH_NAMES), odd_names).filter(
    lambda n: n not in KEPT_TOPICS
)
groups = st.one_of(st.just("seeded"), st.sampled_from(ODD_NAMES), st.text(max_size=30))
partitions = mostly(st.integers(0, PARTITIONS - 1), ints(PARTITIONS))
offsets = ints(SEEDED_PER_PARTITION, SEEDED_PER_PARTITION - 1, SEEDED_PER_PARTITION + 1)
epochs = mostly(st.sampled_from([-1, 0]), ints(1))
#: Partition counts to create: invalid, absurd, or small (a valid large count would
#: only make the test slow).
partition_counts = mostly(
    st.integers(1, 2),
    st.one_of(
        st.sampled_from([0, -1, 10_001, 1 << 31, I64_MAX, I64_MIN]),
        st.integers(10_001, I64_MAX),
        st.integers(I64_MIN, 0),
    ),
)
ODD_ADDRESSES = [
    "",
    "garbage",
    "127.0.0.1:1",
    "127.0.0.1:0",
    "127.0.0.1:99999",
    "127.0.0.1:-1",
    ":::",
    "[::1",
    "\x00:1",
    "a" * 300 + ":1",
    "..:1",
]
addresses = st.sampled_from(ODD_ADDRESSES)
config_keys = st.sampled_from(
    [
        "retention_ms",
        "retention_bytes",
        "segment_bytes",
        "segment_ms",
        "min_insync_replicas",
        "unclean_leader_election",
        "flush_ms",
        "flush_messages",
        "max_timestamp_skew_ms",
        "max_message_bytes",
        "no_such_key",
        "",
    ]
)
config_values = st.one_of(
    st.sampled_from(
        ["", "-1", "0", "1", "true", "nan", "1e3", str(I64_MAX), str(1 << 64), "9" * 400]
    ),
    st.integers().map(str),
    st.text(max_size=10),
)
configs = st.dictionaries(config_keys, config_values, max_size=3)


def _batch(values: list[bytes], timestamp: int) -> bytes:
    return bytes(build_batch(values, base_timestamp=timestamp))


valid_batches = st.builds(
    _batch, st.lists(st.binary(max_size=16), min_size=1, max_size=4), st.just(NOW_MS)
)

#: (position, struct format) of every header field.
HEADER_FIELDS = [
    (0, ">q"),  # baseOffset
    (8, ">i"),  # batchLength
    (12, ">i"),  # partitionLeaderEpoch
    (16, ">b"),  # magic
    (21, ">h"),  # attributes
    (23, ">i"),  # lastOffsetDelta
    (27, ">q"),  # baseTimestamp
    (35, ">q"),  # maxTimestamp
    (43, ">q"),  # producerId
    (51, ">h"),  # producerEpoch
    (53, ">i"),  # baseSequence
    (57, ">i"),  # recordCount
]


@st.composite
def odd_batches(draw: st.DrawFn) -> bytes:
    """A valid batch with one header field changed (its CRC then fixed, or not)."""
    buf = bytearray(draw(valid_batches))
    position, fmt = draw(st.sampled_from(HEADER_FIELDS))
    bits = struct.calcsize(fmt) * 8
    value = draw(st.integers(-(1 << (bits - 1)), (1 << (bits - 1)) - 1))
    struct.pack_into(fmt, buf, position, value)
    if draw(st.booleans()):
        struct.pack_into(">I", buf, 17, crc32c.crc32c(bytes(buf[21:])))
    return bytes(buf)


@st.composite
def garbage_records(draw: st.DrawFn) -> bytes:
    """A batch whose header is valid (CRC included) and whose records are garbage."""
    buf = bytearray(draw(valid_batches))
    body = draw(st.binary(min_size=len(buf) - 61, max_size=len(buf) - 61))
    buf[61:] = body
    struct.pack_into(">I", buf, 17, crc32c.crc32c(bytes(buf[21:])))
    return bytes(buf)


@st.composite
def truncated_batches(draw: st.DrawFn) -> bytes:
    buf = draw(valid_batches)
    return buf[: draw(st.integers(0, len(buf) - 1))]


record_sets = st.one_of(
    st.just(b""),
    st.binary(max_size=100),
    valid_batches,
    odd_batches(),
    garbage_records(),
    truncated_batches(),
    st.lists(valid_batches, min_size=2, max_size=3).map(b"".join),
    st.tuples(valid_batches, st.binary(min_size=1, max_size=20)).map(b"".join),
)
#: Payloads on operations that take none.
stray_payloads = st.one_of(st.just(b""), st.just(b""), st.binary(max_size=64))


@st.composite
def produce_requests(draw: st.DrawFn) -> ProduceRequest:
    pieces = draw(st.lists(st.tuples(names, partitions, record_sets), max_size=4))
    payload = b"".join(data for _, _, data in pieces)
    # Mostly sizes that frame the payload, so that the record sets reach the logs.
    if draw(st.integers(0, 3)):
        sizes = [len(data) for _, _, data in pieces]
    else:
        sizes = [draw(ints(len(data), len(data) + 1, len(data) - 1)) for _, _, data in pieces]
        payload += draw(stray_payloads)
    return ProduceRequest(
        acks=draw(mostly(st.sampled_from([-1, 0, 1]), ints(2, -2))),
        timeout_ms=draw(ints(0, 100, 1000, 30_000)),
        partitions=[
            ProducePartition(topic=topic, partition=partition, size=size)
            for (topic, partition, _), size in zip(pieces, sizes, strict=True)
        ],
        payload=payload,
    )


fetch_partitions = st.builds(
    FetchPartition,
    topic=names,
    partition=partitions,
    fetch_offset=offsets,
    partition_max_bytes=ints(1 << 20, 61),
    current_leader_epoch=epochs,
)
fetch_requests = st.builds(
    FetchRequest,
    replica_id=ints(1, 2, 3, 99),
    max_wait_ms=st.one_of(st.sampled_from([0, -1, 1, 100, 500]), ints()),
    min_bytes=ints(1, 1 << 20),
    max_bytes=ints(1 << 20, 61),
    partitions=st.lists(fetch_partitions, max_size=4),
    payload=stray_payloads,
)
list_offsets_requests = st.builds(
    ListOffsetsRequest,
    partitions=st.lists(
        st.builds(
            ListOffsetsPartition,
            topic=names,
            partition=partitions,
            timestamp=ints(-2, -3, NOW_MS, NOW_MS + 1),
        ),
        max_size=4,
    ),
    payload=stray_payloads,
)
epoch_requests = st.builds(
    OffsetsForLeaderEpochRequest,
    replica_id=ints(1, 2, 99),
    partitions=st.lists(
        st.builds(
            EpochQuery,
            topic=names,
            partition=partitions,
            leader_epoch=epochs,
            current_leader_epoch=epochs,
        ),
        max_size=4,
    ),
    payload=stray_payloads,
)
topic_lists = st.one_of(st.none(), st.lists(names, max_size=4))
new_topics = st.builds(
    NewTopic,
    name=other_names,
    partitions=partition_counts,
    replication_factor=st.one_of(st.none(), ints(1, 2, 3, 4)),
    configs=configs,
)
group_partitions = st.builds(TopicPartitionRef, topic=names, partition=partitions)


@st.composite
def alter_topic_requests(draw: st.DrawFn) -> AlterTopicRequest:
    name = draw(names)
    return AlterTopicRequest(
        name=name,
        partitions=draw(st.one_of(st.none(), partition_counts, st.integers(0, PARTITIONS + 1))),
        configs=draw(st.dictionaries(config_keys, st.one_of(st.none(), config_values))),
        # Records and commits must stay: changes to their topics are validated, not made
        # (a retention_ms of 1 would rightly delete them).
        validate_only=name in KEPT_TOPICS or draw(st.booleans()),
        payload=draw(stray_payloads),
    )


def request_strategies(
    node_ids: list[int], topic_ids: list[str], cluster_id: str
) -> dict[str, st.SearchStrategy[Message]]:
    """Per operation, its requests; those of the controller take the cluster's ids."""
    real = set(node_ids)
    # Never a real broker's id where the request would do what it says to that broker
    # (register it again, shut it down, remove it): that is the protocol working.
    strangers = ints(0, 4, 99, 1000).filter(lambda n: n not in real)
    topic_id_values = st.one_of(st.sampled_from([*topic_ids, "", "0" * 32]), st.text(max_size=8))
    return {
        "metadata": st.builds(MetadataRequest, topics=topic_lists, payload=stray_payloads),
        "produce": produce_requests(),
        "fetch": fetch_requests,
        "list_offsets": list_offsets_requests,
        "offsets_for_leader_epoch": epoch_requests,
        "replica_status": st.builds(
            ReplicaStatusRequest, topics=topic_lists, payload=stray_payloads
        ),
        "cluster_status": st.builds(ClusterStatusRequest, payload=stray_payloads),
        "describe_cluster": st.builds(DescribeClusterRequest, payload=stray_payloads),
        "api_versions": st.builds(ApiVersionsRequest, payload=stray_payloads),
        "echo": st.builds(
            EchoRequest,
            data=st.one_of(st.none(), i64, st.text(max_size=20), st.lists(i64, max_size=3)),
            payload=stray_payloads,
        ),
        "create_topics": st.builds(
            CreateTopicsRequest,
            topics=st.lists(new_topics, max_size=3),
            validate_only=st.booleans(),
            payload=stray_payloads,
        ),
        "delete_topics": st.builds(
            DeleteTopicsRequest, topics=st.lists(other_names, max_size=3), payload=stray_payloads
        ),
        "alter_topic": alter_topic_requests(),
        "find_coordinator": st.builds(FindCoordinatorRequest, group=groups, payload=stray_payloads),
        "offset_commit": st.builds(
            OffsetCommitRequest,
            group=groups,
            partitions=st.lists(
                st.builds(
                    OffsetCommitPartition,
                    topic=names,
                    partition=partitions,
                    offset=offsets,
                    metadata=st.text(max_size=20),
                ),
                max_size=4,
            ),
            payload=stray_payloads,
        ),
        "offset_fetch": st.builds(
            OffsetFetchRequest,
            group=groups,
            partitions=st.one_of(st.none(), st.lists(group_partitions, max_size=4)),
            payload=stray_payloads,
        ),
        "broker_registration": st.builds(
            BrokerRegistrationRequest,
            node_id=strangers,
            directory_id=st.text(max_size=8),
            cluster_id=st.one_of(st.just(cluster_id), st.text(max_size=8)),
            incarnation=st.text(max_size=8),
            rpc=addresses,
            gossip=addresses,
            raft=addresses,
            payload=stray_payloads,
        ),
        "alter_partition": st.builds(
            AlterPartitionRequest,
            broker_id=ints(*real, 99),
            topic_id=topic_id_values,
            partition=partitions,
            leader_epoch=epochs,
            partition_epoch=epochs,
            new_isr=st.lists(ints(*real, 99), max_size=4),
            payload=stray_payloads,
        ),
        "controlled_shutdown": st.builds(
            ControlledShutdownRequest,
            broker_id=strangers,
            incarnation=st.text(max_size=8),
            payload=stray_payloads,
        ),
        "remove_node": st.builds(RemoveNodeRequest, node_id=strangers, payload=stray_payloads),
        # Served on the Raft and gossip ports, not this one: an unknown operation here.
        "raft_batch": st.builds(
            RaftBatchRequest,
            messages=st.just([]),
            sizes=st.lists(ints(), max_size=3),
            sender_address=addresses,
            payload=stray_payloads,
        ),
        "gossip_push_pull": st.builds(GossipPushPullRequest, payload=stray_payloads),
    }


# --- after the fuzzing --------------------------------------------------------------------


async def _read_partition(fc: FuzzedCluster, topic: str, partition: int) -> dict[int, bytes]:
    """The records below the seeded end of a partition, read with raw fetches (and
    decoded a batch at a time: fuzzed batches above that end may not decode)."""
    end = max(o for t, p, o in fc.seeded if (t, p) == (topic, partition)) + 1
    found: dict[int, bytes] = {}
    offset = 0
    while offset < end:
        request = FetchRequest(
            max_wait_ms=0,
            partitions=[FetchPartition(topic=topic, partition=partition, fetch_offset=offset)],
        )
        address = fc.leader_address(topic, partition)
        response = await fc.pool.call(address, request, timeout=ANSWER_WITHIN_S)
        assert isinstance(response, FetchResponse)
        result = response.partitions[0]
        assert result.error_code == 0, result
        data = payload_bytes(response.payload)
        headers = parse_batches(data)
        assert headers, f"{topic}-{partition}: nothing at offset {offset}"
        for header in headers:
            if header.base_offset >= end:
                break
            batch = data[header.position : header.position + header.size]
            for record in decode_records(batch, min_offset=offset):
                found[record.offset] = record.value or b""
            offset = header.next_offset
    return found


async def _still_serves(fc: FuzzedCluster, topic: str) -> None:
    """A new record is acknowledged (acks=all) and consumed, through the client."""
    value = b"after-fuzzing-" + topic.encode()
    async with fc.cluster.client() as client:
        async with client.producer(acks="all") as producer:
            meta = await producer.send(topic, value, partition=0)
        async with client.consumer(topic, partitions=0) as consumer:
            consumer.seek(0, meta.offset)
            with trio.fail_after(10):
                while True:
                    batch = await consumer.getmany(timeout_ms=1000)
                    values = [r[3] for records in batch.values() for r in records]
                    if values:
                        assert values[0] == value
                        break


async def _committed(fc: FuzzedCluster, group: str) -> int | None:
    async with (
        fc.cluster.client() as client,
        client.consumer(TOPIC, group=group, partitions=0) as consumer,
    ):
        return await consumer.committed(0)


def check_cluster_intact(fc: FuzzedCluster) -> None:
    assert fc.handler_crashes() == 0
    assert not fc.errors_logged, fc.errors_logged
    assert fc.run(_committed, fc, KEPT_GROUP) == KEPT_OFFSET
    for topic, (partitions, _) in SEEDED_TOPICS.items():
        fc.run(_still_serves, fc, topic)
        for partition in range(partitions):
            found = fc.run(_read_partition, fc, topic, partition)
            expected = {o: v for (t, p, o), v in fc.seeded.items() if (t, p) == (topic, partition)}
            assert {o: found.get(o) for o in expected} == expected, f"{topic}-{partition}"


# --- the tests ----------------------------------------------------------------------------


@contextmanager
def fuzzed_cluster(root: Path, nodes: int) -> Iterator[FuzzedCluster]:
    with FuzzedCluster(root, nodes) as fc:
        yield fc
        check_cluster_intact(fc)


def test_every_operation_has_a_strategy() -> None:
    # The broker imports every layer that registers operations (Raft, gossip); other
    # tests register operations of their own.
    ours = {name for name, op in operations().items() if op.request.__module__.startswith("dlog.")}
    assert set(request_strategies([1], [], "cluster")) == ours


def _fuzz(fc: FuzzedCluster, max_examples: int) -> None:
    @settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    @given(
        node=st.integers(0, len(fc.addresses) - 1),
        request=st.one_of(*request_strategies(fc.node_ids, fc.topic_ids, fc.cluster_id).values()),
        # As acks=none produce requests travel, answered with nothing, errors too.
        oneway=st.integers(0, 7).map(lambda i: i == 0),
    )
    def one_request(node: int, request: Message, oneway: bool) -> None:
        check_request(fc, node, request, oneway)

    one_request()


def test_hostile_requests_never_crash_a_handler_nor_lose_records(tmp_path: Path) -> None:
    with fuzzed_cluster(tmp_path, nodes=1) as fc:
        _fuzz(fc, max_examples=int(os.environ.get("DLOG_FUZZ_EXAMPLES", "800")))


@pytest.mark.slow
def test_hostile_requests_to_every_node_of_a_three_node_cluster(tmp_path: Path) -> None:
    """Also the paths a single node never takes: requests forwarded to the controller,
    follower fetches, and partitions led elsewhere."""
    with fuzzed_cluster(tmp_path, nodes=3) as fc:
        _fuzz(fc, max_examples=int(os.environ.get("DLOG_FUZZ_EXAMPLES", "2000")))
