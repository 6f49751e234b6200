"""The controller's Raft membership management: it never holds up fencing and
failover, and a broker that is not a member yet can always join.

A broker can only acknowledge Raft heartbeats once it is a Raft member, so membership
must not wait for a Raft session the broker cannot have yet. Found as an intermittent
failure of tests/fault/test_fault_kill.py::test_wiped_broker_rejoins_with_a_new_identity_
and_gets_every_replica[joining-node]: it passed only when the wiped node re-registered
within ``broker_session_timeout_ms`` of the controller's activation (its grace period).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import trio

import dlog.broker.controller as controller_module
from dlog.broker.config import BrokerConfig
from dlog.broker.controller import Controller, FollowerProgress, GossipView, QuorumMember
from dlog.broker.metadata import MetadataDelta, MetadataImage
from dlog.broker.records import Record, RegisterBroker, UnfenceBroker, encode_batch
from tests.unit.broker.dataplane import dataplane_cluster, wait_until

SESSION_MS = 1000


class ScriptedQuorum:
    """Applies proposals at once; members and follower acks as the test sets them.

    Like RaftNode.follower_progress, progress is reported for current members only.
    """

    def __init__(self, image: MetadataImage, members: dict[int, QuorumMember]) -> None:
        self.image = image
        self.index = 0
        self.members_by_id = members
        self.last_ack: dict[int, float] = {}
        self.changes: list[tuple[str, int, str]] = []
        self.changed = trio.Event()

    def commit_index(self) -> int:
        return self.index

    def follower_progress(self) -> dict[int, FollowerProgress]:
        return {
            node: FollowerProgress(self.index, self.last_ack.get(node, -math.inf))
            for node in self.members_by_id
            if node != 1
        }

    def members(self) -> list[QuorumMember]:
        return list(self.members_by_id.values())

    async def propose(self, data: bytes) -> MetadataDelta:
        self.index += 1
        delta = self.image.apply_entry(self.index, data)
        await trio.lowlevel.checkpoint()
        return delta

    def _changed(self, what: str, node_id: int, directory_id: str) -> None:
        self.changes.append((what, node_id, directory_id))
        self.changed.set()
        self.changed = trio.Event()

    async def add_learner(self, node_id: int, directory_id: str, address: str) -> None:
        self.members_by_id[node_id] = QuorumMember(node_id, directory_id, address, voter=False)
        self._changed("add_learner", node_id, directory_id)

    async def promote(self, node_id: int, directory_id: str) -> None:
        self.members_by_id[node_id] = QuorumMember(node_id, directory_id, "", voter=True)
        self._changed("promote", node_id, directory_id)

    async def remove_member(self, node_id: int, directory_id: str) -> None:
        del self.members_by_id[node_id]
        self._changed("remove_member", node_id, directory_id)

    async def step_down(self) -> None:
        return None


def _register(node_id: int, directory_id: str, incarnation: str) -> RegisterBroker:
    return RegisterBroker(
        node_id=node_id,
        directory_id=directory_id,
        incarnation=incarnation,
        rpc=f"n{node_id}:1",
        gossip=f"n{node_id}:2",
        raft=f"n{node_id}:3",
    )


async def test_a_wiped_broker_that_rejoins_after_the_grace_period_is_added_back(
    autojump_clock: trio.abc.Clock, tmp_path: Path
) -> None:
    """Voters {1, 2, 3}; node 2 dies, comes back with a wiped disk more than a session
    timeout after the controller became active. Its old identity is removed, then its
    new one must be added as a learner (and promoted once caught up)."""
    image = MetadataImage()
    records: list[Record] = []
    for n in (1, 2, 3):
        records += [_register(n, f"d{n}", "i1"), UnfenceBroker(node_id=n, incarnation="i1")]
    image.apply_entry(1, encode_batch(records))
    members = {n: QuorumMember(n, f"d{n}", f"n{n}:3", voter=True) for n in (1, 2, 3)}
    quorum = ScriptedQuorum(image, members)
    quorum.index = 1
    alive = {1, 3}

    def gossip() -> GossipView:
        return GossipView(alive=frozenset(alive), dead=frozenset({1, 2, 3} - alive))

    controller = Controller(
        BrokerConfig(node_id=1, data_dir=tmp_path, broker_session_timeout_ms=SESSION_MS),
        quorum,
        image=lambda: image,
        gossip=gossip,
        cluster_id="test",
        tick_s=0.05,
    )

    async def ack_heartbeats() -> None:
        # Node 3 answers the leader's heartbeats; so does node 2 once it runs again
        # (RaftNode keeps acks by node id, so the new disk's answers count for the old
        # member while it is still in the configuration).
        while True:
            now = trio.current_time()
            for n in alive - {1}:
                quorum.last_ack[n] = now
            await trio.sleep(0.05)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ack_heartbeats)
        await nursery.start(controller.run)
        await trio.sleep(3 * SESSION_MS / 1000)  # node 2 stays dead past the grace period

        # Node 2 restarts with an empty disk: a new directory id, registered again.
        alive.add(2)
        await quorum.propose(encode_batch([_register(2, "d2-new", "i2")]))
        controller.wake()

        with trio.move_on_after(10 * SESSION_MS / 1000):
            while ("add_learner", 2, "d2-new") not in quorum.changes:
                await quorum.changed.wait()
        nursery.cancel_scope.cancel()

    assert quorum.changes[:2] == [
        ("remove_member", 2, "d2"),
        ("add_learner", 2, "d2-new"),
    ], quorum.changes


async def test_failover_goes_on_while_a_membership_change_hangs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(controller_module, "MEMBERSHIP_CHANGE_WARN_S", 0.5)
    caplog.set_level(logging.WARNING, logger="dlog.broker.controller")
    async with dataplane_cluster(tmp_path) as cluster:
        await cluster.create_topic("t")
        quorum = cluster.quorum
        started = trio.Event()

        def members() -> list[QuorumMember]:
            # Node 3's Raft identity is stale (as after a wiped disk): the controller
            # removes it, and Raft never applies the removal.
            return [
                QuorumMember(
                    node_id=n.node_id,
                    directory_id="old" if n.node_id == 3 else f"d{n.node_id}",
                    address="",
                    voter=True,
                )
                for n in cluster.nodes.values()
            ]

        async def remove_member(node_id: int, directory_id: str) -> None:
            started.set()
            await trio.sleep_forever()

        quorum.members = members  # type: ignore[method-assign]
        quorum.remove_member = remove_member  # type: ignore[method-assign]
        assert cluster.controller is not None
        cluster.controller.wake()
        with trio.fail_after(10):
            await started.wait()
        # The leader dies while the removal hangs: it is fenced and the partition gets
        # a new leader all the same.
        old = cluster.leader_of("t")
        await cluster.stop(old.node_id)
        await wait_until(lambda: cluster.leader_of("t") is not old)
        assert cluster.image.brokers[old.node_id].fenced
        # ... and the stuck change is reported (then waited for again).
        await wait_until(lambda: "membership change is not applied" in caplog.text)
