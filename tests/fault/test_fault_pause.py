"""Nodes that hang (SIGSTOP: alive, sockets open, answering nothing) instead of dying.

A paused follower is fenced, the others carry on without it, and after SIGCONT it
returns to every ISR; a paused leader's partitions and a paused controller's duties
move on, and clients must notice without a connection error to tell them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

import dlog
from tests.fault.processes import ProcessCluster, eventually, process_cluster
from tests.fault.workload import (
    AckLog,
    LiveConsumer,
    check_acknowledged,
    compare_replica_logs,
    consume_all,
    wait_replicas_converged,
)

pytestmark = pytest.mark.timeout(240)

PARTITIONS = 2


async def fenced(cluster: ProcessCluster, asked: int, node: int) -> bool | None:
    """Whether ``asked``'s metadata has ``node`` fenced (None: not registered)."""
    reply = await cluster.describe_cluster(asked)
    broker = next((b for b in reply.brokers if b.node_id == node), None)
    return None if broker is None else broker.fenced


async def test_paused_follower_is_fenced_and_returns_to_isr(tmp_path: Path) -> None:
    topic = "pause"
    async with (
        process_cluster(tmp_path) as cluster,
        dlog.connect(cluster.bootstrap) as client,
    ):
        # Two partitions on three brokers: one broker leads neither, it only follows.
        await client.create_topic(topic, partitions=PARTITIONS, replication_factor=3)
        await client.wait_for_topic(topic)
        controller = await cluster.controller(cluster.node_ids[0])
        assert controller is not None
        before = await cluster.partitions(controller, topic)
        assert all(sorted(p.isr) == [1, 2, 3] for p in before.values())
        leaders = {info.leader for info in before.values()}
        # Pause a pure follower that is not the controller (the fresh cluster's
        # controller is node 1, the bootstrap node, and leaders go to nodes 1 and 2).
        victim = next((n for n in cluster.node_ids if n not in leaders and n != controller), None)
        assert victim is not None, f"no pure follower besides controller {controller}: {before}"

        acks = AckLog(topic)
        async with (
            client.producer(acks="all", linger_ms=0) as producer,
            trio.open_nursery() as nursery,
        ):
            await acks.start_senders(nursery, producer, range(PARTITIONS))

            paused_at = cluster.pause(victim)

            # The controller fences it and drops it from every ISR; leaders stay.
            async def shrunk() -> bool:
                if not await fenced(cluster, controller, victim):
                    return False
                parts = await cluster.partitions(controller, topic)
                for p, info in parts.items():
                    assert info.leader == before[p].leader
                    assert info.leader_epoch == before[p].leader_epoch
                    if victim in info.isr:
                        return False
                return True

            await eventually(shrunk, timeout=10, what=f"node {victim} fenced and out of the ISRs")
            fenced_s = trio.current_time() - paused_at
            shrunk_at = trio.current_time()

            # acks=all keeps working on the smaller ISR (2 >= min_insync_replicas):
            # several fresh acknowledgements on every partition while it is paused.
            def acked_on_small_isr() -> bool:
                return all(
                    sum(1 for a in acks.acks[f"p{p}"] if a.sent_at > shrunk_at) >= 10
                    for p in range(PARTITIONS)
                )

            await eventually(acked_on_small_isr, timeout=10, what="acks=all on the smaller ISR")
            assert cluster.running(victim)  # still paused, not dead

            cluster.resume(victim)
            resumed_at = trio.current_time()

            # Back: unfenced, following, and in every ISR again.
            async def returned() -> bool:
                if await fenced(cluster, controller, victim) is not False:
                    return False
                for node in cluster.node_ids:
                    parts = await cluster.partitions(node, topic)
                    if any(victim not in info.isr for info in parts.values()):
                        return False
                return True

            await eventually(returned, timeout=30, what=f"node {victim} back in every ISR")
            returned_s = trio.current_time() - resumed_at
            print(
                f"SIGSTOP node {victim}: fenced and out of the ISRs after {fenced_s:.2f} s; "
                f"back in every ISR {returned_s:.2f} s after SIGCONT"
            )
            now = await cluster.partitions(victim, topic)
            status = await cluster.replica_status(victim, topic)
            assert len(status.partitions) == PARTITIONS
            for state in status.partitions:
                assert now[state.partition].leader != victim
                assert state.role == "follower", state
            # Writes keep flowing with it back in the ISR.
            back_at = trio.current_time()
            await eventually(
                lambda: all(acks.first_fresh_ack(p, back_at) for p in range(PARTITIONS)),
                timeout=10,
                what="acks=all with the full ISR",
            )
            acks.stopping = True

        hws = await wait_replicas_converged(cluster, topic, PARTITIONS)
        check_acknowledged(acks, await consume_all(cluster.bootstrap, topic, PARTITIONS))
        cluster.cleanup()
        compare_replica_logs(cluster, topic, hws)


