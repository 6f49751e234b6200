"""The control plane with real brokers in one process: formation, topics, failover."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import trio

from dlog.broker.identity import removed_reason
from dlog.errors import (
    BrokerIdNotRegisteredError,
    ErrorCode,
    InvalidConfigError,
    InvalidReplicationFactorError,
    InvalidTopicError,
    TopicAlreadyExistsError,
    UnknownTopicOrPartitionError,
)
from dlog.net.protocol import (
    BrokerRegistrationRequest,
    ProducePartition,
    ProduceRequest,
    ProduceResponse,
)
from dlog.storage import build_batch
from tests.cluster.inprocess import InProcessCluster, inprocess_cluster, wait_for

pytestmark = pytest.mark.timeout(180)


def leaders(cluster: InProcessCluster, topic: str) -> dict[int, tuple[int | None, int]]:
    """Partition -> (leader, epoch) as the controller (or any running broker) sees it."""
    member = cluster.controller() or next(m for m in cluster.members.values() if m.running)
    info = member.broker.image.topics[topic]
    return {p.partition: (p.leader, p.leader_epoch) for p in info.partitions}


async def test_cluster_forms_and_spreads_leaders(tmp_path: Path) -> None:
    async with inprocess_cluster(tmp_path) as cluster:
        ctrl = cluster.controller()
        assert ctrl is not None
        await wait_for(lambda: sum(m.voter for m in ctrl.broker.quorum_members()) == 3)
        async with cluster.client() as client:
            await client.create_topic("six", partitions=6, replication_factor=3)
            await client.wait_for_topic("six")
            desc = await client.describe_topic("six")
        counts = {n: 0 for n in (1, 2, 3)}
        for p in desc.partitions:
            assert p.leader is not None
            counts[p.leader] += 1
            assert sorted(p.replicas) == [1, 2, 3]
            assert sorted(p.isr) == [1, 2, 3]
        assert counts == {1: 2, 2: 2, 3: 2}
        # Every broker answers metadata from its own copy, at the same index eventually.
        index = ctrl.broker.image.applied_index
        await wait_for(
            lambda: all(m.broker.image.applied_index >= index for m in cluster.members.values())
        )


async def test_produce_and_consume_through_the_cluster(tmp_path: Path) -> None:
    async with inprocess_cluster(tmp_path) as cluster, cluster.client() as client:
        await client.create_topic("orders", partitions=3, replication_factor=3)
        await client.wait_for_topic("orders")
        async with client.producer(acks="all") as producer:
            for i in range(30):
                await producer.send("orders", b"v%d" % i, key=b"k%d" % (i % 5))
            await producer.send_many("orders", [b"bulk%d" % i for i in range(100)])
        values = []
        async with client.consumer("orders", group="g", from_beginning=True) as consumer:
            while len(values) < 130:
                batch = await consumer.getmany(max_records=1000, timeout_ms=5000)
                assert batch, f"only {len(values)} records"
                for records in batch.values():
                    values.extend(r[3] for r in records)
            await consumer.commit()
        assert sorted(values) == sorted(
            [b"v%d" % i for i in range(30)] + [b"bulk%d" % i for i in range(100)]
        )
        # The group resumes where it committed: nothing new to read.
        async with client.consumer("orders", group="g") as consumer:
            assert await consumer.getmany(timeout_ms=500) == {}


async def test_killed_broker_loses_leaderships_to_isr_then_rejoins(tmp_path: Path) -> None:
    async with inprocess_cluster(tmp_path) as cluster:
        async with cluster.client() as client:
            await client.create_topic("t", partitions=6, replication_factor=3)
            await client.wait_for_topic("t")
        ctrl = cluster.controller()
        assert ctrl is not None
        victim = next(n for n in (1, 2, 3) if n != ctrl.node_id)
        await wait_for(
            lambda: any(leader == victim for leader, _ in leaders(cluster, "t").values())
        )
        before = leaders(cluster, "t")
        led = [p for p, (leader, _) in before.items() if leader == victim]
        assert led
        await cluster.kill(victim)
        # Within the failover budget (detection 1.5 s + election), with slack for CI.
        await wait_for(
            lambda: all(leaders(cluster, "t")[p][0] not in (None, victim) for p in led), 10
        )
        after = leaders(cluster, "t")
        image = ctrl.broker.image
        for p in led:
            assert after[p][1] > before[p][1]
            info = image.partition("t", p)
            assert info is not None
            assert victim not in info.isr
        # It comes back as a follower and returns to every ISR.
        await cluster.start(victim)
        await cluster.wait_ready()
        await wait_for(lambda: all(victim in p.isr for p in image.topics["t"].partitions), 30)


async def test_killed_controller_is_replaced(tmp_path: Path) -> None:
    async with inprocess_cluster(tmp_path) as cluster:
        async with cluster.client() as client:
            await client.create_topic("before", partitions=2)
        old = cluster.controller()
        assert old is not None
        await cluster.kill(old.node_id)
        await wait_for(lambda: cluster.controller() not in (None, old), 10)
        new = cluster.controller()
        assert new is not None
        assert "before" in new.broker.image.topics
        with trio.fail_after(10):
            async with cluster.client() as client:
                await client.create_topic("after", partitions=1, replication_factor=2)
                await client.wait_for_topic("after")


async def test_second_bootstrap_changes_nothing(tmp_path: Path) -> None:
    async with inprocess_cluster(tmp_path) as cluster:
        async with cluster.client() as client:
            await client.create_topic("keep", partitions=1)
        first = cluster.members[1]
        cluster_id = first.broker.cluster_id
        await cluster.kill(1)
        await cluster.start(1)  # bootstrap_cluster=True again, on existing state
        await cluster.wait_ready()
        assert cluster.members[1].broker.cluster_id == cluster_id
        ctrl = cluster.controller()
        assert ctrl is not None
        assert "keep" in ctrl.broker.image.topics


async def test_wiped_node_rejoins_with_a_new_identity(tmp_path: Path) -> None:
    async with inprocess_cluster(tmp_path) as cluster:
        ctrl = cluster.controller()
        assert ctrl is not None
        await wait_for(lambda: sum(m.voter for m in ctrl.broker.quorum_members()) == 3)
        victim = next(n for n in (1, 2, 3) if n != ctrl.node_id)
        old_dir = next(m.directory_id for m in ctrl.broker.quorum_members() if m.node_id == victim)
        await cluster.kill(victim)
        shutil.rmtree(cluster.members[victim].config.data_dir)
        await cluster.start(victim)
        await cluster.wait_ready()
        new_dir = cluster.members[victim].broker.quorum.directory_id
        assert new_dir != old_dir

        def rejoined() -> bool:
            ctrl_now = cluster.controller()
            if ctrl_now is None:
                return False
            members = {(m.node_id, m.directory_id): m for m in ctrl_now.broker.quorum_members()}
            return (victim, old_dir) not in members and members.get((victim, new_dir)) is not None

        await wait_for(rejoined, 30)


async def test_admin_bad_input_changes_nothing(tmp_path: Path) -> None:
    async with inprocess_cluster(tmp_path) as cluster, cluster.client() as client:
        await client.create_topic("exists", partitions=1)
        before = sorted(t.name for t in await client.list_topics())
        with pytest.raises(InvalidTopicError):
            await client.create_topic("bad name!")
        with pytest.raises(InvalidTopicError):
            await client.create_topic("x" * 250)
        with pytest.raises(InvalidReplicationFactorError):
            await client.create_topic("toomany", replication_factor=4)
        with pytest.raises(TopicAlreadyExistsError):
            await client.create_topic("exists")
        with pytest.raises(InvalidConfigError):
            await client.create_topic("cfg", config={"retention": "1"})
        with pytest.raises(UnknownTopicOrPartitionError):
            await client.delete_topic("missing")
        with pytest.raises(UnknownTopicOrPartitionError):
            await client.describe_topic("missing")
        assert sorted(t.name for t in await client.list_topics()) == before


async def test_cut_off_leader_stops_leading_within_the_session_timeout(tmp_path: Path) -> None:
    async with inprocess_cluster(tmp_path, broker_session_timeout_ms=2000) as cluster:
        async with cluster.client() as client:
            await client.create_topic("t", partitions=3, replication_factor=3)
            await client.wait_for_topic("t")
        ctrl = cluster.controller()
        assert ctrl is not None
        # Cut off a broker that leads a partition (the controller too, if it leads one).
        victim = next(
            m
            for m in cluster.members.values()
            if any(leader == m.node_id for leader, _ in leaders(cluster, "t").values())
        )
        led = [p for p, (leader, _) in leaders(cluster, "t").items() if leader == victim.node_id]
        cluster.isolate(victim.node_id)
        # It stops acting as leader once it has heard from no Raft leader for the
        # session timeout (2 s here; the deadline leaves room for a busy machine).
        await wait_for(lambda: not victim.broker._session_ok(), 10)
        batch = bytes(build_batch([b"x"], base_timestamp=1_700_000_000_000))
        response = victim.broker.replicas.produce(
            ProduceRequest(
                acks=1,
                timeout_ms=1000,
                partitions=[ProducePartition(topic="t", partition=led[0], size=len(batch))],
                payload=batch,
            )
        )
        assert isinstance(response, ProduceResponse)
        assert response.partitions[0].error_code == ErrorCode.NOT_LEADER_OR_FOLLOWER
        # Meanwhile the majority fences it and moves its leaderships.
        others = [m for m in cluster.members.values() if m is not victim]

        def moved() -> bool:
            for m in others:
                ctrl_now = m.broker.controller
                if ctrl_now is not None and ctrl_now.active:
                    image = m.broker.image
                    return all(
                        (info := image.partition("t", p)) is not None
                        and info.leader not in (None, victim.node_id)
                        for p in led
                    )
            return False

        await wait_for(moved, 15)


async def test_alter_to_the_same_partition_count_is_an_error(tmp_path: Path) -> None:
    from dlog.errors import InvalidPartitionsError

    async with inprocess_cluster(tmp_path) as cluster, cluster.client() as client:
        await client.create_topic("t", partitions=2)
        with pytest.raises(InvalidPartitionsError, match="already has 2"):
            await client.alter_topic("t", partitions=2)
        with pytest.raises(InvalidPartitionsError, match="only be added"):
            await client.alter_topic("t", partitions=1)
        await client.alter_topic("t", partitions=3)
        assert len((await client.describe_topic("t")).partitions) == 3


async def test_removing_the_controllers_own_node_moves_control_first(tmp_path: Path) -> None:
    async with inprocess_cluster(tmp_path, nodes=3) as cluster:
        await wait_for(lambda: cluster.controller() is not None)
        ctrl = cluster.controller()
        assert ctrl is not None
        old = ctrl.node_id
        async with cluster.client() as client:
            await client.remove_node(old)

            def voters() -> set[int]:
                c = cluster.controller()
                if c is None or c.node_id == old:
                    return set()
                return {m.node_id for m in c.broker.quorum_members() if m.voter}

            await wait_for(lambda: len(voters()) == 2 and old not in voters())
            await wait_for(lambda: cluster.members[old].broker.stopped.is_set())
            assert cluster.members[old].broker.removed
            await client.create_topic("after", partitions=1, replication_factor=2)


async def test_fourth_node_is_a_learner_and_node_remove_takes_a_node_out(tmp_path: Path) -> None:
    async with inprocess_cluster(tmp_path, nodes=4) as cluster:
        ctrl = cluster.controller()
        assert ctrl is not None

        def roles() -> dict[int, bool]:
            c = cluster.controller()
            return {} if c is None else {m.node_id: m.voter for m in c.broker.quorum_members()}

        await wait_for(lambda: len(roles()) == 4 and sum(roles().values()) == 3)
        learner = next(n for n, voter in roles().items() if not voter)
        voter = next(n for n, v in roles().items() if v and n != ctrl.node_id)
        async with cluster.client() as client:
            # Removing a learner: gone from Raft and from the brokers.
            await client.remove_node(learner)
            await wait_for(lambda: learner not in roles())
            c = cluster.controller()
            assert c is not None
            assert learner not in c.broker.image.brokers
            # The removed node (still running) finds itself refused and stops.
            removed = cluster.members[learner].broker
            await wait_for(lambda: removed.stopped.is_set())
            assert removed.removed
            assert "removed" in (removed_reason(Path(removed.config.data_dir)) or "")
            # For good: its directory cannot register again.
            assert removed.identity is not None
            assert removed.addresses is not None
            with pytest.raises(BrokerIdNotRegisteredError, match="removed"):
                await c.broker.controller.register_broker(  # type: ignore[union-attr]
                    BrokerRegistrationRequest(
                        node_id=learner,
                        directory_id=removed.quorum.directory_id,
                        cluster_id=removed.cluster_id,
                        incarnation="new-process",
                        rpc=removed.addresses.rpc,
                        gossip=removed.addresses.gossip,
                        raft=removed.addresses.raft,
                    )
                )
            assert learner not in roles()
            # Removing a voter leaves the remaining two as the quorum.
            await client.remove_node(voter)
            await wait_for(lambda: voter not in roles() and sum(roles().values()) == 2)
            await wait_for(lambda: cluster.members[voter].broker.stopped.is_set())
            assert cluster.members[voter].broker.removed
            await client.create_topic("after", partitions=1, replication_factor=2)


async def test_a_restarted_broker_acts_only_on_current_metadata(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restarted node replays its own metadata log, which holds every state it once
    saw (leading, following, at old epochs). It must act on none of them -- a stale
    leader makes followers truncate -- only on the metadata from its unfencing on; and
    a node that restarts before anyone fenced it (within the session timeout) leaves
    its leaderships and ISRs first, at a new leader epoch."""
    from dlog.broker.partition import Partition

    transitions: list[tuple[int, str, str, int, int]] = []
    real_leader, real_follower = Partition.become_leader, Partition.become_follower

    def become_leader(self: Partition, info: object, now: float) -> None:
        epoch = info.leader_epoch  # type: ignore[attr-defined]
        transitions.append((self.node_id, "leader", self.topic, self.partition, epoch))
        real_leader(self, info, now)  # type: ignore[arg-type]

    def become_follower(self: Partition, info: object) -> None:
        epoch = info.leader_epoch  # type: ignore[attr-defined]
        transitions.append((self.node_id, "follower", self.topic, self.partition, epoch))
        real_follower(self, info)  # type: ignore[arg-type]

    def check(victim: int, topic: str, before: dict[int, tuple[int | None, int]]) -> None:
        mine = [t for t in transitions if t[0] == victim and t[2] == topic]
        assert mine
        for _, role, _, partition, epoch in mine:
            # Never at an epoch older than the current one, nor at one it led before.
            leader, current = before[partition]
            assert epoch >= current, (role, partition, epoch, before)
            assert leader != victim or epoch > current, (role, partition, epoch, before)

    monkeypatch.setattr(Partition, "become_leader", become_leader)
    monkeypatch.setattr(Partition, "become_follower", become_follower)
    async with inprocess_cluster(tmp_path) as cluster:
        ctrl = cluster.controller()
        assert ctrl is not None
        image = ctrl.broker.image
        victim = next(n for n in (1, 2, 3) if n != ctrl.node_id)
        async with cluster.client() as client:
            await client.create_topic("t", partitions=6, replication_factor=3)
            await client.wait_for_topic("t")
        await wait_for(lambda: all(len(p.isr) == 3 for p in image.topics["t"].partitions))
        # Killed; its leaderships move while it is away; it returns. Its own metadata
        # log still shows it leading at the old epochs.
        await cluster.kill(victim)
        await wait_for(lambda: all(lead != victim for lead, _ in leaders(cluster, "t").values()))
        moved = leaders(cluster, "t")
        del transitions[:]
        await cluster.start(victim)
        await cluster.wait_ready()
        await wait_for(lambda: all(victim in p.isr for p in image.topics["t"].partitions), 30)
        check(victim, "t", moved)
        # Restarted at once, before anyone fenced it: a new process of the same node.
        async with cluster.client() as client:
            await client.create_topic("u", partitions=6, replication_factor=3)
            await client.wait_for_topic("u")
        await wait_for(lambda: all(len(p.isr) == 3 for p in image.topics["u"].partitions))
        before = leaders(cluster, "u")
        assert any(lead == victim for lead, _ in before.values())
        await cluster.kill(victim)
        del transitions[:]
        await cluster.start(victim)
        await cluster.wait_ready()
        await wait_for(lambda: all(victim in p.isr for p in image.topics["u"].partitions), 30)
        check(victim, "u", before)
        for p in image.topics["u"].partitions:
            if before[p.partition][0] == victim:
                assert p.leader_epoch > before[p.partition][1]
