"""A deterministic network of gossip cores in one process: no sockets, no clock.

Used by tests/sim and bench/gossip.py. One :meth:`SimNetwork.step` is one tick for
every running node: datagrams due by then are delivered, then every node ticks,
then what the nodes sent is routed through the simulated network, where each
datagram may be lost (``loss``), delayed by ``min_delay..max_delay`` ticks (plus
a slow receiver's extra delay) or cut by a partition. Everything random comes from
one seeded ``random.Random``.

A *stalled* node models a process starved of CPU: it neither ticks nor reads while
stalled; when the stall ends it first reads every datagram that arrived meanwhile,
then runs the ticks it missed, as the trio driver does.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from dlog.gossip.config import GossipConfig
from dlog.gossip.core import GossipCore
from dlog.gossip.events import MemberDead, MemberEvent, MemberState
from dlog.gossip.messages import Address
from dlog.types import NodeId


@dataclass(frozen=True, slots=True, kw_only=True)
class TracedEvent:
    tick: int
    observer: NodeId
    event: MemberEvent


@dataclass(slots=True)
class _SimNode:
    core: GossipCore
    running: bool = True
    stalled_until: int = 0
    backlog: list[tuple[Address, bytes]] = field(default_factory=list)
    started_at: int = 0
    extra_delay: int = 0
    group: int = 0


def sim_address(node_id: NodeId) -> Address:
    """The simulated address of a node: 10.x.y.z:7946."""
    return (f"10.0.{node_id // 250}.{node_id % 250 + 1}", 7946)


class SimNetwork:
    def __init__(
        self,
        *,
        seed: int,
        config: GossipConfig | None = None,
        loss: float = 0.0,
        min_delay: int = 0,
        max_delay: int = 1,
        stream_push_pull: bool = False,
    ) -> None:
        """``stream_push_pull``: cores hand push-pulls to the "driver", which here
        exchanges full state at once between running nodes on the same side of any
        partition (a TCP exchange that is either complete or fails)."""
        self.stream_push_pull = stream_push_pull
        self.rng = random.Random(seed)
        self.config = config or GossipConfig()
        self.loss = loss
        self.min_delay = min_delay
        self.max_delay = max_delay
        self.now = 0
        self.nodes: dict[NodeId, _SimNode] = {}
        self.trace: list[TracedEvent] = []
        #: The ticks at which each node was crashed or stopped.
        self.crashes: dict[NodeId, list[int]] = {}
        self.delivered = 0
        self.dropped = 0
        self._by_address: dict[Address, NodeId] = {}
        self._in_flight: list[tuple[int, int, Address, Address, bytes]] = []
        self._serial = 0

    # -- building and breaking the cluster -------------------------------------------------

    def add_node(
        self,
        node_id: NodeId,
        *,
        seeds: Iterable[NodeId] = (),
        metadata: Mapping[str, str] | None = None,
        incarnation: int = 0,
    ) -> GossipCore:
        """Start a node (again, after a crash: a fresh core with the same address)."""
        address = sim_address(node_id)
        core = GossipCore(
            node_id=node_id,
            address=address,
            rng=random.Random(self.rng.getrandbits(64)),
            metadata=metadata,
            seeds=[sim_address(s) for s in seeds],
            config=self.config,
            incarnation=incarnation,
            stream_push_pull=self.stream_push_pull,
        )
        group = self.nodes[node_id].group if node_id in self.nodes else 0
        self.nodes[node_id] = _SimNode(core=core, group=group, started_at=self.now)
        self._by_address[address] = node_id
        return core

    def core(self, node_id: NodeId) -> GossipCore:
        return self.nodes[node_id].core

    def crash(self, node_id: NodeId) -> None:
        """Stop a node without a word (kill -9)."""
        node = self.nodes[node_id]
        node.running = False
        node.backlog.clear()
        self.crashes.setdefault(node_id, []).append(self.now)

    def stall(self, node_id: NodeId, ticks: int) -> None:
        self.nodes[node_id].stalled_until = self.now + ticks

    def slow(self, node_id: NodeId, extra_delay: int) -> None:
        """Every datagram to this node takes ``extra_delay`` more ticks to be handled."""
        self.nodes[node_id].extra_delay = extra_delay

    def partition(self, *groups: Iterable[NodeId]) -> None:
        """Only nodes in the same group hear each other (unlisted nodes: group 0)."""
        for node in self.nodes.values():
            node.group = 0
        for index, members in enumerate(groups, start=1):
            for node_id in members:
                self.nodes[node_id].group = index

    def heal(self) -> None:
        for node in self.nodes.values():
            node.group = 0

    # -- running ---------------------------------------------------------------------------

    def step(self) -> None:
        self.now += 1
        now = self.now
        in_flight = self._in_flight
        while in_flight and in_flight[0][0] <= now:
            _, _, destination, source, data = heapq.heappop(in_flight)
            receiver = self._by_address.get(destination)
            if receiver is None:
                self.dropped += 1
                continue
            node_id = receiver
            node = self.nodes[node_id]
            if not node.running:
                self.dropped += 1
                continue
            if node.stalled_until > now:
                node.backlog.append((source, data))
                continue
            self.delivered += 1
            node.core.receive(data, source)
            if node.core.has_output:
                self._collect(node_id, node)
        for node_id, node in self.nodes.items():
            if not node.running or node.stalled_until > now:
                continue
            core = node.core
            if node.backlog:
                for source, data in node.backlog:
                    self.delivered += 1
                    core.receive(data, source)
                node.backlog.clear()
            # One tick, or the ticks missed while stalled.
            while core.now < now - node.started_at:
                core.tick()
            if core.has_output:
                self._collect(node_id, node)

    def _collect(self, node_id: NodeId, node: _SimNode) -> None:
        core = node.core
        for event in core.events():
            self.trace.append(TracedEvent(tick=self.now, observer=node_id, event=event))
        for destination, data in core.datagrams_to_send():
            self._route(node, destination, data)
        for destination in core.push_pulls_to_start():
            peer_id = self._by_address.get(destination)
            peer = self.nodes.get(peer_id) if peer_id is not None else None
            if peer is None or not peer.running or peer.group != node.group:
                continue
            if peer.stalled_until > self.now:
                continue
            peer.core.merge_push_pull(core.push_pull_state())
            core.merge_push_pull(peer.core.push_pull_state())
            if peer_id is not None and peer.core.has_output:
                self._collect(peer_id, peer)
            if core.has_output:
                self._collect(node_id, node)

    def _route(self, sender: _SimNode, destination: Address, data: bytes) -> None:
        if self.loss and self.rng.random() < self.loss:
            self.dropped += 1
            return
        receiver_id = self._by_address.get(destination)
        receiver = self.nodes.get(receiver_id) if receiver_id is not None else None
        if receiver is None or receiver.group != sender.group:
            self.dropped += 1
            return
        delay = self.rng.randint(self.min_delay, self.max_delay) + receiver.extra_delay
        self._serial += 1
        heapq.heappush(
            self._in_flight,
            (self.now + max(1, delay), self._serial, destination, sender.core.address, data),
        )

    def run(self, ticks: int) -> None:
        for _ in range(ticks):
            self.step()

    def run_until(self, condition: Callable[[], bool], max_ticks: int, every: int = 10) -> bool:
        """Step until ``condition()`` holds (checked every ``every`` ticks)."""
        deadline = self.now + max_ticks
        while self.now < deadline:
            for _ in range(every):
                self.step()
            if condition():
                return True
        return condition()

    # -- observing -------------------------------------------------------------------------

    def running(self) -> list[NodeId]:
        return [node_id for node_id, node in self.nodes.items() if node.running]

    def view(self, observer: NodeId) -> dict[NodeId, MemberState]:
        return {m.node_id: m.state for m in self.nodes[observer].core.members()}

    def sees_exactly(self, observers: Iterable[NodeId], alive: set[NodeId]) -> bool:
        """Every observer sees exactly ``alive`` as its alive members."""
        for observer in observers:
            view = self.view(observer)
            if {n for n, s in view.items() if s is MemberState.ALIVE} != alive:
                return False
        return True

    def all_see(self, observers: Iterable[NodeId], subject: NodeId, state: MemberState) -> bool:
        return all(self.view(o).get(subject) is state for o in observers)

    def false_deaths(self) -> list[TracedEvent]:
        """Dead events about a node that had never been crashed or stopped by then."""
        out = []
        for traced in self.trace:
            if not isinstance(traced.event, MemberDead):
                continue
            crashes = self.crashes.get(traced.event.member.node_id, [])
            if not any(tick <= traced.tick for tick in crashes):
                out.append(traced)
        return out

    def bytes_sent_per_node(self) -> dict[NodeId, int]:
        return {node_id: node.core.stats.bytes_sent for node_id, node in self.nodes.items()}
