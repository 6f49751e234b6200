"""Acks=all producers that remember what was acknowledged, and the checks after a fault:
every acknowledged value consumed, in acknowledged order, and identical replica logs.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import trio

import dlog
from dlog.clock import SystemClock
from dlog.errors import DlogError
from dlog.storage import LogConfig, PartitionLog, decode_records
from tests.fault.processes import ProcessCluster, eventually


@dataclass(frozen=True, slots=True)
class Ack:
    value: bytes
    offset: int
    #: trio.current_time() when the send started and when its acknowledgement came.
    sent_at: float
    acked_at: float


@dataclass
class AckLog:
    """What each sender got acknowledged, in acknowledgement order."""

    topic: str
    acks: dict[str, list[Ack]] = field(default_factory=dict)
    #: sender -> partition it writes to
    partition_of: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    stopping: bool = False
    #: Sender tasks still running (each may have a send in flight).
    running: int = 0

    async def stop(self, *, timeout: float) -> None:
        """Stop the senders and wait until none is left: a send in flight when
        ``stopping`` is set still lands (a pipelined sender's whole window), so what
        the log holds is final only after this."""
        self.stopping = True
        await eventually(lambda: self.running == 0, timeout=timeout, what="senders stopped")

    def total(self) -> int:
        return sum(len(a) for a in self.acks.values())

    def acked_values(self, partition: int) -> list[bytes]:
        return [
            a.value
            for sender, acks in self.acks.items()
            if self.partition_of[sender] == partition
            for a in acks
        ]

    def first_fresh_ack(self, partition: int, since: float) -> Ack | None:
        """The first acknowledgement on ``partition`` of a send started after ``since``."""
        best: Ack | None = None
        for sender, acks in self.acks.items():
            if self.partition_of[sender] != partition:
                continue
            for a in acks:
                if a.sent_at > since:
                    if best is None or a.acked_at < best.acked_at:
                        best = a
                    break
        return best

    async def start_senders(
        self,
        nursery: trio.Nursery,
        producer: dlog.Producer,
        partitions: Iterable[int],
        *,
        warm: int = 20,
    ) -> None:
        """Start one :meth:`send_one_at_a_time` sender per partition (named ``p<N>``) and
        return once each has ``warm`` acknowledgements."""
        parts = list(partitions)
        for p in parts:
            nursery.start_soon(self.send_one_at_a_time, producer, p, f"p{p}")
        await eventually(
            lambda: all(len(self.acks.get(f"p{p}", ())) >= warm for p in parts),
            timeout=30,
            what="acks flowing on every partition",
        )

    async def send_one_at_a_time(self, producer: dlog.Producer, partition: int, name: str) -> None:
        """Send unique values to ``partition``, each after the previous one's ack."""
        self.acks[name] = acks = []
        self.partition_of[name] = partition
        self.running += 1
        try:
            await self._send_one_at_a_time(producer, partition, name, acks)
        finally:
            self.running -= 1

    async def _send_one_at_a_time(
        self, producer: dlog.Producer, partition: int, name: str, acks: list[Ack]
    ) -> None:
        seq = 0
        while not self.stopping:
            value = b"%s-%09d" % (name.encode(), seq)
            seq += 1
            sent = trio.current_time()
            try:
                meta = await producer.send(self.topic, value, partition=partition)
            except DlogError as exc:
                self.failures.append(f"{name}: {exc!r}")
                continue
            acks.append(Ack(value, meta.offset, sent, trio.current_time()))

    async def send_pipelined(
        self, producer: dlog.Producer, partition: int, name: str, window: int = 64
    ) -> None:
        """Send unique values to ``partition`` ``window`` at a time without waiting
        between them (several batches in flight and in retry), then collect the acks in
        send order."""
        self.acks[name] = acks = []
        self.partition_of[name] = partition
        self.running += 1
        try:
            await self._send_pipelined(producer, partition, name, window, acks)
        finally:
            self.running -= 1

    async def _send_pipelined(
        self, producer: dlog.Producer, partition: int, name: str, window: int, acks: list[Ack]
    ) -> None:
        seq = 0
        while not self.stopping:
            sent = trio.current_time()
            handles = []
            for _ in range(window):
                value = b"%s-%09d" % (name.encode(), seq)
                seq += 1
                handles.append(
                    (value, producer.send_nowait(self.topic, value, partition=partition))
                )
            for value, handle in handles:
                try:
                    meta = await handle
                except DlogError as exc:
                    self.failures.append(f"{name}: {exc!r}")
                    continue
                acks.append(Ack(value, meta.offset, sent, trio.current_time()))
            await trio.sleep(0.01)


async def consume_all(
    bootstrap: list[str], topic: str, partitions: int, *, timeout: float = 60
) -> dict[int, list[bytes]]:
    """Every value below each partition's high watermark, from the beginning."""
    seen: dict[int, list[bytes]] = {p: [] for p in range(partitions)}
    async with dlog.connect(bootstrap) as client:
        ends = {p: await client.latest_offset(topic, p) for p in range(partitions)}
        async with client.consumer(topic, from_beginning=True) as consumer:
            with trio.fail_after(timeout):
                while any(consumer.position(p) < ends[p] for p in range(partitions)):
                    batch = await consumer.getmany(max_records=50_000, timeout_ms=5_000)
                    for p, records in batch.items():
                        seen[p].extend(r.value for r in records if r.value is not None)
    return seen


class LiveConsumer:
    """A consumer reading from the beginning while faults happen (it must ride through
    leader changes itself); ``auto_offset_reset="error"``, so a position it is told is
    out of range fails the test instead of silently re-reading."""

    def __init__(self, client: dlog.Client, topic: str, partitions: int) -> None:
        self.client = client
        self.topic = topic
        self.seen: dict[int, list[bytes]] = {p: [] for p in range(partitions)}
        self.positions: dict[int, int] = dict.fromkeys(range(partitions), 0)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with self.client.consumer(
            self.topic, from_beginning=True, auto_offset_reset="error"
        ) as consumer:
            task_status.started()
            while True:
                batch = await consumer.getmany(max_records=50_000, timeout_ms=1_000)
                for p, records in batch.items():
                    self.seen[p].extend(r.value for r in records if r.value is not None)
                for p in self.positions:
                    self.positions[p] = consumer.position(p)

    async def wait_until(self, ends: dict[int, int], *, timeout: float) -> None:
        await eventually(
            lambda: all(self.positions[p] >= end for p, end in ends.items()),
            timeout=timeout,
            what=f"the live consumer reaches {ends}",
        )


def check_acknowledged(log: AckLog, seen: dict[int, list[bytes]]) -> None:
    """Every acknowledged value was consumed, and per sender the first occurrences
    follow the acknowledgement order (retries may duplicate, never reorder or lose)."""
    for sender, acks in log.acks.items():
        records = seen[log.partition_of[sender]]
        first: dict[bytes, int] = {}
        for i, v in enumerate(records):
            first.setdefault(v, i)
        missing = [a.value for a in acks if a.value not in first]
        assert not missing, (
            f"{sender}: {len(missing)} of {len(acks)} acknowledged values lost, first {missing[:5]}"
        )
        positions = [first[a.value] for a in acks]
        out_of_order = [
            (acks[i].value, acks[i + 1].value)
            for i in range(len(positions) - 1)
            if positions[i] > positions[i + 1]
        ]
        assert not out_of_order, f"{sender}: acknowledged order broken at {out_of_order[:5]}"
        # The offset each ack reported holds that value (first occurrence or a
        # duplicate of it at the acknowledged offset).
        for a in acks:
            assert 0 <= a.offset < len(records) and records[a.offset] == a.value, (
                f"{sender}: {a.value!r} acknowledged at offset {a.offset}, which holds "
                f"{records[a.offset] if 0 <= a.offset < len(records) else None!r}"
            )


async def wait_replicas_converged(
    cluster: ProcessCluster, topic: str, partitions: int, *, timeout: float = 60
) -> dict[int, int]:
    """Wait until every partition has its full ISR and every replica's LEO equals the
    leader's HW (nothing in flight); the HW of each partition."""

    async def converged() -> dict[int, int] | None:
        hws: dict[int, int] = {}
        statuses = {n: await cluster.replica_status(n, topic) for n in cluster.node_ids}
        meta = await cluster.partitions(cluster.node_ids[0], topic)
        for p in range(partitions):
            info = meta[p]
            if info.leader is None or sorted(info.isr) != sorted(info.replicas):
                return None
            states = {
                n: s
                for n, status in statuses.items()
                for s in status.partitions
                if s.partition == p
            }
            leader = states.get(info.leader)
            if leader is None or leader.role != "leader":
                return None
            hw = leader.high_watermark
            if any(states.get(r) is None or states[r].log_end_offset != hw for r in info.replicas):
                return None
            hws[p] = hw
        return hws

    return await eventually(converged, timeout=timeout, what=f"replicas of {topic} converged")


def read_replica_log(data_dir: Path, topic: str, partition: int, upper: int | None = None) -> bytes:
    """The raw batches of a stopped node's replica below ``upper`` (offset; default
    its log end), read with dlog.storage's own recovery, as a follower or consumer
    would be served them."""
    directory = data_dir / "logs" / f"{topic}-{partition}"
    plog = PartitionLog.open(directory, LogConfig(), SystemClock())
    try:
        if upper is None:
            upper = plog.log_end_offset
        out = bytearray()
        offset = plog.log_start_offset
        assert offset == 0, f"{directory}: log starts at {offset}"
        assert plog.log_end_offset >= upper, (
            f"{directory}: log ends at {plog.log_end_offset}, below the HW {upper}"
        )
        while offset < upper:
            data = plog.read(offset, 1 << 20, upper)
            assert not data.is_empty, f"{directory}: nothing at offset {offset} below {upper}"
            out += data.records
            offset = data.next_offset
        return bytes(out)
    finally:
        plog.close()


def compare_replica_logs(
    cluster: ProcessCluster,
    topic: str,
    hws: dict[int, int],
    replicas: dict[int, list[int]] | None = None,
) -> dict[int, list[bytes]]:
    """Every replica's bytes below the HW are identical (the cluster must be stopped);
    the values each partition holds. ``replicas``: each partition's replica nodes
    (default: every node holds every partition)."""
    values: dict[int, list[bytes]] = {}
    for p, hw in hws.items():
        nodes = cluster.node_ids if replicas is None else replicas[p]
        logs = {n: read_replica_log(cluster.data_dir(n), topic, p, hw) for n in nodes}
        reference = logs[nodes[0]]
        for n, data in logs.items():
            assert data == reference, (
                f"{topic}-{p}: node {n}'s log below HW {hw} differs from node "
                f"{nodes[0]}'s ({len(data)} vs {len(reference)} bytes)"
            )
        records = decode_records(reference)
        assert [r.offset for r in records] == list(range(hw)), f"{topic}-{p}: offsets not dense"
        values[p] = [r.value for r in records if r.value is not None]
    return values


def summary(samples: list[float]) -> str:
    if not samples:
        return "no samples"
    return (
        f"median {statistics.median(samples):.2f} s, max {max(samples):.2f} s over "
        f"{len(samples)}: {', '.join(f'{s:.2f}' for s in samples)}"
    )
