"""The metadata quorum as the broker sees it: a RaftNode on disk, driving the image.

Adapts :class:`dlog.raft.RaftNode` to what the controller (:class:`MetadataQuorum`)
and the broker need, and owns the Raft disk storage: opened in the constructor,
closed when :meth:`run` ends.

Identity: Raft's directory id is the node's (``meta.json``). When the Raft directory
is missing while the node's identity exists (its Raft state was lost), a fresh
directory id is minted and written back, so the node can never vote as its old self.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import trio

from dlog.broker.controller import FollowerProgress, QuorumMember
from dlog.broker.identity import META_FILE, NodeIdentity, write_json_atomically
from dlog.broker.metadata import MetadataDelta
from dlog.raft.disk import DiskStorage
from dlog.raft.messages import Configuration, Member
from dlog.raft.node import RaftConfig, RaftNode
from dlog.types import NodeId


class _StateMachine:
    def __init__(
        self,
        apply: Callable[[int, bytes], MetadataDelta],
        restore: Callable[[bytes], None],
        snapshot: Callable[[], bytes],
    ) -> None:
        self.apply = apply
        self.restore = restore
        self.snapshot = snapshot


class RaftQuorum:
    def __init__(
        self,
        *,
        node_id: int,
        identity: NodeIdentity,
        data_dir: Path,
        host: str,
        port: int,
        advertise: str | None,
        apply: Callable[[int, bytes], MetadataDelta],
        restore: Callable[[bytes], None],
        snapshot: Callable[[], bytes],
    ) -> None:
        if not (data_dir / "identity").exists() and (data_dir.parent / META_FILE).exists():
            # Raft state is gone but the node's identity is not: a new directory id.
            identity = replace(identity, directory_id=secrets.token_hex(16))
            write_json_atomically(
                data_dir.parent / META_FILE,
                {
                    "cluster_id": identity.cluster_id,
                    "node_id": identity.node_id,
                    "directory_id": identity.directory_id,
                },
            )
        self.identity = identity
        self.storage = DiskStorage.open(
            data_dir,
            cluster_id=identity.cluster_id,
            node_id=NodeId(node_id),
            directory_id=identity.directory_id,
        )
        self.node = RaftNode(
            RaftConfig(
                node_id=NodeId(node_id),
                cluster_id=identity.cluster_id,
                host=host,
                port=port,
                advertise=advertise,
            ),
            storage=self.storage,
            state_machine=_StateMachine(apply, restore, snapshot),
        )

    @property
    def directory_id(self) -> str:
        return self.storage.directory_id

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await self.node.run(task_status=task_status)
        finally:
            self.storage.close()

    def bootstrap(self, advertised_raft: str) -> bool:
        """Make this node the first voter of a new cluster (no-op if Raft state exists)."""
        member = Member(
            node_id=NodeId(self.identity.node_id),
            directory_id=self.storage.directory_id,
            address=advertised_raft,
        )
        return self.node.bootstrap(Configuration(voters=(member,)))

    # --- what the broker reads ---------------------------------------------------------

    def leader_id(self) -> int | None:
        leader = self.node.leader
        return None if leader is None else int(leader)

    def members(self) -> list[QuorumMember]:
        config = self.node.members()
        return [
            QuorumMember(int(m.node_id), m.directory_id, m.address, voter)
            for voter, group in ((True, config.voters), (False, config.learners))
            for m in group
        ]

    def heard_from_leader_within(self, seconds: float) -> bool:
        """Was this node in touch with a working Raft leader in the last ``seconds``?

        As leader: a quorum answered it that recently. Otherwise: a leader's message
        arrived that recently -- whether or not a leader is known right now, so an
        election (which clears the known leader at once) does not cut the session
        short; only ``seconds`` of silence does.
        """
        if self.node.heard_from_leader_within(seconds):
            return True
        return trio.current_time() - self.node.last_leader_contact <= seconds

    async def wait_leader_ready(self) -> None:
        await self.node.wait_leader_ready()

    async def wait_not_leader(self) -> None:
        await self.node.wait_not_leader()

    async def step_down(self) -> None:
        """Hand Raft leadership to another voter, if this node leads (bounded inside)."""
        await self.node.step_down()

    # --- MetadataQuorum (the controller's side) ----------------------------------------------

    def commit_index(self) -> int:
        return self.node.commit_index()

    def follower_progress(self) -> dict[int, FollowerProgress]:
        return {
            int(node): FollowerProgress(p.match_index, p.last_ack)
            for node, p in self.node.follower_progress().items()
        }

    async def propose(self, data: bytes) -> MetadataDelta:
        result = await self.node.propose(data)
        assert isinstance(result, MetadataDelta)
        return result

    async def add_learner(self, node_id: int, directory_id: str, address: str) -> None:
        await self.node.add_learner(NodeId(node_id), directory_id, address)

    async def promote(self, node_id: int, directory_id: str) -> None:
        await self.node.promote_learner(NodeId(node_id), directory_id)

    async def remove_member(self, node_id: int, directory_id: str) -> None:
        await self.node.remove_member(NodeId(node_id), directory_id)
