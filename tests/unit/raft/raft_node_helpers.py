"""Real RaftNodes on 127.0.0.1 for tests: a KV state machine and a cluster harness.

Each node runs in its own cancel scope inside the test's nursery, with its own
DiskStorage directory, so a test can kill one (cancel: everything not on disk is
lost) and restart it on the same port from its directory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cbor2
import trio

from dlog.raft.core import CoreConfig
from dlog.raft.disk import DiskStorage
from dlog.raft.messages import Configuration, Member, Role
from dlog.raft.node import RaftConfig, RaftNode
from dlog.types import NodeId

CLUSTER = "node-test"


class KV:
    """A key-value state machine: entries are b"key=value"."""

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}
        self.applied: list[tuple[int, bytes]] = []
        self.restores = 0

    def apply(self, index: int, data: bytes) -> int:
        key, _, value = data.partition(b"=")
        self.data[key] = value
        self.applied.append((index, data))
        return index

    def snapshot(self) -> bytes:
        return cbor2.dumps({"data": self.data, "applied": self.applied})

    def restore(self, data: bytes) -> None:
        state = cbor2.loads(data)
        self.data = state["data"]
        self.applied = [tuple(x) for x in state["applied"]]
        self.restores += 1


def fast_config(node_id: int, port: int = 0, **overrides: Any) -> RaftConfig:
    base: dict[str, Any] = {
        "node_id": NodeId(node_id),
        "cluster_id": CLUSTER,
        "port": port,
        "tick_interval_s": 0.01,
        "core": CoreConfig(election_ticks=10, heartbeat_ticks=1),
    }
    base.update(overrides)
    return RaftConfig(**base)


@dataclass
class Handle:
    node_id: int
    path: Path
    config_overrides: dict[str, Any] = field(default_factory=dict)
    port: int = 0
    node: RaftNode | None = None
    storage: DiskStorage | None = None
    sm: KV = field(default_factory=KV)
    scope: trio.CancelScope | None = None
    stopped: trio.Event = field(default_factory=trio.Event)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def raft(self) -> RaftNode:
        assert self.node is not None
        return self.node


class Cluster:
    def __init__(self, nursery: trio.Nursery, root: Path, **overrides: Any) -> None:
        self.nursery = nursery
        self.root = root
        self.overrides = overrides
        self.handles: dict[int, Handle] = {}

    async def start(self, node_id: int, *, fresh_state_machine: bool = True) -> Handle:
        h = self.handles.get(node_id)
        if h is None:
            h = Handle(node_id, self.root / f"n{node_id}", dict(self.overrides))
            self.handles[node_id] = h
        if fresh_state_machine:
            h.sm = KV()
        h.storage = DiskStorage.open(h.path, cluster_id=CLUSTER, node_id=NodeId(node_id))
        h.node = RaftNode(
            fast_config(node_id, h.port, **h.config_overrides),
            storage=h.storage,
            state_machine=h.sm,
        )
        h.stopped = trio.Event()
        h.port = await self.nursery.start(self._run, h)
        return h

    async def _run(self, h: Handle, *, task_status: trio.TaskStatus[int]) -> None:
        assert h.node is not None and h.storage is not None
        storage = h.storage
        try:
            with trio.CancelScope() as scope:
                h.scope = scope
                await h.node.run(task_status=task_status)
        finally:
            storage.close()
            h.stopped.set()

    async def kill(self, node_id: int) -> None:
        h = self.handles[node_id]
        assert h.scope is not None
        h.scope.cancel()
        await h.stopped.wait()
        h.node = None

    def config(self, voters: list[int], learners: tuple[int, ...] = ()) -> Configuration:
        def member(i: int) -> Member:
            h = self.handles[i]
            return Member(node_id=NodeId(i), directory_id=h.raft.directory_id, address=h.address)

        return Configuration(
            voters=tuple(member(i) for i in voters), learners=tuple(member(i) for i in learners)
        )

    async def start_cluster(self, n: int) -> None:
        for i in range(1, n + 1):
            await self.start(i)
        config = self.config(list(range(1, n + 1)))
        for i in range(1, n + 1):
            self.handles[i].raft.bootstrap(config)

    def live(self) -> list[Handle]:
        return [h for h in self.handles.values() if h.node is not None]

    async def leader(self, *, timeout: float = 10.0, exclude: int | None = None) -> Handle:
        """Wait (bounded) until some live node is a ready leader."""
        found: list[Handle] = []

        def ready_leader() -> bool:
            found[:] = [
                h for h in self.live() if h.node_id != exclude and h.raft.status.value.leader_ready
            ]
            return bool(found)

        await self.wait_for(ready_leader, timeout=timeout)
        return found[0]

    async def wait_for(self, what: Callable[[], bool], *, timeout: float = 10.0) -> None:
        """Wait (bounded) until ``what()``; it is checked again whenever a live node's
        status or applied index changes."""
        with trio.fail_after(timeout):
            while True:
                # Take the values before checking, so a change in between is not lost.
                seen = [
                    (value, value.value)
                    for h in self.live()
                    for value in (h.raft.status, h.raft.applied_index)
                ]
                if what():
                    return
                async with trio.open_nursery() as nursery:
                    for value, old in seen:
                        nursery.start_soon(self._until_changed, value, old, nursery.cancel_scope)

    @staticmethod
    async def _until_changed(value: Any, old: Any, done: trio.CancelScope) -> None:
        await value.wait_value(lambda v: v != old)
        done.cancel()


def single_leader_per_term(cluster: Cluster) -> None:
    leaders: dict[int, int] = {}
    for h in cluster.live():
        s = h.raft.status.value
        if s.role is Role.LEADER:
            assert leaders.setdefault(s.term, h.node_id) == h.node_id
