"""A data-plane harness: real ReplicaManagers and a real Controller on loopback, with
Raft replaced by a quorum that applies every proposal to every node at once.

Lets the replication tests run in one trio.run without gossip or Raft timing, while
the produce/fetch/ISR/HW code under test is exactly what brokers run.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio

from dlog.broker.config import BrokerConfig
from dlog.broker.controller import (
    INTERNAL_TOPICS,
    Controller,
    FollowerProgress,
    GossipView,
    QuorumMember,
)
from dlog.broker.metadata import MetadataDelta, MetadataImage
from dlog.broker.records import RegisterBroker, UnfenceBroker, encode_batch
from dlog.broker.replica_manager import ReplicaManager, ReplicaManagerHooks
from dlog.clock import ManualClock
from dlog.net.client import ClientConfig, RpcPool, open_rpc_pool
from dlog.net.protocol import AlterPartitionRequest, NewTopic
from dlog.net.server import Route, RpcServer
from dlog.storage import LogConfig, LogManager


@dataclass
class Node:
    node_id: int
    config: BrokerConfig
    image: MetadataImage
    logs: LogManager
    rm: ReplicaManager
    server: RpcServer
    address: str = ""
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    up: bool = True
    stopped: trio.Event = field(default_factory=trio.Event)


class InstantQuorum:
    """Applies each proposal to every live node's image immediately, in order."""

    def __init__(self, cluster: DataPlaneCluster) -> None:
        self.cluster = cluster
        self.index = 0

    def commit_index(self) -> int:
        return self.index

    def follower_progress(self) -> dict[int, FollowerProgress]:
        now = trio.current_time()
        return {
            n.node_id: FollowerProgress(match_index=self.index, last_ack=now if n.up else -math.inf)
            for n in self.cluster.nodes.values()
        }

    def members(self) -> list[QuorumMember]:
        return [
            QuorumMember(node_id=n.node_id, directory_id=f"d{n.node_id}", address="", voter=True)
            for n in self.cluster.nodes.values()
        ]

    async def propose(self, data: bytes) -> MetadataDelta:
        self.index += 1
        result = self.cluster.image.apply_entry(self.index, data)
        for node in self.cluster.nodes.values():
            if node.up:
                node.rm.on_metadata(node.image.apply_entry(self.index, data))
        await trio.lowlevel.checkpoint()
        return result

    def catch_up(self, node: Node) -> None:
        """A node that was down gets the full current state (as a snapshot would)."""
        node.rm.on_metadata(node.image.restore(self.cluster.image.snapshot()))

    async def add_learner(self, node_id: int, directory_id: str, address: str) -> None:
        return None

    async def promote(self, node_id: int, directory_id: str) -> None:
        return None

    async def remove_member(self, node_id: int, directory_id: str) -> None:
        return None

    async def step_down(self) -> None:
        return None