@pytest.mark.parametrize(
    "metadata_from_victim",
    [False, True],
    ids=["metadata-from-another-broker", "metadata-from-the-hung-leader"],
)
async def test_paused_leader_is_replaced_and_producers_follow(
    tmp_path: Path, metadata_from_victim: bool
) -> None:
    """A leader that hangs (SIGSTOP) rather than crashes: its socket stays open and the
    kernel accepts bytes for it, so no connection error tells clients it is gone. Its
    partitions fail over like after a kill, and producers must move to the new leader
    within the failover budget too, while it is still paused -- also when it is the
    broker their client gets its metadata from."""
    topic = "hang"
    async with process_cluster(tmp_path) as cluster:
        controller = await cluster.controller(cluster.node_ids[0])
        assert controller is not None
        victim = next(n for n in cluster.node_ids if n != controller)
        # The client's first answer, and so its metadata, comes from the first address.
        others = [cluster.rpc(n) for n in cluster.node_ids if n != victim]
        bootstrap = [cluster.rpc(victim), *others] if metadata_from_victim else others
        acks = AckLog(topic)
        async with dlog.connect(bootstrap) as client, trio.open_nursery() as consuming:
            await client.create_topic(topic, partitions=3, replication_factor=3)
            await client.wait_for_topic(topic)
            before = await cluster.partitions(controller, topic)
            led = [p for p, info in before.items() if info.leader == victim]
            assert led
            # A consumer reads along: it must follow the new leaders too.
            live = LiveConsumer(client, topic, 3)
            await consuming.start(live.run)
            async with (
                client.producer(acks="all", linger_ms=0) as producer,
                trio.open_nursery() as nursery,
            ):
                await acks.start_senders(nursery, producer, range(3))

                paused_at = cluster.pause(victim)

                async def moved() -> bool:
                    parts = await cluster.partitions(controller, topic)
                    return all(parts[p].leader not in (None, victim) for p in led)

                await eventually(
                    moved, timeout=10, what=f"partitions {led} moved off node {victim}"
                )
                moved_s = trio.current_time() - paused_at

                async def acked_again() -> float | None:
                    firsts = [acks.first_fresh_ack(p, paused_at) for p in led]
                    if any(f is None for f in firsts):
                        return None
                    return max(f.acked_at for f in firsts if f is not None) - paused_at

                acked_s = await eventually(
                    acked_again, timeout=10, what=f"acks=all on {led} while {victim} is paused"
                )
                fresh = {p: acks.first_fresh_ack(p, paused_at) for p in led}
                await eventually(
                    lambda: all(
                        f is not None and f.value in live.seen[p] for p, f in fresh.items()
                    ),
                    timeout=10,
                    what=f"the live consumer reads {led} from the new leaders",
                )
                print(
                    f"SIGSTOP leader {victim}: partitions moved after {moved_s:.2f} s, "
                    f"acks=all again after {acked_s:.2f} s, consumed "
                    f"{trio.current_time() - paused_at:.2f} s after the pause"
                )
                cluster.resume(victim)

                async def returned() -> bool:
                    for node in cluster.node_ids:
                        parts = await cluster.partitions(node, topic)
                        if any(victim not in info.isr for info in parts.values()):
                            return False
                    return True

                await eventually(returned, timeout=30, what=f"node {victim} back in every ISR")
                acks.stopping = True
            hws = await wait_replicas_converged(cluster, topic, 3)
            await live.wait_until(hws, timeout=30)
            consuming.cancel_scope.cancel()

        consumed = await consume_all(cluster.bootstrap, topic, 3)
        check_acknowledged(acks, consumed)
        assert live.seen == consumed
        cluster.cleanup()
        compare_replica_logs(cluster, topic, hws)


