"""Divergence across processes: a leader appends records its followers never fetch
(both followers paused), then dies. The survivors elect a new leader from the ISR,
which takes new writes at a higher epoch; when the old leader returns it truncates
its unreplicated suffix (OffsetsForLeaderEpoch) and its log equals the new leader's."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

import dlog
from dlog.storage import decode_records
from tests.fault.processes import eventually, process_cluster
from tests.fault.workload import compare_replica_logs, read_replica_log, wait_replicas_converged

pytestmark = pytest.mark.timeout(240)

TOPIC = "diverge"


async def test_returning_leader_truncates_what_it_never_replicated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Followers' long-poll fetches wait at most 50 ms, so a fetch in flight when they
    # are paused returns (empty) into their socket at once, not with the records the
    # leader appends next.
    monkeypatch.setenv("DLOG_REPLICA_FETCH_MAX_WAIT_MS", "50")
    async with (
        process_cluster(tmp_path) as cluster,
        dlog.connect(cluster.bootstrap) as client,
    ):
        # Two partitions: leaders are nodes 1 (the controller) and 2. The victim is
        # partition 1's leader, a Raft follower.
        await client.create_topic(TOPIC, partitions=2, replication_factor=3)
        await client.wait_for_topic(TOPIC)
        controller = await cluster.controller(cluster.node_ids[0])
        parts = await cluster.partitions(cluster.node_ids[0], TOPIC)
        partition = next(p for p, info in parts.items() if info.leader != controller)
        old = parts[partition].leader
        assert old is not None
        followers = [n for n in cluster.node_ids if n != old]

        async with client.producer(acks="all", linger_ms=0) as producer:
            for i in range(20):
                await producer.send(TOPIC, b"committed-%d" % i, partition=partition)
        committed_end = await client.latest_offset(TOPIC, partition)
        assert committed_end == 20

        async with (
            dlog.connect([cluster.rpc(old)]) as direct,
            direct.producer(acks="leader", linger_ms=0) as unreplicated,
        ):
            await direct.wait_for_topic(TOPIC)
            # Both followers stop (the controller among them). The old leader keeps
            # leading until its Raft session lapses; append there meanwhile, after the
            # followers' fetches in flight have returned.
            for n in followers:
                cluster.pause(n)
            await trio.sleep(0.2)
            for i in range(5):
                meta = await unreplicated.send(TOPIC, b"unreplicated-%d" % i, partition=partition)
                assert meta.offset == committed_end + i
        status = await cluster.replica_status(old, TOPIC)
        state = next(s for s in status.partitions if s.partition == partition)
        assert state.log_end_offset == committed_end + 5
        assert state.high_watermark == committed_end

        cluster.kill(old)
        for n in followers:
            cluster.resume(n)

        # A new leader from the ISR at a higher epoch takes new writes.
        async def new_leader() -> int | None:
            now = await cluster.partitions(followers[0], TOPIC)
            info = now[partition]
            if info.leader in (None, old) or info.leader_epoch <= parts[partition].leader_epoch:
                return None
            return info.leader

        leader = await eventually(new_leader, timeout=15, what="a new leader")
        async with client.producer(acks="all", linger_ms=0) as producer:
            for i in range(7):
                meta = await producer.send(TOPIC, b"after-%d" % i, partition=partition)
                assert meta.offset == committed_end + i

        # The old leader returns, truncates the 5 records nobody else has, and follows.
        await cluster.cluster_up()

        async def truncated() -> bool:
            text = cluster.log_file(old).read_text(errors="replace")
            return f"truncating {TOPIC}-{partition} from {committed_end + 5} to" in text

        await eventually(truncated, timeout=30, what=f"node {old} truncates its log")
        hws = await wait_replicas_converged(cluster, TOPIC, 2)
        assert hws[partition] == committed_end + 7
        cluster.cleanup()
        values = compare_replica_logs(cluster, TOPIC, hws)
        assert values[partition] == [b"committed-%d" % i for i in range(20)] + [
            b"after-%d" % i for i in range(7)
        ]
        # Nothing of the unreplicated suffix is left anywhere, above the HW included.
        for n in cluster.node_ids:
            whole = decode_records(read_replica_log(cluster.data_dir(n), TOPIC, partition))
            assert [r.offset for r in whole] == list(range(hws[partition])), f"node {n}"
            assert not any(r.value and r.value.startswith(b"unreplicated") for r in whole)
        print(f"divergence: node {old} truncated; node {leader} led at the higher epoch")