class DataPlaneCluster:
    def __init__(self, tmp: Path, nursery: trio.Nursery, pool: RpcPool, **overrides: object):
        self.tmp = tmp
        self.nursery = nursery
        self.pool = pool
        self.clock = ManualClock()
        self.nodes: dict[int, Node] = {}
        #: The controller's copy of the metadata (what Raft has committed).
        self.image = MetadataImage()
        self.quorum = InstantQuorum(self)
        self.overrides = overrides
        self.controller: Controller | None = None

    def controller_address(self) -> str | None:
        """Every node serves alter_partition for the controller; any live one will do."""
        return next((n.address for n in self.nodes.values() if n.up), None)

    def gossip_view(self) -> GossipView:
        alive = frozenset(n.node_id for n in self.nodes.values() if n.up)
        return GossipView(alive=alive, dead=frozenset(self.nodes) - alive)

    async def start(self, n: int) -> None:
        for node_id in range(1, n + 1):
            await self._start_node(node_id)
        records = []
        for node in self.nodes.values():
            records.append(
                RegisterBroker(
                    node_id=node.node_id,
                    directory_id=f"d{node.node_id}",
                    incarnation="i1",
                    rpc=node.address,
                    gossip="",
                    raft="",
                )
            )
            records.append(UnfenceBroker(node_id=node.node_id, incarnation="i1"))
        await self.quorum.propose(encode_batch(records))
        # The controller runs beside the brokers (node id 0 is none of them), so
        # stopping any broker is an ordinary broker failure.
        cfg = dataclasses.replace(self.nodes[1].config, node_id=0)
        self.controller = Controller(
            cfg,
            self.quorum,
            image=lambda: self.image,
            gossip=self.gossip_view,
            cluster_id="test",
            tick_s=0.05,
        )
        await self.nursery.start(self.controller.run)

    async def _start_node(self, node_id: int) -> Node:
        cfg = BrokerConfig(
            node_id=node_id,
            data_dir=self.tmp / f"node{node_id}",
            replica_lag_time_max_ms=int(self.overrides.get("replica_lag_time_max_ms", 1500)),  # type: ignore[call-overload]
            replica_fetch_max_wait_ms=100,
            replica_fetch_backoff_ms=20,
            broker_session_timeout_ms=1000,
            leader_rebalance_interval_ms=0,
        )
        node = self._fresh_node(node_id, cfg)
        self.nodes[node_id] = node
        await self._run_node(node)
        return node

    def _fresh_node(self, node_id: int, cfg: BrokerConfig) -> Node:
        """A node with empty memory (image, partitions) over its data directory."""
        image = MetadataImage()
        logs = LogManager(cfg.data_dir / "logs", self.clock, LogConfig())
        holder: dict[str, Node] = {}
        rm = ReplicaManager(
            cfg,
            logs,
            self.pool,
            ReplicaManagerHooks(
                image=lambda: image,
                controller_address=self.controller_address,
                session_ok=lambda: holder["node"].up,
            ),
            self.clock,
        )

        async def alter_partition(req: AlterPartitionRequest) -> object:
            assert self.controller is not None
            return await self.controller.alter_partition(req)

        server = RpcServer(
            {
                "produce": Route(rm.produce, inline=True),
                "fetch": Route(rm.fetch, inline=True),
                "list_offsets": Route(rm.list_offsets, inline=True),
                "offsets_for_leader_epoch": Route(rm.offsets_for_leader_epoch, inline=True),
                "replica_status": Route(rm.replica_status, inline=True),
                "alter_partition": alter_partition,  # type: ignore[dict-item]
            },
            name=f"node{node_id}",
        )
        node = Node(node_id, cfg, image, logs, rm, server)
        holder["node"] = node
        return node

    async def _run_node(self, node: Node, port: int = 0) -> None:
        node.scope = trio.CancelScope()
        node.up = True

        node.stopped = trio.Event()

        async def run(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
            try:
                with node.scope:
                    async with trio.open_nursery() as inner:
                        await inner.start(node.logs.run)
                        await inner.start(node.rm.run)
                        bound = await inner.start(node.server.run, "127.0.0.1", port)
                        task_status.started(bound)
            finally:
                node.stopped.set()

        bound = await self.nursery.start(run)
        node.address = f"127.0.0.1:{bound}"

    async def stop(self, node_id: int) -> None:
        """Crash a node: its tasks are cancelled (files are closed, nothing is lost that
        reached the kernel), and it stops counting as alive."""
        node = self.nodes[node_id]
        node.up = False
        node.scope.cancel()
        self.pool.disconnect(node.address)
        with trio.fail_after(10):
            await node.stopped.wait()

    async def restart(self, node_id: int) -> None:
        old = self.nodes[node_id]
        port = int(old.address.rsplit(":", 1)[1])
        node = self.nodes[node_id] = self._fresh_node(node_id, old.config)
        await self._run_node(node, port)
        self.quorum.catch_up(node)

    async def create_topic(
        self, name: str, partitions: int = 1, rf: int = 3, **configs: str
    ) -> None:
        assert self.controller is not None
        await self.controller.create_topic(
            NewTopic(name=name, partitions=partitions, replication_factor=rf, configs=configs),
            internal=name in INTERNAL_TOPICS,
        )
        for info in self.image.topics[name].partitions:
            for replica in info.replicas:
                node = self.nodes[replica]
                tp = (name, info.partition)
                await wait_until(
                    lambda node=node, tp=tp, info=info: (
                        tp in node.rm.partitions  # type: ignore[misc]
                        and (
                            node.rm.partitions[tp].role.value == "leader"
                            if info.leader == node.node_id
                            else node.rm.partitions[tp].role.value == "follower"
                        )
                    )
                )

    def leader_of(self, topic: str, partition: int = 0) -> Node:
        info = self.image.partition(topic, partition)
        assert info is not None
        assert info.leader is not None
        return self.nodes[info.leader]


@asynccontextmanager
async def dataplane_cluster(
    tmp: Path, n: int = 3, **overrides: object
) -> AsyncIterator[DataPlaneCluster]:
    config = ClientConfig(
        reconnect_backoff_s=0.01, reconnect_backoff_max_s=0.1, request_timeout_s=10
    )
    async with open_rpc_pool(config) as pool, trio.open_nursery() as nursery:
        cluster = DataPlaneCluster(tmp, nursery, pool, **overrides)
        await cluster.start(n)
        try:
            yield cluster
        finally:
            nursery.cancel_scope.cancel()


async def wait_until(predicate: object, timeout: float = 10.0, interval: float = 0.01) -> None:
    """Poll ``predicate()`` until true; fail after ``timeout`` seconds."""
    with trio.fail_after(timeout):
        while not predicate():  # type: ignore[operator]  # noqa: ASYNC110 (state has no event)
            await trio.sleep(interval)