async def test_paused_controller_is_replaced_and_steps_down_when_it_resumes(
    tmp_path: Path,
) -> None:
    """The controller hangs (SIGSTOP): the others elect a new one, which fences it and
    creates topics. When it resumes it must step down (a higher Raft term), catch up
    on what it missed, and rejoin as a plain broker, with no acknowledged write lost."""
    topic = "zombie"
    async with process_cluster(tmp_path) as cluster:
        old = await cluster.controller(cluster.node_ids[0])
        assert old is not None
        survivors = [n for n in cluster.node_ids if n != old]
        async with dlog.connect(cluster.bootstrap) as client:
            await client.create_topic(topic, partitions=3, replication_factor=3)
            await client.wait_for_topic(topic)
        steady = range(3)

        # The client does not know the controller's address: it would ask it first
        # for metadata and admin calls, and wait out the request timeout (see
        # test_admin_calls_get_past_a_hung_broker).
        acks = AckLog(topic)
        async with (
            dlog.connect([cluster.rpc(n) for n in survivors]) as client,
            client.producer(acks="all", linger_ms=0) as producer,
            trio.open_nursery() as nursery,
        ):
            await acks.start_senders(nursery, producer, steady)

            paused_at = cluster.pause(old)

            async def new_controller() -> int | None:
                seen = {await cluster.controller(n) for n in survivors}
                if len(seen) == 1 and (c := seen.pop()) not in (None, old):
                    return c
                return None

            new = await eventually(new_controller, timeout=10, what="a new controller")
            with trio.fail_after(10):
                await client.create_topic("during", partitions=1, replication_factor=2)

            async def fenced_out() -> bool:
                reply = await cluster.describe_cluster(new)
                if not any(b.node_id == old and b.fenced for b in reply.brokers):
                    return False
                parts = await cluster.partitions(new, topic)
                return all(old not in info.isr and info.leader != old for info in parts.values())

            await eventually(fenced_out, timeout=10, what=f"node {old} fenced")
            fenced_s = trio.current_time() - paused_at
            resumed_at = trio.current_time()
            await eventually(
                lambda: all(acks.first_fresh_ack(p, resumed_at) for p in steady),
                timeout=10,
                what="acks=all on the smaller ISRs",
            )

            cluster.resume(old)

            # It steps down: every node names the new controller, it is unfenced, back
            # in every ISR, and its metadata caught up (it knows the topic it missed).
            async def rejoined() -> bool:
                for n in cluster.node_ids:
                    if await cluster.controller(n) != new:
                        return False
                reply = await cluster.describe_cluster(new)
                if any(b.fenced for b in reply.brokers):
                    return False
                for n in cluster.node_ids:
                    parts = await cluster.partitions(n, topic)
                    if any(sorted(info.isr) != sorted(info.replicas) for info in parts.values()):
                        return False
                    if len(await cluster.partitions(n, "during")) != 1:
                        return False
                return True

            await eventually(rejoined, timeout=30, what=f"node {old} rejoined under {new}")
            print(
                f"SIGSTOP controller {old}: node {new} took over, fenced it after "
                f"{fenced_s:.2f} s; rejoined {trio.current_time() - resumed_at:.2f} s "
                "after SIGCONT"
            )
            acks.stopping = True

        # Every node ends with the same metadata.
        async def same_metadata() -> bool:
            indexes = {(await cluster.describe_cluster(n)).metadata_index for n in cluster.node_ids}
            return len(indexes) == 1

        await eventually(same_metadata, timeout=10, what="one metadata index everywhere")
        views = [await cluster.partitions(n, topic) for n in cluster.node_ids]
        assert all(v == views[0] for v in views), views
        hws = await wait_replicas_converged(cluster, topic, 3)
        check_acknowledged(acks, await consume_all(cluster.bootstrap, topic, 3))
        cluster.cleanup()
        compare_replica_logs(cluster, topic, hws)


async def test_admin_calls_get_past_a_hung_broker(tmp_path: Path) -> None:
    async with process_cluster(tmp_path) as cluster:
        controller = await cluster.controller(cluster.node_ids[0])
        victim = next(n for n in cluster.node_ids if n != controller)
        others = [cluster.rpc(n) for n in cluster.node_ids if n != victim]
        async with dlog.connect([cluster.rpc(victim), *others]) as client:
            # The first metadata answer comes from the first address: the victim is
            # then the broker this client asks first.
            await client.refresh_metadata()
            await client.list_topics()
            cluster.pause(victim)
            # The other two answer at once; generous slack, far below the 30 s.
            with trio.fail_after(5):
                await client.create_topic("admin", partitions=1, replication_factor=2)
                # A new topic reaches the brokers' metadata a moment after the controller
                # commits it (create_topic's documented contract): wait for it, past the
                # hung broker too, before listing.
                await client.wait_for_topic("admin")
                assert "admin" in {t.name for t in await client.list_topics()}
