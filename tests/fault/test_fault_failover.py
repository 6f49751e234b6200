"""Failover under load, with real processes: producers send unique values with
acks=all while partition leaders are killed with SIGKILL and restarted with
``dlogctl cluster up``, again and again. Afterwards every acknowledged value is
consumed, first occurrences in acknowledged order per sender, and every replica holds
the same bytes up to the high watermark (read from the stopped nodes' data dirs)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import trio

import dlog
from tests.fault.processes import ProcessCluster, eventually, process_cluster
from tests.fault.workload import (
    AckLog,
    check_acknowledged,
    compare_replica_logs,
    consume_all,
    summary,
    wait_replicas_converged,
)

TOPIC = "failover"
PARTITIONS = 3
FAILOVER_DEADLINE_S = 10.0


async def kill_leader_and_restart(
    cluster: ProcessCluster, acks: AckLog, partition: int
) -> tuple[int, float]:
    """SIGKILL ``partition``'s leader, wait until acks=all succeed again on every
    partition it led, restart it, wait until it is back in every ISR. Returns the
    victim and the time from the kill to the last of those first fresh acks."""
    asked = cluster.node_ids[0]
    for n in cluster.node_ids:
        if cluster.running(n):
            asked = n
            break
    parts = await cluster.partitions(asked, TOPIC)
    victim = parts[partition].leader
    assert victim is not None
    led = sorted(p for p, info in parts.items() if info.leader == victim)
    survivors = [n for n in cluster.node_ids if n != victim]

    killed_at = cluster.kill(victim)

    async def failed_over() -> bool:
        for node in survivors:
            now = await cluster.partitions(node, TOPIC)
            for p in led:
                if now[p].leader in (None, victim):
                    return False
                assert now[p].leader in parts[p].isr
                assert now[p].leader_epoch > parts[p].leader_epoch
        return True

    await eventually(failed_over, timeout=FAILOVER_DEADLINE_S, what=f"failover from {victim}")

    async def acked_again() -> float | None:
        firsts = [acks.first_fresh_ack(p, killed_at) for p in led]
        if any(f is None for f in firsts):
            return None
        return max(f.acked_at for f in firsts if f is not None) - killed_at

    elapsed = await eventually(
        acked_again, timeout=FAILOVER_DEADLINE_S, what=f"acks=all on {led} after killing {victim}"
    )

    await cluster.cluster_up()

    async def back_in_isr() -> bool:
        for node in cluster.node_ids:
            now = await cluster.partitions(node, TOPIC)
            if any(sorted(info.isr) != sorted(info.replicas) for info in now.values()):
                return False
        return True

    await eventually(back_in_isr, timeout=30, what=f"node {victim} back in every ISR")
    # Acks on every partition with the full ISR before the next kill.
    rejoined_at = trio.current_time()
    await eventually(
        lambda: all(acks.first_fresh_ack(p, rejoined_at) for p in range(PARTITIONS)),
        timeout=FAILOVER_DEADLINE_S,
        what="acks=all on every partition after the rejoin",
    )
    return victim, elapsed


async def run_failovers(tmp_path: Path, kills: int, seed: int) -> None:
    rng = random.Random(seed)
    async with (
        process_cluster(tmp_path) as cluster,
        dlog.connect(cluster.bootstrap) as client,
    ):
        await client.create_topic(TOPIC, partitions=PARTITIONS, replication_factor=3)
        await client.wait_for_topic(TOPIC)
        acks = AckLog(TOPIC)
        failovers: list[float] = []
        victims: list[int] = []
        async with (
            client.producer(acks="all", linger_ms=0) as one_by_one,
            client.producer(acks="all", linger_ms=2) as pipelined,
            trio.open_nursery() as nursery,
        ):
            started = trio.current_time()
            for p in range(PARTITIONS):
                nursery.start_soon(acks.send_one_at_a_time, one_by_one, p, f"single-p{p}")
                nursery.start_soon(acks.send_pipelined, pipelined, p, f"window-p{p}")
            await eventually(
                lambda: all(acks.first_fresh_ack(p, started) for p in range(PARTITIONS)),
                timeout=30,
                what="acks flowing on every partition",
            )
            for _ in range(kills):
                victim, elapsed = await kill_leader_and_restart(
                    cluster, acks, rng.randrange(PARTITIONS)
                )
                victims.append(victim)
                failovers.append(elapsed)
            acks.stopping = True
        print(
            f"{kills} SIGKILLs of partition leaders (nodes {victims}): kill -> acks=all "
            f"again: {summary(failovers)}; {acks.total()} values acknowledged, "
            f"{len(acks.failures)} sends failed"
        )
        hws = await wait_replicas_converged(cluster, TOPIC, PARTITIONS)
        consumed = await consume_all(cluster.bootstrap, TOPIC, PARTITIONS)
        check_acknowledged(acks, consumed)
        cluster.cleanup()
        on_disk = compare_replica_logs(cluster, TOPIC, hws)
        for p in range(PARTITIONS):
            assert on_disk[p] == consumed[p], f"partition {p}: consumed values differ from the log"


@pytest.mark.timeout(240)
async def test_leader_kills_under_acks_all_lose_nothing(tmp_path: Path) -> None:
    await run_failovers(tmp_path, kills=3, seed=7)


@pytest.mark.slow
@pytest.mark.timeout(420)
async def test_leader_kills_under_acks_all_soak(tmp_path: Path) -> None:
    await run_failovers(tmp_path, kills=8, seed=11)


@pytest.mark.timeout(240)
async def test_whole_cluster_crash_loses_nothing_acknowledged(tmp_path: Path) -> None:
    """Every node SIGKILLed at once under acks=all load: an acknowledged record reached
    the kernel on every ISR member before the ack, so it survives; the producers keep
    retrying through the outage and carry on once ``cluster up`` restarts the nodes."""
    async with (
        process_cluster(tmp_path) as cluster,
        dlog.connect(cluster.bootstrap) as client,
    ):
        await client.create_topic(TOPIC, partitions=PARTITIONS, replication_factor=3)
        await client.wait_for_topic(TOPIC)
        acks = AckLog(TOPIC)
        async with (
            client.producer(acks="all", linger_ms=0) as one_by_one,
            client.producer(acks="all", linger_ms=2) as pipelined,
            trio.open_nursery() as nursery,
        ):
            started = trio.current_time()
            for p in range(PARTITIONS):
                nursery.start_soon(acks.send_one_at_a_time, one_by_one, p, f"single-p{p}")
                nursery.start_soon(acks.send_pipelined, pipelined, p, f"window-p{p}")
            await eventually(
                lambda: all(acks.first_fresh_ack(p, started) for p in range(PARTITIONS)),
                timeout=30,
                what="acks flowing on every partition",
            )
            await trio.sleep(1)
            crashed_at = trio.current_time()
            for n in cluster.node_ids:
                cluster.kill(n)
            acked_before = acks.total()
            await cluster.cluster_up()
            await eventually(
                lambda: all(acks.first_fresh_ack(p, crashed_at) for p in range(PARTITIONS)),
                timeout=30,
                what="acks=all on every partition after the restart",
            )
            print(
                f"whole-cluster crash: {acked_before} values acknowledged before it; acks "
                f"again {trio.current_time() - crashed_at:.2f} s after the kill"
            )
            acks.stopping = True
        hws = await wait_replicas_converged(cluster, TOPIC, PARTITIONS)
        consumed = await consume_all(cluster.bootstrap, TOPIC, PARTITIONS)
        check_acknowledged(acks, consumed)
        cluster.cleanup()
        on_disk = compare_replica_logs(cluster, TOPIC, hws)
        for p in range(PARTITIONS):
            assert on_disk[p] == consumed[p], f"partition {p}: consumed values differ from the log"
