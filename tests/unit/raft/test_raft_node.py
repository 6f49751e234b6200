"""RaftNode: real nodes over 127.0.0.1 sockets, disks in tmp_path, real time (10 ms ticks).

Waiting is on conditions with deadlines (``fail_after``); nothing sleeps to synchronise.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from raft_node_helpers import CLUSTER, Cluster, fast_config, single_leader_per_term

from dlog.errors import InconsistentClusterIdError, InvalidConfigError, NotLeaderError
from dlog.net.client import open_rpc_pool
from dlog.raft.codec import message_to_wire
from dlog.raft.core import CoreConfig
from dlog.raft.messages import Heartbeat, InvalidConfChangeError, Role
from dlog.raft.transport import RaftBatchRequest
from dlog.types import NodeId

pytestmark = pytest.mark.timeout(60)


async def test_three_nodes_elect_a_leader_and_apply_proposals_everywhere(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        cluster = Cluster(nursery, tmp_path)
        await cluster.start_cluster(3)
        leader = await cluster.leader()
        results = [await leader.raft.propose(b"k%d=v%d" % (i, i)) for i in range(10)]
        assert results == sorted(results)  # apply's results: the entries' indexes
        await cluster.wait_for(lambda: all(len(h.sm.applied) == 10 for h in cluster.live()))
        for h in cluster.live():
            assert h.sm.data[b"k9"] == b"v9"
            assert h.sm.applied == leader.sm.applied
        single_leader_per_term(cluster)
        nursery.cancel_scope.cancel()


async def test_many_concurrent_proposals_are_batched(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        cluster = Cluster(nursery, tmp_path)
        await cluster.start_cluster(3)
        leader = await cluster.leader()
        results: list[int] = []

        async def proposer(i: int) -> None:
            for j in range(20):
                results.append(await leader.raft.propose(b"p%d-%d=x" % (i, j)))

        async with trio.open_nursery() as proposers:
            for i in range(50):
                proposers.start_soon(proposer, i)
        assert len(set(results)) == 1000
        await cluster.wait_for(lambda: all(len(h.sm.applied) == 1000 for h in cluster.live()))
        # Batched: far fewer fsynced WAL records (one per Ready) than entries.
        assert leader.storage is not None
        assert leader.storage.fsyncs < 500
        nursery.cancel_scope.cancel()


async def test_a_follower_refuses_proposals_naming_the_leader(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        cluster = Cluster(nursery, tmp_path)
        await cluster.start_cluster(3)
        leader = await cluster.leader()
        await leader.raft.propose(b"a=1")
        follower = next(h for h in cluster.live() if h is not leader)
        await cluster.wait_for(lambda: follower.raft.leader == leader.node_id)
        with pytest.raises(NotLeaderError) as err:
            await follower.raft.propose(b"b=2")
        assert err.value.details["leader"] == leader.node_id
        nursery.cancel_scope.cancel()


async def test_kill_the_leader_a_new_one_takes_over_nothing_committed_is_lost(
    tmp_path: Path,
) -> None:
    async with trio.open_nursery() as nursery:
        cluster = Cluster(nursery, tmp_path)
        await cluster.start_cluster(3)
        old = await cluster.leader()
        for i in range(20):
            await old.raft.propose(b"before%d=x" % i)
        committed = list(old.sm.applied)
        await cluster.kill(old.node_id)

        new = await cluster.leader(exclude=old.node_id)
        assert new.raft.term > 0
        # Every entry the old leader had applied (so committed) is in the new one's.
        await cluster.wait_for(lambda: new.sm.applied[: len(committed)] == committed)
        for i in range(5):
            await new.raft.propose(b"after%d=y" % i)

        # The old leader restarts from its disk and catches up.
        back = await cluster.start(old.node_id)
        await cluster.wait_for(lambda: back.sm.applied == new.sm.applied)
        assert back.raft.status.value.role is Role.FOLLOWER
        assert back.raft.leader == new.node_id
        assert back.sm.data[b"after4"] == b"y"
        single_leader_per_term(cluster)
        nursery.cancel_scope.cancel()


async def test_a_node_restarted_while_the_log_moved_on_gets_a_snapshot(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        cluster = Cluster(
            nursery, tmp_path, snapshot_interval_entries=20, snapshot_trailing_entries=0
        )
        await cluster.start_cluster(3)
        leader = await cluster.leader()
        lagging = next(h for h in cluster.live() if h is not leader)
        await cluster.kill(lagging.node_id)
        for i in range(60):
            await leader.raft.propose(b"k%d=%d" % (i % 7, i))
        assert leader.storage is not None
        assert leader.storage.snapshot().meta.index >= 40
        assert leader.storage.first_index() > 1  # compacted
        back = await cluster.start(lagging.node_id)
        await cluster.wait_for(lambda: back.sm.data == leader.sm.data)
        assert back.sm.restores >= 1
        assert back.raft.core.stats["snapshot_installed"] >= 1
        nursery.cancel_scope.cancel()


async def test_state_survives_a_full_cluster_restart(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        cluster = Cluster(nursery, tmp_path, snapshot_interval_entries=15)
        await cluster.start_cluster(3)
        leader = await cluster.leader()
        for i in range(40):
            await leader.raft.propose(b"k%d=%d" % (i, i))
        expected = dict(leader.sm.data)
        for i in (1, 2, 3):
            await cluster.kill(i)
        for i in (1, 2, 3):
            await cluster.start(i)
        for i in (1, 2, 3):  # bootstrapping again is a no-op: state exists
            assert not cluster.handles[i].raft.bootstrap(cluster.config([1, 2, 3]))
        leader = await cluster.leader()
        await leader.raft.propose(b"new=1")
        await cluster.wait_for(lambda: all(len(h.sm.data) == 41 for h in cluster.live()))
        for h in cluster.live():
            assert {k: v for k, v in h.sm.data.items() if k != b"new"} == expected
        nursery.cancel_scope.cancel()


async def test_read_index_on_a_follower_sees_every_earlier_write(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        cluster = Cluster(nursery, tmp_path)
        await cluster.start_cluster(3)
        leader = await cluster.leader()
        follower = next(h for h in cluster.live() if h is not leader)
        await cluster.wait_for(lambda: follower.raft.leader == leader.node_id)
        for i in range(30):
            index = await leader.raft.propose(b"x=%d" % i)
            with trio.fail_after(5):
                read = await follower.raft.read_index()
            assert read >= index
            assert follower.sm.data[b"x"] == b"%d" % i
        nursery.cancel_scope.cancel()


async def test_a_learner_joins_is_promoted_and_members_carry_addresses(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        cluster = Cluster(nursery, tmp_path)
        await cluster.start_cluster(3)
        leader = await cluster.leader()
        for i in range(10):
            await leader.raft.propose(b"a%d=1" % i)
        joiner = await cluster.start(4)  # empty disk, not bootstrapped
        await leader.raft.add_learner(NodeId(4), joiner.raft.directory_id, joiner.address)
        await cluster.wait_for(lambda: len(joiner.sm.applied) == 10)
        assert joiner.raft.core.is_learner
        await leader.raft.promote_learner(NodeId(4), joiner.raft.directory_id)
        await cluster.wait_for(lambda: joiner.raft.core.is_voter)
        members = leader.raft.members()
        assert members.voter_ids == (1, 2, 3, 4)
        assert members.member(NodeId(4)).address == joiner.address  # type: ignore[union-attr]
        progress = leader.raft.follower_progress()
        assert set(progress) == {1, 2, 3, 4} - {leader.node_id}
        await leader.raft.remove_member(NodeId(4), joiner.raft.directory_id)
        assert leader.raft.members().voter_ids == (1, 2, 3)
        with pytest.raises(InvalidConfChangeError):
            await leader.raft.remove_member(NodeId(2), "not-its-directory")
        nursery.cancel_scope.cancel()


async def test_leadership_transfer_and_status_observation(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        cluster = Cluster(nursery, tmp_path)
        await cluster.start_cluster(3)
        old = await cluster.leader()
        await old.raft.propose(b"a=1")
        target = next(h for h in cluster.live() if h is not old)
        with trio.fail_after(5):
            new_leader = await old.raft.transfer_leadership(NodeId(target.node_id))
        assert new_leader in (target.node_id, None)
        with trio.fail_after(5):
            await target.raft.wait_leader_ready()
        with trio.fail_after(5):
            status = await old.raft.wait_not_leader()
        assert status.role is Role.FOLLOWER
        assert target.raft.heard_from_leader_within(1.0)
        await cluster.wait_for(lambda: old.raft.heard_from_leader_within(1.0))
        nursery.cancel_scope.cancel()


async def test_an_isolated_leader_loses_its_session_and_steps_down(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        cluster = Cluster(nursery, tmp_path)
        await cluster.start_cluster(3)
        leader = await cluster.leader()
        await leader.raft.propose(b"a=1")
        assert leader.raft.heard_from_leader_within(0.5)
        others = [h for h in cluster.live() if h is not leader]
        for h in others:
            await cluster.kill(h.node_id)
        with trio.fail_after(5):
            await leader.raft.wait_not_leader()  # check-quorum, after an election timeout
        assert not leader.raft.heard_from_leader_within(0.05)
        with pytest.raises(NotLeaderError):
            await leader.raft.propose(b"b=2")
        nursery.cancel_scope.cancel()


async def test_messages_from_another_cluster_are_refused(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        cluster = Cluster(nursery, tmp_path)
        await cluster.start_cluster(1)
        h = cluster.handles[1]
        await cluster.leader()
        term = h.raft.term
        head, payload = message_to_wire(
            Heartbeat(
                cluster_id="another-cluster",
                term=term + 5,
                from_id=NodeId(9),
                from_dir="x",
                to=NodeId(1),
                commit=0,
            )
        )
        async with open_rpc_pool() as pool:
            with pytest.raises(InconsistentClusterIdError):
                await pool.call(h.address, RaftBatchRequest(messages=[head], sizes=[0]))
        assert h.raft.term == term
        assert h.raft.core.stats["cluster_id_mismatch"] == 1
        nursery.cancel_scope.cancel()


def test_config_is_validated() -> None:
    with pytest.raises(InvalidConfigError):
        fast_config(1, tick_interval_s=0)
    with pytest.raises(InvalidConfigError):
        fast_config(1, cluster_id="")
    with pytest.raises(ValueError, match="election_ticks"):
        fast_config(1, core=CoreConfig(election_ticks=1, heartbeat_ticks=1))
    assert fast_config(1).election_timeout_s == pytest.approx(0.1)
    assert CLUSTER


async def test_answers_from_another_directory_do_not_count_as_the_members(
    tmp_path: Path,
) -> None:
    """A wiped node comes back under its node id with a new directory id: the core
    refuses its answers, and they must not refresh the old member's last answer either
    (which the leader's quorum contact and the controller's liveness read)."""
    from dlog.raft.messages import HeartbeatResponse

    async with trio.open_nursery() as nursery:
        cluster = Cluster(nursery, tmp_path)
        await cluster.start_cluster(3)
        leader = await cluster.leader()
        await leader.raft.propose(b"a=1")
        victim = next(h for h in cluster.live() if h is not leader)
        await cluster.kill(victim.node_id)
        before = leader.raft.follower_progress()[NodeId(victim.node_id)].last_ack
        head, _ = message_to_wire(
            HeartbeatResponse(
                cluster_id=CLUSTER,
                term=leader.raft.term,
                from_id=NodeId(victim.node_id),
                from_dir="a-wiped-disk",
                to=NodeId(leader.node_id),
            )
        )
        async with open_rpc_pool() as pool:
            await pool.call(leader.address, RaftBatchRequest(messages=[head], sizes=[0]))
        assert leader.raft.follower_progress()[NodeId(victim.node_id)].last_ack == before
        nursery.cancel_scope.cancel()
