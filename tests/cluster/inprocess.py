"""Whole brokers in one trio.run, on 127.0.0.1 with ports picked by the OS.

Each broker is the real :class:`dlog.broker.Broker` (storage, RPC, gossip, Raft,
controller); only the process boundary is missing, so failures are cancellations of a
broker's scope (like kill -9: files stay as they were, nothing is flushed on purpose)
or fault-injection hooks on its transports.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from dlog.broker import BoundAddresses, Broker, BrokerConfig
from dlog.client import Client, connect


@dataclass
class Member:
    node_id: int
    config: BrokerConfig
    broker: Broker
    addresses: BoundAddresses
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    running: bool = True


class InProcessCluster:
    def __init__(self, root: Path, nursery: trio.Nursery, **overrides: Any) -> None:
        self.root = root
        self.nursery = nursery
        self.overrides = overrides
        self.members: dict[int, Member] = {}

    def config(self, node_id: int, **extra: Any) -> BrokerConfig:
        seeds = tuple(m.addresses.gossip for m in self.members.values() if m.node_id != node_id)
        values: dict[str, Any] = {
            "node_id": node_id,
            "data_dir": self.root / f"node{node_id}",
            "rpc": "127.0.0.1:0",
            "gossip": "127.0.0.1:0",
            "raft": "127.0.0.1:0",
            "join": seeds,
            "bootstrap_cluster": node_id == 1,
            "broker_session_timeout_ms": 3000,
            "leader_rebalance_interval_ms": 0,
            "replica_fetch_max_wait_ms": 200,
            **self.overrides,
            **extra,
        }
        return BrokerConfig(**values)

    async def start(self, node_id: int, **extra: Any) -> Member:
        old = self.members.get(node_id)
        if old is not None and old.running:
            raise RuntimeError(f"node {node_id} is running")
        config = self.config(node_id, **extra)
        if old is not None:
            # Restart on the same ports, so others' view of its addresses stays valid.
            config = BrokerConfig(
                **{
                    **{f: getattr(config, f) for f in config.__dataclass_fields__},
                    "rpc": old.addresses.rpc,
                    "gossip": old.addresses.gossip,
                    "raft": old.addresses.raft,
                }
            )
        broker = Broker(config)
        scope = trio.CancelScope()

        async def run(task_status: trio.TaskStatus[BoundAddresses]) -> None:
            with scope:
                await broker.run(task_status=task_status)

        addresses = await self.nursery.start(run)
        member = Member(node_id, config, broker, addresses, scope)
        self.members[node_id] = member
        return member

    async def kill(self, node_id: int) -> None:
        """Stop a broker abruptly (its tasks are cancelled, files left as they are)."""
        member = self.members[node_id]
        member.scope.cancel()
        member.running = False
        with trio.fail_after(10):
            await member.broker.stopped.wait()

    def isolate(self, node_id: int) -> None:
        """Cut ``node_id`` off from every other node (RPC, Raft and gossip), both ways,
        through the transports' fault-injection hooks; it keeps running."""
        victim = self.members[node_id]
        b = victim.broker
        b.rpc_server.refuse_connections = True
        b.rpc_server.drop_connections()
        b.pool.faults.block_all()
        b.gossip.isolated = True
        raft_pool = b.quorum.node._pool
        assert raft_pool is not None
        raft_pool.faults.block_all()
        for other in self.members.values():
            if other.node_id == node_id or not other.running:
                continue
            other.broker.pool.faults.block(victim.addresses.rpc)
            other_raft = other.broker.quorum.node._pool
            assert other_raft is not None
            other_raft.faults.block(victim.addresses.raft)

    @property
    def bootstrap(self) -> list[str]:
        return [m.addresses.rpc for m in self.members.values() if m.running]

    def controller(self) -> Member | None:
        for m in self.members.values():
            if m.running and m.broker.controller is not None and m.broker.controller.active:
                return m
        return None

    async def wait_ready(self, timeout: float = 30) -> None:
        """Until a controller runs and every running broker is registered and unfenced."""
        await wait_for(lambda: self._ready(), timeout)

    def _ready(self) -> bool:
        ctrl = self.controller()
        if ctrl is None:
            return False
        running = [m for m in self.members.values() if m.running]
        want_voters = min(len(running), ctrl.config.max_voters)
        if sum(m.voter for m in ctrl.broker.quorum_members()) < want_voters:
            return False
        image = ctrl.broker.image
        for m in self.members.values():
            if not m.running:
                continue
            reg = image.brokers.get(m.node_id)
            if reg is None or reg.fenced or reg.incarnation != m.broker.incarnation:
                return False
        return True

    @asynccontextmanager
    async def client(self, **options: Any) -> AsyncIterator[Client]:
        async with connect(self.bootstrap, **options) as client:
            yield client


@asynccontextmanager
async def inprocess_cluster(
    root: Path, nodes: int = 3, **overrides: Any
) -> AsyncIterator[InProcessCluster]:
    async with trio.open_nursery() as nursery:
        cluster = InProcessCluster(root, nursery, **overrides)
        for node_id in range(1, nodes + 1):
            await cluster.start(node_id)
        await cluster.wait_ready()
        try:
            yield cluster
        finally:
            nursery.cancel_scope.cancel()


async def wait_for(
    predicate: Callable[[], object], timeout: float = 30, step: float = 0.02
) -> None:
    """Poll ``predicate`` (state without an event to wait on) until true or fail."""
    with trio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110 (broker state has no single event)
            await trio.sleep(step)
