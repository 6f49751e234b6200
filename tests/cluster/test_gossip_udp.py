"""Real gossip nodes on 127.0.0.1: UDP probes, TCP push-pull, kill and restart.

Waiting is on membership events with deadlines; nothing sleeps for synchronization.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from dlog.gossip import GossipConfig, GossipNode, Member, MemberState
from dlog.gossip.events import MemberDead, MemberLeft
from dlog.gossip.messages import (
    Ack,
    Ping,
    assemble_datagram,
    datagram_prefix,
    decode_datagram,
    decode_state,
    encode_message,
)
from dlog.gossip.node import GossipPushPullRequest
from dlog.net.client import open_rpc_pool
from dlog.net.messages import payload_bytes
from dlog.types import NodeId

HOST = "127.0.0.1"


async def wait_for_view(
    node: GossipNode, predicate: Callable[[dict[NodeId, Member]], bool], timeout: float
) -> None:
    """Wait until ``predicate(view)`` holds for ``node``'s view; fail after ``timeout``."""
    with trio.fail_after(timeout):
        async with node.subscribe() as events:
            while not predicate({m.node_id: m for m in node.members()}):
                await events.receive()


def all_alive(ids: set[int]) -> Callable[[dict[NodeId, Member]], bool]:
    return lambda view: {n for n, m in view.items() if m.state is MemberState.ALIVE} == ids


class Runner:
    """Starts nodes in one nursery, each under its own cancel scope so it can be killed."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.scopes: dict[int, trio.CancelScope] = {}

    async def start(self, node: GossipNode) -> int:
        scope = trio.CancelScope()
        self.scopes[node.node_id] = scope

        async def run(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
            with scope:
                await node.run(task_status=task_status)

        port: int = await self.nursery.start(run)
        return port

    def kill(self, node_id: int) -> None:
        self.scopes[node_id].cancel()


def metadata(node_id: int) -> dict[str, str]:
    return {
        "rpc": f"{HOST}:{9400 + node_id}",
        "raft": f"{HOST}:{9600 + node_id}",
        "role": "broker",
        "version": "0.1.0",
    }


async def test_killed_node_is_declared_dead_and_rejoins_with_higher_incarnation() -> None:
    config = GossipConfig()
    async with trio.open_nursery() as nursery:
        runner = Runner(nursery)
        seed = GossipNode(node_id=NodeId(1), host=HOST, config=config, metadata=metadata(1))
        seed_port = await runner.start(seed)
        seeds = [f"{HOST}:{seed_port}"]
        nodes = {1: seed}
        for node_id in (2, 3):
            nodes[node_id] = GossipNode(
                node_id=NodeId(node_id),
                host=HOST,
                seeds=seeds,
                config=config,
                metadata=metadata(node_id),
            )
            await runner.start(nodes[node_id])
        for node in nodes.values():
            await wait_for_view(node, all_alive({1, 2, 3}), timeout=5)
        assert nodes[1].member(NodeId(3)).metadata == metadata(3)  # type: ignore[union-attr]
        victim_port = nodes[3].address[1]  # type: ignore[index]

        # Kill node 3: cancelled, no leave. Both survivors must declare it dead in time.
        runner.kill(3)
        killed_at = trio.current_time()
        detected: dict[int, float] = {}

        async def watch(observer: int) -> None:
            await wait_for_view(
                nodes[observer],
                lambda view: view[NodeId(3)].state is MemberState.DEAD,
                timeout=2.5,
            )
            detected[observer] = trio.current_time() - killed_at

        async with trio.open_nursery() as watchers:
            watchers.start_soon(watch, 1)
            watchers.start_soon(watch, 2)
        print(f"kill -> dead on both survivors: {max(detected.values()):.2f} s")
        dead_incarnation = nodes[1].member(NodeId(3)).incarnation  # type: ignore[union-attr]

        # Restart node 3 on the same port; it rejoins with a higher incarnation.
        nodes[3] = GossipNode(
            node_id=NodeId(3),
            host=HOST,
            port=victim_port,
            seeds=seeds,
            config=config,
            metadata=metadata(3),
        )
        await runner.start(nodes[3])
        for observer in (1, 2):
            await wait_for_view(
                nodes[observer],
                lambda view: (
                    view[NodeId(3)].state is MemberState.ALIVE
                    and view[NodeId(3)].incarnation > dead_incarnation
                ),
                timeout=5,
            )
        await wait_for_view(nodes[3], all_alive({1, 2, 3}), timeout=5)
        assert nodes[3].incarnation > dead_incarnation
        nursery.cancel_scope.cancel()


async def test_graceful_leave_is_seen_as_left_not_dead() -> None:
    async with trio.open_nursery() as nursery:
        runner = Runner(nursery)
        first = GossipNode(node_id=NodeId(1), host=HOST)
        port = await runner.start(first)
        second = GossipNode(node_id=NodeId(2), host=HOST, seeds=[(HOST, port)])
        third = GossipNode(node_id=NodeId(3), host=HOST, seeds=[(HOST, port)])
        await runner.start(second)
        await runner.start(third)
        for node in (first, second, third):
            await wait_for_view(node, all_alive({1, 2, 3}), timeout=5)
        seen: list[object] = []
        async with first.subscribe() as events:
            with trio.fail_after(2):
                await third.leave()
            await wait_for_view(
                first, lambda view: view[NodeId(3)].state is MemberState.LEFT, timeout=2
            )
            await wait_for_view(
                second, lambda view: view[NodeId(3)].state is MemberState.LEFT, timeout=2
            )
            while True:
                try:
                    seen.append(events.receive_nowait())
                except trio.WouldBlock:
                    break
        assert any(isinstance(e, MemberLeft) for e in seen)
        assert not any(isinstance(e, MemberDead) for e in seen)
        nursery.cancel_scope.cancel()


async def test_push_pull_over_tcp_on_the_gossip_port_number() -> None:
    async with trio.open_nursery() as nursery:
        runner = Runner(nursery)
        node = GossipNode(node_id=NodeId(1), host=HOST, metadata=metadata(1))
        port = await runner.start(node)
        import random

        from dlog.gossip.core import GossipCore

        peer = GossipCore(
            node_id=NodeId(7), address=(HOST, 1), rng=random.Random(0), metadata=metadata(7)
        )
        async with open_rpc_pool() as pool:
            with trio.fail_after(5):
                response = await pool.call(
                    f"{HOST}:{port}", GossipPushPullRequest(payload=peer.push_pull_state())
                )
        entries = {e.node_id: e for e in decode_state(payload_bytes(response.payload))}
        assert entries[NodeId(1)].metadata == metadata(1)
        # The node merged our state before answering: it knows node 7 now.
        assert NodeId(7) in entries
        assert node.member(NodeId(7)).metadata == metadata(7)  # type: ignore[union-attr]
        nursery.cancel_scope.cancel()


async def test_malformed_datagrams_are_counted_not_fatal() -> None:
    async with trio.open_nursery() as nursery:
        runner = Runner(nursery)
        node = GossipNode(node_id=NodeId(1), host=HOST)
        port = await runner.start(node)
        sock = trio.socket.socket(type=trio.socket.SOCK_DGRAM)
        with sock:
            await sock.bind((HOST, 0))
            await sock.sendto(b"\x85garbage", (HOST, port))
            await sock.sendto(b"\x00" * 5000, (HOST, port))
            # A valid ping after the garbage: its ack proves the garbage was handled.
            ping = assemble_datagram(
                datagram_prefix(NodeId(9), 0), encode_message(Ping(seq=42, target=NodeId(1))), []
            )
            await sock.sendto(ping, (HOST, port))
            with trio.fail_after(5):
                reply = decode_datagram(await sock.recv(65536))
        assert reply.primary == Ack(seq=42)
        assert node.stats.malformed_dropped == 1
        assert node.stats.oversize_dropped == 1
        assert [m.node_id for m in node.members()] == [1]
        nursery.cancel_scope.cancel()


async def test_subscriber_that_falls_behind_is_dropped() -> None:
    async with trio.open_nursery() as nursery:
        runner = Runner(nursery)
        first = GossipNode(node_id=NodeId(1), host=HOST)
        port = await runner.start(first)
        async with first.subscribe(max_buffer=1) as slow_events:
            for node_id in (2, 3, 4):
                await runner.start(
                    GossipNode(node_id=NodeId(node_id), host=HOST, seeds=[(HOST, port)])
                )
            await wait_for_view(first, all_alive({1, 2, 3, 4}), timeout=5)
            # It kept the one event it had room for, then its channel ended.
            received = [event async for event in slow_events]
            assert len(received) == 1
        nursery.cancel_scope.cancel()


async def test_an_idle_node_does_not_wake_every_tick() -> None:
    # Ticks stay 10 ms apart, but the loop wakes only for datagrams and due timers:
    # a healthy cluster probes every 200 ms and gossips every 100 ms.
    async with trio.open_nursery() as nursery:
        runner = Runner(nursery)
        seed = GossipNode(node_id=NodeId(1), host=HOST)
        seeds = [f"{HOST}:{await runner.start(seed)}"]
        peer = GossipNode(node_id=NodeId(2), host=HOST, seeds=seeds)
        await runner.start(peer)
        await wait_for_view(seed, all_alive({1, 2}), timeout=10)
        core = seed._core
        assert core is not None
        ticks, wakeups = core.now, seed.loop_wakeups
        await trio.sleep(2)  # not a wait for something: two seconds of an idle cluster
        ticked = core.now - ticks
        assert ticked >= 150  # the ticks kept their 10 ms grid
        woke = seed.loop_wakeups - wakeups
        assert woke < ticked / 2, f"{woke} wake-ups for {ticked} ticks"
        assert {m.node_id for m in seed.members() if m.state is MemberState.ALIVE} == {1, 2}
        nursery.cancel_scope.cancel()
